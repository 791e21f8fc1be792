// The CUDA entry points of the packed variable-length scan (ops/scan_varlen.h): N sequences
// packed along the tokens, sequence i the tokens [cu_seqlens[i], cu_seqlens[i + 1]) of scores
// [T, H] and values [T, H, D], each scanned on its own from its own state. The kernels are the
// dense scan's (scan_forward.cu, scan_backward.cu), run with the packed sequence locator
// (scan_common.cuh's PackedSequences): each sequence's bounds read from cu_seqlens on the
// device, the chunks (when the sequences x heads are too few to fill the GPU) planned on the
// host from the longest sequence, max_seqlen. Where max_seqlen is below a sequence's length
// (not checked on the device) that sequence's chunks are longer rather than its tokens left
// out; wrong cu_seqlens values give wrong results but never an access outside the tensors.
#include <ATen/ops/empty.h>

#include <cstdint>
#include <optional>

#include "ops/cuda/scan_common.cuh"
#include "ops/cuda/scan_varlen_kernels.h"

namespace aaren::ops::cuda {
namespace {

// The longest sequence: max_seqlen when given (nothing read back), else from cu_seqlens
// copied to the host once, whose values are then checked.
int64_t longest_sequence(const at::Tensor& cu_seqlens, int64_t tokens,
                         std::optional<int64_t> max_seqlen, const char* op) {
  if (max_seqlen.has_value()) {
    return *max_seqlen;
  }
  const at::Tensor host = cu_seqlens.to(at::kCPU).to(at::kLong).contiguous();
  return check_cu_seqlens_values(op, host.const_data_ptr<int64_t>(), host.numel(), tokens,
                                 std::nullopt);
}

}  // namespace

void dispatch_varlen_forward(const VarlenForwardArgs& args) {
  if (args.cu_seqlens.size(0) <= 1) {
    return;  // no sequences: nothing to write
  }
  varlen_forward(args, longest_sequence(args.cu_seqlens, args.values.size(0), args.max_seqlen,
                                        "aaren.scan_varlen"));
}

void dispatch_varlen_backward(const VarlenBackwardArgs& args) {
  if (args.cu_seqlens.size(0) <= 1) {
    return;
  }
  varlen_backward(args, longest_sequence(args.cu_seqlens, args.values.size(0), args.max_seqlen,
                                         "aaren.scan_varlen_backward"));
}

}  // namespace aaren::ops::cuda
