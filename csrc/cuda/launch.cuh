// How the kernels are launched and how they name their dynamic shared memory,
// in the one form both builds share: nvcc's kernel<<<...>>>, or the SIMT
// simulator of csrc/cuda/sim/ when MOKA_CUDA_SIM is defined (g++ build).
#pragma once

#include <cuda_runtime.h>

#include <utility>

namespace moka {
namespace cuda {

// kernel<<<grid, block, smem, stream>>>(args...); returns the launch error.
// `name` labels the launch in the simulator's log and error messages.
template <typename... KArgs, typename... Args>
inline cudaError_t launch_kernel(
    const char* name, void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
    Args&&... args) {
#ifdef MOKA_CUDA_SIM
  return ::moka_sim::launch_kernel(name, kernel, grid, block, smem, stream, std::forward<Args>(args)...);
#else
  (void)name;
  kernel<<<grid, block, smem, stream>>>(std::forward<Args>(args)...);
  return cudaGetLastError();
#endif
}

}  // namespace cuda
}  // namespace moka

// The CTA's dynamic shared memory as `unsigned char name[]`, 16-byte aligned.
#ifdef MOKA_CUDA_SIM
#define MOKA_DYNAMIC_SHARED(name) unsigned char* const name = ::moka_sim::dynamic_smem()
#else
#define MOKA_DYNAMIC_SHARED(name) extern __shared__ __align__(16) unsigned char name[]
#endif
