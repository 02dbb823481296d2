// gate_softmax forward and backward on CUDA: one warp per row of logits (a
// row is the handful of mixture components of one adapter), accumulated in
// float32 (float64 for float64). Torch-free; driven through csrc/kron_mix.h.
// NaN anywhere in a row makes the whole row NaN, as on CPU.
#include "../kron_mix.h"
#include "launch.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace moka {
namespace cuda {
namespace {

constexpr int kRowsPerBlock = 8;

template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

template <typename A> __device__ inline A load_as(const __half& v) { return static_cast<A>(__half2float(v)); }
template <typename A> __device__ inline A load_as(const __nv_bfloat16& v) { return static_cast<A>(__bfloat162float(v)); }
template <typename A> __device__ inline A load_as(const float& v) { return static_cast<A>(v); }
template <typename A> __device__ inline A load_as(const double& v) { return static_cast<A>(v); }

template <typename T> __device__ inline T store_as(float v);
template <> __device__ inline __half store_as<__half>(float v) { return __float2half_rn(v); }
template <> __device__ inline __nv_bfloat16 store_as<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <> __device__ inline float store_as<float>(float v) { return v; }
template <typename T> __device__ inline T store_as(double v) { return static_cast<T>(v); }

template <typename A> __device__ inline A warp_max(A v) {
  for (int o = 16; o > 0; o >>= 1) v = fmax(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
template <typename A> __device__ inline A warp_sum(A v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <typename T>
__global__ void gate_softmax_fwd_kernel(
    const T* __restrict__ logits, T* __restrict__ out, int64_t rows, int64_t n,
    typename Acc<T>::type inv_t) {
  using A = typename Acc<T>::type;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + (threadIdx.x >> 5);
  if (row >= rows) return;  // whole warps leave together
  const int lane = threadIdx.x & 31;
  const T* l = logits + row * n;
  T* o = out + row * n;
  A m = -INFINITY;
  int has_nan = 0;
  for (int64_t i = lane; i < n; i += 32) {
    const A v = load_as<A>(l[i]) * inv_t;
    has_nan |= isnan(v);
    m = fmax(m, v);
  }
  m = warp_max(m);
  if (__any_sync(0xffffffffu, has_nan)) m = NAN;
  A sum = 0;
  for (int64_t i = lane; i < n; i += 32) sum += exp(load_as<A>(l[i]) * inv_t - m);
  sum = warp_sum(sum);
  for (int64_t i = lane; i < n; i += 32) o[i] = store_as<T>(exp(load_as<A>(l[i]) * inv_t - m) / sum);
}

template <typename T>
__global__ void gate_softmax_bwd_kernel(
    const T* __restrict__ grad, const T* __restrict__ s, T* __restrict__ dlogits,
    int64_t rows, int64_t n, typename Acc<T>::type inv_t) {
  using A = typename Acc<T>::type;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + (threadIdx.x >> 5);
  if (row >= rows) return;
  const int lane = threadIdx.x & 31;
  const T* g = grad + row * n;
  const T* sr = s + row * n;
  A dot = 0;
  for (int64_t i = lane; i < n; i += 32) dot += load_as<A>(g[i]) * load_as<A>(sr[i]);
  dot = warp_sum(dot);
  for (int64_t i = lane; i < n; i += 32)
    dlogits[row * n + i] = store_as<T>(load_as<A>(sr[i]) * (load_as<A>(g[i]) - dot) * inv_t);
}

int64_t blocks_for(int64_t rows) { return (rows + kRowsPerBlock - 1) / kRowsPerBlock; }

template <typename T>
cudaError_t fwd(const void* in, void* out, int64_t rows, int64_t n, double inv_t, cudaStream_t st) {
  return launch_kernel(
      "gate_softmax_fwd_kernel", gate_softmax_fwd_kernel<T>, dim3(static_cast<unsigned>(blocks_for(rows))),
      dim3(32 * kRowsPerBlock), 0, st, static_cast<const T*>(in), static_cast<T*>(out), rows, n,
      static_cast<typename Acc<T>::type>(inv_t));
}

template <typename T>
cudaError_t bwd(const void* g, const void* s, void* d, int64_t rows, int64_t n, double inv_t, cudaStream_t st) {
  return launch_kernel(
      "gate_softmax_bwd_kernel", gate_softmax_bwd_kernel<T>, dim3(static_cast<unsigned>(blocks_for(rows))),
      dim3(32 * kRowsPerBlock), 0, st, static_cast<const T*>(g), static_cast<const T*>(s),
      static_cast<T*>(d), rows, n, static_cast<typename Acc<T>::type>(inv_t));
}

}  // namespace

cudaError_t gate_softmax_forward(
    DType dtype, const void* logits, void* out, int64_t rows, int64_t n,
    double inv_temperature, cudaStream_t stream) {
  if (rows == 0 || n == 0) return cudaSuccess;
  if (blocks_for(rows) > 0x7fffffff) return cudaErrorInvalidConfiguration;
  switch (dtype) {
    case DType::kFloat16: return fwd<__half>(logits, out, rows, n, inv_temperature, stream);
    case DType::kBFloat16: return fwd<__nv_bfloat16>(logits, out, rows, n, inv_temperature, stream);
    case DType::kFloat32: return fwd<float>(logits, out, rows, n, inv_temperature, stream);
    case DType::kFloat64: return fwd<double>(logits, out, rows, n, inv_temperature, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t gate_softmax_backward(
    DType dtype, const void* grad, const void* output, void* dlogits, int64_t rows,
    int64_t n, double inv_temperature, cudaStream_t stream) {
  if (rows == 0 || n == 0) return cudaSuccess;
  if (blocks_for(rows) > 0x7fffffff) return cudaErrorInvalidConfiguration;
  switch (dtype) {
    case DType::kFloat16: return bwd<__half>(grad, output, dlogits, rows, n, inv_temperature, stream);
    case DType::kBFloat16: return bwd<__nv_bfloat16>(grad, output, dlogits, rows, n, inv_temperature, stream);
    case DType::kFloat32: return bwd<float>(grad, output, dlogits, rows, n, inv_temperature, stream);
    case DType::kFloat64: return bwd<double>(grad, output, dlogits, rows, n, inv_temperature, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace moka
