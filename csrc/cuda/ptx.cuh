// The PTX instructions the kernels use, one inline function each. The CUDA
// build emits the instruction; the simulator build (MOKA_CUDA_SIM) calls its
// warp-collective model in csrc/cuda/sim/warp_ops.h, whose fragment tables
// are checked against CUTLASS/CuTe. A new instruction gets a function here
// and a model there.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#ifdef MOKA_CUDA_SIM
#include "sim/warp_ops.h"
#endif

namespace moka {
namespace cuda {
namespace ptx {

// mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}: d += a(16x16) b(16x8),
// float32 accumulate; the operands are the warp's fragments (PTX ISA layout:
// gid = lane / 4, tig = lane % 4; a: rows gid | gid+8, cols 2tig..+1 |
// 2tig+8..+9; b: k = 2tig..+1 | 2tig+8..+9, n = gid; d: rows gid | gid+8,
// cols 2tig..+1).
template <typename T>
__device__ inline void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]);

template <>
__device__ inline void mma_m16n8k16<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(MOKA_CUDA_SIM)
  ::moka_sim::mma_m16n8k16_f32(::moka_sim::MmaType::kBF16, d, a, b);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
      "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
  __trap();  // the extension is only built for sm_80 and newer
#endif
}

template <>
__device__ inline void mma_m16n8k16<__half>(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(MOKA_CUDA_SIM)
  ::moka_sim::mma_m16n8k16_f32(::moka_sim::MmaType::kF16, d, a, b);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
      "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
  __trap();
#endif
}

}  // namespace ptx
}  // namespace cuda
}  // namespace moka
