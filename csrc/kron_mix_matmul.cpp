// The reshape-matmul path (see kron_mix_matmul.h) and its internal ops,
// registered for every device (CompositeExplicitAutograd): the op contract's
// shapes and dtypes, no autograd (tests call the backward op directly).
#include "kron_mix_matmul.h"

#include <torch/library.h>

#include <optional>

namespace moka {

at::Tensor rows_of(const at::Tensor& t, int64_t tokens, int64_t width) {
  auto r = t.reshape({tokens, width});
  if (width > 1 && r.stride(1) != 1) r = r.contiguous();
  return r;
}

std::vector<int64_t> out_sizes(const at::Tensor& x, int64_t out) {
  std::vector<int64_t> sizes(x.sizes().begin(), x.sizes().end());
  sizes.back() = out;
  return sizes;
}

KronMixBackward zero_grads(const at::Tensor& x, at::TensorList A, at::TensorList B, const at::Tensor& gates) {
  std::vector<at::Tensor> gA, gB;
  for (const auto& a : A) gA.push_back(at::zeros_like(a));
  for (const auto& b : B) gB.push_back(at::zeros_like(b));
  return {at::zeros_like(x), gA, gB, at::zeros_like(gates)};
}

at::Tensor kron_mix_matmul_forward(
    const KronMixShape& s,
    const at::Tensor& x2d,
    at::TensorList A,
    at::TensorList B,
    const at::Tensor& gates,
    const at::Tensor* base2d) {
  const auto dtype = x2d.scalar_type();
  const auto acc = accumulate_dtype(dtype);
  const int64_t T = s.tokens;
  at::Tensor y = base2d ? base2d->to(acc, /*non_blocking=*/false, /*copy=*/true)
                        : at::zeros({T, s.out}, x2d.options().dtype(acc));
  for (size_t j = 0; j < s.groups.size(); ++j) {
    const auto& g = s.groups[j];
    auto X = x2d.reshape({T, g.na, g.nb});
    auto Z = at::matmul(X, B[j].reshape({g.r * g.mb, g.nb}).t());  // (T, na, r*mb)
    auto Zp = Z.view({T, g.na, g.r, g.mb}).permute({2, 1, 0, 3}).reshape({g.r * g.na, T * g.mb});
    auto gA = A[j] * gates.narrow(0, g.gate_offset, g.r).view({g.r, 1, 1});
    auto Acat = gA.permute({1, 0, 2}).reshape({g.ma, g.r * g.na});  // (c, (k, a))
    auto Y = at::mm(Acat, Zp);  // (ma, (t, d))
    y.view({T, g.ma, g.mb}).add_(Y.view({g.ma, T, g.mb}).transpose(0, 1));
  }
  return y.scalar_type() == dtype ? y : y.to(dtype);
}

KronMixGrads kron_mix_matmul_backward(
    const KronMixShape& s,
    const at::Tensor& x2d,
    const at::Tensor& gy2d,
    at::TensorList A,
    at::TensorList B,
    const at::Tensor& gates,
    bool want_grad_x) {
  const auto dtype = x2d.scalar_type();
  const auto acc = accumulate_dtype(dtype);
  const int64_t T = s.tokens;
  KronMixGrads out;
  at::Tensor gx;
  if (want_grad_x) gx = at::zeros({T, s.in}, x2d.options().dtype(acc));
  auto gg = at::empty({s.components}, x2d.options().dtype(acc));
  for (size_t j = 0; j < s.groups.size(); ++j) {
    const auto& g = s.groups[j];
    auto X = x2d.reshape({T, g.na, g.nb});
    auto dY = gy2d.reshape({T, g.ma, g.mb});
    auto gv = gates.narrow(0, g.gate_offset, g.r);
    // P[t, c, (k, b)] = sum_d dY[t, c, d] B_k[d, b]
    auto P = at::mm(dY.reshape({T * g.ma, g.mb}), B[j].permute({1, 0, 2}).reshape({g.mb, g.r * g.nb}))
                 .view({T, g.ma, g.r, g.nb});
    // G_A[k, c, a] = sum_{t, b} P[t, c, k, b] X[t, a, b]       (ungated dA)
    auto GA = at::einsum("tckb,tab->kca", {P, X});
    // W[t, (k, c), b] = sum_a A_k[c, a] X[t, a, b];  G_B[k, d, b] = sum_{t, c} dY W
    auto W = at::matmul(A[j].reshape({g.r * g.ma, g.na}), X).view({T, g.r, g.ma, g.nb});
    auto GB = at::einsum("tcd,tkcb->kdb", {dY, W});
    if (want_grad_x) {
      auto gAk = A[j] * gv.view({g.r, 1, 1});
      gx.view({T, g.na, g.nb}).add_(at::einsum("kca,tckb->tab", {gAk, P}));
    }
    gg.narrow(0, g.gate_offset, g.r).copy_((GA.to(acc) * A[j].to(acc)).sum({1, 2}));
    out.grad_A.push_back((GA.to(acc) * gv.to(acc).view({g.r, 1, 1})).to(dtype));
    out.grad_B.push_back((GB.to(acc) * gv.to(acc).view({g.r, 1, 1})).to(dtype));
  }
  if (want_grad_x) out.grad_x = gx.to(dtype);
  out.grad_gates = gg.to(dtype);
  return out;
}

namespace {

at::Tensor kron_mix_matmul_op(
    const at::Tensor& x,
    at::TensorList A,
    at::TensorList B,
    const at::Tensor& gates,
    const std::optional<at::Tensor>& base) {
  const auto s = check_kron_mix_args("_kron_mix_matmul", x, A, B, gates);
  if (base) check_like_output("_kron_mix_matmul", "base", *base, x, s.out);
  if (s.tokens == 0) return at::empty(out_sizes(x, s.out), x.options());
  const auto x2d = rows_of(x, s.tokens, s.in);
  at::Tensor base2d;
  if (base) base2d = rows_of(*base, s.tokens, s.out);
  return kron_mix_matmul_forward(s, x2d, A, B, gates, base ? &base2d : nullptr).view(out_sizes(x, s.out));
}

KronMixBackward kron_mix_matmul_backward_op(
    const at::Tensor& grad_y,
    const at::Tensor& x,
    at::TensorList A,
    at::TensorList B,
    const at::Tensor& gates) {
  const auto s = check_kron_mix_args("_kron_mix_matmul_backward", x, A, B, gates);
  check_like_output("_kron_mix_matmul_backward", "grad_y", grad_y, x, s.out);
  if (s.tokens == 0) return zero_grads(x, A, B, gates);
  auto g = kron_mix_matmul_backward(
      s, rows_of(x, s.tokens, s.in), rows_of(grad_y, s.tokens, s.out), A, B, gates, /*want_grad_x=*/true);
  return {g.grad_x.view(x.sizes()), g.grad_A, g.grad_B, g.grad_gates};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(moka, m) {
  // Internal: the reshape-matmul path on any device, for tests.
  m.def("_kron_mix_matmul(Tensor x, Tensor[] A, Tensor[] B, Tensor gates, Tensor? base=None) -> Tensor");
  m.def(
      "_kron_mix_matmul_backward(Tensor grad_y, Tensor x, Tensor[] A, Tensor[] B, Tensor gates)"
      " -> (Tensor grad_x, Tensor[] grad_A, Tensor[] grad_B, Tensor grad_gates)");
}

TORCH_LIBRARY_IMPL(moka, CompositeExplicitAutograd, m) {
  m.impl("_kron_mix_matmul", kron_mix_matmul_op);
  m.impl("_kron_mix_matmul_backward", kron_mix_matmul_backward_op);
}

}  // namespace moka
