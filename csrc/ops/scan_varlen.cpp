// The packed variable-length scan's schemas, the checks every backend shares, the Meta
// (fake tensor) registration and autocast (ops/scan_varlen.h says what is checked where).
#include "ops/scan_varlen.h"

#include <ATen/autocast_mode.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>

#include "aaren/aaren.h"
#include "ops/checks.h"

namespace aaren::ops {
namespace {

constexpr const char* kForwardOp = "aaren.scan_varlen";
constexpr const char* kBackwardOp = "aaren.scan_varlen_backward";

// scores [T, H], values [T, H, D], cu_seqlens [N + 1] (int32 or int64), max_seqlen >= 0,
// optional state (lse [N, H], out [N, H, D]).
void check_varlen_inputs(const char* op, const at::Tensor& scores, const at::Tensor& values,
                         const at::Tensor& cu_seqlens,
                         std::optional<c10::SymInt> max_seqlen,
                         const std::optional<at::Tensor>& state_lse,
                         const std::optional<at::Tensor>& state_out) {
  TORCH_CHECK(scores.dim() == 2, op, ": scores must have shape [T, H] (packed tokens), got shape ",
              scores.sym_sizes());
  TORCH_CHECK(values.dim() == 3, op,
              ": values must have shape [T, H, D] (packed tokens), got shape ", values.sym_sizes());
  check_scores_and_values(op, scores, values,
                          {{"scores' token dimension", 0}, {"scores' head dimension", 1}});

  TORCH_CHECK(cu_seqlens.dim() == 1, op,
              ": cu_seqlens must be a 1-D tensor of N + 1 sequence boundaries, got shape ",
              cu_seqlens.sym_sizes());
  TORCH_CHECK(cu_seqlens.sym_size(0) >= 1, op,
              ": cu_seqlens must have N + 1 >= 1 entries (it starts at 0), got none");
  TORCH_CHECK_TYPE(cu_seqlens.scalar_type() == at::kInt || cu_seqlens.scalar_type() == at::kLong,
                   op, ": cu_seqlens must be int32 or int64, got ", cu_seqlens.scalar_type());
  check_same_device(op, cu_seqlens, "cu_seqlens", values);
  if (max_seqlen.has_value()) {
    if (const std::optional<int64_t> bound = max_seqlen->maybe_as_int(); bound.has_value()) {
      TORCH_CHECK(*bound >= 0, op, ": max_seqlen must be non-negative, got ", *bound);
    }
  }
  // The state's devices named against values here (check_state names its batch's source).
  if (state_lse.has_value()) {
    check_same_device(op, *state_lse, "state lse", values);
  }
  if (state_out.has_value()) {
    check_same_device(op, *state_out, "state out", values);
  }
  const c10::SymInt sequences = cu_seqlens.sym_size(0) - 1;
  check_state(op, state_lse, state_out, values, {sequences, "cu_seqlens' sequence count"},
              {values.sym_size(1), "values"}, {values.sym_size(2), "values"});
}

std::optional<int64_t> concrete(std::optional<c10::SymInt> max_seqlen) {
  if (!max_seqlen.has_value()) {
    return std::nullopt;
  }
  return max_seqlen->expect_int();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> scan_varlen_forward_with(
    VarlenForwardKernel kernel, const at::Tensor& scores, const at::Tensor& values,
    const at::Tensor& cu_seqlens, std::optional<c10::SymInt> max_seqlen,
    const std::optional<at::Tensor>& state_lse, const std::optional<at::Tensor>& state_out) {
  check_varlen_inputs(kForwardOp, scores, values, cu_seqlens, max_seqlen, state_lse, state_out);
  const c10::SymInt sequences = cu_seqlens.sym_size(0) - 1;
  const c10::SymInt heads = values.sym_size(1);
  const c10::SymInt head_dim = values.sym_size(2);
  const at::TensorOptions wide = values.options().dtype(kLseDtype);
  VarlenForwardArgs args;
  args.out = at::empty_symint(values.sym_sizes(), values.options());
  args.lse = at::empty_symint(scores.sym_sizes(), wide);
  args.final_lse = at::empty_symint({sequences, heads}, wide);
  args.final_out = at::empty_symint({sequences, heads, head_dim}, values.options().dtype(kStateOutDtype));
  if (kernel != nullptr) {
    // Contiguous: the kernels index the state per sequence.
    const KernelState state = kernel_state(state_lse, state_out, /*contiguous=*/true);
    args.scores = scores;
    args.values = values;
    args.cu_seqlens = cu_seqlens;
    args.max_seqlen = concrete(max_seqlen);
    args.state_lse = state.lse;
    args.state_out = state.out;
    kernel(args);
  }
  return {args.out, args.lse, args.final_lse, args.final_out};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> scan_varlen_backward_with(
    VarlenBackwardKernel kernel, const std::optional<at::Tensor>& grad_out,
    const std::optional<at::Tensor>& grad_lse, const at::Tensor& scores,
    const at::Tensor& values, const at::Tensor& cu_seqlens,
    std::optional<c10::SymInt> max_seqlen, const at::Tensor& out, const at::Tensor& lse,
    const std::optional<at::Tensor>& state_lse, const std::optional<at::Tensor>& state_out) {
  constexpr const char* op = kBackwardOp;
  check_varlen_inputs(op, scores, values, cu_seqlens, max_seqlen, state_lse, state_out);
  check_forward_outputs(op, "scan_varlen_forward", out, lse, scores, values);

  VarlenBackwardArgs args;
  const IncomingGradients incoming = incoming_gradients(op, grad_out, grad_lse, scores, values);
  args.grad_out = incoming.grad_out;
  args.grad_lse = incoming.grad_lse;
  const c10::SymInt sequences = cu_seqlens.sym_size(0) - 1;
  const c10::SymInt heads = values.sym_size(1);
  const c10::SymInt head_dim = values.sym_size(2);
  args.grad_scores = at::empty_symint(scores.sym_sizes(), scores.options());
  args.grad_values = at::empty_symint(values.sym_sizes(), values.options());
  const at::Tensor grad_state_lse = at::empty_symint(
      {sequences, heads}, lse.options().dtype(grad_state_lse_dtype(state_lse)));
  const at::Tensor grad_state_out = at::empty_symint(
      {sequences, heads, head_dim}, values.options().dtype(grad_state_out_dtype(state_out)));
  if (kernel == nullptr) {
    return {args.grad_scores, args.grad_values, grad_state_lse, grad_state_out};
  }
  const KernelState state = kernel_state(state_lse, state_out, /*contiguous=*/true);
  args.scores = scores;
  args.values = values;
  args.cu_seqlens = cu_seqlens;
  args.max_seqlen = concrete(max_seqlen);
  args.out = out;
  args.lse = lse;
  args.state_lse = state.lse;
  args.state_out = state.out;
  return run_backward_kernel(kernel, args, grad_state_lse, grad_state_out);
}

namespace {

// Autocast as for scan_forward (autocast/scan_autocast.cpp): scores and values to the autocast
// dtype of their device; the state is left to the operator's own conversion.
template <c10::DeviceType kDevice>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> scan_varlen_forward_autocast(
    const at::Tensor& scores, const at::Tensor& values, const at::Tensor& cu_seqlens,
    std::optional<c10::SymInt> max_seqlen, const std::optional<at::Tensor>& state_lse,
    const std::optional<at::Tensor>& state_out) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(
      at::autocast::get_autocast_dispatch_key_from_device_type(kDevice));
  const at::ScalarType dtype = at::autocast::get_autocast_dtype(kDevice);
  return scan_varlen_forward(at::autocast::cached_cast(dtype, scores, kDevice),
                             at::autocast::cached_cast(dtype, values, kDevice), cu_seqlens,
                             max_seqlen, state_lse, state_out);
}

}  // namespace
}  // namespace aaren::ops

TORCH_LIBRARY_FRAGMENT(aaren, m) {
  // Packed sequences (flash-attn's varlen layout): scores [T, H], values [T, H, D], sequence i
  // the tokens [cu_seqlens[i], cu_seqlens[i + 1]), each scanned on its own from its own state
  // (state_lse [N, H], state_out [N, H, D]; absent: the empty state). Returns the per-token
  // out [T, H, D] and lse [T, H] (float64) and each sequence's final state, final_lse [N, H]
  // and final_out [N, H, D] (float64). max_seqlen bounds the longest sequence (CUDA: sizes the
  // launch without reading cu_seqlens back).
  m.def(
      "scan_varlen_forward(Tensor scores, Tensor values, Tensor cu_seqlens, "
      "SymInt? max_seqlen=None, Tensor? state_lse=None, Tensor? state_out=None) -> "
      "(Tensor out, Tensor lse, Tensor final_lse, Tensor final_out)");
  m.def(
      "scan_varlen_backward(Tensor? grad_out, Tensor? grad_lse, Tensor scores, Tensor values, "
      "Tensor cu_seqlens, SymInt? max_seqlen, Tensor out, Tensor lse, Tensor? state_lse=None, "
      "Tensor? state_out=None) -> (Tensor grad_scores, Tensor grad_values, "
      "Tensor grad_state_lse, Tensor grad_state_out)");
}

TORCH_LIBRARY_IMPL(aaren, Meta, m) {
  aaren::ops::register_varlen_backend<nullptr, nullptr>(m);
}

TORCH_LIBRARY_IMPL(aaren, AutocastCPU, m) {
  m.impl("scan_varlen_forward",
         aaren::ops::scan_varlen_forward_autocast<c10::DeviceType::CPU>);
}

TORCH_LIBRARY_IMPL(aaren, AutocastCUDA, m) {
  m.impl("scan_varlen_forward",
         aaren::ops::scan_varlen_forward_autocast<c10::DeviceType::CUDA>);
}
