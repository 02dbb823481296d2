// The simulator's scheduler and runtime: CTAs run one after another (in a
// seeded random order); within a CTA every thread is a ucontext fiber that
// runs until it reaches a synchronization point, and the runnable fibers are
// reshuffled after every round, or (run-ahead phases) run warp by warp.
#include "simt.h"

#include <sys/mman.h>
#include <ucontext.h>

#include <algorithm>
#include <cstdarg>
#include <cstring>
#include <map>
#include <numeric>
#include <random>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define MOKA_SIM_ASAN 1
#endif

namespace moka_sim {
namespace {

const DeviceSpec kDevices[] = {
    {"sm_90", 9, 0, 132, 232448},  // H100/H200: 227 KB opt-in
    {"sm_80", 8, 0, 108, 166912},  // A100: 163 KB opt-in
};

struct Config {
  const DeviceSpec* dev = &kDevices[0];
  uint64_t seed = 0;
  bool dry_run = false;
  FILE* log = nullptr;
  cudaError_t last_error = cudaSuccess;
  std::map<const void*, int> max_dynamic_smem;
  Config() {
    if (const char* a = std::getenv("MOKA_SIM_ARCH")) {
      if (!set_arch_impl(a)) std::fprintf(stderr, "moka_sim: unknown MOKA_SIM_ARCH '%s'\n", a), std::exit(2);
    }
    if (const char* s = std::getenv("MOKA_SIM_SEED")) seed = std::strtoull(s, nullptr, 10);
  }
  bool set_arch_impl(const char* a) {
    for (const auto& d : kDevices)
      if (std::strcmp(d.name, a) == 0) return dev = &d, true;
    return false;
  }
};

Config& cfg() {
  static Config c;
  return c;
}

constexpr size_t kStackBytes = 256 * 1024;

enum class State { kReady, kAtBarrier, kAtWarp, kDone };

struct AsyncCopy {
  unsigned char* dst;
  unsigned char data[16];
  size_t bytes;
};

struct Fiber {
  Thread t;
  std::vector<AsyncCopy> uncommitted;
  std::vector<std::vector<AsyncCopy>> groups;  // committed, oldest first
  ucontext_t ctx;
  void* stack = nullptr;
  State state = State::kReady;
  const char* site_file = nullptr;  // where it waits
  int site_line = 0;
};

struct Warp {
  int arrived = 0;
  const char* what = nullptr;
  const char* file = nullptr;
  int line = 0;
  const void* ins[32];
  void* outs[32];
};

struct Cta {
  dim3 grid, block;
  uint3 block_idx;
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  unsigned char* smem = nullptr;
  size_t smem_bytes = 0;
  const CtaBody* body = nullptr;
  const char* kernel = nullptr;
  ucontext_t sched;
  Fiber* current = nullptr;
#ifdef MOKA_SIM_ASAN
  void* fake_stack = nullptr;
  const void* sched_stack_bottom = nullptr;
  size_t sched_stack_size = 0;
#endif
};

Cta* g_cta = nullptr;
std::vector<void*> g_stacks;  // reused across CTAs and launches

void* stack_for(size_t i) {
  while (g_stacks.size() <= i) {
    void* s = mmap(nullptr, kStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (s == MAP_FAILED) fail("cannot map a fiber stack");
    g_stacks.push_back(s);
  }
  return g_stacks[i];
}

// Switches from the scheduler to fiber f, and back when f yields.
void resume(Cta& c, Fiber& f) {
  c.current = &f;
#ifdef MOKA_SIM_ASAN
  __sanitizer_start_switch_fiber(&c.fake_stack, f.stack, kStackBytes);
#endif
  swapcontext(&c.sched, &f.ctx);
#ifdef MOKA_SIM_ASAN
  __sanitizer_finish_switch_fiber(c.fake_stack, nullptr, nullptr);
#endif
  c.current = nullptr;
}

// From the running fiber back to the scheduler.
void yield(Cta& c, Fiber& f, bool finished) {
#ifdef MOKA_SIM_ASAN
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(finished ? nullptr : &fake, c.sched_stack_bottom, c.sched_stack_size);
#endif
  swapcontext(&f.ctx, &c.sched);
#ifdef MOKA_SIM_ASAN
  __sanitizer_finish_switch_fiber(fake, &c.sched_stack_bottom, &c.sched_stack_size);
#endif
  (void)finished;
}

std::string where(const Fiber& f);

void fiber_main() {
  Cta& c = *g_cta;
  Fiber& f = *c.current;
#ifdef MOKA_SIM_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &c.sched_stack_bottom, &c.sched_stack_size);
#endif
  (*c.body)();
  if (!f.uncommitted.empty() || !f.groups.empty())
    fail("%s: %s exited with cp.async copies it never waited for", c.kernel, where(f).c_str());
  f.state = State::kDone;
  yield(c, f, true);
  fail("a finished fiber was resumed");
}

std::string where(const Fiber& f) {
  char buf[128];
  std::snprintf(buf, sizeof buf, "thread (%u,%u,%u)", f.t.thread_idx.x, f.t.thread_idx.y, f.t.thread_idx.z);
  return buf;
}

const char* state_name(const Fiber& f) {
  switch (f.state) {
    case State::kReady: return "running";
    case State::kAtBarrier: return "at __syncthreads";
    case State::kAtWarp: return "at a warp collective";
    case State::kDone: return "exited";
  }
  return "?";
}

// Reports where the CTA's threads are: one line per (state, call site), with
// the number of threads there and the first of them.
[[noreturn]] void deadlock(Cta& c, const char* why) {
  struct Spot {
    const char* state;
    const char* file;
    int line, count;
    const Fiber* first;
  };
  std::vector<Spot> spots;
  for (const Fiber& f : c.fibers) {
    const char* st = state_name(f);
    auto it = std::find_if(spots.begin(), spots.end(), [&](const Spot& s) {
      return s.state == st && s.line == f.site_line &&
             (s.file == f.site_file || (s.file && f.site_file && std::strcmp(s.file, f.site_file) == 0));
    });
    if (it == spots.end()) spots.push_back({st, f.site_file, f.site_line, 1, &f});
    else ++it->count;
  }
  std::string msg;
  for (const Spot& s : spots) {
    char buf[512];
    std::snprintf(buf, sizeof buf, "\n  %d thread(s) %s%s%s:%d (first: %s)", s.count, s.state, s.file ? " " : "",
                  s.file ? s.file : "", s.line, where(*s.first).c_str());
    msg += buf;
  }
  fail("%s in %s, block (%u,%u,%u):%s", why, c.kernel, c.block_idx.x, c.block_idx.y, c.block_idx.z,
       msg.c_str());
}

void run_cta(Cta& c, std::mt19937_64& rng) {
  const unsigned n = c.block.x * c.block.y * c.block.z;
  c.fibers.assign(n, Fiber{});
  c.warps.assign((n + 31) / 32, Warp{});
  for (unsigned i = 0; i < n; ++i) {
    Fiber& f = c.fibers[i];
    f.t.linear = static_cast<int>(i);
    f.t.thread_idx = uint3{i % c.block.x, (i / c.block.x) % c.block.y, i / (c.block.x * c.block.y)};
    f.t.block_idx = c.block_idx;
    f.stack = stack_for(i);
#ifdef MOKA_SIM_ASAN
    // The previous CTA's fibers left their frames' redzones poisoned.
    __asan_unpoison_memory_region(f.stack, kStackBytes);
#endif
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack;
    f.ctx.uc_stack.ss_size = kStackBytes;
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, fiber_main, 0);
  }
  // Each barrier phase draws one of two schedules. Interleaved: every ready thread runs to its
  // next synchronization point, in a shuffled order, round after round. Run-ahead: the warps
  // run one at a time in a shuffled priority order, each as far as it can (to the barrier),
  // so warps with equal work drift apart as on hardware and a missing barrier between one
  // warp's writes and another's reads shows even when a warp collective lies between them.
  std::vector<Fiber*> order;
  std::vector<unsigned> warp_rank(c.warps.size());
  bool run_ahead = false;
  auto new_phase = [&] {
    run_ahead = (rng() & 1) != 0;
    std::iota(warp_rank.begin(), warp_rank.end(), 0u);
    std::shuffle(warp_rank.begin(), warp_rank.end(), rng);
  };
  new_phase();
  for (;;) {
    order.clear();
    for (Fiber& f : c.fibers)
      if (f.state == State::kReady) order.push_back(&f);
    if (order.empty()) {
      int done = 0, at_barrier = 0;
      const Fiber* first = nullptr;
      for (const Fiber& f : c.fibers) {
        done += f.state == State::kDone;
        if (f.state == State::kAtBarrier) {
          ++at_barrier;
          if (!first) first = &f;
        }
      }
      if (done == static_cast<int>(n)) return;
      if (at_barrier + done != static_cast<int>(n))
        deadlock(c, "a warp collective is missing lanes (a lane exited or waits elsewhere)");
      if (done > 0) deadlock(c, "threads wait at __syncthreads that exited threads never reach");
      for (const Fiber& f : c.fibers)
        if (f.site_line != first->site_line || std::strcmp(f.site_file, first->site_file) != 0)
          deadlock(c, "threads of one CTA wait at different __syncthreads");
      for (Fiber& f : c.fibers) f.state = State::kReady, f.site_file = nullptr, f.site_line = 0;
      new_phase();
      continue;
    }
    if (run_ahead) {
      unsigned first = ~0u;
      for (const Fiber* f : order) first = std::min(first, warp_rank[f->t.linear / 32]);
      order.erase(std::remove_if(order.begin(), order.end(),
                                 [&](const Fiber* f) { return warp_rank[f->t.linear / 32] != first; }),
                  order.end());
    }
    std::shuffle(order.begin(), order.end(), rng);
    for (Fiber* f : order) resume(c, *f);
  }
}

}  // namespace

const DeviceSpec& device() { return *cfg().dev; }
bool set_arch(const char* arch) { return cfg().set_arch_impl(arch); }
void set_seed(uint64_t seed) { cfg().seed = seed; }
void set_dry_run(bool dry_run) { cfg().dry_run = dry_run; }
void set_launch_log(FILE* f) { cfg().log = f; }
void set_last_error(cudaError_t e) {
  if (e != cudaSuccess) cfg().last_error = e;
}

void fail(const char* fmt, ...) {
  std::fflush(stdout);
  std::fprintf(stderr, "moka_sim error: ");
  va_list ap;
  va_start(ap, fmt);
  std::vfprintf(stderr, fmt, ap);
  va_end(ap);
  std::fprintf(stderr, "\n");
  std::fflush(stderr);
  std::_Exit(3);
}

Thread& this_thread() {
  if (!g_cta || !g_cta->current) fail("threadIdx/blockIdx read outside a kernel");
  return g_cta->current->t;
}
uint3 block_dim() {
  if (!g_cta) fail("blockDim read outside a kernel");
  return uint3{g_cta->block.x, g_cta->block.y, g_cta->block.z};
}
uint3 grid_dim() {
  if (!g_cta) fail("gridDim read outside a kernel");
  return uint3{g_cta->grid.x, g_cta->grid.y, g_cta->grid.z};
}
unsigned char* dynamic_smem() {
  if (!g_cta) fail("dynamic shared memory used outside a kernel");
  return g_cta->smem;
}

size_t dynamic_smem_bytes() {
  if (!g_cta) fail("dynamic shared memory used outside a kernel");
  return g_cta->smem_bytes;
}

void check_shared(const void* p, size_t bytes, const char* what) {
  const unsigned char* b = static_cast<const unsigned char*>(p);
  if (!g_cta || !g_cta->smem || b < g_cta->smem || b + bytes > g_cta->smem + g_cta->smem_bytes)
    fail("%s: address %p (+%zu bytes) is not in the CTA's dynamic shared memory", what, p, bytes);
}

Fiber& running(const char* what) {
  if (!g_cta || !g_cta->current) fail("%s outside a kernel", what);
  return *g_cta->current;
}

void async_copy(void* dst, const void* src, size_t bytes) {
  Fiber& f = running("cp.async");
  if (bytes != 4 && bytes != 8 && bytes != 16) fail("cp.async: size %zu (4, 8 or 16 bytes)", bytes);
  if (reinterpret_cast<uintptr_t>(dst) % bytes || reinterpret_cast<uintptr_t>(src) % bytes)
    fail("cp.async: %zu-byte copy from %p to %p is misaligned", bytes, src, dst);
  check_shared(dst, bytes, "cp.async destination");
  AsyncCopy c{static_cast<unsigned char*>(dst), {}, bytes};
  std::memcpy(c.data, src, bytes);
  std::memset(dst, 0xff, bytes);
  f.uncommitted.push_back(c);
}

void async_commit() {
  Fiber& f = running("cp.async.commit_group");
  f.groups.push_back(std::move(f.uncommitted));
  f.uncommitted.clear();
}

void async_wait(int pending_groups_allowed) {
  Fiber& f = running("cp.async.wait_group");
  while (f.groups.size() > size_t(pending_groups_allowed < 0 ? 0 : pending_groups_allowed)) {
    for (const AsyncCopy& c : f.groups.front()) std::memcpy(c.dst, c.data, c.bytes);
    f.groups.erase(f.groups.begin());
  }
}

void cta_barrier(const char* file, int line) {
  if (!g_cta || !g_cta->current) fail("__syncthreads outside a kernel");
  Cta& c = *g_cta;
  Fiber& f = *c.current;
  f.state = State::kAtBarrier;
  f.site_file = file;
  f.site_line = line;
  yield(c, f, false);
}

void warp_collective(
    const char* what, const char* file, int line, unsigned mask, const void* in, void* out,
    CollectiveFn compute, const void* ctx) {
  if (!g_cta || !g_cta->current) fail("%s outside a kernel", what);
  Cta& c = *g_cta;
  Fiber& f = *c.current;
  const int wi = f.t.linear / 32, lane = f.t.linear % 32;
  const int n = static_cast<int>(c.fibers.size());
  const int lanes = std::min(32, n - wi * 32);
  const unsigned full = lanes == 32 ? 0xffffffffu : ((1u << lanes) - 1u);
  if (mask != full)
    fail("%s at %s:%d: member mask 0x%08x, but only full-warp masks (0x%08x) are simulated", what, file,
         line, mask, full);
  Warp& w = c.warps[wi];
  if (w.arrived == 0) {
    w.what = what, w.file = file, w.line = line;
  } else if (std::strcmp(w.what, what) != 0 || w.line != line || std::strcmp(w.file, file) != 0) {
    fail("%s, block (%u,%u,%u), warp %d: lane %d is at %s (%s:%d) while other lanes are at %s (%s:%d)",
         c.kernel, c.block_idx.x, c.block_idx.y, c.block_idx.z, wi, lane, what, file, line, w.what, w.file,
         w.line);
  }
  w.ins[lane] = in;
  w.outs[lane] = out;
  if (++w.arrived < lanes) {
    f.state = State::kAtWarp;
    f.site_file = file;
    f.site_line = line;
    yield(c, f, false);
    return;
  }
  compute(w.ins, w.outs, lanes, ctx);
  w.arrived = 0;
  for (int l = 0; l < lanes; ++l) {
    Fiber& o = c.fibers[wi * 32 + l];
    if (&o != &f) o.state = State::kReady, o.site_file = nullptr, o.site_line = 0;
  }
}

cudaError_t set_max_dynamic_smem(const void* func, int bytes) {
  if (bytes < 0 || bytes > device().smem_optin) return cudaErrorInvalidValue;
  cfg().max_dynamic_smem[func] = bytes;
  return cudaSuccess;
}

cudaError_t launch(
    const char* name, const void* func, dim3 grid, dim3 block, size_t smem, const CtaBody& body) {
  Config& k = cfg();
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  cudaError_t err = cudaSuccess;
  if (threads == 0 || grid.x == 0 || grid.y == 0 || grid.z == 0 || threads > kMaxThreadsPerBlock ||
      block.x > 1024 || block.y > 1024 || block.z > kMaxBlockDimZ || grid.x > kMaxGridDimX ||
      grid.y > kMaxGridDimYZ || grid.z > kMaxGridDimYZ) {
    err = cudaErrorInvalidConfiguration;
  } else {
    const auto it = k.max_dynamic_smem.find(func);
    const size_t allowed = it == k.max_dynamic_smem.end() ? kDefaultDynamicSmem : size_t(it->second);
    if (smem > allowed) err = cudaErrorInvalidValue;
  }
  if (k.log)
    std::fprintf(k.log, "launch %s grid=(%u,%u,%u) block=(%u,%u,%u) smem=%zu device=%s result=%s\n", name,
                 grid.x, grid.y, grid.z, block.x, block.y, block.z, smem, device().name,
                 cudaGetErrorName(err));
  if (err != cudaSuccess || k.dry_run) return err;

  // CTAs in a random order, each with its own shuffle stream.
  std::vector<uint64_t> ctas(uint64_t(grid.x) * grid.y * grid.z);
  for (uint64_t i = 0; i < ctas.size(); ++i) ctas[i] = i;
  std::mt19937_64 order_rng(k.seed * 0x9E3779B97F4A7C15ull + 1);
  std::shuffle(ctas.begin(), ctas.end(), order_rng);
  for (uint64_t id : ctas) {
    Cta c;
    c.grid = grid;
    c.block = block;
    c.block_idx = uint3{unsigned(id % grid.x), unsigned((id / grid.x) % grid.y), unsigned(id / (uint64_t(grid.x) * grid.y))};
    c.body = &body;
    c.kernel = name;
    if (smem > 0) {
      void* p = nullptr;
      if (posix_memalign(&p, 128, smem) != 0) fail("out of host memory for shared memory");
      std::memset(p, 0xff, smem);
      c.smem = static_cast<unsigned char*>(p);
      c.smem_bytes = smem;
    }
    g_cta = &c;
    std::mt19937_64 rng(k.seed * 0xD1B54A32D192ED03ull + id + 7);
    run_cta(c, rng);
    g_cta = nullptr;
    std::free(c.smem);
  }
  return cudaSuccess;
}

}  // namespace moka_sim

using moka_sim::cfg;

cudaError_t cudaGetDevice(int* dev) {
  *dev = 0;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int dev) {
  if (dev != 0) return cudaErrorInvalidValue;
  const auto& d = moka_sim::device();
  switch (attr) {
    case cudaDevAttrMaxThreadsPerBlock: *value = 1024; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlock: *value = moka_sim::kDefaultDynamicSmem; return cudaSuccess;
    case cudaDevAttrMultiProcessorCount: *value = d.sm_count; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMajor: *value = d.cc_major; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMinor: *value = d.cc_minor; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = d.smem_optin; return cudaSuccess;
  }
  return cudaErrorInvalidValue;
}

cudaError_t cudaGetLastError() {
  const cudaError_t e = cfg().last_error;
  cfg().last_error = cudaSuccess;
  return e;
}
cudaError_t cudaPeekAtLastError() { return cfg().last_error; }

const char* cudaGetErrorName(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorInvalidDeviceFunction: return "cudaErrorInvalidDeviceFunction";
    case cudaErrorLaunchOutOfResources: return "cudaErrorLaunchOutOfResources";
    case cudaErrorNotSupported: return "cudaErrorNotSupported";
  }
  return "cudaErrorUnknown";
}
const char* cudaGetErrorString(cudaError_t e) { return cudaGetErrorName(e); }
