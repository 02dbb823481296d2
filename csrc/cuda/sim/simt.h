// The SIMT execution model of the CUDA simulator: compiles csrc/cuda/*.cu as
// host C++ (g++, MOKA_CUDA_SIM defined, csrc/cuda/sim/include first on the
// include path) and runs each CTA's threads as cooperative fibers.
//
// What it guarantees, so that a kernel bug shows up as a failing test:
//  - threads run between synchronization points in an order shuffled by the
//    launch seed (a missing barrier makes the result depend on the seed);
//  - __syncthreads is a CTA barrier that every live thread must reach at the
//    same call site; a thread that exits while others wait is an error;
//  - warp collectives (shfl, vote, mma.sync, ldmatrix) gather all 32 lanes,
//    check that they are at the same instruction and call site, and then
//    compute;
//  - cp.async copies poison their destination when issued and write it only
//    at the wait that retires their group;
//  - dynamic shared memory is exactly the requested size, freshly allocated
//    (AddressSanitizer sees an overrun) and filled with 0xFF (a NaN in every
//    float type) at each CTA start;
//  - launches obey the device limits and fail with the runtime's cudaError_t.
// Anything that cannot be simulated faithfully aborts with a message rather
// than silently doing something else.
#pragma once

#include <math.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <string>
#include <tuple>
#include <utility>

// ------------------------------------------------------------ qualifiers
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
// Static __shared__ variables: one instance per kernel function, which is one
// per CTA because CTAs run one after the other. (Not poisoned; the kernels put
// everything that matters in dynamic shared memory.)
#define __shared__ static
#define __constant__

// ------------------------------------------------------------ runtime types
enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidDeviceFunction = 98,
  cudaErrorLaunchOutOfResources = 701,
  cudaErrorNotSupported = 801,
};
using cudaError = cudaError_t;

enum cudaDeviceAttr : int {
  cudaDevAttrMaxThreadsPerBlock = 1,
  cudaDevAttrMaxSharedMemoryPerBlock = 8,
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrComputeCapabilityMajor = 75,
  cudaDevAttrComputeCapabilityMinor = 76,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
};

enum cudaFuncAttribute : int {
  cudaFuncAttributeMaxDynamicSharedMemorySize = 8,
};

struct CUstream_st;
using cudaStream_t = CUstream_st*;

struct uint3 { unsigned x, y, z; };
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
};
struct alignas(16) uint4 { unsigned x, y, z, w; };
struct alignas(8) uint2 { unsigned x, y; };
struct alignas(8) float2 { float x, y; };
struct alignas(16) float4 { float x, y, z, w; };
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }

namespace moka_sim {

// ------------------------------------------------------------ the device
// The simulated device; chosen once per process (MOKA_SIM_ARCH or set_arch).
struct DeviceSpec {
  const char* name;
  int cc_major, cc_minor;
  int sm_count;
  int smem_optin;  // cudaDevAttrMaxSharedMemoryPerBlockOptin, bytes
};
const DeviceSpec& device();
// "sm_80" or "sm_90"; false if unknown.
bool set_arch(const char* arch);

constexpr int kDefaultDynamicSmem = 48 * 1024;
constexpr unsigned kMaxThreadsPerBlock = 1024;
constexpr unsigned kMaxBlockDimZ = 64;
constexpr unsigned kMaxGridDimX = 0x7fffffffu;
constexpr unsigned kMaxGridDimYZ = 65535;

// Seed of the schedule shuffles (MOKA_SIM_SEED or set_seed).
void set_seed(uint64_t seed);
// With dry_run, launches are validated and logged but no CTA runs.
void set_dry_run(bool dry_run);
// Every launch is reported here (name, grid, block, dynamic smem, result).
void set_launch_log(FILE* f);

[[noreturn]] void fail(const char* fmt, ...) __attribute__((format(printf, 1, 2)));

// ------------------------------------------------------------ threads
struct Thread {
  uint3 thread_idx;
  uint3 block_idx;
  int linear;  // linear thread index in the CTA
};
Thread& this_thread();
uint3 block_dim();
uint3 grid_dim();
unsigned char* dynamic_smem();
size_t dynamic_smem_bytes();
// Fails unless [p, p + bytes) lies in the CTA's dynamic shared memory.
void check_shared(const void* p, size_t bytes, const char* what);

// Asynchronous copies (cp.async): issued copies poison their destination at
// once and write it only when a wait retires their group, so a read before
// the wait sees NaN. A thread that exits with copies it never waited for is an
// error.
void async_copy(void* dst, const void* src, size_t bytes);
void async_commit();
void async_wait(int pending_groups_allowed);

void cta_barrier(const char* file, int line);

// A warp collective: every live lane of the calling thread's warp deposits
// `in` and blocks; the last one to arrive runs compute(ins, outs, lanes) over
// all lanes (ins[l] / outs[l] point at lane l's arguments) and releases them.
// `what` and the call site must agree across lanes.
using CollectiveFn = void (*)(const void* const* ins, void* const* outs, int lanes, const void* ctx);
void warp_collective(
    const char* what, const char* file, int line, unsigned mask, const void* in, void* out,
    CollectiveFn compute, const void* ctx);

// ------------------------------------------------------------ launches
using CtaBody = std::function<void()>;
cudaError_t launch(
    const char* name, const void* func, dim3 grid, dim3 block, size_t smem, const CtaBody& body);
cudaError_t set_max_dynamic_smem(const void* func, int bytes);
void set_last_error(cudaError_t e);

}  // namespace moka_sim

#define threadIdx (::moka_sim::this_thread().thread_idx)
#define blockIdx (::moka_sim::this_thread().block_idx)
#define blockDim (::moka_sim::block_dim())
#define gridDim (::moka_sim::grid_dim())
constexpr int warpSize = 32;

inline void __syncthreads(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  ::moka_sim::cta_barrier(file, line);
}
inline void __syncwarp(unsigned = 0xffffffffu) {}
[[noreturn]] inline void __trap() { ::moka_sim::fail("__trap() called"); }

template <typename T>
inline T __ldg(const T* p) { return *p; }

template <typename T>
inline T __shfl_xor_sync(
    unsigned mask, T v, int lane_mask, int width = 32, const char* file = __builtin_FILE(),
    int line = __builtin_LINE()) {
  if (width != 32) ::moka_sim::fail("__shfl_xor_sync: only width 32 is simulated");
  struct In { T v; int lane_mask; } in{v, lane_mask};
  T out{};
  ::moka_sim::warp_collective(
      "shfl.sync.bfly", file, line, mask, &in, &out,
      [](const void* const* ins, void* const* outs, int lanes, const void*) {
        for (int l = 0; l < lanes; ++l) {
          const In& mine = *static_cast<const In*>(ins[l]);
          const int src = l ^ mine.lane_mask;
          // A source lane outside the warp returns the caller's own value.
          *static_cast<T*>(outs[l]) = src < lanes ? static_cast<const In*>(ins[src])->v : mine.v;
        }
      },
      nullptr);
  return out;
}

inline int __any_sync(
    unsigned mask, int pred, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  int out = 0;
  ::moka_sim::warp_collective(
      "vote.sync.any", file, line, mask, &pred, &out,
      [](const void* const* ins, void* const* outs, int lanes, const void*) {
        int any = 0;
        for (int l = 0; l < lanes; ++l) any |= *static_cast<const int*>(ins[l]) != 0;
        for (int l = 0; l < lanes; ++l) *static_cast<int*>(outs[l]) = any;
      },
      nullptr);
  return out;
}

inline int __all_sync(
    unsigned mask, int pred, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  int out = 0;
  ::moka_sim::warp_collective(
      "vote.sync.all", file, line, mask, &pred, &out,
      [](const void* const* ins, void* const* outs, int lanes, const void*) {
        int all = 1;
        for (int l = 0; l < lanes; ++l) all &= *static_cast<const int*>(ins[l]) != 0;
        for (int l = 0; l < lanes; ++l) *static_cast<int*>(outs[l]) = all;
      },
      nullptr);
  return out;
}

// ------------------------------------------------------------ runtime API
cudaError_t cudaGetDevice(int* dev);
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int dev);
cudaError_t cudaGetLastError();
cudaError_t cudaPeekAtLastError();
const char* cudaGetErrorString(cudaError_t e);
const char* cudaGetErrorName(cudaError_t e);

// The fields of the runtime's cudaFuncAttributes the kernels read.
struct cudaFuncAttributes {
  size_t sharedSizeBytes;
};

// Static __shared__ variables live outside the simulated shared memory
// (above), so a kernel's static size is 0 here: its whole opt-in limit is
// dynamic, as for a kernel without __shared__ variables on the device.
template <typename... Args>
cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attr, void (*)(Args...)) {
  *attr = cudaFuncAttributes{0};
  return cudaSuccess;
}

template <typename... Args>
cudaError_t cudaFuncSetAttribute(void (*func)(Args...), cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaErrorInvalidValue;
  return ::moka_sim::set_max_dynamic_smem(reinterpret_cast<const void*>(func), value);
}

namespace moka_sim {

// The simulated kernel<<<grid, block, smem, stream>>>(args...): arguments are
// copied once, as the launch copies them to the constant bank, and every
// thread calls the kernel on that copy.
template <typename... KArgs, typename... Args>
cudaError_t launch_kernel(
    const char* name, void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t,
    Args&&... args) {
  std::tuple<std::decay_t<KArgs>...> params(std::forward<Args>(args)...);
  const cudaError_t err = launch(
      name, reinterpret_cast<const void*>(kernel), grid, block, smem,
      [&]() { std::apply(kernel, params); });
  set_last_error(err);
  return err;
}

}  // namespace moka_sim
