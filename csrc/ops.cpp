// The moka op library: schemas, argument validation and autocast, shared by
// every backend. Kernels live in cpu/ and cuda/ and register against these
// schemas with TORCH_LIBRARY_IMPL.
//
// Contract (DESIGN.md section 2): factors with one shape are stacked in a
// group, A[j]: (r_j, ma_j, na_j), B[j]: (r_j, mb_j, nb_j); gates is the flat
// vector of final mixture weights, group by group; for x: (..., in),
//   kron_mix(x) = x @ (sum_j sum_k gates[off_j + k] * kron(A[j][k], B[j][k])).T
#include "validate.h"

#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <torch/library.h>

#include <sstream>

namespace moka {
namespace {

bool is_supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 ||
      t == at::kHalf;
}

void check_factor_list(
    const char* op,
    const char* name,
    at::TensorList list,
    const at::Tensor& x) {
  for (size_t j = 0; j < list.size(); ++j) {
    const at::Tensor& t = list[j];
    TORCH_CHECK(
        t.defined(), op, ": ", name, "[", j, "] is undefined (None)");
    TORCH_CHECK(
        t.dim() == 3,
        op, ": ", name, "[", j, "] must be 3-D (r, rows, cols), got shape ",
        t.sizes());
    TORCH_CHECK(
        t.scalar_type() == x.scalar_type(),
        op, ": ", name, "[", j, "] must have the dtype of x (", x.scalar_type(),
        "), got ", t.scalar_type());
    TORCH_CHECK(
        t.device() == x.device(),
        op, ": ", name, "[", j, "] must be on the device of x (", x.device(),
        "), got ", t.device());
    TORCH_CHECK(
        t.size(0) >= 1 && t.size(1) >= 1 && t.size(2) >= 1,
        op, ": ", name, "[", j,
        "] must have r >= 1 and non-empty factors, got shape ", t.sizes());
  }
}

}  // namespace

KronMixShape check_kron_mix_args(
    const char* op,
    const at::Tensor& x,
    at::TensorList A,
    at::TensorList B,
    const at::Tensor& gates) {
  TORCH_CHECK(x.defined(), op, ": x is undefined (None)");
  TORCH_CHECK(
      is_supported_dtype(x.scalar_type()),
      op, ": x must be float32, float64, bfloat16 or float16, got ",
      x.scalar_type());
  TORCH_CHECK(
      x.dim() >= 1, op, ": x must have at least 1 dim (..., in), got a 0-dim tensor");
  TORCH_CHECK(
      A.size() == B.size() && !A.empty(),
      op, ": A and B must be lists of equal length >= 1 (one entry per factor-shape group), got len(A)=",
      A.size(), " and len(B)=", B.size());
  check_factor_list(op, "A", A, x);
  check_factor_list(op, "B", B, x);
  TORCH_CHECK(gates.defined(), op, ": gates is undefined (None)");
  TORCH_CHECK(
      gates.scalar_type() == x.scalar_type(),
      op, ": gates must have the dtype of x (", x.scalar_type(), "), got ",
      gates.scalar_type());
  TORCH_CHECK(
      gates.device() == x.device(),
      op, ": gates must be on the device of x (", x.device(), "), got ",
      gates.device());

  KronMixShape s;
  s.in = x.size(-1);
  s.tokens = 1;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) s.tokens *= x.size(d);
  s.out = A[0].size(1) * B[0].size(1);
  s.components = 0;
  for (size_t j = 0; j < A.size(); ++j) {
    GroupShape g{A[j].size(0), A[j].size(1), A[j].size(2), B[j].size(1),
                 B[j].size(2), s.components};
    TORCH_CHECK(
        B[j].size(0) == g.r,
        op, ": group ", j, ": A[", j, "] and B[", j,
        "] must stack the same number of components r, got A[", j, "] shape ",
        A[j].sizes(), " and B[", j, "] shape ", B[j].sizes());
    TORCH_CHECK(
        g.na * g.nb == s.in,
        op, ": group ", j, ": na*nb must equal x.size(-1)=", s.in,
        ", got A[", j, "] shape ", A[j].sizes(), " and B[", j, "] shape ",
        B[j].sizes(), " (na*nb=", g.na * g.nb, ")");
    TORCH_CHECK(
        g.ma * g.mb == s.out,
        op, ": group ", j, ": ma*mb must be the same output size for every group (",
        s.out, " from group 0), got A[", j, "] shape ", A[j].sizes(),
        " and B[", j, "] shape ", B[j].sizes(), " (ma*mb=", g.ma * g.mb, ")");
    s.components += g.r;
    s.groups.push_back(g);
  }
  TORCH_CHECK(
      gates.dim() == 1 && gates.size(0) == s.components,
      op, ": gates must be 1-D of length sum(r)=", s.components,
      " (one weight per component), got shape ", gates.sizes());
  return s;
}

KronMixShape check_kron_mix_indexed_args(
    const char* op,
    const at::Tensor& x,
    const at::Tensor& row_adapter,
    at::TensorList A,
    at::TensorList B,
    const at::Tensor& gates,
    int64_t* n_adapters) {
  TORCH_CHECK(x.defined(), op, ": x is undefined (None)");
  TORCH_CHECK(
      x.dim() >= 2, op, ": x must have at least 2 dims (rows, ..., in), got shape ", x.sizes());
  TORCH_CHECK(row_adapter.defined(), op, ": row_adapter is undefined (None)");
  TORCH_CHECK(
      row_adapter.scalar_type() == at::kLong && row_adapter.dim() == 1 &&
          row_adapter.size(0) == x.size(0),
      op, ": row_adapter must be a 1-D int64 tensor with one entry per row of x (", x.size(0),
      "), got ", row_adapter.scalar_type(), " of shape ", row_adapter.sizes());
  TORCH_CHECK(
      row_adapter.device() == x.device(),
      op, ": row_adapter must be on the device of x (", x.device(), "), got ", row_adapter.device());
  TORCH_CHECK(
      A.size() == B.size() && !A.empty(),
      op, ": A and B must be lists of equal length >= 1 (one entry per factor-shape group), got len(A)=",
      A.size(), " and len(B)=", B.size());
  TORCH_CHECK(gates.defined(), op, ": gates is undefined (None)");
  TORCH_CHECK(
      gates.dim() == 2 && gates.size(0) >= 1,
      op, ": gates must be 2-D (n_adapters, sum(r)), got shape ", gates.sizes());
  const int64_t n = gates.size(0);
  std::vector<at::Tensor> a0, b0;
  for (size_t j = 0; j < A.size(); ++j) {
    for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"A", A[j]}, {"B", B[j]}}) {
      TORCH_CHECK(t.defined(), op, ": ", name, "[", j, "] is undefined (None)");
      TORCH_CHECK(
          t.dim() == 4 && t.size(0) == n,
          op, ": ", name, "[", j, "] must be 4-D (n_adapters=", n,
          " from gates, r, rows, cols), got shape ", t.sizes());
    }
    a0.push_back(A[j].select(0, 0));
    b0.push_back(B[j].select(0, 0));
  }
  *n_adapters = n;
  // One adapter's slice must be a valid kron_mix call on x (x's rows are its tokens).
  return check_kron_mix_args(op, x, a0, b0, gates.select(0, 0));
}

void check_like_output(
    const char* op,
    const char* name,
    const at::Tensor& t,
    const at::Tensor& x,
    int64_t out) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is undefined (None)");
  std::vector<int64_t> expected(x.sizes().begin(), x.sizes().end());
  expected.back() = out;
  TORCH_CHECK(
      t.sizes().equals(expected),
      op, ": ", name, " must have shape ", at::IntArrayRef(expected),
      " (x's leading dims, then out), got ", t.sizes());
  TORCH_CHECK(
      t.scalar_type() == x.scalar_type(),
      op, ": ", name, " must have the dtype of x (", x.scalar_type(), "), got ",
      t.scalar_type());
  TORCH_CHECK(
      t.device() == x.device(),
      op, ": ", name, " must be on the device of x (", x.device(), "), got ",
      t.device());
}

void check_gate_softmax_args(
    const char* op,
    const at::Tensor& logits,
    double temperature) {
  TORCH_CHECK(logits.defined(), op, ": logits is undefined (None)");
  TORCH_CHECK(
      is_supported_dtype(logits.scalar_type()),
      op, ": logits must be float32, float64, bfloat16 or float16, got ",
      logits.scalar_type());
  TORCH_CHECK(
      logits.dim() >= 1,
      op, ": logits must have at least 1 dim (softmax runs over the last), got a 0-dim tensor");
  TORCH_CHECK(
      temperature > 0.0 && std::isfinite(temperature),
      op, ": temperature must be a finite number > 0, got ", temperature);
}

void check_gate_softmax_backward_args(
    const at::Tensor& grad,
    const at::Tensor& output,
    double temperature) {
  check_gate_softmax_args("gate_softmax_backward", output, temperature);
  TORCH_CHECK(
      grad.defined() && grad.sizes().equals(output.sizes()) &&
          grad.scalar_type() == output.scalar_type() &&
          grad.device() == output.device(),
      "gate_softmax_backward: grad must match output (shape ", output.sizes(),
      ", dtype ", output.scalar_type(), ", device ", output.device(), "), got ",
      grad.defined() ? grad.sizes() : at::IntArrayRef{}, " ",
      grad.defined() ? c10::toString(grad.scalar_type()) : "undefined");
}

namespace {

// Autocast: like a linear layer, kron_mix runs in the autocast dtype (its
// kernels accumulate in float32 anyway) and returns that dtype.
template <c10::DeviceType device>
std::vector<at::Tensor> cast_list(at::ScalarType dtype, at::TensorList list) {
  std::vector<at::Tensor> out;
  out.reserve(list.size());
  for (const auto& t : list) out.push_back(at::autocast::cached_cast(dtype, t, device));
  return out;
}

template <c10::DeviceType device>
at::Tensor kron_mix_autocast(
    const at::Tensor& x,
    at::TensorList A,
    at::TensorList B,
    const at::Tensor& gates) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const auto dtype = at::autocast::get_autocast_dtype(device);
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("moka::kron_mix", "")
                       .typed<at::Tensor(
                           const at::Tensor&, at::TensorList, at::TensorList,
                           const at::Tensor&)>();
  return op.call(
      at::autocast::cached_cast(dtype, x, device), cast_list<device>(dtype, A),
      cast_list<device>(dtype, B), at::autocast::cached_cast(dtype, gates, device));
}

template <c10::DeviceType device>
at::Tensor kron_mix_add_autocast(
    const at::Tensor& base,
    const at::Tensor& x,
    at::TensorList A,
    at::TensorList B,
    const at::Tensor& gates) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const auto dtype = at::autocast::get_autocast_dtype(device);
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("moka::kron_mix_add", "")
                       .typed<at::Tensor(
                           const at::Tensor&, const at::Tensor&, at::TensorList,
                           at::TensorList, const at::Tensor&)>();
  return op.call(
      at::autocast::cached_cast(dtype, base, device),
      at::autocast::cached_cast(dtype, x, device), cast_list<device>(dtype, A),
      cast_list<device>(dtype, B), at::autocast::cached_cast(dtype, gates, device));
}

template <c10::DeviceType device>
at::Tensor kron_mix_indexed_autocast(
    const at::Tensor& x,
    const at::Tensor& row_adapter,
    at::TensorList A,
    at::TensorList B,
    const at::Tensor& gates) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const auto dtype = at::autocast::get_autocast_dtype(device);
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("moka::kron_mix_indexed", "")
                       .typed<at::Tensor(
                           const at::Tensor&, const at::Tensor&, at::TensorList,
                           at::TensorList, const at::Tensor&)>();
  return op.call(
      at::autocast::cached_cast(dtype, x, device), row_adapter, cast_list<device>(dtype, A),
      cast_list<device>(dtype, B), at::autocast::cached_cast(dtype, gates, device));
}

}  // namespace

TORCH_LIBRARY(moka, m) {
  m.def("kron_mix(Tensor x, Tensor[] A, Tensor[] B, Tensor gates) -> Tensor");
  // base + kron_mix(x, ...), with the addition fused into the kernel's
  // epilogue: the adapter layer uses it to add onto the frozen layer's output.
  m.def(
      "kron_mix_add(Tensor base, Tensor x, Tensor[] A, Tensor[] B, Tensor gates) -> Tensor");
  m.def(
      "kron_mix_backward(Tensor grad_y, Tensor x, Tensor[] A, Tensor[] B, Tensor gates)"
      " -> (Tensor grad_x, Tensor[] grad_A, Tensor[] grad_B, Tensor grad_gates)");
  // Every row of x with its own adapter: row_adapter[i] in [-1, n_adapters)
  // picks the factors A[j][a], B[j][a] and gates[a] for row i (all of x[i]'s
  // tokens); -1 gives a zero row. The adapters are stacked along the factors'
  // first dim, so they share their factor-shape groups.
  m.def(
      "kron_mix_indexed(Tensor x, Tensor row_adapter, Tensor[] A, Tensor[] B, Tensor gates) -> Tensor");
  m.def(
      "kron_mix_indexed_backward(Tensor grad_y, Tensor x, Tensor row_adapter, Tensor[] A, Tensor[] B,"
      " Tensor gates) -> (Tensor grad_x, Tensor[] grad_A, Tensor[] grad_B, Tensor grad_gates)");
  m.def("gate_softmax(Tensor logits, float temperature) -> Tensor");
  m.def(
      "gate_softmax_backward(Tensor grad, Tensor output, float temperature) -> Tensor");
}

TORCH_LIBRARY_IMPL(moka, AutocastCPU, m) {
  m.impl("kron_mix", kron_mix_autocast<c10::DeviceType::CPU>);
  m.impl("kron_mix_add", kron_mix_add_autocast<c10::DeviceType::CPU>);
  m.impl("kron_mix_indexed", kron_mix_indexed_autocast<c10::DeviceType::CPU>);
}

TORCH_LIBRARY_IMPL(moka, AutocastCUDA, m) {
  m.impl("kron_mix", kron_mix_autocast<c10::DeviceType::CUDA>);
  m.impl("kron_mix_add", kron_mix_add_autocast<c10::DeviceType::CUDA>);
  m.impl("kron_mix_indexed", kron_mix_indexed_autocast<c10::DeviceType::CUDA>);
}

}  // namespace moka
