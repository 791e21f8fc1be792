// The CPU kernel of aaren::attention_step (ops/attention_step.cpp says why the operator
// exists). For a few tokens at a time it does the two products itself, row by row into
// buffers it allocates once, and calls the step's kernel without going back through the
// dispatcher: at these sizes PyTorch's addmm spends more time on its dispatch and BLAS call
// than on the arithmetic. Larger products and other dtypes or layouts run the three calls
// (the composite), where a BLAS matrix product pays off.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "ops/attention_step.h"
#include "ops/cpu/scan_kernel.h"

namespace aaren::ops::cpu {
namespace {

// Up to this many multiply-adds in the two products (B (H + E) E + B E_out E) the row-by-row
// products below beat a BLAS call (E = 64 up to B = 3; measured in
// benchmarks/bench_step_cpu.py: at E = 256, B = 8 they cost 70 us a layer more than
// addmm); past it the composite's addmm, vectorized for the CPU and blocked for cache, takes over.
constexpr int64_t kMaxRowByRowMultiplyAdds = 1 << 15;
// Multiply-adds per task of the products' parallel loop.
constexpr int64_t kGrain = 1 << 15;

// y[b, r] = bias[r] + weight[r, :] . x[b, :], for contiguous x [B, K], weight [R, K],
// bias [R] (or null), y [B, R]. Each dot product keeps kPartials independent partial sums,
// which the compiler turns into vector instructions of the build's baseline ISA (this file
// is compiled once, not per ISA as the scan kernels are: the products are a small part of
// the step), in a fixed order: the same inputs give the same bits.
template <typename scalar_t>
void linear_rows(const scalar_t* x, const scalar_t* weight, const scalar_t* bias, scalar_t* y,
                 int64_t batch, int64_t rows, int64_t inner) {
  constexpr int64_t kPartials = 8;
  const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(1, batch * inner));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t b = 0; b < batch; ++b) {
      const scalar_t* x_row = x + b * inner;
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* w_row = weight + r * inner;
        scalar_t partial[kPartials] = {};
        int64_t k = 0;
        for (; k + kPartials <= inner; k += kPartials) {
          for (int64_t j = 0; j < kPartials; ++j) {
            partial[j] += w_row[k + j] * x_row[k + j];
          }
        }
        scalar_t total = ((partial[0] + partial[1]) + (partial[2] + partial[3])) +
            ((partial[4] + partial[5]) + (partial[6] + partial[7]));
        for (; k < inner; ++k) {
          total += w_row[k] * x_row[k];
        }
        y[b * rows + r] = bias == nullptr ? total : total + bias[r];
      }
    }
  });
}

bool contiguous_or_absent(const std::optional<at::Tensor>& t) {
  return !t.has_value() || !t->defined() || t->is_contiguous();
}

template <typename scalar_t>
const scalar_t* data_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? t->const_data_ptr<scalar_t>() : nullptr;
}

AttentionStepResult attention_step_cpu(
    const at::Tensor& x, const at::Tensor& proj_weight, const std::optional<at::Tensor>& proj_bias,
    const at::Tensor& out_weight, const std::optional<at::Tensor>& out_bias, int64_t num_heads,
    const std::optional<at::Tensor>& state_lse, const std::optional<at::Tensor>& state_out) {
  check_attention_step_inputs(x, proj_weight, proj_bias, out_weight, out_bias, num_heads,
                              state_lse, state_out);
  const at::ScalarType dtype = x.scalar_type();
  const int64_t batch = x.size(0);
  const int64_t width = x.size(1);
  const int64_t out_width = out_weight.size(0);
  // (The checks above gave every weight and bias x's dtype.)
  const bool row_by_row = (dtype == at::kFloat || dtype == at::kDouble) &&
      batch * width * (num_heads + width + out_width) <= kMaxRowByRowMultiplyAdds &&
      x.is_contiguous() && proj_weight.is_contiguous() && out_weight.is_contiguous() &&
      contiguous_or_absent(proj_bias) && contiguous_or_absent(out_bias);
  if (!row_by_row) {
    return attention_step_three_calls(x, proj_weight, proj_bias, out_weight, out_bias, num_heads,
                                      state_lse, state_out);
  }
  at::Tensor projected = at::empty({batch, num_heads + width}, x.options());
  at::Tensor y = at::empty({batch, out_width}, x.options());
  AT_DISPATCH_FLOATING_TYPES(dtype, "aaren_attention_step_cpu", [&] {
    linear_rows<scalar_t>(x.const_data_ptr<scalar_t>(), proj_weight.const_data_ptr<scalar_t>(),
                          data_or_null<scalar_t>(proj_bias), projected.mutable_data_ptr<scalar_t>(),
                          batch, num_heads + width, width);
  });
  const auto [score, value] = split_projection(projected, num_heads);
  auto [out, lse, new_state_out] = step_with(forward, score, value, state_lse, state_out);
  const at::Tensor out_rows = out.view({batch, width});  // step returns it contiguous
  AT_DISPATCH_FLOATING_TYPES(dtype, "aaren_attention_step_cpu", [&] {
    linear_rows<scalar_t>(out_rows.const_data_ptr<scalar_t>(), out_weight.const_data_ptr<scalar_t>(),
                          data_or_null<scalar_t>(out_bias), y.mutable_data_ptr<scalar_t>(), batch,
                          out_width, width);
  });
  return {y, lse, new_state_out};
}

}  // namespace
}  // namespace aaren::ops::cpu

TORCH_LIBRARY_IMPL(aaren, CPU, m) {
  m.impl("attention_step", &aaren::ops::cpu::attention_step_cpu);
}
