// The extension module moka_ext._C. Importing it runs the static op
// registrations (TORCH_LIBRARY in ops.cpp and the per-backend
// TORCH_LIBRARY_IMPL blocks); its only Python function reports how it was built.
#include <Python.h>
#include <torch/version.h>

#include "build_config.h"


namespace {

PyObject* build_info(PyObject*, PyObject*) {
#ifdef MOKA_WITH_CUDA
  PyObject* cuda = Py_True;
#else
  PyObject* cuda = Py_False;
#endif
  return Py_BuildValue(
      "{s:s,s:O,s:s}", "torch_version", TORCH_VERSION, "cuda", cuda,
      "cuda_archs", MOKA_CUDA_ARCHS);
}

PyMethodDef methods[] = {
    {"build_info", build_info, METH_NOARGS, "How this extension was built."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};

}  // namespace

extern "C" PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module_def); }
