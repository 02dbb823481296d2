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
// The products batched over t are GEMMs as small as the factors, and MKL runs
// small batched GEMMs slowly. When the factor dimension they keep per token
// (nb for A first, mb for B first) is at most kExpandLimit, the factor is
// expanded instead with an identity of that size, E_A = As^T (x) I_nb or
// E_B = Ac^T (x) I_mb, and the product is one GEMM for all tokens of the tile:
//     W = X E_A      (n, ma*r*nb), the layout of the batched W
//     Y += Z E_B     Z read as (n, na*r*mb)
// It does nb (or mb) times the multiply-adds, in a GEMM MKL runs well.
//
// The tile GEMMs are plain ATen calls: inside the parallel region OpenMP runs
// MKL's nested region on the calling thread, as in ATen's own im2col
// convolution. (Forcing that with MKL_Set_Num_Threads_Local(1) per thread was
// tried and removed: it made two threads no faster than one, measured.)
#include "../validate.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <vector>

namespace moka {
namespace {

bool a_first(const GroupShape& g) {
  return g.ma * g.nb * (g.na + g.mb) <= g.na * g.mb * (g.nb + g.ma);
}

// The largest per-token dimension whose batched products run as one expanded
// GEMM (see the top of the file). Measured on one core of an AMD EPYC (Zen 4)
// with 256-token tiles: expanded is 3-15x faster at 2-6, about even at 9, and
// 7-25x slower at 18-36.
constexpr int64_t kExpandLimit = 8;

// Whether the group's batched products run expanded, and the size of the
// identity its per-token factor is expanded with (1 when batched, so that the
// gradient partials of both have the layout of an expanded factor).
struct Expansion {
  bool on;
  int64_t e;
};

Expansion choose_expansion(const GroupShape& g) {
  const int64_t narrow = a_first(g) ? g.nb : g.mb;
  return narrow <= kExpandLimit ? Expansion{true, narrow} : Expansion{false, 1};
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
// file), in the accumulation dtype. A first: first = As, or E_A when expanded;
// second = Bc (gated). B first: first = Bs; second = Ac (gated), or E_B.
struct Stacked {
  bool a_first;
  Expansion expansion;
  at::Tensor first, second;
};

// Elements of a group's stacked first and second factors (and of their
// gradients' partials, which have the same layouts).
std::array<int64_t, 2> stacked_numel(const GroupShape& g) {
  const int64_t a = g.r * g.ma * g.na, b = g.r * g.mb * g.nb, e = choose_expansion(g).e;
  return a_first(g) ? std::array<int64_t, 2>{a * e * e, b} : std::array<int64_t, 2>{b, a * e * e};
}

// A 3-D factor (r, rows, cols) of any strides, read element by element.
template <typename T>
struct Factor {
  const T* p;
  int64_t r, rows, cols, s0, s1, s2;
  explicit Factor(const at::Tensor& t)
      : p(t.const_data_ptr<T>()), r(t.size(0)), rows(t.size(1)), cols(t.size(2)),
        s0(t.stride(0)), s1(t.stride(1)), s2(t.stride(2)) {}
  T operator()(int64_t k, int64_t row, int64_t col) const { return p[k * s0 + row * s1 + col * s2]; }
  // f(k, row, col, element) for every element.
  template <typename F>
  void each(F&& f) const {
    for (int64_t k = 0; k < r; ++k)
      for (int64_t row = 0; row < rows; ++row)
        for (int64_t col = 0; col < cols; ++col) f(k, row, col, (*this)(k, row, col));
  }
};

// Every group's stacked factors, written element by element into one buffer:
// they are small, and a loop here replaces a dozen ATen calls per group.
std::vector<Stacked> stack_factors(
    at::TensorList A,
    at::TensorList B,
    const at::Tensor& gates,
    const KronMixShape& s,
    at::ScalarType acc) {
  int64_t total = 0;
  for (const auto& g : s.groups) total += stacked_numel(g)[0] + stacked_numel(g)[1];
  // Zeros: an expanded factor is written only where its identity is 1.
  auto buf = at::zeros({total}, gates.options().dtype(acc));
  std::vector<Stacked> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gates.scalar_type(), "stack_factors", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* gp = gates.const_data_ptr<scalar_t>();
    const int64_t gs = gates.stride(0);
    acc_t* p = buf.mutable_data_ptr<acc_t>();
    int64_t offset = 0;
    for (size_t j = 0; j < s.groups.size(); ++j) {
      const auto& g = s.groups[j];
      const Factor<scalar_t> a(A[j]), b(B[j]);
      auto gate = [&](int64_t k) { return static_cast<acc_t>(gp[(g.gate_offset + k) * gs]); };
      const bool af = a_first(g);
      const Expansion ex = choose_expansion(g);
      const int64_t e = ex.e;
      const auto [n_first, n_second] = stacked_numel(g);
      acc_t* first = p + offset;
      acc_t* second = first + n_first;
      if (af) {
        if (!ex.on) {
          a.each([&](int64_t k, int64_t row, int64_t col, scalar_t v) {  // As row row*r+k = A_k[row]
            first[(row * g.r + k) * g.na + col] = static_cast<acc_t>(v);
          });
        } else {
          const int64_t cols = g.ma * g.r * e;  // E_A[col*nb+c, (row*r+k)*nb+c] = A_k[row, col]
          a.each([&](int64_t k, int64_t row, int64_t col, scalar_t v) {
            for (int64_t c = 0; c < e; ++c)
              first[(col * e + c) * cols + (row * g.r + k) * e + c] = static_cast<acc_t>(v);
          });
        }
        b.each([&](int64_t k, int64_t row, int64_t col, scalar_t v) {  // Bc row k*nb+col = g_k B_k[:, col]
          second[(k * g.nb + col) * g.mb + row] = gate(k) * static_cast<acc_t>(v);
        });
      } else {
        b.each([&](int64_t k, int64_t row, int64_t col, scalar_t v) {  // Bs row k*mb+row = B_k[row]
          first[(k * g.mb + row) * g.nb + col] = static_cast<acc_t>(v);
        });
        if (!ex.on) {
          a.each([&](int64_t k, int64_t row, int64_t col, scalar_t v) {  // Ac column col*r+k = g_k A_k[:, col]
            second[(row * g.na + col) * g.r + k] = gate(k) * static_cast<acc_t>(v);
          });
        } else {
          const int64_t cols = g.ma * e;  // E_B[(col*r+k)*mb+c, row*mb+c] = g_k A_k[row, col]
          a.each([&](int64_t k, int64_t row, int64_t col, scalar_t v) {
            for (int64_t c = 0; c < e; ++c)
              second[((col * g.r + k) * e + c) * cols + row * e + c] = gate(k) * static_cast<acc_t>(v);
          });
        }
      }
      auto first_t = buf.narrow(0, offset, n_first);
      auto second_t = buf.narrow(0, offset + n_first, n_second);
      if (af) {
        out.push_back({true, ex,
                       ex.on ? first_t.view({g.na * e, g.ma * g.r * e}) : first_t.view({g.ma * g.r, g.na}),
                       second_t.view({g.r * g.nb, g.mb})});
      } else {
        out.push_back({false, ex, first_t.view({g.r * g.mb, g.nb}),
                       ex.on ? second_t.view({g.na * g.r * e, g.ma * e}) : second_t.view({g.ma, g.na * g.r})});
      }
      offset += n_first + n_second;
    }
  });
  return out;
}

// A thread's scratch buffers of the given sizes (0: undefined), carved from one
// allocation per parallel chunk, each on a 64-byte boundary, viewed per tile.
template <size_t N>
std::array<at::Tensor, N> scratch(
    const at::Tensor& like, at::ScalarType acc, const std::array<int64_t, N>& sizes) {
  auto padded = [](int64_t n) { return (n + 15) / 16 * 16; };
  int64_t total = 0;
  for (int64_t n : sizes) total += padded(n);
  const auto buf = at::empty({total}, like.options().dtype(acc));
  std::array<at::Tensor, N> out;
  int64_t offset = 0;
  for (size_t i = 0; i < N; ++i) {
    if (sizes[i] > 0) out[i] = buf.narrow(0, offset, sizes[i]);
    offset += padded(sizes[i]);
  }
  return out;
}

// `tile` itself when it already has the accumulation dtype, else widened into `buf`.
at::Tensor widened(const at::Tensor& tile, const at::Tensor& buf) {
  if (!buf.defined()) return tile;
  auto out = buf.narrow(0, 0, tile.numel()).view(tile.sizes());
  out.copy_(tile);
  return out;
}

// G += the sum of the tile's per-token products P (n, ...) over its n tokens,
// in token order: one pass, no temporary.
void add_token_sum(at::Tensor& G, const at::Tensor& P) {
  AT_DISPATCH_FLOATING_TYPES(G.scalar_type(), "add_token_sum", [&] {
    scalar_t* g = G.mutable_data_ptr<scalar_t>();
    const scalar_t* p = P.const_data_ptr<scalar_t>();
    const int64_t n = P.size(0), width = G.numel();
    for (int64_t t = 0; t < n; ++t)
      for (int64_t e = 0; e < width; ++e) g[e] += p[t * width + e];
  });
}

// The tile's intermediate into `buf`: A first W (n, ma*r, nb) = As X_t,
// B first Z (n, na*r, mb) = X_t Bs^T, both as (n, rows, cols).
at::Tensor first_product(const at::Tensor& buf, const at::Tensor& x_tile, const Stacked& f, const GroupShape& g) {
  const int64_t n = x_tile.size(0);
  if (f.a_first) {
    auto W = buf.narrow(0, 0, n * g.ma * g.r * g.nb).view({n, g.ma * g.r, g.nb});
    if (f.expansion.on) {
      auto W2 = W.view({n, g.ma * g.r * g.nb});
      at::mm_out(W2, x_tile, f.first);
    } else {
      at::bmm_out(W, f.first.expand({n, g.ma * g.r, g.na}), x_tile.view({n, g.na, g.nb}));
    }
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
    auto [w_buf, x_buf, y_buf] = scratch<3>(
        x2d, acc, {tile * w_width, widen ? tile * s.in : 0, widen ? tile * s.out : 0});
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
        } else if (f.expansion.on) {
          y_acc.addmm_(mid.view({n, g.na * g.r * g.mb}), f.second, beta);
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
  at::AutoDispatchBelowADInplaceOrView below_autograd;
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
  at::AutoDispatchBelowADInplaceOrView below_autograd;
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
// Expanded, the batched products are one GEMM each with E_A or E_B:
//   A first:  dX += dW E_A^T             G_E_A += X^T dW
//   B first:  dZ = dY E_B^T              G_E_B += Z^T dY
// and an element of G_As^T (G_Ac^T) is the sum of its identity's diagonal in
// G_E_A (G_E_B), taken when unstacking.
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
  at::AutoDispatchBelowADInplaceOrView below_autograd;
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
  // Per chunk of tiles, the partial gradients of every group's stacked
  // factors, at the factors' offsets in stack_factors' buffer but in the
  // layouts the tile GEMMs produce them: G1 for the first (A first: G_As^T,
  // B first: G_Bs), then G2 for the second (G_Bc, or G_Ac^T).
  std::vector<int64_t> offsets;
  int64_t per_chunk = 0;
  for (const auto& g : s.groups) {
    offsets.push_back(per_chunk);
    per_chunk += stacked_numel(g)[0] + stacked_numel(g)[1];
  }
  auto partials = at::zeros({n_chunks, per_chunk}, x.options().dtype(acc));

  const bool widen = x.scalar_type() != acc;
  const int64_t w_width = intermediate_width(s);
  at::parallel_for(0, n_chunks, 1, [&](int64_t c_begin, int64_t c_end) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [w_buf, dw_buf, per_token_buf, x_buf, gy_buf, gx_buf] = scratch<6>(
        x2d, acc,
        {tile * w_width, tile * w_width, tile * w_width, widen ? tile * s.in : 0,
         widen ? tile * s.out : 0, widen ? tile * s.in : 0});
    for (int64_t c = c_begin; c < c_end; ++c) {
      std::vector<at::Tensor> G1, G2;  // this chunk's
      for (size_t j = 0; j < s.groups.size(); ++j) {
        const auto& g = s.groups[j];
        const int64_t n1 = ops[j].first.numel(), n2 = ops[j].second.numel();
        auto g1 = partials[c].narrow(0, offsets[j], n1);
        auto g2 = partials[c].narrow(0, offsets[j] + n1, n2);
        const int64_t e = ops[j].expansion.e;
        if (ops[j].a_first) {
          G1.push_back(g1.view({g.na * e, g.ma * g.r * e}));
          G2.push_back(g2.view({g.r * g.nb, g.mb}));
        } else {
          G1.push_back(g1.view({g.r * g.mb, g.nb}));
          G2.push_back(g2.view({g.na * g.r * e, g.ma * e}));
        }
      }
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
            G2[j].addmm_(mid.view({n * g.ma, g.r * g.nb}).t(), dY);
            auto dW = dw_buf.narrow(0, 0, n * rows * cols).view({n * g.ma, g.r * g.nb});
            at::mm_out(dW, dY, f.second.t());
            if (f.expansion.on) {
              auto dW2 = dW.view({n, rows * cols});
              gx_acc.addmm_(dW2, f.first.t(), beta);
              G1[j].addmm_(x_tile.t(), dW2);
            } else {
              auto dW3 = dW.view({n, rows, cols});
              gx_acc.view({n, g.na, g.nb}).baddbmm_(f.first.t().expand({n, g.na, rows}), dW3, beta);
              // Transposed, X_t dW_t^T: MKL's batched GEMM is faster that way round.
              auto per_token = per_token_buf.narrow(0, 0, n * g.na * rows).view({n, g.na, rows});
              at::bmm_out(per_token, x3, dW3.transpose(1, 2));
              add_token_sum(G1[j], per_token);
            }
          } else {
            auto dZ = dw_buf.narrow(0, 0, n * rows * cols).view({n, rows, cols});
            if (f.expansion.on) {
              G2[j].addmm_(mid.view({n, rows * cols}).t(), gy_tile);
              auto dZ_flat = dZ.view({n, rows * cols});
              at::mm_out(dZ_flat, gy_tile, f.second.t());
            } else {
              auto dY3 = gy_tile.view({n, g.ma, g.mb});
              auto per_token = per_token_buf.narrow(0, 0, n * rows * g.ma).view({n, rows, g.ma});
              at::bmm_out(per_token, mid, dY3.transpose(1, 2));
              add_token_sum(G2[j], per_token);
              at::bmm_out(dZ, f.second.t().expand({n, rows, g.ma}), dY3);
            }
            auto dZ2 = dZ.view({n * g.na, g.r * g.mb});
            G1[j].addmm_(dZ2.t(), x3.view({n * g.na, g.nb}));
            gx_acc.view({n * g.na, g.nb}).addmm_(dZ2, f.first, beta);
          }
        }
        if (widen) gx_tile.copy_(gx_acc);
      }
    }
  });

  // Unstacking: each gradient element is read from its stacked position (the
  // index maps of stack_factors), the chunk partials summed in chunk order.
  // The gated factor's gradient without its gate, U_k, also gives the gate's:
  // dg_k = <U_k, factor_k>.
  std::vector<at::Tensor> gA, gB;
  auto g_gates = at::empty({s.components}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "kron_mix_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* P = partials.const_data_ptr<acc_t>();
    auto partial = [&](int64_t index) {
      acc_t v = 0;
      for (int64_t c = 0; c < n_chunks; ++c) v += P[c * per_chunk + index];
      return v;
    };
    const scalar_t* gp = gates.const_data_ptr<scalar_t>();
    scalar_t* dg = g_gates.mutable_data_ptr<scalar_t>();
    for (size_t j = 0; j < s.groups.size(); ++j) {
      const auto& g = s.groups[j];
      auto ga = at::empty({g.r, g.ma, g.na}, x.options());
      auto gb = at::empty({g.r, g.mb, g.nb}, x.options());
      scalar_t* pa = ga.mutable_data_ptr<scalar_t>();
      scalar_t* pb = gb.mutable_data_ptr<scalar_t>();
      const Factor<scalar_t> a(A[j]), b(B[j]);
      const bool af = ops[j].a_first;
      const int64_t e = ops[j].expansion.e;
      const int64_t g1 = offsets[j], g2 = offsets[j] + ops[j].first.numel();
      // Element (row, col) of a (rows, cols) partial expanded with an identity
      // of size e: the sum of the identity's diagonal (e = 1: the element).
      auto expanded = [&](int64_t base, int64_t row, int64_t col, int64_t cols) {
        acc_t v = 0;
        for (int64_t c = 0; c < e; ++c) v += partial(base + (row * e + c) * cols * e + col * e + c);
        return v;
      };
      // The ungated gradients of A_k[row, col] and B_k[row, col]:
      // A first G_As^T[col, row*r+k] and G_Bc[k*nb+col, row],
      // B first G_Ac^T[col*r+k, row] and G_Bs[k*mb+row, col].
      auto grad_a = [&](int64_t k, int64_t row, int64_t col) {
        return af ? expanded(g1, col, row * g.r + k, g.ma * g.r) : expanded(g2, col * g.r + k, row, g.ma);
      };
      auto grad_b = [&](int64_t k, int64_t row, int64_t col) {
        return af ? partial(g2 + (k * g.nb + col) * g.mb + row) : partial(g1 + (k * g.mb + row) * g.nb + col);
      };
      for (int64_t k = 0; k < g.r; ++k) {
        const auto gate = static_cast<acc_t>(gp[(g.gate_offset + k) * gates.stride(0)]);
        acc_t dot = 0;  // a local, not an array: the output stores could alias it
        // The gated factor (B when A goes first, else A) gets gate * U and
        // gives dg_k = <U_k, factor_k>.
        for (int64_t row = 0; row < g.ma; ++row)
          for (int64_t col = 0; col < g.na; ++col) {
            const acc_t u = grad_a(k, row, col);
            pa[(k * g.ma + row) * g.na + col] = static_cast<scalar_t>(af ? u : gate * u);
            if (!af) dot += u * static_cast<acc_t>(a(k, row, col));
          }
        for (int64_t row = 0; row < g.mb; ++row)
          for (int64_t col = 0; col < g.nb; ++col) {
            const acc_t u = grad_b(k, row, col);
            pb[(k * g.mb + row) * g.nb + col] = static_cast<scalar_t>(af ? gate * u : u);
            if (af) dot += u * static_cast<acc_t>(b(k, row, col));
          }
        dg[g.gate_offset + k] = static_cast<scalar_t>(dot);
      }
      gA.push_back(ga);
      gB.push_back(gb);
    }
  });
  return {gx.view(x.sizes()), gA, gB, g_gates};
}

}  // namespace

TORCH_LIBRARY_IMPL(moka, CPU, m) {
  m.impl("kron_mix", kron_mix_cpu);
  m.impl("kron_mix_add", kron_mix_add_cpu);
  m.impl("kron_mix_backward", kron_mix_backward_cpu);
}

}  // namespace moka
