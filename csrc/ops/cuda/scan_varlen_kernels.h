// The CUDA kernels of the packed variable-length scan (scan_varlen.cu), declared in plain C++
// for scan_cuda.cpp, which registers them (as scan_kernels.h does the dense scan's).
#pragma once

#include "ops/scan_varlen.h"

namespace aaren::ops::cuda {

// Each direction for the dtype of args.values, on the current device. With args.max_seqlen
// given they read cu_seqlens on the device only (no synchronization, no check of its values);
// without, they copy it to the host once, check it (ops/scan_varlen.h) and take the longest
// sequence from it.
void dispatch_varlen_forward(const VarlenForwardArgs& args);
void dispatch_varlen_backward(const VarlenBackwardArgs& args);

}  // namespace aaren::ops::cuda
