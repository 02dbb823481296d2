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

// In the simulator every instruction also takes its caller's source position
// (filled in by default arguments), so that lanes of one warp at different
// call sites are reported instead of being paired up.
#ifdef MOKA_CUDA_SIM
#define MOKA_PTX_SITE , const char *site_file = __builtin_FILE(), int site_line = __builtin_LINE()
#define MOKA_PTX_SITE_SPEC , const char *site_file, int site_line
#define MOKA_PTX_AT , site_file, site_line
#else
#define MOKA_PTX_SITE
#define MOKA_PTX_SITE_SPEC
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
__device__ inline void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2] MOKA_PTX_SITE);

template <>
__device__ inline void mma_m16n8k16<__nv_bfloat16>(
    float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2] MOKA_PTX_SITE_SPEC) {
#if defined(MOKA_CUDA_SIM)
  ::moka_sim::mma_m16n8k16_f32(::moka_sim::MmaType::kBF16, d, a, b MOKA_PTX_AT);
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
__device__ inline void mma_m16n8k16<__half>(
    float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2] MOKA_PTX_SITE_SPEC) {
#if defined(MOKA_CUDA_SIM)
  ::moka_sim::mma_m16n8k16_f32(::moka_sim::MmaType::kF16, d, a, b MOKA_PTX_AT);
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

#if !defined(MOKA_CUDA_SIM)
__device__ inline uint32_t shared_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
#endif

// ldmatrix.sync.aligned.m8n8.x4.shared.b16: four 8 x 8 16-bit matrices; lane
// 8 i + j gives the address of row j of matrix i (16 bytes, 16-byte aligned),
// and register i of lane l receives row l / 4, columns 2 (l % 4) .. + 1 of
// matrix i (with .trans: column l / 4, rows 2 (l % 4) .. + 1).
__device__ inline void ldmatrix_x4(uint32_t (&r)[4], const void* row MOKA_PTX_SITE) {
#if defined(MOKA_CUDA_SIM)
  ::moka_sim::ldmatrix(r, 4, false, row MOKA_PTX_AT);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 750
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(shared_address(row)));
#else
  __trap();
#endif
}

__device__ inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row MOKA_PTX_SITE) {
#if defined(MOKA_CUDA_SIM)
  ::moka_sim::ldmatrix(r, 4, true, row MOKA_PTX_AT);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 750
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(shared_address(row)));
#else
  __trap();
#endif
}

__device__ inline void ldmatrix_x2(uint32_t (&r)[2], const void* row MOKA_PTX_SITE) {
#if defined(MOKA_CUDA_SIM)
  ::moka_sim::ldmatrix(r, 2, false, row MOKA_PTX_AT);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 750
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(shared_address(row)));
#else
  __trap();
#endif
}

// cp.async.cg.shared.global [dst], [src], 16: an asynchronous 16-byte copy
// (both addresses 16-byte aligned) that is complete only after the
// cp_async_wait that retires its commit group.
__device__ inline void cp_async_16(void* smem_dst, const void* gmem_src) {
#if defined(MOKA_CUDA_SIM)
  ::moka_sim::async_copy(smem_dst, gmem_src, 16);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(shared_address(smem_dst)), "l"(gmem_src));
#else
  __trap();
#endif
}

// cp.async.commit_group: closes the group of this thread's copies so far.
__device__ inline void cp_async_commit() {
#if defined(MOKA_CUDA_SIM)
  ::moka_sim::async_commit();
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}

// cp.async.wait_group N: waits until at most N of this thread's committed
// groups are pending (other threads' copies need a __syncthreads after it).
template <int N>
__device__ inline void cp_async_wait() {
#if defined(MOKA_CUDA_SIM)
  ::moka_sim::async_wait(N);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

}  // namespace ptx
}  // namespace cuda
}  // namespace moka

#undef MOKA_PTX_SITE
#undef MOKA_PTX_SITE_SPEC
#undef MOKA_PTX_AT
