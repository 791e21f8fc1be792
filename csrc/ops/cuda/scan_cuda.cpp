// Registers the CUDA kernels (as ops/cpu/scan_cpu.cpp does the CPU's): the operators' entry
// points, on the inputs' device. A step has no kernel of its own: it is the forward's
// float64 kernel on converted inputs, routed here. Plain C++ (no device code), so that it
// compiles once with the host compiler rather than once per CUDA architecture.
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

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

void scan_backward(const BackwardArgs& args) {
  const c10::cuda::CUDAGuard guard(args.values.device());
  dispatch_backward(args);
}

// The packed variable-length scan (scan_varlen.cu).
void scan_varlen_forward(const VarlenForwardArgs& args) {
  const c10::cuda::CUDAGuard guard(args.values.device());
  dispatch_varlen_forward(args);
}

void scan_varlen_backward(const VarlenBackwardArgs& args) {
  const c10::cuda::CUDAGuard guard(args.values.device());
  dispatch_varlen_backward(args);
}

}  // namespace aaren::ops::cuda

TORCH_LIBRARY_IMPL(aaren, CUDA, m) {
  aaren::ops::register_backend<aaren::ops::cuda::scan_forward, aaren::ops::cuda::scan_backward>(m);
  aaren::ops::register_varlen_backend<aaren::ops::cuda::scan_varlen_forward,
                                      aaren::ops::cuda::scan_varlen_backward>(m);
}
