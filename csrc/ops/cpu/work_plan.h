// How the CPU kernels cut their work into tasks for at::parallel_for, and whether their
// outputs go out by streaming stores: decisions that do not depend on the instruction set
// (work_plan.cpp), shared by every instruction set's kernels (scan_kernel.cpp).
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

namespace aaren::ops::cpu {

// ---- The split of the work ----------------------------------------------------------
// The kernels run over lanes: a lane is one (batch, head) sequence, or a chunk of one (a run
// of consecutive tokens). Lanes are grouped into tasks for at::parallel_for, and within a
// task the loop runs over tokens and, inside that, over the task's lanes, whose independent
// recurrences overlap their exp/log latencies. Unsplit (one chunk per sequence), a task's
// lanes are a run of heads of one batch: rows [b, n, h0:h1, :] are adjacent in the
// [B, N, H, D] layout, so a task streams through memory as a copy does (one sequence at a
// time would jump H*D elements per token, defeating the hardware prefetchers).
//
// When batch x heads is fewer sequences than threads (a long single sequence would keep one
// thread busy and leave the others idle), each sequence is split into chunks, in the three
// phases of the CUDA kernels (docs/design.md, "Performance on the CPU"):
//   1. summarize: every chunk but one from an empty start, keeping only its summary
//      (forward: the (lse, out) of its tokens; backward: its suffix sums S, P, P');
//   2. combine the summaries in order, per sequence (combine.h), into each chunk's carry:
//      what the chunks before it (forward) or after it (backward) leave;
//   3. scan every chunk from its carry, writing the outputs.
// Lanes of a batch are numbered chunk-major, l = c H + h, so a task is a run of heads of one
// chunk, or of several chunks when the heads are few.
struct Plan {
  int64_t chunks;     // per sequence, none empty
  int64_t chunk_len;  // tokens per chunk; the last one may be shorter
  int64_t lanes_per_task;
  int64_t grain;      // tasks per thread at least, so small problems stay on one thread
};

// The plan for a [batch, length, heads, head_dim] scan on at::get_num_threads() threads
// (AAREN_CPU_SEQUENCE_CHUNKS forces the chunk count; work_plan.cpp says why each choice).
Plan plan_work(int64_t batch, int64_t length, int64_t heads, int64_t head_dim);

// Whether a kernel writing output_bytes should stream them (work_plan.cpp, "Streaming
// stores"; AAREN_CPU_STREAMING_STORES forces it).
bool use_streaming_stores(int64_t output_bytes);

// Runs fn(scratch, b, lane_begin, lane_end) for every task over lanes [0, lanes) of each
// batch, with one Scratch per thread's run of tasks.
template <typename Scratch, typename Fn>
void for_each_task(const Plan& plan, int64_t batch, int64_t lanes, int64_t row_width,
                   const Fn& fn) {
  if (lanes <= 0 || batch <= 0) {
    return;
  }
  const int64_t per_batch = (lanes + plan.lanes_per_task - 1) / plan.lanes_per_task;
  at::parallel_for(0, batch * per_batch, plan.grain, [&](int64_t begin, int64_t end) {
    Scratch scratch(plan.lanes_per_task, row_width);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t lane_begin = (task % per_batch) * plan.lanes_per_task;
      fn(scratch, task / per_batch, lane_begin, std::min(lane_begin + plan.lanes_per_task, lanes));
    }
  });
}

}  // namespace aaren::ops::cpu
