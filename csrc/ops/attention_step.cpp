// aaren::attention_step: the whole attention step of an Aaren layer for one token, as one
// operator (the stacked score/value projection, the scan's step, the output projection).
//
// Why an operator for three calls: at a token of a small model the step is per-call overhead,
// not arithmetic (docs/results.md, "The one-token step against its arithmetic"). From Python,
// each of the step's small operations (a product, two slices, a view, aaren::step, another
// product, the output projection's module call) costs several microseconds of interpreter
// and argument parsing; here they are C++ calls through the dispatcher. It is registered as
// CompositeImplicitAutograd: autograd, autocast, torch.compile and torch.export see the
// operations it is made of (aten::linear and aaren::step, each with its own autograd, Meta
// and autocast kernels), so it needs no kernel of its own on any backend.
#include <ATen/ops/linear.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "aaren/aaren.h"

namespace aaren::ops {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_step_composite(
    const at::Tensor& x, const at::Tensor& proj_weight, const std::optional<at::Tensor>& proj_bias,
    const at::Tensor& out_weight, const std::optional<at::Tensor>& out_bias, int64_t num_heads,
    const std::optional<at::Tensor>& state_lse, const std::optional<at::Tensor>& state_out) {
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
  const at::Tensor projected = at::linear(x, proj_weight, proj_bias);  // [B, H + E]
  const at::Tensor score = projected.narrow_symint(1, 0, num_heads);
  // A view with a contiguous last dimension: aaren::step reads it through its strides.
  const at::Tensor value = projected.narrow_symint(1, num_heads, width)
                               .view_symint({x.sym_size(0), num_heads, width / num_heads});
  auto [out, lse, new_state_out] = step(score, value, state_lse, state_out);
  return {at::linear(out.flatten(1), out_weight, out_bias), lse, new_state_out};
}

}  // namespace
}  // namespace aaren::ops

TORCH_LIBRARY_FRAGMENT(aaren, m) {
  // x [B, E]; proj_weight [H + E, E] and proj_bias [H + E]: the folded score projection
  // (H rows) stacked on the value projection (E rows), as Aaren._step_projection builds it;
  // out_weight [E_out, E], out_bias [E_out]; the state as for step. Returns y [B, E_out]
  // (x's dtype) and the new state (lse [B, H], out [B, H, E / H], float64). Equal to
  // linear -> step -> linear (docs/modules.md, "Streaming").
  m.def(
      "attention_step(Tensor x, Tensor proj_weight, Tensor? proj_bias, Tensor out_weight, "
      "Tensor? out_bias, int num_heads, Tensor? state_lse=None, Tensor? state_out=None) "
      "-> (Tensor y, Tensor lse, Tensor state_out)");
}

TORCH_LIBRARY_IMPL(aaren, CompositeImplicitAutograd, m) {
  m.impl("attention_step", &aaren::ops::attention_step_composite);
}
