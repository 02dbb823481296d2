// CPU kernels of kron_mix, kron_mix_add and kron_mix_backward.
//
// Tokens are processed in tiles small enough that a tile's input, output and
// intermediate stay in L2; threads take contiguous runs of tiles
// (at::parallel_for). All r components of a group go through two GEMMs per
// tile, on x and y in their own layouts (no transposing copies):
//   W_t = As X_t      As (ma*r, na), row a*r+k = A_k[a]     batched over t
//   Y_t = W_t Bc      W_t viewed (ma, r*nb), Bc (r*nb, mb), row k*nb+b =
//                     g_k B_k[:, b]                          one GEMM, all t
// because W_t's rows (a, k) read as an (ma, r*nb) matrix put each component's
// A_k X_t side by side, and Bc stacks the matching g_k B_k^T, so the second
// product sums the components. The tile's W is the only intermediate; nothing
// of size tokens x components is written out. Low-precision inputs are widened
// to float32 tile by tile (at::opmath_type), float64 stays float64.
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

// Widest per-token buffer of any group: W is (ma*r, nb) per token and the
// backward's factor gradient (ma*r, na).
int64_t intermediate_width(const KronMixShape& s) {
  int64_t w = 1;
  for (const auto& g : s.groups) w = std::max(w, g.ma * g.r * std::max(g.nb, g.na));
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

// Group j's factors rearranged for the two tile GEMMs (see the top of the
// file), in the accumulation dtype: As (ma*r, na) and Bc (r*nb, mb), gates
// folded into Bc.
struct Operands {
  std::vector<at::Tensor> As, Bc;
};

Operands stack_factors(
    at::TensorList A,
    at::TensorList B,
    const at::Tensor& gates,
    const KronMixShape& s,
    at::ScalarType acc) {
  Operands o;
  for (size_t j = 0; j < A.size(); ++j) {
    const auto& g = s.groups[j];
    auto gv = gates.narrow(0, g.gate_offset, g.r).to(acc).view({g.r, 1, 1});
    o.As.push_back(A[j].to(acc).permute({1, 0, 2}).reshape({g.ma * g.r, g.na}));
    o.Bc.push_back((B[j].to(acc) * gv).transpose(1, 2).reshape({g.r * g.nb, g.mb}));
  }
  return o;
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

// W (n, ma*r, nb) = As X_t for every token t of `x_tile` (n, in).
void stacked_left(at::Tensor& W, const at::Tensor& x_tile, const at::Tensor& As, const GroupShape& g) {
  const int64_t n = x_tile.size(0);
  at::bmm_out(W, As.expand({n, g.ma * g.r, g.na}), x_tile.view({n, g.na, g.nb}));
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
        auto W = w_buf.narrow(0, 0, n * g.ma * g.r * g.nb).view({n, g.ma * g.r, g.nb});
        stacked_left(W, x_tile, ops.As[j], g);
        // beta = 0 for the first write: y's old contents are ignored.
        y_acc.view({n * g.ma, g.mb}).addmm_(W.view({n * g.ma, g.r * g.nb}), ops.Bc[j],
                                            j == 0 && !accumulate ? 0.0 : 1.0);
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

// Backward with W recomputed per tile (only x is saved). Per tile and group,
// with dY_t (ma, mb) the token's output gradient:
//   W    = As X_t                     (batched, as in the forward)
//   G_Bc += W^T dY                    (r*nb, mb), all tokens in one GEMM
//   dW   = dY Bc^T                    (n*ma, r*nb), one GEMM
//   dX_t += As^T dW_t                 (batched, written into grad_x)
//   G_As += sum_t dW_t X_t^T          (batched, then summed over the tile;
//                                      kept transposed)
// then dA_k = G_As rows (a, k), dB_k = g_k G_Bc[k]^T and
// dg_k = <G_Bc[k]^T, B_k>. G_As and G_Bc are summed per chunk of tiles and
// reduced in chunk order, so the result is deterministic for a given thread
// count.
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
  // Per chunk and group: G_As^T (chunks, na, ma*r), G_Bc (chunks, r*nb, mb).
  std::vector<at::Tensor> GAs, GBc;
  for (const auto& g : s.groups) {
    GAs.push_back(at::zeros({n_chunks, g.na, g.ma * g.r}, x.options().dtype(acc)));
    GBc.push_back(at::zeros({n_chunks, g.r * g.nb, g.mb}, x.options().dtype(acc)));
  }

  const bool widen = x.scalar_type() != acc;
  const int64_t w_width = intermediate_width(s);
  at::parallel_for(0, n_chunks, 1, [&](int64_t c_begin, int64_t c_end) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto w_buf = scratch(x2d, acc, tile * w_width);
    auto dw_buf = scratch(x2d, acc, tile * w_width);
    auto ga_buf = scratch(x2d, acc, tile * w_width);
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
          const int64_t rows = g.ma * g.r;
          auto W = w_buf.narrow(0, 0, n * rows * g.nb).view({n, rows, g.nb});
          stacked_left(W, x_tile, ops.As[j], g);
          auto dY = gy_tile.view({n * g.ma, g.mb});
          GBc[j][c].addmm_(W.view({n * g.ma, g.r * g.nb}).t(), dY);
          auto dW = dw_buf.narrow(0, 0, n * rows * g.nb).view({n * g.ma, g.r * g.nb});
          at::mm_out(dW, dY, ops.Bc[j].t());
          auto dW3 = dW.view({n, rows, g.nb});
          auto dX = gx_acc.view({n, g.na, g.nb});
          dX.baddbmm_(ops.As[j].t().expand({n, g.na, rows}), dW3, j == 0 ? 0.0 : 1.0);
          // Transposed, X_t dW_t^T, because MKL's batched GEMM is faster that way round.
          auto per_token = ga_buf.narrow(0, 0, n * g.na * rows).view({n, g.na, rows});
          at::bmm_out(per_token, x_tile.view({n, g.na, g.nb}), dW3.transpose(1, 2));
          GAs[j][c].add_(per_token.sum(0));
        }
        if (widen) gx_tile.copy_(gx_acc);
      }
    }
  });

  std::vector<at::Tensor> gA, gB;
  auto g_acc = at::empty({s.components}, x.options().dtype(acc));
  for (size_t j = 0; j < s.groups.size(); ++j) {
    const auto& g = s.groups[j];
    auto ga = GAs[j].sum(0).t().reshape({g.ma, g.r, g.na}).permute({1, 0, 2});  // (r, ma, na)
    auto gb = GBc[j].sum(0).view({g.r, g.nb, g.mb}).transpose(1, 2);    // (r, mb, nb), ungated
    auto gv = gates.narrow(0, g.gate_offset, g.r).to(acc).view({g.r, 1, 1});
    g_acc.narrow(0, g.gate_offset, g.r).copy_((gb * B[j].to(acc)).sum({1, 2}));
    gA.push_back(ga.to(x.scalar_type()).contiguous());
    gB.push_back((gb * gv).to(x.scalar_type()).contiguous());
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
