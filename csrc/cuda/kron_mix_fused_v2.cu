// The fused Kronecker-mixture forward, v2: persistent CTAs with the factors
// resident in shared memory, x tiles streamed through a cp.async ring, all
// MMA fragments loaded with ldmatrix. Torch-free, driven through
// csrc/kron_mix.h; also the public dispatcher between v2 and v1
// (kron_mix_fused.cu, kept as the baseline of the model and microbenchmark).
//
// The math per group j and component k is v1's two-stage product over a tile
// of tt tokens, Xs[(t, a)][b] = x[t, a*nb + b]:
//   stage 1:  Zs[(t, d)][a] = g_k * sum_b B_k[d, b] Xs[(t, a)][b]
//   stage 2:  acc[c][(t, d)] += sum_a A_k[c, a] Zs[(t, d)][a]
// Every operand is stored k-contiguous with a row stride of k16 + 8 elements,
// so all four fragment kinds (B_k and A_k as the A operand, Xs and Zs as the
// B operand) are plain (non-transposed) ldmatrix loads whose 8 row addresses
// per phase fall in 8 distinct bank quads.
//
// The schedule, and why:
// - Grid = min(tiles, SMs): one CTA of 256 threads per SM walks the token
//   tiles blockIdx.x, blockIdx.x + gridDim.x, ... At the target cell (4096 x
//   4096, 64 x 64 factors, r = 4) the resident factors (r * 2 * 64 * 72 * 2 B
//   = 72 KiB), two x stages and two Zs buffers take 216 KiB, so a second CTA
//   does not fit; the ring, not a second CTA, hides the load latency.
// - Factors: every group's r components are copied into shared memory once
//   per CTA (cp.async, in the first commit group), so factor traffic is
//   SMs x factor bytes in all instead of tiles x factor bytes.
// - Work items are (tile, group) pairs. Item i's x tile, laid out for its
//   group, is loaded into ring stage i % S by cp.async, issued after item
//   i - S + 1's first stage-1 barrier; with one group x is read once, with
//   several once per group (L2 hits after the first).
// - tt: the largest token count whose stage-2 accumulator ma16 x tt*mb fits
//   the 8 warps' 32 x 64 register tiles (as v1: 4 tokens at 64 x 64), then
//   shrunk until the factors, a ring of two stages and the Zs buffers fit
//   the opt-in shared memory. A larger tile would need a second pass over d or more
//   registers than one CTA of 256 threads holds at 1 CTA/SM; it would not
//   change the bytes per token, only the barriers per token. When CTAs walk
//   several tiles, the tile then shrinks to the smallest with the same tile
//   count on the busiest CTA (fewer padded tokens, no more barriers there).
// - Stage 1 runs in 32 x 64 warp tiles, the shape of stage 2's: 192 B of
//   ldmatrix fragments per MMA in both stages (32 x 32: 256 B), which puts
//   the shared-memory floor under the tensor floor at 64 x 64 factors, r = 2
//   and 4. Its 64 float accumulators live next to stage 2's 64, within the
//   255 registers a thread has at 1 CTA/SM, without spills
//   (python_tests/test_cuda_sass.py).
// - Barriers. Zs has zbufs buffers, component k in buffer k % zbufs. When
//   every component of a group has its own (r <= zbufs), stage 1 of all of
//   them runs before one barrier, then all stage 2s: two barriers per item
//   (x ready and the previous item done; Zs written). With fewer buffers,
//   components go in batches of zbufs / 2 whose halves alternate, so a
//   batch's stage 1 never writes what the previous batch's stage 2 (not yet
//   behind a barrier) reads: 1 + ceil(r / batch) barriers. The planner takes
//   the fewest barriers that fit, then three stages over two. At 64 x 64
//   factors: r = 1 and 2 two barriers per tile (three stages), r = 4 five
//   (two stages, two buffers; v1: 14).
// - Output: with one group the accumulators (+ base, in float32) are rounded
//   once into a 16-bit tile Os in the ring stage of the item's own x, which
//   every warp has finished reading before the item's last barrier; with
//   several groups, whose output tilings differ, they are summed in a float32
//   tile Ys (tt x out) first, as in v1. Neither has a barrier of its own: the
//   next item's first barrier completes the tile, which is written to y (16-
//   byte rows) right after it, before that item's first stage-1 barrier, the
//   earliest point at which the stage is refilled or Ys rewritten. The last
//   tile of a CTA takes one barrier after the loop.
// - mma.sync, not wgmma: at r = 4 the tensor-core floor with mma.sync at 60%
//   of the dense peak is ~73 us against ~45 us for 70% of copy bandwidth,
//   and at r = 2 ~36 us against ~39 us for 80% (benchmarks/kernel_model.py):
//   with the launch and the barrier drain on top, r = 2 stays under 80% as
//   well. wgmma would lift it, but needs the operands in the wgmma
//   shared-memory layouts (B X^T with X as a 64-row K-major operand, and Z
//   produced by one warpgroup and consumed by the next stage), a
//   warpgroup-wide M of 64 (so stage 1 runs d = 64 rows per warpgroup), and a
//   simulator model of wgmma's descriptors and asynchronous completion, which
//   csrc/cuda/sim/ does not have; the simulator could not check it.
// Shapes whose factors do not fit in shared memory next to two x stages and
// the Zs buffers (one, or two when a group has several components) of one
// token go to v1.
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

// Shared-memory plan of one v2 launch, identical for all CTAs. Offsets and
// sizes are in elements, multiples of 8 (16 bytes).
struct FusedPlanV2 {
  int tt, stages;
  int zbufs;  // Zs buffers; component k of a group writes buffer k % zbufs
  int ctas;
  int64_t tiles;
  int tiles_per_cta, tiles_rem;  // CTA b walks tiles_per_cta + (b < tiles_rem) tiles
  int ys_elems;       // float32 Ys (several groups only)
  int fac_elems;      // all factors, padded
  int x_stage_elems;  // one ring stage: an x tile, and after stage 1 the 16-bit output tile Os (one group)
  int zs_elems;       // one Zs buffer
  size_t smem_bytes;
};

namespace {

constexpr int kMaxStages = 3;
// Stage 1's warp tile: 2 x 8 mma tiles = 32 (d) x 64 (t, a), the shape of
// stage 2's. Per k step a warp loads 2 A and 8 B fragments for 16 MMAs, 192 B
// per MMA (a 32 x 32 tile: 256 B). 32 rows, not 64: the d extent mb16 is 32
// for most small factors (the SmolLM2 shapes), which 64 rows would half fill.
constexpr int kS1M = 2, kS1N = 8;

// Components per stage-1 batch of a group with r components: all of them when
// each has its own Zs buffer, else half the buffers, so that batch b + 1's
// stage 1, which follows batch b's stage 2 with no barrier between, writes
// buffers batch b does not read.
__host__ __device__ inline int z_batch(int r, int zbufs) { return r <= zbufs ? r : zbufs / 2; }

// Barriers per item (tile, group): the item's first, then one per batch.
__host__ __device__ inline int item_barriers(int r, int zbufs) {
  const int h = z_batch(r, zbufs);
  return 1 + (r + h - 1) / h;
}

// (rows, cols) row-major src into a zero-padded [rows16][ld] tile; whole
// 16-byte chunks of real data go by cp.async when `vec`, the rest by stores.
template <typename T>
__device__ void stage_matrix(T* dst, const T* src, int rows, int cols, int rows16, int cols16, int ld, bool vec) {
  const int cpr = cols16 / 8;
  for (int i = threadIdx.x; i < rows16 * cpr; i += kThreads) {
    const int r = i / cpr, c = (i - r * cpr) * 8;
    T* d = dst + r * ld + c;
    if (vec && r < rows && c + 8 <= cols) {
      ptx::cp_async_16(d, src + r * cols + c);
    } else {
#pragma unroll
      for (int e = 0; e < 8; ++e)
        d[e] = (r < rows && c + e < cols) ? src[r * cols + c + e] : Bits<T>::from_float(0.f);
    }
  }
}

// Token tile t0 .. t0 + tt of x as Xs[(t, a)][b] (ld = operand_ld(nb16));
// tokens past nt and the k padding b in [nb, nb16) are zero.
template <typename T>
__device__ void stage_x(T* xs, const KronMixParams& p, int64_t t0, int nt, int tt, int na, int nb, int ldx) {
  const T* x = static_cast<const T*>(p.x);
  const int in = p.in;
  const int nb16 = round_up(nb, 16);
  if (nb % 8 == 0 && aligned16(x) && p.x_row_stride % 8 == 0) {
    const int cpt = in / 8;  // 16-byte chunks per token
    for (int i = threadIdx.x; i < tt * cpt; i += kThreads) {
      const int t = i / cpt, c = (i - t * cpt) * 8;
      const int a = c / nb, b = c - a * nb;
      T* d = xs + (t * na + a) * ldx + b;
      if (t < nt) {
        ptx::cp_async_16(d, x + (t0 + t) * p.x_row_stride + c);
      } else {
        *reinterpret_cast<uint4*>(d) = make_uint4(0, 0, 0, 0);
      }
    }
  } else {
    for (int i = threadIdx.x; i < tt * in; i += kThreads) {
      const int t = i / in, c = i - t * in;
      const int a = c / nb, b = c - a * nb;
      xs[(t * na + a) * ldx + b] = t < nt ? x[(t0 + t) * p.x_row_stride + c] : Bits<T>::from_float(0.f);
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

// ldmatrix addresses. A operand (16 x 16 at row m0, column k0): lanes 0-15
// give rows m0..m0+15 at k0, lanes 16-31 the same rows at k0 + 8. B operand
// (8 columns n0.. x 16 k): lanes 0-7 rows n0.. at k0, lanes 8-15 at k0 + 8.
template <typename T>
__device__ inline void ldsm_a(uint32_t (&a)[4], const T* s, int ld, int m0, int k0, int lane) {
  ptx::ldmatrix_x4(a, s + (m0 + (lane & 15)) * ld + k0 + ((lane >> 4) << 3));
}

template <typename T>
__device__ inline void ldsm_b(uint32_t (&b)[2], const T* s, int ld, int n0, int k0, int lane) {
  ptx::ldmatrix_x2(b, s + (n0 + (lane & 7)) * ld + k0 + (((lane >> 3) & 1) << 3));
}

// Starts loading ring item `item` of this CTA ((tile, group) = (blockIdx.x +
// (item / G) gridDim.x, item % G)) into stage item % S, and closes its commit
// group, empty past the last item so that the wait counts stay uniform.
template <typename T>
__device__ __forceinline__ void issue_item(
    const KronMixParams& p, int tt, int stages, int stage_elems, T* ring, int item, int n_items) {
  if (item < n_items) {
    const int G = p.n_groups;
    const int64_t tile = blockIdx.x + int64_t(item / G) * gridDim.x;
    const int j = item % G;
    const int64_t t0 = tile * tt;
    const int nt = static_cast<int>(p.tokens - t0 < tt ? p.tokens - t0 : tt);
    const int na = p.groups[j].na, nb = p.groups[j].nb;
    stage_x<T>(ring + (item % stages) * stage_elems, p, t0, nt, tt, na, nb,
               operand_ld(round_up(nb, 16)));
  }
  ptx::cp_async_commit();
}

// Elements of the factor slab before group j's A tiles (then its B tiles):
// groups in order, each r padded A tiles then r padded B tiles. Computed, not
// read from a per-group array of the plan, whose dynamic indexing would put
// the plan on the stack.
__host__ __device__ inline int factor_offset(const KronMixParams& p, int j) {
  int off = 0;
  for (int i = 0; i < j; ++i) {
    const KronGroupParams& g = p.groups[i];
    off += g.r * (round_up(g.ma, 16) * operand_ld(round_up(g.na, 16)) +
                  round_up(g.mb, 16) * operand_ld(round_up(g.nb, 16)));
  }
  return off;
}

template <int S>
__device__ inline void wait_for_oldest() {
  ptx::cp_async_wait<S - 2>();
}

// The output tile of `item`, the last group of its tile, to y: from Os in the
// item's ring stage (one group: base is already added and the values rounded)
// or from the float32 Ys (several groups).
template <typename T>
__device__ __forceinline__ void write_tile(
    const KronMixParams& p, const FusedPlanV2& plan, const T* ring, const float* ys, int item) {
  const int G = p.n_groups, tt = plan.tt, out = p.out;
  const int64_t t0 = (blockIdx.x + int64_t(item / G) * gridDim.x) * tt;
  const int nt = static_cast<int>(p.tokens - t0 < tt ? p.tokens - t0 : tt);
  if (G > 1) {
    store_y_from_ys<T>(p, ys, t0, nt);
    return;
  }
  const T* os = ring + (item % plan.stages) * plan.x_stage_elems;
  T* y = static_cast<T*>(p.y);
  if (out % 8 == 0 && aligned16(y) && p.y_row_stride % 8 == 0) {
    const int cpt = out / 8;
    for (int i = threadIdx.x; i < nt * cpt; i += kThreads) {
      const int t = i / cpt, o = (i - t * cpt) * 8;
      *reinterpret_cast<uint4*>(y + (t0 + t) * p.y_row_stride + o) =
          *reinterpret_cast<const uint4*>(os + t * out + o);
    }
  } else {
    for (int i = threadIdx.x; i < nt * out; i += kThreads) {
      const int t = i / out, o = i - t * out;
      y[(t0 + t) * p.y_row_stride + o] = os[t * out + o];
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 1)
    kron_mix_fused_fwd_v2_kernel(const KronMixParams p, const FusedPlanV2 plan) {
  MOKA_DYNAMIC_SHARED(smem_raw);
  float* ys = reinterpret_cast<float*>(smem_raw);
  T* fac = reinterpret_cast<T*>(ys + plan.ys_elems);
  T* ring = fac + plan.fac_elems;
  T* zs_base = ring + plan.stages * plan.x_stage_elems;  // plan.zbufs Zs buffers of zs_elems

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int gid = lane >> 2, tig = lane & 3;
  const int tt = plan.tt, S = plan.stages, G = p.n_groups, out = p.out;
  const T* gates = static_cast<const T*>(p.gates);
  const T* base = static_cast<const T*>(p.base);

  // The factors, once per CTA; they complete with the first ring stage.
  for (int j = 0; j < G; ++j) {
    const KronGroupParams g = p.groups[j];
    const int ma16 = round_up(g.ma, 16), na16 = round_up(g.na, 16);
    const int mb16 = round_up(g.mb, 16), nb16 = round_up(g.nb, 16);
    const T* A = static_cast<const T*>(g.A);
    const T* B = static_cast<const T*>(g.B);
    const bool va = g.na % 8 == 0 && aligned16(A), vb = g.nb % 8 == 0 && aligned16(B);
    T* fa = fac + factor_offset(p, j);
    T* fb = fa + g.r * ma16 * operand_ld(na16);
    for (int k = 0; k < g.r; ++k) {
      stage_matrix<T>(fa + k * ma16 * operand_ld(na16), A + int64_t(k) * g.ma * g.na,
                      g.ma, g.na, ma16, na16, operand_ld(na16), va);
      stage_matrix<T>(fb + k * mb16 * operand_ld(nb16), B + int64_t(k) * g.mb * g.nb,
                      g.mb, g.nb, mb16, nb16, operand_ld(nb16), vb);
    }
  }

  // This CTA's items: (tile, group) for tiles blockIdx.x + n * gridDim.x.
  // 32-bit item arithmetic: the planner bounds the items per CTA.
  const int n_items = (plan.tiles_per_cta + (int(blockIdx.x) < plan.tiles_rem ? 1 : 0)) * G;
  for (int s = 0; s < S - 1; ++s) issue_item<T>(p, tt, S, plan.x_stage_elems, ring, s, n_items);

  for (int item = 0; item < n_items; ++item) {
    // Item `item`'s copies (and the factors) have landed for this thread. The
    // barrier makes everyone's visible, ends the previous item's stage 2 (the
    // Zs buffers are free) and completes its part of the output tile.
    if (S == 3) wait_for_oldest<3>(); else wait_for_oldest<2>();
    __syncthreads();
    // The previous tile's output, when the previous item ended a tile: its Os
    // (ring stage (item - 1) % S) is refilled, and Ys rewritten, only after
    // this item's next barrier.
    if (item > 0 && (item - 1) % G == G - 1) write_tile<T>(p, plan, ring, ys, item - 1);

    const int64_t tile = blockIdx.x + int64_t(item / G) * gridDim.x;
    const int j = item % G;
    const int64_t t0 = tile * tt;
    const int nt = static_cast<int>(p.tokens - t0 < tt ? p.tokens - t0 : tt);
    const KronGroupParams g = p.groups[j];
    const int ma16 = round_up(g.ma, 16), na16 = round_up(g.na, 16);
    const int mb16 = round_up(g.mb, 16), nb16 = round_up(g.nb, 16);
    const int ldx = operand_ld(nb16), ldb = ldx, lda = operand_ld(na16), ldz = lda;
    const int n1 = tt * g.na, n2 = tt * g.mb;
    T* const xs = ring + (item % S) * plan.x_stage_elems;

    // The k padding of stage 2 (columns a in [na, na16) of Zs) in the buffers
    // this group uses, which stage 1 never writes; they are free here.
    const int zused = g.r < plan.zbufs ? g.r : plan.zbufs;
    if (na16 > g.na) {
      const int pad = na16 - g.na, rows = round_up(n2, 8);
      for (int i = threadIdx.x; i < zused * rows * pad; i += kThreads) {
        const int b = i / (rows * pad), e = i - b * rows * pad, row = e / pad;
        zs_base[b * plan.zs_elems + row * ldz + g.na + (e - row * pad)] = Bits<T>::from_float(0.f);
      }
    }

    const int wm_count = stage2_warps_m(ma16);
    const int wm = warp % wm_count, wn = warp / wm_count;
    float acc2[kS2TilesM][kS2TilesN][4];
zero_acc(acc2);

    const T* fa = fac + factor_offset(p, j);
    const T* fb = fa + g.r * ma16 * lda;
    const int batch = z_batch(g.r, plan.zbufs);
    for (int k0 = 0; k0 < g.r; k0 += batch) {
      const int k1 = k0 + batch < g.r ? k0 + batch : g.r;
      // Stage 1 of the batch, component k into Zs buffer k % zbufs: Z^T = B X^T,
      // M = mb16 (d), N = n1 (t, a), K = nb16 (b). The previous batch's
      // buffers, which its stage 2 may still read, are not among them.
      for (int k = k0; k < k1; ++k) {
        const T* bs = fb + k * mb16 * ldb;
        T* zs = zs_base + (k % plan.zbufs) * plan.zs_elems;
        const float gk = Bits<T>::to_float(gates[g.gate_offset + k]);
        const int s1_m = (mb16 + 16 * kS1M - 1) / (16 * kS1M), s1_n = (n1 + 8 * kS1N - 1) / (8 * kS1N);
        for (int wt = warp; wt < s1_m * s1_n; wt += kWarps) {
          const int bm = (wt % s1_m) * 16 * kS1M, bn = (wt / s1_m) * 8 * kS1N;
          float acc1[kS1M][kS1N][4];
zero_acc(acc1);
          for (int kk = 0; kk < nb16; kk += 16) {
            uint32_t af[kS1M][4];
#pragma unroll
            for (int i = 0; i < kS1M; ++i)
              if (bm + 16 * i < mb16) ldsm_a(af[i], bs, ldb, bm + 16 * i, kk, lane);
            // One B fragment at a time (stage 2's accumulators are live here):
            // the same fragment bytes, without 16 registers of B fragments.
#pragma unroll
            for (int jn = 0; jn < kS1N; ++jn) {
              if (bn + 8 * jn >= n1) continue;
              uint32_t bf[2];
              ldsm_b(bf, xs, ldx, bn + 8 * jn, kk, lane);
#pragma unroll
              for (int i = 0; i < kS1M; ++i)
                if (bm + 16 * i < mb16) ptx::mma_m16n8k16<T>(acc1[i][jn], af[i], bf);
            }
          }
          store_z<T>(zs, ldz, acc1, gk, bm, bn, n1, g.na, g.mb, gid, tig);
        }
      }
      __syncthreads();  // the batch's Zs complete
      // The ring stage of item - 1 (its x consumed, its Os written out above)
      // takes item + S - 1.
      if (k0 == 0) issue_item<T>(p, tt, S, plan.x_stage_elems, ring, item + S - 1, n_items);

      // Stage 2 of the batch: acc += A_k Z_k, M = ma16 (c), N = n2 (t, d), K = na16 (a).
      for (int k = k0; k < k1; ++k) {
        const T* as = fa + k * ma16 * lda;
        const T* zs = zs_base + (k % plan.zbufs) * plan.zs_elems;
        for (int kk = 0; kk < na16; kk += 16) {
          uint32_t af[kS2TilesM][4];
#pragma unroll
          for (int i = 0; i < kS2TilesM; ++i)
            if (wm * 32 + 16 * i < ma16) ldsm_a(af[i], as, lda, wm * 32 + 16 * i, kk, lane);
#pragma unroll
          for (int jn = 0; jn < kS2TilesN; ++jn) {
            if (wn * 64 + 8 * jn >= n2) continue;
            uint32_t bf[2];
            ldsm_b(bf, zs, ldz, wn * 64 + 8 * jn, kk, lane);
#pragma unroll
            for (int i = 0; i < kS2TilesM; ++i)
              if (wm * 32 + 16 * i < ma16) ptx::mma_m16n8k16<T>(acc2[i][jn], af[i], bf);
          }
        }
      }
    }

    // The accumulators hold the group's acc[c][(t, d)] = y-part[t][c*mb + d].
    // One group: + base in float32, rounded once into the 16-bit tile Os in
    // this item's ring stage, whose x every warp finished reading before the
    // last barrier. Several: summed into Ys (ownership changes with the
    // group's tiling: the next item's first barrier separates the groups).
    // The next item's first barrier completes the tile, written out after it.
    const bool one_group = G == 1;
    T* const os = xs;
#pragma unroll
    for (int jn = 0; jn < kS2TilesN; ++jn) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int col = wn * 64 + 8 * jn + 2 * tig + e;  // (t, d)
        if (col >= n2) continue;
        const int ta = col / g.mb, dd = col - ta * g.mb;
        if (ta >= nt && one_group) continue;
#pragma unroll
        for (int i = 0; i < kS2TilesM; ++i) {
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const int c = wm * 32 + 16 * i + gid + 8 * h;
            if (c >= g.ma) continue;
            const int o = c * g.mb + dd;
            float v = acc2[i][jn][2 * h + e];
            if (one_group) {
              if (base != nullptr) v += Bits<T>::to_float(base[(t0 + ta) * p.base_row_stride + o]);
              os[ta * out + o] = Bits<T>::from_float(v);
            } else {
              float* q = ys + ta * out + o;
              *q = j == 0 ? v : *q + v;
            }
          }
        }
      }
    }
  }
  if (n_items > 0) {
    __syncthreads();  // the last tile's output is complete
    write_tile<T>(p, plan, ring, ys, n_items - 1);
  }
  ptx::cp_async_wait<0>();  // retire the trailing (empty) commit groups
}

// Shared memory of a v2 plan with tt tokens, S stages and zbufs Zs buffers; fills *q.
size_t v2_smem(const KronMixParams& p, int tt, int S, int zbufs, FusedPlanV2* q) {
  int fac = 0, xst = 0, zs = 0;
  for (int j = 0; j < p.n_groups; ++j) {
    const KronGroupParams g = p.groups[j];
    const int ma16 = round_up(g.ma, 16), na16 = round_up(g.na, 16);
    const int mb16 = round_up(g.mb, 16), nb16 = round_up(g.nb, 16);
    fac += g.r * (ma16 * operand_ld(na16) + mb16 * operand_ld(nb16));
    auto mx = [](int& a, int b) { a = a > b ? a : b; };
    mx(xst, round_up(tt * g.na, 8) * operand_ld(nb16));
    mx(zs, round_up(tt * g.mb, 8) * operand_ld(na16));
  }
  if (p.n_groups == 1) xst = xst > round_up(tt * p.out, 8) ? xst : round_up(tt * p.out, 8);  // Os
  q->tt = tt;
  q->stages = S;
  q->zbufs = zbufs;
  q->ys_elems = p.n_groups > 1 ? round_up(tt * p.out, 4) : 0;
  q->fac_elems = fac;
  q->x_stage_elems = xst;
  q->zs_elems = zs;
  q->smem_bytes = size_t(q->ys_elems) * 4 + (size_t(fac) + size_t(S) * xst + size_t(zbufs) * zs) * 2;
  return q->smem_bytes;
}

// CTA barriers per token tile of a plan with zbufs Zs buffers (all groups).
int v2_barriers_per_tile(const KronMixParams& p, int zbufs) {
  int n = 0;
  for (int j = 0; j < p.n_groups; ++j) n += item_barriers(p.groups[j].r, zbufs);
  return n;
}

// The best ring depth and Zs buffer count for tt tokens per tile, into *q;
// false when none fits. Fewest barriers per tile first (a Zs buffer per
// component lets every stage 1 of a group run before one barrier), then three
// ring stages over two, then the least shared memory. Zs buffers tried: the
// largest r, then 8 .. 2 (with fewer buffers than components, batches of
// zbufs / 2 components alternate between the two halves).
bool v2_best_at(const KronMixParams& p, int tt, int r_max, size_t limit, FusedPlanV2* q) {
  FusedPlanV2 c{};
  int best = -1;
  for (int zb = r_max; zb >= (r_max > 1 ? 2 : 1); zb = zb > 8 ? 8 : zb - 1) {
    for (int S = kMaxStages; S >= 2; --S) {
      if (v2_smem(p, tt, S, zb, &c) > limit) continue;
      const int score = v2_barriers_per_tile(p, zb) * 4 + (kMaxStages - S);
      if (best < 0 || score < best || (score == best && c.smem_bytes < q->smem_bytes)) {
        best = score;
        *q = c;
      }
    }
  }
  return best >= 0;
}

const char* make_plan_v2(const KronMixParams& p, FusedPlanV2* plan) {
  if (const char* why = fused_problem_unsupported(p)) return why;
  int tt = 1 << 30, r_max = 0;
  int64_t fac_elems = 0;
  for (int j = 0; j < p.n_groups; ++j) {
    const KronGroupParams g = p.groups[j];
    const int t = stage2_token_cap(g.ma, g.mb);
    tt = t < tt ? t : tt;
    r_max = g.r > r_max ? g.r : r_max;
    fac_elems += int64_t(g.r) * (round_up(g.ma, 16) * operand_ld(round_up(g.na, 16)) +
                                 round_up(g.mb, 16) * operand_ld(round_up(g.nb, 16)));
  }
  // Every instantiation has the same static shared memory.
  const size_t limit = static_cast<size_t>(dynamic_smem_limit<kron_mix_fused_fwd_v2_kernel<__nv_bfloat16>>());
  if (size_t(fac_elems) * 2 > limit) return "the factors do not fit in shared memory (v2 keeps them resident)";
  if (p.tokens > 0 && p.tokens < tt) tt = static_cast<int>(p.tokens);
  // The largest token tile that fits: a smaller one only adds barriers per token.
  FusedPlanV2 q{};
  while (tt >= 1 && !v2_best_at(p, tt, r_max, limit, &q)) --tt;
  if (tt < 1) return "the factors, two x stages and the Zs buffers of one token do not fit in shared memory";
  // When CTAs walk several tiles each, the smallest tile with as many tiles
  // on the busiest CTA: it pads the fewest tokens there at no extra barriers
  // (e.g. 8192 tokens in tiles of 31 are 3 tiles on the busiest of 132 CTAs,
  // 93 tokens, of 21 also 3, 63 tokens). With one tile per CTA the largest
  // tile stays; a smaller one would add CTAs that each stage all the factors
  // (whether that pays for small token counts is not modelled).
  const int64_t sms = sm_count();
  const int64_t tiles_max = p.tokens == 0 ? 0 : (p.tokens + tt - 1) / tt;
  if (tiles_max > sms) {
    const int64_t busiest = (tiles_max + sms - 1) / sms;
    const int balanced = static_cast<int>((p.tokens + busiest * sms - 1) / (busiest * sms));
    if (balanced < tt) {
      tt = balanced;
      v2_best_at(p, tt, r_max, limit, &q);  // fits: shared memory shrinks with the tile
    }
  }
  q.tiles = p.tokens == 0 ? 0 : (p.tokens + q.tt - 1) / q.tt;
  q.ctas = static_cast<int>(q.tiles < sms ? q.tiles : sms);
  if (q.ctas > 0) {
    const int64_t per = q.tiles / q.ctas;
    if ((per + 1) * p.n_groups + kMaxStages > 0x7fffffff) return "too many tokens (items per CTA)";
    q.tiles_per_cta = static_cast<int>(per);
    q.tiles_rem = static_cast<int>(q.tiles - per * q.ctas);
  }
  if (plan) *plan = q;
  return nullptr;
}

template <typename T>
cudaError_t launch_v2(const KronMixParams& p, const FusedPlanV2& plan, cudaStream_t stream) {
  const cudaError_t err = opt_in_full_smem<kron_mix_fused_fwd_v2_kernel<T>>();
  if (err != cudaSuccess) return err;
  return launch_kernel(
      "kron_mix_fused_fwd_v2_kernel", kron_mix_fused_fwd_v2_kernel<T>, dim3(static_cast<unsigned>(plan.ctas)),
      dim3(kThreads), plan.smem_bytes, stream, p, plan);
}

FusedImpl pick(const KronMixParams& p, FusedImpl impl) {
  if (impl != FusedImpl::kAuto) return impl;
  return make_plan_v2(p, nullptr) == nullptr ? FusedImpl::kV2 : FusedImpl::kV1;
}

}  // namespace

const char* kron_mix_fused_plan(const KronMixParams& p, FusedImpl impl, KronLaunchPlan* out) {
  if (pick(p, impl) == FusedImpl::kV1) return detail::fused_v1_plan(p, out);
  FusedPlanV2 plan;
  const char* why = make_plan_v2(p, &plan);
  if (why != nullptr || out == nullptr) return why;
  KronLaunchPlan q{};
  q.tile_tokens = plan.tt;
  q.tiles = plan.tiles;
  q.ctas = plan.ctas;
  q.threads = kThreads;
  q.stages = plan.stages;
  q.factor_loads = 1;
  q.barriers_per_tile = v2_barriers_per_tile(p, plan.zbufs);
  q.smem_bytes = plan.smem_bytes;
  // Per group: x written into its ring stage, the two stages; then the
  // output tile: 16-bit Os written and read (one group), or float32 Ys
  // written per group, read back after group 0 and once by the epilogue.
  TileCounts c;
  for (int j = 0; j < p.n_groups; ++j) {
    const KronGroupParams g = p.groups[j];
    count_two_stage(plan.tt, g.r, g.ma, g.na, g.mb, g.nb, &c, kS1M, kS1N);
    c.smem += int64_t(plan.tt) * p.in * 2;
    if (p.n_groups > 1) c.smem += int64_t(plan.tt) * p.out * 4 * (j == 0 ? 1 : 2);
  }
  c.smem += int64_t(plan.tt) * p.out * (p.n_groups > 1 ? 4 : 2 * 2);
  q.mma_per_tile = c.mma;
  q.smem_bytes_per_tile = c.smem;
  *out = q;
  return nullptr;
}

const char* kron_mix_fused_unsupported(const KronMixParams& p, FusedImpl impl) {
  return kron_mix_fused_plan(p, impl, nullptr);
}

cudaError_t kron_mix_fused_forward(const KronMixParams& p, cudaStream_t stream, FusedImpl impl) {
  if (pick(p, impl) == FusedImpl::kV1) return detail::fused_v1_forward(p, stream);
  FusedPlanV2 plan;
  if (make_plan_v2(p, &plan) != nullptr) return cudaErrorNotSupported;
  if (p.tokens == 0) return cudaSuccess;
  return p.dtype == DType::kBFloat16 ? launch_v2<__nv_bfloat16>(p, plan, stream)
                                     : launch_v2<__half>(p, plan, stream);
}

}  // namespace cuda
}  // namespace moka
