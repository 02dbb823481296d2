// CPU kernels of kron_mix, kron_mix_add and kron_mix_backward.
//
// Tokens are processed in tiles small enough that a tile's input, output and
// the per-component intermediate stay in L2; threads take contiguous runs of
// tiles (at::parallel_for). Within a tile, group j's tokens are laid out
// "factor-major": Xp[a, t, b] = x[t, a*nb + b]. In that layout both products of
// Y_t = A X_t B^T become one GEMM over the whole tile,
//   W  = A @ Xp            (ma, na) x (na, n*nb)        -> (ma, n*nb)
//   Yp += g * W' @ B^T     (ma*n, nb) x (nb, mb)        -> (ma*n, mb)
// so only the input and the output are transposed, once per group, and the
// components of a group accumulate into Yp in the GEMM itself. Nothing of size
// tokens x components is ever written out. Low-precision inputs are widened to
// float32 tile by tile (at::opmath_type), float64 stays float64.
#include "../validate.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

namespace moka {
namespace {

// Tokens per tile: about 64K accumulator elements per buffer (256 KiB in
// float32), at least 1, at most 64.
int64_t tile_tokens(const KronMixShape& s) {
  int64_t width = std::max<int64_t>({s.in, s.out, 1});
  for (const auto& g : s.groups) width = std::max(width, g.ma * g.nb);
  return std::clamp<int64_t>((int64_t{1} << 16) / width, 1, 64);
}

at::ScalarType acc_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// Factors of every group in the accumulation dtype, contiguous, and the gates
// as doubles (they are read as GEMM scalars).
struct Operands {
  std::vector<at::Tensor> A, B;
  std::vector<double> gates;
};

Operands widen(
    at::TensorList A,
    at::TensorList B,
    const at::Tensor& gates,
    at::ScalarType acc) {
  Operands o;
  for (size_t j = 0; j < A.size(); ++j) {
    o.A.push_back(A[j].to(acc).contiguous());
    o.B.push_back(B[j].to(acc).contiguous());
  }
  auto g = gates.to(at::kDouble).contiguous();
  o.gates.assign(g.data_ptr<double>(), g.data_ptr<double>() + g.numel());
  return o;
}

// Xp[a, t, b] = x_tile[t, a*nb + b], widened to `acc`.
at::Tensor factor_major(const at::Tensor& tile, int64_t p, int64_t q, at::ScalarType acc) {
  const int64_t n = tile.size(0);
  auto out = at::empty({p, n, q}, tile.options().dtype(acc));
  out.copy_(tile.view({n, p, q}).transpose(0, 1));
  return out;
}

// y (tokens, out) = [base +] sum over groups and components.
void forward_into(
    at::Tensor& y,
    const at::Tensor& x2d,
    const KronMixShape& s,
    const Operands& ops) {
  const auto acc = acc_type(x2d.scalar_type());
  const int64_t tile = tile_tokens(s);
  const int64_t n_tiles = (s.tokens + tile - 1) / tile;
  at::parallel_for(0, n_tiles, 1, [&](int64_t begin, int64_t end) {
    at::AutoDispatchBelowADInplaceOrView guard;
    for (int64_t it = begin; it < end; ++it) {
      const int64_t t0 = it * tile;
      const int64_t n = std::min(tile, s.tokens - t0);
      auto x_tile = x2d.narrow(0, t0, n);
      auto y_tile = y.narrow(0, t0, n);
      // The output tile, in acc dtype; y already holds base (or zeros).
      auto y_acc = y_tile.scalar_type() == acc ? y_tile : y_tile.to(acc);
      for (size_t j = 0; j < s.groups.size(); ++j) {
        const auto& g = s.groups[j];
        auto Xp = factor_major(x_tile, g.na, g.nb, acc).view({g.na, n * g.nb});
        auto Yp = at::zeros({g.ma * n, g.mb}, Xp.options());
        for (int64_t k = 0; k < g.r; ++k) {
          auto W = at::mm(ops.A[j][k], Xp).view({g.ma * n, g.nb});
          Yp.addmm_(W, ops.B[j][k].t(), 1.0, ops.gates[g.gate_offset + k]);
        }
        y_acc.view({n, g.ma, g.mb}).add_(Yp.view({g.ma, n, g.mb}).transpose(0, 1));
      }
      if (!y_acc.is_same(y_tile)) y_tile.copy_(y_acc);
    }
  });
}

at::Tensor flat_tokens(const at::Tensor& t, const KronMixShape& s, int64_t width) {
  return t.reshape({s.tokens, width}).contiguous();
}

std::vector<int64_t> out_sizes(const at::Tensor& x, int64_t out) {
  std::vector<int64_t> sizes(x.sizes().begin(), x.sizes().end());
  sizes.back() = out;
  return sizes;
}

at::Tensor kron_mix_cpu(
    const at::Tensor& x,
    at::TensorList A,
    at::TensorList B,
    const at::Tensor& gates) {
  const auto s = check_kron_mix_args("kron_mix", x, A, B, gates);
  auto y = at::zeros({s.tokens, s.out}, x.options());
  forward_into(y, flat_tokens(x, s, s.in), s, widen(A, B, gates, acc_type(x.scalar_type())));
  return y.view(out_sizes(x, s.out));
}

at::Tensor kron_mix_add_cpu(
    const at::Tensor& base,
    const at::Tensor& x,
    at::TensorList A,
    at::TensorList B,
    const at::Tensor& gates) {
  const auto s = check_kron_mix_args("kron_mix_add", x, A, B, gates);
  check_like_output("kron_mix_add", "base", base, x, s.out);
  auto y = base.reshape({s.tokens, s.out}).clone(at::MemoryFormat::Contiguous);
  forward_into(y, flat_tokens(x, s, s.in), s, widen(A, B, gates, acc_type(x.scalar_type())));
  return y.view(out_sizes(x, s.out));
}

// Backward with the intermediate recomputed per tile (only x is saved):
//   W  = A Xp                 G_B += dYp^T W         (ungated dB)
//   P  = dYp B                G_A += P Xp^T          (ungated dA)
//   dXp += g A^T P
// then dA = g G_A, dB = g G_B and dg = <A, G_A> (= sum_t <dY_t, A X_t B^T>).
// G_A and G_B are summed per chunk of tiles and reduced in chunk order, so the
// result is deterministic for a given thread count.
std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor>
kron_mix_backward_cpu(
    const at::Tensor& grad_y,
    const at::Tensor& x,
    at::TensorList A,
    at::TensorList B,
    const at::Tensor& gates) {
  const auto s = check_kron_mix_args("kron_mix_backward", x, A, B, gates);
  check_like_output("kron_mix_backward", "grad_y", grad_y, x, s.out);
  const auto acc = acc_type(x.scalar_type());
  const auto ops = widen(A, B, gates, acc);
  const auto x2d = flat_tokens(x, s, s.in);
  const auto gy2d = flat_tokens(grad_y, s, s.out);
  auto gx = at::zeros({s.tokens, s.in}, x.options());

  const int64_t tile = tile_tokens(s);
  const int64_t n_tiles = (s.tokens + tile - 1) / tile;
  const int64_t n_chunks = std::max<int64_t>(
      1, std::min<int64_t>(at::get_num_threads(), n_tiles));
  // Per chunk and group: G_A (chunks, r, ma, na), G_B (chunks, r, mb, nb).
  std::vector<at::Tensor> GA, GB;
  for (size_t j = 0; j < s.groups.size(); ++j) {
    const auto& g = s.groups[j];
    GA.push_back(at::zeros({n_chunks, g.r, g.ma, g.na}, x.options().dtype(acc)));
    GB.push_back(at::zeros({n_chunks, g.r, g.mb, g.nb}, x.options().dtype(acc)));
  }

  at::parallel_for(0, n_chunks, 1, [&](int64_t c_begin, int64_t c_end) {
    at::AutoDispatchBelowADInplaceOrView guard;
    for (int64_t c = c_begin; c < c_end; ++c) {
      const int64_t it_begin = c * n_tiles / n_chunks;
      const int64_t it_end = (c + 1) * n_tiles / n_chunks;
      for (int64_t it = it_begin; it < it_end; ++it) {
        const int64_t t0 = it * tile;
        const int64_t n = std::min(tile, s.tokens - t0);
        auto x_tile = x2d.narrow(0, t0, n);
        auto gy_tile = gy2d.narrow(0, t0, n);
        auto gx_tile = gx.narrow(0, t0, n);
        auto gx_acc = gx_tile.scalar_type() == acc ? gx_tile : gx_tile.to(acc);
        for (size_t j = 0; j < s.groups.size(); ++j) {
          const auto& g = s.groups[j];
          auto Xp = factor_major(x_tile, g.na, g.nb, acc).view({g.na, n * g.nb});
          auto dYp = factor_major(gy_tile, g.ma, g.mb, acc).view({g.ma * n, g.mb});
          auto dXp = at::zeros({g.na, n * g.nb}, Xp.options());
          for (int64_t k = 0; k < g.r; ++k) {
            const auto& Ak = ops.A[j][k];
            auto W = at::mm(Ak, Xp).view({g.ma * n, g.nb});
            GB[j][c][k].addmm_(dYp.t(), W);
            auto P = at::mm(dYp, ops.B[j][k]).view({g.ma, n * g.nb});
            GA[j][c][k].addmm_(P, Xp.t());
            dXp.addmm_(Ak.t(), P, 1.0, ops.gates[g.gate_offset + k]);
          }
          gx_acc.view({n, g.na, g.nb}).add_(dXp.view({g.na, n, g.nb}).transpose(0, 1));
        }
        if (!gx_acc.is_same(gx_tile)) gx_tile.copy_(gx_acc);
      }
    }
  });

  std::vector<at::Tensor> gA, gB;
  auto g_acc = at::empty({s.components}, x.options().dtype(acc));
  for (size_t j = 0; j < s.groups.size(); ++j) {
    const auto& g = s.groups[j];
    auto ga = GA[j].sum(0);  // (r, ma, na), ungated
    auto gb = GB[j].sum(0);
    auto gv = gates.narrow(0, g.gate_offset, g.r).to(acc).view({g.r, 1, 1});
    g_acc.narrow(0, g.gate_offset, g.r).copy_((ga * ops.A[j]).sum({1, 2}));
    gA.push_back((ga * gv).to(x.scalar_type()));
    gB.push_back((gb * gv).to(x.scalar_type()));
  }
  return {gx.view(x.sizes()), gA, gB, g_acc.to(x.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(moka, CPU, m) {
  m.impl("kron_mix", kron_mix_cpu);
  m.impl("kron_mix_add", kron_mix_add_cpu);
  m.impl("kron_mix_backward", kron_mix_backward_cpu);
}

}  // namespace moka
