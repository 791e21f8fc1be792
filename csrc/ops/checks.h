// The argument checks and conversions that the dense scan (scan.cpp) and the packed one
// (scan_varlen.cpp) share: dtypes, devices and shapes of scores, values and the tensors their
// backwards take, the state in the kernels' dtypes, and the state's gradients in the dtypes of
// the state given. Written once here so that both operators report the same errors in the same
// words; what differs (the shapes, the sequence boundaries, the _into forms' buffers) stays with
// each operator. Internal to the operator library: no kernel includes it.
#pragma once

#include <ATen/core/Tensor.h>

#include <initializer_list>
#include <optional>
#include <tuple>

#include "ops/scan.h"

namespace aaren::ops {

// float64, float32, bfloat16 or float16: the dtypes of values the kernels take.
bool is_supported_dtype(at::ScalarType dtype);

// A last dimension of size 0 or 1 is contiguous whatever its stride says.
bool last_dim_contiguous(const at::Tensor& t);

void check_same_device(const char* op, const at::Tensor& t, const char* name,
                       const at::Tensor& values, const char* values_name = "values");

void check_dim_equal(const char* op, const char* what, const c10::SymInt& got,
                     const char* whose, const c10::SymInt& expected);

void check_same_shape(const char* op, const at::Tensor& t, const char* name,
                      const at::Tensor& like, const char* like_name);

// A dimension of scores that must match values' dimension of the same index.
struct MatchedDim {
  const char* what;  // in errors, e.g. "scores' head dimension"
  int64_t index;
};

// scores and values whose number of dimensions the operator has checked: values in a supported
// dtype, scores in the same one and on values' device, the dimensions `matched` equal, values
// contiguous in its last dimension.
void check_scores_and_values(const char* op, const at::Tensor& scores, const at::Tensor& values,
                             std::initializer_list<MatchedDim> matched);

// What a backward takes from its forward: out (values' shape and dtype) and lse (scores' shape,
// float64), contiguous, on values' device. `forward` names the operator that returns them.
void check_forward_outputs(const char* op, const char* forward, const at::Tensor& out,
                           const at::Tensor& lse, const at::Tensor& scores,
                           const at::Tensor& values);

// The gradients a backward receives, checked against scores and values and converted to what
// the kernels read: grad_out in values' dtype with a contiguous last dimension, grad_lse in
// float64. Absent or undefined: absent (the kernels read zeros).
struct IncomingGradients {
  std::optional<at::Tensor> grad_out;
  std::optional<at::Tensor> grad_lse;
};
IncomingGradients incoming_gradients(const char* op, const std::optional<at::Tensor>& grad_out,
                                     const std::optional<at::Tensor>& grad_lse,
                                     const at::Tensor& scores, const at::Tensor& values);

// The state in the dtypes the kernels read (a no-op when it already is): out with a contiguous
// last dimension, or, with `contiguous`, both lse and out contiguous throughout.
struct KernelState {
  std::optional<at::Tensor> lse;
  std::optional<at::Tensor> out;
};
KernelState kernel_state(const std::optional<at::Tensor>& state_lse,
                         const std::optional<at::Tensor>& state_out, bool contiguous);

// The state's gradients have the dtypes of the state given (the kernels' when none).
at::ScalarType grad_state_lse_dtype(const std::optional<at::Tensor>& state_lse);
at::ScalarType grad_state_out_dtype(const std::optional<at::Tensor>& state_out);

// The kernels write the state's gradients in their own dtype: `grad` itself when it has it,
// else a buffer of its shape, whose values copy_into puts into `grad` after the kernel ran.
at::Tensor in_kernel_dtype(const at::Tensor& grad, at::ScalarType kernel_dtype);
void copy_into(const at::Tensor& grad, const at::Tensor& written);

// Runs a backward kernel on `args` (every field but the state's gradients filled) with the
// state's gradients written in the kernels' dtypes, then into grad_state_lse and
// grad_state_out (the returned ones, in the dtypes of the state given). Returns the gradients
// of scores, values, state lse and state out.
template <typename Args>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> run_backward_kernel(
    void (*kernel)(const Args&), Args& args, const at::Tensor& grad_state_lse,
    const at::Tensor& grad_state_out) {
  args.grad_state_lse = in_kernel_dtype(grad_state_lse, kLseDtype);
  args.grad_state_out = in_kernel_dtype(grad_state_out, kStateOutDtype);
  kernel(args);
  copy_into(grad_state_lse, args.grad_state_lse);
  copy_into(grad_state_out, args.grad_state_out);
  return {args.grad_scores, args.grad_values, grad_state_lse, grad_state_out};
}

}  // namespace aaren::ops
