// CPU kernels of the scan, forward and backward. This file is compiled once per CPU
// instruction set (as PyTorch compiles its own kernels: DEFAULT, AVX2, AVX512; and
// AVX512_BF16, AVX512 with the bfloat16 conversions), each time into the namespace named
// by CPU_CAPABILITY; scan_cpu.cpp picks one at run time.
//
// Work is split over the B x H independent sequences (and, when they are too few to keep
// every thread busy, over chunks of each sequence: work_plan.h, "The split of the work") with
// at::parallel_for; each is one streaming pass over its tokens, vectorized over D, with the
// running output kept in an accumulator of the accumulation type (float32 for half types).
// The forward's walk over its tokens is forward_lanes.h's. Rows are loaded and stored
// through vec_io.h, large outputs by streaming stores.
#include "ops/cpu/scan_kernel.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <optional>
#include <type_traits>
#include <vector>

#include "aaren/combine.h"
#include "aaren/walk.h"
#include "ops/cpu/backward_lanes.h"
#include "ops/cpu/forward_lanes.h"
#include "ops/cpu/vec_io.h"
#include "ops/cpu/work_plan.h"

namespace aaren::ops::cpu::CPU_CAPABILITY {
namespace {

int64_t padded(int64_t head_dim, int64_t width) {
  return (head_dim + width - 1) / width * width;
}

// The state's row of sequence (b, h): its lse (one value) or its out (D values), float64;
// nullptr without a state.
const double* state_row(const std::optional<at::Tensor>& state, int64_t b, int64_t h) {
  return state.has_value()
      ? state->const_data_ptr<double>() + b * state->stride(0) + h * state->stride(1)
      : nullptr;
}

// One token after a state (a step, or a chunk of one token), in float64 whatever the values'
// dtype: aaren/walk.h's step_token, shared with the ExecuTorch kernels.
template <typename scalar_t>
void step_in_float64(const ForwardArgs& args) {
  const int64_t batch = args.values.size(0);
  const int64_t heads = args.values.size(2);
  const int64_t head_dim = args.values.size(3);
  const scalar_t* scores = args.scores.const_data_ptr<scalar_t>();
  const scalar_t* values = args.values.const_data_ptr<scalar_t>();
  scalar_t* out = args.out.mutable_data_ptr<scalar_t>();
  double* lse = args.lse.mutable_data_ptr<double>();
  double* final_out = args.final_out.mutable_data_ptr<double>();
  const auto s_strides = args.scores.strides();
  const auto v_strides = args.values.strides();
  at::parallel_for(0, batch * heads, std::max<int64_t>(1, (1 << 15) / std::max<int64_t>(head_dim, 1)),
                   [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / heads;
      const int64_t h = item % heads;
      lse[b * heads + h] = step_token(
          *state_row(args.state_lse, b, h), state_row(args.state_out, b, h),
          scores[b * s_strides[0] + h * s_strides[2]], values + b * v_strides[0] + h * v_strides[2],
          head_dim, out + item * head_dim, final_out + item * head_dim);
    }
  });
}

// ---- Forward --------------------------------------------------------------------------
// The walk over a task's lanes is forward_lanes.h's.

template <typename scalar_t>
void forward_typed(const ForwardArgs& args) {
  using Scratch = ForwardScratch<scalar_t>;
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;

  const int64_t batch = args.values.size(0);
  const int64_t length = args.values.size(1);
  const int64_t heads = args.values.size(2);
  const int64_t head_dim = args.values.size(3);
  const int64_t row_width = padded(head_dim, IO::width);

  if (length == 1 && args.state_lse.has_value() && !std::is_same_v<acc_t, double>) {
    step_in_float64<scalar_t>(args);
    return;
  }

  const scalar_t* scores = args.scores.const_data_ptr<scalar_t>();
  const scalar_t* values = args.values.const_data_ptr<scalar_t>();
  scalar_t* out = args.out.mutable_data_ptr<scalar_t>();  // contiguous [B,N,H,D]
  double* lse = args.lse.mutable_data_ptr<double>();      // contiguous [B,N,H]
  double* final_out = args.final_out.mutable_data_ptr<double>();  // contiguous [B,H,D]
  const auto s_strides = args.scores.strides();
  const auto v_strides = args.values.strides();
  const ForwardSteps steps{s_strides[1], v_strides[1], heads * head_dim, heads};

  const bool has_state = args.state_lse.has_value();

  const Plan plan = plan_work(batch, length, heads, head_dim);
  const int64_t chunks = plan.chunks;
  const bool streaming = use_streaming_stores(args.out.nbytes() + args.lse.nbytes());
  // Lane (b, l = c H + h): chunk c of sequence (b, h), positioned at its first token.
  const auto place = [&](Scratch& t, int64_t j, int64_t b, int64_t c, int64_t h) {
    const int64_t n = c * plan.chunk_len;
    t.score[j] = scores + b * s_strides[0] + n * s_strides[1] + h * s_strides[2];
    t.value[j] = values + b * v_strides[0] + n * v_strides[1] + h * v_strides[2];
    t.out[j] = out + ((b * length + n) * heads + h) * head_dim;
    t.lse[j] = lse + (b * length + n) * heads + h;
    t.length[j] = std::min(plan.chunk_len, length - n);
  };

  // Phases 1 and 2: each chunk's carry (L, o), the result of every token before it,
  // [B, C, H] and [B, C, H, D] (chunk 0's is the state itself, not stored).
  std::vector<double> carry_lse, carry_out;
  if (chunks > 1) {
    std::vector<double> summary_lse(batch * chunks * heads);
    std::vector<double> summary_out(batch * chunks * heads * head_dim);
    for_each_task<Scratch>(plan, batch, (chunks - 1) * heads, row_width,
                           [&](Scratch& t, int64_t b, int64_t lane_begin, int64_t lane_end) {
      for (int64_t l = lane_begin; l < lane_end; ++l) {
        place(t, l - lane_begin, b, l / heads, l % heads);
        t.enter(l - lane_begin, head_dim, nullptr, nullptr);
      }
      forward_lanes<scalar_t, false>(t, lane_end - lane_begin, head_dim, steps, false, false);
      for (int64_t l = lane_begin; l < lane_end; ++l) {
        const int64_t index = b * chunks * heads + l;
        summary_lse[index] = t.leave(l - lane_begin, head_dim, summary_out.data() + index * head_dim);
      }
    });
    carry_lse.resize(summary_lse.size());
    carry_out.resize(summary_out.size());
    at::parallel_for(0, batch * heads, 64, [&](int64_t begin, int64_t end) {
      std::vector<double> running(head_dim);
      for (int64_t item = begin; item < end; ++item) {
        const int64_t b = item / heads;
        const int64_t h = item % heads;
        double running_lse = has_state ? *state_row(args.state_lse, b, h) : negative_infinity<double>();
        if (has_state) {
          std::copy_n(state_row(args.state_out, b, h), head_dim, running.begin());
        } else {
          std::fill(running.begin(), running.end(), 0.0);
        }
        for (int64_t c = 0; c + 1 < chunks; ++c) {
          const int64_t index = (b * chunks + c) * heads + h;
          const CombineWeights w = combine_weights(running_lse, summary_lse[index]);
          const double* chunk_out = summary_out.data() + index * head_dim;
          for (int64_t d = 0; d < head_dim; ++d) {
            running[d] = w.weight_b == 0.0 ? running[d]
                : w.weight_a == 0.0       ? chunk_out[d]
                                          : w.weight_a * running[d] + w.weight_b * chunk_out[d];
          }
          running_lse = w.lse;
          const int64_t next = index + heads;  // chunk c + 1
          carry_lse[next] = running_lse;
          std::copy(running.begin(), running.end(), carry_out.begin() + next * head_dim);
        }
      }
    });
  }

  // Phase 3 (the whole scan when unsplit): every chunk from its carry, writing the outputs;
  // the last chunk leaves the state's out, unrounded.
  for_each_task<Scratch>(plan, batch, chunks * heads, row_width,
                         [&](Scratch& t, int64_t b, int64_t lane_begin, int64_t lane_end) {
    for (int64_t l = lane_begin; l < lane_end; ++l) {
      const int64_t j = l - lane_begin;
      const int64_t c = l / heads;
      const int64_t h = l % heads;
      place(t, j, b, c, h);
      if (c == 0) {
        t.enter(j, head_dim, state_row(args.state_lse, b, h), state_row(args.state_out, b, h));
      } else {
        const int64_t index = (b * chunks + c) * heads + h;
        t.enter(j, head_dim, &carry_lse[index], carry_out.data() + index * head_dim);
      }
    }
    forward_lanes<scalar_t, true>(t, lane_end - lane_begin, head_dim, steps, chunks == 1,
                                  streaming);
    for (int64_t l = std::max(lane_begin, (chunks - 1) * heads); l < lane_end; ++l) {
      t.leave(l - lane_begin, head_dim, final_out + (b * heads + l % heads) * head_dim);
    }
  });
}

// ---- Backward -------------------------------------------------------------------------
// The reverse recurrences of the design page, per sequence, from the last token back:
//   R_i = g_i + a_i R_{i+1},  rho_i = (g_i . o_i - G_i) + a_i rho_{i+1},  a_i = e^(L_i - L_{i+1}),
//   dv_i = e^(s_i - L_i) R_i,  ds_i = e^(s_i - L_i) (v_i . R_i - rho_i),
// and for the initial state (a token before the first): dL_0 = f (o_0 . R_1 - rho_1),
// do_0 = f R_1 with f = e^(L_0 - L_1). Unrolled, R_i = sum_{j>=i} e^(L_i - L_j) g_j: the
// kernel keeps S = sum e^(r - L_j) g_j and P = sum e^(r - L_j) (g_j . o_j - G_j) against a
// reference r (combine.h), so dv_i = e^(s_i - r) S and ds_i = e^(s_i - r) (v_i . S - P).
// v_i . S - P = sum_j e^(r - L_j) (g_j . (v_i - o_j) + G_j) cancels two sums that grow as
// sqrt(N) where a token dominates (o_j ~ v_i). Formed so, d/d scores in float32 broke the
// tests' rule (3x plain PyTorch's error, which forms each g_j . (v_i - o_j) apart) on 24 of
// 60 random mixed problems, by up to 5x; none now. The walk keeps instead
// Q_i = o_i . S_i - P_i, whose steps are small where the outputs move little:
//   Q_i = Q_{i+1} + (o_i - o_{i+1}) . S_{i+1} + e^(r - L_i) G_i,
//   ds_i = e^(s_i - r) ((v_i - o_i) . S_i + Q_i):
// combine.h's "The backward's Q" (q_term, score_gradient), whose arithmetic the CUDA backward
// shares in its gate form.
// The L_j are the forward's, saved: S and P are plain sums over the tokens after i, so a
// chunk's sums from nothing after it (phase 1, P = o . S - Q in float64) add to its
// successors' (phase 2), each moved to a common reference (combine.h, common_reference);
// a chunk then starts from Q = o_last . S - P of that carry, in float64 (phase 3).
//
// The state's lse gradient. f (Q + (o_0 - o_1) . S) above reads the outputs, rounded to the
// values' dtype, and where dL_0 is small by cancellation that rounding is its error (17x the
// tests' rule on one float32 token). With a state the walk keeps instead S2 and Z of
// combine.h's "The state's lse gradient", from the inputs, in float64: dL_0 = e^(L_0 - r) Z.
// S2 is carried across chunks as S is (its factors squared); each chunk's Z gives its share
// of dL_0, summed over the chunks in order.

template <typename scalar_t>
void backward_typed(const BackwardArgs& args) {
  using Scratch = BackwardScratch<scalar_t>;
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;

  const int64_t batch = args.values.size(0);
  const int64_t length = args.values.size(1);
  const int64_t heads = args.values.size(2);
  const int64_t head_dim = args.values.size(3);
  const int64_t row_width = padded(head_dim, IO::width);

  const scalar_t* scores = args.scores.const_data_ptr<scalar_t>();
  const scalar_t* values = args.values.const_data_ptr<scalar_t>();
  const scalar_t* out = args.out.const_data_ptr<scalar_t>();  // contiguous, as forward wrote it
  const double* lse = args.lse.const_data_ptr<double>();
  const auto s_strides = args.scores.strides();
  const auto v_strides = args.values.strides();

  // An absent gradient reads as zeros: a zero row (or scalar) with stride 0.
  const std::vector<scalar_t> zero_row(row_width, scalar_t(0));
  const double zero_scalar = 0;
  const bool has_grad_out = args.grad_out.has_value();
  const scalar_t* grad_out = has_grad_out ? args.grad_out->const_data_ptr<scalar_t>() : zero_row.data();
  const int64_t g_stride_b = has_grad_out ? args.grad_out->stride(0) : 0;
  const int64_t g_stride_n = has_grad_out ? args.grad_out->stride(1) : 0;
  const int64_t g_stride_h = has_grad_out ? args.grad_out->stride(2) : 0;
  const bool has_grad_lse = args.grad_lse.has_value();
  const double* grad_lse = has_grad_lse ? args.grad_lse->const_data_ptr<double>() : &zero_scalar;
  const int64_t G_stride_b = has_grad_lse ? args.grad_lse->stride(0) : 0;
  const int64_t G_stride_n = has_grad_lse ? args.grad_lse->stride(1) : 0;
  const int64_t G_stride_h = has_grad_lse ? args.grad_lse->stride(2) : 0;

  const bool has_state = args.state_lse.has_value();

  scalar_t* grad_scores = args.grad_scores.mutable_data_ptr<scalar_t>();
  scalar_t* grad_values = args.grad_values.mutable_data_ptr<scalar_t>();
  double* grad_state_lse = args.grad_state_lse.mutable_data_ptr<double>();
  double* grad_state_out = args.grad_state_out.mutable_data_ptr<double>();

  if (length == 0) {  // no token: the state's gradients are zero (no output depends on it here)
    args.grad_state_lse.zero_();
    args.grad_state_out.zero_();
    return;
  }

  const BackwardSteps steps{s_strides[1], v_strides[1], heads * head_dim, g_stride_n,
                            heads,        G_stride_n,   heads,            heads * head_dim};
  const Plan plan = plan_work(batch, length, heads, head_dim);
  const int64_t chunks = plan.chunks;
  const bool streaming = use_streaming_stores(args.grad_values.nbytes());

  // Lane j = chunk c of sequence (b, h), positioned at its first token, its sums zero against
  // the reference r = L at its last token, with Q taken against that token's out.
  const auto place = [&](Scratch& t, int64_t j, int64_t b, int64_t c, int64_t h) {
    const int64_t n = c * plan.chunk_len;
    const int64_t token = b * length + n;
    t.score[j] = scores + b * s_strides[0] + n * s_strides[1] + h * s_strides[2];
    t.value[j] = values + b * v_strides[0] + n * v_strides[1] + h * v_strides[2];
    t.out[j] = out + (token * heads + h) * head_dim;
    t.grad_out[j] = grad_out + b * g_stride_b + n * g_stride_n + h * g_stride_h;
    t.lse[j] = lse + token * heads + h;
    t.grad_lse[j] = grad_lse + b * G_stride_b + n * G_stride_n + h * G_stride_h;
    t.grad_score[j] = grad_scores + token * heads + h;
    t.grad_value[j] = grad_values + (token * heads + h) * head_dim;
    t.length[j] = std::min(plan.chunk_len, length - n);
    t.reference[j] = t.lse[j][(t.length[j] - 1) * heads];
    t.sum_q[j] = 0;
    std::fill_n(t.sum_g.data() + j * row_width, row_width, acc_t(0));
    t.out_of_q[j] = t.out[j] + (t.length[j] - 1) * steps.out;
    if (has_state) {
      if (t.sum_state.empty()) {
        t.with_state();
      }
      t.sum_state[j] = 0;
      std::fill_n(t.sum_g2.data() + j * row_width, row_width, 0.0);
      t.state_out[j] = state_row(args.state_out, b, h);
    }
  };
  // The walk, with the state's sums when there is a state.
  const auto walk = [&](auto outputs, Scratch& t, int64_t lanes, bool streaming) {
    constexpr bool kOutputs = decltype(outputs)::value;
    if (has_state) {
      backward_lanes<scalar_t, kOutputs, true>(t, lanes, head_dim, steps, streaming);
    } else {
      backward_lanes<scalar_t, kOutputs, false>(t, lanes, head_dim, steps, streaming);
    }
  };
  // o . S in float64, o the out that lane j's Q is taken against.
  const auto out_dot_sum = [&](const Scratch& t, int64_t j, const double* sum_g) {
    const scalar_t* o_row = t.out_of_q[j];
    double dot = 0;
    for (int64_t d = 0; d < head_dim; ++d) {
      dot += static_cast<double>(o_row[d]) * sum_g[d];
    }
    return dot;
  };

  // Phases 1 and 2: each chunk's carry (r, S, P, and S2 with a state), the sums over every
  // token after it, [B, C, H] (S, S2: [B, C, H, D]); r = -inf for none (the last chunk's).
  std::vector<double> carry_reference, carry_g, carry_rho, carry_g2;
  if (chunks > 1) {
    const int64_t items = batch * chunks * heads;
    std::vector<double> summary_reference(items), summary_g(items * head_dim), summary_rho(items);
    std::vector<double> summary_g2(has_state ? items * head_dim : 0);
    for_each_task<Scratch>(plan, batch, (chunks - 1) * heads, row_width,
                           [&](Scratch& t, int64_t b, int64_t lane_begin, int64_t lane_end) {
      for (int64_t l = lane_begin; l < lane_end; ++l) {  // chunks 1 .. C-1
        place(t, l - lane_begin, b, l / heads + 1, l % heads);
      }
      walk(std::false_type{}, t, lane_end - lane_begin, false);
      for (int64_t l = lane_begin; l < lane_end; ++l) {
        const int64_t j = l - lane_begin;
        const int64_t index = b * chunks * heads + l + heads;
        summary_reference[index] = t.reference[j];
        const acc_t* s_row = t.sum_g.data() + j * row_width;
        double* summary_row = summary_g.data() + index * head_dim;
        std::copy_n(s_row, head_dim, summary_row);
        summary_rho[index] = out_dot_sum(t, j, summary_row) - t.sum_q[j];
        if (has_state) {
          std::copy_n(t.sum_g2.data() + j * row_width, head_dim, summary_g2.data() + index * head_dim);
        }
      }
    });
    carry_reference.assign(items, negative_infinity<double>());
    carry_g.assign(items * head_dim, 0.0);
    carry_rho.assign(items, 0.0);
    carry_g2.assign(has_state ? items * head_dim : 0, 0.0);
    at::parallel_for(0, batch * heads, 64, [&](int64_t begin, int64_t end) {
      for (int64_t item = begin; item < end; ++item) {
        const int64_t b = item / heads;
        const int64_t h = item % heads;
        for (int64_t c = chunks - 1; c > 0; --c) {
          const int64_t index = (b * chunks + c) * heads + h;  // chunk c's summary and carry
          const int64_t previous = index - heads;               // chunk c - 1's carry
          const ReferenceFactors f = common_reference(summary_reference[index], carry_reference[index]);
          carry_reference[previous] = f.reference;
          carry_rho[previous] = f.factor_a * summary_rho[index] + f.factor_b * carry_rho[index];
          for (int64_t d = 0; d < head_dim; ++d) {
            carry_g[previous * head_dim + d] = f.factor_a * summary_g[index * head_dim + d] +
                f.factor_b * carry_g[index * head_dim + d];
          }
          if (has_state) {  // S2 holds e^(2 r): the factors squared
            const double a2 = f.factor_a * f.factor_a;
            const double b2 = f.factor_b * f.factor_b;
            for (int64_t d = 0; d < head_dim; ++d) {
              carry_g2[previous * head_dim + d] = a2 * summary_g2[index * head_dim + d] +
                  b2 * carry_g2[index * head_dim + d];
            }
          }
        }
      }
    });
  }

  // Phase 3 (the whole backward when unsplit): every chunk from its carry, writing ds and dv;
  // chunk 0 then holds the sums at the first token, for the state's out gradient, and each
  // chunk its share of the state's lse gradient, e^(L_0 - r) Z, [B, C, H].
  std::vector<double> state_shares(has_state ? batch * chunks * heads : 0);
  for_each_task<Scratch>(plan, batch, chunks * heads, row_width,
                         [&](Scratch& t, int64_t b, int64_t lane_begin, int64_t lane_end) {
    for (int64_t l = lane_begin; l < lane_end; ++l) {
      const int64_t j = l - lane_begin;
      const int64_t c = l / heads;
      place(t, j, b, c, l % heads);
      const int64_t index = b * chunks * heads + l;
      if (c + 1 < chunks && carry_reference[index] != negative_infinity<double>()) {
        // Q = o . S - P against S as the walk holds it (rounded to acc_t): the S rounding
        // then enters ds only times (v - o), where against the float64 S it entered whole.
        const double* carry_row = carry_g.data() + index * head_dim;
        t.reference[j] = carry_reference[index];
        acc_t* s_row = t.sum_g.data() + j * row_width;
        std::vector<double>& rounded = t.rounded_carry;
        for (int64_t d = 0; d < head_dim; ++d) {
          s_row[d] = static_cast<acc_t>(carry_row[d]);
          rounded[d] = static_cast<double>(s_row[d]);
        }
        t.sum_q[j] = out_dot_sum(t, j, rounded.data()) - carry_rho[index];
        if (has_state) {
          std::copy_n(carry_g2.data() + index * head_dim, head_dim, t.sum_g2.data() + j * row_width);
        }
      }
    }
    walk(std::true_type{}, t, lane_end - lane_begin, streaming);
    if (streaming) {
      stream_fence();
    }
    if (has_state) {
      for (int64_t l = lane_begin; l < lane_end; ++l) {
        const int64_t j = l - lane_begin;
        state_shares[b * chunks * heads + l] =
            exp_of_difference_wide<double>(*state_row(args.state_lse, b, l % heads), t.reference[j]) *
            t.sum_state[j];
      }
    }

    // The initial state as a token before the first: do_0 = f R_1 = e^(L_0 - r) S (dL_0:
    // below, from the chunks' shares).
    for (int64_t l = lane_begin; l < std::min(lane_end, heads); ++l) {  // chunk 0
      const int64_t j = l - lane_begin;
      const int64_t h = l;
      const acc_t* s_row = t.sum_g.data() + j * row_width;
      double* do0_row = grad_state_out + (b * heads + h) * head_dim;
      if (!has_state) {  // no state: nothing to differentiate (f = 0), whatever S holds
        std::fill_n(do0_row, head_dim, 0.0);
        grad_state_lse[b * heads + h] = 0;
        continue;
      }
      const acc_t f = exp_of_difference_wide<acc_t>(*state_row(args.state_lse, b, h), t.reference[j]);
      for (int64_t d = 0; d < head_dim; ++d) {
        do0_row[d] = static_cast<double>(f * s_row[d]);
      }
    }
  });
  if (has_state) {  // dL_0: the chunks' shares, in order (deterministic)
    for (int64_t b = 0; b < batch; ++b) {
      for (int64_t h = 0; h < heads; ++h) {
        double sum = 0;
        for (int64_t c = 0; c < chunks; ++c) {
          sum += state_shares[(b * chunks + c) * heads + h];
        }
        grad_state_lse[b * heads + h] = sum;
      }
    }
  }
}

}  // namespace

void scan_forward(const ForwardArgs& args) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, args.values.scalar_type(),
                                  "aaren_scan_forward_cpu", [&] { forward_typed<scalar_t>(args); });
}

void scan_backward(const BackwardArgs& args) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, args.values.scalar_type(),
                                  "aaren_scan_backward_cpu", [&] { backward_typed<scalar_t>(args); });
}

}  // namespace aaren::ops::cpu::CPU_CAPABILITY
