// What the autograd of the dense scan (scan_autograd.cpp) and of the packed one
// (scan_varlen_autograd.cpp) share: the parts of the gradients from differentiable operations
// (the reverse scan's inputs, the tokens' and the state's gradients from its outputs; the
// derivation is at reverse_scan_gradients in scan_autograd.cpp), and the first-order
// gradients from a backward kernel's outputs. What differs, the reverse scan itself (dense or
// packed) and where each sequence's first token is, stays with each operator.
#pragma once

#include <ATen/core/Tensor.h>
#include <torch/csrc/autograd/variable.h>

#include <optional>
#include <tuple>
#include <utility>

namespace aaren::ops {

std::optional<at::Tensor> defined_or_none(const at::Tensor& t);

// The reverse scan's inputs, in float64 and in forward order (the caller flips them along the
// tokens): the scores -L_j (-inf where L_j is: a token that takes no part) and the features
// x_j = [g_j, g_j . o_j - G_j] (g, G: grad_out, grad_lse; undefined reads as zeros).
struct ReverseScanInputs {
  at::Tensor scores;
  at::Tensor features;
};
ReverseScanInputs reverse_scan_inputs(const at::Tensor& values, const at::Tensor& out,
                                      const at::Tensor& lse, const at::Tensor& grad_out,
                                      const at::Tensor& grad_lse);

// From the reverse scan's outputs X and lse Lr, flipped back to forward order: the gradients
// of scores and values (in their dtypes), and X's parts R = X[..., :D] and rho = X[..., D]
// (float64), of which the state's gradients take the first token's.
struct TokenGradients {
  at::Tensor grad_scores;
  at::Tensor grad_values;
  at::Tensor R;
  at::Tensor rho;
};
TokenGradients token_gradients(const at::Tensor& scores, const at::Tensor& values,
                               const at::Tensor& X, const at::Tensor& suffix_lse);

// The state's gradients, in the state's dtypes, from f = e^(L_0 + Lr_1) and R_1, rho_1 at the
// first token: dL_0 = f (o_0 . R_1 - rho_1), do_0 = f R_1, with o_0 rounded to the values'
// dtype as the outputs in rho are. (The differentiable form, for gradients of gradients; the
// first-order kernels take dL_0 from the inputs instead: aaren/combine.h, "The state's lse
// gradient".)
std::pair<at::Tensor, at::Tensor> state_gradients(const at::Tensor& state_lse,
                                                  const at::Tensor& state_out,
                                                  at::ScalarType values_dtype, const at::Tensor& f,
                                                  const at::Tensor& R1, const at::Tensor& rho1);

// First-order gradients from a backward kernel's four outputs (scores, values, state lse, state
// out): the state's undefined when no state was given.
torch::autograd::variable_list kernel_gradients(
    const std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>& outputs, bool has_state);

}  // namespace aaren::ops
