"""The C++ microbenchmarks build with CMake against the torch-free kernel sources and cuBLAS."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import moka_ext

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not moka_ext.build_info()["cuda"], reason="extension built without CUDA (no nvcc or a CPU-only torch)")
def test_cpp_microbenchmarks_build(tmp_path):
    cmake = shutil.which("cmake")
    assert cmake, "cmake is needed to build benchmarks/cpp"
    build = tmp_path / "build"
    subprocess.run([cmake, "-S", str(ROOT), "-B", str(build), "-DCMAKE_CUDA_ARCHITECTURES=90a",
                    f"-DMOKA_PYTHON={sys.executable}"], check=True, capture_output=True, text=True)
    subprocess.run([cmake, "--build", str(build), "-j", "2"], check=True, capture_output=True, text=True)
    assert (build / "bench_kron").is_file()
