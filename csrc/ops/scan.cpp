// Schemas of the aaren operators, the argument checks every backend shares, and
// the Meta (fake tensor) registration used by torch.compile and torch.export.
#include "ops/scan.h"

#include <ATen/MemoryOverlap.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <iterator>

#include "ops/checks.h"

namespace aaren::ops {
namespace {

// scores [B,N,H], values [B,N,H,D], optional state (lse [B,H], out [B,H,D]).
void check_forward_inputs(const char* op, const at::Tensor& scores, const at::Tensor& values,
                          const std::optional<at::Tensor>& state_lse,
                          const std::optional<at::Tensor>& state_out) {
  TORCH_CHECK(scores.dim() == 3, op, ": scores must have shape [B, N, H], got shape ",
              scores.sym_sizes());
  TORCH_CHECK(values.dim() == 4, op, ": values must have shape [B, N, H, D], got shape ",
              values.sym_sizes());
  check_scores_and_values(op, scores, values,
                          {{"scores' batch dimension", 0}, {"scores' sequence dimension", 1},
                           {"scores' head dimension", 2}});
  check_state(op, state_lse, state_out, values, {values.sym_size(0), "values"},
              {values.sym_size(2), "values"}, {values.sym_size(3), "values"});
}

// An output given by the caller (the _into forms) must be exactly what the kernel would
// have allocated: kernels write contiguous rows.
at::Tensor checked_output(const char* op, const std::optional<at::Tensor>& given, const char* name,
                          c10::SymIntArrayRef sizes, const at::TensorOptions& options) {
  if (!given.has_value()) {
    return at::empty_symint(sizes, options);
  }
  const at::Tensor& t = *given;
  TORCH_CHECK(t.sym_sizes() == sizes, op, ": ", name, " must have shape ", sizes, ", got ",
              t.sym_sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == options.dtype().toScalarType(), op, ": ", name,
                   " must be ", c10::typeMetaToScalarType(options.dtype()), ", got ", t.scalar_type());
  TORCH_CHECK(t.device() == options.device(), op, ": ", name, " must be on ", options.device(),
              ", got ", t.device());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
  return t;
}

// A tensor the overlap check names in its errors (absent or undefined: skipped).
struct NamedTensor {
  std::optional<at::Tensor> tensor;
  const char* name;
};

bool shares_elements(const NamedTensor& a, const NamedTensor& b) {
  if (!a.tensor.has_value() || !a.tensor->defined() || !b.tensor.has_value() ||
      !b.tensor->defined()) {
    return false;
  }
  // As at::assert_no_overlap: layouts too hard to compare (strided inputs) pass.
  const at::MemOverlapStatus status = at::get_overlap_status(*a.tensor, *b.tensor);
  return status == at::MemOverlapStatus::Full || status == at::MemOverlapStatus::Partial;
}

// Outputs given by the caller must not share memory with each other (the kernels would
// write one over the other) nor with any input (they read inputs after writing earlier
// rows). Real tensors only: Meta ones have no memory.
void check_no_overlap(const char* op, std::initializer_list<NamedTensor> outputs,
                      std::initializer_list<NamedTensor> inputs) {
  for (auto output = outputs.begin(); output != outputs.end(); ++output) {
    for (auto other = std::next(output); other != outputs.end(); ++other) {
      TORCH_CHECK(!shares_elements(*output, *other), op, ": the outputs ", output->name, " and ",
                  other->name, " share memory; each needs a buffer of its own");
    }
    for (const NamedTensor& input : inputs) {
      TORCH_CHECK(!shares_elements(*output, input), op, ": the output ", output->name,
                  " shares memory with the input ", input.name,
                  "; outputs need buffers of their own");
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> run_forward(
    const char* op, ForwardKernel kernel, const at::Tensor& scores, const at::Tensor& values,
    const std::optional<at::Tensor>& state_lse, const std::optional<at::Tensor>& state_out,
    const std::optional<at::Tensor>& out, const std::optional<at::Tensor>& lse,
    const std::optional<at::Tensor>& final_out) {
  check_forward_inputs(op, scores, values, state_lse, state_out);
  const KernelState state = kernel_state(state_lse, state_out, /*contiguous=*/false);
  const at::TensorOptions state_out_options = values.options().dtype(kStateOutDtype);
  ForwardArgs args{scores, values, state.lse, state.out,
                   checked_output(op, out, "out", values.sym_sizes(), values.options()),
                   checked_output(op, lse, "lse", scores.sym_sizes(),
                                  values.options().dtype(kLseDtype)),
                   checked_output(op, final_out, "final_out",
                                  {values.sym_size(0), values.sym_size(2), values.sym_size(3)},
                                  state_out_options)};
  if (kernel != nullptr) {
    check_no_overlap(op, {{out, "out"}, {lse, "lse"}, {final_out, "final_out"}},
                     {{scores, "scores"}, {values, "values"}, {state_lse, "state_lse"},
                      {state_out, "state_out"}});
    if (values.size(1) > 0) {
      kernel(args);
    } else if (state.out.has_value()) {  // no tokens: the state stays as it was
      args.final_out.copy_(*state.out);
    } else {
      args.final_out.zero_();
    }
  }
  return {args.out, args.lse, args.final_out};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> scan_forward_with(
    ForwardKernel kernel, const at::Tensor& scores, const at::Tensor& values,
    const std::optional<at::Tensor>& state_lse, const std::optional<at::Tensor>& state_out,
    const std::optional<at::Tensor>& out, const std::optional<at::Tensor>& lse,
    const std::optional<at::Tensor>& final_out) {
  return run_forward("aaren.scan", kernel, scores, values, state_lse, state_out, out, lse,
                     final_out);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> step_with(
    ForwardKernel kernel, const at::Tensor& score, const at::Tensor& value,
    const std::optional<at::Tensor>& state_lse, const std::optional<at::Tensor>& state_out) {
  constexpr const char* op = "aaren.step";
  TORCH_CHECK(score.dim() == 2, op, ": score must have shape [B, H], got shape ",
              score.sym_sizes());
  TORCH_CHECK(value.dim() == 3, op, ": value must have shape [B, H, D], got shape ",
              value.sym_sizes());
  // In the step's own names, before the scan's checks would name scores and values.
  TORCH_CHECK_TYPE(score.scalar_type() == value.scalar_type(), op,
                   ": score and value must have the same dtype, got ", score.scalar_type(),
                   " and ", value.scalar_type());
  check_dim_equal(op, "score's batch dimension", score.sym_size(0), "value", value.sym_size(0));
  check_dim_equal(op, "score's head dimension", score.sym_size(1), "value", value.sym_size(1));
  // One token is a sequence of length 1: the scan checks and kernel serve as they are.
  // final_out is the new state's out: its own storage, never the returned output's, so
  // that editing the output in place cannot change the next step.
  auto [out, lse, final_out] = run_forward(op, kernel, score.unsqueeze(1), value.unsqueeze(1),
                                           state_lse, state_out, std::nullopt, std::nullopt,
                                           std::nullopt);
  return {out.squeeze(1), lse.squeeze(1), final_out};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> scan_backward_with(
    BackwardKernel kernel, const std::optional<at::Tensor>& grad_out,
    const std::optional<at::Tensor>& grad_lse, const at::Tensor& scores,
    const at::Tensor& values, const at::Tensor& out, const at::Tensor& lse,
    const std::optional<at::Tensor>& state_lse, const std::optional<at::Tensor>& state_out,
    const BackwardOutputs& outputs) {
  constexpr const char* op = "aaren.scan_backward";
  check_forward_inputs(op, scores, values, state_lse, state_out);
  check_forward_outputs(op, "scan_forward", out, lse, scores, values);

  BackwardArgs args;
  const IncomingGradients incoming = incoming_gradients(op, grad_out, grad_lse, scores, values);
  args.grad_out = incoming.grad_out;
  args.grad_lse = incoming.grad_lse;
  const KernelState state = kernel_state(state_lse, state_out, /*contiguous=*/false);
  args.scores = scores;
  args.values = values;
  args.out = out;
  args.lse = lse;
  args.state_lse = state.lse;
  args.state_out = state.out;
  const auto batch = values.sym_size(0);
  const auto heads = values.sym_size(2);
  const auto head_dim = values.sym_size(3);
  args.grad_scores = checked_output(op, outputs.grad_scores, "grad_scores", scores.sym_sizes(),
                                    scores.options());
  args.grad_values = checked_output(op, outputs.grad_values, "grad_values", values.sym_sizes(),
                                    values.options());
  const at::Tensor grad_state_lse =
      checked_output(op, outputs.grad_state_lse, "grad_state_lse", {batch, heads},
                     lse.options().dtype(grad_state_lse_dtype(state_lse)));
  const at::Tensor grad_state_out =
      checked_output(op, outputs.grad_state_out, "grad_state_out", {batch, heads, head_dim},
                     values.options().dtype(grad_state_out_dtype(state_out)));
  if (kernel == nullptr) {
    return {args.grad_scores, args.grad_values, grad_state_lse, grad_state_out};
  }
  check_no_overlap(op,
                   {{outputs.grad_scores, "grad_scores"}, {outputs.grad_values, "grad_values"},
                    {outputs.grad_state_lse, "grad_state_lse"},
                    {outputs.grad_state_out, "grad_state_out"}},
                   {{args.grad_out, "grad_out"}, {args.grad_lse, "grad_lse"}, {scores, "scores"},
                    {values, "values"}, {out, "out"}, {lse, "lse"}, {state_lse, "state_lse"},
                    {state_out, "state_out"}});
  return run_backward_kernel(kernel, args, grad_state_lse, grad_state_out);
}

}  // namespace aaren::ops

TORCH_LIBRARY(aaren, m) {
  // Per-token outputs and per-token lse (the backward needs it; the final state is
  // its last entry). An absent state is the empty state (lse -inf, out 0).
  // final_out is the state's out after the last token in the accumulation dtype (unrounded;
  // the initial state's for N = 0); lse is float64. See ops/scan.h for the state's dtypes.
  m.def(
      "scan_forward(Tensor scores, Tensor values, Tensor? state_lse=None, "
      "Tensor? state_out=None) -> (Tensor out, Tensor lse, Tensor final_out)");
  // Into caller-owned buffers (contiguous, of the shapes above), for loops and benchmarks
  // that reuse memory. Not differentiable; they return nothing, so that torch.compile
  // can functionalize them.
  m.def(
      "scan_forward_into(Tensor scores, Tensor values, Tensor? state_lse, Tensor? state_out, "
      "Tensor(a!) out, Tensor(b!) lse, Tensor(c!) final_out) -> ()");
  // Gradients of scan_forward's inputs; the state gradients are for the state given
  // (zero for the empty state when none was).
  m.def(
      "scan_backward(Tensor? grad_out, Tensor? grad_lse, Tensor scores, Tensor values, "
      "Tensor out, Tensor lse, Tensor? state_lse=None, Tensor? state_out=None) -> "
      "(Tensor grad_scores, Tensor grad_values, Tensor grad_state_lse, Tensor grad_state_out)");
  m.def(
      "scan_backward_into(Tensor? grad_out, Tensor? grad_lse, Tensor scores, Tensor values, "
      "Tensor out, Tensor lse, Tensor? state_lse, Tensor? state_out, "
      "Tensor(a!) grad_scores, Tensor(b!) grad_values, Tensor(c!) grad_state_lse, "
      "Tensor(d!) grad_state_out) -> ()");
  // One token: score [B,H], value [B,H,D]; returns its output out [B,H,D] (values' dtype)
  // and the new state (lse [B,H] float64, state_out [B,H,D] accumulation dtype; never the
  // same storage as out).
  m.def(
      "step(Tensor score, Tensor value, Tensor? state_lse=None, Tensor? state_out=None) "
      "-> (Tensor out, Tensor lse, Tensor state_out)");
}

// Meta: checks and output shapes only, with symbolic sizes under torch.compile.
TORCH_LIBRARY_IMPL(aaren, Meta, m) {
  aaren::ops::register_backend<nullptr, nullptr>(m);
}
