// Fragment tables of the simulator: which matrix element each (lane, value)
// of a warp holds, for mma.sync and ldmatrix. A value indexes the 16-bit elements of a
// lane's registers in order (value v is half v % 2, low half first, of register
// v / 2; for float accumulators, register v). Written from the PTX ISA and
// checked against CUTLASS/CuTe's SM80 MMA traits by cute_check.cpp, so the
// simulator cannot share a misunderstanding with the kernels. Self-contained:
// cute_check.cpp includes it next to the real CUDA headers.
#pragma once

namespace moka_sim {

struct RowCol {
  int row, col;
};

// mma m16n8k16, A (16 x 16, row major): value v in 0..7.
inline RowCol mma16816_a(int lane, int v) {
  const int gid = lane / 4, tig = lane % 4;
  return {gid + 8 * ((v / 2) % 2), 2 * tig + v % 2 + 8 * (v / 4)};
}
// B (16 x 8, K x N): value v in 0..3 -> (k, n).
inline RowCol mma16816_b(int lane, int v) {
  const int gid = lane / 4, tig = lane % 4;
  return {2 * tig + v % 2 + 8 * (v / 2), gid};
}
// C and D (16 x 8): value v in 0..3 (float registers) -> (m, n).
inline RowCol mma16816_c(int lane, int v) {
  const int gid = lane / 4, tig = lane % 4;
  return {gid + 8 * (v / 2), 2 * tig + v % 2};
}

// ldmatrix.m8n8.b16 (.x1/.x2/.x4): register `reg` of lane `lane` holds, in
// half `half`, element `col` of the 8-element row whose address lane
// `row_lane` supplied (lanes 8 reg .. 8 reg + 7 give the rows of matrix reg).
// With .trans the matrix arrives transposed.
struct LdmatrixSource {
  int row_lane, col;
};
inline LdmatrixSource ldmatrix_source(int lane, int reg, int half, bool trans) {
  if (!trans) return {8 * reg + lane / 4, 2 * (lane % 4) + half};
  return {8 * reg + 2 * (lane % 4) + half, lane / 4};
}

}  // namespace moka_sim
