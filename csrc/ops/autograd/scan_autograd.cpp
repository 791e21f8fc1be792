// Autograd for scan_forward and step, registered for the Autograd key so gradients
// work from C++ and in loaded TorchScript models, not only from Python.
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include "aaren/aaren.h"

namespace aaren::ops {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

std::optional<at::Tensor> defined_or_none(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

// Runs scan_backward on what forward saved: scores, values, out, lse, state (or undefined).
variable_list backward_from_saved(const variable_list& saved, const at::Tensor& grad_out,
                                  const at::Tensor& grad_lse) {
  const auto state_lse = defined_or_none(saved[4]);
  auto [grad_scores, grad_values, grad_state_lse, grad_state_out] =
      scan_backward(defined_or_none(grad_out), defined_or_none(grad_lse), saved[0], saved[1],
                    saved[2], saved[3], state_lse, defined_or_none(saved[5]));
  if (!state_lse.has_value()) {
    return {grad_scores, grad_values, at::Tensor(), at::Tensor()};
  }
  return {grad_scores, grad_values, grad_state_lse, grad_state_out};
}

class ScanFunction : public torch::autograd::Function<ScanFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& scores,
                               const at::Tensor& values,
                               const std::optional<at::Tensor>& state_lse,
                               const std::optional<at::Tensor>& state_out) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, lse] = scan_forward(scores, values, state_lse, state_out);
    ctx->save_for_backward({scores, values, out, lse, state_lse.value_or(at::Tensor()),
                            state_out.value_or(at::Tensor())});
    return {out, lse};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return backward_from_saved(ctx->get_saved_variables(), grads[0], grads[1]);
  }
};

// One token is a scan of length 1: the scan backward serves, on [B, 1, ...] views.
class StepFunction : public torch::autograd::Function<StepFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& score,
                               const at::Tensor& value,
                               const std::optional<at::Tensor>& state_lse,
                               const std::optional<at::Tensor>& state_out) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, lse] = step(score, value, state_lse, state_out);
    ctx->save_for_backward({score.unsqueeze(1), value.unsqueeze(1), out.unsqueeze(1),
                            lse.unsqueeze(1), state_lse.value_or(at::Tensor()),
                            state_out.value_or(at::Tensor())});
    return {out, lse};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto unsqueezed = [](const at::Tensor& t) { return t.defined() ? t.unsqueeze(1) : t; };
    auto result = backward_from_saved(ctx->get_saved_variables(), unsqueezed(grads[0]),
                                      unsqueezed(grads[1]));
    result[0] = result[0].squeeze(1);
    result[1] = result[1].squeeze(1);
    return result;
  }
};

std::tuple<at::Tensor, at::Tensor> scan_forward_autograd(
    const at::Tensor& scores, const at::Tensor& values,
    const std::optional<at::Tensor>& state_lse, const std::optional<at::Tensor>& state_out) {
  auto outputs = ScanFunction::apply(scores, values, state_lse, state_out);
  return {outputs[0], outputs[1]};
}

std::tuple<at::Tensor, at::Tensor> step_autograd(const at::Tensor& score, const at::Tensor& value,
                                                 const std::optional<at::Tensor>& state_lse,
                                                 const std::optional<at::Tensor>& state_out) {
  auto outputs = StepFunction::apply(score, value, state_lse, state_out);
  return {outputs[0], outputs[1]};
}

}  // namespace
}  // namespace aaren::ops

TORCH_LIBRARY_IMPL(aaren, Autograd, m) {
  m.impl("scan_forward", aaren::ops::scan_forward_autograd);
  m.impl("step", aaren::ops::step_autograd);
}
