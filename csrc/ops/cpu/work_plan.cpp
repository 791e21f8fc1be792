// The CPU kernels' plan of work and their choice of stores (work_plan.h): the split of the
// work into tasks and chunks, and when outputs go out by streaming stores. Compiled once; the
// stores themselves are per instruction set (vec_io.h).
#include "ops/cpu/work_plan.h"

#include <c10/util/Exception.h>

#include <cctype>
#include <cstdlib>
#include <string>

namespace aaren::ops::cpu {
namespace {

// Once split, the lanes each thread should have: independent recurrences that hide each
// other's exp latency (measured on AVX2: one lane ran ~2x slower per token). On one thread the
// split does not pay for itself: phase 1 reads the values a second time, and a whole
// sequence measured faster than its chunks, forward and backward (1x262144x1x64 bfloat16, in
// one process: 1.9x a copy whole against 2.2x in 8 chunks forward, 3.3x against 4.9x backward).
constexpr int64_t kLanesPerTask = 4;
// The shortest chunk worth its summary (a D-row per chunk and a second read of the chunk's
// inputs in phase 1).
constexpr int64_t kMinChunkTokens = 512;
constexpr int64_t kMinElementsPerTask = 1 << 15;

// AAREN_CPU_SEQUENCE_CHUNKS=C splits every sequence into C chunks (at most one per token)
// whatever its shape; 0 or unset chooses. Read per call (a getenv is cheap next to a scan), so
// that the tests can run the split path on small problems and compare it with the unsplit one.
int64_t forced_chunks() {
  const char* text = std::getenv("AAREN_CPU_SEQUENCE_CHUNKS");
  if (text == nullptr || *text == '\0') {
    return 0;
  }
  // Digits only: strtoll alone would also take leading spaces and a sign.
  char* end = nullptr;
  const long long value = std::strtoll(text, &end, 10);
  TORCH_CHECK(std::isdigit(static_cast<unsigned char>(*text)) && *end == '\0' && value >= 0,
              "AAREN_CPU_SEQUENCE_CHUNKS must be a non-negative integer (or unset or empty), got '",
              text, "'");
  return static_cast<int64_t>(value);
}

}  // namespace

Plan plan_work(int64_t batch, int64_t length, int64_t heads, int64_t head_dim) {
  // Two tasks per thread, so that a thread done early takes another; on one thread there is
  // nothing to balance, and one task per batch interleaves all of its heads (measured, one
  // thread, alternated in one process: 1x16384x2x64 and 1x4096x8x64 ran 13% to 44% faster
  // than in two tasks).
  // Inside a parallel region (the packed scan runs short sequences so, one per thread:
  // scan_varlen_cpu.cpp) at::parallel_for runs inline on this one thread: plan for one.
  const int64_t threads = at::in_parallel_region() ? 1 : at::get_num_threads();
  const int64_t wanted_tasks = threads == 1 ? 1 : 2 * threads;
  const int64_t sequences = std::max<int64_t>(batch * heads, 1);
  int64_t chunks = forced_chunks();
  if (chunks == 0) {
    const int64_t wanted_lanes = wanted_tasks * kLanesPerTask;
    chunks = sequences >= threads
        ? 1
        : std::min((wanted_lanes + sequences - 1) / sequences, length / kMinChunkTokens);
  }
  chunks = std::clamp<int64_t>(chunks, 1, std::max<int64_t>(length, 1));
  const int64_t chunk_len = (std::max<int64_t>(length, 1) + chunks - 1) / chunks;
  chunks = (std::max<int64_t>(length, 1) + chunk_len - 1) / chunk_len;  // none empty
  const int64_t lanes = std::max<int64_t>(chunks * heads, 1);
  const int64_t tasks_per_batch = std::clamp<int64_t>(
      (wanted_tasks + batch - 1) / std::max<int64_t>(batch, 1), 1, lanes);
  const int64_t lanes_per_task = (lanes + tasks_per_batch - 1) / tasks_per_batch;
  const int64_t task_elements =
      std::max<int64_t>(1, chunk_len * lanes_per_task * std::max<int64_t>(head_dim, 1));
  return {chunks, chunk_len, lanes_per_task,
          std::max<int64_t>(1, kMinElementsPerTask / task_elements)};
}

// ---- Streaming stores ---------------------------------------------------------------
// A plain store first reads the line it writes (read for ownership); a non-temporal
// (streaming) one does not, and leaves the line out of the caches. The kernels' outputs are
// written once and not read back by them, so past a size they stream: measured on the CI
// machine (one thread, each variant in blocks of calls so that neither evicts the other's
// lines), forwards ran 3-13% faster and backwards up to 27% faster from 1 MiB of outputs up
// (float32 and bfloat16; one backward of two heads within noise). Below that the outputs
// would stay in cache for whoever reads them next: after a 128 KiB bfloat16 forward, a
// projection reading its out ran 14% slower when it had streamed; after 1 MiB or more it ran
// as fast.
// Only a whole, aligned vector streams (a partial line would leave its write-combining buffer
// half filled); the rest takes a plain store. A task that streamed fences (stream_fence in
// vec_io.h) before it ends, so the stores are visible to whoever reads the outputs next.
namespace {
constexpr int64_t kStreamingBytesPerThread = int64_t{1} << 20;
}  // namespace

// AAREN_CPU_STREAMING_STORES=1 streams whatever the size, 0 never; unset or empty chooses.
// Read per call, as AAREN_CPU_SEQUENCE_CHUNKS is (the tests compare the two paths).
bool use_streaming_stores(int64_t output_bytes) {
  const char* text = std::getenv("AAREN_CPU_STREAMING_STORES");
  if (text != nullptr && *text != '\0') {
    const std::string value(text);
    TORCH_CHECK(value == "0" || value == "1",
                "AAREN_CPU_STREAMING_STORES must be 0 or 1 (or unset or empty), got '", value,
                "'");
    return value == "1";
  }
  return output_bytes >= kStreamingBytesPerThread * at::get_num_threads();
}

}  // namespace aaren::ops::cpu
