// The fused Kronecker-mixture forward kernel for float16/bfloat16 (tensor-core
// mma.sync, float32 accumulation) and its host-side planner. Torch-free: it
// includes only CUDA headers and is driven through csrc/kron_mix.h.
//
// A CTA owns `tt` consecutive tokens. Per group j it lays the token tile out
// in shared memory as Xs[(t, a)][b] = x[t, a*nb + b] and, for each component k,
//   stage 1:  Zs[(t, d)][a] = g_k * sum_b B_k[d, b] Xs[(t, a)][b]   (Z^T = B X^T)
//   stage 2:  acc[c][(t, d)] += sum_a A_k[c, a] Zs[(t, d)][a]       (Y = A Z)
// Both stages are plain row-major x "k-contiguous" GEMMs over shared memory,
// so one mma.sync fragment loader serves both. The gate is folded into Z
// before it is rounded to 16 bits, which costs no extra rounding. The stage-2
// accumulator stays in registers across the r components of a group (tt is
// chosen so that ma x tt*mb fits the CTA's register tile); across groups, whose
// output tilings differ, it is summed into a float32 shared tile Ys (tt x out),
// which the epilogue adds to `base` (if any) and writes to y once, coalesced.
// Nothing of size tokens x components leaves the chip.
//
// The factor gradients (second half of this file) use the same tiles.
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

// The CTA's token tile as Xs[(t, a)][b]; tokens past the end and the k
// padding columns b in [nb, nb16) are zero.
template <typename T>
__device__ void load_x_tile(
    T* xs, const KronMixParams& p, int64_t t0, int nt, int tt, int na, int nb, int nb16, int ldx) {
  const T* x = static_cast<const T*>(p.x);
  const int in = p.in;
  if (nb % 8 == 0 && aligned16(x) && p.x_row_stride % 8 == 0) {
    const int cpt = in / 8;  // 16-byte chunks per token
    for (int i = threadIdx.x; i < tt * cpt; i += kThreads) {
      const int t = i / cpt, c = (i - t * cpt) * 8;
      const int a = c / nb, b = c - a * nb;
      uint4 v = make_uint4(0, 0, 0, 0);
      if (t < nt) v = __ldg(reinterpret_cast<const uint4*>(x + (t0 + t) * p.x_row_stride + c));
      *reinterpret_cast<uint4*>(xs + (t * na + a) * ldx + b) = v;
    }
  } else {
    for (int i = threadIdx.x; i < tt * in; i += kThreads) {
      const int t = i / in, c = i - t * in;
      const int a = c / nb, b = c - a * nb;
      xs[(t * na + a) * ldx + b] =
          t < nt ? x[(t0 + t) * p.x_row_stride + c] : Bits<T>::from_float(0.f);
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

}  // namespace

// Shared-memory plan of one launch, identical for all CTAs.
struct FusedPlan {
  int tt;  // tokens per CTA
  int ys_elems;  // float32 elements of Ys (>= tt * out, a multiple of 4)
  int xs_elems, as_elems, bs_elems, zs_elems;  // 16-bit elements, multiples of 8
  size_t smem_bytes;
};

namespace {

template <typename T>
__global__ void __launch_bounds__(kThreads, 1)
    kron_mix_fused_fwd_kernel(const KronMixParams p, const FusedPlan plan) {
  MOKA_DYNAMIC_SHARED(smem_raw);
  float* ys = reinterpret_cast<float*>(smem_raw);
  T* xs = reinterpret_cast<T*>(ys + plan.ys_elems);
  T* as = xs + plan.xs_elems;
  T* bs = as + plan.as_elems;
  T* zs = bs + plan.bs_elems;

  const int tt = plan.tt;
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * tt;
  const int nt = static_cast<int>(p.tokens - t0 < tt ? p.tokens - t0 : tt);  // valid tokens
  const T* gates = static_cast<const T*>(p.gates);
  const int out = p.out;

  for (int j = 0; j < p.n_groups; ++j) {
    const KronGroupParams g = p.groups[j];
    const int nb16 = round_up(g.nb, 16);
    __syncthreads();  // the previous group is done with Xs and Zs
    load_x_tile<T>(xs, p, t0, nt, tt, g.na, g.nb, nb16, operand_ld(nb16));
    mix_group_two_stage<T>(g, static_cast<const T*>(g.A), static_cast<const T*>(g.B), gates, j, tt, out,
                           xs, as, bs, zs, ys);
  }
  __syncthreads();

  // Epilogue: y = [base +] Ys, the only write of y.
  store_y_from_ys<T>(p, ys, t0, nt);
}

size_t smem_bytes(const KronMixParams& p, int tt, FusedPlan* plan) {
  FusedPlan q{};
  q.tt = tt;
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
  q.smem_bytes = size_t(q.ys_elems) * 4 +
      size_t(q.xs_elems + q.as_elems + q.bs_elems + q.zs_elems) * 2;
  if (plan) *plan = q;
  return q.smem_bytes;
}

// Fills *plan (if non-null) and returns nullptr, or returns why not.
const char* make_plan(const KronMixParams& p, FusedPlan* plan) {
  if (const char* why = fused_problem_unsupported(p)) return why;
  int tt = 1 << 30;
  for (int j = 0; j < p.n_groups; ++j) {
    const KronGroupParams& g = p.groups[j];
    // Stage 2 keeps ma16 x tt*mb in registers: warps_n * 64 columns.
    const int t = stage2_token_cap(g.ma, g.mb);
    tt = t < tt ? t : tt;
  }
  if (p.tokens > 0 && p.tokens < tt) tt = static_cast<int>(p.tokens);
  // Every instantiation has the same static shared memory.
  const size_t limit = static_cast<size_t>(dynamic_smem_limit<kron_mix_fused_fwd_kernel<__nv_bfloat16>>());
  for (; tt >= 1; --tt) {
    if (smem_bytes(p, tt, plan) <= limit) break;
  }
  if (tt < 1) return "the factor shapes need more shared memory than the device has";
  if ((p.tokens + tt - 1) / tt > kMaxGridX) return "too many tokens for one launch (grid.x)";
  return nullptr;
}

template <typename T>
cudaError_t launch(const KronMixParams& p, const FusedPlan& plan, cudaStream_t stream) {
  cudaError_t err = opt_in_full_smem<kron_mix_fused_fwd_kernel<T>>();
  if (err != cudaSuccess) return err;
  const int64_t blocks = (p.tokens + plan.tt - 1) / plan.tt;
  return launch_kernel(
      "kron_mix_fused_fwd_kernel", kron_mix_fused_fwd_kernel<T>, dim3(static_cast<unsigned>(blocks)),
      dim3(kThreads), plan.smem_bytes, stream, p, plan);
}

}  // namespace

namespace detail {

const char* fused_v1_plan(const KronMixParams& p, KronLaunchPlan* out) {
  FusedPlan plan;
  const char* why = make_plan(p, &plan);
  if (why != nullptr || out == nullptr) return why;
  KronLaunchPlan q{};
  q.tile_tokens = plan.tt;
  q.tiles = (p.tokens + plan.tt - 1) / plan.tt;
  q.ctas = q.tiles;
  q.threads = kThreads;
  q.stages = 1;
  q.factor_loads = 0;  // every CTA loads every factor once: per tile
  // Per group: one before loading x, three per component (factors loaded,
  // Zs written, stage 2 done); one before the epilogue reads Ys.
  q.barriers_per_tile = 1;
  for (int j = 0; j < p.n_groups; ++j) q.barriers_per_tile += 1 + 3 * p.groups[j].r;
  q.smem_bytes = plan.smem_bytes;
  // Per group: x and the factors written into shared memory, the two
  // stages, the group's sum into Ys (written, and read back after group 0);
  // the epilogue reads Ys once.
  TileCounts c;
  for (int j = 0; j < p.n_groups; ++j) {
    const KronGroupParams& g = p.groups[j];
    count_two_stage(plan.tt, g.r, g.ma, g.na, g.mb, g.nb, &c);
    c.smem += int64_t(plan.tt) * p.in * 2;
    c.smem += int64_t(g.r) * (round_up(g.ma, 16) * round_up(g.na, 16) + round_up(g.mb, 16) * round_up(g.nb, 16)) * 2;
    c.smem += int64_t(plan.tt) * p.out * 4 * (j == 0 ? 1 : 2);
  }
  c.smem += int64_t(plan.tt) * p.out * 4;
  q.mma_per_tile = c.mma;
  q.smem_bytes_per_tile = c.smem;
  *out = q;
  return nullptr;
}

cudaError_t fused_v1_forward(const KronMixParams& p, cudaStream_t stream) {
  FusedPlan plan;
  if (make_plan(p, &plan) != nullptr) return cudaErrorNotSupported;
  if (p.tokens == 0) return cudaSuccess;
  return p.dtype == DType::kBFloat16 ? launch<__nv_bfloat16>(p, plan, stream)
                                     : launch<__half>(p, plan, stream);
}

}  // namespace detail


// ---------------------------------------------------------------------------
// Factor gradients. Each CTA takes one (component, kind) job and a chunk of
// token tiles, and computes G = sum_t L_t F R_t^T for its tokens:
//   kind 0 (dA): L_t = dY_t (ma x mb), F = B_k,   R_t = X_t (na x nb)    -> G_A
//   kind 1 (dB): L_t = X_t^T (nb x na), F = A_k^T, R_t = dY_t^T (mb x ma) -> G_B^T
// (G_B^T = sum_t X_t^T A_k^T dY_t, so one kernel serves both). Per tile:
//   GEMM 1: Qs[i][(t, l)] = sum_j Ls[(t, i)][j] F[j][l]   (M = tt*p, K = q)
//   GEMM 2: acc[i][v] += sum_{(t, l)} Qs[i][(t, l)] Rs[v][(t, l)]  (K = tt*s)
// acc stays in registers across the chunk's tiles and is written once to a
// float32 workspace slot of (chunk, job); a second kernel sums the chunks in
// order, applies the gate and computes dg. Nothing of size tokens x
// components leaves the chip.

namespace {

struct GradJob {
  int p, q, s, u;  // L_t: p x q, F: q x s, R_t: u x s, G: p x u
  const void* ft;  // F^T (s x q), contiguous: B_k^T (kind 0) or A_k (kind 1)
  const void* l_src;
  int64_t l_tstride;
  int l_si, l_sj;  // L_t[i][j] = l_src[t * l_tstride + i * l_si + j * l_sj]
  const void* r_src;
  int64_t r_tstride;
  int r_si, r_sj;
};

__host__ __device__ inline GradJob grad_job(const KronGradParams& p, int j, int k, int kind) {
  const KronGradGroupParams& g = p.groups[j];
  GradJob job;
  if (kind == 0) {
    job.p = g.ma; job.q = g.mb; job.s = g.nb; job.u = g.na;
    job.ft = static_cast<const char*>(g.Bt) + size_t(k) * g.nb * g.mb * 2;
    job.l_src = p.grad_y; job.l_tstride = p.grad_y_row_stride; job.l_si = g.mb; job.l_sj = 1;
    job.r_src = p.x; job.r_tstride = p.x_row_stride; job.r_si = g.nb; job.r_sj = 1;
  } else {
    job.p = g.nb; job.q = g.na; job.s = g.ma; job.u = g.mb;
    job.ft = static_cast<const char*>(g.A) + size_t(k) * g.ma * g.na * 2;
    job.l_src = p.x; job.l_tstride = p.x_row_stride; job.l_si = 1; job.l_sj = g.nb;
    job.r_src = p.grad_y; job.r_tstride = p.grad_y_row_stride; job.r_si = 1; job.r_sj = g.mb;
  }
  return job;
}

// The group, the component within it and the float offset of the
// component's slot (G_A then G_B^T) inside one chunk's workspace.
__host__ __device__ inline void locate(const KronGradParams& p, int comp, int* j, int* k, int* off) {
  int o = 0;
  for (int jj = 0; jj < p.n_groups; ++jj) {
    const KronGradGroupParams& g = p.groups[jj];
    if (comp < g.r) {
      *j = jj;
      *k = comp;
      *off = o + comp * (g.ma * g.na + g.mb * g.nb);
      return;
    }
    comp -= g.r;
    o += g.r * (g.ma * g.na + g.mb * g.nb);
  }
  *j = 0; *k = 0; *off = 0;
}

// M_t[i][j] = src[(t0 + t) * tstride + i * si + j * sj] for i < rows, j < cols
// into dst[idx(t, i, j)]; tokens t >= nt load as zeros. The loop runs along
// whichever of i, j is contiguous in memory, so global reads coalesce.
template <typename T, typename Idx>
__device__ void load_token_mats(
    T* dst, Idx idx, const T* src, int64_t t0, int64_t tstride, int nt, int tt, int rows, int cols,
    int si, int sj) {
  const int per_t = rows * cols;
  if (sj == 1 && cols % 8 == 0 && si % 8 == 0 && tstride % 8 == 0 && aligned16(src)) {
    const int cpr = cols / 8, per_tc = rows * cpr;
    for (int e = threadIdx.x; e < tt * per_tc; e += kThreads) {
      const int t = e / per_tc, rem = e - t * per_tc;
      const int i = rem / cpr, jj = (rem - i * cpr) * 8;
      uint4 v = make_uint4(0, 0, 0, 0);
      if (t < nt) v = __ldg(reinterpret_cast<const uint4*>(src + (t0 + t) * tstride + i * si + jj));
      *reinterpret_cast<uint4*>(dst + idx(t, i, jj)) = v;
    }
  } else if (sj == 1) {
    for (int e = threadIdx.x; e < tt * per_t; e += kThreads) {
      const int t = e / per_t, rem = e - t * per_t;
      const int i = rem / cols, jj = rem - i * cols;
      dst[idx(t, i, jj)] = t < nt ? src[(t0 + t) * tstride + i * si + jj] : Bits<T>::from_float(0.f);
    }
  } else {
    for (int e = threadIdx.x; e < tt * per_t; e += kThreads) {
      const int t = e / per_t, rem = e - t * per_t;
      const int jj = rem / rows, i = rem - jj * rows;
      dst[idx(t, i, jj)] = t < nt ? src[(t0 + t) * tstride + i * si + jj * sj] : Bits<T>::from_float(0.f);
    }
  }
}

// Zeros columns [c0, c1) of rows [0, rows) of a [.][ld] tile.
template <typename T>
__device__ void zero_cols(T* s, int ld, int rows, int c0, int c1) {
  const int w = c1 - c0;
  if (w <= 0) return;
  for (int e = threadIdx.x; e < rows * w; e += kThreads) {
    const int r = e / w;
    s[r * ld + c0 + (e - r * w)] = Bits<T>::from_float(0.f);
  }
}

}  // namespace

struct GradPlan {
  int tt;        // tokens per tile
  int tiles;     // ceil(tokens / tt)
  int n_chunks;  // CTAs per job (chunks of consecutive tiles)
  int components;
  int per_chunk;  // workspace floats per chunk
  int ls_elems, fs_elems, qs_elems, rs_elems;
  size_t smem_bytes;
};

namespace {

template <typename T>
__global__ void __launch_bounds__(kThreads, 1)
    kron_mix_grad_factors_kernel(const KronGradParams p, const GradPlan plan, float* __restrict__ ws) {
  MOKA_DYNAMIC_SHARED(smem_raw);
  T* ls = reinterpret_cast<T*>(smem_raw);
  T* fs = ls + plan.ls_elems;
  T* qs = fs + plan.fs_elems;
  T* rs = qs + plan.qs_elems;

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int gid = lane >> 2, tig = lane & 3;
  const int kind = blockIdx.y & 1;
  int j, k, off;
  locate(p, blockIdx.y >> 1, &j, &k, &off);
  if (kind == 1) off += p.groups[j].ma * p.groups[j].na;
  const GradJob job = grad_job(p, j, k, kind);
  const int tt = plan.tt;
  const int p16 = round_up(job.p, 16), q16 = round_up(job.q, 16), s16 = round_up(job.s, 16);
  const int ldl = operand_ld(q16), ldf = ldl;
  const int n1 = tt * job.p;  // GEMM-1 rows (t, i)
  const int k2 = tt * job.s;  // GEMM-2 depth (t, l)
  const int k2_16 = round_up(k2, 16);
  const int ldq = operand_ld(k2_16), ldr = ldq;

  load_factor<T>(fs, static_cast<const T*>(job.ft), job.s, job.q, s16, q16, ldf);
  // k padding, never written by the tile loads or GEMM 1.
  zero_cols<T>(ls, ldl, n1, job.q, q16);
  zero_cols<T>(qs, ldq, p16, k2, k2_16);
  zero_cols<T>(rs, ldr, job.u, k2, k2_16);

  const int wm_count = stage2_warps_m(p16);
  const int wm = warp % wm_count, wn = warp / wm_count;
  float acc2[kS2TilesM][kS2TilesN][4];
zero_acc(acc2);

  const int tile_begin = static_cast<int>(int64_t(blockIdx.x) * plan.tiles / plan.n_chunks);
  const int tile_end = static_cast<int>(int64_t(blockIdx.x + 1) * plan.tiles / plan.n_chunks);
  const int P = job.p, S = job.s;
  for (int tile = tile_begin; tile < tile_end; ++tile) {
    const int64_t t0 = int64_t(tile) * tt;
    const int nt = static_cast<int>(p.tokens - t0 < tt ? p.tokens - t0 : tt);
    __syncthreads();  // the previous tile's GEMMs are done with Ls, Qs, Rs
    load_token_mats<T>(
        ls, [=](int t, int i, int jj) { return (t * P + i) * ldl + jj; },
        static_cast<const T*>(job.l_src), t0, job.l_tstride, nt, tt, job.p, job.q, job.l_si, job.l_sj);
    load_token_mats<T>(
        rs, [=](int t, int v, int l) { return v * ldr + t * S + l; },
        static_cast<const T*>(job.r_src), t0, job.r_tstride, nt, tt, job.u, job.s, job.r_si, job.r_sj);
    __syncthreads();

    // GEMM 1: Q[(t, i)][l] = sum_j L[(t, i)][j] F^T[l][j]; M = n1, N = s, K = q16.
    const int n1_16 = round_up(n1, 16);
    const int g1_m = (n1_16 + 31) / 32, g1_n = (job.s + 31) / 32;
    for (int wt = warp; wt < g1_m * g1_n; wt += kWarps) {
      const int bm = (wt % g1_m) * 32, bn = (wt / g1_m) * 32;
      float acc1[kS1TilesM][kS1TilesN][4];
zero_acc(acc1);
      for (int kk = 0; kk < q16; kk += 16) {
        uint32_t af[kS1TilesM][4], bf[kS1TilesN][2];
#pragma unroll
        for (int i = 0; i < kS1TilesM; ++i)
          if (bm + 16 * i < n1_16) load_frag_a(af[i], ls, ldl, bm + 16 * i, kk, gid, tig);
#pragma unroll
        for (int jn = 0; jn < kS1TilesN; ++jn)
          if (bn + 8 * jn < job.s) load_frag_b(bf[jn], fs, ldf, bn + 8 * jn, kk, gid, tig);
#pragma unroll
        for (int i = 0; i < kS1TilesM; ++i)
#pragma unroll
          for (int jn = 0; jn < kS1TilesN; ++jn)
            if (bm + 16 * i < n1_16 && bn + 8 * jn < job.s) ptx::mma_m16n8k16<T>(acc1[i][jn], af[i], bf[jn]);
      }
      // Scatter to Qs[i][t*s + l].
#pragma unroll
      for (int i = 0; i < kS1TilesM; ++i) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int m = bm + 16 * i + gid + 8 * h;
          if (m >= n1) continue;
          const int t = m / P, ii = m - t * P;
          T* row = qs + ii * ldq + t * S;
#pragma unroll
          for (int jn = 0; jn < kS1TilesN; ++jn) {
            const int l = bn + 8 * jn + 2 * tig;
            if (l >= S) continue;
            const float v0 = acc1[i][jn][2 * h], v1 = acc1[i][jn][2 * h + 1];
            if (S % 2 == 0) {
              *reinterpret_cast<uint32_t*>(row + l) = pack2<T>(v0, v1);
            } else {
              row[l] = Bits<T>::from_float(v0);
              if (l + 1 < S) row[l + 1] = Bits<T>::from_float(v1);
            }
          }
        }
      }
    }
    __syncthreads();

    // GEMM 2: acc[i][v] += sum_{(t, l)} Q[i][(t, l)] R[v][(t, l)]; M = p16, N = u, K = k2_16.
    for (int kk = 0; kk < k2_16; kk += 16) {
      uint32_t af[kS2TilesM][4], bf[kS2TilesN][2];
#pragma unroll
      for (int i = 0; i < kS2TilesM; ++i)
        if (wm * 32 + 16 * i < p16) load_frag_a(af[i], qs, ldq, wm * 32 + 16 * i, kk, gid, tig);
#pragma unroll
      for (int jn = 0; jn < kS2TilesN; ++jn)
        if (wn * 64 + 8 * jn < job.u) load_frag_b(bf[jn], rs, ldr, wn * 64 + 8 * jn, kk, gid, tig);
#pragma unroll
      for (int i = 0; i < kS2TilesM; ++i)
#pragma unroll
        for (int jn = 0; jn < kS2TilesN; ++jn)
          if (wm * 32 + 16 * i < p16 && wn * 64 + 8 * jn < job.u) ptx::mma_m16n8k16<T>(acc2[i][jn], af[i], bf[jn]);
    }
  }

  // This chunk's partial G (p x u, row-major) into its workspace slot.
  float* slot = ws + int64_t(blockIdx.x) * plan.per_chunk + off;
#pragma unroll
  for (int i = 0; i < kS2TilesM; ++i) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int c = wm * 32 + 16 * i + gid + 8 * h;
      if (c >= job.p) continue;
#pragma unroll
      for (int jn = 0; jn < kS2TilesN; ++jn) {
        const int v = wn * 64 + 8 * jn + 2 * tig;
        if (v < job.u) slot[c * job.u + v] = acc2[i][jn][2 * h];
        if (v + 1 < job.u) slot[c * job.u + v + 1] = acc2[i][jn][2 * h + 1];
      }
    }
  }
}

// Sums the chunks of one (component, kind) slot in chunk order, applies the
// gate, writes dA_k (kind 0) or dB_k (kind 1), and dg_k = <A_k, G_A>.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    kron_mix_grad_reduce_kernel(const KronGradParams p, const GradPlan plan, const float* __restrict__ ws) {
  const int kind = blockIdx.y;
  int j, k, off;
  locate(p, blockIdx.x, &j, &k, &off);
  const KronGradGroupParams& g = p.groups[j];
  const float gk = Bits<T>::to_float(static_cast<const T*>(p.gates)[g.gate_offset + k]);
  float dg = 0.f;
  if (kind == 0) {
    const int n = g.ma * g.na;
    const T* A = static_cast<const T*>(g.A) + int64_t(k) * n;
    T* dA = static_cast<T*>(g.dA) + int64_t(k) * n;
    for (int e = threadIdx.x; e < n; e += kThreads) {
      float s = 0.f;
      for (int c = 0; c < plan.n_chunks; ++c) s += ws[int64_t(c) * plan.per_chunk + off + e];
      dA[e] = Bits<T>::from_float(gk * s);
      dg += Bits<T>::to_float(A[e]) * s;
    }
  } else {
    const int n = g.mb * g.nb;
    off += g.ma * g.na;
    T* dB = static_cast<T*>(g.dB) + int64_t(k) * n;
    for (int e = threadIdx.x; e < n; e += kThreads) {  // e = b * mb + d in G_B^T
      float s = 0.f;
      for (int c = 0; c < plan.n_chunks; ++c) s += ws[int64_t(c) * plan.per_chunk + off + e];
      const int b = e / g.mb, d = e - b * g.mb;
      dB[d * g.nb + b] = Bits<T>::from_float(gk * s);
    }
    return;  // whole block: kind is uniform
  }
  const float total = block_sum(dg);
  if (threadIdx.x == 0) static_cast<T*>(p.grad_gates)[g.gate_offset + k] = Bits<T>::from_float(total);
}

const char* make_grad_plan(const KronGradParams& p, GradPlan* plan) {
  if (const char* why = fused_problem_unsupported(p)) return why;
  GradPlan q{};
  for (int j = 0; j < p.n_groups; ++j) {
    const KronGradGroupParams& g = p.groups[j];
    // One grid row per (component, kind) job: grid.y.
    if (2 * (int64_t(q.components) + g.r) > kMaxGridYZ)
      return "more components than the factor-gradient grid takes (32767)";
    q.components += g.r;
    q.per_chunk += g.r * (g.ma * g.na + g.mb * g.nb);
  }
  // Every instantiation has the same static shared memory.
  const size_t limit = static_cast<size_t>(dynamic_smem_limit<kron_mix_grad_factors_kernel<__nv_bfloat16>>());
  // Larger tiles mean fewer barriers per token; 8 tokens already give GEMM 2
  // a depth of 8*s.
  int tt = 8;
  if (p.tokens > 0 && p.tokens < tt) tt = static_cast<int>(p.tokens);
  for (; tt >= 1; --tt) {
    q.ls_elems = q.fs_elems = q.qs_elems = q.rs_elems = 0;
    for (int j = 0; j < p.n_groups; ++j) {
      for (int kind = 0; kind < 2; ++kind) {
        const GradJob job = grad_job(p, j, 0, kind);
        const int q16 = round_up(job.q, 16), k2_16 = round_up(tt * job.s, 16);
        auto mx = [](int& a, int b) { a = a > b ? a : b; };
        mx(q.ls_elems, round_up(tt * job.p, 16) * operand_ld(q16));
        mx(q.fs_elems, round_up(job.s, 16) * operand_ld(q16));
        mx(q.qs_elems, round_up(job.p, 16) * operand_ld(k2_16));
        mx(q.rs_elems, round_up(job.u, 8) * operand_ld(k2_16));
      }
    }
    q.smem_bytes = size_t(q.ls_elems + q.fs_elems + q.qs_elems + q.rs_elems) * 2;
    if (q.smem_bytes <= limit) break;
  }
  if (tt < 1) return "the factor shapes need more shared memory than the device has";
  q.tt = tt;
  const int64_t tiles = (p.tokens + tt - 1) / tt;
  if (tiles > kMaxGridX) return "too many tokens";
  q.tiles = static_cast<int>(tiles);
  // About two CTAs per SM over all jobs; never more chunks than tiles.
  const int jobs = 2 * q.components;
  int chunks = (2 * sm_count() + jobs - 1) / jobs;
  if (chunks > q.tiles) chunks = q.tiles;
  q.n_chunks = chunks;
  if (plan) *plan = q;
  return nullptr;
}

template <typename T>
cudaError_t launch_grad(const KronGradParams& p, const GradPlan& plan, float* ws, cudaStream_t stream) {
  cudaError_t err = opt_in_full_smem<kron_mix_grad_factors_kernel<T>>();
  if (err != cudaSuccess) return err;
  if (plan.n_chunks > 0) {
    err = launch_kernel(
        "kron_mix_grad_factors_kernel", kron_mix_grad_factors_kernel<T>,
        dim3(plan.n_chunks, 2 * plan.components), dim3(kThreads), plan.smem_bytes, stream, p, plan, ws);
    if (err != cudaSuccess) return err;
  }
  return launch_kernel(
      "kron_mix_grad_reduce_kernel", kron_mix_grad_reduce_kernel<T>, dim3(plan.components, 2),
      dim3(kThreads), 0, stream, p, plan, static_cast<const float*>(ws));
}

}  // namespace

namespace detail {

const char* grad_v1_plan(const KronGradParams& p, int kernel, KronLaunchPlan* out) {
  GradPlan plan;
  const char* why = make_grad_plan(p, &plan);
  if (why != nullptr || out == nullptr) return why;
  KronLaunchPlan q{};
  q.tile_tokens = plan.tt;
  q.tiles = plan.tiles;
  q.threads = kThreads;
  q.stages = 1;
  if (kernel == 0) {
    // One CTA per (chunk of tiles, component, kind); it loads its factor once.
    q.ctas = int64_t(plan.n_chunks) * 2 * plan.components;
    q.factor_loads = 1;
    q.barriers_per_tile = 3;  // tile free, tile loaded, Qs written
    q.smem_bytes = plan.smem_bytes;
    // Per tile, over all jobs: Ls and Rs written, GEMM 1 (M = tt*p, N = s,
    // K = q), Qs written, GEMM 2 (M = p, N = u, K = tt*s).
    TileCounts c;
    for (int j = 0; j < p.n_groups; ++j) {
      for (int kind = 0; kind < 2; ++kind) {
        const GradJob job = grad_job(p, j, 0, kind);
        TileCounts one;
        one.smem += int64_t(plan.tt) * (job.p * job.q + job.u * job.s) * 2;
        count_gemm(round_up(plan.tt * job.p, 16), job.s, round_up(job.q, 16), kS1TilesM, kS1TilesN,
                   16 * kS1TilesM, 8 * kS1TilesN, &one);
        one.smem += int64_t(plan.tt) * job.p * job.s * 2;
        count_gemm(round_up(job.p, 16), job.u, round_up(plan.tt * job.s, 16), kS2TilesM, kS2TilesN,
                   16 * kS2TilesM, 8 * kS2TilesN, &one);
        c.mma += p.groups[j].r * one.mma;
        c.smem += p.groups[j].r * one.smem;
      }
    }
    q.mma_per_tile = c.mma;
    q.smem_bytes_per_tile = c.smem;
    // Every (component, kind) job loads the tile's x and dY.
    q.chunks = plan.n_chunks;
    q.tile_load_bytes = 2 * int64_t(plan.components) * plan.tt * (p.in + p.out) * 2;
  } else {
    q.ctas = 2 * int64_t(plan.components);
    q.tiles = plan.n_chunks;  // the reduce sums one partial per chunk
    q.factor_loads = 1;
    q.barriers_per_tile = 0;
    q.smem_bytes = 0;
  }
  q.workspace_bytes = int64_t(plan.n_chunks) * plan.per_chunk * 4;
  *out = q;
  return nullptr;
}

size_t grad_v1_workspace_bytes(const KronGradParams& p) {
  GradPlan plan;
  if (make_grad_plan(p, &plan) != nullptr) return 0;
  return size_t(plan.n_chunks) * plan.per_chunk * sizeof(float);
}

cudaError_t grad_v1_factors(const KronGradParams& p, void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  GradPlan plan;
  if (make_grad_plan(p, &plan) != nullptr) return cudaErrorNotSupported;
  if (workspace_bytes < size_t(plan.n_chunks) * plan.per_chunk * sizeof(float)) return cudaErrorInvalidValue;
  float* ws = static_cast<float*>(workspace);
  return p.dtype == DType::kBFloat16 ? launch_grad<__nv_bfloat16>(p, plan, ws, stream)
                                     : launch_grad<__half>(p, plan, ws, stream);
}

}  // namespace detail

}  // namespace cuda
}  // namespace moka
