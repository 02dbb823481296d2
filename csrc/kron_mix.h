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

// The fused forward kernels. kAuto: v2 (persistent CTAs, resident factors,
// a cp.async ring, ldmatrix; csrc/cuda/kron_mix_fused_v2.cu) when it takes the
// problem, else v1 (one CTA per token tile; csrc/cuda/kron_mix_fused.cu),
// which stays as the baseline of the microbenchmark and the performance model.
enum class FusedImpl : int { kAuto = 0, kV2 = 2, kV1 = 1 };

// nullptr if the fused kernel `impl` takes `p` on the current device, else why not.
const char* kron_mix_fused_unsupported(const KronMixParams& p, FusedImpl impl = FusedImpl::kAuto);

// Fused forward (tensor-core MMA for float16/bfloat16). Returns the launch
// error, or cudaErrorNotSupported when kron_mix_fused_unsupported(p, impl) != nullptr.
cudaError_t kron_mix_fused_forward(
    const KronMixParams& p, cudaStream_t stream, FusedImpl impl = FusedImpl::kAuto);

// What a planner chose for one launch of a kernel, as the performance model
// (benchmarks/kernel_model.py) reads it through the simulator harness.
struct KronLaunchPlan {
  int tile_tokens;        // tokens per tile
  int64_t tiles;          // token tiles of the problem
  int64_t ctas;           // CTAs of the launch (all grid dims)
  int threads;            // per CTA
  int stages;             // x tiles in flight per CTA (1: loaded synchronously)
  int factor_loads;       // times each CTA loads each factor: 1 (resident) or per tile
  int barriers_per_tile;  // CTA barriers per token tile (all groups)
  size_t smem_bytes;      // dynamic shared memory per CTA
  // Per token tile, all groups and components (for the gradient kernel: all
  // jobs), counted by walking the kernel's warp tiling: m16n8k16 MMAs, and
  // shared-memory bytes moved (fragment loads, tile and staging writes/reads).
  int64_t mma_per_tile;
  int64_t smem_bytes_per_tile;
};

// Fills *plan for the forward kernel `impl` would launch (kAuto: the one
// kron_mix_fused_forward picks), returns nullptr, or why the kernel declines.
const char* kron_mix_fused_plan(const KronMixParams& p, FusedImpl impl, KronLaunchPlan* plan);

// Factor gradients of the backward, for float16/bfloat16, per component k of
// group j (sums over tokens t, X_t and dY_t viewed as in the forward):
//   dA_k = g_k sum_t dY_t B_k X_t^T,  dB_k = g_k sum_t dY_t^T A_k X_t,
//   dg_k = <A_k, sum_t dY_t B_k X_t^T>.
// Per-CTA partial sums go to a float32 workspace and are reduced in a fixed
// order by a second kernel: the result is deterministic on a given device.
// (dX is the forward map of the transposed factors: kron_mix_fused_forward.)
struct KronGradGroupParams {
  const void* A;   // (r, ma, na), contiguous
  const void* Bt;  // (r, nb, mb): B transposed, contiguous
  void* dA;        // (r, ma, na), contiguous output
  void* dB;        // (r, mb, nb), contiguous output
  int r, ma, na, mb, nb;
  int gate_offset;
};

struct KronGradParams {
  DType dtype;
  int64_t tokens;
  int in, out;
  const void* x;
  int64_t x_row_stride;
  const void* grad_y;
  int64_t grad_y_row_stride;
  const void* gates;
  void* grad_gates;  // sum(r) entries, output
  int n_groups;
  KronGradGroupParams groups[kFusedMaxGroups];
};

// nullptr if the fused factor-gradient kernels take `p`, else why not.
const char* kron_mix_fused_grad_unsupported(const KronGradParams& p);

// Bytes of device workspace kron_mix_fused_grad_factors needs for `p` on the
// current device.
size_t kron_mix_fused_grad_workspace_bytes(const KronGradParams& p);

// The factor-gradient kernel's plan (kernel = 0) or the reduce kernel's (1).
const char* kron_mix_fused_grad_plan(const KronGradParams& p, int kernel, KronLaunchPlan* plan);

cudaError_t kron_mix_fused_grad_factors(
    const KronGradParams& p, void* workspace, size_t workspace_bytes, cudaStream_t stream);

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
