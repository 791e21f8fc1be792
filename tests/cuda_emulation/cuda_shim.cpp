// The emulator's runtime (see cuda_shim.h): the threads of a block as fibers.
//
// Every thread of the running block is a ucontext fiber with its own stack. A fiber runs
// until it must wait at a barrier (a warp exchange, __syncwarp or __syncthreads), then
// switches directly to the next fiber that can run, in a fixed round-robin order, so a run
// is deterministic. The barrier's last arrival releases the others and runs on. When no
// live fiber can run, the block is deadlocked: reported, then abort.
#include "cuda_shim.h"

#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <new>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#define AAREN_EMU_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define AAREN_EMU_ASAN 1
#endif
#endif
#ifdef AAREN_EMU_ASAN
extern "C" void __sanitizer_start_switch_fiber(void** fake_stack_save, const void* bottom,
                                               size_t size);
extern "C" void __sanitizer_finish_switch_fiber(void* fake_stack_save, const void** bottom_old,
                                                size_t* size_old);
#endif

uint3 threadIdx;
uint3 blockIdx;
dim3 blockDim;
dim3 gridDim;

namespace emu {

Device& device() {
  static Device d;
  return d;
}

Options& options() {
  static Options o;
  return o;
}

Stats& stats() {
  static Stats s;
  return s;
}

namespace {

constexpr int kWarp = 32;
constexpr std::size_t kStackBytes = 512 * 1024;

[[noreturn]] void fail(const char* message, const Site* site, const Site* other = nullptr) {
  std::fflush(stdout);
  std::fprintf(stderr, "\nCUDA emulation: %s\n", message);
  if (site != nullptr) {
    std::fprintf(stderr, "  at %s (%s:%u:%u)\n", site->what, site->file, site->line, site->column);
  }
  if (other != nullptr) {
    std::fprintf(stderr, "  while others are at %s (%s:%u:%u)\n", other->what, other->file,
                 other->line, other->column);
  }
  std::fprintf(stderr, "  block %u, thread %u\n", blockIdx.x, threadIdx.x);
  std::fflush(stderr);
  std::abort();
}

bool same_site(const Site& a, const Site& b) {
  return a.line == b.line && a.column == b.column &&
         (a.file == b.file || std::strcmp(a.file, b.file) == 0);
}

// A fiber stack: mmap'd, with a guard page below it so that an overflow faults.
struct Stack {
  void* mapping = nullptr;
  std::size_t mapped = 0;
  void* bottom = nullptr;
  std::size_t size = 0;

  Stack() {
    const std::size_t page = static_cast<std::size_t>(sysconf(_SC_PAGESIZE));
    mapped = kStackBytes + page;
    mapping = mmap(nullptr, mapped, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (mapping == MAP_FAILED) {
      fail("cannot map a fiber stack", nullptr);
    }
    mprotect(mapping, page, PROT_NONE);
    bottom = static_cast<char*>(mapping) + page;
    size = kStackBytes;
  }
  ~Stack() {
    munmap(mapping, mapped);
  }
  Stack(const Stack&) = delete;
  Stack& operator=(const Stack&) = delete;
};

struct Barrier {
  int expected = 0;  // participants still to come in each episode
  int arrived = 0;
  std::uint64_t generation = 0;
  Site site{};  // of the episode in progress
};

enum class State { kReady, kWaiting, kExited };

struct Fiber {
  ucontext_t context;
  std::unique_ptr<Stack> stack;
  State state = State::kReady;
  const Barrier* waiting_on = nullptr;
  std::uint64_t awaited = 0;
  Site site{};
  void* fake_stack = nullptr;  // AddressSanitizer's, while switched away
};

struct Warp {
  Barrier barrier;
  int live = kWarp;
  alignas(8) unsigned char slots[2][kWarp][8];  // double-buffered by barrier generation
};

// The block being run.
struct Block {
  int threads = 0;
  int live = 0;
  std::vector<Warp> warps;
  Barrier barrier;  // __syncthreads
  ThreadBody body{};
  int current = -1;  // -1: the launching (main) context
  void* shared = nullptr;
};

std::vector<Fiber> fibers;  // the pool: grows to the largest block, reused
ucontext_t main_context;
Block block;
const void* main_stack_bottom = nullptr;
std::size_t main_stack_size = 0;
std::mutex launch_mutex;  // one grid at a time

bool runnable(const Fiber& f) {
  return f.state == State::kReady ||
         (f.state == State::kWaiting && f.waiting_on->generation != f.awaited);
}

#ifdef AAREN_EMU_ASAN
void* main_fake_stack = nullptr;
int switched_from = -1;

// AddressSanitizer must know which stack runs: after every switch, the resumed context
// tells it, and learns the stack it came from (the launching thread's is recorded then).
void finish_switch(void* fake_stack) {
  const void* old_bottom = nullptr;
  std::size_t old_size = 0;
  __sanitizer_finish_switch_fiber(fake_stack, &old_bottom, &old_size);
  if (switched_from < 0) {
    main_stack_bottom = old_bottom;
    main_stack_size = old_size;
  }
}
#endif

// Switch from the running context (`from`: a fiber index, or -1 for main) to `to` (same).
void switch_context(int from, int to, bool from_exits) {
  ucontext_t* from_context = from < 0 ? &main_context : &fibers[from].context;
  ucontext_t* to_context = to < 0 ? &main_context : &fibers[to].context;
  block.current = to;
  if (to >= 0) {
    threadIdx = uint3(static_cast<unsigned>(to));
  }
#ifdef AAREN_EMU_ASAN
  void** save = from < 0 ? &main_fake_stack : (from_exits ? nullptr : &fibers[from].fake_stack);
  switched_from = from;
  if (to < 0) {
    __sanitizer_start_switch_fiber(save, main_stack_bottom, main_stack_size);
  } else {
    __sanitizer_start_switch_fiber(save, fibers[to].stack->bottom, fibers[to].stack->size);
  }
#else
  (void)from_exits;
#endif
  if (swapcontext(from_context, to_context) != 0) {
    fail("swapcontext failed", nullptr);
  }
  // Resumed in `from` (by some other context).
#ifdef AAREN_EMU_ASAN
  finish_switch(from < 0 ? main_fake_stack : fibers[from].fake_stack);
#endif
  block.current = from;
  if (from >= 0) {
    threadIdx = uint3(static_cast<unsigned>(from));
  }
}

// The next fiber to resume after `self`, or -1 when every fiber has exited.
int next_runnable(int self) {
  const int n = block.threads;
  const bool reverse = options().reverse_order;
  for (int step = 1; step <= n; ++step) {
    const int i = reverse ? ((self - step) % n + n) % n : (self + step) % n;
    if (runnable(fibers[i])) {
      return i;
    }
  }
  if (block.live > 0) {
    // Deadlock: report where every live thread waits.
    std::fflush(stdout);
    std::fprintf(stderr, "\nCUDA emulation: deadlock in block %u: no thread can go on\n",
                 blockIdx.x);
    for (int i = 0; i < n; ++i) {
      if (fibers[i].state == State::kWaiting) {
        const Site& s = fibers[i].site;
        std::fprintf(stderr, "  thread %d waits at %s (%s:%u:%u)\n", i, s.what, s.file, s.line,
                     s.column);
      }
    }
    std::fflush(stderr);
    std::abort();
  }
  return -1;
}

// Park the running fiber at barrier `b` (already counted in) until the episode completes.
void wait_at(Barrier& b, const Site& site) {
  const int self = block.current;
  Fiber& me = fibers[self];
  me.state = State::kWaiting;
  me.waiting_on = &b;
  me.awaited = b.generation;
  me.site = site;
  const int next = next_runnable(self);
  if (next != self) {  // self cannot be runnable here: it waits for the others
    switch_context(self, next, false);
  }
  me.state = State::kReady;
  me.waiting_on = nullptr;
}

// Count the running thread in at `b`; the last arrival releases the episode and goes on.
void arrive(Barrier& b, const Site& site, const char* divergence) {
  if (b.arrived == 0) {
    b.site = site;
  } else if (!same_site(site, b.site)) {
    fail(divergence, &site, &b.site);
  }
  if (++b.arrived == b.expected) {
    b.arrived = 0;
    ++b.generation;
    return;
  }
  wait_at(b, site);
}

void release_if_complete(Barrier& b) {
  if (b.arrived > 0 && b.arrived == b.expected) {
    b.arrived = 0;
    ++b.generation;
  }
}

void check_in_fiber(const Site& site) {
  if (block.current < 0) {
    fail("a device intrinsic was called outside a kernel", &site);
  }
}

Warp& running_warp(unsigned mask, const Site& site) {
  check_in_fiber(site);
  if (mask != 0xffffffffu) {
    fail("the emulation supports full-mask (0xffffffff) warp intrinsics only", &site);
  }
  Warp& w = block.warps[static_cast<std::size_t>(block.current / kWarp)];
  if (w.live != kWarp) {
    fail("a full-mask warp intrinsic in a warp where some lanes have exited", &site);
  }
  return w;
}

void fiber_main() {
#ifdef AAREN_EMU_ASAN
  finish_switch(nullptr);
#endif
  const int self = block.current;
  block.body.run(block.body.context);

  // The thread exits: it no longer counts at its block's barrier, and its warp must not be
  // waiting for it at a shuffle.
  Fiber& me = fibers[self];
  me.state = State::kExited;
  --block.live;
  Warp& w = block.warps[static_cast<std::size_t>(self / kWarp)];
  --w.live;
  if (w.barrier.arrived > 0) {
    const Site exit_site{"(kernel exit)", 0, 0, "return"};
    fail("a lane exited while the other lanes of its warp wait at a full-mask warp intrinsic",
         &exit_site, &w.barrier.site);
  }
  --block.barrier.expected;
  release_if_complete(block.barrier);
  switch_context(self, next_runnable(self), true);
  fail("an exited fiber was resumed", nullptr);
}

}  // namespace

void* dynamic_shared_memory() {
  return block.shared;
}

int checked_width(int width, const std::source_location& where) {
  if (width < 1 || width > kWarp || (width & (width - 1)) != 0) {
    const Site site = site_of(where, "shuffle");
    fail("shuffle width must be a power of 2 in [1, 32]", &site);
  }
  return width;
}

void warp_exchange(unsigned mask, const void* value, void* result, std::size_t size, int source,
                   const Site& site) {
  Warp& w = running_warp(mask, site);
  const int lane = block.current % kWarp;
  const int buffer = static_cast<int>(w.barrier.generation & 1);
  std::memcpy(w.slots[buffer][lane], value, size);
  if (w.barrier.arrived == 0) {
    ++stats().shuffles;
  }
  arrive(w.barrier, site, "lanes of a warp reached different warp intrinsics (divergence)");
  // Every lane has written this episode's buffer; the next episode writes the other one, and
  // the one after can only start once every lane has read this one.
  std::memcpy(result, w.slots[buffer][source], size);
}

void sync_warp(unsigned mask, const Site& site) {
  Warp& w = running_warp(mask, site);
  arrive(w.barrier, site, "lanes of a warp reached different warp intrinsics (divergence)");
}

void sync_block(const Site& site) {
  check_in_fiber(site);
  if (block.barrier.arrived == 0) {
    ++stats().block_barriers;
  }
  arrive(block.barrier, site, "threads of a block reached different __syncthreads");
}

void run_grid(const LaunchConfig& config, ThreadBody body) {
  const std::lock_guard<std::mutex> lock(launch_mutex);
  TORCH_CHECK(block.current < 0, "CUDA emulation: a kernel launched a kernel");
  const Device& d = device();
  const std::uint64_t threads = std::uint64_t{config.block.x} * config.block.y * config.block.z;
  // What CUDA refuses at launch (cudaErrorInvalidConfiguration and the like).
  TORCH_CHECK(config.grid.x >= 1 && config.grid.y >= 1 && config.grid.z >= 1 &&
                  config.grid.x <= 2147483647u && config.grid.y <= 65535 && config.grid.z <= 65535,
              "CUDA emulation: invalid grid (", config.grid.x, ", ", config.grid.y, ", ",
              config.grid.z, ")");
  TORCH_CHECK(threads >= 1 && threads <= 1024, "CUDA emulation: invalid block size ", threads);
  TORCH_CHECK(config.shared <= d.shared_per_block, "CUDA emulation: ", config.shared,
              " bytes of dynamic shared memory, more than the ", d.shared_per_block, " allowed");
  // What this emulator does not model.
  TORCH_CHECK(config.grid.y == 1 && config.grid.z == 1 && config.block.y == 1 &&
                  config.block.z == 1,
              "CUDA emulation: only one-dimensional grids and blocks are emulated");
  TORCH_CHECK(threads % kWarp == 0, "CUDA emulation: only whole warps are emulated (",
              threads, " threads per block)");

  ++stats().launches;
  const int n = static_cast<int>(threads);
  while (static_cast<int>(fibers.size()) < n) {
    fibers.emplace_back();
    fibers.back().stack = std::make_unique<Stack>();
  }
  gridDim = config.grid;
  blockDim = config.block;
  const std::size_t shared_bytes = std::max<std::size_t>(config.shared, 1);
  // Dynamic shared memory is at least 16-byte aligned on a GPU; exactly as large as asked.
  constexpr std::align_val_t kSharedAlignment{128};
  struct FreeAligned {
    void operator()(unsigned char* p) const {
      ::operator delete[](p, kSharedAlignment);
    }
  };
  std::unique_ptr<unsigned char[], FreeAligned> shared(
      static_cast<unsigned char*>(::operator new[](shared_bytes, kSharedAlignment)));

  for (unsigned i = 0; i < config.grid.x; ++i) {
    const unsigned b = options().reverse_order ? config.grid.x - 1 - i : i;
    ++stats().blocks;
    stats().threads += n;
    blockIdx = uint3(b);
    block.threads = n;
    block.live = n;
    block.warps.assign(static_cast<std::size_t>(n / kWarp), Warp{});
    for (Warp& w : block.warps) {
      w.barrier.expected = kWarp;
    }
    block.barrier = Barrier{};
    block.barrier.expected = n;
    block.body = body;
    // Uninitialized on a GPU: a pattern that makes reads before writes visible.
    std::memset(shared.get(), 0xA5, shared_bytes);
    block.shared = shared.get();
    for (int t = 0; t < n; ++t) {
      Fiber& f = fibers[static_cast<std::size_t>(t)];
      f.state = State::kReady;
      f.waiting_on = nullptr;
      f.fake_stack = nullptr;
      if (getcontext(&f.context) != 0) {
        fail("getcontext failed", nullptr);
      }
      f.context.uc_stack.ss_sp = f.stack->bottom;
      f.context.uc_stack.ss_size = f.stack->size;
      f.context.uc_link = nullptr;
      makecontext(&f.context, fiber_main, 0);
#ifdef AAREN_EMU_ASAN
      // swapcontext reads uc_stack only through AddressSanitizer's interceptor, which then
      // clears the shadow of the whole stack at every switch (a system call each time):
      // the switches are announced to it instead (__sanitizer_start_switch_fiber).
      f.context.uc_stack.ss_sp = nullptr;
      f.context.uc_stack.ss_size = 0;
#endif
    }
    const int first = options().reverse_order ? n - 1 : 0;
    switch_context(-1, first, false);
    if (block.live != 0) {
      fail("the block returned with live threads", nullptr);
    }
  }
  block.current = -1;
  block.shared = nullptr;
}

}  // namespace emu

namespace at::cuda {
emu::DeviceProperties* getCurrentDeviceProperties() {
  static emu::DeviceProperties properties;
  const emu::Device& d = emu::device();
  properties = {d.multiprocessors, d.max_threads_per_multiprocessor, d.shared_per_block,
                d.shared_per_multiprocessor, warpSize};
  return &properties;
}
}  // namespace at::cuda
