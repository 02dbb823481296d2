// The reshape-matmul implementation of kron_mix in device-generic ATen: per
// group, Z = X B^T as one GEMM over all tokens and components, then
// Y = [g_1 A_1 .. g_r A_r] Z as a second, the intermediate Z written out.
// The CUDA backend runs it (on cuBLAS) for every shape and dtype the fused
// kernels decline; the internal ops moka::_kron_mix_matmul and
// moka::_kron_mix_matmul_backward expose it on every device, so the CPU test
// suite executes it.
#pragma once

#include "validate.h"

#include <ATen/ATen.h>

#include <tuple>
#include <vector>

namespace moka {

// What the kron_mix_backward ops return: (grad_x, grad_A, grad_B, grad_gates).
using KronMixBackward = std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor>;

// The gradients of a call without tokens: zeros shaped like the inputs.
KronMixBackward zero_grads(const at::Tensor& x, at::TensorList A, at::TensorList B, const at::Tensor& gates);

// (tokens, width) view whose rows are strided but whose last dim is
// contiguous, as the kernels take it; copies only when it has to.
at::Tensor rows_of(const at::Tensor& t, int64_t tokens, int64_t width);

// x's sizes with the last one replaced by `out`.
std::vector<int64_t> out_sizes(const at::Tensor& x, int64_t out);

// y (tokens, out) = [base2d +] kron_mix(x2d); low-precision groups are summed
// in float32. tokens > 0.
at::Tensor kron_mix_matmul_forward(
    const KronMixShape& s,
    const at::Tensor& x2d,
    at::TensorList A,
    at::TensorList B,
    const at::Tensor& gates,
    const at::Tensor* base2d);

struct KronMixGrads {
  at::Tensor grad_x;  // (tokens, in); undefined unless requested
  std::vector<at::Tensor> grad_A, grad_B;
  at::Tensor grad_gates;
};

// The backward of kron_mix_matmul_forward (without base) for grad_y (tokens,
// out), in x's dtype; grad_x only if want_grad_x. tokens > 0.
KronMixGrads kron_mix_matmul_backward(
    const KronMixShape& s,
    const at::Tensor& x2d,
    const at::Tensor& gy2d,
    at::TensorList A,
    at::TensorList B,
    const at::Tensor& gates,
    bool want_grad_x);

}  // namespace moka
