// Autograd for scan_varlen_forward (the packed variable-length scan), registered for the
// Autograd key as scan_forward's is (scan_autograd.cpp), with the same two paths: the
// scan_varlen_backward kernel for first-order gradients, and differentiable operations when
// the backward itself is recorded (create_graph=True), so that gradients of gradients are exact.
#include <ATen/ATen.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <tuple>

#include "aaren/aaren.h"
#include "ops/autograd/shared_gradients.h"

namespace aaren::ops {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Per sequence: its first and last token and whether it has any (all [N], int64 / bool), read
// from cu_seqlens on its device (no synchronization).
struct SequenceEnds {
  at::Tensor first;     // cu_seqlens[i], clamped to a valid token (T > 0)
  at::Tensor last;      // cu_seqlens[i + 1] - 1, likewise
  at::Tensor nonempty;  // cu_seqlens[i + 1] > cu_seqlens[i]
};

SequenceEnds sequence_ends(const at::Tensor& cu_seqlens, int64_t tokens) {
  const int64_t sequences = cu_seqlens.size(0) - 1;
  const at::Tensor bounds = cu_seqlens.to(at::kLong);
  const at::Tensor starts = bounds.narrow(0, 0, sequences);
  const at::Tensor ends = bounds.narrow(0, 1, sequences);
  const int64_t last_token = std::max<int64_t>(tokens - 1, 0);
  return {starts.clamp(0, last_token), (ends - 1).clamp(0, last_token), ends > starts};
}

// The packed scan's gradients from differentiable operations, in float64: the dense scan's
// (scan_autograd.cpp, reverse_scan_gradients) with the reverse scan itself a packed one. The
// packed tensors flipped along the tokens hold every sequence reversed, the sequences in reverse
// order, with the boundaries T - cu_seqlens flipped; a sequence's state gradients come from its
// first token (none for a sequence of no tokens).
variable_list reverse_varlen_gradients(const at::Tensor& scores, const at::Tensor& values,
                                       const at::Tensor& cu_seqlens,
                                       std::optional<c10::SymInt> max_seqlen,
                                       const at::Tensor& out, const at::Tensor& lse,
                                       const at::Tensor& state_lse, const at::Tensor& state_out,
                                       const at::Tensor& grad_out, const at::Tensor& grad_lse) {
  constexpr double kInf = std::numeric_limits<double>::infinity();
  const int64_t tokens = values.size(0);
  const ReverseScanInputs reverse = reverse_scan_inputs(values, out, lse, grad_out, grad_lse);
  const at::Tensor reverse_bounds = (cu_seqlens.flip({0}) * -1 + tokens).to(cu_seqlens.scalar_type());
  const auto [reversed, reversed_lse, unused_lse, unused_out] =
      ops::scan_varlen_forward(reverse.scores.flip({0}), reverse.features.flip({0}),
                               reverse_bounds, max_seqlen, std::nullopt, std::nullopt);
  (void)unused_lse;
  (void)unused_out;
  const at::Tensor suffix_lse = reversed_lse.flip({0});
  const TokenGradients token_grads =
      token_gradients(scores, values, reversed.flip({0}), suffix_lse);
  variable_list grads{token_grads.grad_scores, token_grads.grad_values, at::Tensor(),
                      at::Tensor()};
  if (state_lse.defined()) {
    if (tokens == 0) {
      grads[2] = at::zeros_like(state_lse);
      grads[3] = at::zeros_like(state_out);
    } else {
      const SequenceEnds ends = sequence_ends(cu_seqlens, tokens);
      // f = e^(L_0 + Lr_1) at each sequence's first token; 0 for a sequence of none (its
      // "first token" is another sequence's: masked before the exponential, so that no
      // infinity reaches the gradient).
      const at::Tensor exponent =
          at::where(ends.nonempty.unsqueeze(-1),
                    state_lse.to(at::kDouble) + suffix_lse.index_select(0, ends.first),
                    at::full({}, -kInf, suffix_lse.options()));
      const at::Tensor f = at::exp(exponent);
      std::tie(grads[2], grads[3]) = state_gradients(
          state_lse, state_out, values.scalar_type(), f,
          token_grads.R.index_select(0, ends.first), token_grads.rho.index_select(0, ends.first));
    }
  }
  return grads;
}

// Gradients of scan_varlen_forward's inputs from what forward saved (scores, values,
// cu_seqlens, out, lse, state or undefined) and the gradients of its four outputs (any may be
// undefined). Each sequence's final state is its last token's (lse, out unrounded), so their
// gradients join the per-token ones there (final_out's rounded to the values' dtype, as for
// scan); a sequence of no tokens passes them to its initial state.
variable_list varlen_gradients(const variable_list& saved,
                               std::optional<c10::SymInt> max_seqlen, at::Tensor grad_out,
                               at::Tensor grad_lse, const at::Tensor& grad_final_lse,
                               const at::Tensor& grad_final_out) {
  const at::Tensor& scores = saved[0];
  const at::Tensor& values = saved[1];
  const at::Tensor& cu_seqlens = saved[2];
  const at::Tensor& out = saved[3];
  const at::Tensor& lse = saved[4];
  const at::Tensor& state_lse = saved[5];
  const at::Tensor& state_out = saved[6];
  const int64_t tokens = values.size(0);
  const bool final_grads = grad_final_lse.defined() || grad_final_out.defined();
  std::optional<SequenceEnds> ends;
  if (final_grads) {
    ends = sequence_ends(cu_seqlens, tokens);
  }
  if (final_grads && tokens > 0) {
    if (grad_final_out.defined()) {
      const at::Tensor at_last =
          at::where(ends->nonempty.view({-1, 1, 1}), grad_final_out, at::zeros({}, grad_final_out.options()))
              .to(values.scalar_type());
      grad_out = (grad_out.defined() ? grad_out : at::zeros_like(values)).index_add(0, ends->last, at_last);
    }
    if (grad_final_lse.defined()) {
      const at::Tensor at_last =
          at::where(ends->nonempty.view({-1, 1}), grad_final_lse, at::zeros({}, grad_final_lse.options()))
              .to(lse.scalar_type());
      grad_lse = (grad_lse.defined() ? grad_lse : at::zeros_like(lse)).index_add(0, ends->last, at_last);
    }
  }

  variable_list grads;
  if (torch::autograd::GradMode::is_enabled()) {
    grads = reverse_varlen_gradients(scores, values, cu_seqlens, max_seqlen, out, lse, state_lse,
                                     state_out, grad_out, grad_lse);
  } else {
    grads = kernel_gradients(
        scan_varlen_backward(defined_or_none(grad_out), defined_or_none(grad_lse), scores, values,
                             cu_seqlens, max_seqlen, out, lse, defined_or_none(state_lse),
                             defined_or_none(state_out)),
        state_lse.defined());
  }
  if (final_grads && state_lse.defined()) {  // sequences of no tokens: the state itself
    const at::Tensor empty = ends->nonempty.logical_not();
    if (grad_final_lse.defined()) {
      grads[2] = grads[2] + at::where(empty.view({-1, 1}), grad_final_lse,
                                      at::zeros({}, grad_final_lse.options()))
                                .to(state_lse.scalar_type());
    }
    if (grad_final_out.defined()) {
      grads[3] = grads[3] + at::where(empty.view({-1, 1, 1}), grad_final_out,
                                      at::zeros({}, grad_final_out.options()))
                                .to(state_out.scalar_type());
    }
  }
  return grads;
}

class ScanVarlenFunction : public torch::autograd::Function<ScanVarlenFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& scores,
                               const at::Tensor& values, const at::Tensor& cu_seqlens,
                               std::optional<c10::SymInt> max_seqlen,
                               const std::optional<at::Tensor>& state_lse,
                               const std::optional<at::Tensor>& state_out) {
    ctx->set_materialize_grads(false);
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, lse, final_lse, final_out] =
        scan_varlen_forward(scores, values, cu_seqlens, max_seqlen, state_lse, state_out);
    ctx->save_for_backward({scores, values, cu_seqlens, out, lse,
                            state_lse.value_or(at::Tensor()), state_out.value_or(at::Tensor())});
    if (max_seqlen.has_value()) {
      ctx->saved_data["max_seqlen"] = *max_seqlen;
    }
    return {out, lse, final_lse, final_out};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    std::optional<c10::SymInt> max_seqlen;
    if (ctx->saved_data.count("max_seqlen") != 0) {
      max_seqlen = ctx->saved_data["max_seqlen"].toSymInt();
    }
    variable_list result = varlen_gradients(ctx->get_saved_variables(), max_seqlen, grads[0],
                                            grads[1], grads[2], grads[3]);
    // scores, values, cu_seqlens, max_seqlen, state_lse, state_out
    return {result[0], result[1], at::Tensor(), at::Tensor(), result[2], result[3]};
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> scan_varlen_forward_autograd(
    const at::Tensor& scores, const at::Tensor& values, const at::Tensor& cu_seqlens,
    std::optional<c10::SymInt> max_seqlen, const std::optional<at::Tensor>& state_lse,
    const std::optional<at::Tensor>& state_out) {
  auto outputs =
      ScanVarlenFunction::apply(scores, values, cu_seqlens, max_seqlen, state_lse, state_out);
  return {outputs[0], outputs[1], outputs[2], outputs[3]};
}

}  // namespace
}  // namespace aaren::ops

TORCH_LIBRARY_IMPL(aaren, Autograd, m) {
  m.impl("scan_varlen_forward", aaren::ops::scan_varlen_forward_autograd);
  m.impl("scan_varlen_backward", torch::autograd::autogradNotImplementedFallback());
}
