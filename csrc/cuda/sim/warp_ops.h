// The simulator's models of the warp-wide PTX instructions of csrc/cuda/ptx.cuh:
// gather every lane's operands through the fragment tables of fragments.h,
// compute, scatter the results back.
#pragma once

#include <cstdint>
#include <cstring>

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

struct LdmatrixIn {
  const void* row;
  int num;
  bool trans;
};

inline void ldmatrix_compute(const void* const* ins, void* const* outs, int lanes, const void*) {
  if (lanes != 32) fail("ldmatrix needs a full warp of 32 lanes, got %d", lanes);
  const LdmatrixIn& first = *static_cast<const LdmatrixIn*>(ins[0]);
  for (int l = 0; l < 32; ++l) {
    const LdmatrixIn& in = *static_cast<const LdmatrixIn*>(ins[l]);
    if (in.num != first.num || in.trans != first.trans) fail("ldmatrix: lanes disagree on .num/.trans");
    if (l < 8 * first.num) {
      if (reinterpret_cast<uintptr_t>(in.row) % 16) fail("ldmatrix: lane %d's row address %p is not 16-byte aligned", l, in.row);
      check_shared(in.row, 16, "ldmatrix row");
    }
  }
  for (int l = 0; l < 32; ++l) {
    uint32_t* r = static_cast<uint32_t*>(outs[l]);
    for (int reg = 0; reg < first.num; ++reg) {
      uint32_t v = 0;
      for (int half = 0; half < 2; ++half) {
        const LdmatrixSource src = ldmatrix_source(l, reg, half, first.trans);
        const unsigned char* row = static_cast<const unsigned char*>(static_cast<const LdmatrixIn*>(ins[src.row_lane])->row);
        unsigned short e;
        std::memcpy(&e, row + 2 * src.col, 2);
        v |= uint32_t(e) << (16 * half);
      }
      r[reg] = v;
    }
  }
}

// ldmatrix.sync.aligned.m8n8.x{num}[.trans].shared.b16 into r[0 .. num).
inline void ldmatrix(uint32_t* r, int num, bool trans, const void* row, const char* file = __builtin_FILE(),
                     int line = __builtin_LINE()) {
  const LdmatrixIn in{row, num, trans};
  uint32_t out[4] = {0, 0, 0, 0};
  warp_collective(trans ? "ldmatrix.trans" : "ldmatrix", file, line, 0xffffffffu, &in, out, ldmatrix_compute, nullptr);
  for (int i = 0; i < num; ++i) r[i] = out[i];
}

}  // namespace moka_sim
