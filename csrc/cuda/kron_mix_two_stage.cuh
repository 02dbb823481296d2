// The two-stage tensor-core tile of the fused forward v1, shared by the v1
// forward (kron_mix_fused.cu) and the kron_mix_indexed forward
// (kron_mix_indexed.cu): one group's r components of one token tile, from the
// tile Xs[(t, a)][b] in shared memory to the float32 output tile Ys[t][c*mb + d].
// Per component k:
//   stage 1:  Zs[(t, d)][a] = g_k * sum_b B_k[d, b] Xs[(t, a)][b]   (Z^T = B X^T)
//   stage 2:  acc[c][(t, d)] += sum_a A_k[c, a] Zs[(t, d)][a]       (Y = A Z)
// Both stages are row-major x "k-contiguous" GEMMs over shared memory, so one
// fragment loader serves both. Torch-free: CUDA headers only.
#pragma once

#include "kron_mix_common.cuh"
#include "ptx.cuh"

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

// One group of the tile. The caller has written Xs (k padding zero) after a
// barrier that ended the previous group; this function's first barrier
// publishes it. On return each thread has added its part of the group into Ys
// (group j == 0 writes every element, later groups add); the caller's next
// barrier publishes Ys. Ag and Bg point at the group's stacked factors
// (r, ma, na) and (r, mb, nb), gates at the flat gate vector; the GEMMs span
// the first `tokens` tokens of the tile.
template <typename T>
__device__ __forceinline__ void mix_group_two_stage(
    const KronGroupParams& g, const T* Ag, const T* Bg, const T* gates, int j, int tokens, int out,
    const T* xs, T* as, T* bs, T* zs, float* ys) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int gid = lane >> 2, tig = lane & 3;
  const int ma16 = round_up(g.ma, 16), na16 = round_up(g.na, 16);
  const int mb16 = round_up(g.mb, 16), nb16 = round_up(g.nb, 16);
  const int ldx = operand_ld(nb16), ldb = ldx, lda = operand_ld(na16), ldz = lda;
  const int n1 = tokens * g.na;  // stage-1 N: rows (t, a) of Xs
  const int n2 = tokens * g.mb;  // stage-2 N: rows (t, d) of Zs
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
zero_acc(acc2);

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
zero_acc(acc1);
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
      store_z<T>(zs, ldz, acc1, gk, bm, bn, n1, g.na, g.mb, gid, tig);
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

}  // namespace
}  // namespace cuda
}  // namespace moka
