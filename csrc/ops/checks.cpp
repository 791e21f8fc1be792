// The argument checks the aaren operators share (ops/checks.h, and check_state of ops/scan.h).
#include "ops/checks.h"

#include <ATen/ops/empty.h>

#include "ops/scan.h"

namespace aaren::ops {

bool is_supported_dtype(at::ScalarType dtype) {
  return dtype == at::kDouble || dtype == at::kFloat || dtype == at::kHalf ||
      dtype == at::kBFloat16;
}

bool last_dim_contiguous(const at::Tensor& t) {
  return t.sym_size(-1) <= 1 || t.sym_stride(-1) == 1;
}

void check_same_device(const char* op, const at::Tensor& t, const char* name,
                       const at::Tensor& values, const char* values_name) {
  TORCH_CHECK(t.device() == values.device(), op, ": ", name, " must be on the same device as ",
              values_name, " (", values.device(), "), got ", t.device());
}

void check_dim_equal(const char* op, const char* what, const c10::SymInt& got,
                     const char* whose, const c10::SymInt& expected) {
  TORCH_CHECK(got == expected, op, ": ", what, " has ", got, " where ", whose,
              " has ", expected);
}

void check_same_shape(const char* op, const at::Tensor& t, const char* name,
                      const at::Tensor& like, const char* like_name) {
  TORCH_CHECK(t.sym_sizes() == like.sym_sizes(), op, ": ", name, " must have the shape of ",
              like_name, " ", like.sym_sizes(), ", got ", t.sym_sizes());
}

void check_scores_and_values(const char* op, const at::Tensor& scores, const at::Tensor& values,
                             std::initializer_list<MatchedDim> matched) {
  TORCH_CHECK_TYPE(is_supported_dtype(values.scalar_type()), op,
                   ": values must be float64, float32, bfloat16 or float16, got ",
                   values.scalar_type());
  TORCH_CHECK_TYPE(scores.scalar_type() == values.scalar_type(), op,
                   ": scores and values must have the same dtype, got ",
                   scores.scalar_type(), " and ", values.scalar_type());
  check_same_device(op, scores, "scores", values);
  for (const MatchedDim& dim : matched) {
    check_dim_equal(op, dim.what, scores.sym_size(dim.index), "values",
                    values.sym_size(dim.index));
  }
  TORCH_CHECK(last_dim_contiguous(values), op,
              ": values must be contiguous in its last dimension (stride 1), got strides ",
              values.sym_strides());
}

void check_forward_outputs(const char* op, const char* forward, const at::Tensor& out,
                           const at::Tensor& lse, const at::Tensor& scores,
                           const at::Tensor& values) {
  check_same_shape(op, out, "out", values, "values");
  check_same_shape(op, lse, "lse", scores, "scores");
  TORCH_CHECK(out.scalar_type() == values.scalar_type() && lse.scalar_type() == kLseDtype,
              op, ": out and lse must be the outputs of ", forward, " for these inputs");
  TORCH_CHECK(out.is_contiguous() && lse.is_contiguous(), op,
              ": out and lse must be contiguous, as ", forward, " returns them");
  check_same_device(op, out, "out", values);
  check_same_device(op, lse, "lse", values);
}

IncomingGradients incoming_gradients(const char* op, const std::optional<at::Tensor>& grad_out,
                                     const std::optional<at::Tensor>& grad_lse,
                                     const at::Tensor& scores, const at::Tensor& values) {
  IncomingGradients grads;
  if (grad_out.has_value() && grad_out->defined()) {
    check_same_shape(op, *grad_out, "grad_out", values, "values");
    check_same_device(op, *grad_out, "grad_out", values);
    // Autograd hands over whatever layout it has (an expanded scalar, say).
    grads.grad_out = last_dim_contiguous(*grad_out)
        ? grad_out->to(values.scalar_type())
        : grad_out->to(values.scalar_type()).contiguous();
  }
  if (grad_lse.has_value() && grad_lse->defined()) {
    check_same_shape(op, *grad_lse, "grad_lse", scores, "scores");
    check_same_device(op, *grad_lse, "grad_lse", values);
    grads.grad_lse = grad_lse->to(kLseDtype);
  }
  return grads;
}

KernelState kernel_state(const std::optional<at::Tensor>& state_lse,
                         const std::optional<at::Tensor>& state_out, bool contiguous) {
  if (!state_lse.has_value()) {
    return {};
  }
  if (contiguous) {
    return {state_lse->to(kLseDtype).contiguous(), state_out->to(kStateOutDtype).contiguous()};
  }
  at::Tensor out = state_out->to(kStateOutDtype);
  if (!last_dim_contiguous(out)) {
    out = out.contiguous();
  }
  return {state_lse->to(kLseDtype), out};
}

at::ScalarType grad_state_lse_dtype(const std::optional<at::Tensor>& state_lse) {
  return state_lse.has_value() ? state_lse->scalar_type() : kLseDtype;
}

at::ScalarType grad_state_out_dtype(const std::optional<at::Tensor>& state_out) {
  return state_out.has_value() ? state_out->scalar_type() : kStateOutDtype;
}

at::Tensor in_kernel_dtype(const at::Tensor& grad, at::ScalarType kernel_dtype) {
  return grad.scalar_type() == kernel_dtype
      ? grad
      : at::empty_symint(grad.sym_sizes(), grad.options().dtype(kernel_dtype));
}

void copy_into(const at::Tensor& grad, const at::Tensor& written) {
  if (!written.is_same(grad)) {
    grad.copy_(written);
  }
}

void check_state(const char* op, const std::optional<at::Tensor>& state_lse,
                 const std::optional<at::Tensor>& state_out, const at::Tensor& on_device_of,
                 const ExpectedSize& batch, const ExpectedSize& heads,
                 const ExpectedSize& head_dim) {
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
  // Any floating dtype is converted (to kLseDtype, kStateOutDtype): states saved by earlier
  // versions (a float32 lse, an out in the values' dtype) keep working.
  TORCH_CHECK_TYPE(is_supported_dtype(lse.scalar_type()), op,
                   ": state lse must be a floating dtype (float64 preferred), got ",
                   lse.scalar_type());
  TORCH_CHECK_TYPE(is_supported_dtype(out.scalar_type()), op,
                   ": state out must be a floating dtype (float64 preferred), got ",
                   out.scalar_type());
  check_same_device(op, lse, "state lse", on_device_of, batch.whose);
  check_same_device(op, out, "state out", on_device_of, batch.whose);
  check_dim_equal(op, "state lse's batch dimension", lse.sym_size(0), batch.whose, batch.size);
  check_dim_equal(op, "state lse's head dimension", lse.sym_size(1), heads.whose, heads.size);
  check_dim_equal(op, "state out's batch dimension", out.sym_size(0), batch.whose, batch.size);
  check_dim_equal(op, "state out's head dimension", out.sym_size(1), heads.whose, heads.size);
  check_dim_equal(op, "state out's last dimension", out.sym_size(2), head_dim.whose,
                  head_dim.size);
}

}  // namespace aaren::ops
