// CUDA registration of the moka ops (TORCH_LIBRARY_IMPL(moka, CUDA)) and the
// ATen glue around the torch-free kernels of csrc/kron_mix.h.
//
// Which implementation runs is decided here, per call:
//  - the fused kernels for float16/bfloat16 when the factor shapes fit them
//    (each factor dim <= 128, <= 8 groups, shared memory): the forward v2
//    (kron_mix_fused_v2.cu), or v1 (kron_mix_fused.cu) for shapes whose
//    factors do not stay resident in shared memory; MOKA_CUDA_IMPL=fused_v1
//    forces v1 (forward and factor gradients), the baseline of benchmarks/cpp
//    and benchmarks/kernel_model.py;
//  - otherwise, or with MOKA_CUDA_IMPL=cublas, the reshape-matmul path
//    (csrc/kron_mix_matmul.cpp, device-generic): two GEMMs per group through
//    ATen (cuBLAS), the intermediate X B^T round-tripping through memory. float32 and float64 always take it; float32
//    GEMMs follow torch.backends.cuda.matmul.allow_tf32 (off by default), which
//    is the explicit TF32 opt-in.
// kron_mix_indexed's forward has its own kernel (kron_mix_indexed.cu, one
// launch for all adapters) under the same rules; its backward is the
// per-adapter composition of kron_mix_backward (moka_ext/ops.py).
// MOKA_CUDA_IMPL=fused makes an unsupported shape an error instead of a silent
// fallback (for tests and benchmarks). The fused backward computes dX with the
// forward kernel applied to (dY, A^T, B^T), and dA, dB, dg with the factor-
// gradient kernels, v2 (kron_mix_grad_v2.cu) or v1 as for the forward
// (per-CTA partials in a workspace, reduced in a fixed order);
// the reshape-matmul backward uses GEMMs and sums. No path uses atomics, so
// gradients are deterministic on a given device.
#include "../kron_mix.h"
#include "../kron_mix_matmul.h"
#include "../validate.h"

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <vector>

namespace moka {
namespace {

using cuda::DType;

DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kFloat: return DType::kFloat32;
    case at::kDouble: return DType::kFloat64;
    default: TORCH_CHECK(false, "moka CUDA kernels: unsupported dtype ", t);
  }
}

enum class Impl { kAuto, kFused, kFusedV1, kCublas };

Impl requested_impl() {
  const char* v = std::getenv("MOKA_CUDA_IMPL");
  if (v == nullptr || *v == '\0' || std::strcmp(v, "auto") == 0) return Impl::kAuto;
  if (std::strcmp(v, "fused") == 0) return Impl::kFused;
  if (std::strcmp(v, "fused_v1") == 0) return Impl::kFusedV1;
  if (std::strcmp(v, "cublas") == 0) return Impl::kCublas;
  TORCH_CHECK(false, "MOKA_CUDA_IMPL must be one of auto, fused, fused_v1, cublas; got '", v, "'");
}

cuda::FusedImpl fused_impl() {
  return requested_impl() == Impl::kFusedV1 ? cuda::FusedImpl::kV1 : cuda::FusedImpl::kAuto;
}

void check_cuda(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, what, " failed: ", cudaGetErrorString(err));
}

std::vector<at::Tensor> contiguous_all(at::TensorList list) {
  std::vector<at::Tensor> out;
  out.reserve(list.size());
  for (const auto& t : list) out.push_back(t.contiguous());
  return out;
}

// Params of the fused kernel for y[t] = [base[t] +] sum g A X_t B^T, with
// factors given as (r, ma, na) / (r, mb, nb).
cuda::KronMixParams fused_params(
    const KronMixShape& s,
    const at::Tensor& x2d,
    const std::vector<at::Tensor>& A,
    const std::vector<at::Tensor>& B,
    const at::Tensor& gates,
    const at::Tensor* base2d,
    at::Tensor& y2d) {
  cuda::KronMixParams p{};
  p.dtype = to_dtype(x2d.scalar_type());
  p.tokens = s.tokens;
  p.in = static_cast<int>(s.in);
  p.out = static_cast<int>(s.out);
  p.x = x2d.data_ptr();
  p.x_row_stride = x2d.stride(0);
  p.base = base2d ? base2d->data_ptr() : nullptr;
  p.base_row_stride = base2d ? base2d->stride(0) : 0;
  p.y = y2d.data_ptr();
  p.y_row_stride = y2d.stride(0);
  p.gates = gates.data_ptr();
  p.n_groups = static_cast<int>(A.size());
  for (size_t j = 0; j < A.size() && j < static_cast<size_t>(cuda::kFusedMaxGroups); ++j) {
    p.groups[j] = cuda::KronGroupParams{
        A[j].data_ptr(), B[j].data_ptr(), static_cast<int>(A[j].size(0)),
        static_cast<int>(A[j].size(1)), static_cast<int>(A[j].size(2)),
        static_cast<int>(B[j].size(1)), static_cast<int>(B[j].size(2)),
        static_cast<int>(s.groups[j].gate_offset)};
  }
  return p;
}

// The fused kernel's verdict on a problem: nullptr if it takes it.
const char* fused_verdict(const KronMixShape& s, at::ScalarType dtype) {
  if (dtype != at::kHalf && dtype != at::kBFloat16)
    return "the fused kernel takes float16/bfloat16 only";
  if (s.groups.size() > static_cast<size_t>(cuda::kFusedMaxGroups))
    return "more groups than the fused kernel takes (8)";
  if (s.in > (1 << 30) || s.out > (1 << 30)) return "layer too wide for the fused kernel";
  cuda::KronMixParams p{};
  p.dtype = to_dtype(dtype);
  p.tokens = s.tokens;
  p.in = static_cast<int>(s.in);
  p.out = static_cast<int>(s.out);
  p.n_groups = static_cast<int>(s.groups.size());
  for (size_t j = 0; j < s.groups.size(); ++j) {
    const auto& g = s.groups[j];
    p.groups[j] = cuda::KronGroupParams{
        nullptr, nullptr, static_cast<int>(g.r), static_cast<int>(g.ma), static_cast<int>(g.na),
        static_cast<int>(g.mb), static_cast<int>(g.nb), static_cast<int>(g.gate_offset)};
  }
  return cuda::kron_mix_fused_unsupported(p, fused_impl());
}

bool use_fused(const KronMixShape& s, at::ScalarType dtype, const char* op) {
  const Impl impl = requested_impl();
  if (impl == Impl::kCublas) return false;
  const char* why = fused_verdict(s, dtype);
  TORCH_CHECK(
      why == nullptr || (impl != Impl::kFused && impl != Impl::kFusedV1),
      op, ": MOKA_CUDA_IMPL=fused, but ", why, " (dtype ", dtype, ", in=", s.in,
      ", out=", s.out, ", groups=", s.groups.size(), ")");
  return why == nullptr;
}

void launch_fused(
    const KronMixShape& s,
    const at::Tensor& x2d,
    at::TensorList A,
    at::TensorList B,
    const at::Tensor& gates,
    const at::Tensor* base2d,
    at::Tensor& y2d) {
  const auto Ac = contiguous_all(A), Bc = contiguous_all(B);
  const auto gc = gates.contiguous();
  const auto p = fused_params(s, x2d, Ac, Bc, gc, base2d, y2d);
  check_cuda(
      cuda::kron_mix_fused_forward(p, at::cuda::getCurrentCUDAStream(), fused_impl()),
      "kron_mix fused kernel launch");
}

at::Tensor forward(
    const char* op,
    const KronMixShape& s,
    const at::Tensor& x,
    at::TensorList A,
    at::TensorList B,
    const at::Tensor& gates,
    const at::Tensor* base) {
  const auto x2d = rows_of(x, s.tokens, s.in);
  at::Tensor base2d;
  if (base) base2d = rows_of(*base, s.tokens, s.out);
  if (s.tokens == 0) return at::empty(out_sizes(x, s.out), x.options());
  if (use_fused(s, x.scalar_type(), op)) {
    auto y = at::empty({s.tokens, s.out}, x.options());
    launch_fused(s, x2d, A, B, gates, base ? &base2d : nullptr, y);
    return y.view(out_sizes(x, s.out));
  }
  return kron_mix_matmul_forward(s, x2d, A, B, gates, base ? &base2d : nullptr)
      .view(out_sizes(x, s.out));
}

at::Tensor kron_mix_cuda(
    const at::Tensor& x,
    at::TensorList A,
    at::TensorList B,
    const at::Tensor& gates) {
  const auto s = check_kron_mix_args("kron_mix", x, A, B, gates);
  c10::cuda::CUDAGuard guard(x.device());
  return forward("kron_mix", s, x, A, B, gates, nullptr);
}

at::Tensor kron_mix_add_cuda(
    const at::Tensor& base,
    const at::Tensor& x,
    at::TensorList A,
    at::TensorList B,
    const at::Tensor& gates) {
  const auto s = check_kron_mix_args("kron_mix_add", x, A, B, gates);
  check_like_output("kron_mix_add", "base", base, x, s.out);
  c10::cuda::CUDAGuard guard(x.device());
  return forward("kron_mix_add", s, x, A, B, gates, &base);
}

// The shape of the transposed problem dX = kron_mix(dY, A^T, B^T, g).
KronMixShape transposed(const KronMixShape& s) {
  KronMixShape t = s;
  std::swap(t.in, t.out);
  for (auto& g : t.groups) {
    std::swap(g.ma, g.na);
    std::swap(g.mb, g.nb);
  }
  return t;
}

KronMixBackward kron_mix_backward_cuda(
    const at::Tensor& grad_y,
    const at::Tensor& x,
    at::TensorList A,
    at::TensorList B,
    const at::Tensor& gates) {
  const auto s = check_kron_mix_args("kron_mix_backward", x, A, B, gates);
  check_like_output("kron_mix_backward", "grad_y", grad_y, x, s.out);
  c10::cuda::CUDAGuard guard(x.device());
  const auto dtype = x.scalar_type();
  const int64_t T = s.tokens;
  if (T == 0) return zero_grads(x, A, B, gates);
  const auto x2d = rows_of(x, T, s.in);
  const auto gy2d = rows_of(grad_y, T, s.out);

  // dX_t = sum g A^T dY_t B: the forward map of the transposed factors.
  const auto st = transposed(s);
  const bool fused_dx = use_fused(st, dtype, "kron_mix_backward");
  at::Tensor gx;
  if (fused_dx) {
    std::vector<at::Tensor> At, Bt;  // contiguous transposed factors
    for (const auto& a : A) At.push_back(a.transpose(1, 2).contiguous());
    for (const auto& b : B) Bt.push_back(b.transpose(1, 2).contiguous());
    gx = at::empty({T, s.in}, x.options());
    launch_fused(st, gy2d, At, Bt, gates, nullptr, gx);

    // dA, dB, dg: the fused factor-gradient kernels when they take the shapes.
    const auto Ac = contiguous_all(A);
    const auto gc = gates.contiguous();
    std::vector<at::Tensor> gA, gB;
    auto gg = at::empty({s.components}, x.options());
    cuda::KronGradParams p{};
    p.dtype = to_dtype(dtype);
    p.tokens = T;
    p.in = static_cast<int>(s.in);
    p.out = static_cast<int>(s.out);
    p.x = x2d.data_ptr();
    p.x_row_stride = x2d.stride(0);
    p.grad_y = gy2d.data_ptr();
    p.grad_y_row_stride = gy2d.stride(0);
    p.gates = gc.data_ptr();
    p.grad_gates = gg.data_ptr();
    p.n_groups = static_cast<int>(s.groups.size());
    for (size_t j = 0; j < s.groups.size(); ++j) {
      const auto& g = s.groups[j];
      gA.push_back(at::empty({g.r, g.ma, g.na}, x.options()));
      gB.push_back(at::empty({g.r, g.mb, g.nb}, x.options()));
      p.groups[j] = cuda::KronGradGroupParams{
          Ac[j].data_ptr(), Bt[j].data_ptr(), gA[j].data_ptr(), gB[j].data_ptr(),
          static_cast<int>(g.r), static_cast<int>(g.ma), static_cast<int>(g.na),
          static_cast<int>(g.mb), static_cast<int>(g.nb), static_cast<int>(g.gate_offset)};
    }
    const char* why = cuda::kron_mix_fused_grad_unsupported(p, fused_impl());
    TORCH_CHECK(
        why == nullptr || requested_impl() != Impl::kFused,
        "kron_mix_backward: MOKA_CUDA_IMPL=fused, but the factor-gradient kernel declines: ", why);
    if (why == nullptr) {
      const size_t bytes = cuda::kron_mix_fused_grad_workspace_bytes(p, fused_impl());
      auto ws = at::empty(
          {static_cast<int64_t>((bytes + sizeof(float) - 1) / sizeof(float))},
          x.options().dtype(at::kFloat));
      check_cuda(
          cuda::kron_mix_fused_grad_factors(p, ws.data_ptr(), bytes, at::cuda::getCurrentCUDAStream(), fused_impl()),
          "kron_mix fused factor-gradient launch");
      return {gx.view(x.sizes()), gA, gB, gg};
    }
  }

  // The reshape-matmul backward for what the fused kernels decline.
  auto g = kron_mix_matmul_backward(s, x2d, gy2d, A, B, gates, /*want_grad_x=*/!fused_dx);
  return {(fused_dx ? gx : g.grad_x).view(x.sizes()), g.grad_A, g.grad_B, g.grad_gates};
}

// kron_mix_indexed: rows sorted by adapter on the device (a stable argsort),
// one device->host copy of the per-adapter row counts, the tile schedule
// built on the host from the counts (a loop over adapters, not rows) and
// copied back, then one launch of the indexed kernel. Shapes it declines (or
// MOKA_CUDA_IMPL=cublas) take one kron_mix call per adapter on its gathered
// rows. Rows of adapter -1 are zero either way.
at::Tensor kron_mix_indexed_cuda(
    const at::Tensor& x,
    const at::Tensor& row_adapter,
    at::TensorList A,
    at::TensorList B,
    const at::Tensor& gates) {
  int64_t n_adapters = 0;
  const auto s = check_kron_mix_indexed_args("kron_mix_indexed", x, row_adapter, A, B, gates, &n_adapters);
  c10::cuda::CUDAGuard guard(x.device());
  const int64_t rows = x.size(0);
  if (s.tokens == 0) return at::zeros(out_sizes(x, s.out), x.options());
  // Counts of (below -1, -1, adapter 0 .. n_adapters-1, at or above n_adapters):
  // the out-of-range rows are counted rather than trusted.
  const auto bins = (row_adapter.clamp(-2, n_adapters) + 2).contiguous();
  const auto counts_all = at::bincount(bins, {}, n_adapters + 3).to(at::kCPU);
  const int64_t* c = counts_all.const_data_ptr<int64_t>();
  TORCH_CHECK(
      c[0] == 0 && c[n_adapters + 2] == 0,
      "kron_mix_indexed: row_adapter must be in [-1, ", n_adapters, ") (n_adapters from gates), got ",
      c[0] + c[n_adapters + 2], " rows outside");
  const std::vector<int64_t> counts(c + 1, c + n_adapters + 2);  // [-1, 0, .., n_adapters-1]
  const int64_t row_tokens = s.tokens / rows;
  const auto dtype = x.scalar_type();

  cuda::KronIndexedParams p{};
  const bool fits = s.groups.size() <= static_cast<size_t>(cuda::kFusedMaxGroups) &&
      (dtype == at::kHalf || dtype == at::kBFloat16) && s.in <= (1 << 30) && s.out <= (1 << 30);
  const char* why = fits ? nullptr : "the indexed kernel takes float16/bfloat16 and at most 8 groups";
  cuda::KronLaunchPlan plan{};
  if (fits) {
    p.dtype = to_dtype(dtype);
    p.rows = rows;
    p.row_tokens = row_tokens;
    p.in = static_cast<int>(s.in);
    p.out = static_cast<int>(s.out);
    p.n_adapters = static_cast<int>(n_adapters);
    p.n_groups = static_cast<int>(s.groups.size());
    for (size_t j = 0; j < s.groups.size(); ++j) {
      const auto& g = s.groups[j];
      p.groups[j] = cuda::KronGroupParams{
          nullptr, nullptr, static_cast<int>(g.r), static_cast<int>(g.ma), static_cast<int>(g.na),
          static_cast<int>(g.mb), static_cast<int>(g.nb), static_cast<int>(g.gate_offset)};
    }
    why = n_adapters > (1 << 30) ? "too many adapters" : cuda::kron_mix_indexed_plan(p, &plan);
  }
  const Impl impl = requested_impl();
  TORCH_CHECK(
      why == nullptr || (impl != Impl::kFused && impl != Impl::kFusedV1),
      "kron_mix_indexed: MOKA_CUDA_IMPL=fused, but ", why, " (dtype ", dtype, ", in=", s.in,
      ", out=", s.out, ", groups=", s.groups.size(), ")");

  const auto order = at::argsort(row_adapter, /*stable=*/true);
  if (why != nullptr || impl == Impl::kCublas) {
    auto y = at::zeros(out_sizes(x, s.out), x.options());
    int64_t start = counts[0];  // rows of -1 sort first
    for (int64_t a = 0; a < n_adapters; ++a) {
      const int64_t n = counts[a + 1];
      if (n == 0) continue;
      const auto idx = order.slice(0, start, start + n);
      std::vector<at::Tensor> Aa, Ba;
      for (const auto& t : A) Aa.push_back(t.select(0, a));
      for (const auto& t : B) Ba.push_back(t.select(0, a));
      y.index_copy_(0, idx, kron_mix_cuda(x.index_select(0, idx), Aa, Ba, gates.select(0, a)));
      start += n;
    }
    return y;
  }

  const int64_t n_tiles =
      cuda::kron_mix_indexed_schedule(counts.data(), p.n_adapters, row_tokens, plan.tile_tokens, nullptr);
  static_assert(sizeof(cuda::KronIndexedTile) == 2 * sizeof(int64_t), "tiles travel as int64 pairs");
  auto tiles_host = at::empty({n_tiles, 2}, at::TensorOptions().dtype(at::kLong));
  cuda::kron_mix_indexed_schedule(
      counts.data(), p.n_adapters, row_tokens, plan.tile_tokens,
      reinterpret_cast<cuda::KronIndexedTile*>(tiles_host.mutable_data_ptr<int64_t>()));
  const auto tiles = tiles_host.to(x.device());
  const auto xc = x.contiguous();
  const auto Ac = contiguous_all(A), Bc = contiguous_all(B);
  const auto gc = gates.contiguous();
  auto y = at::empty(out_sizes(x, s.out), x.options());
  p.x = xc.data_ptr();
  p.x_token_stride = s.in;
  p.y = y.data_ptr();
  p.y_token_stride = s.out;
  p.order = order.const_data_ptr<int64_t>();
  p.tiles = reinterpret_cast<const cuda::KronIndexedTile*>(tiles.const_data_ptr<int64_t>());
  p.n_tiles = n_tiles;
  p.gates = gc.data_ptr();
  for (size_t j = 0; j < s.groups.size(); ++j) {
    p.groups[j].A = Ac[j].data_ptr();
    p.groups[j].B = Bc[j].data_ptr();
  }
  check_cuda(
      cuda::kron_mix_indexed_forward(p, at::cuda::getCurrentCUDAStream()), "kron_mix_indexed kernel launch");
  return y;
}

at::Tensor gate_softmax_cuda(const at::Tensor& logits, double temperature) {
  check_gate_softmax_args("gate_softmax", logits, temperature);
  c10::cuda::CUDAGuard guard(logits.device());
  const auto in = logits.contiguous();
  auto out = at::empty_like(in);
  const int64_t n = in.size(-1);
  const int64_t rows = n == 0 ? 0 : in.numel() / n;
  check_cuda(
      cuda::gate_softmax_forward(
          to_dtype(in.scalar_type()), in.data_ptr(), out.data_ptr(), rows, n,
          1.0 / temperature, at::cuda::getCurrentCUDAStream()),
      "gate_softmax kernel launch");
  return out;
}

at::Tensor gate_softmax_backward_cuda(
    const at::Tensor& grad,
    const at::Tensor& output,
    double temperature) {
  check_gate_softmax_backward_args(grad, output, temperature);
  c10::cuda::CUDAGuard guard(output.device());
  const auto g = grad.contiguous();
  const auto s = output.contiguous();
  auto out = at::empty_like(s);
  const int64_t n = s.size(-1);
  const int64_t rows = n == 0 ? 0 : s.numel() / n;
  check_cuda(
      cuda::gate_softmax_backward(
          to_dtype(s.scalar_type()), g.data_ptr(), s.data_ptr(), out.data_ptr(), rows, n,
          1.0 / temperature, at::cuda::getCurrentCUDAStream()),
      "gate_softmax_backward kernel launch");
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(moka, CUDA, m) {
  m.impl("kron_mix", kron_mix_cuda);
  m.impl("kron_mix_add", kron_mix_add_cuda);
  m.impl("kron_mix_backward", kron_mix_backward_cuda);
  m.impl("kron_mix_indexed", kron_mix_indexed_cuda);
  m.impl("gate_softmax", gate_softmax_cuda);
  m.impl("gate_softmax_backward", gate_softmax_backward_cuda);
}

}  // namespace moka
