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

// MKL (which torch's x86 wheels carry) keeps its own thread count: a GEMM
// called from inside our at::parallel_for would start a second team per
// thread, and on a loaded machine those spinning teams turned a 28 ms call
// into 5 s (measured). The per-thread override keeps nested GEMMs sequential;
// the symbol is weak, so builds without MKL simply skip it.
extern "C" int MKL_Set_Num_Threads_Local(int) __attribute__((weak));

namespace moka {
namespace {

// Sequential BLAS on this thread for the guard's lifetime.
struct SequentialBlas {
  int previous = 0;
  SequentialBlas() {
    if (MKL_Set_Num_Threads_Local) previous = MKL_Set_Num_Threads_Local(1);
  }
  ~SequentialBlas() {
    if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(previous);
  }
};

// Largest ma*nb over the groups: the width of the per-token intermediate W.
int64_t intermediate_width(const KronMixShape& s) {
  int64_t w = 1;
  for (const auto& g : s.groups) w = std::max(w, g.ma * g.nb);
  return w;
}

// Tokens per tile: about 128K accumulator elements per buffer (512 KiB in
// float32; a forward tile's three buffers fit a 2 MiB L2), 1 to 256 tokens.
// Large tiles matter for narrow layers, where per-GEMM call overhead dominates.
int64_t tile_tokens(const KronMixShape& s) {
  const int64_t width = std::max<int64_t>({s.in, s.out, intermediate_width(s)});
  return std::clamp<int64_t>((int64_t{1} << 17) / width, 1, 256);
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

// A thread's scratch, allocated once per parallel chunk and viewed per tile:
// fresh tile-sized allocations would each be a new mapping and its page faults.
at::Tensor scratch(const at::Tensor& like, at::ScalarType acc, int64_t numel) {
  return at::empty({numel}, like.options().dtype(acc));
}

// Xp[a, t, b] = tile[t, a*q + b], into `buf` (widening to its dtype).
at::Tensor factor_major(const at::Tensor& buf, const at::Tensor& tile, int64_t p, int64_t q) {
  const int64_t n = tile.size(0);
  auto out = buf.narrow(0, 0, p * n * q).view({p, n, q});
  out.copy_(tile.view({n, p, q}).transpose(0, 1));
  return out.view({p, n * q});
}

// y (tokens, out) = [y +] sum over groups and components: with `accumulate`
// y holds base, else it is uninitialized and the first group writes it.
void forward_into(
    at::Tensor& y,
    const at::Tensor& x2d,
    const KronMixShape& s,
    const Operands& ops,
    bool accumulate) {
  const auto acc = accumulate_dtype(x2d.scalar_type());
  const bool widen_y = y.scalar_type() != acc;
  const int64_t tile = tile_tokens(s);
  const int64_t n_tiles = (s.tokens + tile - 1) / tile;
  const int64_t w_width = intermediate_width(s);
  at::parallel_for(0, n_tiles, 1, [&](int64_t begin, int64_t end) {
    at::AutoDispatchBelowADInplaceOrView guard;
    SequentialBlas sequential_blas;
    auto xp_buf = scratch(x2d, acc, tile * s.in);
    auto w_buf = scratch(x2d, acc, tile * w_width);
    auto yp_buf = scratch(x2d, acc, tile * s.out);
    auto acc_buf = widen_y ? scratch(x2d, acc, tile * s.out) : at::Tensor();
    for (int64_t it = begin; it < end; ++it) {
      const int64_t t0 = it * tile;
      const int64_t n = std::min(tile, s.tokens - t0);
      auto x_tile = x2d.narrow(0, t0, n);
      auto y_tile = y.narrow(0, t0, n);
      auto y_acc = y_tile;
      if (widen_y) {
        y_acc = acc_buf.narrow(0, 0, n * s.out).view({n, s.out});
        if (accumulate) y_acc.copy_(y_tile);
      }
      for (size_t j = 0; j < s.groups.size(); ++j) {
        const auto& g = s.groups[j];
        auto Xp = factor_major(xp_buf, x_tile, g.na, g.nb);
        auto W = w_buf.narrow(0, 0, g.ma * n * g.nb).view({g.ma, n * g.nb});
        auto Yp = yp_buf.narrow(0, 0, g.ma * n * g.mb).view({g.ma * n, g.mb});
        for (int64_t k = 0; k < g.r; ++k) {
          at::mm_out(W, ops.A[j][k], Xp);
          // beta = 0 on the first component: Yp's old contents are ignored.
          Yp.addmm_(W.view({g.ma * n, g.nb}), ops.B[j][k].t(), k == 0 ? 0.0 : 1.0,
                    ops.gates[g.gate_offset + k]);
        }
        auto Yt = Yp.view({g.ma, n, g.mb}).transpose(0, 1);
        if (j == 0 && !accumulate) {
          y_acc.view({n, g.ma, g.mb}).copy_(Yt);
        } else {
          y_acc.view({n, g.ma, g.mb}).add_(Yt);
        }
      }
      if (widen_y) y_tile.copy_(y_acc);
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
  auto y = at::empty({s.tokens, s.out}, x.options());
  forward_into(y, flat_tokens(x, s, s.in), s, widen(A, B, gates, accumulate_dtype(x.scalar_type())), false);
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
  forward_into(y, flat_tokens(x, s, s.in), s, widen(A, B, gates, accumulate_dtype(x.scalar_type())), true);
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
  const auto acc = accumulate_dtype(x.scalar_type());
  const auto ops = widen(A, B, gates, acc);
  const auto x2d = flat_tokens(x, s, s.in);
  const auto gy2d = flat_tokens(grad_y, s, s.out);
  auto gx = at::empty({s.tokens, s.in}, x.options());  // the first group writes it

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

  const bool widen_x = x.scalar_type() != acc;
  const int64_t w_width = intermediate_width(s);
  at::parallel_for(0, n_chunks, 1, [&](int64_t c_begin, int64_t c_end) {
    at::AutoDispatchBelowADInplaceOrView guard;
    SequentialBlas sequential_blas;
    auto xp_buf = scratch(x2d, acc, tile * s.in);
    auto dyp_buf = scratch(x2d, acc, tile * s.out);
    auto w_buf = scratch(x2d, acc, tile * w_width);  // W, then P
    auto dxp_buf = scratch(x2d, acc, tile * s.in);
    auto acc_buf = widen_x ? scratch(x2d, acc, tile * s.in) : at::Tensor();
    for (int64_t c = c_begin; c < c_end; ++c) {
      const int64_t it_begin = c * n_tiles / n_chunks;
      const int64_t it_end = (c + 1) * n_tiles / n_chunks;
      for (int64_t it = it_begin; it < it_end; ++it) {
        const int64_t t0 = it * tile;
        const int64_t n = std::min(tile, s.tokens - t0);
        auto x_tile = x2d.narrow(0, t0, n);
        auto gy_tile = gy2d.narrow(0, t0, n);
        auto gx_tile = gx.narrow(0, t0, n);
        auto gx_acc = gx_tile;
        if (widen_x) gx_acc = acc_buf.narrow(0, 0, n * s.in).view({n, s.in});
        for (size_t j = 0; j < s.groups.size(); ++j) {
          const auto& g = s.groups[j];
          auto Xp = factor_major(xp_buf, x_tile, g.na, g.nb);
          auto dYp = factor_major(dyp_buf, gy_tile, g.ma, g.mb).view({g.ma * n, g.mb});
          auto dXp = dxp_buf.narrow(0, 0, g.na * n * g.nb).view({g.na, n * g.nb});
          auto WP = w_buf.narrow(0, 0, g.ma * n * g.nb);
          for (int64_t k = 0; k < g.r; ++k) {
            const auto& Ak = ops.A[j][k];
            auto W = WP.view({g.ma, n * g.nb});
            at::mm_out(W, Ak, Xp);
            GB[j][c][k].addmm_(dYp.t(), W.view({g.ma * n, g.nb}));
            auto P = WP.view({g.ma * n, g.nb});  // W is spent: P takes its place
            at::mm_out(P, dYp, ops.B[j][k]);
            GA[j][c][k].addmm_(P.view({g.ma, n * g.nb}), Xp.t());
            dXp.addmm_(Ak.t(), P.view({g.ma, n * g.nb}), k == 0 ? 0.0 : 1.0,
                       ops.gates[g.gate_offset + k]);
          }
          auto dXt = dXp.view({g.na, n, g.nb}).transpose(0, 1);
          if (j == 0) {
            gx_acc.view({n, g.na, g.nb}).copy_(dXt);
          } else {
            gx_acc.view({n, g.na, g.nb}).add_(dXt);
          }
        }
        if (widen_x) gx_tile.copy_(gx_acc);
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
