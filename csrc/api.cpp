// The C++ API: typed calls into the dispatcher, and scan/step built on them.
#include "aaren/aaren.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>

namespace aaren {
namespace ops {

using Tensor = at::Tensor;
using OptionalTensor = std::optional<at::Tensor>;

std::tuple<Tensor, Tensor, Tensor> scan_forward(const Tensor& scores, const Tensor& values,
                                                const OptionalTensor& state_lse,
                                                const OptionalTensor& state_out) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("aaren::scan_forward", "")
                             .typed<std::tuple<Tensor, Tensor, Tensor>(
                                 const Tensor&, const Tensor&, const OptionalTensor&,
                                 const OptionalTensor&)>();
  return op.call(scores, values, state_lse, state_out);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> scan_backward(
    const OptionalTensor& grad_out, const OptionalTensor& grad_lse, const Tensor& scores,
    const Tensor& values, const Tensor& out, const Tensor& lse, const OptionalTensor& state_lse,
    const OptionalTensor& state_out) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("aaren::scan_backward", "")
          .typed<std::tuple<Tensor, Tensor, Tensor, Tensor>(
              const OptionalTensor&, const OptionalTensor&, const Tensor&, const Tensor&,
              const Tensor&, const Tensor&, const OptionalTensor&, const OptionalTensor&)>();
  return op.call(grad_out, grad_lse, scores, values, out, lse, state_lse, state_out);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> scan_varlen_forward(
    const Tensor& scores, const Tensor& values, const Tensor& cu_seqlens,
    std::optional<c10::SymInt> max_seqlen, const OptionalTensor& state_lse,
    const OptionalTensor& state_out) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("aaren::scan_varlen_forward", "")
                             .typed<std::tuple<Tensor, Tensor, Tensor, Tensor>(
                                 const Tensor&, const Tensor&, const Tensor&,
                                 std::optional<c10::SymInt>, const OptionalTensor&,
                                 const OptionalTensor&)>();
  return op.call(scores, values, cu_seqlens, max_seqlen, state_lse, state_out);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> scan_varlen_backward(
    const OptionalTensor& grad_out, const OptionalTensor& grad_lse, const Tensor& scores,
    const Tensor& values, const Tensor& cu_seqlens, std::optional<c10::SymInt> max_seqlen,
    const Tensor& out, const Tensor& lse, const OptionalTensor& state_lse,
    const OptionalTensor& state_out) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("aaren::scan_varlen_backward", "")
          .typed<std::tuple<Tensor, Tensor, Tensor, Tensor>(
              const OptionalTensor&, const OptionalTensor&, const Tensor&, const Tensor&,
              const Tensor&, std::optional<c10::SymInt>, const Tensor&, const Tensor&,
              const OptionalTensor&, const OptionalTensor&)>();
  return op.call(grad_out, grad_lse, scores, values, cu_seqlens, max_seqlen, out, lse, state_lse,
                 state_out);
}

std::tuple<Tensor, Tensor, Tensor> step(const Tensor& score, const Tensor& value,
                                        const OptionalTensor& state_lse,
                                        const OptionalTensor& state_out) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("aaren::step", "")
                             .typed<std::tuple<Tensor, Tensor, Tensor>(
                                 const Tensor&, const Tensor&, const OptionalTensor&,
                                 const OptionalTensor&)>();
  return op.call(score, value, state_lse, state_out);
}

std::tuple<Tensor, Tensor, Tensor> attention_step(const Tensor& x, const Tensor& proj_weight,
                                                  const OptionalTensor& proj_bias,
                                                  const Tensor& out_weight,
                                                  const OptionalTensor& out_bias, int64_t num_heads,
                                                  const OptionalTensor& state_lse,
                                                  const OptionalTensor& state_out) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("aaren::attention_step", "")
                             .typed<std::tuple<Tensor, Tensor, Tensor>(
                                 const Tensor&, const Tensor&, const OptionalTensor&,
                                 const Tensor&, const OptionalTensor&, int64_t,
                                 const OptionalTensor&, const OptionalTensor&)>();
  return op.call(x, proj_weight, proj_bias, out_weight, out_bias, num_heads, state_lse, state_out);
}

}  // namespace ops

namespace {
std::pair<std::optional<at::Tensor>, std::optional<at::Tensor>> unpack(const std::optional<State>& state) {
  if (!state.has_value()) {
    return {std::nullopt, std::nullopt};
  }
  return {state->lse, state->out};
}
}  // namespace

State empty_state(int64_t batch, int64_t heads, int64_t head_dim,
                  const at::TensorOptions& values_options) {
  // The state is float64 for every dtype of values (ops/scan.h).
  return {at::full({batch, heads}, -std::numeric_limits<double>::infinity(),
                   values_options.dtype(at::kDouble)),
          at::zeros({batch, heads, head_dim}, values_options.dtype(at::kDouble))};
}

std::pair<at::Tensor, State> scan(const at::Tensor& scores, const at::Tensor& values,
                                  const std::optional<State>& state) {
  const auto [state_lse, state_out] = unpack(state);
  auto [out, lse, final_out] = ops::scan_forward(scores, values, state_lse, state_out);
  if (values.size(1) == 0) {  // an empty sequence leaves the state as it was (in its dtypes)
    return {out, state.has_value()
                     ? State{state->lse.to(at::kDouble), final_out}
                     : empty_state(values.size(0), values.size(2), values.size(3), values.options())};
  }
  // A copy, not a view: a state kept for later must not hold on to the whole sequence.
  return {out, State{lse.select(1, -1).clone(), final_out}};
}

std::pair<at::Tensor, State> scan_varlen(const at::Tensor& scores, const at::Tensor& values,
                                         const at::Tensor& cu_seqlens,
                                         std::optional<int64_t> max_seqlen,
                                         const std::optional<State>& state) {
  const auto [state_lse, state_out] = unpack(state);
  const std::optional<c10::SymInt> bound =
      max_seqlen.has_value() ? std::optional<c10::SymInt>(*max_seqlen) : std::nullopt;
  auto [out, lse, final_lse, final_out] =
      ops::scan_varlen_forward(scores, values, cu_seqlens, bound, state_lse, state_out);
  return {out, State{final_lse, final_out}};
}

std::pair<at::Tensor, State> step(const at::Tensor& score, const at::Tensor& value,
                                  const std::optional<State>& state) {
  const auto [state_lse, state_out] = unpack(state);
  auto [out, lse, new_state_out] = ops::step(score, value, state_lse, state_out);
  return {out, State{lse, new_state_out}};
}

}  // namespace aaren
