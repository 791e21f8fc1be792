// Autograd for scan_forward and step, registered for the Autograd key so gradients
// work from C++ and in loaded TorchScript models, not only from Python.
//
// First-order gradients run the scan_backward kernel. When the backward itself is being
// recorded (create_graph=True: gradient penalties, Hessian-vector products,
// meta-learning), the same gradients are computed instead from differentiable operations
// (reverse_scan_gradients below), so that gradients of gradients are exact rather than
// silently zero. scan_backward called directly has no derivative and says so.
//
// Sizes are read as SymInts (sym_size, *_symint): torch.compile traces this backward with
// symbolic sizes (AOT autograd), and size()/sizes() on such a tensor fixes every dimension
// to the traced value, so that each new batch size or length would compile again.
#include <ATen/ATen.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <tuple>

#include "aaren/aaren.h"
#include "ops/autograd/shared_gradients.h"

namespace aaren::ops {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The gradients of a scan from differentiable operations, in float64 (docs/design.md,
// "Backward"). Unrolled, the reverse recurrences are suffix sums,
//     R_i = sum_{j>=i} e^(L_i - L_j) g_j,  rho_i = sum_{j>=i} e^(L_i - L_j) (g_j . o_j - G_j),
// and sum_{j>=i} e^(-L_j) x_j is itself a scan: of the reversed sequence, with scores -L_j
// and values x_j, whose outputs X_i and lse Lr_i give sum = e^(Lr_i) X_i. So with the
// features x_j = [g_j, g_j . o_j - G_j] scanned by aaren's own (differentiable) scan:
//     dv_i = e^(s_i - L_i) R_i = e^(s_i + Lr_i) X_i[:D]
//     ds_i = e^(s_i + Lr_i) (v_i . X_i[:D] - X_i[D])
//     state: f = e^(L_0 + Lr_1), dL_0 = f (o_0 . X_1[:D] - X_1[D]), do_0 = f X_1[:D].
// Every exponent is at most log N (s_i <= L_i, L_0 <= L_1, Lr_i <= log N - L_i). Tokens of
// an all-masked prefix (L = -inf, s = -inf) take no part (score -inf) and get exactly 0.
variable_list reverse_scan_gradients(const at::Tensor& scores, const at::Tensor& values,
                                     const at::Tensor& out, const at::Tensor& lse,
                                     const at::Tensor& state_lse, const at::Tensor& state_out,
                                     const at::Tensor& grad_out, const at::Tensor& grad_lse) {
  const ReverseScanInputs reverse = reverse_scan_inputs(values, out, lse, grad_out, grad_lse);
  const auto [reversed, reversed_lse, unused_final] = ops::scan_forward(
      reverse.scores.flip({1}), reverse.features.flip({1}), std::nullopt, std::nullopt);
  (void)unused_final;
  const at::Tensor suffix_lse = reversed_lse.flip({1});
  const TokenGradients tokens = token_gradients(scores, values, reversed.flip({1}), suffix_lse);
  variable_list grads{tokens.grad_scores, tokens.grad_values, at::Tensor(), at::Tensor()};
  if (state_lse.defined()) {
    if (values.sym_size(1) == 0) {
      grads[2] = at::zeros_like(state_lse);
      grads[3] = at::zeros_like(state_out);
    } else {
      const at::Tensor f = at::exp(state_lse.to(at::kDouble) + suffix_lse.select(1, 0));
      std::tie(grads[2], grads[3]) =
          state_gradients(state_lse, state_out, values.scalar_type(), f, tokens.R.select(1, 0),
                          tokens.rho.select(1, 0));
    }
  }
  return grads;
}

// Gradients of scan_forward's inputs from what forward saved (scores, values, out, lse,
// state or undefined) and the gradients of its three outputs (any may be undefined).
// final_out is the out after the last token before rounding to the values' dtype, so
// its gradient joins g at the last token (rounded to that dtype); with no tokens it is
// the state's out, and its gradient that of the state's out.
variable_list scan_gradients(const variable_list& saved, at::Tensor grad_out,
                             const at::Tensor& grad_lse, const at::Tensor& grad_final) {
  const at::Tensor& scores = saved[0];
  const at::Tensor& values = saved[1];
  const at::Tensor& state_lse = saved[4];
  const at::Tensor& state_out = saved[5];
  const c10::SymInt length = values.sym_size(1);
  if (grad_final.defined() && length > 0) {
    const at::Tensor last = grad_final.to(values.scalar_type()).unsqueeze(1);
    // [B, 1, H, D] -> [B, N, H, D], zero but at the last token.
    const at::Tensor padded =
        at::constant_pad_nd_symint(last, {0, 0, 0, 0, length - 1, 0});
    grad_out = grad_out.defined() ? grad_out + padded : padded;
  }

  variable_list grads;
  if (torch::autograd::GradMode::is_enabled()) {
    grads = reverse_scan_gradients(scores, values, saved[2], saved[3], state_lse, state_out,
                                   grad_out, grad_lse);
  } else {
    grads = kernel_gradients(
        scan_backward(defined_or_none(grad_out), defined_or_none(grad_lse), scores, values,
                      saved[2], saved[3], defined_or_none(state_lse), defined_or_none(state_out)),
        state_lse.defined());
  }
  if (grad_final.defined() && length == 0 && state_out.defined()) {
    grads[3] = grads[3] + grad_final.to(state_out.scalar_type());
  }
  return grads;
}

class ScanFunction : public torch::autograd::Function<ScanFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& scores,
                               const at::Tensor& values,
                               const std::optional<at::Tensor>& state_lse,
                               const std::optional<at::Tensor>& state_out) {
    // Undefined gradients stay undefined (read as zeros by the kernels), rather than
    // being materialized as dense zero tensors of a possibly different tensor subclass.
    ctx->set_materialize_grads(false);
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, lse, final_out] = scan_forward(scores, values, state_lse, state_out);
    ctx->save_for_backward({scores, values, out, lse, state_lse.value_or(at::Tensor()),
                            state_out.value_or(at::Tensor())});
    return {out, lse, final_out};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return scan_gradients(ctx->get_saved_variables(), grads[0], grads[1], grads[2]);
  }
};

// One token is a scan of length 1: the scan's gradients serve, on [B, 1, ...] views.
class StepFunction : public torch::autograd::Function<StepFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& score,
                               const at::Tensor& value,
                               const std::optional<at::Tensor>& state_lse,
                               const std::optional<at::Tensor>& state_out) {
    ctx->set_materialize_grads(false);
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, lse, new_state_out] = step(score, value, state_lse, state_out);
    // The tensors themselves, not views made here: an input or output saved as itself
    // keeps its place in the graph, which the double backward differentiates through.
    ctx->save_for_backward({score, value, out, lse, state_lse.value_or(at::Tensor()),
                            state_out.value_or(at::Tensor())});
    return {out, lse, new_state_out};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto unsqueezed = [](const at::Tensor& t) { return t.defined() ? t.unsqueeze(1) : t; };
    variable_list saved = ctx->get_saved_variables();
    for (size_t i = 0; i < 4; ++i) {
      saved[i] = saved[i].unsqueeze(1);
    }
    auto result = scan_gradients(saved, unsqueezed(grads[0]), unsqueezed(grads[1]), grads[2]);
    result[0] = result[0].squeeze(1);
    result[1] = result[1].squeeze(1);
    return result;
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> scan_forward_autograd(
    const at::Tensor& scores, const at::Tensor& values,
    const std::optional<at::Tensor>& state_lse, const std::optional<at::Tensor>& state_out) {
  auto outputs = ScanFunction::apply(scores, values, state_lse, state_out);
  return {outputs[0], outputs[1], outputs[2]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> step_autograd(
    const at::Tensor& score, const at::Tensor& value, const std::optional<at::Tensor>& state_lse,
    const std::optional<at::Tensor>& state_out) {
  auto outputs = StepFunction::apply(score, value, state_lse, state_out);
  return {outputs[0], outputs[1], outputs[2]};
}

}  // namespace
}  // namespace aaren::ops

TORCH_LIBRARY_IMPL(aaren, Autograd, m) {
  m.impl("scan_forward", aaren::ops::scan_forward_autograd);
  m.impl("step", aaren::ops::step_autograd);
  // Differentiating scan_backward's outputs raises (rather than PyTorch's default for custom
  // operators, a warning and zero gradients); aaren.scan's own double backward does not
  // go through it (see above).
  m.impl("scan_backward", torch::autograd::autogradNotImplementedFallback());
}
