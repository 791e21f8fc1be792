// Schemas of the aaren operators, the argument checks every backend shares, and
// the Meta (fake tensor) registration used by torch.compile and torch.export.
#include "ops/scan.h"

#include <ATen/MemoryOverlap.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

namespace aaren::ops {
namespace {

bool is_supported_dtype(at::ScalarType dtype) {
  return dtype == at::kDouble || dtype == at::kFloat || dtype == at::kHalf ||
      dtype == at::kBFloat16;
}

// A last dimension of size 0 or 1 is contiguous whatever its stride says.
bool last_dim_contiguous(const at::Tensor& t) {
  return t.sym_size(-1) <= 1 || t.sym_stride(-1) == 1;
}

void check_same_device(const char* op, const at::Tensor& t, const char* name,
                       const at::Tensor& values) {
  TORCH_CHECK(t.device() == values.device(), op, ": ", name,
              " must be on the same device as values (", values.device(), "), got ",
              t.device());
}

void check_dim_equal(const char* op, const char* what, const c10::SymInt& got,
                     const char* whose, const c10::SymInt& expected) {
  TORCH_CHECK(got == expected, op, ": ", what, " has ", got, " where ", whose,
              " has ", expected);
}

// scores [B,N,H], values [B,N,H,D], optional state (lse [B,H], out [B,H,D]).
void check_forward_inputs(const char* op, const at::Tensor& scores, const at::Tensor& values,
                          const std::optional<at::Tensor>& state_lse,
                          const std::optional<at::Tensor>& state_out) {
  TORCH_CHECK(scores.dim() == 3, op, ": scores must have shape [B, N, H], got shape ",
              scores.sym_sizes());
  TORCH_CHECK(values.dim() == 4, op, ": values must have shape [B, N, H, D], got shape ",
              values.sym_sizes());
  TORCH_CHECK_TYPE(is_supported_dtype(values.scalar_type()), op,
                   ": values must be float64, float32, bfloat16 or float16, got ",
                   values.scalar_type());
  TORCH_CHECK_TYPE(scores.scalar_type() == values.scalar_type(), op,
                   ": scores and values must have the same dtype, got ",
                   scores.scalar_type(), " and ", values.scalar_type());
  check_same_device(op, scores, "scores", values);
  check_dim_equal(op, "scores' batch dimension", scores.sym_size(0), "values",
                  values.sym_size(0));
  check_dim_equal(op, "scores' sequence dimension", scores.sym_size(1), "values",
                  values.sym_size(1));
  check_dim_equal(op, "scores' head dimension", scores.sym_size(2), "values",
                  values.sym_size(2));
  TORCH_CHECK(last_dim_contiguous(values), op,
              ": values must be contiguous in its last dimension (stride 1), got strides ",
              values.sym_strides());

  TORCH_CHECK(state_lse.has_value() == state_out.has_value(), op,
              ": the state needs both lse and out, or neither");
  if (!state_lse.has_value()) {
    return;
  }
  const at::Tensor& lse = *state_lse;
  const at::Tensor& out = *state_out;
  TORCH_CHECK(lse.dim() == 2, op, ": state lse must have shape [B, H], got shape ",
              lse.sym_sizes());
  TORCH_CHECK(out.dim() == 3, op, ": state out must have shape [B, H, D], got shape ",
              out.sym_sizes());
  const at::ScalarType expected_lse_dtype = state_dtype(values.scalar_type());
  TORCH_CHECK_TYPE(lse.scalar_type() == expected_lse_dtype, op, ": state lse must be ",
                   expected_lse_dtype, " for ", values.scalar_type(), " values, got ",
                   lse.scalar_type());
  TORCH_CHECK_TYPE(out.scalar_type() == values.scalar_type(), op,
                   ": state out must have the dtype of values (", values.scalar_type(),
                   "), got ", out.scalar_type());
  check_same_device(op, lse, "state lse", values);
  check_same_device(op, out, "state out", values);
  check_dim_equal(op, "state lse's batch dimension", lse.sym_size(0), "values",
                  values.sym_size(0));
  check_dim_equal(op, "state lse's head dimension", lse.sym_size(1), "values",
                  values.sym_size(2));
  check_dim_equal(op, "state out's batch dimension", out.sym_size(0), "values",
                  values.sym_size(0));
  check_dim_equal(op, "state out's head dimension", out.sym_size(1), "values",
                  values.sym_size(2));
  check_dim_equal(op, "state out's last dimension", out.sym_size(2), "values",
                  values.sym_size(3));
  TORCH_CHECK(last_dim_contiguous(out), op,
              ": state out must be contiguous in its last dimension (stride 1), got strides ",
              out.sym_strides());
}

void check_same_shape(const char* op, const at::Tensor& t, const char* name,
                      const at::Tensor& like, const char* like_name) {
  TORCH_CHECK(t.sym_sizes() == like.sym_sizes(), op, ": ", name, " must have the shape of ",
              like_name, " ", like.sym_sizes(), ", got ", t.sym_sizes());
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

// Outputs given by the caller must not share memory with any input: the kernels read
// inputs after writing earlier rows. (Real tensors only: Meta ones have no memory.)
void check_no_overlap(std::initializer_list<std::optional<at::Tensor>> outputs,
                      std::initializer_list<std::optional<at::Tensor>> inputs) {
  for (const auto& output : outputs) {
    for (const auto& input : inputs) {
      if (output.has_value() && input.has_value() && input->defined()) {
        at::assert_no_overlap(*output, *input);
      }
    }
  }
}

std::tuple<at::Tensor, at::Tensor> run_forward(
    const char* op, ForwardKernel kernel, const at::Tensor& scores, const at::Tensor& values,
    const std::optional<at::Tensor>& state_lse, const std::optional<at::Tensor>& state_out,
    const std::optional<at::Tensor>& out, const std::optional<at::Tensor>& lse) {
  check_forward_inputs(op, scores, values, state_lse, state_out);
  ForwardArgs args{scores, values, state_lse, state_out,
                   checked_output(op, out, "out", values.sym_sizes(), values.options()),
                   checked_output(op, lse, "lse", scores.sym_sizes(),
                                  values.options().dtype(state_dtype(values.scalar_type())))};
  if (kernel != nullptr) {
    check_no_overlap({out, lse}, {scores, values, state_lse, state_out});
    kernel(args);
  }
  return {args.out, args.lse};
}

}  // namespace

at::ScalarType state_dtype(at::ScalarType values_dtype) {
  return values_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

std::tuple<at::Tensor, at::Tensor> scan_forward_with(
    ForwardKernel kernel, const at::Tensor& scores, const at::Tensor& values,
    const std::optional<at::Tensor>& state_lse, const std::optional<at::Tensor>& state_out,
    const std::optional<at::Tensor>& out, const std::optional<at::Tensor>& lse) {
  return run_forward("aaren.scan", kernel, scores, values, state_lse, state_out, out, lse);
}

std::tuple<at::Tensor, at::Tensor> step_with(
    ForwardKernel kernel, const at::Tensor& score, const at::Tensor& value,
    const std::optional<at::Tensor>& state_lse, const std::optional<at::Tensor>& state_out) {
  constexpr const char* op = "aaren.step";
  TORCH_CHECK(score.dim() == 2, op, ": score must have shape [B, H], got shape ",
              score.sym_sizes());
  TORCH_CHECK(value.dim() == 3, op, ": value must have shape [B, H, D], got shape ",
              value.sym_sizes());
  // One token is a sequence of length 1: the scan checks and kernel serve as they are.
  auto [out, lse] = run_forward(op, kernel, score.unsqueeze(1), value.unsqueeze(1), state_lse,
                                state_out, std::nullopt, std::nullopt);
  return {out.squeeze(1), lse.squeeze(1)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> scan_backward_with(
    BackwardKernel kernel, const std::optional<at::Tensor>& grad_out,
    const std::optional<at::Tensor>& grad_lse, const at::Tensor& scores,
    const at::Tensor& values, const at::Tensor& out, const at::Tensor& lse,
    const std::optional<at::Tensor>& state_lse, const std::optional<at::Tensor>& state_out,
    const BackwardOutputs& outputs) {
  constexpr const char* op = "aaren.scan_backward";
  check_forward_inputs(op, scores, values, state_lse, state_out);
  check_same_shape(op, out, "out", values, "values");
  check_same_shape(op, lse, "lse", scores, "scores");
  TORCH_CHECK(out.scalar_type() == values.scalar_type() &&
                  lse.scalar_type() == state_dtype(values.scalar_type()),
              op, ": out and lse must be the outputs of scan_forward for these inputs");
  TORCH_CHECK(out.is_contiguous() && lse.is_contiguous(), op,
              ": out and lse must be contiguous, as scan_forward returns them");
  check_same_device(op, out, "out", values);
  check_same_device(op, lse, "lse", values);

  BackwardArgs args;
  if (grad_out.has_value() && grad_out->defined()) {
    check_same_shape(op, *grad_out, "grad_out", values, "values");
    check_same_device(op, *grad_out, "grad_out", values);
    // Autograd hands over whatever layout it has (an expanded scalar, say).
    args.grad_out = last_dim_contiguous(*grad_out)
        ? grad_out->to(values.scalar_type())
        : grad_out->to(values.scalar_type()).contiguous();
  }
  if (grad_lse.has_value() && grad_lse->defined()) {
    check_same_shape(op, *grad_lse, "grad_lse", scores, "scores");
    check_same_device(op, *grad_lse, "grad_lse", values);
    args.grad_lse = grad_lse->to(lse.scalar_type());
  }
  args.scores = scores;
  args.values = values;
  args.out = out;
  args.lse = lse;
  args.state_lse = state_lse;
  args.state_out = state_out;
  const auto batch = values.sym_size(0);
  const auto heads = values.sym_size(2);
  const auto head_dim = values.sym_size(3);
  args.grad_scores = checked_output(op, outputs.grad_scores, "grad_scores", scores.sym_sizes(),
                                    scores.options());
  args.grad_values = checked_output(op, outputs.grad_values, "grad_values", values.sym_sizes(),
                                    values.options());
  args.grad_state_lse = checked_output(op, outputs.grad_state_lse, "grad_state_lse",
                                       {batch, heads}, lse.options());
  args.grad_state_out = checked_output(op, outputs.grad_state_out, "grad_state_out",
                                       {batch, heads, head_dim}, values.options());
  if (kernel != nullptr) {
    check_no_overlap({outputs.grad_scores, outputs.grad_values, outputs.grad_state_lse,
                      outputs.grad_state_out},
                     {args.grad_out, args.grad_lse, scores, values, out, lse, state_lse, state_out});
    kernel(args);
  }
  return {args.grad_scores, args.grad_values, args.grad_state_lse, args.grad_state_out};
}

}  // namespace aaren::ops

TORCH_LIBRARY(aaren, m) {
  // Per-token outputs and per-token lse (the backward needs it; the final state is
  // its last entry). An absent state is the empty state (lse -inf, out 0).
  m.def(
      "scan_forward(Tensor scores, Tensor values, Tensor? state_lse=None, "
      "Tensor? state_out=None) -> (Tensor out, Tensor lse)");
  // Into caller-owned buffers (contiguous, of the shapes above), for loops and benchmarks
  // that reuse memory. Not differentiable; they return nothing, so that torch.compile
  // can functionalize them.
  m.def(
      "scan_forward_into(Tensor scores, Tensor values, Tensor? state_lse, Tensor? state_out, "
      "Tensor(a!) out, Tensor(b!) lse) -> ()");
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
  // One token: score [B,H], value [B,H,D]; returns the new state (out [B,H,D], lse [B,H]).
  m.def(
      "step(Tensor score, Tensor value, Tensor? state_lse=None, Tensor? state_out=None) "
      "-> (Tensor out, Tensor lse)");
}

// Meta: checks and output shapes only, with symbolic sizes under torch.compile.
TORCH_LIBRARY_IMPL(aaren, Meta, m) {
  aaren::ops::register_backend<nullptr, nullptr>(m);
}
