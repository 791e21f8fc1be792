// The packed variable-length scan (aaren.scan_varlen): N sequences of different lengths packed
// one after another along the tokens, as flash-attn's varlen API packs them. Sequence i holds
// the tokens [cu_seqlens[i], cu_seqlens[i + 1]) of scores [T, H] and values [T, H, D], and is
// scanned on its own (a segmented scan: the state is reset at every sequence start), from its
// own initial state (state_lse[i], state_out[i]) when a state is given.
//
// As for the dense scan (ops/scan.h), the checks and the allocation are written once here and
// every backend (CPU, CUDA, Meta) only fills the outputs.
//
// What is checked where (as flash-attn documents it): the shapes, dtypes and devices of every
// tensor, cu_seqlens included, everywhere (Meta too); the values of cu_seqlens (they start at
// 0, never decrease and end at T; max_seqlen, when given, is at least the longest sequence) on
// the CPU, where reading them costs nothing, and on CUDA only when max_seqlen is not given,
// since the longest sequence must then be read back anyway (one synchronization, which also
// checks the values). With max_seqlen given, CUDA reads cu_seqlens on the device only: no
// synchronization and no check of the values; the kernels clamp every bound to [0, T], so bad
// values give wrong results, never an access outside the tensors.
#pragma once

#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>

#include "ops/scan.h"

namespace aaren::ops {

// The tensors of one packed forward, validated: scores [T, H], values [T, H, D] (last dimension
// contiguous, other strides arbitrary), cu_seqlens [N + 1] (int32 or int64, values' device),
// max_seqlen (the caller's bound on the longest sequence, or none), an optional state
// (lse [N, H] and out [N, H, D], float64, contiguous). The kernel writes, all contiguous:
// out [T, H, D] (values' dtype), the per-token lse [T, H] (float64, what the backward needs),
// and each sequence's final state, final_lse [N, H] and final_out [N, H, D] (float64; the
// initial state, or the empty one, for a sequence of no tokens).
struct VarlenForwardArgs {
  at::Tensor scores;
  at::Tensor values;
  at::Tensor cu_seqlens;
  std::optional<int64_t> max_seqlen;
  std::optional<at::Tensor> state_lse;
  std::optional<at::Tensor> state_out;
  at::Tensor out;
  at::Tensor lse;
  at::Tensor final_lse;
  at::Tensor final_out;
};

// The tensors of one packed backward: grad_out [T, H, D] (values' dtype, last dimension
// contiguous) and grad_lse [T, H] (float64) when present (absent: zeros); the forward's inputs
// and its out and lse; the state as for the forward. The kernel writes grad_scores [T, H],
// grad_values [T, H, D], and the state's gradients grad_state_lse [N, H], grad_state_out
// [N, H, D] (float64; zero for a sequence of no tokens, and everywhere when there is no
// state), all contiguous.
struct VarlenBackwardArgs {
  std::optional<at::Tensor> grad_out;
  std::optional<at::Tensor> grad_lse;
  at::Tensor scores;
  at::Tensor values;
  at::Tensor cu_seqlens;
  std::optional<int64_t> max_seqlen;
  at::Tensor out;
  at::Tensor lse;
  std::optional<at::Tensor> state_lse;
  std::optional<at::Tensor> state_out;
  at::Tensor grad_scores;
  at::Tensor grad_values;
  at::Tensor grad_state_lse;
  at::Tensor grad_state_out;
};

using VarlenForwardKernel = void (*)(const VarlenForwardArgs&);
using VarlenBackwardKernel = void (*)(const VarlenBackwardArgs&);

// The checks that read the values of cu_seqlens, on a host copy of them (int64, N + 1 >= 1
// entries): they start at 0, never decrease and end at `tokens`, and max_seqlen (when given)
// is at least the longest sequence. Returns the longest sequence's length. (Inline: the CUDA
// emulation test compiles the CUDA host code without the operator library.)
inline int64_t check_cu_seqlens_values(const char* op, const int64_t* bounds, int64_t entries,
                                int64_t tokens, std::optional<int64_t> max_seqlen) {
  TORCH_CHECK(entries >= 1 && bounds[0] == 0, op, ": cu_seqlens must start at 0, got cu_seqlens[0] = ",
              entries >= 1 ? bounds[0] : 0);
  int64_t longest = 0;
  for (int64_t i = 0; i + 1 < entries; ++i) {
    TORCH_CHECK(bounds[i + 1] >= bounds[i], op,
                ": cu_seqlens must be non-decreasing (sequence lengths >= 0), got cu_seqlens[",
                i + 1, "] = ", bounds[i + 1], " after cu_seqlens[", i, "] = ", bounds[i]);
    longest = std::max(longest, bounds[i + 1] - bounds[i]);
  }
  TORCH_CHECK(bounds[entries - 1] == tokens, op,
              ": cu_seqlens must end at the number of tokens T = values.size(0) = ", tokens,
              ", got cu_seqlens[", entries - 1, "] = ", bounds[entries - 1]);
  TORCH_CHECK(!max_seqlen.has_value() || *max_seqlen >= longest, op, ": max_seqlen is ",
              max_seqlen.value_or(0), " but the longest sequence has ", longest, " tokens");
  return longest;
}

// Validate, allocate, and run `kernel` (none for Meta: shapes only).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> scan_varlen_forward_with(
    VarlenForwardKernel kernel, const at::Tensor& scores, const at::Tensor& values,
    const at::Tensor& cu_seqlens, std::optional<c10::SymInt> max_seqlen,
    const std::optional<at::Tensor>& state_lse, const std::optional<at::Tensor>& state_out);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> scan_varlen_backward_with(
    VarlenBackwardKernel kernel, const std::optional<at::Tensor>& grad_out,
    const std::optional<at::Tensor>& grad_lse, const at::Tensor& scores,
    const at::Tensor& values, const at::Tensor& cu_seqlens,
    std::optional<c10::SymInt> max_seqlen, const at::Tensor& out, const at::Tensor& lse,
    const std::optional<at::Tensor>& state_lse, const std::optional<at::Tensor>& state_out);

// Registers scan_varlen_forward and scan_varlen_backward for one dispatch key.
template <VarlenForwardKernel forward, VarlenBackwardKernel backward>
void register_varlen_backend(torch::Library& m) {
  m.impl("scan_varlen_forward",
         [](const at::Tensor& scores, const at::Tensor& values, const at::Tensor& cu_seqlens,
            std::optional<c10::SymInt> max_seqlen,
            const std::optional<at::Tensor>& state_lse,
            const std::optional<at::Tensor>& state_out) {
           return scan_varlen_forward_with(forward, scores, values, cu_seqlens, max_seqlen,
                                           state_lse, state_out);
         });
  m.impl("scan_varlen_backward",
         [](const std::optional<at::Tensor>& grad_out, const std::optional<at::Tensor>& grad_lse,
            const at::Tensor& scores, const at::Tensor& values, const at::Tensor& cu_seqlens,
            std::optional<c10::SymInt> max_seqlen, const at::Tensor& out,
            const at::Tensor& lse, const std::optional<at::Tensor>& state_lse,
            const std::optional<at::Tensor>& state_out) {
           return scan_varlen_backward_with(backward, grad_out, grad_lse, scores, values,
                                            cu_seqlens, max_seqlen, out, lse, state_lse,
                                            state_out);
         });
}

}  // namespace aaren::ops
