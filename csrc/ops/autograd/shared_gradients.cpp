// The parts of the scans' gradients that the dense and the packed autograd share
// (autograd/shared_gradients.h).
#include "ops/autograd/shared_gradients.h"

#include <ATen/ATen.h>

#include <limits>

namespace aaren::ops {

std::optional<at::Tensor> defined_or_none(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

ReverseScanInputs reverse_scan_inputs(const at::Tensor& values, const at::Tensor& out,
                                      const at::Tensor& lse, const at::Tensor& grad_out,
                                      const at::Tensor& grad_lse) {
  constexpr double kInf = std::numeric_limits<double>::infinity();
  const at::Tensor L = lse.to(at::kDouble);
  const at::Tensor g =
      grad_out.defined() ? grad_out.to(at::kDouble) : at::zeros_like(values, at::kDouble);
  const at::Tensor G = grad_lse.defined() ? grad_lse.to(at::kDouble) : at::zeros_like(L);
  const at::Tensor rho_input = (g * out.to(at::kDouble)).sum(-1) - G;
  return {at::where(L == -kInf, at::full({}, -kInf, L.options()), -L),
          at::cat({g, rho_input.unsqueeze(-1)}, -1)};
}

TokenGradients token_gradients(const at::Tensor& scores, const at::Tensor& values,
                               const at::Tensor& X, const at::Tensor& suffix_lse) {
  const c10::SymInt dim = values.sym_size(-1);
  const at::Tensor s = scores.to(at::kDouble);
  const at::Tensor v = values.to(at::kDouble);
  const at::Tensor R = X.narrow_symint(-1, 0, dim);
  const at::Tensor rho = X.select_symint(-1, dim);
  const at::Tensor weight = at::exp(s + suffix_lse);
  const at::Tensor grad_values = weight.unsqueeze(-1) * R;
  const at::Tensor grad_scores = weight * ((v * R).sum(-1) - rho);
  return {grad_scores.to(scores.scalar_type()), grad_values.to(values.scalar_type()), R, rho};
}

std::pair<at::Tensor, at::Tensor> state_gradients(const at::Tensor& state_lse,
                                                  const at::Tensor& state_out,
                                                  at::ScalarType values_dtype, const at::Tensor& f,
                                                  const at::Tensor& R1, const at::Tensor& rho1) {
  const at::Tensor o0 = state_out.to(values_dtype).to(at::kDouble);
  return {(f * ((o0 * R1).sum(-1) - rho1)).to(state_lse.scalar_type()),
          (f.unsqueeze(-1) * R1).to(state_out.scalar_type())};
}

torch::autograd::variable_list kernel_gradients(
    const std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>& outputs, bool has_state) {
  const auto& [grad_scores, grad_values, grad_state_lse, grad_state_out] = outputs;
  torch::autograd::variable_list grads{grad_scores, grad_values, at::Tensor(), at::Tensor()};
  if (has_state) {
    grads[2] = grad_state_lse;
    grads[3] = grad_state_out;
  }
  return grads;
}

}  // namespace aaren::ops
