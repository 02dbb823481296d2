// Microbenchmark of the fused Kronecker-mixture kernel against cuBLAS, in
// bfloat16, without torch (kernels called through csrc/kron_mix.h).
//
// Per layer shape, token count T and rank r it times
//   v2, v1  : kron_mix_fused_forward with FusedImpl::kV2 / kV1 (Z = X B^T stays
//             on chip; v1 is the baseline of benchmarks/kernel_model.py)
//   cublas  : reshape-matmul, per group one GEMM Z = X B^T for all tokens and
//             components (Z written to HBM), then per component one strided-
//             batched GEMM Y_t += g_k A_k Z_t,k over tokens
//   dense   : y = x dW^T with the materialized dW (out x in)
// for the forward, and for the backward's input gradient dX = sum g A^T dY B
// (the same three on the transposed problem; dense: dX = dY dW). Rows "bwd"
// time the whole fused backward (dX + the factor-gradient kernels, v2 and v1) against
// the dense backward (dX = dY dW plus dW = dY^T X); the cuBLAS reshape-matmul
// dA/dB needs permutes and is timed through torch by bench_ops.py instead.
// Ceilings measured in the same run: device-to-device cudaMemcpy bandwidth and
// a large cuBLAS bf16 GEMM. Columns: time, GB/s (x read + y written), TFLOP/s
// (useful adapter FLOPs), % of copy bandwidth, % of GEMM ceiling, speedups.
#include "kron_mix.h"

#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <tuple>
#include <vector>

namespace {

void check(cudaError_t e, const char* what, int line) {
  if (e != cudaSuccess) {
    std::fprintf(stderr, "CUDA error at line %d (%s): %s\n", line, what, cudaGetErrorString(e));
    std::exit(1);
  }
}
void check(cublasStatus_t s, const char* what, int line) {
  if (s != CUBLAS_STATUS_SUCCESS) {
    std::fprintf(stderr, "cuBLAS error %d at line %d (%s)\n", static_cast<int>(s), line, what);
    std::exit(1);
  }
}
#define CK(x) check((x), #x, __LINE__)

__global__ void bench_fill_kernel(__nv_bfloat16* p, size_t n, uint32_t seed, float scale) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    uint32_t h = static_cast<uint32_t>(i) * 2654435761u ^ seed;
    h ^= h >> 15; h *= 2246822519u; h ^= h >> 13; h *= 3266489917u; h ^= h >> 16;
    p[i] = __float2bfloat16((static_cast<float>(h & 0xffffff) / 16777216.f - 0.5f) * 2.f * scale);
  }
}

struct Buf {
  __nv_bfloat16* p = nullptr;
  size_t n = 0;
  explicit Buf(size_t count, uint32_t seed = 0, float scale = 1.f) : n(count) {
    CK(cudaMalloc(&p, std::max<size_t>(count, 1) * sizeof(__nv_bfloat16)));
    if (count) {
      bench_fill_kernel<<<1024, 256>>>(p, count, seed, scale);
      CK(cudaGetLastError());
    }
  }
  ~Buf() { cudaFree(p); }
  Buf(const Buf&) = delete;
  Buf& operator=(const Buf&) = delete;
};

struct Group { int r, ma, na, mb, nb; };
struct Shape { std::string name; int in, out; std::vector<Group> groups; };

// Median over `reps` of the mean time of `iters` calls, in ms.
double time_ms(const std::function<void()>& f, int iters = 10, int reps = 5) {
  cudaEvent_t a, b;
  CK(cudaEventCreate(&a));
  CK(cudaEventCreate(&b));
  f();
  f();
  CK(cudaDeviceSynchronize());
  std::vector<double> t;
  for (int r = 0; r < reps; ++r) {
    CK(cudaEventRecord(a));
    for (int i = 0; i < iters; ++i) f();
    CK(cudaEventRecord(b));
    CK(cudaEventSynchronize(b));
    float ms = 0;
    CK(cudaEventElapsedTime(&ms, a, b));
    t.push_back(ms / iters);
  }
  CK(cudaEventDestroy(a));
  CK(cudaEventDestroy(b));
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

// Row-major C (M x N, ldc) = alpha * A (M x K, lda) * op(B) + beta * C, where
// B is given row-major as (N x K) if b_rows_are_n (C = A B^T) else (K x N).
// cuBLAS is column-major: compute C^T = op(B)^T A^T.
void gemm_rm(cublasHandle_t h, int M, int N, int K, float alpha, const __nv_bfloat16* A, int lda,
             const __nv_bfloat16* B, int ldb, bool b_rows_are_n, float beta, __nv_bfloat16* C, int ldc,
             long long sA = 0, long long sB = 0, long long sC = 0, int batch = 1) {
  const cublasOperation_t opB = b_rows_are_n ? CUBLAS_OP_T : CUBLAS_OP_N;
  CK(cublasGemmStridedBatchedEx(h, opB, CUBLAS_OP_N, N, M, K, &alpha, B, CUDA_R_16BF, ldb, sB, A,
                                CUDA_R_16BF, lda, sA, &beta, C, CUDA_R_16BF, ldc, sC, batch,
                                CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

// One benchmark problem: factors, gates and the device params.
struct Problem {
  Shape shape;
  std::vector<Buf*> A, B;
  Buf* gates;
  std::vector<float> host_gates;
  int components = 0;

  explicit Problem(const Shape& s) : shape(s) {
    for (const auto& g : s.groups) components += g.r;
    gates = new Buf(components, 7, 1.f);
    host_gates.resize(components);
    std::vector<__nv_bfloat16> hg(components);
    CK(cudaMemcpy(hg.data(), gates->p, components * 2, cudaMemcpyDeviceToHost));
    for (int i = 0; i < components; ++i) host_gates[i] = __bfloat162float(hg[i]);
    uint32_t seed = 11;
    for (const auto& g : s.groups) {
      A.push_back(new Buf(size_t(g.r) * g.ma * g.na, seed++, 1.f / std::sqrt(float(g.na))));
      B.push_back(new Buf(size_t(g.r) * g.mb * g.nb, seed++, 1.f / std::sqrt(float(g.nb))));
    }
  }
  ~Problem() {
    for (auto* p : A) delete p;
    for (auto* p : B) delete p;
    delete gates;
  }

  moka::cuda::KronMixParams params(const __nv_bfloat16* x, __nv_bfloat16* y, int64_t T) const {
    moka::cuda::KronMixParams p{};
    p.dtype = moka::cuda::DType::kBFloat16;
    p.tokens = T;
    p.in = shape.in;
    p.out = shape.out;
    p.x = x;
    p.x_row_stride = shape.in;
    p.y = y;
    p.y_row_stride = shape.out;
    p.gates = gates->p;
    p.n_groups = static_cast<int>(shape.groups.size());
    int off = 0;
    for (size_t j = 0; j < shape.groups.size(); ++j) {
      const auto& g = shape.groups[j];
      p.groups[j] = {A[j]->p, B[j]->p, g.r, g.ma, g.na, g.mb, g.nb, off};
      off += g.r;
    }
    return p;
  }

  double flops(int64_t T) const {
    double f = 0;
    for (const auto& g : shape.groups)
      f += 2.0 * g.r * (double(g.na) * g.nb * g.mb + double(g.ma) * g.na * g.mb);
    return f * T;
  }

  size_t z_elems(int64_t T) const {
    size_t m = 0;
    for (const auto& g : shape.groups) m = std::max(m, size_t(T) * g.na * g.r * g.mb);
    return m;
  }

  // Reshape-matmul through cuBLAS; z is scratch of z_elems(T).
  void cublas_forward(cublasHandle_t h, const __nv_bfloat16* x, __nv_bfloat16* y, __nv_bfloat16* z,
                      int64_t T) const {
    int off = 0;
    bool first = true;
    for (size_t j = 0; j < shape.groups.size(); ++j) {
      const auto& g = shape.groups[j];
      // Z[(t, a)][(k, d)] = sum_b X[(t, a)][b] B[(k, d)][b]
      gemm_rm(h, static_cast<int>(T * g.na), g.r * g.mb, g.nb, 1.f, x, g.nb, B[j]->p, g.nb, true, 0.f, z,
              g.r * g.mb);
      for (int k = 0; k < g.r; ++k) {
        // Y_t (ma x mb) += g_k A_k (ma x na) Z_t[:, k*mb : (k+1)*mb], batched over t.
        gemm_rm(h, g.ma, g.mb, g.na, host_gates[off + k], A[j]->p + size_t(k) * g.ma * g.na, g.na,
                z + size_t(k) * g.mb, g.r * g.mb, false, first ? 0.f : 1.f, y, g.mb,
                /*sA=*/0, /*sB=*/(long long)g.na * g.r * g.mb, /*sC=*/shape.out, static_cast<int>(T));
        first = false;
      }
      off += g.r;
    }
  }
};

// The transposed problem (dX = sum g A^T dY B is the forward map of A^T, B^T).
Shape transposed(const Shape& s) {
  Shape t{s.name, s.out, s.in, {}};
  for (const auto& g : s.groups) t.groups.push_back({g.r, g.na, g.ma, g.nb, g.mb});
  return t;
}

struct Ceilings { double copy_gbs, gemm_tflops; };

Ceilings measure_ceilings(cublasHandle_t h) {
  const size_t bytes = size_t(1) << 30;
  void *a, *b;
  CK(cudaMalloc(&a, bytes));
  CK(cudaMalloc(&b, bytes));
  CK(cudaMemset(a, 0, bytes));
  const double ms_copy = time_ms([&] { CK(cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice)); });
  CK(cudaFree(a));
  CK(cudaFree(b));
  const int n = 8192;
  Buf A(size_t(n) * n, 1), B(size_t(n) * n, 2), C(size_t(n) * n, 3);
  const double ms_gemm = time_ms([&] { gemm_rm(h, n, n, n, 1.f, A.p, n, B.p, n, true, 0.f, C.p, n); });
  return {2.0 * bytes / ms_copy / 1e6, 2.0 * n * double(n) * n / ms_gemm / 1e9};
}

Shape uniform(const std::string& name, int r, int ma, int na, int mb, int nb) {
  return {name, na * nb, ma * mb, {{r, ma, na, mb, nb}}};
}

std::vector<Shape> shapes_for(int r) {
  std::vector<Shape> v;
  v.push_back(uniform("4096x4096 A64x64 B64x64", r, 64, 64, 64, 64));
  v.push_back(uniform("4096x4096 A16x16 B256x256", r, 16, 16, 256, 256));
  {
    Shape m{"4096x4096 mixed 64x64+32x128", 4096, 4096, {}};
    const int r1 = std::max(1, r / 2), r2 = r - r1;
    m.groups.push_back({r1, 64, 64, 64, 64});
    if (r2 > 0) m.groups.push_back({r2, 32, 128, 128, 32});
    v.push_back(m);
  }
  v.push_back(uniform("4096->14336 A112x64 B128x64", r, 112, 64, 128, 64));
  v.push_back(uniform("14336->4096 A64x112 B64x128", r, 64, 112, 64, 128));
  return v;
}

// The whole backward of the original layer `f` per version (v2: dX by the
// v2 forward + v2 factor gradients; v1: both v1), against dense dX + dW =
// dY^T X; ms_dx[0] and ms_dx[1] are the dX times of v2 and v1 (< 0: declined). `prob` holds the
// transposed factors, whose buffers have the sizes of A and B^T; dy is
// T x f.out and x is T x f.in (values do not matter for timing).
void backward_row(cublasHandle_t h, const Shape& f, const Problem& prob, int r, int64_t T, const __nv_bfloat16* dy,
                  const __nv_bfloat16* x, const double (&ms_dx)[2], double ms_dense_dx, const Ceilings& ceil) {
  moka::cuda::KronGradParams gp{};
  gp.dtype = moka::cuda::DType::kBFloat16;
  gp.tokens = T;
  gp.in = f.in;
  gp.out = f.out;
  gp.x = x;
  gp.x_row_stride = f.in;
  gp.grad_y = dy;
  gp.grad_y_row_stride = f.out;
  gp.gates = prob.gates->p;
  Buf gg(prob.components);
  gp.grad_gates = gg.p;
  gp.n_groups = static_cast<int>(f.groups.size());
  std::vector<Buf*> bufs;
  double grad_flops = 0;
  int off = 0;
  for (size_t j = 0; j < f.groups.size(); ++j) {
    const Group& g = f.groups[j];
    bufs.push_back(new Buf(size_t(g.r) * g.ma * g.na));
    bufs.push_back(new Buf(size_t(g.r) * g.mb * g.nb));
    gp.groups[j] = {prob.A[j]->p, prob.B[j]->p, bufs[bufs.size() - 2]->p, bufs.back()->p,
                    g.r, g.ma, g.na, g.mb, g.nb, off};
    off += g.r;
    grad_flops += 4.0 * g.r * (double(g.ma) * g.mb * g.nb + double(g.ma) * g.na * g.nb) * T;
  }
  // Dense dW = dY^T X (out x in, K = T); column-major: dW^T = X^T dY.
  Buf dW(size_t(f.out) * f.in);
  const float one = 1.f, zero = 0.f;
  const double ms_dense_dw = time_ms([&] {
    CK(cublasGemmEx(h, CUBLAS_OP_N, CUBLAS_OP_T, f.in, f.out, static_cast<int>(T), &one, x, CUDA_R_16BF, f.in, dy,
                    CUDA_R_16BF, f.out, &zero, dW.p, CUDA_R_16BF, f.in, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  });
  const double ms_dense = ms_dense_dx + ms_dense_dw;
  using moka::cuda::FusedImpl;
  const std::tuple<int, FusedImpl, const char*> versions[] = {{0, FusedImpl::kV2, "v2"}, {1, FusedImpl::kV1, "v1"}};
  for (const auto& version : versions) {
    const int v = std::get<0>(version);
    const FusedImpl impl = std::get<1>(version);
    const char* name = std::get<2>(version);
    const char* why = ms_dx[v] < 0 ? "dX: the forward declines" : moka::cuda::kron_mix_fused_grad_unsupported(gp, impl);
    if (why != nullptr) {
      std::printf("%-6s %-32s %2d %6lld %-6s n/a (%s); dense %.4f ms\n", "bwd", f.name.c_str(), r,
                  static_cast<long long>(T), name, why, ms_dense);
      continue;
    }
    const size_t ws_bytes = moka::cuda::kron_mix_fused_grad_workspace_bytes(gp, impl);
    void* ws = nullptr;
    CK(cudaMalloc(&ws, std::max<size_t>(ws_bytes, 16)));
    const double ms_grad = time_ms([&] { CK(moka::cuda::kron_mix_fused_grad_factors(gp, ws, ws_bytes, 0, impl)); });
    CK(cudaFree(ws));
    const double ms = ms_dx[v] + ms_grad;
    const double bytes = 2.0 * T * (2.0 * f.in + f.out);  // read x and dY, write dX
    const double gbs = bytes / ms / 1e6, tf = (prob.flops(T) + grad_flops) / ms / 1e9;
    std::printf("%-6s %-32s %2d %6lld %-6s %9.4f %8.0f %8.1f %5.0f%% %5.0f%% %9s %9.4f %8s %7.2fx  (dX %.4f + dA/dB/dg %.4f ms)\n",
                "bwd", f.name.c_str(), r, static_cast<long long>(T), name, ms, gbs, tf, 100 * gbs / ceil.copy_gbs,
                100 * tf / ceil.gemm_tflops, "-", ms_dense, "-", ms_dense / ms, ms_dx[v], ms_grad);
  }
  for (auto* b : bufs) delete b;
}

}  // namespace

int main(int argc, char** argv) {
  bool quick = false;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--quick") == 0) quick = true;
    else {
      std::fprintf(stderr, "usage: %s [--quick]\n", argv[0]);
      return 2;
    }
  }
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, 0));
  cublasHandle_t h;
  CK(cublasCreate(&h));
  const Ceilings ceil = measure_ceilings(h);
  std::printf("device: %s (sm_%d%d, %d SMs)\n", prop.name, prop.major, prop.minor, prop.multiProcessorCount);
  std::printf("ceilings: copy %.0f GB/s (D2D memcpy, read+write), bf16 GEMM %.0f TFLOP/s (8192^3 cuBLAS)\n",
              ceil.copy_gbs, ceil.gemm_tflops);
  std::printf("%-6s %-32s %2s %6s %-6s %9s %8s %8s %6s %6s %9s %9s %8s %8s\n", "pass", "shape", "r", "T",
              "impl", "ms", "GB/s", "TFLOP/s", "%copy", "%gemm", "cublas_ms", "dense_ms", "x_cublas", "x_dense");

  const std::vector<int64_t> tokens = quick ? std::vector<int64_t>{8192} : std::vector<int64_t>{2048, 8192, 32768};
  const std::vector<int> ranks = quick ? std::vector<int>{1, 2, 4} : std::vector<int>{1, 2, 4, 8};
  for (int pass = 0; pass < 2; ++pass) {  // 0: forward, 1: backward dX
    for (int r : ranks) {
      for (const Shape& fwd_shape : shapes_for(r)) {
        const Shape s = pass == 0 ? fwd_shape : transposed(fwd_shape);
        Problem prob(s);
        for (int64_t T : tokens) {
          Buf x(size_t(T) * s.in, 5), y(size_t(T) * s.out, 0), z(prob.z_elems(T), 0);
          Buf dW(size_t(s.out) * s.in, 9, 1e-2f);
          const auto p = prob.params(x.p, y.p, T);
          using moka::cuda::FusedImpl;
          const char* why_v1 = moka::cuda::kron_mix_fused_unsupported(p, FusedImpl::kV1);
          const char* why_v2 = moka::cuda::kron_mix_fused_unsupported(p, FusedImpl::kV2);
          double ms_v1 = -1, ms_v2 = -1;
          if (why_v1 == nullptr) ms_v1 = time_ms([&] { CK(moka::cuda::kron_mix_fused_forward(p, 0, FusedImpl::kV1)); });
          if (why_v2 == nullptr) ms_v2 = time_ms([&] { CK(moka::cuda::kron_mix_fused_forward(p, 0, FusedImpl::kV2)); });
          const double ms_cublas = time_ms([&] { prob.cublas_forward(h, x.p, y.p, z.p, T); });
          // Dense: y (T x out) = x (T x in) dW^T, dW (out x in).
          const double ms_dense =
              time_ms([&] { gemm_rm(h, static_cast<int>(T), s.out, s.in, 1.f, x.p, s.in, dW.p, s.in, true, 0.f, y.p, s.out); });
          const double bytes = 2.0 * T * (s.in + s.out);
          const double fl = prob.flops(T);
          auto row = [&](const char* impl, double ms) {
            const double gbs = bytes / ms / 1e6, tf = fl / ms / 1e9;
            std::printf("%-6s %-32s %2d %6lld %-6s %9.4f %8.0f %8.1f %5.0f%% %5.0f%% %9.4f %9.4f %7.2fx %7.2fx\n",
                        pass == 0 ? "fwd" : "bwd_dx", s.name.c_str(), r, static_cast<long long>(T), impl, ms, gbs, tf,
                        100 * gbs / ceil.copy_gbs, 100 * tf / ceil.gemm_tflops, ms_cublas, ms_dense,
                        ms_cublas / ms, ms_dense / ms);
          };
          for (auto [impl, ms, no] : {std::tuple{"v2", ms_v2, why_v2}, std::tuple{"v1", ms_v1, why_v1}}) {
            if (ms > 0) row(impl, ms);
            else std::printf("%-6s %-32s %2d %6lld %-6s n/a (%s)\n", pass == 0 ? "fwd" : "bwd_dx", s.name.c_str(), r,
                             static_cast<long long>(T), impl, no);
          }
          row("cublas", ms_cublas);
          if (pass == 1) backward_row(h, fwd_shape, prob, r, T, x.p, y.p, {ms_v2, ms_v1}, ms_dense, ceil);
        }
      }
    }
  }
  CK(cublasDestroy(h));
  return 0;
}
