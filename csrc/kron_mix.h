// Torch-free entry points of the CUDA kernels: raw pointers, a small params
// struct and the stream. The ATen glue (csrc/cuda/ops_cuda.cpp) and the C++
// microbenchmarks (benchmarks/cpp/) both call the kernels through this header,
// so it includes nothing but the CUDA runtime API.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace moka {
namespace cuda {

enum class DType : int { kFloat16 = 0, kBFloat16 = 1, kFloat32 = 2, kFloat64 = 3 };

// Limits of the fused kernel; anything beyond goes to the reshape-matmul path.
constexpr int kFusedMaxGroups = 8;
constexpr int kFusedMaxFactorDim = 128;  // ma, na, mb, nb each

// One group of stacked components: A (r, ma, na), B (r, mb, nb), contiguous.
struct KronGroupParams {
  const void* A;
  const void* B;
  int r, ma, na, mb, nb;
  int gate_offset;  // index of the group's first component in `gates`
};

// y[t, :] = [base[t, :] +] sum_j sum_k gates[off_j + k] * vec(A_jk X_t B_jk^T)
// for t < tokens, X_t = x[t, :].view(na_j, nb_j). Rows are strided (the last
// dim is contiguous), all tensors have the element type `dtype`.
struct KronMixParams {
  DType dtype;
  int64_t tokens;
  int in, out;
  const void* x;
  int64_t x_row_stride;
  const void* base;  // nullptr: no base
  int64_t base_row_stride;
  void* y;
  int64_t y_row_stride;
  const void* gates;  // device pointer, sum(r) entries
  int n_groups;
  KronGroupParams groups[kFusedMaxGroups];
};

// nullptr if the fused kernel takes `p` on the current device, else why not.
const char* kron_mix_fused_unsupported(const KronMixParams& p);

// Fused forward (tensor-core MMA for float16/bfloat16). Returns the launch
// error, or cudaErrorNotSupported when kron_mix_fused_unsupported(p) != nullptr.
cudaError_t kron_mix_fused_forward(const KronMixParams& p, cudaStream_t stream);

// softmax(logits * inv_temperature) over rows of length n (contiguous).
cudaError_t gate_softmax_forward(
    DType dtype, const void* logits, void* out, int64_t rows, int64_t n,
    double inv_temperature, cudaStream_t stream);

// dlogits = s * (ds - <s, ds>) * inv_temperature, per row.
cudaError_t gate_softmax_backward(
    DType dtype, const void* grad, const void* output, void* dlogits,
    int64_t rows, int64_t n, double inv_temperature, cudaStream_t stream);

}  // namespace cuda
}  // namespace moka
