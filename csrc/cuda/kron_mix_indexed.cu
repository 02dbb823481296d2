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
// The helpers below repeat kron_mix_fused.cu's device helpers, which live in
// that file's anonymous namespace.
#include "../kron_mix.h"
#include "kron_mix_common.cuh"
#include "launch.cuh"
#include "ptx.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace moka {
namespace cuda {
namespace {

// Fragment loads from a row-major [rows][ld] 16-bit tile whose k (column)
// index is contiguous. PTX m16n8k16 layout, gid = lane / 4, tig = lane % 4:
// A regs hold (row gid | gid+8, cols 2tig..+1 | 2tig+8..+9); B regs hold
// (col n = gid, rows k = 2tig..+1 | 2tig+8..+9).
template <typename T>
__device__ inline void load_frag_a(uint32_t (&a)[4], const T* s, int ld, int m0, int k0, int gid, int tig) {
  const T* p = s + (m0 + gid) * ld + k0 + 2 * tig;
  a[0] = *reinterpret_cast<const uint32_t*>(p);
  a[1] = *reinterpret_cast<const uint32_t*>(p + 8 * ld);
  a[2] = *reinterpret_cast<const uint32_t*>(p + 8);
  a[3] = *reinterpret_cast<const uint32_t*>(p + 8 * ld + 8);
}

template <typename T>
__device__ inline void load_frag_b(uint32_t (&b)[2], const T* s, int ld, int n0, int k0, int gid, int tig) {
  const T* p = s + (n0 + gid) * ld + k0 + 2 * tig;
  b[0] = *reinterpret_cast<const uint32_t*>(p);
  b[1] = *reinterpret_cast<const uint32_t*>(p + 8);
}

// A contiguous (rows, cols) factor into a zero-padded [rows16][ld] tile (the
// padding must be zero: it is the k padding of the MMAs).
template <typename T>
__device__ void load_factor(T* dst, const T* src, int rows, int cols, int rows16, int cols16, int ld) {
  if (cols % 8 == 0 && aligned16(src)) {
    const int cpr = cols16 / 8;  // 16-byte chunks per padded row
    for (int i = threadIdx.x; i < rows16 * cpr; i += kThreads) {
      const int r = i / cpr, c = (i - r * cpr) * 8;
      uint4 v = make_uint4(0, 0, 0, 0);
      if (r < rows && c < cols) v = __ldg(reinterpret_cast<const uint4*>(src + r * cols + c));
      *reinterpret_cast<uint4*>(dst + r * ld + c) = v;
    }
  } else {
    for (int i = threadIdx.x; i < rows16 * cols16; i += kThreads) {
      const int r = i / cols16, c = i - r * cols16;
      dst[r * ld + c] = (r < rows && c < cols) ? src[r * cols + c] : Bits<T>::from_float(0.f);
    }
  }
}

// The CTA's token tile as Xs[(t, a)][b]; tokens past the end and the k

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

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int gid = lane >> 2, tig = lane & 3;
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
    const int ma16 = round_up(g.ma, 16), na16 = round_up(g.na, 16);
    const int mb16 = round_up(g.mb, 16), nb16 = round_up(g.nb, 16);
    const int ldx = operand_ld(nb16), ldb = ldx, lda = operand_ld(na16), ldz = lda;
    // The GEMMs span the tile's nt valid tokens, not tt: a segment's last tile
    // (and, in decode batches, most tiles) is partial, and its MMA work
    // shrinks with it.
    const int n1 = nt * g.na;  // stage-1 N: rows (t, a) of Xs
    const int n2 = nt * g.mb;  // stage-2 N: rows (t, d) of Zs

    __syncthreads();  // the previous group is done with Xs and Zs
    load_x_tile_indexed<T>(xs, p, tok, nt, tt, g.na, g.nb, nb16, ldx);
    // The k padding of stage 2 (columns a in [na, na16) of Zs); stage 1 never
    // writes there.
    if (na16 > g.na) {
      const int pad = na16 - g.na, rows = round_up(n2, 8);
      for (int i = threadIdx.x; i < rows * pad; i += kThreads) {
        const int row = i / pad;
        zs[row * ldz + g.na + (i - row * pad)] = Bits<T>::from_float(0.f);
      }
    }

    const int wm_count = stage2_warps_m(ma16);
    const int wm = warp % wm_count, wn = warp / wm_count;
    float acc2[kS2TilesM][kS2TilesN][4];
#pragma unroll
    for (int i = 0; i < kS2TilesM; ++i)
#pragma unroll
      for (int jn = 0; jn < kS2TilesN; ++jn)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc2[i][jn][e] = 0.f;

    const T* Ag = static_cast<const T*>(g.A) + adapter * g.r * g.ma * g.na;
    const T* Bg = static_cast<const T*>(g.B) + adapter * g.r * g.mb * g.nb;
    for (int k = 0; k < g.r; ++k) {
      load_factor<T>(as, Ag + static_cast<int64_t>(k) * g.ma * g.na, g.ma, g.na, ma16, na16, lda);
      load_factor<T>(bs, Bg + static_cast<int64_t>(k) * g.mb * g.nb, g.mb, g.nb, mb16, nb16, ldb);
      const float gk = Bits<T>::to_float(gates[g.gate_offset + k]);
      __syncthreads();

      // Stage 1: Z^T = B X^T, M = mb16 (d), N = n1 (t, a), K = nb16 (b).
      const int s1_m = (mb16 + 31) / 32, s1_n = (n1 + 31) / 32;
      for (int wt = warp; wt < s1_m * s1_n; wt += kWarps) {
        const int bm = (wt % s1_m) * 32, bn = (wt / s1_m) * 32;
        float acc1[kS1TilesM][kS1TilesN][4];
#pragma unroll
        for (int i = 0; i < kS1TilesM; ++i)
#pragma unroll
          for (int jn = 0; jn < kS1TilesN; ++jn)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc1[i][jn][e] = 0.f;
        for (int kk = 0; kk < nb16; kk += 16) {
          uint32_t af[kS1TilesM][4], bf[kS1TilesN][2];
#pragma unroll
          for (int i = 0; i < kS1TilesM; ++i)
            if (bm + 16 * i < mb16) load_frag_a(af[i], bs, ldb, bm + 16 * i, kk, gid, tig);
#pragma unroll
          for (int jn = 0; jn < kS1TilesN; ++jn)
            if (bn + 8 * jn < n1) load_frag_b(bf[jn], xs, ldx, bn + 8 * jn, kk, gid, tig);
#pragma unroll
          for (int i = 0; i < kS1TilesM; ++i)
#pragma unroll
            for (int jn = 0; jn < kS1TilesN; ++jn)
              if (bm + 16 * i < mb16 && bn + 8 * jn < n1) ptx::mma_m16n8k16<T>(acc1[i][jn], af[i], bf[jn]);
        }
        // Scatter g * Z^T[d][(t, a)] to Zs[(t*mb + d)][a].
#pragma unroll
        for (int jn = 0; jn < kS1TilesN; ++jn) {
          const int c0 = bn + 8 * jn + 2 * tig;  // this thread's columns c0, c0 + 1
          if (c0 >= n1) continue;
          const int ta = c0 / g.na, aa = c0 - ta * g.na;
          const int off0 = ta * g.mb * ldz + aa;
          // With na even, c0 (even) and c0 + 1 are one token's a, a + 1.
          const bool paired = (g.na % 2 == 0);
          int off1 = 0;
          const bool valid1 = c0 + 1 < n1;
          if (!paired && valid1) {
            const int tb = (c0 + 1) / g.na;
            off1 = tb * g.mb * ldz + (c0 + 1 - tb * g.na);
          }
#pragma unroll
          for (int i = 0; i < kS1TilesM; ++i) {
#pragma unroll
            for (int h = 0; h < 2; ++h) {
              const int d = bm + 16 * i + gid + 8 * h;
              if (d >= g.mb) continue;
              const float v0 = gk * acc1[i][jn][2 * h], v1 = gk * acc1[i][jn][2 * h + 1];
              if (paired) {
                *reinterpret_cast<uint32_t*>(zs + off0 + d * ldz) = pack2<T>(v0, v1);
              } else {
                zs[off0 + d * ldz] = Bits<T>::from_float(v0);
                if (valid1) zs[off1 + d * ldz] = Bits<T>::from_float(v1);
              }
            }
          }
        }
      }
      __syncthreads();

      // Stage 2: acc += A Z, M = ma16 (c), N = n2 (t, d), K = na16 (a).
      for (int kk = 0; kk < na16; kk += 16) {
        uint32_t af[kS2TilesM][4], bf[kS2TilesN][2];
#pragma unroll
        for (int i = 0; i < kS2TilesM; ++i)
          if (wm * 32 + 16 * i < ma16) load_frag_a(af[i], as, lda, wm * 32 + 16 * i, kk, gid, tig);
#pragma unroll
        for (int jn = 0; jn < kS2TilesN; ++jn)
          if (wn * 64 + 8 * jn < n2) load_frag_b(bf[jn], zs, ldz, wn * 64 + 8 * jn, kk, gid, tig);
#pragma unroll
        for (int i = 0; i < kS2TilesM; ++i)
#pragma unroll
          for (int jn = 0; jn < kS2TilesN; ++jn)
            if (wm * 32 + 16 * i < ma16 && wn * 64 + 8 * jn < n2)
              ptx::mma_m16n8k16<T>(acc2[i][jn], af[i], bf[jn]);
      }
      __syncthreads();  // As, Bs and Zs are reloaded by the next component
    }

    // The group's sum into Ys[t][c*mb + d]; every element of Ys is owned by
    // exactly one thread here, and group 0 covers all of it.
#pragma unroll
    for (int jn = 0; jn < kS2TilesN; ++jn) {
      const int c0 = wn * 64 + 8 * jn + 2 * tig;
      if (c0 >= n2) continue;
      const int ta = c0 / g.mb, dd = c0 - ta * g.mb;
      const int off0 = ta * out + dd;
      const bool paired = (g.mb % 2 == 0);
      const bool valid1 = c0 + 1 < n2;
      int off1 = 0;
      if (!paired && valid1) {
        const int tb = (c0 + 1) / g.mb;
        off1 = tb * out + (c0 + 1 - tb * g.mb);
      }
#pragma unroll
      for (int i = 0; i < kS2TilesM; ++i) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int c = wm * 32 + 16 * i + gid + 8 * h;
          if (c >= g.ma) continue;
          const float v0 = acc2[i][jn][2 * h], v1 = acc2[i][jn][2 * h + 1];
          if (paired) {
            float2* q = reinterpret_cast<float2*>(ys + off0 + c * g.mb);
            if (j == 0) {
              *q = make_float2(v0, v1);
            } else {
              float2 o = *q;
              *q = make_float2(o.x + v0, o.y + v1);
            }
          } else {
            float* q0 = ys + off0 + c * g.mb;
            *q0 = j == 0 ? v0 : *q0 + v0;
            if (valid1) {
              float* q1 = ys + off1 + c * g.mb;
              *q1 = j == 0 ? v1 : *q1 + v1;
            }
          }
        }
      }
    }
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
  const size_t limit = static_cast<size_t>(max_dynamic_smem());
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
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  static bool configured[64] = {false};
  if (dev < 0 || dev >= 64 || !configured[dev]) {
    err = cudaFuncSetAttribute(
        kron_mix_indexed_fwd_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, max_dynamic_smem());
    if (err != cudaSuccess) return err;
    if (dev >= 0 && dev < 64) configured[dev] = true;
  }
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
