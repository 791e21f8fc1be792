// Host emulation of the CUDA features the aaren kernels use, so that the kernels' own sources
// (csrc/ops/cuda/, turned into host C++ by make_emulated_kernel.py) run on a machine with no
// GPU and no CUDA toolkit.
//
// What is emulated:
//   - a launch runs every block of the grid, one block after the other (in index order, or
//     in reverse with emu::options().reverse_order, to expose dependencies between blocks);
//   - the threads of a block are fibers (user-space contexts, cuda_shim.cpp) on the calling
//     thread; a fiber runs until it reaches a warp shuffle, __syncwarp or __syncthreads, so
//     every thread runs alone between two synchronization points and only what those points
//     order is seen by the other threads, as on a GPU;
//   - warp shuffles (__shfl_sync, _up, _down, _xor, with their width and out-of-range rules)
//     exchange values among the 32 lanes of a warp; __syncthreads is a barrier over the
//     block's threads that have not exited;
//   - dynamic shared memory (extern __shared__) is a buffer of exactly the size the launch
//     asked for (so an address sanitizer sees overruns); static __shared__ variables are
//     static variables, which is right because blocks do not overlap;
//   - the launch checks CUDA makes (grid and block sizes, 48 KiB of dynamic shared memory),
//     and an occupancy query from the emulated device's properties (emu::device(), which a
//     test sets to make the host code choose its chunked plans).
// What fails loudly (a message naming the source line, then abort): a full-mask shuffle or
// __syncwarp that not all 32 lanes reach at the same call site (divergent or exited lanes),
// __syncthreads reached at different call sites by threads of one block, and a deadlock
// (every live thread waiting at a barrier that cannot complete).
// What is NOT emulated: the GPU's timing, scheduling and memory model (no data races can
// show up between synchronization points, no caches, no ordering of global memory across
// blocks), the device's rounding (nvcc contracts a * b + c into fma; the host compiler
// here does not, so results differ from a GPU's in the last bits), nvcc's code generation
// (registers, spills, local memory), and anything of the CUDA runtime beyond a launch.
#pragma once

#include <c10/core/Device.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <source_location>
#include <tuple>
#include <type_traits>
#include <utility>

// ---- Language extensions ---------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __shared__ static  // one instance, right since the blocks of a launch run one by one
#define __align__(n) __attribute__((aligned(n)))
#define __restrict__ __restrict

// Device code calls the math functions unqualified (fma(float, float, float), ...).
using std::fma;

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
using uint3 = dim3;
inline constexpr int warpSize = 32;

// The running fiber's coordinates (set by the emulator before it resumes a fiber).
extern uint3 threadIdx;
extern uint3 blockIdx;
extern dim3 blockDim;
extern dim3 gridDim;

namespace emu {

// A synchronization point in the kernel source (the emulated file has #line directives, so
// these are lines of the .cu and its headers).
struct Site {
  const char* file;
  unsigned line;
  unsigned column;
  const char* what;
};

// The properties of the emulated GPU, used by launch checks and occupancy queries.
struct Device {
  int multiprocessors = 108;
  int max_threads_per_multiprocessor = 2048;
  int max_blocks_per_multiprocessor = 32;
  std::size_t shared_per_multiprocessor = 164 * 1024;
  std::size_t shared_per_block = 48 * 1024;  // without an opt-in attribute
};
Device& device();

struct Options {
  bool reverse_order = false;  // run blocks, and resume threads, from the last to the first
};
Options& options();

// Counters, for tests to check which code paths a call took.
struct Stats {
  std::int64_t launches = 0;
  std::int64_t blocks = 0;
  std::int64_t threads = 0;
  std::int64_t shuffles = 0;  // warp-wide exchanges
  std::int64_t block_barriers = 0;
};
Stats& stats();

// The body of one thread: called on every thread of every block.
struct ThreadBody {
  void (*run)(void*);
  void* context;
};

struct LaunchConfig {
  dim3 grid;
  dim3 block;
  std::size_t shared = 0;
  const void* stream = nullptr;
};

void run_grid(const LaunchConfig& config, ThreadBody body);

// The dynamic shared memory of the running block (extern __shared__ arrays).
void* dynamic_shared_memory();

// One warp-wide exchange: every lane offers `size` bytes at `value` and receives those of
// lane `source` into `result` (source == own lane: its own value).
void warp_exchange(unsigned mask, const void* value, void* result, std::size_t size, int source,
                   const Site& site);
void sync_warp(unsigned mask, const Site& site);
void sync_block(const Site& site);

inline Site site_of(const std::source_location& where, const char* what) {
  return {where.file_name(), static_cast<unsigned>(where.line()),
          static_cast<unsigned>(where.column()), what};
}

inline int lane_id() {
  return static_cast<int>(threadIdx.x % 32);
}

template <typename T>
T shuffle(unsigned mask, T value, int source, const std::source_location& where,
          const char* what) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8,
                "emulated shuffles move up to 8 bytes of a trivially copyable type");
  T result;
  warp_exchange(mask, &value, &result, sizeof(T), source, site_of(where, what));
  return result;
}

// The width argument of a shuffle, checked. Lanes form segments of `width`: __shfl_sync
// reads lane src_lane modulo width of the caller's segment, _up and _down read the caller's
// own value where the source would leave the segment, _xor where it would be in a later one.
int checked_width(int width, const std::source_location& where);

// The kernel's arguments are copied at the launch, as CUDA does, into the parameter types.
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), const LaunchConfig& config, Args&&... args) {
  std::tuple<std::decay_t<Params>...> params(std::forward<Args>(args)...);
  struct Context {
    void (*kernel)(Params...);
    std::tuple<std::decay_t<Params>...>* params;
  } context{kernel, &params};
  run_grid(config, {[](void* p) {
                      auto* c = static_cast<Context*>(p);
                      std::apply(c->kernel, *c->params);
                    },
                    &context});
}

}  // namespace emu

// ---- Warp and block intrinsics ----------------------------------------------------------
template <typename T>
T __shfl_sync(unsigned mask, T var, int src_lane, int width = warpSize,
              std::source_location where = std::source_location::current()) {
  width = emu::checked_width(width, where);
  const int lane = emu::lane_id();
  const int segment = lane / width * width;
  return emu::shuffle(mask, var, segment + ((src_lane % width) + width) % width, where,
                      "__shfl_sync");
}

template <typename T>
T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize,
                 std::source_location where = std::source_location::current()) {
  width = emu::checked_width(width, where);
  const int lane = emu::lane_id();
  const int in_segment = lane % width - static_cast<int>(delta);
  return emu::shuffle(mask, var, in_segment >= 0 ? lane - static_cast<int>(delta) : lane, where,
                      "__shfl_up_sync");
}

template <typename T>
T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize,
                   std::source_location where = std::source_location::current()) {
  width = emu::checked_width(width, where);
  const int lane = emu::lane_id();
  const int in_segment = lane % width + static_cast<int>(delta);
  return emu::shuffle(mask, var, in_segment < width ? lane + static_cast<int>(delta) : lane,
                      where, "__shfl_down_sync");
}

template <typename T>
T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = warpSize,
                  std::source_location where = std::source_location::current()) {
  width = emu::checked_width(width, where);
  const int lane = emu::lane_id();
  const int target = lane ^ lane_mask;
  // Lanes of earlier segments can be read; a later segment gives the caller's own value.
  const bool readable = target < (lane / width + 1) * width;
  return emu::shuffle(mask, var, readable ? target : lane, where, "__shfl_xor_sync");
}

inline void __syncwarp(unsigned mask = 0xffffffffu,
                       std::source_location where = std::source_location::current()) {
  emu::sync_warp(mask, emu::site_of(where, "__syncwarp"));
}

inline void __syncthreads(std::source_location where = std::source_location::current()) {
  emu::sync_block(emu::site_of(where, "__syncthreads"));
}

// ---- The CUDA runtime and c10/ATen CUDA helpers the host code calls -----------------------
using cudaError_t = int;
inline constexpr cudaError_t cudaSuccess = 0;
using cudaStream_t = const void*;

inline const char* cudaGetErrorString(cudaError_t) {
  return "emulated CUDA error";
}

template <typename Kernel>
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, Kernel, int threads,
                                                          std::size_t shared) {
  const emu::Device& d = emu::device();
  int n = std::min(d.max_blocks_per_multiprocessor,
                   d.max_threads_per_multiprocessor / std::max(threads, 1));
  if (shared > 0) {
    n = std::min<int>(n, static_cast<int>(d.shared_per_multiprocessor / shared));
  }
  *blocks = std::max(n, 0);
  return cudaSuccess;
}

#define C10_CUDA_CHECK(expr)                                              \
  do {                                                                    \
    const cudaError_t aaren_emu_error = (expr);                           \
    TORCH_CHECK(aaren_emu_error == cudaSuccess, "emulated CUDA error ",   \
                aaren_emu_error);                                         \
  } while (false)
#define C10_CUDA_KERNEL_LAUNCH_CHECK() ((void)0)

namespace emu {
struct DeviceProperties {
  int multiProcessorCount;
  int maxThreadsPerMultiProcessor;
  std::size_t sharedMemPerBlock;
  std::size_t sharedMemPerMultiprocessor;
  int warpSize;
};
struct Stream {
  cudaStream_t stream() const {
    return nullptr;
  }
  operator cudaStream_t() const {  // NOLINT: as c10::cuda::CUDAStream converts
    return nullptr;
  }
};
}  // namespace emu

namespace at::cuda {
emu::DeviceProperties* getCurrentDeviceProperties();
inline emu::Stream getCurrentCUDAStream() {
  return {};
}
}  // namespace at::cuda

namespace c10::cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
};
}  // namespace c10::cuda
