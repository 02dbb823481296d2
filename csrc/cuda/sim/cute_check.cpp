// Checks the simulator's fragment tables (fragments.h) against CUTLASS/CuTe,
// an independent statement of the same PTX layouts: for every (lane, value)
// of A, B and C/D of mma.sync m16n8k16 with bf16 and f16 operands, CuTe's SM80
// MMA traits (thread, value) -> coordinate must give the simulator's (row,
// column); for ldmatrix x1/x2/x4 with and without .trans, CuTe's SM75 copy
// traits must send every destination bit to the simulator's source row and
// element. Built by python_tests/cuda_sim.py against the
// nvidia-cutlass wheel's headers; prints one line per mismatch, exits 1 on any.
#include <cute/atom/copy_traits_sm75.hpp>
#include <cute/atom/mma_traits_sm80.hpp>
#include <cute/layout.hpp>

#include <cstdio>

#include "fragments.h"

namespace {

int mismatches = 0;

void expect(const char* what, int lane, int v, moka_sim::RowCol sim, int row, int col) {
  if (sim.row == row && sim.col == col) return;
  ++mismatches;
  std::printf("%s lane %d value %d: simulator (%d, %d), CuTe (%d, %d)\n", what, lane, v, sim.row, sim.col, row, col);
}

template <typename Traits>
void check(const char* name) {
  using namespace cute;
  // CuTe's layouts map (thread, value) to a column-major index into the
  // (M, K), (N, K) and (M, N) operand shapes.
  const auto a = typename Traits::ALayout{};
  const auto b = typename Traits::BLayout{};
  const auto c = typename Traits::CLayout{};
  static_assert(size<0>(typename Traits::ALayout{}) == 32 && size<1>(typename Traits::ALayout{}) == 8, "A: 32 x 8");
  static_assert(size<1>(typename Traits::BLayout{}) == 4 && size<1>(typename Traits::CLayout{}) == 4, "B, C: 32 x 4");
  char what[96];
  for (int lane = 0; lane < 32; ++lane) {
    for (int v = 0; v < 8; ++v) {
      const int idx = a(lane, v);
      std::snprintf(what, sizeof what, "%s A", name);
      expect(what, lane, v, moka_sim::mma16816_a(lane, v), idx % 16, idx / 16);
    }
    for (int v = 0; v < 4; ++v) {
      const int ib = b(lane, v);  // n + 8 k
      std::snprintf(what, sizeof what, "%s B", name);
      expect(what, lane, v, moka_sim::mma16816_b(lane, v), ib / 8, ib % 8);
      const int ic = c(lane, v);  // m + 16 n
      std::snprintf(what, sizeof what, "%s C", name);
      expect(what, lane, v, moka_sim::mma16816_c(lane, v), ic % 16, ic / 16);
    }
  }
  std::printf("%s: %s\n", name, mismatches ? "MISMATCH" : "A, B and C/D fragments match");
}

// CuTe's ldmatrix traits map (source thread, bit of its 128-bit row) and
// (destination thread, bit of its registers) to one bit index; so a
// destination bit's source row is index / 128 and its element (index % 128) / 16.
template <typename Traits>
void check_ldmatrix(const char* name, int num, bool trans) {
  using namespace cute;
  const auto dst = typename Traits::DstLayout{};
  const auto src = typename Traits::SrcLayout{};
  static_assert(size<1>(typename Traits::SrcLayout{}) == 128, "a source row is 128 bits");
  const int before = mismatches;
  if (int(size<1>(dst)) != 32 * num) {
    ++mismatches;
    std::printf("%s: %d destination bits per thread, expected %d\n", name, int(size<1>(dst)), 32 * num);
    return;
  }
  for (int t = 0; t < 8 * num; ++t)  // the source rows are the lanes' 128-bit rows, in lane order
    if (int(src(t, 0)) != 128 * t) ++mismatches, std::printf("%s: source lane %d row at bit %d\n", name, t, int(src(t, 0)));
  for (int lane = 0; lane < 32; ++lane) {
    for (int v = 0; v < 32 * num; ++v) {
      const int bit = dst(lane, v);
      const int reg = v / 32, half = (v % 32) / 16;
      const moka_sim::LdmatrixSource s = moka_sim::ldmatrix_source(lane, reg, half, trans);
      if (s.row_lane != bit / 128 || s.col != (bit % 128) / 16 || v % 16 != bit % 16) {
        ++mismatches;
        std::printf("%s lane %d register %d bit %d: simulator row %d element %d, CuTe row %d element %d bit %d\n",
                    name, lane, reg, v % 32, s.row_lane, s.col, bit / 128, (bit % 128) / 16, bit % 16);
      }
    }
  }
  std::printf("%s: %s\n", name, mismatches > before ? "MISMATCH" : "ldmatrix sources match");
}

}  // namespace

int main() {
  check<cute::MMA_Traits<cute::SM80_16x8x16_F32BF16BF16F32_TN>>("SM80_16x8x16_F32BF16BF16F32_TN");
  check<cute::MMA_Traits<cute::SM80_16x8x16_F32F16F16F32_TN>>("SM80_16x8x16_F32F16F16F32_TN");
  check_ldmatrix<cute::Copy_Traits<cute::SM75_U32x1_LDSM_N>>("SM75_U32x1_LDSM_N", 1, false);
  check_ldmatrix<cute::Copy_Traits<cute::SM75_U32x2_LDSM_N>>("SM75_U32x2_LDSM_N", 2, false);
  check_ldmatrix<cute::Copy_Traits<cute::SM75_U32x4_LDSM_N>>("SM75_U32x4_LDSM_N", 4, false);
  check_ldmatrix<cute::Copy_Traits<cute::SM75_U16x2_LDSM_T>>("SM75_U16x2_LDSM_T", 1, true);
  check_ldmatrix<cute::Copy_Traits<cute::SM75_U16x4_LDSM_T>>("SM75_U16x4_LDSM_T", 2, true);
  check_ldmatrix<cute::Copy_Traits<cute::SM75_U16x8_LDSM_T>>("SM75_U16x8_LDSM_T", 4, true);
  return mismatches ? 1 : 0;
}
