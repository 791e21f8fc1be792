// aaren::attention_step (attention_step.cpp): what its backends share.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>
#include <utility>

namespace aaren::ops {

// (y [B, E_out], the new state's lse [B, H], the new state's out [B, H, D]).
using AttentionStepResult = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

// Shapes and dtypes of x [B, E], proj_weight [H + E, E], proj_bias [H + E], out_weight
// [E_out, E], out_bias [E_out] (the weights and biases in x's dtype), num_heads and the state
// (lse [B, H], out [B, H, E / H]); an error naming the argument otherwise.
void check_attention_step_inputs(const at::Tensor& x, const at::Tensor& proj_weight,
                                 const std::optional<at::Tensor>& proj_bias,
                                 const at::Tensor& out_weight,
                                 const std::optional<at::Tensor>& out_bias, int64_t num_heads,
                                 const std::optional<at::Tensor>& state_lse,
                                 const std::optional<at::Tensor>& state_out);

// The stacked projection's output [B, H + E] as the step's inputs: the scores [B, H] and the
// values [B, H, E / H], both views of it.
std::pair<at::Tensor, at::Tensor> split_projection(const at::Tensor& projected, int64_t num_heads);

// The step as the three calls it stands for: linear, aaren::step, linear, on inputs already
// checked (check_attention_step_inputs).
AttentionStepResult attention_step_three_calls(
    const at::Tensor& x, const at::Tensor& proj_weight, const std::optional<at::Tensor>& proj_bias,
    const at::Tensor& out_weight, const std::optional<at::Tensor>& out_bias, int64_t num_heads,
    const std::optional<at::Tensor>& state_lse, const std::optional<at::Tensor>& state_out);

// The checks, then the three calls. Every backend without a kernel of its own (CUDA, Meta)
// runs this, and so do autograd and autocast.
AttentionStepResult attention_step_composite(
    const at::Tensor& x, const at::Tensor& proj_weight, const std::optional<at::Tensor>& proj_bias,
    const at::Tensor& out_weight, const std::optional<at::Tensor>& out_bias, int64_t num_heads,
    const std::optional<at::Tensor>& state_lse, const std::optional<at::Tensor>& state_out);

}  // namespace aaren::ops
