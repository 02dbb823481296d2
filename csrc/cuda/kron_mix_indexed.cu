// The kron_mix_indexed forward for float16/bfloat16: every row of x with its
// own adapter's factors and gates, in one launch (S-LoRA/punica's batching,
// for Kronecker mixtures). Torch-free, driven through csrc/kron_mix.h.
//
// The host sorts the rows by adapter and cuts each adapter's tokens into
// tiles (kron_mix_indexed_schedule), so every CTA computes one token tile of
// one adapter with the fused forward's two-stage tensor-core tiling
// (kron_mix_fused.cu, v1: one CTA per tile, factors loaded per tile), its
// factor and gate pointers offset by that adapter. x rows are gathered and y
// rows scattered through the sort order; tiles of adapter -1 write zeros, so
// every row of y is written exactly once. v1's tiling rather than v2's: v2
// keeps one set of factors resident in a persistent CTA, which a schedule
// whose tiles change adapter would reload anyway.
//
// The tile itself is kron_mix_two_stage.cuh, shared with the v1 forward.
#include "../kron_mix.h"
#include "kron_mix_common.cuh"
#include "kron_mix_two_stage.cuh"
#include "launch.cuh"
#include "ptx.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace moka {
namespace cuda {
namespace {

// The tile's tokens as Xs[(t, a)][b], token t read from x at token index
// tok[t]; tokens t >= nt and the k padding columns b in [nb, nb16) are zero.
template <typename T>
__device__ void load_x_tile_indexed(
    T* xs, const KronIndexedParams& p, const int64_t* tok, int nt, int tt, int na, int nb, int nb16, int ldx) {
  const T* x = static_cast<const T*>(p.x);
  const int in = p.in;
  if (nb % 8 == 0 && aligned16(x) && p.x_token_stride % 8 == 0) {
    const int cpt = in / 8;  // 16-byte chunks per token
    for (int i = threadIdx.x; i < tt * cpt; i += kThreads) {
      const int t = i / cpt, c = (i - t * cpt) * 8;
      const int a = c / nb, b = c - a * nb;
      uint4 v = make_uint4(0, 0, 0, 0);
      if (t < nt) v = __ldg(reinterpret_cast<const uint4*>(x + tok[t] * p.x_token_stride + c));
      *reinterpret_cast<uint4*>(xs + (t * na + a) * ldx + b) = v;
    }
  } else {
    for (int i = threadIdx.x; i < tt * in; i += kThreads) {
      const int t = i / in, c = i - t * in;
      const int a = c / nb, b = c - a * nb;
      xs[(t * na + a) * ldx + b] = t < nt ? x[tok[t] * p.x_token_stride + c] : Bits<T>::from_float(0.f);
    }
  }
  const int pad = nb16 - nb;
  if (pad > 0) {
    for (int i = threadIdx.x; i < tt * na * pad; i += kThreads) {
      const int row = i / pad;
      xs[row * ldx + nb + (i - row * pad)] = Bits<T>::from_float(0.f);
    }
  }
}

// Shared-memory plan of one launch, identical for all CTAs.
struct IndexedPlan {
  int tt;        // tokens per tile
  int tok_elems; // int64 token indices of the tile (tt, rounded to 2: 16-byte aligned)
  int ys_elems;  // float32 elements of Ys (>= tt * out, a multiple of 4)
  int xs_elems, as_elems, bs_elems, zs_elems;  // 16-bit elements, multiples of 8
  size_t smem_bytes;
};

template <typename T>
__global__ void __launch_bounds__(kThreads, 1)
    kron_mix_indexed_fwd_kernel(const KronIndexedParams p, const IndexedPlan plan) {
  MOKA_DYNAMIC_SHARED(smem_raw);
  int64_t* tok = reinterpret_cast<int64_t*>(smem_raw);
  float* ys = reinterpret_cast<float*>(tok + plan.tok_elems);
  T* xs = reinterpret_cast<T*>(ys + plan.ys_elems);
  T* as = xs + plan.xs_elems;
  T* bs = as + plan.as_elems;
  T* zs = bs + plan.bs_elems;

  const int tt = plan.tt;
  const KronIndexedTile tile = p.tiles[blockIdx.x];
  const int nt = tile.count;  // valid tokens, <= tt
  const int out = p.out;
  T* y = static_cast<T*>(p.y);

  // Token t of the tile is token s of row order[u / row_tokens], u = start + t.
  auto token_index = [&](int t) {
    const int64_t u = tile.start + t;
    const int64_t q = u / p.row_tokens;
    return p.order[q] * p.row_tokens + (u - q * p.row_tokens);
  };

  if (tile.adapter < 0) {  // rows without an adapter: y = 0 (the whole CTA leaves here)
    for (int i = threadIdx.x; i < nt * out; i += kThreads) {
      const int t = i / out, o = i - t * out;
      y[token_index(t) * p.y_token_stride + o] = Bits<T>::from_float(0.f);
    }
    return;
  }
  for (int t = threadIdx.x; t < tt; t += kThreads) tok[t] = t < nt ? token_index(t) : 0;
  // (the first group's barrier publishes tok)

  const int64_t adapter = tile.adapter;
  int n_comp = 0;
  for (int j = 0; j < p.n_groups; ++j) n_comp += p.groups[j].r;
  const T* gates = static_cast<const T*>(p.gates) + adapter * n_comp;

  for (int j = 0; j < p.n_groups; ++j) {
    const KronGroupParams g = p.groups[j];
    const int nb16 = round_up(g.nb, 16);
    __syncthreads();  // the previous group is done with Xs and Zs
    load_x_tile_indexed<T>(xs, p, tok, nt, tt, g.na, g.nb, nb16, operand_ld(nb16));
    // The GEMMs span the tile's nt valid tokens, not tt: a segment's last tile
    // (and, in decode batches, most tiles) is partial, and its MMA work
    // shrinks with it.
    mix_group_two_stage<T>(g, static_cast<const T*>(g.A) + adapter * g.r * g.ma * g.na,
                           static_cast<const T*>(g.B) + adapter * g.r * g.mb * g.nb, gates, j, nt, out,
                           xs, as, bs, zs, ys);
  }

  __syncthreads();

  // Epilogue: y rows of the tile's tokens = Ys, the only write of them.
  const bool vec = out % 8 == 0 && aligned16(y) && p.y_token_stride % 8 == 0;
  if (vec) {
    const int cpt = out / 8;
    for (int i = threadIdx.x; i < nt * cpt; i += kThreads) {
      const int t = i / cpt, o = (i - t * cpt) * 8;
      const float4 lo = *reinterpret_cast<const float4*>(ys + t * out + o);
      const float4 hi = *reinterpret_cast<const float4*>(ys + t * out + o + 4);
      const uint4 w = make_uint4(pack2<T>(lo.x, lo.y), pack2<T>(lo.z, lo.w),
                                 pack2<T>(hi.x, hi.y), pack2<T>(hi.z, hi.w));
      *reinterpret_cast<uint4*>(y + tok[t] * p.y_token_stride + o) = w;
    }
  } else {
    for (int i = threadIdx.x; i < nt * out; i += kThreads) {
      const int t = i / out, o = i - t * out;
      y[tok[t] * p.y_token_stride + o] = Bits<T>::from_float(ys[t * out + o]);
    }
  }
}

size_t indexed_smem_bytes(const KronIndexedParams& p, int tt, IndexedPlan* plan) {
  IndexedPlan q{};
  q.tt = tt;
  q.tok_elems = round_up(tt, 2);
  q.ys_elems = round_up(tt * p.out, 4);
  for (int j = 0; j < p.n_groups; ++j) {
    const KronGroupParams& g = p.groups[j];
    const int na16 = round_up(g.na, 16), nb16 = round_up(g.nb, 16);
    const int ma16 = round_up(g.ma, 16), mb16 = round_up(g.mb, 16);
    auto mx = [](int& a, int b) { a = a > b ? a : b; };
    mx(q.xs_elems, round_up(tt * g.na, 8) * operand_ld(nb16));
    mx(q.as_elems, ma16 * operand_ld(na16));
    mx(q.bs_elems, mb16 * operand_ld(nb16));
    mx(q.zs_elems, round_up(tt * g.mb, 8) * operand_ld(na16));
  }
  q.smem_bytes = size_t(q.tok_elems) * 8 + size_t(q.ys_elems) * 4 +
      size_t(q.xs_elems + q.as_elems + q.bs_elems + q.zs_elems) * 2;
  if (plan) *plan = q;
  return q.smem_bytes;
}

// The fused forward problem with the same shapes over `tokens` tokens, whose
// v1 planner sets the limits and the tile of this kernel (the same tiling).
KronMixParams fused_equivalent(const KronIndexedParams& p, int64_t tokens) {
  KronMixParams q{};
  q.dtype = p.dtype;
  q.tokens = tokens;
  q.in = p.in;
  q.out = p.out;
  q.n_groups = p.n_groups;
  for (int j = 0; j < p.n_groups && j < kFusedMaxGroups; ++j) q.groups[j] = p.groups[j];
  return q;
}

// Fills *plan (if non-null) and returns nullptr, or returns why not.
const char* make_indexed_plan(const KronIndexedParams& p, IndexedPlan* plan) {
  if (p.rows < 0 || p.row_tokens < 1) return "negative row count or empty rows";
  if (p.n_adapters < 1) return "no adapters";
  const int64_t tokens = p.rows * p.row_tokens;
  KronLaunchPlan v1{};
  if (const char* why = detail::fused_v1_plan(fused_equivalent(p, tokens), &v1)) return why;
  // v1's tile, less what the tile's token indices take of shared memory.
  // Every instantiation has the same static shared memory.
  const size_t limit = static_cast<size_t>(dynamic_smem_limit<kron_mix_indexed_fwd_kernel<__nv_bfloat16>>());
  int tt = v1.tile_tokens;
  for (; tt >= 1; --tt) {
    if (indexed_smem_bytes(p, tt, plan) <= limit) break;
  }
  if (tt < 1) return "the factor shapes need more shared memory than the device has";
  // At most one partial tile per segment: tokens / tt + (n_adapters + 1) tiles.
  if (tokens / tt + p.n_adapters + 1 > kMaxGridX) return "too many tokens for one launch (grid.x)";
  return nullptr;
}

template <typename T>
cudaError_t launch_indexed(const KronIndexedParams& p, const IndexedPlan& plan, cudaStream_t stream) {
  cudaError_t err = opt_in_full_smem<kron_mix_indexed_fwd_kernel<T>>();
  if (err != cudaSuccess) return err;
  return launch_kernel(
      "kron_mix_indexed_fwd_kernel", kron_mix_indexed_fwd_kernel<T>, dim3(static_cast<unsigned>(p.n_tiles)),
      dim3(kThreads), plan.smem_bytes, stream, p, plan);
}

}  // namespace

const char* kron_mix_indexed_plan(const KronIndexedParams& p, KronLaunchPlan* out) {
  IndexedPlan plan;
  const char* why = make_indexed_plan(p, &plan);
  if (why != nullptr || out == nullptr) return why;
  KronLaunchPlan q{};
  q.tile_tokens = plan.tt;
  q.tiles = p.n_tiles;
  q.ctas = p.n_tiles;
  q.threads = kThreads;
  q.stages = 1;
  q.factor_loads = 0;  // per tile
  // Per tile the work of v1's tile of the same size (a partial tile does less).
  KronLaunchPlan v1{};
  detail::fused_v1_plan(fused_equivalent(p, plan.tt), &v1);
  q.barriers_per_tile = v1.barriers_per_tile;
  q.smem_bytes = plan.smem_bytes;
  q.mma_per_tile = v1.mma_per_tile;
  q.smem_bytes_per_tile = v1.smem_bytes_per_tile;
  *out = q;
  return nullptr;
}

int64_t kron_mix_indexed_schedule(
    const int64_t* row_counts, int n_adapters, int64_t row_tokens, int tile_tokens, KronIndexedTile* tiles) {
  int64_t n = 0, start = 0;
  for (int a = -1; a < n_adapters; ++a) {
    const int64_t end = start + row_counts[a + 1] * row_tokens;
    for (int64_t s = start; s < end; s += tile_tokens) {
      if (tiles != nullptr) {
        const int64_t left = end - s;
        tiles[n] = KronIndexedTile{s, a, static_cast<int32_t>(left < tile_tokens ? left : tile_tokens)};
      }
      ++n;
    }
    start = end;
  }
  return n;
}

cudaError_t kron_mix_indexed_forward(const KronIndexedParams& p, cudaStream_t stream) {
  IndexedPlan plan;
  if (make_indexed_plan(p, &plan) != nullptr) return cudaErrorNotSupported;
  if (p.n_tiles == 0) return cudaSuccess;
  if (p.n_tiles > kMaxGridX) return cudaErrorInvalidConfiguration;
  return p.dtype == DType::kFloat16 ? launch_indexed<__half>(p, plan, stream)
                                    : launch_indexed<__nv_bfloat16>(p, plan, stream);
}

}  // namespace cuda
}  // namespace moka
