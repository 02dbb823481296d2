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
  // The factor-gradient kernels: CTAs that split the token tiles among
  // themselves (grid.x; ctas / chunks CTAs share each tile), the bytes of x
  // and dY all CTAs load per tile, and the float32 workspace written (factor
  // kernel) or read (reduce, gate kernels). Zero for the forward kernels.
  int64_t chunks;
  int64_t tile_load_bytes;
  int64_t workspace_bytes;
};

// Fills *plan for the forward kernel `impl` would launch (kAuto: the one
// kron_mix_fused_forward picks), returns nullptr, or why the kernel declines.
const char* kron_mix_fused_plan(const KronMixParams& p, FusedImpl impl, KronLaunchPlan* plan);

// kron_mix_indexed: every row of x with its own adapter, in one launch.
// The rows are sorted by adapter (stable) into `order`; the tokens of the
// sorted rows form one sequence in which each adapter's tokens are one
// segment. The schedule cuts every segment into tiles of at most tile_tokens
// tokens, so a tile never straddles two adapters.
struct KronIndexedTile {
  int64_t start;    // first token of the tile in the sorted sequence
  int32_t adapter;  // -1: the tile's rows of y are zero-filled
  int32_t count;    // tokens, 1..tile_tokens
};

// y[row, s, :] = sum_j sum_k gates[a, off_j + k] vec(A_j[a, k] X B_j[a, k]^T),
// a = row_adapter[row], X = x[row, s, :].view(na_j, nb_j); zero where a = -1.
// Token (row, s) sits at x + (row * row_tokens + s) * x_token_stride (y alike).
struct KronIndexedParams {
  DType dtype;
  int64_t rows;
  int64_t row_tokens;  // tokens per row (the product of x's middle dims)
  int in, out;
  const void* x;
  int64_t x_token_stride;
  void* y;
  int64_t y_token_stride;
  const int64_t* order;            // device, rows entries: row indices sorted by adapter
  const KronIndexedTile* tiles;    // device, n_tiles entries: kron_mix_indexed_schedule's
  int64_t n_tiles;
  int n_adapters;
  const void* gates;               // (n_adapters, sum r), contiguous
  // Adapter 0's factors; adapter a's start a * r*ma*na (A) and a * r*mb*nb (B)
  // elements further: A_j is (n_adapters, r, ma, na), contiguous (B_j alike).
  int n_groups;
  KronGroupParams groups[kFusedMaxGroups];
};

// nullptr if the indexed kernel takes `p`'s shapes on the current device
// (tiles and order are not read), else why not; fills plan->tile_tokens etc.
const char* kron_mix_indexed_plan(const KronIndexedParams& p, KronLaunchPlan* plan);
inline const char* kron_mix_indexed_unsupported(const KronIndexedParams& p) {
  return kron_mix_indexed_plan(p, nullptr);
}

// The tiles of the schedule for row_counts[a + 1] rows of adapter a
// (a = -1 .. n_adapters-1; the rows of -1 sort first), written to `tiles`
// unless it is nullptr; returns how many.
int64_t kron_mix_indexed_schedule(
    const int64_t* row_counts, int n_adapters, int64_t row_tokens, int tile_tokens, KronIndexedTile* tiles);

// One launch over p.n_tiles tiles. cudaErrorNotSupported when the planner declines.
cudaError_t kron_mix_indexed_forward(const KronIndexedParams& p, cudaStream_t stream);

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

// The factor-gradient kernels, as for the forward: kAuto takes v2 (x and dY
// streamed once per group, the per-token intermediate in registers,
// ldmatrix; csrc/cuda/kron_mix_grad_v2.cu) when it takes the problem, else v1
// (one CTA per (component, kind) and chunk of tokens; kron_mix_fused.cu).
// nullptr if the kernels `impl` take `p`, else why not.
const char* kron_mix_fused_grad_unsupported(const KronGradParams& p, FusedImpl impl = FusedImpl::kAuto);

// Bytes of device workspace kron_mix_fused_grad_factors needs for `p` on the
// current device.
size_t kron_mix_fused_grad_workspace_bytes(const KronGradParams& p, FusedImpl impl = FusedImpl::kAuto);

// The plan of the factor-gradient kernel (kernel = 0), of the reduce (1) or
// of v2's gate-gradient kernel (2).
const char* kron_mix_fused_grad_plan(const KronGradParams& p, int kernel, FusedImpl impl, KronLaunchPlan* plan);

cudaError_t kron_mix_fused_grad_factors(
    const KronGradParams& p, void* workspace, size_t workspace_bytes, cudaStream_t stream,
    FusedImpl impl = FusedImpl::kAuto);

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
