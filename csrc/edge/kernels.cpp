// ExecuTorch kernels of the aaren operators an exported Aaren model contains: the out variants
//   aaren::scan_forward.out(Tensor scores, Tensor values, Tensor? state_lse=None,
//       Tensor? state_out=None, *, Tensor(a!) out, Tensor(b!) lse, Tensor(c!) final_out)
//   aaren::step.out(Tensor score, Tensor value, Tensor? state_lse=None, Tensor? state_out=None,
//       *, Tensor(a!) out, Tensor(b!) lse, Tensor(c!) new_state_out)
// (their schemas are defined by aaren.edge at export time; ExecuTorch runs out variants only).
// They compute what the LibTorch CPU kernels compute, from the same arithmetic: each lane is
// aaren/walk.h's walk (enter_state, take_token, leave_state) and step_token, built on
// combine.h, with the same choice as the CPU kernel of when a token goes through step_token.
//
// What differs from the LibTorch CPU kernels, and why:
// - No ATen: ExecuTorch's portable Tensor, and plain loops over D that the compiler
//   vectorizes, where the CPU kernels use ATen's Vectorized types across lanes.
// - One thread: a runner streams one sequence, a step is H lanes of D numbers (microseconds),
//   less than the cost of handing work to a thread pool.
// - float32 and float64 values (what an exported float32 model and its float64 state need);
//   other dtypes get an error.
// - Inputs must be dense in the default dim order (what ExecuTorch's memory planner gives).
//
// Registration: EXECUTORCH_LIBRARY (extension/kernel_util) accepts kernels with one out
// tensor only, so these three-output kernels are boxed by hand and registered with
// register_kernels from a static initializer, as that macro does. A program runs them when
// this library is linked into the runner (kept by --no-as-needed: nothing references it).
#include <executorch/runtime/core/evalue.h>
#include <executorch/runtime/kernel/kernel_includes.h>
#include <executorch/runtime/kernel/operator_registry.h>

#include <cstdio>
#include <optional>
#include <vector>

#include "aaren/combine.h"
#include "aaren/walk.h"

namespace {

using executorch::aten::ArrayRef;
using executorch::aten::ScalarType;
using executorch::aten::SizesType;
using executorch::aten::Tensor;
using executorch::runtime::Error;
using executorch::runtime::EValue;
using executorch::runtime::KernelRuntimeContext;
using executorch::runtime::Span;

// The call's tensors, checked. Shapes: scores [B, N, H], values [B, N, H, D]; the state
// lse [B, H], out [B, H, D] (float64); outputs out [B, N, H, D], lse [B, N, H] (float64),
// final_out [B, H, D] (float64). A step has N = 1 and no N dimension in its tensors.
struct ScanCall {
  const Tensor* scores;
  const Tensor* values;
  std::optional<Tensor> state_lse;
  std::optional<Tensor> state_out;
  Tensor* out;
  Tensor* lse;
  Tensor* final_out;
  int64_t batch, length, heads, head_dim;
};

bool dense(const Tensor& t) {
  return executorch::runtime::tensor_is_default_dim_order(t) &&
         executorch::runtime::tensor_is_contiguous(t);
}

bool resize(Tensor& t, std::initializer_list<int64_t> sizes) {
  SizesType shape[4];
  size_t rank = 0;
  for (int64_t size : sizes) {
    shape[rank++] = static_cast<SizesType>(size);
  }
  return executorch::runtime::resize_tensor(t, ArrayRef<SizesType>(shape, rank)) == Error::Ok;
}

// Checks the call and sizes its outputs; false (the context failed) on bad input.
bool prepare(KernelRuntimeContext& ctx, const char* op, ScanCall& call, bool step) {
  const Tensor& scores = *call.scores;
  const Tensor& values = *call.values;
  const int rank = step ? 2 : 3;
  ET_KERNEL_CHECK_MSG(ctx, scores.dim() == rank && values.dim() == rank + 1, InvalidArgument,
                      false, "%s: expected %s and %s, got tensors of %d and %d dimensions", op,
                      step ? "score [B, H]" : "scores [B, N, H]",
                      step ? "value [B, H, D]" : "values [B, N, H, D]",
                      static_cast<int>(scores.dim()), static_cast<int>(values.dim()));
  call.batch = values.size(0);
  call.length = step ? 1 : values.size(1);
  call.heads = values.size(rank - 1);
  call.head_dim = values.size(rank);
  for (int d = 0; d < rank; ++d) {
    ET_KERNEL_CHECK_MSG(ctx, scores.size(d) == values.size(d), InvalidArgument, false,
                        "%s: the scores' size %d at dimension %d differs from the values' %d",
                        op, static_cast<int>(scores.size(d)), d, static_cast<int>(values.size(d)));
  }
  const ScalarType dtype = values.scalar_type();
  ET_KERNEL_CHECK_MSG(ctx, dtype == ScalarType::Float || dtype == ScalarType::Double,
                      InvalidArgument, false, "%s: values must be float32 or float64, got %s",
                      op, executorch::runtime::toString(dtype));
  ET_KERNEL_CHECK_MSG(ctx, scores.scalar_type() == dtype && call.out->scalar_type() == dtype,
                      InvalidArgument, false, "%s: scores, values and out must share a dtype", op);
  ET_KERNEL_CHECK_MSG(ctx, call.lse->scalar_type() == ScalarType::Double &&
                               call.final_out->scalar_type() == ScalarType::Double,
                      InvalidArgument, false, "%s: the lse and state outputs must be float64", op);
  ET_KERNEL_CHECK_MSG(ctx, dense(scores) && dense(values), InvalidArgument, false,
                      "%s: scores and values must be dense in the default dim order", op);
  ET_KERNEL_CHECK_MSG(ctx, call.state_lse.has_value() == call.state_out.has_value(),
                      InvalidArgument, false,
                      "%s: the state needs both state_lse and state_out, or neither", op);
  if (call.state_lse.has_value()) {
    const Tensor& lse = *call.state_lse;
    const Tensor& out = *call.state_out;
    ET_KERNEL_CHECK_MSG(
        ctx,
        lse.dim() == 2 && lse.size(0) == call.batch && lse.size(1) == call.heads &&
            out.dim() == 3 && out.size(0) == call.batch && out.size(1) == call.heads &&
            out.size(2) == call.head_dim,
        InvalidArgument, false,
        "%s: expected a state lse [%d, %d] and out [%d, %d, %d]", op,
        static_cast<int>(call.batch), static_cast<int>(call.heads), static_cast<int>(call.batch),
        static_cast<int>(call.heads), static_cast<int>(call.head_dim));
    ET_KERNEL_CHECK_MSG(ctx, lse.scalar_type() == ScalarType::Double &&
                                 out.scalar_type() == ScalarType::Double && dense(lse) && dense(out),
                        InvalidArgument, false, "%s: the state must be dense float64 tensors", op);
  }
  // Outputs are memory-planned at the upper bound of dynamic sizes: give them this call's.
  const bool sized =
      (step ? resize(*call.out, {call.batch, call.heads, call.head_dim}) &&
                  resize(*call.lse, {call.batch, call.heads})
            : resize(*call.out, {call.batch, call.length, call.heads, call.head_dim}) &&
                  resize(*call.lse, {call.batch, call.length, call.heads})) &&
      resize(*call.final_out, {call.batch, call.heads, call.head_dim});
  ET_KERNEL_CHECK_MSG(ctx, sized, InvalidArgument, false,
                      "%s: the outputs cannot take the inputs' sizes", op);
  return true;
}

// Every lane (b, h): the LibTorch CPU kernel's arithmetic (ops/cpu/scan_kernel.cpp): one token
// after a state goes through step_token in float64 unless the values are float64; otherwise
// the online-softmax walk in the values' dtype.
template <typename scalar_t>
void run(const ScanCall& call) {
  const int64_t heads = call.heads;
  const int64_t head_dim = call.head_dim;
  const scalar_t* scores = call.scores->const_data_ptr<scalar_t>();
  const scalar_t* values = call.values->const_data_ptr<scalar_t>();
  scalar_t* out = call.out->mutable_data_ptr<scalar_t>();
  double* lse = call.lse->mutable_data_ptr<double>();
  double* final_out = call.final_out->mutable_data_ptr<double>();
  const bool has_state = call.state_lse.has_value();
  const double* state_lse = has_state ? call.state_lse->const_data_ptr<double>() : nullptr;
  const double* state_out = has_state ? call.state_out->const_data_ptr<double>() : nullptr;
  const bool in_float64_step = call.length == 1 && has_state && !std::is_same_v<scalar_t, double>;
  // The walk's running numerator, float64 as the LibTorch CPU kernel's for these dtypes
  // (aaren/walk.h); a one-token step after a state needs none (no allocation on the step's
  // path).
  std::vector<aaren::numerator_type<scalar_t, scalar_t>> numerator(
      in_float64_step ? 0 : static_cast<size_t>(head_dim));
  for (int64_t b = 0; b < call.batch; ++b) {
    for (int64_t h = 0; h < heads; ++h) {
      const int64_t lane = b * heads + h;
      const double* lane_lse = has_state ? state_lse + lane : nullptr;
      const double* lane_out = has_state ? state_out + lane * head_dim : nullptr;
      double* lane_final = final_out + lane * head_dim;
      const int64_t first = b * call.length * heads + h;  // token 0 of the lane, in [B, N, H]
      if (in_float64_step) {
        lse[first] = aaren::step_token(*lane_lse, lane_out, scores[first],
                                       values + first * head_dim, head_dim,
                                       out + first * head_dim, lane_final);
        continue;
      }
      scalar_t running_max;
      double denominator;  // float64 whatever the values' dtype (aaren/walk.h)
      aaren::enter_state(lane_lse, lane_out, head_dim, running_max, denominator,
                         numerator.data());
      for (int64_t n = 0; n < call.length; ++n) {
        const int64_t token = first + n * heads;
        lse[token] = aaren::take_token(scores[token], values + token * head_dim, head_dim,
                                       running_max, denominator, numerator.data(),
                                       out + token * head_dim);
      }
      if (call.length == 0 && has_state) {  // no token: the state as it was, exactly
        std::copy(lane_out, lane_out + head_dim, lane_final);
      } else {
        aaren::leave_state(running_max, denominator, numerator.data(), head_dim, lane_final);
      }
    }
  }
}

// The boxed kernel: the stack holds the schema's arguments in order (the four inputs, the
// three outs), then the list of returned tensors.
void scan_or_step(KernelRuntimeContext& ctx, Span<EValue*> stack, const char* op, bool step) {
  ET_KERNEL_CHECK_MSG(ctx, stack.size() >= 7, InvalidArgument, , "%s: expected 7 arguments, got %d",
                      op, static_cast<int>(stack.size()));
  ScanCall call{&stack[0]->toTensor(), &stack[1]->toTensor(), stack[2]->toOptional<Tensor>(),
                stack[3]->toOptional<Tensor>(), &stack[4]->toTensor(), &stack[5]->toTensor(),
                &stack[6]->toTensor(), 0, 0, 0, 0};
  if (!prepare(ctx, op, call, step)) {
    return;
  }
  if (call.values->scalar_type() == ScalarType::Double) {
    run<double>(call);
  } else {
    run<float>(call);
  }
}

void scan_forward_out(KernelRuntimeContext& ctx, Span<EValue*> stack) {
  scan_or_step(ctx, stack, "aaren::scan_forward.out", false);
}

void step_out(KernelRuntimeContext& ctx, Span<EValue*> stack) {
  scan_or_step(ctx, stack, "aaren::step.out", true);
}

const Error registered = [] {
  static const executorch::runtime::Kernel kernels[] = {
      executorch::runtime::Kernel("aaren::scan_forward.out", scan_forward_out),
      executorch::runtime::Kernel("aaren::step.out", step_out),
  };
  const Error error = executorch::runtime::register_kernels({kernels, 2});
  if (error != Error::Ok) {
    std::fprintf(stderr, "aaren: registering the ExecuTorch kernels failed (error 0x%x)\n",
                 static_cast<unsigned>(error));
  }
  return error;
}();

}  // namespace
