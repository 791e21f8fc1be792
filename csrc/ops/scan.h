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
// (lse [B,H], out [B,H,D]). The kernel writes out [B,N,H,D] and the per-token
// lse [B,N,H], both contiguous.
struct ForwardArgs {
  at::Tensor scores;
  at::Tensor values;
  std::optional<at::Tensor> state_lse;
  std::optional<at::Tensor> state_out;
  at::Tensor out;
  at::Tensor lse;
};

// Tensors of one backward pass. grad_out / grad_lse are absent when no gradient
// reached that output (read as zeros); when present, grad_out has a contiguous last
// dimension. The kernel writes grad_scores [B,N,H], grad_values [B,N,H,D] and the
// gradients of the initial state (zero for the empty state), all contiguous.
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

// The dtype of lse: float64 for float64 inputs, float32 for every other dtype.
at::ScalarType state_dtype(at::ScalarType values_dtype);

// Validate, allocate (or check the caller's output buffers), and run `kernel` (none
// for Meta: shapes only).
std::tuple<at::Tensor, at::Tensor> scan_forward_with(
    ForwardKernel kernel,
    const at::Tensor& scores,
    const at::Tensor& values,
    const std::optional<at::Tensor>& state_lse,
    const std::optional<at::Tensor>& state_out,
    const std::optional<at::Tensor>& out = std::nullopt,
    const std::optional<at::Tensor>& lse = std::nullopt);

std::tuple<at::Tensor, at::Tensor> step_with(
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
            const at::Tensor& out, const at::Tensor& lse) {
           scan_forward_with(forward, scores, values, state_lse, state_out, out, lse);
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
