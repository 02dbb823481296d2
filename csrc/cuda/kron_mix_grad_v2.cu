// The factor gradients of the fused backward, v2: x and dY streamed once per
// group through a cp.async ring, the per-token intermediate kept in
// registers, every fragment loaded with ldmatrix (.trans where the operand is
// stored k-major). Torch-free, driven through csrc/kron_mix.h; also the public
// dispatcher between v2 and v1 (the second half of kron_mix_fused.cu, kept as
// the baseline of the model and the microbenchmark).
//
// Per component k of group j, over the tokens t (X_t = x[t] as na x nb,
// dY_t = dY[t] as ma x mb):
//   dA_k = g_k G_A,  G_A = sum_t dY_t (B_k X_t^T)        G_A^T[a][c] = sum_(t,d) W_t[a][d] dY_t[c][d]
//   dB_k = g_k G_B,  G_B = sum_t (dY_t^T A_k) X_t        G_B[d][b]   = sum_(t,a) U_t[d][a] X_t[a][b]
//   dg_k = <A_k, G_A>
// with W_t = X_t B_k^T (na x mb) and U_t = dY_t^T A_k (mb x na). Both kinds
// are one shape of work, a "unit": acc[m][n] += sum_q L_t F (m x q) R_t (q x n),
//   kind 0 (G_A^T): m = a, q = d, n = c; L_t = X_t  [a][b], F = B_k^T [b][d], R_t = dY_t [c][d]
//   kind 1 (G_B):   m = d, q = a, n = b; L_t = dY_t [c][d], F = A_k   [c][a], R_t = X_t  [a][b]
// F is always stored [s][q] (s: the first product's depth), so its fragments
// are ldmatrix.trans loads; kind 0's L and R are stored with their k index
// contiguous (plain ldmatrix), kind 1's transposed (ldmatrix.trans), straight
// from the same x and dY tiles: nothing is transposed by scalar loads.
//
// The schedule, and why:
// - A unit is one warp's 64 x 64 float32 accumulator (128 registers per
//   thread), for (group, component, kind, 64-row block, 64-column block). The
//   first product of each token stays in registers: 16 rows x 32 q columns of
//   L_t F are computed by mma.sync and their accumulator fragments are
//   re-packed as the A fragments of the second product (the m16n8 C layout of
//   two adjacent n-tiles is the m16k16 A layout), so W_t and U_t never touch
//   shared memory and a tile needs one barrier (its ring stage is ready).
//   Rows are taken two 16-row blocks at a time, so each ldmatrix.x4 of F or
//   R (two n-tiles) feeds four MMAs.
// - A CTA (8 warps) takes a block of up to 8 units, all kinds and components
//   of its groups that fit: at 64 x 64 factors and r <= 4 one block holds a
//   whole group, so x and dY are read once per group, not once per (component,
//   kind). With fewer than 8 units the warps are replicas: replica i of a unit
//   takes the tokens t = i (mod replicas) of every tile.
// - Grid = (chunks, unit blocks), about one CTA per SM (the accumulators make
//   it one CTA per SM); chunk c walks a contiguous range of token tiles. The
//   block's factors are staged into shared memory once; the (x, dY) tiles of
//   its groups, laid out per group with every token's rows padded to 16 (so
//   that the k padding of the transposed loads reads zeros, not the next
//   token), stream through a ring of S stages.
// - tt: the largest token count <= 16 whose S = 2 stages fit next to the
//   factors (4 at 64 x 64, r = 4), rounded down to a multiple of the
//   replicas; S = 3 when a third stage also fits.
// - Each (chunk, replica) writes its partial G_A / G_B to its own float32
//   workspace slot; the reduce kernel sums the slots of each element in slot
//   order over ceil(elements / 256) CTAs, applies the gate and writes dA, dB
//   and the float32 G_A totals; the gate kernel then forms dg_k = <A_k, G_A>
//   with one CTA per component in a fixed order. No atomics: deterministic.
// - mma.sync, not wgmma, for the reasons of the forward (kron_mix_fused_v2.cu):
//   at r = 4 the tensor floor (four products per token and component at 60%
//   of the dense peak) binds; wgmma would need a simulator model first.
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

// One launch's plan, identical for all CTAs.
struct GradPlanV2 {
  int tt, stages;
  int64_t tiles;
  int chunks;         // grid.x: contiguous ranges of token tiles
  int blocks;         // grid.y: blocks of up to kWarps units
  int units;          // all units of the problem
  int replicas;       // warps per unit (kWarps / units when units < kWarps, else 1)
  int elems;          // floats of one partial: sum_j r_j (ma na + mb nb)
  int fac_elems;      // factor slab, the largest over the blocks
  int stage_elems;    // one ring stage, the largest over the blocks
  size_t smem_bytes;
};

namespace {

constexpr int kUnit = 64;  // rows and columns of a unit's accumulator

__host__ __device__ inline int blocks64(int v) { return (v + kUnit - 1) / kUnit; }

// The unit's dimensions in the notation of the header comment.
struct Unit {
  int j, k, kind, comp;  // group, component in the group, kind, component in the whole problem
  int m, q, s, n;        // valid extents
  int m0, n0;            // first row and column of this unit's accumulator block
};

__host__ __device__ inline void unit_dims(const KronGradGroupParams& g, int kind, int* m, int* q, int* s, int* n) {
  if (kind == 0) { *m = g.na; *q = g.mb; *s = g.nb; *n = g.ma; }
  else           { *m = g.mb; *q = g.na; *s = g.ma; *n = g.nb; }
}

__host__ __device__ inline int units_per_component(const KronGradGroupParams& g) {
  return blocks64(g.na) * blocks64(g.ma) + blocks64(g.mb) * blocks64(g.nb);
}

// Unit number `u` in the order (group, component, kind, row block, column block).
__host__ __device__ inline Unit unit_at(const KronGradParams& p, int u) {
  Unit o{};
  int comp = 0;
  for (int j = 0; j < p.n_groups; ++j) {
    const KronGradGroupParams& g = p.groups[j];
    const int per = units_per_component(g);
    if (u < g.r * per) {
      o.j = j;
      o.k = u / per;
      o.comp = comp + o.k;
      int rem = u - o.k * per;
      const int n0_kind0 = blocks64(g.na) * blocks64(g.ma);
      o.kind = rem < n0_kind0 ? 0 : 1;
      if (o.kind == 1) rem -= n0_kind0;
      unit_dims(g, o.kind, &o.m, &o.q, &o.s, &o.n);
      const int nb = blocks64(o.n);
      o.m0 = (rem / nb) * kUnit;
      o.n0 = (rem - (rem / nb) * nb) * kUnit;
      return o;
    }
    u -= g.r * per;
    comp += g.r;
  }
  return o;
}

// Floats of a partial before component k of group j: per component, G_A
// (ma x na) then G_B (mb x nb), components in order.
__host__ __device__ inline int partial_offset(const KronGradParams& p, int j, int k) {
  int off = 0;
  for (int i = 0; i < j; ++i) off += p.groups[i].r * (p.groups[i].ma * p.groups[i].na + p.groups[i].mb * p.groups[i].nb);
  return off + k * (p.groups[j].ma * p.groups[j].na + p.groups[j].mb * p.groups[j].nb);
}

// Padded sizes of one component's factors in shared memory: A_k as
// [ma16][na16 + 8] and B_k^T as [nb16][mb16 + 8].
__host__ __device__ inline int factor_elems(const KronGradGroupParams& g) {
  return round_up(g.ma, 16) * operand_ld(round_up(g.na, 16)) + round_up(g.nb, 16) * operand_ld(round_up(g.mb, 16));
}

// One token's x as [na16][nb16 + 8] and dY as [ma16][mb16 + 8].
__host__ __device__ inline int x_token_elems(const KronGradGroupParams& g) {
  return round_up(g.na, 16) * operand_ld(round_up(g.nb, 16));
}
__host__ __device__ inline int y_token_elems(const KronGradGroupParams& g) {
  return round_up(g.ma, 16) * operand_ld(round_up(g.mb, 16));
}

// What a block of units needs in shared memory: the components comp_lo ..
// comp_hi (whole-problem numbering) of the groups j_lo .. j_hi.
struct BlockSpan {
  int j_lo, j_hi, comp_lo, comp_hi;
};

__host__ __device__ inline BlockSpan block_span(const KronGradParams& p, int units, int block) {
  const int lo = block * kWarps;
  const int hi = (lo + kWarps < units ? lo + kWarps : units) - 1;
  const Unit a = unit_at(p, lo), b = unit_at(p, hi);
  return BlockSpan{a.j, b.j, a.comp, b.comp};
}

// Elements of the factor slab before component `comp` (comp_lo first).
__host__ __device__ inline int factor_offset(const KronGradParams& p, const BlockSpan& sp, int comp) {
  int off = 0, c = 0;
  for (int j = 0; j < p.n_groups; ++j) {
    const KronGradGroupParams& g = p.groups[j];
    for (int k = 0; k < g.r; ++k, ++c) {
      if (c >= comp) return off;
      if (c >= sp.comp_lo) off += factor_elems(g);
    }
  }
  return off;
}

// Elements of a ring stage before group j's x tile (its dY tile follows it).
__host__ __device__ inline int stage_offset(const KronGradParams& p, const BlockSpan& sp, int tt, int j) {
  int off = 0;
  for (int i = sp.j_lo; i < j; ++i) off += tt * (x_token_elems(p.groups[i]) + y_token_elems(p.groups[i]));
  return off;
}

__host__ __device__ inline int stage_elems(const KronGradParams& p, const BlockSpan& sp, int tt) {
  return stage_offset(p, sp, tt, sp.j_hi + 1);
}

// rows x cols of token rows src[t * stride + i * cols + c] (t < nt) into
// dst[t * tok + i * ld + c]; cp.async for 16-byte chunks when `vec`.
template <typename T>
__device__ void stage_rows(T* dst, const T* src, int64_t stride, int nt, int rows, int cols, int ld, int tok, bool vec) {
  if (vec) {
    const int cpr = cols / 8, per_t = rows * cpr;
    for (int i = threadIdx.x; i < nt * per_t; i += kThreads) {
      const int t = i / per_t, e = i - t * per_t, r = e / cpr, c = (e - r * cpr) * 8;
      ptx::cp_async_16(dst + t * tok + r * ld + c, src + t * stride + r * cols + c);
    }
  } else {
    const int per_t = rows * cols;
    for (int i = threadIdx.x; i < nt * per_t; i += kThreads) {
      const int t = i / per_t, e = i - t * per_t, r = e / cols, c = e - r * cols;
      dst[t * tok + r * ld + c] = src[t * stride + r * cols + c];
    }
  }
}

// Starts loading item `item` (tile tile_begin + item) of this CTA into stage
// item % S: every group of the block, x then dY; closes the commit group
// (empty past the last item, so that the wait counts stay uniform).
template <typename T>
__device__ void issue_tile(const KronGradParams& p, const GradPlanV2& plan, const BlockSpan& sp, T* ring,
                           int64_t tile_begin, int item, int n_items) {
  if (item < n_items) {
    const int64_t t0 = (tile_begin + item) * plan.tt;
    const int nt = static_cast<int>(p.tokens - t0 < plan.tt ? p.tokens - t0 : plan.tt);
    T* stage = ring + (item % plan.stages) * plan.stage_elems;
    const T* x = static_cast<const T*>(p.x) + t0 * p.x_row_stride;
    const T* dy = static_cast<const T*>(p.grad_y) + t0 * p.grad_y_row_stride;
    const bool xv = aligned16(p.x) && p.x_row_stride % 8 == 0;
    const bool yv = aligned16(p.grad_y) && p.grad_y_row_stride % 8 == 0;
    for (int j = sp.j_lo; j <= sp.j_hi; ++j) {
      const KronGradGroupParams& g = p.groups[j];
      T* xs = stage + stage_offset(p, sp, plan.tt, j);
      T* ys = xs + plan.tt * x_token_elems(g);
      stage_rows<T>(xs, x, p.x_row_stride, nt, g.na, g.nb, operand_ld(round_up(g.nb, 16)), x_token_elems(g),
                    xv && g.nb % 8 == 0);
      stage_rows<T>(ys, dy, p.grad_y_row_stride, nt, g.ma, g.mb, operand_ld(round_up(g.mb, 16)), y_token_elems(g),
                    yv && g.mb % 8 == 0);
    }
  }
  ptx::cp_async_commit();
}

// ldmatrix x4 addresses. A operand (16 x 16 at (m0, k0)): from [m][k] storage
// (plain) or [k][m] storage (.trans). B operand, two n-tiles (n0, n0 + 8) x
// k16 at k0, registers {b0, b1} of n0 then of n0 + 8: from [n][k] (plain) or
// [k][n] (.trans).
template <bool kTrans, typename T>
__device__ inline void ldsm_a16(uint32_t (&a)[4], const T* s, int ld, int m0, int k0, int lane) {
  if (kTrans) {
    ptx::ldmatrix_x4_trans(a, s + (k0 + (lane & 7) + ((lane >> 4) & 1) * 8) * ld + m0 + ((lane >> 3) & 1) * 8);
  } else {
    ptx::ldmatrix_x4(a, s + (m0 + (lane & 15)) * ld + k0 + ((lane >> 4) << 3));
  }
}

template <bool kTrans, typename T>
__device__ inline void ldsm_b16(uint32_t (&b)[4], const T* s, int ld, int n0, int k0, int lane) {
  if (kTrans) {
    ptx::ldmatrix_x4_trans(b, s + (k0 + (lane & 7) + ((lane >> 3) & 1) * 8) * ld + n0 + ((lane >> 4) & 1) * 8);
  } else {
    ptx::ldmatrix_x4(b, s + (n0 + (lane & 7) + ((lane >> 4) & 1) * 8) * ld + k0 + ((lane >> 3) & 1) * 8);
  }
}

template <typename T>
__device__ inline void mma2(float (&d0)[4], float (&d1)[4], const uint32_t (&a)[4], const uint32_t (&b)[4]) {
  const uint32_t lo[2] = {b[0], b[1]}, hi[2] = {b[2], b[3]};
  ptx::mma_m16n8k16<T>(d0, a, lo);
  ptx::mma_m16n8k16<T>(d1, a, hi);
}

// One token of one unit: acc[m][n] += sum_q (L F)[m][q] R[q][n] over the
// unit's 64 x 64 block (m0, n0); all extents padded to 16 (m16, q16, s16, n16).
// L: [m][s] (kT false) or [s][m] (true); F: [s][q]; R: [n][q] (false) or [q][n] (true).
template <typename T, bool kT>
__device__ __forceinline__ void unit_token(float (&acc)[4][8][4], const T* L, int ldl, const T* F, int ldf,
                                           const T* R, int ldr, int m0, int m16, int q16, int s16, int n0, int n16,
                                           int lane) {
#pragma unroll
  for (int mp = 0; mp < 2; ++mp) {
    const int mr = m0 + 32 * mp;  // rows mr .. mr + 31: two 16-row blocks
    if (mr >= m16) break;
    const bool hi = mr + 16 < m16;
    for (int qc = 0; qc < q16; qc += 32) {
      const bool q2 = qc + 16 < q16;
      float c1[2][4][4];
      zero_acc(c1);
      // First product: c1[(m, q)] = sum_s L[m][s] F[s][q], 32 rows x 32 q.
      for (int ks = 0; ks < s16; ks += 16) {
        uint32_t a[2][4], f[2][4];
        ldsm_a16<kT>(a[0], L, ldl, mr, ks, lane);
        if (hi) ldsm_a16<kT>(a[1], L, ldl, mr + 16, ks, lane);
        ldsm_b16<true>(f[0], F, ldf, qc, ks, lane);
        if (q2) ldsm_b16<true>(f[1], F, ldf, qc + 16, ks, lane);
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          if (i == 1 && !hi) continue;
          mma2<T>(c1[i][0], c1[i][1], a[i], f[0]);
          if (q2) mma2<T>(c1[i][2], c1[i][3], a[i], f[1]);
        }
      }
      // Its accumulators, rounded once to 16 bits, are the A fragments of the
      // second product (k = q): n-tiles 2h and 2h + 1 form k-step h.
      uint32_t a2[2][2][4];
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          a2[i][h][0] = pack2<T>(c1[i][2 * h][0], c1[i][2 * h][1]);
          a2[i][h][1] = pack2<T>(c1[i][2 * h][2], c1[i][2 * h][3]);
          a2[i][h][2] = pack2<T>(c1[i][2 * h + 1][0], c1[i][2 * h + 1][1]);
          a2[i][h][3] = pack2<T>(c1[i][2 * h + 1][2], c1[i][2 * h + 1][3]);
        }
      // Second product: acc[m][n] += sum_q c1[m][q] R[q][n].
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        if (h == 1 && !q2) continue;
#pragma unroll
        for (int jp = 0; jp < 4; ++jp) {
          if (n0 + 16 * jp >= n16) continue;
          uint32_t b[4];
          ldsm_b16<kT>(b, R, ldr, n0 + 16 * jp, qc + 16 * h, lane);
#pragma unroll
          for (int i = 0; i < 2; ++i) {
            if (i == 1 && !hi) continue;
            mma2<T>(acc[2 * mp + i][2 * jp], acc[2 * mp + i][2 * jp + 1], a2[i][h], b);
          }
        }
      }
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 1)
    kron_mix_grad_factors_v2_kernel(const KronGradParams p, const GradPlanV2 plan, float* __restrict__ ws) {
  MOKA_DYNAMIC_SHARED(smem_raw);
  T* fac = reinterpret_cast<T*>(smem_raw);
  T* ring = fac + plan.fac_elems;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int gid = lane >> 2, tig = lane & 3;
  const BlockSpan sp = block_span(p, plan.units, blockIdx.y);

  // The ring's padding (rows and columns the copies never write) stays zero:
  // zero every stage once, before the first copy is issued.
  for (int i = threadIdx.x * 8; i < plan.stages * plan.stage_elems; i += kThreads * 8)
    *reinterpret_cast<uint4*>(ring + i) = make_uint4(0, 0, 0, 0);
  // The block's factors, once, zero-padded: A_k as [ma16][na16+8], B_k^T as [nb16][mb16+8].
  {
    int c = 0;
    for (int j = 0; j < p.n_groups; ++j) {
      const KronGradGroupParams& g = p.groups[j];
      for (int k = 0; k < g.r; ++k, ++c) {
        if (c < sp.comp_lo || c > sp.comp_hi) continue;
        T* fa = fac + factor_offset(p, sp, c);
        T* fb = fa + round_up(g.ma, 16) * operand_ld(round_up(g.na, 16));
        load_factor<T>(fa, static_cast<const T*>(g.A) + int64_t(k) * g.ma * g.na, g.ma, g.na, round_up(g.ma, 16),
                       round_up(g.na, 16), operand_ld(round_up(g.na, 16)));
        load_factor<T>(fb, static_cast<const T*>(g.Bt) + int64_t(k) * g.nb * g.mb, g.nb, g.mb, round_up(g.nb, 16),
                       round_up(g.mb, 16), operand_ld(round_up(g.mb, 16)));
      }
    }
  }
  __syncthreads();  // the zeroed ring before any copy lands in it

  const int64_t tile_begin = int64_t(blockIdx.x) * plan.tiles / plan.chunks;
  const int64_t tile_end = int64_t(blockIdx.x + 1) * plan.tiles / plan.chunks;
  const int n_items = static_cast<int>(tile_end - tile_begin);
  for (int s = 0; s < plan.stages - 1; ++s) issue_tile<T>(p, plan, sp, ring, tile_begin, s, n_items);

  // This warp's unit and replica.
  const int u_lo = blockIdx.y * kWarps;
  const int n_units = plan.units - u_lo < kWarps ? plan.units - u_lo : kWarps;
  const int R = plan.replicas;
  const bool active = warp < n_units * R;
  const Unit me = unit_at(p, u_lo + (active ? warp % n_units : 0));
  const int replica = warp / n_units;
  const KronGradGroupParams& g = p.groups[me.j];
  const int m16 = round_up(me.m, 16), q16 = round_up(me.q, 16), s16 = round_up(me.s, 16), n16 = round_up(me.n, 16);
  const int ldx = operand_ld(round_up(g.nb, 16)), ldy = operand_ld(round_up(g.mb, 16));
  const int xtok = x_token_elems(g), ytok = y_token_elems(g);
  const T* fa = fac + factor_offset(p, sp, me.comp);
  const T* f = me.kind == 0 ? fa + round_up(g.ma, 16) * operand_ld(round_up(g.na, 16)) : fa;
  const int ldf = operand_ld(q16);
  const int x_off = stage_offset(p, sp, plan.tt, me.j);

  float acc[4][8][4];
  zero_acc(acc);

  for (int item = 0; item < n_items; ++item) {
    // Item `item`'s copies have landed for this thread; the barrier makes
    // everyone's visible and frees the stage of item - 1 for the next copy.
    if (plan.stages == 3) ptx::cp_async_wait<1>(); else ptx::cp_async_wait<0>();
    __syncthreads();
    issue_tile<T>(p, plan, sp, ring, tile_begin, item + plan.stages - 1, n_items);
    if (!active) continue;
    const int64_t t0 = (tile_begin + item) * plan.tt;
    const int nt = static_cast<int>(p.tokens - t0 < plan.tt ? p.tokens - t0 : plan.tt);
    const T* xs = ring + (item % plan.stages) * plan.stage_elems + x_off;
    const T* ys = xs + plan.tt * xtok;
    for (int t = replica; t < nt; t += R) {
      if (me.kind == 0) {
        unit_token<T, false>(acc, xs + t * xtok, ldx, f, ldf, ys + t * ytok, ldy, me.m0, m16, q16, s16, me.n0, n16, lane);
      } else {
        unit_token<T, true>(acc, ys + t * ytok, ldy, f, ldf, xs + t * xtok, ldx, me.m0, m16, q16, s16, me.n0, n16, lane);
      }
    }
  }
  ptx::cp_async_wait<0>();  // retire the trailing (empty) commit groups
  if (!active) return;

  // This (chunk, replica)'s partial: G_A [c][a] (kind 0, acc holds its
  // transpose) or G_B [d][b] (kind 1), at the component's offset.
  const int off = partial_offset(p, me.j, me.k) + (me.kind == 1 ? g.ma * g.na : 0);
  float* slot = ws + (int64_t(blockIdx.x) * R + replica) * plan.elems + off;
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int jn = 0; jn < 8; ++jn)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int m = me.m0 + 16 * i + gid + 8 * (e >> 1), n = me.n0 + 8 * jn + 2 * tig + (e & 1);
        if (m < me.m && m < me.m0 + kUnit && n < me.n && n < me.n0 + kUnit)
          slot[me.kind == 0 ? n * me.m + m : m * me.n + n] = acc[i][jn][e];
      }
}

// Element e of a partial: its group, component and kind, and its index in
// the component's dA (kind 0) or dB (kind 1).
__device__ inline void locate_elem(const KronGradParams& p, int e, int* j, int* k, int* kind, int* idx) {
  for (int jj = 0; jj < p.n_groups; ++jj) {
    const KronGradGroupParams& g = p.groups[jj];
    const int per = g.ma * g.na + g.mb * g.nb;
    if (e < g.r * per) {
      *j = jj;
      *k = e / per;
      const int rem = e - *k * per;
      *kind = rem < g.ma * g.na ? 0 : 1;
      *idx = *kind == 0 ? rem : rem - g.ma * g.na;
      return;
    }
    e -= g.r * per;
  }
  *j = *k = *kind = *idx = 0;
}

// Sums the partials of each element in slot order, applies the gate, writes
// dA or dB and, for G_A, the float32 total (after the partials) for dg.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    kron_mix_grad_reduce_v2_kernel(const KronGradParams p, const GradPlanV2 plan, float* __restrict__ ws) {
  const int e = blockIdx.x * kThreads + threadIdx.x;
  if (e >= plan.elems) return;
  const int64_t slots = int64_t(plan.chunks) * plan.replicas;
  float s = 0.f;
  for (int64_t c = 0; c < slots; ++c) s += ws[c * plan.elems + e];
  int j, k, kind, idx;
  locate_elem(p, e, &j, &k, &kind, &idx);
  const KronGradGroupParams& g = p.groups[j];
  const float gk = Bits<T>::to_float(static_cast<const T*>(p.gates)[g.gate_offset + k]);
  if (kind == 0) {
    static_cast<T*>(g.dA)[int64_t(k) * g.ma * g.na + idx] = Bits<T>::from_float(gk * s);
    ws[slots * plan.elems + e] = s;
  } else {
    static_cast<T*>(g.dB)[int64_t(k) * g.mb * g.nb + idx] = Bits<T>::from_float(gk * s);
  }
}

// dg_k = <A_k, G_A,k>, one CTA per component, summed in a fixed order.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    kron_mix_grad_gates_v2_kernel(const KronGradParams p, const GradPlanV2 plan, const float* __restrict__ ws) {
  int comp = blockIdx.x, j = 0;
  for (; j < p.n_groups && comp >= p.groups[j].r; ++j) comp -= p.groups[j].r;
  const KronGradGroupParams& g = p.groups[j];
  const int n = g.ma * g.na;
  const float* tot = ws + int64_t(plan.chunks) * plan.replicas * plan.elems + partial_offset(p, j, comp);
  const T* A = static_cast<const T*>(g.A) + int64_t(comp) * n;
  float dg = 0.f;
  for (int e = threadIdx.x; e < n; e += kThreads) dg += Bits<T>::to_float(A[e]) * tot[e];
  const float total = block_sum(dg);
  if (threadIdx.x == 0) static_cast<T*>(p.grad_gates)[g.gate_offset + comp] = Bits<T>::from_float(total);
}

const char* make_grad_plan_v2(const KronGradParams& p, GradPlanV2* plan) {
  if (const char* why = fused_problem_unsupported(p)) return why;
  int64_t elems = 0, units = 0, comps = 0;
  for (int j = 0; j < p.n_groups; ++j) {
    const KronGradGroupParams& g = p.groups[j];
    elems += int64_t(g.r) * (g.ma * g.na + g.mb * g.nb);
    units += int64_t(g.r) * units_per_component(g);
    comps += g.r;
  }
  if (elems > 0x7fffffff / 2 || units > kMaxGridYZ * kWarps || comps > kMaxGridX)
    return "more components than the v2 factor-gradient grid takes";
  GradPlanV2 q{};
  q.elems = static_cast<int>(elems);
  q.units = static_cast<int>(units);
  q.blocks = (q.units + kWarps - 1) / kWarps;
  q.replicas = q.units < kWarps ? kWarps / q.units : 1;
  // The largest factor slab and per-token stage of any block.
  int fac = 0, per_token = 0;
  for (int b = 0; b < q.blocks; ++b) {
    const BlockSpan sp = block_span(p, q.units, b);
    const int f = factor_offset(p, sp, sp.comp_hi + 1);
    const int s = stage_elems(p, sp, 1);
    fac = f > fac ? f : fac;
    per_token = s > per_token ? s : per_token;
  }
  // Every instantiation has the same static shared memory.
  const size_t limit = static_cast<size_t>(dynamic_smem_limit<kron_mix_grad_factors_v2_kernel<__nv_bfloat16>>());
  auto bytes = [&](int tt, int S) { return (size_t(fac) + size_t(S) * tt * per_token) * 2; };
  int tt = 16;
  if (p.tokens > 0 && p.tokens < tt) tt = static_cast<int>(p.tokens);
  while (tt >= 1 && bytes(tt, 2) > limit) --tt;
  if (tt < 1) return "the factors and two (x, dY) stages of one token do not fit in shared memory";
  if (tt > q.replicas) tt -= tt % q.replicas;  // every replica of a unit takes as many tokens
  q.tt = tt;
  q.stages = bytes(tt, 3) <= limit ? 3 : 2;
  q.fac_elems = fac;
  q.stage_elems = tt * per_token;
  q.smem_bytes = bytes(tt, q.stages);
  q.tiles = p.tokens == 0 ? 0 : (p.tokens + tt - 1) / tt;
  // About one CTA per SM over all blocks; never more chunks than tiles.
  int64_t chunks = sm_count() / q.blocks;
  if (chunks < 1) chunks = 1;
  if (chunks > q.tiles) chunks = q.tiles;
  if (chunks > kMaxGridX) chunks = kMaxGridX;
  q.chunks = static_cast<int>(chunks);
  if (q.tiles / (q.chunks > 0 ? q.chunks : 1) + 1 + 3 > 0x7fffffff) return "too many tokens (tiles per CTA)";
  if ((int64_t(q.chunks) * q.replicas + 1) * q.elems * 4 > (int64_t(1) << 40))
    return "the workspace would exceed 1 TiB";
  if (plan) *plan = q;
  return nullptr;
}

template <typename T>
cudaError_t launch_grad_v2(const KronGradParams& p, const GradPlanV2& plan, float* ws, cudaStream_t stream) {
  cudaError_t err = opt_in_full_smem<kron_mix_grad_factors_v2_kernel<T>>();
  if (err != cudaSuccess) return err;
  if (plan.chunks > 0) {
    err = launch_kernel("kron_mix_grad_factors_v2_kernel", kron_mix_grad_factors_v2_kernel<T>,
                        dim3(plan.chunks, plan.blocks), dim3(kThreads), plan.smem_bytes, stream, p, plan, ws);
    if (err != cudaSuccess) return err;
  }
  err = launch_kernel("kron_mix_grad_reduce_v2_kernel", kron_mix_grad_reduce_v2_kernel<T>,
                      dim3((plan.elems + kThreads - 1) / kThreads), dim3(kThreads), 0, stream, p, plan, ws);
  if (err != cudaSuccess) return err;
  int comps = 0;
  for (int j = 0; j < p.n_groups; ++j) comps += p.groups[j].r;
  return launch_kernel("kron_mix_grad_gates_v2_kernel", kron_mix_grad_gates_v2_kernel<T>, dim3(comps),
                       dim3(kThreads), 0, stream, p, plan, static_cast<const float*>(ws));
}

// MMAs and shared-memory bytes of one token of one unit, walking
// unit_token's loops (an ldmatrix x4 moves 512 bytes per warp).
void count_unit_token(const Unit& u, TileCounts* c) {
  const int m16 = round_up(u.m, 16), q16 = round_up(u.q, 16), s16 = round_up(u.s, 16), n16 = round_up(u.n, 16);
  for (int mp = 0; mp < 2; ++mp) {
    const int mr = u.m0 + 32 * mp;
    if (mr >= m16) break;
    const int rows = mr + 16 < m16 ? 2 : 1;
    for (int qc = 0; qc < q16; qc += 32) {
      const int qh = qc + 16 < q16 ? 2 : 1;
      c->mma += int64_t(s16 / 16) * rows * 2 * qh;
      c->smem += int64_t(s16 / 16) * (rows + qh) * 512;
      int pairs = 0;
      for (int jp = 0; jp < 4; ++jp) pairs += u.n0 + 16 * jp < n16;
      c->mma += int64_t(qh) * pairs * rows * 2;
      c->smem += int64_t(qh) * pairs * 512;
    }
  }
}

FusedImpl pick_grad(const KronGradParams& p, FusedImpl impl) {
  if (impl != FusedImpl::kAuto) return impl;
  return make_grad_plan_v2(p, nullptr) == nullptr ? FusedImpl::kV2 : FusedImpl::kV1;
}

}  // namespace

const char* kron_mix_fused_grad_unsupported(const KronGradParams& p, FusedImpl impl) {
  if (pick_grad(p, impl) == FusedImpl::kV1) return detail::grad_v1_plan(p, 0, nullptr);
  return make_grad_plan_v2(p, nullptr);
}

size_t kron_mix_fused_grad_workspace_bytes(const KronGradParams& p, FusedImpl impl) {
  if (pick_grad(p, impl) == FusedImpl::kV1) return detail::grad_v1_workspace_bytes(p);
  GradPlanV2 plan;
  if (make_grad_plan_v2(p, &plan) != nullptr) return 0;
  // One slot per (chunk, replica), then the G_A totals.
  return size_t(int64_t(plan.chunks) * plan.replicas + 1) * plan.elems * sizeof(float);
}

const char* kron_mix_fused_grad_plan(const KronGradParams& p, int kernel, FusedImpl impl, KronLaunchPlan* out) {
  if (pick_grad(p, impl) == FusedImpl::kV1) return kernel > 1 ? "v1 has no gate kernel" : detail::grad_v1_plan(p, kernel, out);
  GradPlanV2 plan;
  const char* why = make_grad_plan_v2(p, &plan);
  if (why != nullptr || out == nullptr) return why;
  KronLaunchPlan q{};
  q.threads = kThreads;
  q.factor_loads = 1;
  if (kernel == 0) {
    q.tile_tokens = plan.tt;
    q.tiles = plan.tiles;
    q.ctas = int64_t(plan.chunks) * plan.blocks;
    q.stages = plan.stages;
    q.barriers_per_tile = 1;
    q.smem_bytes = plan.smem_bytes;
    // Per tile, every unit sees tt tokens (split among its replicas); every
    // block writes its groups' x and dY tiles into its ring stage.
    TileCounts c;
    for (int u = 0; u < plan.units; ++u) {
      TileCounts one;
      count_unit_token(unit_at(p, u), &one);
      c.mma += plan.tt * one.mma;
      c.smem += plan.tt * one.smem;
    }
    for (int b = 0; b < plan.blocks; ++b) {
      const BlockSpan sp = block_span(p, plan.units, b);
      q.tile_load_bytes += int64_t(sp.j_hi - sp.j_lo + 1) * plan.tt * (p.in + p.out) * 2;
    }
    c.smem += q.tile_load_bytes;
    q.mma_per_tile = c.mma;
    q.smem_bytes_per_tile = c.smem;
    q.chunks = plan.chunks;
  } else if (kernel == 1) {
    // Each element sums one partial per (chunk, replica).
    q.tile_tokens = 0;
    q.tiles = int64_t(plan.chunks) * plan.replicas;
    q.ctas = (plan.elems + kThreads - 1) / kThreads;
    q.stages = 1;
  } else {
    int comps = 0;
    for (int j = 0; j < p.n_groups; ++j) comps += p.groups[j].r;
    q.tiles = 1;
    q.ctas = comps;
    q.stages = 1;
  }
  // The partials, then the G_A totals (written by the reduce, read by the gate kernel).
  q.workspace_bytes = kernel == 2 ? int64_t(plan.elems) * 4 : int64_t(plan.chunks) * plan.replicas * plan.elems * 4;
  *out = q;
  return nullptr;
}

cudaError_t kron_mix_fused_grad_factors(
    const KronGradParams& p, void* workspace, size_t workspace_bytes, cudaStream_t stream, FusedImpl impl) {
  if (pick_grad(p, impl) == FusedImpl::kV1) return detail::grad_v1_factors(p, workspace, workspace_bytes, stream);
  GradPlanV2 plan;
  if (make_grad_plan_v2(p, &plan) != nullptr) return cudaErrorNotSupported;
  if (workspace_bytes < kron_mix_fused_grad_workspace_bytes(p, FusedImpl::kV2)) return cudaErrorInvalidValue;
  float* ws = static_cast<float*>(workspace);
  return p.dtype == DType::kBFloat16 ? launch_grad_v2<__nv_bfloat16>(p, plan, ws, stream)
                                     : launch_grad_v2<__half>(p, plan, ws, stream);
}

}  // namespace cuda
}  // namespace moka
