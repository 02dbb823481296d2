// Checks the simulator's tensor-core fragment tables (warp_ops.h) against
// CUTLASS/CuTe's SM80 MMA traits, an independent statement of the same PTX
// layouts: for every (lane, value) of A, B and C/D of mma.sync m16n8k16 with
// bf16 and f16 operands, CuTe's (thread, value) -> coordinate layout must give
// the simulator's (row, column). Built by python_tests/cuda_sim.py against the
// nvidia-cutlass wheel's headers; prints one line per mismatch, exits 1 on any.
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

}  // namespace

int main() {
  check<cute::MMA_Traits<cute::SM80_16x8x16_F32BF16BF16F32_TN>>("SM80_16x8x16_F32BF16BF16F32_TN");
  check<cute::MMA_Traits<cute::SM80_16x8x16_F32F16F16F32_TN>>("SM80_16x8x16_F32F16F16F32_TN");
  return mismatches ? 1 : 0;
}
