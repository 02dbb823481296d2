// CPU kernels of kron_mix_indexed and its backward: a batch whose rows use
// different adapters (S-LoRA/punica's idea, for Kronecker mixtures).
//
// The rows are put in adapter order by one counting sort over row_adapter;
// each adapter then runs the kron_mix CPU kernel (through the dispatcher) on
// its own rows, gathered into one contiguous block, and the result is
// scattered back. The cost is that of one kron_mix call per adapter on its
// rows plus one gather and one scatter of the batch; rows with adapter -1 are
// never touched. The backward does the same with kron_mix_backward, so each
// adapter's factor and gate gradients are sums over its rows only.
#include "../validate.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <vector>

namespace moka {
namespace {

// Rows of each adapter, in row order: rows[offsets[a] .. offsets[a+1]).
struct RowsByAdapter {
  std::vector<int64_t> offsets;
  at::Tensor rows;  // int64, the rows sorted by adapter (rows with -1 left out)
};

RowsByAdapter rows_by_adapter(const char* op, const at::Tensor& row_adapter, int64_t n_adapters) {
  const auto ra = row_adapter.contiguous();
  const int64_t* p = ra.const_data_ptr<int64_t>();
  const int64_t n_rows = ra.numel();
  std::vector<int64_t> count(n_adapters + 1, 0);
  for (int64_t i = 0; i < n_rows; ++i) {
    TORCH_CHECK(
        p[i] >= -1 && p[i] < n_adapters,
        op, ": row_adapter[", i, "] must be in [-1, ", n_adapters, ") (n_adapters from gates), got ", p[i]);
    if (p[i] >= 0) ++count[p[i] + 1];
  }
  RowsByAdapter out;
  out.offsets.assign(n_adapters + 1, 0);
  for (int64_t a = 0; a < n_adapters; ++a) out.offsets[a + 1] = out.offsets[a] + count[a + 1];
  out.rows = at::empty({out.offsets[n_adapters]}, ra.options());
  int64_t* r = out.rows.mutable_data_ptr<int64_t>();
  std::vector<int64_t> next(out.offsets.begin(), out.offsets.end() - 1);
  for (int64_t i = 0; i < n_rows; ++i)
    if (p[i] >= 0) r[next[p[i]]++] = i;
  return out;
}

// f(a, rows of adapter a) for every adapter that has rows.
template <typename F>
void each_adapter(const RowsByAdapter& by, F&& f) {
  for (size_t a = 0; a + 1 < by.offsets.size(); ++a) {
    const int64_t begin = by.offsets[a], end = by.offsets[a + 1];
    if (begin != end) f(static_cast<int64_t>(a), by.rows.slice(0, begin, end));
  }
}

std::vector<at::Tensor> slice(at::TensorList list, int64_t a) {
  std::vector<at::Tensor> out;
  out.reserve(list.size());
  for (const auto& t : list) out.push_back(t.select(0, a));
  return out;
}

const c10::TypedOperatorHandle<at::Tensor(const at::Tensor&, at::TensorList, at::TensorList, const at::Tensor&)>&
kron_mix_op() {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("moka::kron_mix", "")
                       .typed<at::Tensor(const at::Tensor&, at::TensorList, at::TensorList, const at::Tensor&)>();
  return op;
}

using BackwardResult = std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor>;

const c10::TypedOperatorHandle<BackwardResult(
    const at::Tensor&, const at::Tensor&, at::TensorList, at::TensorList, const at::Tensor&)>&
kron_mix_backward_op() {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("moka::kron_mix_backward", "")
                       .typed<BackwardResult(
                           const at::Tensor&, const at::Tensor&, at::TensorList, at::TensorList,
                           const at::Tensor&)>();
  return op;
}

std::vector<int64_t> out_sizes(const at::Tensor& x, int64_t out) {
  std::vector<int64_t> sizes(x.sizes().begin(), x.sizes().end());
  sizes.back() = out;
  return sizes;
}

at::Tensor kron_mix_indexed_cpu(
    const at::Tensor& x,
    const at::Tensor& row_adapter,
    at::TensorList A,
    at::TensorList B,
    const at::Tensor& gates) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  int64_t n_adapters = 0;
  const auto s = check_kron_mix_indexed_args("kron_mix_indexed", x, row_adapter, A, B, gates, &n_adapters);
  const auto by = rows_by_adapter("kron_mix_indexed", row_adapter, n_adapters);
  auto y = at::zeros(out_sizes(x, s.out), x.options());
  each_adapter(by, [&](int64_t a, const at::Tensor& rows) {
    y.index_copy_(0, rows, kron_mix_op().call(x.index_select(0, rows), slice(A, a), slice(B, a), gates.select(0, a)));
  });
  return y;
}

BackwardResult kron_mix_indexed_backward_cpu(
    const at::Tensor& grad_y,
    const at::Tensor& x,
    const at::Tensor& row_adapter,
    at::TensorList A,
    at::TensorList B,
    const at::Tensor& gates) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  int64_t n_adapters = 0;
  const auto s =
      check_kron_mix_indexed_args("kron_mix_indexed_backward", x, row_adapter, A, B, gates, &n_adapters);
  check_like_output("kron_mix_indexed_backward", "grad_y", grad_y, x, s.out);
  const auto by = rows_by_adapter("kron_mix_indexed_backward", row_adapter, n_adapters);
  auto gx = at::zeros(x.sizes(), x.options());
  std::vector<at::Tensor> gA, gB;
  for (const auto& t : A) gA.push_back(at::zeros(t.sizes(), t.options()));
  for (const auto& t : B) gB.push_back(at::zeros(t.sizes(), t.options()));
  auto gg = at::zeros(gates.sizes(), gates.options());
  each_adapter(by, [&](int64_t a, const at::Tensor& rows) {
    auto [gxa, gAa, gBa, gga] = kron_mix_backward_op().call(
        grad_y.index_select(0, rows), x.index_select(0, rows), slice(A, a), slice(B, a), gates.select(0, a));
    gx.index_copy_(0, rows, gxa);
    for (size_t j = 0; j < gA.size(); ++j) {
      gA[j].select(0, a).copy_(gAa[j]);
      gB[j].select(0, a).copy_(gBa[j]);
    }
    gg.select(0, a).copy_(gga);
  });
  return {gx, gA, gB, gg};
}

}  // namespace

TORCH_LIBRARY_IMPL(moka, CPU, m) {
  m.impl("kron_mix_indexed", kron_mix_indexed_cpu);
  m.impl("kron_mix_indexed_backward", kron_mix_indexed_backward_cpu);
}

}  // namespace moka
