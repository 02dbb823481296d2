// What the Kronecker-mixture kernels (kron_mix_fused.cu, kron_mix_fused_v2.cu)
// share: the CTA shape and register tiles, the shared-memory operand layout,
// 16-bit element conversions and the device queries their planners use.
#pragma once

#include "../kron_mix.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace moka {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// Register tile of stage 2 per warp: 2 x 8 mma tiles of 16 x 8 = 32 x 64.
constexpr int kS2TilesM = 2, kS2TilesN = 8;
// Stage 1 (transient accumulator) per warp in kron_mix_fused.cu and
// kron_mix_indexed.cu: 2 x 4 tiles = 32 x 32 (v2 has its own, kron_mix_fused_v2.cu).
constexpr int kS1TilesM = 2, kS1TilesN = 4;
// CUDA's grid limits, which every planner checks so that what it accepts launches.
constexpr int64_t kMaxGridX = 0x7fffffff;
constexpr int64_t kMaxGridYZ = 65535;

__host__ __device__ inline int round_up(int v, int m) { return (v + m - 1) / m * m; }

// Leading dimension of a shared-memory operand whose k extent is k16 (a
// multiple of 16): +8 elements makes the row stride 4 (mod 8) 32-bit words, so
// the 8 rows x 4 columns of words an mma fragment load (or the 8 rows of 16
// bytes of one ldmatrix phase) touch hit 32 distinct banks.
__host__ __device__ inline int operand_ld(int k16) { return k16 + 8; }

// Warps along M in stage 2 for a factor with ma16 rows; the rest go along N.
__host__ __device__ inline int stage2_warps_m(int ma16) {
  return ma16 <= 32 ? 1 : (ma16 <= 64 ? 2 : 4);
}

// Tokens per tile that stage 2's register tile (kWarps warps of 32 x 64)
// holds for a group with factor dims ma, mb.
__host__ __device__ inline int stage2_token_cap(int ma, int mb) {
  return (kWarps / stage2_warps_m(round_up(ma, 16))) * kS2TilesN * 8 / mb;
}

template <typename T>
struct Bits;
template <>
struct Bits<__half> {
  static __device__ float to_float(__half v) { return __half2float(v); }
  static __device__ __half from_float(float v) { return __float2half_rn(v); }
  static __device__ uint32_t raw(__half v) { return __half_as_ushort(v); }
  static __device__ __half from_raw(uint32_t b) {
    return __ushort_as_half(static_cast<unsigned short>(b));
  }
};
template <>
struct Bits<__nv_bfloat16> {
  static __device__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
  static __device__ uint32_t raw(__nv_bfloat16 v) { return __bfloat16_as_ushort(v); }
  static __device__ __nv_bfloat16 from_raw(uint32_t b) {
    return __ushort_as_bfloat16(static_cast<unsigned short>(b));
  }
};

// Zeros a warp's register tile of mma accumulators.
template <int M, int N>
__device__ inline void zero_acc(float (&acc)[M][N][4]) {
#pragma unroll
  for (int i = 0; i < M; ++i)
#pragma unroll
    for (int j = 0; j < N; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;
}

// The sum of every thread's v over the CTA (kThreads threads), in a fixed
// order (lanes by shuffle, then warps in index order): deterministic.
// Thread 0 gets the total; every thread must call it.
__device__ inline float block_sum(float v) {
  __shared__ float warp_sums[kWarps];
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x >> 5] = v;
  __syncthreads();
  float total = 0.f;
  if (threadIdx.x == 0)
    for (int w = 0; w < kWarps; ++w) total += warp_sums[w];
  return total;
}

template <typename T>
__device__ inline uint32_t pack2(float lo, float hi) {
  return Bits<T>::raw(Bits<T>::from_float(lo)) | (Bits<T>::raw(Bits<T>::from_float(hi)) << 16);
}

template <typename T>
__device__ inline float unpack_lo(uint32_t w) { return Bits<T>::to_float(Bits<T>::from_raw(w & 0xffffu)); }
template <typename T>
__device__ inline float unpack_hi(uint32_t w) { return Bits<T>::to_float(Bits<T>::from_raw(w >> 16)); }

__host__ __device__ inline bool aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

// The current device's opt-in shared memory per CTA and SM count (cached per
// device; the attribute queries are not stream operations, so planning is
// also safe while a CUDA graph is being captured).
inline int max_dynamic_smem() {
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return 0;
  static int cache[64] = {0};
  if (dev >= 0 && dev < 64 && cache[dev] > 0) return cache[dev];
  int v = 0;
  cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  if (dev >= 0 && dev < 64) cache[dev] = v;
  return v;
}

// The dynamic shared memory `Kernel` may use per CTA on the current device:
// the opt-in limit less the kernel's static shared memory as the runtime
// reports it (cached per device). Planners size their plans by it, so that
// what they accept also passes the opt-in below and the launch.
template <auto Kernel>
inline int dynamic_smem_limit() {
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return 0;
  static int cache[64] = {0};
  if (dev >= 0 && dev < 64 && cache[dev] > 0) return cache[dev];
  int v = max_dynamic_smem();
  cudaFuncAttributes attr{};
  if (cudaFuncGetAttributes(&attr, Kernel) == cudaSuccess) v -= static_cast<int>(attr.sharedSizeBytes);
  if (dev >= 0 && dev < 64) cache[dev] = v;
  return v;
}

// Lets `Kernel` use all of dynamic_smem_limit, once per device (not a stream
// operation, so it is also safe while a CUDA graph is being captured).
template <auto Kernel>
inline cudaError_t opt_in_full_smem() {
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  static bool configured[64] = {false};
  if (dev >= 0 && dev < 64 && configured[dev]) return cudaSuccess;
  err = cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, dynamic_smem_limit<Kernel>());
  if (err == cudaSuccess && dev >= 0 && dev < 64) configured[dev] = true;
  return err;
}

inline int sm_count() {
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return 1;
  static int cache[64] = {0};
  if (dev >= 0 && dev < 64 && cache[dev] > 0) return cache[dev];
  int v = 1;
  cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, dev);
  if (dev >= 0 && dev < 64) cache[dev] = v;
  return v;
}

// Stage 1's accumulators (the TM x TN mma tiles of the warp tile at (bm, bn)
// of Z^T[d][(t, a)], n1 = tt * na columns) times the gate, rounded once to 16
// bits, into Zs[(t*mb + d)][a] (row stride ldz).
template <typename T, int TM, int TN>
__device__ inline void store_z(T* zs, int ldz, const float (&acc1)[TM][TN][4], float gk, int bm,
                               int bn, int n1, int na, int mb, int gid, int tig) {
#pragma unroll
  for (int jn = 0; jn < TN; ++jn) {
    const int c0 = bn + 8 * jn + 2 * tig;  // this thread's columns c0, c0 + 1
    if (c0 >= n1) continue;
    const int ta = c0 / na, aa = c0 - ta * na;
    const int off0 = ta * mb * ldz + aa;
    // With na even, c0 (even) and c0 + 1 are one token's a, a + 1.
    const bool paired = (na % 2 == 0);
    const bool valid1 = c0 + 1 < n1;
    int off1 = 0;
    if (!paired && valid1) {
      const int tb = (c0 + 1) / na;
      off1 = tb * mb * ldz + (c0 + 1 - tb * na);
    }
#pragma unroll
    for (int i = 0; i < TM; ++i) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int d = bm + 16 * i + gid + 8 * h;
        if (d >= mb) continue;
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

// y[t0 + t] = [base +] Ys[t] for t < nt (Ys: float32, tt x out), rounded
// once, 16-byte stores where the layout allows.
template <typename T>
__device__ inline void store_y_from_ys(const KronMixParams& p, const float* ys, int64_t t0, int nt) {
  const int out = p.out;
  T* y = static_cast<T*>(p.y);
  const T* base = static_cast<const T*>(p.base);
  const bool vec = out % 8 == 0 && aligned16(y) && p.y_row_stride % 8 == 0 &&
      (base == nullptr || (aligned16(base) && p.base_row_stride % 8 == 0));
  if (vec) {
    const int cpt = out / 8;
    for (int i = threadIdx.x; i < nt * cpt; i += kThreads) {
      const int t = i / cpt, o = (i - t * cpt) * 8;
      const float4 lo = *reinterpret_cast<const float4*>(ys + t * out + o);
      const float4 hi = *reinterpret_cast<const float4*>(ys + t * out + o + 4);
      float v[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
      if (base != nullptr) {
        const uint4 b = __ldg(reinterpret_cast<const uint4*>(base + (t0 + t) * p.base_row_stride + o));
        v[0] += unpack_lo<T>(b.x); v[1] += unpack_hi<T>(b.x);
        v[2] += unpack_lo<T>(b.y); v[3] += unpack_hi<T>(b.y);
        v[4] += unpack_lo<T>(b.z); v[5] += unpack_hi<T>(b.z);
        v[6] += unpack_lo<T>(b.w); v[7] += unpack_hi<T>(b.w);
      }
      const uint4 w = make_uint4(pack2<T>(v[0], v[1]), pack2<T>(v[2], v[3]),
                                 pack2<T>(v[4], v[5]), pack2<T>(v[6], v[7]));
      *reinterpret_cast<uint4*>(y + (t0 + t) * p.y_row_stride + o) = w;
    }
  } else {
    for (int i = threadIdx.x; i < nt * out; i += kThreads) {
      const int t = i / out, o = i - t * out;
      float v = ys[t * out + o];
      if (base != nullptr) v += Bits<T>::to_float(base[(t0 + t) * p.base_row_stride + o]);
      y[(t0 + t) * p.y_row_stride + o] = Bits<T>::from_float(v);
    }
  }
}

// Why the fused kernels cannot take a problem's dtype, group count, token
// count or factor dims, or nullptr: the limits every planner shares (P: the
// forward's or the gradient's params; each group has r, ma, na, mb, nb).
template <typename P>
inline const char* fused_problem_unsupported(const P& p) {
  if (p.dtype != DType::kFloat16 && p.dtype != DType::kBFloat16) return "the fused kernel takes float16/bfloat16 only";
  if (p.n_groups < 1 || p.n_groups > kFusedMaxGroups) return "more groups than the fused kernel takes (8)";
  if (p.tokens < 0) return "negative token count";
  for (int j = 0; j < p.n_groups; ++j) {
    const auto& g = p.groups[j];
    if (g.r < 1 || g.ma < 1 || g.na < 1 || g.mb < 1 || g.nb < 1) return "empty factor";
    if (g.ma > kFusedMaxFactorDim || g.na > kFusedMaxFactorDim || g.mb > kFusedMaxFactorDim ||
        g.nb > kFusedMaxFactorDim)
      return "a factor dimension exceeds the fused kernel's limit (128)";
  }
  return nullptr;
}

// Fragment bytes one warp loads for an A (16 x 16) and a B (16 x 8) operand.
constexpr int kFragABytes = 16 * 16 * 2, kFragBBytes = 16 * 8 * 2;

struct TileCounts {
  int64_t mma = 0, smem = 0;
};

// One GEMM of the kernels' warp tiling on shared-memory operands: warps walk
// (tm x tn)-tile warp tiles of mma tiles (16 x 8) over M x N (warp tile
// (wt % ntm, wt / ntm) for stage 1; fixed per warp for stage 2), each k step
// loading its valid A and B fragments once.
inline void count_gemm(int m16, int n, int k16, int tm, int tn, int warp_m, int warp_n, TileCounts* c) {
  for (int bm = 0; bm < m16; bm += warp_m)
    for (int bn = 0; bn < n; bn += warp_n) {
      int mi = 0, nj = 0;
      for (int i = 0; i < tm; ++i) mi += bm + 16 * i < m16;
      for (int j = 0; j < tn; ++j) nj += bn + 8 * j < n;
      c->mma += int64_t(k16 / 16) * mi * nj;
      c->smem += int64_t(k16 / 16) * (mi * kFragABytes + nj * kFragBBytes);
    }
}

// The two stages of the forward for one group and r components over tt
// tokens: MMAs, fragment loads and the Zs writes, with stage 1 in warp tiles
// of s1_tm x s1_tn mma tiles.
inline void count_two_stage(int tt, int r, int ma, int na, int mb, int nb, TileCounts* c,
                            int s1_tm = kS1TilesM, int s1_tn = kS1TilesN) {
  const int ma16 = round_up(ma, 16), na16 = round_up(na, 16), mb16 = round_up(mb, 16), nb16 = round_up(nb, 16);
  TileCounts one;
  count_gemm(mb16, tt * na, nb16, s1_tm, s1_tn, 16 * s1_tm, 8 * s1_tn, &one);
  one.smem += int64_t(mb) * tt * na * 2;  // Zs
  const int n2 = tt * mb;
  // Stage 2: warp (w % wm, w / wm) owns the 32 x 64 tile at (32 (w % wm), 64 (w / wm)); the planners'
  // tt keeps n2 within the warps' columns.
  count_gemm(ma16, n2, na16, kS2TilesM, kS2TilesN, 16 * kS2TilesM, 8 * kS2TilesN, &one);
  c->mma += r * one.mma;
  c->smem += r * one.smem;
}

}  // namespace

namespace detail {
// v1 (kron_mix_fused.cu), which kron_mix_fused_forward (kron_mix_fused_v2.cu)
// dispatches to.
const char* fused_v1_plan(const KronMixParams& p, KronLaunchPlan* plan);
cudaError_t fused_v1_forward(const KronMixParams& p, cudaStream_t stream);
// v1's factor gradients (kron_mix_fused.cu), which the kron_mix_fused_grad_*
// entry points (kron_mix_grad_v2.cu) dispatch to; kernel 0: the factor
// kernel, 1: the reduce.
const char* grad_v1_plan(const KronGradParams& p, int kernel, KronLaunchPlan* plan);
size_t grad_v1_workspace_bytes(const KronGradParams& p);
cudaError_t grad_v1_factors(const KronGradParams& p, void* workspace, size_t workspace_bytes, cudaStream_t stream);
}  // namespace detail

}  // namespace cuda
}  // namespace moka
