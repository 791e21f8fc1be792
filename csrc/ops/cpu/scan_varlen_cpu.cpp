// The packed variable-length scan on the CPU (ops/scan_varlen.h): every sequence is the dense
// scan of one batch row, run by the dense kernels themselves (scan_kernel.cpp, the selected
// instruction set's), not by a second copy of the recurrence.
//
// Sequence i is the tokens [b_i, b_{i+1}) of the packed tensors, so it is a [1, len, H, D] view
// of values (and [1, len, H] of scores) at token b_i with the packed strides: the kernels read
// inputs through their strides (only the last dimension must be contiguous). The outputs
// (out [T, H, D], lse [T, H], final_lse [N, H], final_out [N, H, D] and the gradients) are
// contiguous, and a sequence's slice of a contiguous tensor along its first dimension is itself
// contiguous, which is what the kernels write to. So each sequence is one kernel call on views
// (made here without the dispatcher: a call per sequence must stay cheap next to a sequence of
// a few tokens).
//
// Parallelism: the dense kernels parallelize inside a call over heads, and over chunks of a
// sequence when the heads are fewer than the threads (work_plan.h). For packed batches that
// alone would be poor: a sequence of a few hundred tokens and a few heads is too small to split
// over threads (each call would pay a fork and join for little work), and many such sequences
// in a row would keep the threads mostly waiting. So the work is split two ways:
//   - sequences longer than a thread's fair share of all the tokens (total / threads) run one
//     after another, each with the kernels' own parallelism (heads, chunks): no split over
//     sequences could balance them;
//   - the other sequences are cut into one run of consecutive sequences per thread, of about
//     equal tokens, and the runs go in parallel, each sequence then a single-threaded kernel
//     call (inside a parallel region at::parallel_for runs inline, and plan_work plans for one
//     thread: no chunks, work_plan.cpp).
// A sequence's results do not depend on which way it ran, except that a long one may be split
// into chunks exactly as aaren.scan would split it alone on this many threads (and
// AAREN_CPU_SEQUENCE_CHUNKS=1 forbids that in both), so scan_varlen gives each sequence the bits
// of aaren.scan over that sequence with the chunk count fixed.
#include <ATen/Parallel.h>
#include <c10/core/TensorImpl.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "ops/cpu/scan_kernel.h"
#include "ops/scan_varlen.h"

namespace aaren::ops::cpu {
namespace {

constexpr const char* kOp = "aaren.scan_varlen";

// Below this many elements of values in all, one thread does everything (the dense kernels'
// threshold for a parallel task: work_plan.cpp, kMinElementsPerTask).
constexpr int64_t kMinParallelElements = int64_t{1} << 15;
// What a kernel call costs beyond its tokens (views, planning, scratch), in tokens, when the
// sequences are balanced over threads: a few hundred nanoseconds.
constexpr int64_t kCallCostTokens = 4;

// cu_seqlens read and checked (ops/scan_varlen.h): the N + 1 boundaries as int64.
std::vector<int64_t> read_bounds(const at::Tensor& cu_seqlens, int64_t tokens,
                                 std::optional<int64_t> max_seqlen) {
  const at::Tensor wide = cu_seqlens.to(at::kLong).contiguous();
  std::vector<int64_t> bounds(wide.const_data_ptr<int64_t>(),
                              wide.const_data_ptr<int64_t>() + wide.numel());
  check_cu_seqlens_values(kOp, bounds.data(), static_cast<int64_t>(bounds.size()), tokens,
                          max_seqlen);
  return bounds;
}

// A view of `t` with these sizes and strides starting `offset` elements after t's own start:
// what narrow and unsqueeze give, without the dispatcher (the kernels only read sizes, strides
// and data through it).
at::Tensor view_of(const at::Tensor& t, int64_t offset, c10::IntArrayRef sizes,
                   c10::IntArrayRef strides) {
  auto impl = c10::make_intrusive<c10::TensorImpl>(c10::TensorImpl::VIEW, c10::Storage(t.storage()),
                                                   t.key_set(), t.dtype());
  impl->set_storage_offset(t.storage_offset() + offset);
  impl->set_sizes_and_strides(sizes, strides);
  return at::Tensor(std::move(impl));
}

// Sequence tokens [begin, begin + len) of a [T, H] or [T, H, D] tensor, as [1, len, H(, D)].
at::Tensor tokens_of(const at::Tensor& t, int64_t begin, int64_t len) {
  if (t.dim() == 2) {
    return view_of(t, begin * t.stride(0), {1, len, t.size(1)},
                   {len * t.stride(0), t.stride(0), t.stride(1)});
  }
  return view_of(t, begin * t.stride(0), {1, len, t.size(1), t.size(2)},
                 {len * t.stride(0), t.stride(0), t.stride(1), t.stride(2)});
}

// Row i of a [N, H] or [N, H, D] tensor, as [1, H(, D)].
at::Tensor row_of(const at::Tensor& t, int64_t i) {
  if (t.dim() == 2) {
    return view_of(t, i * t.stride(0), {1, t.size(1)}, {t.stride(0), t.stride(1)});
  }
  return view_of(t, i * t.stride(0), {1, t.size(1), t.size(2)},
                 {t.stride(0), t.stride(1), t.stride(2)});
}

std::optional<at::Tensor> row_of(const std::optional<at::Tensor>& t, int64_t i) {
  return t.has_value() ? std::optional<at::Tensor>(row_of(*t, i)) : std::nullopt;
}

// Runs fn(i) for every sequence i, split as the header says: long sequences one at a time
// (fn's kernel parallelizes inside), the others in runs of about equal tokens, one per thread.
template <typename Fn>
void for_each_sequence(const std::vector<int64_t>& bounds, int64_t elements_per_token,
                       const Fn& fn) {
  const int64_t sequences = static_cast<int64_t>(bounds.size()) - 1;
  const int64_t tokens = bounds.back();
  const int64_t threads = at::in_parallel_region() ? 1 : at::get_num_threads();
  if (threads == 1 || tokens * elements_per_token < kMinParallelElements) {
    for (int64_t i = 0; i < sequences; ++i) {
      fn(i);
    }
    return;
  }
  const int64_t share = (tokens + threads - 1) / threads;
  std::vector<int64_t> together;  // the sequences run in parallel with each other, in order
  std::vector<int64_t> alone;
  int64_t together_cost = 0;
  for (int64_t i = 0; i < sequences; ++i) {
    const int64_t len = bounds[i + 1] - bounds[i];
    if (len > share) {
      alone.push_back(i);
    } else {
      together.push_back(i);
      together_cost += len + kCallCostTokens;
    }
  }
  // Runs of consecutive sequences of about together_cost / threads each: run r ends at the
  // first sequence where the running cost reaches (r + 1) / threads of the total.
  std::vector<int64_t> run_end;
  int64_t cost = 0;
  for (int64_t k = 0; k < static_cast<int64_t>(together.size()); ++k) {
    const int64_t i = together[k];
    cost += bounds[i + 1] - bounds[i] + kCallCostTokens;
    const int64_t run = static_cast<int64_t>(run_end.size());
    if (cost * threads >= (run + 1) * together_cost) {
      run_end.push_back(k + 1);
    }
  }
  if (run_end.empty() || run_end.back() != static_cast<int64_t>(together.size())) {
    run_end.push_back(static_cast<int64_t>(together.size()));
  }
  at::parallel_for(0, static_cast<int64_t>(run_end.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t run = begin; run < end; ++run) {
      for (int64_t k = run == 0 ? 0 : run_end[run - 1]; k < run_end[run]; ++k) {
        fn(together[k]);
      }
    }
  });
  for (const int64_t i : alone) {
    fn(i);
  }
}

void varlen_forward(const VarlenForwardArgs& args) {
  const int64_t tokens = args.values.size(0);
  const int64_t heads = args.values.size(1);
  const int64_t head_dim = args.values.size(2);
  const std::vector<int64_t> bounds = read_bounds(args.cu_seqlens, tokens, args.max_seqlen);
  const bool has_state = args.state_lse.has_value();
  double* final_lse = args.final_lse.mutable_data_ptr<double>();  // contiguous [N, H]
  const double* lse = args.lse.const_data_ptr<double>();          // contiguous [T, H]
  for_each_sequence(bounds, heads * head_dim, [&](int64_t i) {
    const int64_t begin = bounds[i];
    const int64_t len = bounds[i + 1] - begin;
    double* final_lse_row = final_lse + i * heads;
    if (len == 0) {  // no tokens: the state stays as it was (the empty state when none)
      const double* lse0 = has_state ? args.state_lse->const_data_ptr<double>() + i * heads : nullptr;
      const double* out0 = has_state ? args.state_out->const_data_ptr<double>() + i * heads * head_dim
                                     : nullptr;
      double* final_out_row = args.final_out.mutable_data_ptr<double>() + i * heads * head_dim;
      for (int64_t h = 0; h < heads; ++h) {
        final_lse_row[h] = has_state ? lse0[h] : -std::numeric_limits<double>::infinity();
      }
      for (int64_t e = 0; e < heads * head_dim; ++e) {
        final_out_row[e] = has_state ? out0[e] : 0.0;
      }
      return;
    }
    const ForwardArgs sequence{tokens_of(args.scores, begin, len),
                               tokens_of(args.values, begin, len),
                               row_of(args.state_lse, i),
                               row_of(args.state_out, i),
                               tokens_of(args.out, begin, len),
                               tokens_of(args.lse, begin, len),
                               row_of(args.final_out, i)};
    forward(sequence);
    // The final state's lse is the last token's (as aaren.scan's).
    std::copy_n(lse + (begin + len - 1) * heads, heads, final_lse_row);
  });
}

void varlen_backward(const VarlenBackwardArgs& args) {
  const int64_t tokens = args.values.size(0);
  const int64_t heads = args.values.size(1);
  const int64_t head_dim = args.values.size(2);
  const std::vector<int64_t> bounds = read_bounds(args.cu_seqlens, tokens, args.max_seqlen);
  const auto part = [](const std::optional<at::Tensor>& t, int64_t begin, int64_t len) {
    return t.has_value() ? std::optional<at::Tensor>(tokens_of(*t, begin, len)) : std::nullopt;
  };
  for_each_sequence(bounds, heads * head_dim, [&](int64_t i) {
    const int64_t begin = bounds[i];
    const int64_t len = bounds[i + 1] - begin;
    if (len == 0) {  // no output depends on this sequence's state
      std::fill_n(args.grad_state_lse.mutable_data_ptr<double>() + i * heads, heads, 0.0);
      std::fill_n(args.grad_state_out.mutable_data_ptr<double>() + i * heads * head_dim,
                  heads * head_dim, 0.0);
      return;
    }
    BackwardArgs sequence;
    sequence.grad_out = part(args.grad_out, begin, len);
    sequence.grad_lse = part(args.grad_lse, begin, len);
    sequence.scores = tokens_of(args.scores, begin, len);
    sequence.values = tokens_of(args.values, begin, len);
    sequence.out = tokens_of(args.out, begin, len);
    sequence.lse = tokens_of(args.lse, begin, len);
    sequence.state_lse = row_of(args.state_lse, i);
    sequence.state_out = row_of(args.state_out, i);
    sequence.grad_scores = tokens_of(args.grad_scores, begin, len);
    sequence.grad_values = tokens_of(args.grad_values, begin, len);
    sequence.grad_state_lse = row_of(args.grad_state_lse, i);
    sequence.grad_state_out = row_of(args.grad_state_out, i);
    backward(sequence);
  });
}

}  // namespace
}  // namespace aaren::ops::cpu

TORCH_LIBRARY_IMPL(aaren, CPU, m) {
  aaren::ops::register_varlen_backend<aaren::ops::cpu::varlen_forward,
                                      aaren::ops::cpu::varlen_backward>(m);
}
