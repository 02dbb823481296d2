// Argument validation and dtype rules shared by every backend of the moka ops.
//
// Every kernel entry point calls these before it touches a pointer, so a bad
// call raises a c10::Error (RuntimeError in Python) naming the argument, what
// was expected and what was given, on every device.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

namespace moka {

// The dtype every kernel accumulates in: float64 for float64 inputs, else
// float32 (float16/bfloat16 inputs are widened, never accumulated in place).
inline at::ScalarType accumulate_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// Factor shapes of one group of stacked components: A (r, ma, na), B (r, mb, nb).
struct GroupShape {
  int64_t r, ma, na, mb, nb;
  int64_t gate_offset;  // index of the group's first component in `gates`
};

struct KronMixShape {
  int64_t tokens;  // product of x's leading dims
  int64_t in, out;
  int64_t components;  // sum of r over groups == gates.numel()
  std::vector<GroupShape> groups;
};

// Validates (x, A, B, gates) against the op contract and returns the shapes.
// `op` names the calling op in messages.
KronMixShape check_kron_mix_args(
    const char* op,
    const at::Tensor& x,
    at::TensorList A,
    at::TensorList B,
    const at::Tensor& gates);

// Checks that `t` has shape (*x.shape[:-1], out), dtype and device of x.
void check_like_output(
    const char* op,
    const char* name,
    const at::Tensor& t,
    const at::Tensor& x,
    int64_t out);

// kron_mix_indexed: x (rows, ..., in), row_adapter int64 (rows,), A[j]
// (n_adapters, r_j, ma_j, na_j), B[j] (n_adapters, r_j, mb_j, nb_j), gates
// (n_adapters, sum r). Returns the shapes of one adapter's slice (tokens over
// all rows) and sets *n_adapters. Row values are checked by the kernels.
KronMixShape check_kron_mix_indexed_args(
    const char* op,
    const at::Tensor& x,
    const at::Tensor& row_adapter,
    at::TensorList A,
    at::TensorList B,
    const at::Tensor& gates,
    int64_t* n_adapters);

void check_gate_softmax_args(
    const char* op,
    const at::Tensor& logits,
    double temperature);

// gate_softmax_backward: `output` as check_gate_softmax_args, `grad` like it.
void check_gate_softmax_backward_args(
    const at::Tensor& grad,
    const at::Tensor& output,
    double temperature);

}  // namespace moka
