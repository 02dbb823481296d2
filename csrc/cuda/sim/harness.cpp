// moka_sim: runs one call of a csrc/cuda kernel entry point (csrc/kron_mix.h)
// under the SIMT simulator. Inputs are raw little-endian files in --dir, laid
// out exactly as the kernel reads them: every buffer starts --offset elements
// before the pointer the kernel gets (so --offset 1 misaligns every pointer),
// and rows are --*-stride elements apart. Outputs are written the same way,
// prefix and gaps included, after being filled with 0xFF before the launch.
// Every buffer is allocated at its exact size, so AddressSanitizer reports a
// read or write past it. stdout reports the
// planner's verdict, every launch (grid, block, shared memory) and the result.
// python_tests/cuda_sim.py builds it, writes the inputs and checks the outputs.
//
//   moka_sim fwd      --dtype bf16 --tokens T --groups r:ma:na:mb:nb[,...] [--base]
//                     [--x-stride S] [--y-stride S] [--base-stride S] [--offset E]
//                     [--impl auto|v1|v2]
//   moka_sim plan     --tokens T --groups ... [--impl ...]  (the planners' launch plans of the
//                     forward and the factor gradients as JSON lines, for benchmarks/kernel_model.py)
//   moka_sim indexed  --dtype f16 --rows R --row-tokens S --adapters N --groups ... [--x-stride S]
//                     [--y-stride S] [--offset E]  (kron_mix_indexed: row_adapter.bin holds R
//                     int64 entries in [-1, N); A_j, B_j, gates carry N adapters; the harness
//                     sorts the rows and builds the schedule as the ATen glue does)
//   moka_sim grad     --dtype f16 --tokens T --groups ... [--x-stride S] [--gy-stride S] [--offset E]
//                     [--impl auto|v1|v2]
//   moka_sim softmax_fwd | softmax_bwd --dtype f32 --rows R --n N --inv-temp V
//   moka_sim limits   --grid x,y,z --block x,y,z --smem N [--opt-in N]   (a trivial kernel)
//   moka_sim selftest NAME   (a kernel with a known defect; see selftest())
// common: --dir DIR --seed S --arch sm_90|sm_80 --dry-run (validate launches, run nothing)
//         --verdict-only (print the planner's verdict and stop)
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "../../kron_mix.h"
#include "../launch.cuh"
#include "../ptx.cuh"
#include "simt.h"


namespace {

using moka::cuda::DType;

struct Args {
  std::string op, dir = ".", dtype = "bf16", groups, impl = "auto";
  long long tokens = 0, x_stride = -1, y_stride = -1, base_stride = -1, gy_stride = -1, offset = 0;
  long long rows = 0, n = 0, smem = 0, opt_in = -1, row_tokens = 1, adapters = 1;
  dim3 grid{1, 1, 1}, block{1, 1, 1};
  std::string name;
  double inv_temp = 1.0;
  bool base = false, dry_run = false, verdict_only = false;
};

[[noreturn]] void usage(const char* why) {
  std::fprintf(stderr, "moka_sim: %s (see the header of csrc/cuda/sim/harness.cpp)\n", why);
  std::exit(2);
}

dim3 parse_dim3(const char* s) {
  unsigned x = 1, y = 1, z = 1;
  if (std::sscanf(s, "%u,%u,%u", &x, &y, &z) < 1) usage("a dim3 is x[,y[,z]]");
  return dim3(x, y, z);
}

Args parse(int argc, char** argv) {
  Args a;
  if (argc < 2) usage("missing op");
  a.op = argv[1];
  for (int i = 2; i < argc; ++i) {
    const std::string k = argv[i];
    auto val = [&]() -> const char* {
      if (i + 1 >= argc) usage(("missing value for " + k).c_str());
      return argv[++i];
    };
    if (k == "--dir") a.dir = val();
    else if (k == "--dtype") a.dtype = val();
    else if (k == "--groups") a.groups = val();
    else if (k == "--impl") a.impl = val();
    else if (k == "--tokens") a.tokens = std::atoll(val());
    else if (k == "--x-stride") a.x_stride = std::atoll(val());
    else if (k == "--y-stride") a.y_stride = std::atoll(val());
    else if (k == "--base-stride") a.base_stride = std::atoll(val());
    else if (k == "--gy-stride") a.gy_stride = std::atoll(val());
    else if (k == "--offset") a.offset = std::atoll(val());
    else if (k == "--rows") a.rows = std::atoll(val());
    else if (k == "--row-tokens") a.row_tokens = std::atoll(val());
    else if (k == "--adapters") a.adapters = std::atoll(val());
    else if (k == "--n") a.n = std::atoll(val());
    else if (k == "--inv-temp") a.inv_temp = std::atof(val());
    else if (k == "--grid") a.grid = parse_dim3(val());
    else if (k == "--block") a.block = parse_dim3(val());
    else if (k == "--smem") a.smem = std::atoll(val());
    else if (k == "--opt-in") a.opt_in = std::atoll(val());
    else if (k == "--name") a.name = val();
    else if (k == "--seed") moka_sim::set_seed(std::strtoull(val(), nullptr, 10));
    else if (k == "--arch") {
      const char* v = val();
      if (!moka_sim::set_arch(v)) usage("unknown --arch");
    } else if (k == "--base") a.base = true;
    else if (k == "--dry-run") a.dry_run = true;
    else if (k == "--verdict-only") a.verdict_only = true;
    else usage(("unknown option " + k).c_str());
  }
  return a;
}

DType dtype_of(const std::string& s) {
  if (s == "f16") return DType::kFloat16;
  if (s == "bf16") return DType::kBFloat16;
  if (s == "f32") return DType::kFloat32;
  if (s == "f64") return DType::kFloat64;
  usage("--dtype must be f16, bf16, f32 or f64");
}

size_t elem_size(DType t) { return t == DType::kFloat64 ? 8 : t == DType::kFloat32 ? 4 : 2; }

struct Group {
  int r, ma, na, mb, nb;
};

std::vector<Group> parse_groups(const std::string& s) {
  std::vector<Group> gs;
  size_t pos = 0;
  while (pos < s.size()) {
    size_t end = s.find(',', pos);
    if (end == std::string::npos) end = s.size();
    Group g{};
    if (std::sscanf(s.substr(pos, end - pos).c_str(), "%d:%d:%d:%d:%d", &g.r, &g.ma, &g.na, &g.mb, &g.nb) != 5)
      usage("--groups wants r:ma:na:mb:nb[,...]");
    gs.push_back(g);
    pos = end + 1;
  }
  if (gs.empty() || gs.size() > size_t(moka::cuda::kFusedMaxGroups)) usage("--groups: 1 to 8 groups");
  return gs;
}

std::vector<void*> g_allocs;

unsigned char* alloc_exact(size_t bytes) {
  // malloc(0) may return nullptr; a 1-byte allocation keeps pointers valid.
  void* p = std::malloc(bytes ? bytes : 1);
  if (!p) usage("out of memory");
  g_allocs.push_back(p);
  return static_cast<unsigned char*>(p);
}

unsigned char* read_input(const Args& a, const std::string& name, size_t expect_bytes) {
  const std::string path = a.dir + "/" + name + ".bin";
  FILE* f = std::fopen(path.c_str(), "rb");
  if (!f) usage(("cannot open " + path).c_str());
  std::fseek(f, 0, SEEK_END);
  const long size = std::ftell(f);
  std::fseek(f, 0, SEEK_SET);
  if (size < 0 || size_t(size) != expect_bytes) {
    std::fprintf(stderr, "moka_sim: %s has %ld bytes, expected %zu\n", path.c_str(), size, expect_bytes);
    std::exit(2);
  }
  unsigned char* p = alloc_exact(expect_bytes);
  if (expect_bytes && std::fread(p, 1, expect_bytes, f) != expect_bytes) usage("short read");
  std::fclose(f);
  return p;
}

unsigned char* new_output(size_t bytes) {
  unsigned char* p = alloc_exact(bytes);
  std::memset(p, 0xff, bytes);
  return p;
}

void write_output(const Args& a, const std::string& name, const unsigned char* p, size_t bytes) {
  const std::string path = a.dir + "/" + name + ".bin";
  FILE* f = std::fopen(path.c_str(), "wb");
  if (!f || std::fwrite(p, 1, bytes, f) != bytes) usage(("cannot write " + path).c_str());
  std::fclose(f);
}

// Bytes of a (rows, width) matrix with row stride `stride`, without the
// --offset prefix.
size_t strided_bytes(long long rows, long long width, long long stride, size_t es) {
  if (rows == 0) return 0;
  return size_t((rows - 1) * stride + width) * es;
}

unsigned char* dry_run_pointer() {
  alignas(16) static unsigned char never_read[16];
  return never_read;
}

int finish(cudaError_t err) {
  std::printf("result: %s\n", cudaGetErrorName(err));
  return err == cudaSuccess ? 0 : 1;
}

// The buffers of one call: inputs read from --dir, outputs filled with 0xFF
// and written back after a successful launch, each with the --offset prefix
// in front of the pointer the kernel gets. A dry run validates launches only:
// nothing is allocated or touched.
class Buffers {
 public:
  Buffers(const Args& a, size_t es) : a_(a), es_(es), lead_(size_t(a.offset) * es) {}
  size_t flat(size_t elems) const { return elems * es_; }
  size_t rows(long long n, long long width, long long stride) const { return strided_bytes(n, width, stride, es_); }
  const void* in(const std::string& name, size_t bytes) {
    return a_.dry_run ? dry_run_pointer() : read_input(a_, name, lead_ + bytes) + lead_;
  }
  void* out(const std::string& name, size_t bytes) {
    if (a_.dry_run) return dry_run_pointer();
    unsigned char* p = new_output(lead_ + bytes);
    outs_.push_back({name, p, lead_ + bytes});
    return p + lead_;
  }
  void write_outputs() const {
    for (const auto& o : outs_) write_output(a_, o.name, o.data, o.bytes);
  }

 private:
  struct Out {
    std::string name;
    unsigned char* data;
    size_t bytes;
  };
  const Args& a_;
  size_t es_, lead_;
  std::vector<Out> outs_;
};

moka::cuda::FusedImpl impl_of(const std::string& s) {
  if (s == "auto") return moka::cuda::FusedImpl::kAuto;
  if (s == "v1") return moka::cuda::FusedImpl::kV1;
  if (s == "v2") return moka::cuda::FusedImpl::kV2;
  usage("--impl must be auto, v1 or v2");
}

void print_plan(const char* kernel, const char* impl, const char* why, const moka::cuda::KronLaunchPlan& q) {
  if (why != nullptr) {
    std::printf("{\"kernel\": \"%s\", \"version\": \"%s\", \"declined\": \"%s\"}\n", kernel, impl, why);
    return;
  }
  std::printf(
      "{\"kernel\": \"%s\", \"version\": \"%s\", \"tile_tokens\": %d, \"tiles\": %lld, \"ctas\": %lld, "
      "\"threads\": %d, \"stages\": %d, \"factor_loads\": %d, \"barriers_per_tile\": %d, "
      "\"smem_bytes\": %zu, \"mma_per_tile\": %lld, \"smem_bytes_per_tile\": %lld, \"chunks\": %lld, "
      "\"tile_load_bytes\": %lld, \"workspace_bytes\": %lld}\n",
      kernel, impl, q.tile_tokens, (long long)q.tiles, (long long)q.ctas, q.threads, q.stages, q.factor_loads,
      q.barriers_per_tile, q.smem_bytes, (long long)q.mma_per_tile, (long long)q.smem_bytes_per_tile,
      (long long)q.chunks, (long long)q.tile_load_bytes, (long long)q.workspace_bytes);
}

// The launch plans of the forward (v1 and v2) and of the factor-gradient and
// reduce kernels for one problem on the simulated device (--arch).
int run_plan(const Args& a) {
  const auto gs = parse_groups(a.groups);
  moka::cuda::KronMixParams p{};
  moka::cuda::KronGradParams q{};
  p.dtype = q.dtype = dtype_of(a.dtype);
  p.tokens = q.tokens = a.tokens;
  p.in = q.in = gs[0].na * gs[0].nb;
  p.out = q.out = gs[0].ma * gs[0].mb;
  p.n_groups = q.n_groups = int(gs.size());
  int off = 0;
  for (size_t j = 0; j < gs.size(); ++j) {
    const Group& g = gs[j];
    p.groups[j] = moka::cuda::KronGroupParams{nullptr, nullptr, g.r, g.ma, g.na, g.mb, g.nb, off};
    q.groups[j] = moka::cuda::KronGradGroupParams{nullptr, nullptr, nullptr, nullptr, g.r, g.ma, g.na, g.mb, g.nb, off};
    off += g.r;
  }
  moka::cuda::KronLaunchPlan lp{};
  for (auto [impl, name] : {std::pair{moka::cuda::FusedImpl::kV1, "v1"}, std::pair{moka::cuda::FusedImpl::kV2, "v2"}}) {
    print_plan("fwd", name, moka::cuda::kron_mix_fused_plan(p, impl, &lp), lp);
  }
  for (auto [impl, name] : {std::pair{moka::cuda::FusedImpl::kV1, "v1"}, std::pair{moka::cuda::FusedImpl::kV2, "v2"}}) {
    print_plan("grad_factors", name, moka::cuda::kron_mix_fused_grad_plan(q, 0, impl, &lp), lp);
    print_plan("grad_reduce", name, moka::cuda::kron_mix_fused_grad_plan(q, 1, impl, &lp), lp);
  }
  print_plan("grad_gates", "v2", moka::cuda::kron_mix_fused_grad_plan(q, 2, moka::cuda::FusedImpl::kV2, &lp), lp);
  return 0;
}

int run_fwd(const Args& a) {
  const DType dt = dtype_of(a.dtype);
  const auto gs = parse_groups(a.groups);
  moka::cuda::KronMixParams p{};
  p.dtype = dt;
  p.tokens = a.tokens;
  p.in = gs[0].na * gs[0].nb;
  p.out = gs[0].ma * gs[0].mb;
  p.n_groups = int(gs.size());
  int off = 0;
  for (size_t j = 0; j < gs.size(); ++j) {
    const Group& g = gs[j];
    p.groups[j] = moka::cuda::KronGroupParams{nullptr, nullptr, g.r, g.ma, g.na, g.mb, g.nb, off};
    off += g.r;
  }
  const moka::cuda::FusedImpl impl = impl_of(a.impl);
  const char* why = moka::cuda::kron_mix_fused_unsupported(p, impl);
  std::printf("verdict: %s\n", why ? why : "ok");
  if (a.verdict_only) return 0;
  Buffers b(a, elem_size(dt));
  p.x_row_stride = a.x_stride < 0 ? p.in : a.x_stride;
  p.x = b.in("x", b.rows(a.tokens, p.in, p.x_row_stride));
  for (size_t j = 0; j < gs.size(); ++j) {
    const Group& g = gs[j];
    p.groups[j].A = b.in("A" + std::to_string(j), b.flat(size_t(g.r) * g.ma * g.na));
    p.groups[j].B = b.in("B" + std::to_string(j), b.flat(size_t(g.r) * g.mb * g.nb));
  }
  p.gates = b.in("gates", b.flat(off));
  if (a.base) {
    p.base_row_stride = a.base_stride < 0 ? p.out : a.base_stride;
    p.base = b.in("base", b.rows(a.tokens, p.out, p.base_row_stride));
  }
  p.y_row_stride = a.y_stride < 0 ? p.out : a.y_stride;
  p.y = b.out("y", b.rows(a.tokens, p.out, p.y_row_stride));
  const cudaError_t err = moka::cuda::kron_mix_fused_forward(p, nullptr, impl);
  if (err == cudaSuccess) b.write_outputs();
  return finish(err);
}

// kron_mix_indexed: the host side of csrc/cuda/ops_cuda.cpp's glue (stable
// sort of the rows by adapter, per-adapter row counts, the schedule), then
// one launch.
int run_indexed(const Args& a) {
  const DType dt = dtype_of(a.dtype);
  const auto gs = parse_groups(a.groups);
  moka::cuda::KronIndexedParams p{};
  p.dtype = dt;
  p.rows = a.rows;
  p.row_tokens = a.row_tokens;
  p.n_adapters = int(a.adapters);
  p.in = gs[0].na * gs[0].nb;
  p.out = gs[0].ma * gs[0].mb;
  p.n_groups = int(gs.size());
  int off = 0;
  for (size_t j = 0; j < gs.size(); ++j) {
    const Group& g = gs[j];
    p.groups[j] = moka::cuda::KronGroupParams{nullptr, nullptr, g.r, g.ma, g.na, g.mb, g.nb, off};
    off += g.r;
  }
  moka::cuda::KronLaunchPlan lp{};
  const char* why = moka::cuda::kron_mix_indexed_plan(p, &lp);
  std::printf("verdict: %s\n", why ? why : "ok");
  if (a.verdict_only) return 0;
  if (why != nullptr) return finish(moka::cuda::kron_mix_indexed_forward(p, nullptr));  // must decline too
  const size_t n_rows = size_t(a.rows);
  std::vector<int64_t> counts(size_t(a.adapters) + 1, 0), order(n_rows);
  const int64_t* ra = nullptr;
  if (!a.dry_run) {
    ra = reinterpret_cast<const int64_t*>(read_input(a, "row_adapter", n_rows * sizeof(int64_t)));
    for (size_t i = 0; i < n_rows; ++i) {
      if (ra[i] < -1 || ra[i] >= a.adapters) usage("row_adapter out of [-1, adapters)");
      ++counts[size_t(ra[i] + 1)];
    }
    std::vector<int64_t> next(counts.size(), 0);
    for (size_t c = 1; c < counts.size(); ++c) next[c] = next[c - 1] + counts[c - 1];
    for (size_t i = 0; i < n_rows; ++i) order[size_t(next[size_t(ra[i] + 1)]++)] = int64_t(i);
  } else {
    counts[1] = a.rows;  // a dry run: every row on adapter 0
  }
  p.n_tiles = moka::cuda::kron_mix_indexed_schedule(counts.data(), p.n_adapters, p.row_tokens, lp.tile_tokens, nullptr);
  std::vector<moka::cuda::KronIndexedTile> tiles(size_t(p.n_tiles));
  moka::cuda::kron_mix_indexed_schedule(counts.data(), p.n_adapters, p.row_tokens, lp.tile_tokens, tiles.data());
  std::printf("schedule: tile_tokens=%d tiles=%lld\n", lp.tile_tokens, (long long)p.n_tiles);
  p.order = order.data();
  p.tiles = tiles.data();
  Buffers b(a, elem_size(dt));
  const long long tokens = a.rows * a.row_tokens;
  p.x_token_stride = a.x_stride < 0 ? p.in : a.x_stride;
  p.x = b.in("x", b.rows(tokens, p.in, p.x_token_stride));
  for (size_t j = 0; j < gs.size(); ++j) {
    const Group& g = gs[j];
    p.groups[j].A = b.in("A" + std::to_string(j), b.flat(size_t(a.adapters) * g.r * g.ma * g.na));
    p.groups[j].B = b.in("B" + std::to_string(j), b.flat(size_t(a.adapters) * g.r * g.mb * g.nb));
  }
  p.gates = b.in("gates", b.flat(size_t(a.adapters) * off));
  p.y_token_stride = a.y_stride < 0 ? p.out : a.y_stride;
  p.y = b.out("y", b.rows(tokens, p.out, p.y_token_stride));
  const cudaError_t err = moka::cuda::kron_mix_indexed_forward(p, nullptr);
  if (err == cudaSuccess) b.write_outputs();
  return finish(err);
}

int run_grad(const Args& a) {
  const DType dt = dtype_of(a.dtype);
  const auto gs = parse_groups(a.groups);
  moka::cuda::KronGradParams p{};
  p.dtype = dt;
  p.tokens = a.tokens;
  p.in = gs[0].na * gs[0].nb;
  p.out = gs[0].ma * gs[0].mb;
  p.n_groups = int(gs.size());
  int off = 0;
  for (size_t j = 0; j < gs.size(); ++j) {
    const Group& g = gs[j];
    p.groups[j] = moka::cuda::KronGradGroupParams{nullptr, nullptr, nullptr, nullptr, g.r, g.ma, g.na, g.mb, g.nb, off};
    off += g.r;
  }
  const moka::cuda::FusedImpl impl = impl_of(a.impl);
  const char* why = moka::cuda::kron_mix_fused_grad_unsupported(p, impl);
  std::printf("verdict: %s\n", why ? why : "ok");
  if (a.verdict_only) return 0;
  Buffers b(a, elem_size(dt));
  p.x_row_stride = a.x_stride < 0 ? p.in : a.x_stride;
  p.x = b.in("x", b.rows(a.tokens, p.in, p.x_row_stride));
  p.grad_y_row_stride = a.gy_stride < 0 ? p.out : a.gy_stride;
  p.grad_y = b.in("gy", b.rows(a.tokens, p.out, p.grad_y_row_stride));
  for (size_t j = 0; j < gs.size(); ++j) {
    const Group& g = gs[j];
    const size_t na = b.flat(size_t(g.r) * g.ma * g.na), nb = b.flat(size_t(g.r) * g.mb * g.nb);
    p.groups[j].A = b.in("A" + std::to_string(j), na);
    p.groups[j].Bt = b.in("Bt" + std::to_string(j), nb);
    p.groups[j].dA = b.out("dA" + std::to_string(j), na);
    p.groups[j].dB = b.out("dB" + std::to_string(j), nb);
  }
  p.gates = b.in("gates", b.flat(off));
  p.grad_gates = b.out("dg", b.flat(off));
  const size_t ws_bytes = moka::cuda::kron_mix_fused_grad_workspace_bytes(p, impl);
  std::printf("workspace: %zu\n", ws_bytes);
  // The workspace is the kernel's own, 16-byte aligned as cudaMalloc's, and
  // poisoned like the outputs.
  void* ws = a.dry_run ? dry_run_pointer() : new_output(ws_bytes);
  const cudaError_t err = moka::cuda::kron_mix_fused_grad_factors(p, ws, ws_bytes, nullptr, impl);
  if (err == cudaSuccess) b.write_outputs();
  return finish(err);
}

int run_softmax(const Args& a, bool backward) {
  const DType dt = dtype_of(a.dtype);
  const size_t bytes = size_t(a.rows) * a.n * elem_size(dt);
  unsigned char* out = new_output(bytes);
  cudaError_t err;
  if (backward) {
    const unsigned char* g = read_input(a, "grad", bytes);
    const unsigned char* s = read_input(a, "output", bytes);
    err = moka::cuda::gate_softmax_backward(dt, g, s, out, a.rows, a.n, a.inv_temp, nullptr);
  } else {
    const unsigned char* l = read_input(a, "logits", bytes);
    err = moka::cuda::gate_softmax_forward(dt, l, out, a.rows, a.n, a.inv_temp, nullptr);
  }
  if (err == cudaSuccess) write_output(a, backward ? "dlogits" : "out", out, bytes);
  return finish(err);
}

// ------------------------------------------------------------ simulator checks

__global__ void empty_kernel(int* flag) {
  if (threadIdx.x == 0 && blockIdx.x == 0 && blockIdx.y == 0 && blockIdx.z == 0) *flag = 1;
}

int run_limits(const Args& a) {
  int flag = 0;
  if (a.opt_in >= 0) {
    const cudaError_t e = cudaFuncSetAttribute(empty_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(a.opt_in));
    std::printf("opt-in: %s\n", cudaGetErrorName(e));
  }
  const cudaError_t err = moka_sim::launch_kernel("empty_kernel", empty_kernel, a.grid, a.block, size_t(a.smem), nullptr, &flag);
  if (err == cudaSuccess && !a.dry_run && flag != 1) usage("empty_kernel did not run");
  return finish(cudaGetLastError() == err ? err : cudaErrorInvalidValue);
}

// Kernels with the defects the simulator exists to expose; each must end in
// a simulator error, a sanitizer report or a schedule-dependent result.
__global__ void divergent_barrier_kernel(float*) {
  if (threadIdx.x < 64) {
    __syncthreads();
  } else {
    __syncthreads();
  }
}

__global__ void exit_before_barrier_kernel(float*) {
  if (threadIdx.x >= 32) return;
  __syncthreads();
}

__global__ void partial_warp_shuffle_kernel(float* out) {
  if (threadIdx.x % 32 < 16) out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.f, 1);
}

__global__ void divergent_mma_kernel(float* out) {
  float d[4] = {0.f, 0.f, 0.f, 0.f};
  const uint32_t a[4] = {0, 0, 0, 0}, b[2] = {0, 0};
  if (threadIdx.x % 32 < 16) {
    moka::cuda::ptx::mma_m16n8k16<__half>(d, a, b);
  } else {
    moka::cuda::ptx::mma_m16n8k16<__half>(d, a, b);
  }
  out[threadIdx.x] = d[0];
}

__global__ void smem_overrun_kernel(float* out) {
  MOKA_DYNAMIC_SHARED(smem);
  float* s = reinterpret_cast<float*>(smem);
  s[threadIdx.x + 3 * blockDim.x + 1] = 1.f;  // one float past the end for the last thread
  out[threadIdx.x] = 0.f;
}

__global__ void global_overrun_kernel(float* out) {
  out[threadIdx.x + blockDim.x + 1] = 0.f;  // out holds 2 x blockDim.x floats
}

__global__ void misaligned_vector_load_kernel(float* out) {
  MOKA_DYNAMIC_SHARED(smem);
  const uint4 v = *reinterpret_cast<const uint4*>(smem + 2);  // 16-byte load, 2-byte aligned
  out[threadIdx.x] = float(v.x);
}

__global__ void uninitialized_smem_kernel(float* out) {
  MOKA_DYNAMIC_SHARED(smem);
  out[threadIdx.x] = reinterpret_cast<float*>(smem)[threadIdx.x];
}

__global__ void missing_barrier_kernel(float* out) {
  MOKA_DYNAMIC_SHARED(smem);
  float* s = reinterpret_cast<float*>(smem);
  s[threadIdx.x] = float(threadIdx.x);
  out[threadIdx.x] = s[(threadIdx.x + 1) % blockDim.x];  // needs a __syncthreads before it
}

// ldmatrix against the mma fragment layout (fragments.h): one warp loads a
// 16 x 16 tile's A fragment, a B fragment and the transposed tile's A fragment
// both with ldmatrix and with plain 32-bit loads; out[lane] counts mismatches.
__global__ void ldmatrix_fragment_kernel(float* out) {
  MOKA_DYNAMIC_SHARED(smem);
  constexpr int ld = 24;  // elements; a row is 48 bytes, 16-byte aligned
  unsigned short* tile = reinterpret_cast<unsigned short*>(smem);
  const int lane = threadIdx.x % 32;
  if (threadIdx.x < 32)
    for (int i = lane; i < 16 * ld; i += 32) tile[i] = static_cast<unsigned short>(i * 7 + 1);
  __syncthreads();
  if (threadIdx.x >= 32) return;
  const int gid = lane / 4, tig = lane % 4;
  auto word = [&](int r, int c) { return uint32_t(tile[r * ld + c]) | (uint32_t(tile[r * ld + c + 1]) << 16); };
  auto tword = [&](int r, int c) { return uint32_t(tile[c * ld + r]) | (uint32_t(tile[(c + 1) * ld + r]) << 16); };
  uint32_t a[4], b[2], t[4];
  moka::cuda::ptx::ldmatrix_x4(a, tile + (lane % 16) * ld + (lane / 16) * 8);
  moka::cuda::ptx::ldmatrix_x2(b, tile + (lane % 8) * ld + ((lane / 8) % 2) * 8);
  moka::cuda::ptx::ldmatrix_x4_trans(t, tile + (lane % 8 + (lane / 16) * 8) * ld + ((lane / 8) % 2) * 8);
  int bad = 0;
  bad += a[0] != word(gid, 2 * tig) || a[1] != word(gid + 8, 2 * tig);
  bad += a[2] != word(gid, 2 * tig + 8) || a[3] != word(gid + 8, 2 * tig + 8);
  bad += b[0] != word(gid, 2 * tig) || b[1] != word(gid, 2 * tig + 8);
  // Transposed: the A fragment of tile^T.
  bad += t[0] != tword(gid, 2 * tig) || t[1] != tword(gid + 8, 2 * tig);
  bad += t[2] != tword(gid, 2 * tig + 8) || t[3] != tword(gid + 8, 2 * tig + 8);
  out[threadIdx.x] = float(bad);
}

// out[2 t] = the destination read before the wait, out[2 t + 1] after it.
__global__ void cp_async_kernel(float* out) {
  MOKA_DYNAMIC_SHARED(smem);
  alignas(16) static const float src[4] = {1.f, 2.f, 3.f, 4.f};
  float* dst = reinterpret_cast<float*>(smem) + 4 * (threadIdx.x % 32);
  moka::cuda::ptx::cp_async_16(dst, src);
  moka::cuda::ptx::cp_async_commit();
  if (threadIdx.x < 64) {
    out[2 * threadIdx.x] = dst[threadIdx.x % 4];
    moka::cuda::ptx::cp_async_wait<0>();
    out[2 * threadIdx.x + 1] = dst[threadIdx.x % 4];
  } else {
    moka::cuda::ptx::cp_async_wait<0>();
  }
}

__global__ void cp_async_never_waited_kernel(float* out) {
  MOKA_DYNAMIC_SHARED(smem);
  alignas(16) static const float src[4] = {1.f, 2.f, 3.f, 4.f};
  moka::cuda::ptx::cp_async_16(smem + 16 * (threadIdx.x % 8), src);
  moka::cuda::ptx::cp_async_commit();
  out[threadIdx.x] = 0.f;
}

int selftest(const Args& a) {
  constexpr unsigned kThreads = 128;
  std::vector<float> out(2 * kThreads, -1.f);
  void (*k)(float*) = nullptr;
  if (a.name == "divergent_barrier") k = divergent_barrier_kernel;
  else if (a.name == "exit_before_barrier") k = exit_before_barrier_kernel;
  else if (a.name == "partial_warp_shuffle") k = partial_warp_shuffle_kernel;
  else if (a.name == "divergent_mma") k = divergent_mma_kernel;
  else if (a.name == "smem_overrun") k = smem_overrun_kernel;
  else if (a.name == "global_overrun") k = global_overrun_kernel;
  else if (a.name == "misaligned_vector_load") k = misaligned_vector_load_kernel;
  else if (a.name == "uninitialized_smem") k = uninitialized_smem_kernel;
  else if (a.name == "missing_barrier") k = missing_barrier_kernel;
  else if (a.name == "ldmatrix_fragment") k = ldmatrix_fragment_kernel;
  else if (a.name == "cp_async") k = cp_async_kernel;
  else if (a.name == "cp_async_never_waited") k = cp_async_never_waited_kernel;
  else usage("unknown selftest --name");
  const cudaError_t err =
      moka_sim::launch_kernel(a.name.c_str(), k, dim3(1), dim3(kThreads), 4 * kThreads * sizeof(float), nullptr, out.data());
  std::printf("out:");
  for (unsigned i = 0; i < kThreads; ++i) std::printf(" %g", out[i]);
  std::printf("\n");
  return finish(err);
}

}  // namespace

int main(int argc, char** argv) {
  const Args a = parse(argc, argv);
  moka_sim::set_launch_log(stdout);
  moka_sim::set_dry_run(a.dry_run);
  int rc;
  if (a.op == "fwd") rc = run_fwd(a);
  else if (a.op == "grad") rc = run_grad(a);
  else if (a.op == "indexed") rc = run_indexed(a);
  else if (a.op == "plan") rc = run_plan(a);
  else if (a.op == "softmax_fwd") rc = run_softmax(a, false);
  else if (a.op == "softmax_bwd") rc = run_softmax(a, true);
  else if (a.op == "limits") rc = run_limits(a);
  else if (a.op == "selftest") rc = selftest(a);
  else usage("op must be fwd, indexed, grad, softmax_fwd, softmax_bwd, limits or selftest");
  for (void* p : g_allocs) std::free(p);
  return rc;
}
