// CPU kernels of gate_softmax: softmax(logits / temperature) over the last dim,
// accumulated in at::opmath_type (float32 for low-precision inputs).
#include "../validate.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>

namespace moka {
namespace {

at::Tensor gate_softmax_cpu(const at::Tensor& logits, double temperature) {
  check_gate_softmax_args("gate_softmax", logits, temperature);
  const auto in = logits.contiguous();
  auto out = at::empty_like(in);
  const int64_t n = in.size(-1);
  const int64_t rows = n == 0 ? 0 : in.numel() / n;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, in.scalar_type(), "gate_softmax_cpu", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const scalar_t* src = in.const_data_ptr<scalar_t>();
        scalar_t* dst = out.mutable_data_ptr<scalar_t>();
        const acc_t inv_t = acc_t(1) / static_cast<acc_t>(temperature);
        at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
          for (int64_t r = begin; r < end; ++r) {
            const scalar_t* l = src + r * n;
            scalar_t* o = dst + r * n;
            acc_t m = -INFINITY;
            bool has_nan = false;
            for (int64_t i = 0; i < n; ++i) {
              const acc_t v = static_cast<acc_t>(l[i]) * inv_t;
              has_nan |= std::isnan(v);
              m = std::max(m, v);
            }
            if (has_nan) m = NAN;  // propagate NaN to the whole row
            acc_t sum = 0;
            for (int64_t i = 0; i < n; ++i) sum += std::exp(static_cast<acc_t>(l[i]) * inv_t - m);
            for (int64_t i = 0; i < n; ++i)
              o[i] = static_cast<scalar_t>(std::exp(static_cast<acc_t>(l[i]) * inv_t - m) / sum);
          }
        });
      });
  return out;
}

// dlogits = s * (ds - <s, ds>) / temperature, per row.
at::Tensor gate_softmax_backward_cpu(
    const at::Tensor& grad,
    const at::Tensor& output,
    double temperature) {
  check_gate_softmax_backward_args(grad, output, temperature);
  const auto g = grad.contiguous();
  const auto s = output.contiguous();
  auto out = at::empty_like(s);
  const int64_t n = s.size(-1);
  const int64_t rows = n == 0 ? 0 : s.numel() / n;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, s.scalar_type(), "gate_softmax_backward_cpu", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const scalar_t* gp = g.const_data_ptr<scalar_t>();
        const scalar_t* sp = s.const_data_ptr<scalar_t>();
        scalar_t* op = out.mutable_data_ptr<scalar_t>();
        const acc_t inv_t = acc_t(1) / static_cast<acc_t>(temperature);
        at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
          for (int64_t r = begin; r < end; ++r) {
            acc_t dot = 0;
            for (int64_t i = 0; i < n; ++i)
              dot += static_cast<acc_t>(gp[r * n + i]) * static_cast<acc_t>(sp[r * n + i]);
            for (int64_t i = 0; i < n; ++i) {
              const acc_t si = static_cast<acc_t>(sp[r * n + i]);
              op[r * n + i] = static_cast<scalar_t>(
                  si * (static_cast<acc_t>(gp[r * n + i]) - dot) * inv_t);
            }
          }
        });
      });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(moka, CPU, m) {
  m.impl("gate_softmax", gate_softmax_cpu);
  m.impl("gate_softmax_backward", gate_softmax_backward_cpu);
}

}  // namespace moka
