// A sequence's forward walk over its tokens, one lane at a time in plain scalar code, built
// from combine.h: entering a state, taking a token, leaving the state, and one token after a
// float64 state. The LibTorch CPU kernels share enter_state, leave_state and step_token (their
// walk over tokens is vectorized across lanes instead: cpu/forward_lanes.h); the ExecuTorch
// kernels (csrc/edge/), which cannot use ATen's vector types or thread pool, run the whole
// walk from here. Needs no libtorch: only combine.h and the standard library.
//
// The state (L, o) is float64 (docs/design.md, "The state"); a walk keeps the online-softmax
// triple (m, u, w) of combine.h: m in the accumulation type acc_t (float32 for float32
// values), u in float64 and w in sum_t, combine.h's numerator_type (float64 for float32 and
// float64 values, float32 for the half types): combine.h, "The forward's running sums".
#pragma once

#include <cstdint>

#include "aaren/combine.h"

namespace aaren {

// The running (m, u, w[0..D)) of one lane enters the state (L0, o0), or the empty state when
// state_lse is null: (m, u, u o0) with (m, u) = max_sum_of(L0).
template <typename acc_t, typename sum_t>
inline void enter_state(const double* state_lse, const double* state_out, int64_t head_dim,
                        acc_t& running_max, double& denominator, sum_t* numerator) {
  running_max = negative_infinity<acc_t>();
  denominator = 0.0;
  for (int64_t d = 0; d < head_dim; ++d) {
    numerator[d] = sum_t(0);
  }
  if (state_lse == nullptr) {
    return;
  }
  const MaxSum<acc_t> entering = max_sum_of<acc_t>(*state_lse);
  running_max = entering.max;
  denominator = entering.sum;
  if (entering.sum != 0.0) {
    for (int64_t d = 0; d < head_dim; ++d) {
      numerator[d] = static_cast<sum_t>(entering.sum * state_out[d]);
    }
  }
}

// The lane's (L, o) after its last token, unrounded: writes o = w / u in float64 to out_row and
// returns L = m + log u (-inf while nothing has been seen, and then o = 0).
template <typename acc_t, typename sum_t>
inline double leave_state(acc_t running_max, double denominator, const sum_t* numerator,
                          int64_t head_dim, double* out_row) {
  const double inverse = reciprocal_or_zero(denominator);
  for (int64_t d = 0; d < head_dim; ++d) {
    out_row[d] = static_cast<double>(numerator[d]) * inverse;
  }
  return lse_of_wide(running_max, denominator);
}

// One token (s, v) taken into the running (m, u, w): u <- w_old u + w_new (float64),
// w <- w_old w + w_new v (in sum_t), then writes the token's output w (1/u) (rounded to
// scalar_t) and returns its lse in float64.
template <typename scalar_t, typename acc_t, typename sum_t>
inline double take_token(scalar_t score, const scalar_t* value, int64_t head_dim,
                         acc_t& running_max, double& denominator, sum_t* numerator,
                         scalar_t* out_row) {
  const RescaleWeights<acc_t> w = add_score(running_max, static_cast<acc_t>(score));
  denominator = static_cast<double>(w.weight_old) * denominator + static_cast<double>(w.weight_new);
  const sum_t inverse = inverse_of_sum<sum_t>(denominator);
  const sum_t weight_old = static_cast<sum_t>(w.weight_old);
  const sum_t weight_new = static_cast<sum_t>(w.weight_new);
  for (int64_t d = 0; d < head_dim; ++d) {
    numerator[d] = weight_old * numerator[d] + weight_new * static_cast<sum_t>(value[d]);
    out_row[d] = static_cast<scalar_t>(numerator[d] * inverse);
  }
  return lse_of_wide(running_max, denominator);
}

// One token after the state (L0, o0) (a step, or a chunk of one token), in float64 against
// the float64 state whatever the values' dtype: float32 arithmetic at every step of a stream
// is a random walk (docs/design.md, "The state"). The state enters as (m, u, w) = (L0, 1, o0);
// L0 = -inf is the empty state. Writes the token's output (rounded to scalar_t) and the new
// state's out (float64); returns the new state's lse.
template <typename scalar_t>
inline double step_token(double state_lse, const double* state_out, scalar_t score,
                         const scalar_t* value, int64_t head_dim, scalar_t* out_row,
                         double* new_state_out) {
  double running_max = state_lse;
  const bool has_prefix = running_max != negative_infinity<double>();
  const RescaleWeights<double> w = add_score(running_max, static_cast<double>(score));
  const double denominator = w.weight_old * (has_prefix ? 1.0 : 0.0) + w.weight_new;
  const double inverse = reciprocal_or_zero(denominator);
  for (int64_t d = 0; d < head_dim; ++d) {
    const double numerator = (has_prefix ? w.weight_old * state_out[d] : 0.0) +
                             w.weight_new * static_cast<double>(value[d]);
    new_state_out[d] = numerator * inverse;
    out_row[d] = static_cast<scalar_t>(new_state_out[d]);
  }
  return lse_of_wide(running_max, denominator);
}

}  // namespace aaren
