// The C++ API of aaren. Every function goes through the PyTorch dispatcher, so it
// runs the CPU or CUDA kernel that fits its inputs and records autograd as Python does.
//
// Layouts (the same contract as the Python API):
//   scores [B, N, H], values [B, N, H, D] (last dimension contiguous, other strides free),
//   state: lse [B, H] and out [B, H, D], float64 for every dtype of values, so that
//   carrying it loses nothing against one scan (docs/design.md). States in other floating
//   dtypes (the float32 lse of earlier versions, say) are accepted and converted.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string>
#include <tuple>
#include <utility>

namespace aaren {

// The recurrent state after some tokens: log-sum-exp of their scores and the
// attention output over them. Its size does not depend on how many tokens were seen.
struct State {
  at::Tensor lse;
  at::Tensor out;
};

// The empty state (lse = -inf, out = 0) for values of this dtype and device, in the
// state's dtypes.
State empty_state(int64_t batch, int64_t heads, int64_t head_dim, const at::TensorOptions& values_options);

// Outputs for every prefix [B, N, H, D] and the state after the last token.
std::pair<at::Tensor, State> scan(const at::Tensor& scores, const at::Tensor& values,
                                  const std::optional<State>& state = std::nullopt);

// One token: score [B, H], value [B, H, D]. Returns its output [B, H, D] (values' dtype) and
// the new state, which shares no storage with the output.
std::pair<at::Tensor, State> step(const at::Tensor& score, const at::Tensor& value,
                                  const std::optional<State>& state = std::nullopt);

// The registered operators themselves (torch.ops.aaren.*).
namespace ops {
// (out, lse per token, final_out: the state's out after the last token).
std::tuple<at::Tensor, at::Tensor, at::Tensor> scan_forward(
    const at::Tensor& scores, const at::Tensor& values,
    const std::optional<at::Tensor>& state_lse, const std::optional<at::Tensor>& state_out);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> scan_backward(
    const std::optional<at::Tensor>& grad_out, const std::optional<at::Tensor>& grad_lse,
    const at::Tensor& scores, const at::Tensor& values, const at::Tensor& out,
    const at::Tensor& lse, const std::optional<at::Tensor>& state_lse,
    const std::optional<at::Tensor>& state_out);
// (out, the new state's lse, the new state's out).
std::tuple<at::Tensor, at::Tensor, at::Tensor> step(const at::Tensor& score,
                                                    const at::Tensor& value,
                                                    const std::optional<at::Tensor>& state_lse,
                                                    const std::optional<at::Tensor>& state_out);
// A whole Aaren attention step for one token x [B, E]: linear(x, proj_weight, proj_bias)
// gives the H scores and E values (proj_weight [H + E, E]: the folded score projection
// stacked on the value projection), step() updates the state, and linear(out, out_weight,
// out_bias) gives y [B, E_out]. Returns (y, the new state's lse, the new state's out).
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_step(
    const at::Tensor& x, const at::Tensor& proj_weight, const std::optional<at::Tensor>& proj_bias,
    const at::Tensor& out_weight, const std::optional<at::Tensor>& out_bias, int64_t num_heads,
    const std::optional<at::Tensor>& state_lse, const std::optional<at::Tensor>& state_out);
}  // namespace ops

// How this library was built, as a JSON object (what `python -m aaren` prints).
std::string build_info_json();

}  // namespace aaren
