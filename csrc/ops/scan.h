// What every backend of the aaren scan operators shares: the argument bundles a
// kernel fills, and the functions that validate inputs, allocate outputs and then
// call a backend's kernel. Checks and allocation are written once here, so the CPU,
// CUDA and Meta registrations cannot disagree about shapes, dtypes or errors.
#pragma once

#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace aaren::ops {

// Tensors of one forward pass, validated: scores [B,N,H], values [B,N,H,D] with a
// contiguous last dimension (other strides arbitrary), an optional initial state
// (lse [B,H] and out [B,H,D], float64: see the state's dtypes below). The kernel writes
// out [B,N,H,D] (values' dtype), the per-token lse [B,N,H] (float64) and final_out [B,H,D]
// (float64: the state's out after the last token, not rounded to the values' dtype),
// all contiguous. Kernels run only for N > 0. A token after a state (N = 1 with a state: a
// step) is computed in float64 whatever the values' dtype (docs/design.md, "The state").
struct ForwardArgs {
  at::Tensor scores;
  at::Tensor values;
  std::optional<at::Tensor> state_lse;
  std::optional<at::Tensor> state_out;
  at::Tensor out;
  at::Tensor lse;
  at::Tensor final_out;
};

// Tensors of one backward pass. grad_out / grad_lse are absent when no gradient
// reached that output (read as zeros); when present, grad_out has a contiguous last
// dimension and values' dtype, grad_lse is float64. The state is in its kernel dtypes as
// for the forward. The kernel writes grad_scores [B,N,H], grad_values [B,N,H,D] and the
// gradients of the initial state (zero for the empty state): grad_state_lse [B,H] float64,
// grad_state_out [B,H,D] float64, all contiguous.
struct BackwardArgs {
  std::optional<at::Tensor> grad_out;
  std::optional<at::Tensor> grad_lse;
  at::Tensor scores;
  at::Tensor values;
  at::Tensor out;
  at::Tensor lse;
  std::optional<at::Tensor> state_lse;
  std::optional<at::Tensor> state_out;
  at::Tensor grad_scores;
  at::Tensor grad_values;
  at::Tensor grad_state_lse;
  at::Tensor grad_state_out;
};

using ForwardKernel = void (*)(const ForwardArgs&);
using BackwardKernel = void (*)(const BackwardArgs&);

// The state's dtypes (docs/design.md, "The state"): float64, lse and out, whatever the
// values' dtype. A float32 log-sum loses its log part under large score offsets, and a
// state rounded to the values' dtype (or to float32) at every token is a random walk that
// drifts over long streams; the state is B x H x (D + 1) numbers, so float64 costs nothing
// that matters. States in other floating dtypes (e.g. a float32 lse and an out in the
// values' dtype, as earlier versions kept them) are accepted and converted.
constexpr at::ScalarType kLseDtype = at::kDouble;
constexpr at::ScalarType kStateOutDtype = at::kDouble;

// A size the state must match, and the argument it comes from (for the error message).
struct ExpectedSize {
  c10::SymInt size;
  const char* whose;
};

// An optional state (lse [B, H], out [B, H, D], any floating dtype, both or neither) against
// the sizes the operator expects, on the device of `on_device_of` (named batch.whose in
// errors). Every operator that takes a state checks it here.
void check_state(const char* op, const std::optional<at::Tensor>& state_lse,
                 const std::optional<at::Tensor>& state_out, const at::Tensor& on_device_of,
                 const ExpectedSize& batch, const ExpectedSize& heads,
                 const ExpectedSize& head_dim);

// Validate, allocate (or check the caller's output buffers), and run `kernel` (none
// for Meta: shapes only).
std::tuple<at::Tensor, at::Tensor, at::Tensor> scan_forward_with(
    ForwardKernel kernel,
    const at::Tensor& scores,
    const at::Tensor& values,
    const std::optional<at::Tensor>& state_lse,
    const std::optional<at::Tensor>& state_out,
    const std::optional<at::Tensor>& out = std::nullopt,
    const std::optional<at::Tensor>& lse = std::nullopt,
    const std::optional<at::Tensor>& final_out = std::nullopt);

std::tuple<at::Tensor, at::Tensor, at::Tensor> step_with(
    ForwardKernel kernel,
    const at::Tensor& score,
    const at::Tensor& value,
    const std::optional<at::Tensor>& state_lse,
    const std::optional<at::Tensor>& state_out);

struct BackwardOutputs {
  std::optional<at::Tensor> grad_scores, grad_values, grad_state_lse, grad_state_out;
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> scan_backward_with(
    BackwardKernel kernel,
    const std::optional<at::Tensor>& grad_out,
    const std::optional<at::Tensor>& grad_lse,
    const at::Tensor& scores,
    const at::Tensor& values,
    const at::Tensor& out,
    const at::Tensor& lse,
    const std::optional<at::Tensor>& state_lse,
    const std::optional<at::Tensor>& state_out,
    const BackwardOutputs& outputs = {});

// Registers the operators (and their _into forms) for one dispatch key with that backend's kernels.
template <ForwardKernel forward, BackwardKernel backward>
void register_backend(torch::Library& m) {
  m.impl("scan_forward", [](const at::Tensor& scores, const at::Tensor& values,
                            const std::optional<at::Tensor>& state_lse,
                            const std::optional<at::Tensor>& state_out) {
    return scan_forward_with(forward, scores, values, state_lse, state_out);
  });
  m.impl("step", [](const at::Tensor& score, const at::Tensor& value,
                    const std::optional<at::Tensor>& state_lse,
                    const std::optional<at::Tensor>& state_out) {
    return step_with(forward, score, value, state_lse, state_out);
  });
  m.impl("scan_backward",
         [](const std::optional<at::Tensor>& grad_out, const std::optional<at::Tensor>& grad_lse,
            const at::Tensor& scores, const at::Tensor& values, const at::Tensor& out,
            const at::Tensor& lse, const std::optional<at::Tensor>& state_lse,
            const std::optional<at::Tensor>& state_out) {
           return scan_backward_with(backward, grad_out, grad_lse, scores, values, out, lse,
                                     state_lse, state_out);
         });
  m.impl("scan_forward_into",
         [](const at::Tensor& scores, const at::Tensor& values,
            const std::optional<at::Tensor>& state_lse, const std::optional<at::Tensor>& state_out,
            const at::Tensor& out, const at::Tensor& lse, const at::Tensor& final_out) {
           scan_forward_with(forward, scores, values, state_lse, state_out, out, lse, final_out);
         });
  m.impl("scan_backward_into",
         [](const std::optional<at::Tensor>& grad_out, const std::optional<at::Tensor>& grad_lse,
            const at::Tensor& scores, const at::Tensor& values, const at::Tensor& out,
            const at::Tensor& lse, const std::optional<at::Tensor>& state_lse,
            const std::optional<at::Tensor>& state_out, const at::Tensor& grad_scores,
            const at::Tensor& grad_values, const at::Tensor& grad_state_lse,
            const at::Tensor& grad_state_out) {
           scan_backward_with(backward, grad_out, grad_lse, scores, values, out, lse, state_lse,
                              state_out, {grad_scores, grad_values, grad_state_lse, grad_state_out});
         });
}

}  // namespace aaren::ops
