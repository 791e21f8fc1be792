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

// Packed sequences of different lengths (flash-attn's varlen layout): scores [T, H], values
// [T, H, D], sequence i the tokens [cu_seqlens[i], cu_seqlens[i + 1]) (cu_seqlens [N + 1], int32
// or int64, on the values' device), each scanned on its own from its own state (lse [N, H],
// out [N, H, D]). Returns the outputs [T, H, D] and each sequence's final state. max_seqlen,
// when given, is at least the longest sequence (CUDA then reads cu_seqlens on the device only).
std::pair<at::Tensor, State> scan_varlen(const at::Tensor& scores, const at::Tensor& values,
                                         const at::Tensor& cu_seqlens,
                                         std::optional<int64_t> max_seqlen = std::nullopt,
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
// Packed sequences: (out [T, H, D], lse per token [T, H], final_lse [N, H], final_out [N, H, D]).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> scan_varlen_forward(
    const at::Tensor& scores, const at::Tensor& values, const at::Tensor& cu_seqlens,
    std::optional<c10::SymInt> max_seqlen, const std::optional<at::Tensor>& state_lse,
    const std::optional<at::Tensor>& state_out);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> scan_varlen_backward(
    const std::optional<at::Tensor>& grad_out, const std::optional<at::Tensor>& grad_lse,
    const at::Tensor& scores, const at::Tensor& values, const at::Tensor& cu_seqlens,
    std::optional<c10::SymInt> max_seqlen, const at::Tensor& out, const at::Tensor& lse,
    const std::optional<at::Tensor>& state_lse, const std::optional<at::Tensor>& state_out);
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
