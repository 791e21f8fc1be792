// The CUDA kernels' entry points for each dtype (scan_forward.cu, scan_backward.cu), declared
// in plain C++ for scan_cuda.cpp, which registers them: the registration needs no nvcc.
#pragma once

#include "ops/scan.h"

namespace aaren::ops::cuda {

// Each direction's kernels for the dtype of args.values, on the current device.
void dispatch_forward(const ForwardArgs& args);
void dispatch_backward(const BackwardArgs& args);

}  // namespace aaren::ops::cuda
