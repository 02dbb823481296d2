// CPU kernels of kron_mix, kron_mix_add and kron_mix_backward.
//
// Tokens are processed in tiles small enough that a tile's input, output and
// intermediate stay in L2; threads take contiguous runs of tiles
// (at::parallel_for). All r components of a group go through two GEMMs per
// tile, on x and y in their own layouts (no transposing copies), in whichever
// order costs fewer flops for the group's shapes:
//
//   A first (ma*nb*(na+mb) per token and component):
//     W_t = As X_t     As (ma*r, na), row a*r+k = A_k[a]      batched over t
//     Y_t = W_t Bc     W_t read as (ma, r*nb); Bc (r*nb, mb),
//                      row k*nb+b = g_k B_k[:, b]              one GEMM, all t
//   B first (na*mb*(nb+ma)):
//     Z_t = X_t Bs^T   Bs (r*mb, nb), row k*mb+c = B_k[c]      one GEMM, all t
//     Y_t = Ac Z_t     Z_t read as (na*r, mb); Ac (ma, na*r),
//                      column a*r+k = g_k A_k[:, a]            batched over t
//
// Reading the intermediate's rows (a, k) as one matrix puts the components
// side by side, and the stacked second factor carries the gates, so the
// second product sums the components. The tile's intermediate is the only
// one; nothing of size tokens x components is written out. Low-precision
// inputs are widened to float32 tile by tile (at::opmath_type), float64
// stays float64.
//
// The tile GEMMs are plain ATen calls: inside the parallel region OpenMP runs
// MKL's nested region on the calling thread, as in ATen's own im2col
// convolution. (Forcing that with MKL_Set_Num_Threads_Local(1) per thread was
// tried and removed: it made two threads no faster than one, measured.)
#include "../validate.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

namespace moka {
namespace {

bool a_first(const GroupShape& g) {
  return g.ma * g.nb * (g.na + g.mb) <= g.na * g.mb * (g.nb + g.ma);
}

// Per-token elements of the group's intermediate (W or Z), and of the
// backward's per-token factor-gradient products.
int64_t intermediate_width(const GroupShape& g) {
  return a_first(g) ? g.ma * g.r * std::max(g.nb, g.na) : g.na * g.r * std::max(g.mb, g.ma);
}

int64_t intermediate_width(const KronMixShape& s) {
  int64_t w = 1;
  for (const auto& g : s.groups) w = std::max(w, intermediate_width(g));
  return w;
}

// How the tokens are cut into tiles. A tile holds at most about 128K
// accumulator elements per buffer (512 KiB in float32; a tile's buffers fit a
// 2 MiB L2) and 1 to 256 tokens; large tiles matter for narrow layers, where
// per-GEMM call overhead dominates. With more tiles than threads, the count
// is rounded up to a multiple of the thread count so that every thread gets
// the same work.
struct Tiling {
  int64_t tile = 1;   // tokens per tile (the last may be shorter)
  int64_t count = 0;  // number of tiles
};

Tiling tiling(const KronMixShape& s) {
  if (s.tokens == 0) return {};
  const int64_t width = std::max<int64_t>({s.in, s.out, intermediate_width(s)});
  const int64_t max_tile = std::clamp<int64_t>((int64_t{1} << 17) / width, 1, 256);
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  int64_t count = (s.tokens + max_tile - 1) / max_tile;
  if (count > threads) count = std::min(s.tokens, (count + threads - 1) / threads * threads);
  const int64_t tile = (s.tokens + count - 1) / count;
  return {tile, (s.tokens + tile - 1) / tile};
}

// One group's factors stacked for its two tile GEMMs (see the top of the
// file), in the accumulation dtype. A first: first = As, second = Bc (gated).
// B first: first = Bs, second = Ac (gated).
struct Stacked {
  bool a_first;
  at::Tensor first, second;
};

std::vector<Stacked> stack_factors(
    at::TensorList A,
    at::TensorList B,
    const at::Tensor& gates,
    const KronMixShape& s,
    at::ScalarType acc) {
  std::vector<Stacked> out;
  for (size_t j = 0; j < A.size(); ++j) {
    const auto& g = s.groups[j];
    auto gv = gates.narrow(0, g.gate_offset, g.r).to(acc).view({g.r, 1, 1});
    auto a = A[j].to(acc), b = B[j].to(acc);
    if (a_first(g)) {
      out.push_back({true, a.permute({1, 0, 2}).reshape({g.ma * g.r, g.na}),
                     (b * gv).transpose(1, 2).reshape({g.r * g.nb, g.mb})});
    } else {
      out.push_back({false, b.reshape({g.r * g.mb, g.nb}),
                     (a * gv).permute({1, 2, 0}).reshape({g.ma, g.na * g.r})});
    }
  }
  return out;
}

// A thread's scratch, allocated once per parallel chunk and viewed per tile.
at::Tensor scratch(const at::Tensor& like, at::ScalarType acc, int64_t numel) {
  return at::empty({numel}, like.options().dtype(acc));
}

// `tile` itself when it already has the accumulation dtype, else widened into `buf`.
at::Tensor widened(const at::Tensor& tile, const at::Tensor& buf) {
  if (!buf.defined()) return tile;
  auto out = buf.narrow(0, 0, tile.numel()).view(tile.sizes());
  out.copy_(tile);
  return out;
}

// The tile's intermediate into `buf`: A first W (n, ma*r, nb) = As X_t,
// B first Z (n, na*r, mb) = X_t Bs^T, both as (n, rows, cols).
at::Tensor first_product(const at::Tensor& buf, const at::Tensor& x_tile, const Stacked& f, const GroupShape& g) {
  const int64_t n = x_tile.size(0);
  if (f.a_first) {
    auto W = buf.narrow(0, 0, n * g.ma * g.r * g.nb).view({n, g.ma * g.r, g.nb});
    at::bmm_out(W, f.first.expand({n, g.ma * g.r, g.na}), x_tile.view({n, g.na, g.nb}));
    return W;
  }
  auto Z = buf.narrow(0, 0, n * g.na * g.r * g.mb).view({n * g.na, g.r * g.mb});
  at::mm_out(Z, x_tile.view({n * g.na, g.nb}), f.first.t());
  return Z.view({n, g.na * g.r, g.mb});
}

// y (tokens, out) = [y +] sum over groups and components: with `accumulate`
// y holds base, else it is uninitialized and the first group writes it.
void forward_into(
    at::Tensor& y,
    const at::Tensor& x2d,
    const KronMixShape& s,
    const std::vector<Stacked>& ops,
    bool accumulate) {
  const auto acc = accumulate_dtype(x2d.scalar_type());
  const bool widen = y.scalar_type() != acc;
  const auto [tile, n_tiles] = tiling(s);
  const int64_t w_width = intermediate_width(s);
  at::parallel_for(0, n_tiles, 1, [&](int64_t begin, int64_t end) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto w_buf = scratch(x2d, acc, tile * w_width);
    auto x_buf = widen ? scratch(x2d, acc, tile * s.in) : at::Tensor();
    auto y_buf = widen ? scratch(x2d, acc, tile * s.out) : at::Tensor();
    for (int64_t it = begin; it < end; ++it) {
      const int64_t t0 = it * tile;
      const int64_t n = std::min(tile, s.tokens - t0);
      auto x_tile = widened(x2d.narrow(0, t0, n), x_buf);
      auto y_tile = y.narrow(0, t0, n);
      auto y_acc = widen ? y_buf.narrow(0, 0, n * s.out).view({n, s.out}) : y_tile;
      if (widen && accumulate) y_acc.copy_(y_tile);
      for (size_t j = 0; j < s.groups.size(); ++j) {
        const auto& g = s.groups[j];
        const auto& f = ops[j];
        auto mid = first_product(w_buf, x_tile, f, g);
        // beta = 0 for the first write: y's old contents are ignored.
        const double beta = j == 0 && !accumulate ? 0.0 : 1.0;
        if (f.a_first) {
          y_acc.view({n * g.ma, g.mb}).addmm_(mid.view({n * g.ma, g.r * g.nb}), f.second, beta);
        } else {
          y_acc.view({n, g.ma, g.mb}).baddbmm_(f.second.expand({n, g.ma, g.na * g.r}), mid, beta);
        }
      }
      if (widen) y_tile.copy_(y_acc);
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
  const auto acc = accumulate_dtype(x.scalar_type());
  auto y = at::empty({s.tokens, s.out}, x.options());
  forward_into(y, flat_tokens(x, s, s.in), s, stack_factors(A, B, gates, s, acc), false);
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
  const auto acc = accumulate_dtype(x.scalar_type());
  auto y = base.reshape({s.tokens, s.out}).clone(at::MemoryFormat::Contiguous);
  forward_into(y, flat_tokens(x, s, s.in), s, stack_factors(A, B, gates, s, acc), true);
  return y.view(out_sizes(x, s.out));
}

// Backward with the intermediate recomputed per tile (only x is saved). Per
// tile and group, with dY_t (ma, mb) the token's output gradient:
//   A first:  W = As X_t                 G_Bc += W^T dY (one GEMM)
//             dW = dY Bc^T (one GEMM)    dX_t += As^T dW_t (batched)
//             G_As^T += sum_t X_t dW_t^T (batched, then summed over the tile)
//   B first:  Z = X_t Bs^T               G_Ac^T += sum_t Z_t dY_t^T (batched)
//             dZ_t = Ac^T dY_t (batched) G_Bs += dZ^T X (one GEMM)
//             dX += dZ Bs (one GEMM)
// The stacked gradients are unstacked at the end; the gated factor's ungated
// gradient G_k also gives the gates': dg_k = <G_k, factor_k>.
// Partials are summed per chunk of tiles and reduced in chunk order, so the
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
  const auto ops = stack_factors(A, B, gates, s, acc);
  const auto x2d = flat_tokens(x, s, s.in);
  const auto gy2d = flat_tokens(grad_y, s, s.out);
  auto gx = at::empty({s.tokens, s.in}, x.options());  // the first group writes it

  const auto [tile, n_tiles] = tiling(s);
  const int64_t n_chunks = std::max<int64_t>(
      1, std::min<int64_t>(at::get_num_threads(), n_tiles));
  // Per chunk and group: G1 for the first stacked factor (A first: G_As^T,
  // B first: G_Bs), G2 for the second (G_Bc, or G_Ac^T).
  std::vector<at::Tensor> G1, G2;
  for (size_t j = 0; j < s.groups.size(); ++j) {
    const auto& g = s.groups[j];
    const auto opts = x.options().dtype(acc);
    if (ops[j].a_first) {
      G1.push_back(at::zeros({n_chunks, g.na, g.ma * g.r}, opts));  // G_As^T
      G2.push_back(at::zeros({n_chunks, g.r * g.nb, g.mb}, opts));  // G_Bc
    } else {
      G1.push_back(at::zeros({n_chunks, g.r * g.mb, g.nb}, opts));  // G_Bs
      G2.push_back(at::zeros({n_chunks, g.na * g.r, g.ma}, opts));  // G_Ac^T
    }
  }

  const bool widen = x.scalar_type() != acc;
  const int64_t w_width = intermediate_width(s);
  at::parallel_for(0, n_chunks, 1, [&](int64_t c_begin, int64_t c_end) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto w_buf = scratch(x2d, acc, tile * w_width);
    auto dw_buf = scratch(x2d, acc, tile * w_width);
    auto per_token_buf = scratch(x2d, acc, tile * w_width);
    auto x_buf = widen ? scratch(x2d, acc, tile * s.in) : at::Tensor();
    auto gy_buf = widen ? scratch(x2d, acc, tile * s.out) : at::Tensor();
    auto gx_buf = widen ? scratch(x2d, acc, tile * s.in) : at::Tensor();
    for (int64_t c = c_begin; c < c_end; ++c) {
      const int64_t it_begin = c * n_tiles / n_chunks;
      const int64_t it_end = (c + 1) * n_tiles / n_chunks;
      for (int64_t it = it_begin; it < it_end; ++it) {
        const int64_t t0 = it * tile;
        const int64_t n = std::min(tile, s.tokens - t0);
        auto x_tile = widened(x2d.narrow(0, t0, n), x_buf);
        auto gy_tile = widened(gy2d.narrow(0, t0, n), gy_buf);
        auto gx_tile = gx.narrow(0, t0, n);
        auto gx_acc = widen ? gx_buf.narrow(0, 0, n * s.in).view({n, s.in}) : gx_tile;
        for (size_t j = 0; j < s.groups.size(); ++j) {
          const auto& g = s.groups[j];
          const auto& f = ops[j];
          const double beta = j == 0 ? 0.0 : 1.0;
          auto mid = first_product(w_buf, x_tile, f, g);  // (n, rows, cols)
          const int64_t rows = mid.size(1), cols = mid.size(2);
          auto x3 = x_tile.view({n, g.na, g.nb});
          if (f.a_first) {
            auto dY = gy_tile.view({n * g.ma, g.mb});
            G2[j][c].addmm_(mid.view({n * g.ma, g.r * g.nb}).t(), dY);
            auto dW = dw_buf.narrow(0, 0, n * rows * cols).view({n * g.ma, g.r * g.nb});
            at::mm_out(dW, dY, f.second.t());
            auto dW3 = dW.view({n, rows, cols});
            gx_acc.view({n, g.na, g.nb}).baddbmm_(f.first.t().expand({n, g.na, rows}), dW3, beta);
            // Transposed, X_t dW_t^T: MKL's batched GEMM is faster that way round.
            auto per_token = per_token_buf.narrow(0, 0, n * g.na * rows).view({n, g.na, rows});
            at::bmm_out(per_token, x3, dW3.transpose(1, 2));
            G1[j][c].add_(per_token.sum(0));
          } else {
            auto dY3 = gy_tile.view({n, g.ma, g.mb});
            auto per_token = per_token_buf.narrow(0, 0, n * rows * g.ma).view({n, rows, g.ma});
            at::bmm_out(per_token, mid, dY3.transpose(1, 2));
            G2[j][c].add_(per_token.sum(0));
            auto dZ = dw_buf.narrow(0, 0, n * rows * cols).view({n, rows, cols});
            at::bmm_out(dZ, f.second.t().expand({n, rows, g.ma}), dY3);
            auto dZ2 = dZ.view({n * g.na, g.r * g.mb});
            G1[j][c].addmm_(dZ2.t(), x3.view({n * g.na, g.nb}));
            gx_acc.view({n * g.na, g.nb}).addmm_(dZ2, f.first, beta);
          }
        }
        if (widen) gx_tile.copy_(gx_acc);
      }
    }
  });

  std::vector<at::Tensor> gA, gB;
  auto g_acc = at::empty({s.components}, x.options().dtype(acc));
  for (size_t j = 0; j < s.groups.size(); ++j) {
    const auto& g = s.groups[j];
    // Chunk partials summed in chunk order (a single chunk is the sum).
    auto g1 = n_chunks == 1 ? G1[j][0] : G1[j].sum(0);
    auto g2 = n_chunks == 1 ? G2[j][0] : G2[j].sum(0);
    auto gv = gates.narrow(0, g.gate_offset, g.r).to(acc).view({g.r, 1, 1});
    at::Tensor ga, gb;  // (r, ma, na), (r, mb, nb); the gated factor's without its gate
    at::Tensor ungated, factor;
    if (ops[j].a_first) {
      ga = g1.t().reshape({g.ma, g.r, g.na}).permute({1, 0, 2});
      ungated = g2.view({g.r, g.nb, g.mb}).transpose(1, 2);
      factor = B[j].to(acc);
      gb = ungated * gv;
    } else {
      gb = g1.view({g.r, g.mb, g.nb});
      ungated = g2.view({g.na, g.r, g.ma}).permute({1, 2, 0});
      factor = A[j].to(acc);
      ga = ungated * gv;
    }
    g_acc.narrow(0, g.gate_offset, g.r).copy_((ungated * factor).sum({1, 2}));
    gA.push_back(ga.to(x.scalar_type()).contiguous());
    gB.push_back(gb.to(x.scalar_type()).contiguous());
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
