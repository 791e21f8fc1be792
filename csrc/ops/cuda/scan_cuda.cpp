// Registers the CUDA kernels (as ops/cpu/scan_cpu.cpp does the CPU's): the operators' entry
// points, on the inputs' device. A step has no kernel of its own: it is the forward's
// float64 kernel on converted inputs, routed here; so is the state's lse gradient (below).
// Plain C++ (no device code), so that it compiles once with the host compiler rather than
// once per CUDA architecture.
#include <ATen/TensorOperators.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/exp.h>
#include <ATen/ops/repeat_interleave.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "ops/cuda/scan_kernels.h"
#include "ops/cuda/scan_varlen_kernels.h"
#include "ops/scan.h"

namespace aaren::ops::cuda {

void scan_forward(const ForwardArgs& args) {
  const c10::cuda::CUDAGuard guard(args.values.device());
  if (args.values.size(1) == 1 && args.state_lse.has_value() &&
      args.values.scalar_type() != at::kDouble) {
    // One token after a state (a step): in float64 against the float64 state, as on the CPU
    // (docs/design.md, "The state"), by the float64 kernel on converted inputs.
    const ForwardArgs wide{args.scores.to(at::kDouble), args.values.to(at::kDouble),
                           args.state_lse, args.state_out,
                           at::empty(args.values.sizes(), args.values.options().dtype(at::kDouble)),
                           args.lse, args.final_out};
    dispatch_forward(wide);
    args.out.copy_(wide.out);
    return;
  }
  dispatch_forward(args);
}

// ---- The state's lse gradient --------------------------------------------------------
// dL_0 = sum_j f_j (G_j + g_j . (o_0 - o_j)), f_j = e^(L_0 - L_j) (combine.h, "The state's
// lse gradient"). Taken from the outputs as the forward rounded them to the values' dtype,
// o_0 - o_j carries their rounding, which is the whole error where dL_0 is small by
// cancellation (17x the tests' rule on one float32 token). The CPU backward keeps a float64
// reverse sum for it in its walk; here the outputs are recomputed instead, by the forward's
// float64 kernel (as a step is), so that o_0 - o_j is exact to float64, and the sum is taken
// with ATen's reductions, which are deterministic. Its cost falls on a backward with a state
// only: a float64 forward over the tokens, in slices that keep its float64 copies of the
// scores, values and outputs under kStateGradientSliceBytes.
constexpr int64_t kStateGradientSliceBytes = int64_t(64) << 20;

// f (G + g . (o_0 - o)) for a run of tokens: o [.., H, D] the float64 outputs, lse [.., H] the
// forward's, lse_0 [.., H] and out_0 [.., H, D] the state broadcast over the run, grad_out and
// grad_lse those of the run (absent: zero). 0 where the state is empty (L_0 = -inf: f = 0).
at::Tensor state_lse_terms(const at::Tensor& out, const at::Tensor& lse, const at::Tensor& lse_0,
                           const at::Tensor& out_0, const std::optional<at::Tensor>& grad_out,
                           const std::optional<at::Tensor>& grad_lse) {
  at::Tensor term = grad_lse.has_value() ? grad_lse->to(at::kDouble) : at::zeros_like(lse);
  if (grad_out.has_value()) {
    term = term + (grad_out->to(at::kDouble) * (out_0 - out)).sum(-1);
  }
  const at::Tensor empty = lse_0 == -std::numeric_limits<double>::infinity();
  const at::Tensor f = at::where(empty, at::zeros_like(lse), at::exp(lse_0 - lse));
  return at::where(empty, at::zeros_like(term), f * term);
}

void dense_state_lse_gradient(const BackwardArgs& args) {
  const at::Tensor& values = args.values;
  const int64_t B = values.size(0), N = values.size(1), H = values.size(2), D = values.size(3);
  const int64_t per_token = std::max<int64_t>(1, B * H * (2 * D + 1) * int64_t(sizeof(double)));
  const int64_t slice = std::max<int64_t>(1, kStateGradientSliceBytes / per_token);
  const at::Tensor lse_0 = args.state_lse->to(at::kDouble).unsqueeze(1);  // [B, 1, H]
  const at::Tensor out_0 = args.state_out->to(at::kDouble).unsqueeze(1);  // [B, 1, H, D]
  at::Tensor carry_lse = *args.state_lse;
  at::Tensor carry_out = *args.state_out;
  const at::TensorOptions wide_options = values.options().dtype(at::kDouble);
  at::Tensor total = at::zeros({B, H}, wide_options);
  for (int64_t begin = 0; begin < N; begin += slice) {
    const int64_t end = std::min(N, begin + slice);
    const ForwardArgs wide{args.scores.slice(1, begin, end).to(at::kDouble),
                           values.slice(1, begin, end).to(at::kDouble), carry_lse, carry_out,
                           at::empty({B, end - begin, H, D}, wide_options),
                           at::empty({B, end - begin, H}, wide_options),
                           at::empty({B, H, D}, wide_options)};
    if (D > 0) {  // without features only the G terms remain: no forward to run
      dispatch_forward(wide);
    }
    const auto part = [&](const std::optional<at::Tensor>& t) -> std::optional<at::Tensor> {
      return t.has_value() ? std::optional<at::Tensor>(t->slice(1, begin, end)) : std::nullopt;
    };
    total += state_lse_terms(wide.out, args.lse.slice(1, begin, end), lse_0, out_0,
                             part(args.grad_out), part(args.grad_lse)).sum(1);
    if (D > 0) {
      carry_lse = wide.lse.select(1, end - begin - 1);
      carry_out = wide.final_out;
    }
  }
  args.grad_state_lse.copy_(total);
}

void scan_backward(const BackwardArgs& args) {
  const c10::cuda::CUDAGuard guard(args.values.device());
  dispatch_backward(args);
  const at::Tensor& v = args.values;
  if (args.state_lse.has_value() && v.size(0) * v.size(1) * v.size(2) > 0) {
    dense_state_lse_gradient(args);
  }
}

// The packed variable-length scan (scan_varlen.cu).
void scan_varlen_forward(const VarlenForwardArgs& args) {
  const c10::cuda::CUDAGuard guard(args.values.device());
  dispatch_varlen_forward(args);
}

// The packed scan's: the same terms per token, the state of each token's sequence broadcast
// by a gather, the float64 forward over all the tokens at once, and each sequence's sum as the
// difference of a float64 cumulative sum at its bounds (a deterministic segmented sum: ATen's
// index_add is not, on CUDA).
void varlen_state_lse_gradient(const VarlenBackwardArgs& args) {
  const at::Tensor& values = args.values;
  const int64_t T = values.size(0), H = values.size(1), D = values.size(2);
  const at::Tensor bounds = args.cu_seqlens.to(at::kLong);
  const int64_t sequences = bounds.size(0) - 1;
  const at::Tensor wide_values = values.to(at::kDouble);
  const VarlenForwardArgs wide{args.scores.to(at::kDouble), wide_values, args.cu_seqlens,
                               args.max_seqlen, args.state_lse, args.state_out,
                               at::empty({T, H, D}, wide_values.options()),
                               at::empty({T, H}, wide_values.options()),
                               at::empty({sequences, H}, wide_values.options()),
                               at::empty({sequences, H, D}, wide_values.options())};
  if (D > 0) {
    dispatch_varlen_forward(wide);
  }
  const at::Tensor lengths = bounds.slice(0, 1) - bounds.slice(0, 0, sequences);
  const at::Tensor sequence_of_token = at::repeat_interleave(
      at::arange(sequences, bounds.options()), lengths, /*dim=*/0, /*output_size=*/T);
  const at::Tensor terms = state_lse_terms(
      wide.out, args.lse, args.state_lse->to(at::kDouble).index_select(0, sequence_of_token),
      args.state_out->to(at::kDouble).index_select(0, sequence_of_token), args.grad_out,
      args.grad_lse);  // [T, H]
  const at::Tensor running = at::cat({at::zeros({1, H}, terms.options()), terms.cumsum(0)});
  args.grad_state_lse.copy_(running.index_select(0, bounds.slice(0, 1)) -
                            running.index_select(0, bounds.slice(0, 0, sequences)));
}

void scan_varlen_backward(const VarlenBackwardArgs& args) {
  const c10::cuda::CUDAGuard guard(args.values.device());
  dispatch_varlen_backward(args);
  if (args.state_lse.has_value() && args.values.size(0) * args.values.size(1) > 0) {
    varlen_state_lse_gradient(args);
  }
}

}  // namespace aaren::ops::cuda

TORCH_LIBRARY_IMPL(aaren, CUDA, m) {
  aaren::ops::register_backend<aaren::ops::cuda::scan_forward, aaren::ops::cuda::scan_backward>(m);
  aaren::ops::register_varlen_backend<aaren::ops::cuda::scan_varlen_forward,
                                      aaren::ops::cuda::scan_varlen_backward>(m);
}
