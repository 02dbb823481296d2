// The simulator's models of the warp-wide PTX instructions of csrc/cuda/ptx.cuh:
// gather every lane's operands through the fragment tables of fragments.h,
// compute, scatter the results back.
#pragma once

#include <cstdint>

#include "fragments.h"
#include "half_types.h"
#include "simt.h"

namespace moka_sim {

enum class MmaType { kF16, kBF16 };

inline float half_value(MmaType t, uint32_t reg, int half) {
  const unsigned short bits = static_cast<unsigned short>(half ? reg >> 16 : reg & 0xffffu);
  return t == MmaType::kBF16 ? __bfloat162float(__nv_bfloat16{bits}) : __half2float(__half{bits});
}

struct MmaIn {
  MmaType type;
  const uint32_t* a;
  const uint32_t* b;
  const float* c;
};

// The products of 16-bit values are exact in float; the simulator sums them
// with C in double and rounds once (hardware may round differently in the
// last bits; the tests' tolerances allow for that, the tables must be exact).
inline void mma16816_compute(const void* const* ins, void* const* outs, int lanes, const void*) {
  if (lanes != 32) fail("mma.sync needs a full warp of 32 lanes, got %d", lanes);
  float A[16][16], B[16][8], C[16][8];
  const MmaType type = static_cast<const MmaIn*>(ins[0])->type;
  for (int l = 0; l < 32; ++l) {
    const MmaIn& in = *static_cast<const MmaIn*>(ins[l]);
    if (in.type != type) fail("mma.sync: lanes disagree on the operand type");
    for (int v = 0; v < 8; ++v) {
      const RowCol rc = mma16816_a(l, v);
      A[rc.row][rc.col] = half_value(type, in.a[v / 2], v % 2);
    }
    for (int v = 0; v < 4; ++v) {
      const RowCol rc = mma16816_b(l, v);
      B[rc.row][rc.col] = half_value(type, in.b[v / 2], v % 2);
      const RowCol cc = mma16816_c(l, v);
      C[cc.row][cc.col] = in.c[v];
    }
  }
  for (int l = 0; l < 32; ++l) {
    float* d = static_cast<float*>(outs[l]);
    for (int v = 0; v < 4; ++v) {
      const RowCol rc = mma16816_c(l, v);
      double s = C[rc.row][rc.col];
      for (int k = 0; k < 16; ++k) s += double(A[rc.row][k]) * double(B[k][rc.col]);
      d[v] = static_cast<float>(s);
    }
  }
}

inline void mma_m16n8k16_f32(
    MmaType type, float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
    const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  const float c[4] = {d[0], d[1], d[2], d[3]};
  const MmaIn in{type, a, b, c};
  warp_collective(
      type == MmaType::kBF16 ? "mma.sync.m16n8k16.f32.bf16" : "mma.sync.m16n8k16.f32.f16", file, line,
      0xffffffffu, &in, d, mma16816_compute, nullptr);
}

}  // namespace moka_sim
