// What the CUDA emulation's tests share (test_scan_emulation.cpp, the dense scan's kernels;
// test_varlen_emulation.cpp, the packed scan's): the emulated GPU of a case, the comparison of
// outputs with a reference, the float32 error measures and the CPU kernels' one-pass scope.
#pragma once

#include <ATen/ATen.h>

#include <cstdlib>
#include <limits>
#include <optional>
#include <string>

#include "cuda_shim.h"

namespace emulation_testing {

constexpr double kInf = std::numeric_limits<double>::infinity();

// The emulated GPU for one case: `multiprocessors` SMs of `threads_per_multiprocessor` threads
// (2048 unless given). The host code splits a sequence into chunks when its warps fill less
// than half of the GPU, so the size of the emulated GPU picks the chunk plan. `reverse` runs
// the blocks of a launch, and the threads between barriers, in reverse order.
struct DeviceScope {
  emu::Device saved = emu::device();
  emu::Options saved_options = emu::options();
  DeviceScope(int multiprocessors, int threads_per_multiprocessor, bool reverse) {
    emu::device().multiprocessors = multiprocessors;
    emu::device().max_threads_per_multiprocessor = threads_per_multiprocessor;
    emu::options().reverse_order = reverse;
  }
  DeviceScope(int multiprocessors, bool reverse) : DeviceScope(multiprocessors, 2048, reverse) {}
  ~DeviceScope() {
    emu::device() = saved;
    emu::options() = saved_options;
  }
};

// The two GPUs the accuracy tests judge the float32 backward on: one large enough that the
// long sequences are chunked (two levels of chunk summaries at N = 8192), one so small that
// each sequence runs in one pass.
struct GpuPlan {
  const char* name;
  int multiprocessors;
  int threads_per_multiprocessor;
};
inline constexpr GpuPlan kAccuracyPlans[] = {{"chunked", 108, 2048}, {"one_pass", 1, 128}};

// Why `got` differs from `ref` beyond atol + rtol |ref| (empty when it does not): NaN and
// infinities must be where the reference has them, and exact zeros (masked outputs, zero
// gradients) must stay exact unless keep_zeros is false (a zero of the reference that may come
// out as a rounding error).
inline std::string mismatch(const at::Tensor& ref_in, const at::Tensor& got_in, double atol,
                            double rtol, bool keep_zeros = true) {
  const at::Tensor ref = ref_in.to(at::kDouble);
  const at::Tensor got = got_in.to(at::kDouble);
  if (!ref.sizes().equals(got.sizes())) {
    return "shape";
  }
  std::string why;
  if (!at::equal(ref.isnan(), got.isnan())) {
    why += " NaN at " + std::to_string(ref.isnan().sum().item<int64_t>()) + " vs " +
           std::to_string(got.isnan().sum().item<int64_t>()) + " places;";
  }
  const at::Tensor ref_inf = ref.isinf();
  if (!at::equal(ref_inf, got.isinf())) {
    why += " infinities at other places;";
  } else if (ref_inf.any().item<bool>() &&
             !at::equal(ref.masked_select(ref_inf), got.masked_select(ref_inf))) {
    why += " infinities of another sign;";
  }
  const at::Tensor finite = ref.isfinite() & got.isfinite();
  const at::Tensor lost_zero = (ref == 0) & finite & (got != 0) & keep_zeros;
  if (lost_zero.any().item<bool>()) {
    const int64_t first = lost_zero.reshape(-1).nonzero()[0].item<int64_t>();
    why += " " + std::to_string(lost_zero.sum().item<int64_t>()) +
           " exact zeros not kept (largest " +
           std::to_string(got.masked_select(lost_zero).abs().max().item<double>()) +
           "; the first at flat index " + std::to_string(first) + ": " +
           std::to_string(got.reshape(-1)[first].item<double>()) + ");";
  }
  const at::Tensor diff = (ref - got).abs().masked_fill(~finite, 0);
  const at::Tensor excess = diff - (atol + rtol * ref.abs().masked_fill(~finite, 0));
  if (excess.numel() > 0 && excess.max().item<double>() > 0) {
    why += " max difference " + std::to_string(diff.max().item<double>()) + " (atol " +
           std::to_string(atol) + ", rtol " + std::to_string(rtol) + ");";
  }
  return why;
}

// A float32 result's error against its float64 reference, relative to the reference:
// max |error| / max |reference| and ||error||_2 / ||reference||_2.
struct RelativeError {
  double max;
  double l2;
};

inline RelativeError relative_error(const at::Tensor& got, const at::Tensor& ref) {
  const at::Tensor error = got.to(at::kDouble) - ref;
  return {error.abs().max().item<double>() / ref.abs().max().item<double>(),
          error.norm().item<double>() / ref.norm().item<double>()};
}

// The CPU kernels with every sequence in one pass (AAREN_CPU_SEQUENCE_CHUNKS=1) for the
// scope: the bar the GPU's float32 error is held to is the one-pass streaming sum's. (Split
// into chunks, the CPU's sums are partly pairwise and more accurate at long N.)
class UnsplitCpuScope {
 public:
  UnsplitCpuScope() {
    const char* old = std::getenv(kName);
    saved_ = old == nullptr ? std::nullopt : std::optional<std::string>(old);
    setenv(kName, "1", 1);
  }
  ~UnsplitCpuScope() {
    if (saved_) {
      setenv(kName, saved_->c_str(), 1);
    } else {
      unsetenv(kName);
    }
  }

 private:
  static constexpr const char* kName = "AAREN_CPU_SEQUENCE_CHUNKS";
  std::optional<std::string> saved_;
};

}  // namespace emulation_testing
