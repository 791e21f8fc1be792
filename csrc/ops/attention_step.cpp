// aaren::attention_step: the whole attention step of an Aaren layer for one token, as one
// operator (the stacked score/value projection, the scan's step, the output projection).
//
// Why an operator for three calls: at a token of a small model the step is per-call overhead,
// not arithmetic (docs/results.md, "The one-token step against its arithmetic"). From Python,
// each of the step's small operations (a product, two slices, a view, aaren::step, another
// product, the output projection's module call) costs microseconds of interpreter, argument
// parsing and dispatch; the CPU kernel (cpu/attention_step_cpu.cpp) does the products itself
// and calls the step kernel directly.
//
// Registrations: CompositeExplicitAutograd runs the three calls (CUDA and Meta use it, so
// fake tensors, torch.compile and torch.export work); the Autograd kernel runs them too
// whenever a gradient is wanted (each records its own backward), and otherwise goes below
// autograd to the backend's kernel; under autocast the three calls are run so that each is
// autocast as it would be alone.
#include "ops/attention_step.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/grad_mode.h>
#include <ATen/ops/linear.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include "aaren/aaren.h"
#include "ops/scan.h"

namespace aaren::ops {

void check_attention_step_inputs(const at::Tensor& x, const at::Tensor& proj_weight,
                                 const std::optional<at::Tensor>& proj_bias,
                                 const at::Tensor& out_weight,
                                 const std::optional<at::Tensor>& out_bias, int64_t num_heads,
                                 const std::optional<at::Tensor>& state_lse,
                                 const std::optional<at::Tensor>& state_out) {
  constexpr const char* op = "aaren.attention_step";
  TORCH_CHECK(x.dim() == 2, op, ": x must have shape [B, E], got shape ", x.sym_sizes());
  TORCH_CHECK(num_heads > 0, op, ": num_heads must be positive, got ", num_heads);
  const c10::SymInt& width = x.sym_size(1);
  TORCH_CHECK(width % num_heads == 0, op, ": the embedding width E = ", width,
              " of x must be a multiple of num_heads = ", num_heads);
  TORCH_CHECK(proj_weight.dim() == 2 && proj_weight.sym_size(0) == width + num_heads &&
                  proj_weight.sym_size(1) == width,
              op, ": proj_weight must have shape [H + E, E] = [", width + num_heads, ", ", width,
              "] (the score projection's H rows, then the value projection's E), got shape ",
              proj_weight.sym_sizes());
  TORCH_CHECK(out_weight.dim() == 2 && out_weight.sym_size(1) == width, op,
              ": out_weight must have shape [E_out, E] with E = ", width, ", got shape ",
              out_weight.sym_sizes());
  // x's dtype first: with the weights in it too, the scan's check would name its values.
  const at::ScalarType dtype = x.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kDouble || dtype == at::kFloat || dtype == at::kHalf ||
                       dtype == at::kBFloat16,
                   op, ": x must be float64, float32, bfloat16 or float16, got ", dtype);
  const auto check_dtype = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must have the dtype of x (", dtype,
                "), got ", t.scalar_type());
  };
  // Every tensor on x's device: the CPU kernel reads the weights' memory as host memory.
  const auto check_device = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.device() == x.device(), op, ": ", name, " must be on the device of x (",
                x.device(), "), got ", t.device());
  };
  check_dtype(proj_weight, "proj_weight");
  check_dtype(out_weight, "out_weight");
  check_device(proj_weight, "proj_weight");
  check_device(out_weight, "out_weight");
  const auto check_bias = [&](const std::optional<at::Tensor>& bias, const char* name,
                              const c10::SymInt& rows) {
    if (bias.has_value() && bias->defined()) {
      TORCH_CHECK(bias->dim() == 1 && bias->sym_size(0) == rows, op, ": ", name,
                  " must have shape [", rows, "], got shape ", bias->sym_sizes());
      check_dtype(*bias, name);
      check_device(*bias, name);
    }
  };
  check_bias(proj_bias, "proj_bias", width + num_heads);
  check_bias(out_bias, "out_bias", out_weight.sym_size(0));
  check_state(op, state_lse, state_out, x, {x.sym_size(0), "x"}, {num_heads, "num_heads"},
              {width / num_heads, "E / num_heads"});
}

std::pair<at::Tensor, at::Tensor> split_projection(const at::Tensor& projected, int64_t num_heads) {
  const c10::SymInt width = projected.sym_size(1) - num_heads;
  // The values a view with a contiguous last dimension: aaren::step reads them through their
  // strides. Symbolic sizes, for the composite under fake tensors.
  return {projected.narrow_symint(1, 0, num_heads),
          projected.narrow_symint(1, num_heads, width)
              .view_symint({projected.sym_size(0), num_heads, width / num_heads})};
}

AttentionStepResult attention_step_three_calls(
    const at::Tensor& x, const at::Tensor& proj_weight, const std::optional<at::Tensor>& proj_bias,
    const at::Tensor& out_weight, const std::optional<at::Tensor>& out_bias, int64_t num_heads,
    const std::optional<at::Tensor>& state_lse, const std::optional<at::Tensor>& state_out) {
  const auto [score, value] = split_projection(at::linear(x, proj_weight, proj_bias), num_heads);
  auto [out, lse, new_state_out] = step(score, value, state_lse, state_out);
  return {at::linear(out.flatten(1), out_weight, out_bias), lse, new_state_out};
}

AttentionStepResult attention_step_composite(
    const at::Tensor& x, const at::Tensor& proj_weight, const std::optional<at::Tensor>& proj_bias,
    const at::Tensor& out_weight, const std::optional<at::Tensor>& out_bias, int64_t num_heads,
    const std::optional<at::Tensor>& state_lse, const std::optional<at::Tensor>& state_out) {
  check_attention_step_inputs(x, proj_weight, proj_bias, out_weight, out_bias, num_heads,
                              state_lse, state_out);
  return attention_step_three_calls(x, proj_weight, proj_bias, out_weight, out_bias, num_heads,
                                    state_lse, state_out);
}

namespace {

// A gradient is wanted of an input: backward (requires_grad under grad mode) or forward mode
// (a tangent at the default level of torch.autograd.forward_ad).
bool wants_gradient(const at::Tensor& t) {
  return (at::GradMode::is_enabled() && t.requires_grad()) || t._fw_grad(/*level=*/0).defined();
}

bool wants_gradient(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() && wants_gradient(*t);
}

AttentionStepResult attention_step_autograd(
    const at::Tensor& x, const at::Tensor& proj_weight, const std::optional<at::Tensor>& proj_bias,
    const at::Tensor& out_weight, const std::optional<at::Tensor>& out_bias, int64_t num_heads,
    const std::optional<at::Tensor>& state_lse, const std::optional<at::Tensor>& state_out) {
  if (wants_gradient(x) || wants_gradient(proj_weight) || wants_gradient(proj_bias) ||
      wants_gradient(out_weight) || wants_gradient(out_bias) || wants_gradient(state_lse) ||
      wants_gradient(state_out)) {
    return attention_step_composite(x, proj_weight, proj_bias, out_weight, out_bias, num_heads,
                                    state_lse, state_out);
  }
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return attention_step(x, proj_weight, proj_bias, out_weight, out_bias, num_heads, state_lse,
                        state_out);
}

}  // namespace
}  // namespace aaren::ops

TORCH_LIBRARY_FRAGMENT(aaren, m) {
  // x [B, E]; proj_weight [H + E, E] and proj_bias [H + E]: the folded score projection
  // (H rows) stacked on the value projection (E rows), as Aaren._step_projection builds it;
  // out_weight [E_out, E], out_bias [E_out]; the state as for step. Returns y [B, E_out]
  // (x's dtype) and the new state (lse [B, H], out [B, H, E / H], float64): what
  // linear -> step -> linear give (docs/modules.md, "Streaming").
  m.def(
      "attention_step(Tensor x, Tensor proj_weight, Tensor? proj_bias, Tensor out_weight, "
      "Tensor? out_bias, int num_heads, Tensor? state_lse=None, Tensor? state_out=None) "
      "-> (Tensor y, Tensor lse, Tensor state_out)");
}

TORCH_LIBRARY_IMPL(aaren, CompositeExplicitAutograd, m) {
  m.impl("attention_step", &aaren::ops::attention_step_composite);
}

TORCH_LIBRARY_IMPL(aaren, Autograd, m) {
  m.impl("attention_step", &aaren::ops::attention_step_autograd);
}

// Autocast: the three calls, each autocast (and differentiated) as it would be alone.
TORCH_LIBRARY_IMPL(aaren, AutocastCPU, m) {
  m.impl("attention_step", &aaren::ops::attention_step_composite);
}

TORCH_LIBRARY_IMPL(aaren, AutocastCUDA, m) {
  m.impl("attention_step", &aaren::ops::attention_step_composite);
}
