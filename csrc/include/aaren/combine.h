// The (lse, out) arithmetic of Aaren, shared by the CPU and CUDA kernels so that
// the CPU tests exercise the same formulas the GPU runs.
//
// A partial result over some tokens is (L, o): L the log-sum-exp of their scores,
// o the softmax-weighted mean of their values. Combining A (earlier) with B:
//     L = logaddexp(L_A, L_B);   o = o_A e^(L_A - L) + o_B e^(L_B - L)
// A token (s, v) is the partial result (s, v); the empty result is (-inf, 0). The
// kernels compute this combine in the unnormalized online-softmax form below.
#pragma once

#include <cmath>
#include <limits>
#include <type_traits>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define AAREN_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define AAREN_HOST_DEVICE inline
#endif

namespace aaren {

template <typename T>
AAREN_HOST_DEVICE T negative_infinity() {
  return -std::numeric_limits<T>::infinity();
}

// exp(x - y) for y >= x, where x = -inf means "nothing there" and gives exactly 0:
// -inf - (-inf) is NaN in IEEE arithmetic, so the difference is never formed then.
template <typename T>
AAREN_HOST_DEVICE T exp_of_difference(T x, T y) {
  return x == negative_infinity<T>() ? T(0) : std::exp(x - y);
}

// ---- Log-sums in float64 ---------------------------------------------------------
// A log-sum-exp L = m + log u of scores of large magnitude (a constant offset per head is
// enough: a key bias folds into one) loses log u when held in float32: at |m| ~ 1e4 its ulp
// is ~1e-3, a relative error of 1e-3 in every weight e^(s - L). So every L the kernels
// store or read (the state's, the per-token lse saved for the backward, chunk summaries)
// is float64, while the running maximum m stays in the accumulation type T: differences are
// taken in float64, exponentials in T (they are of moderate arguments). The forward's
// running sums are float64 too (below, "The forward's running sums").

// e^(x - y) in T for float64 x <= y (up to rounding), 0 when x = -inf ("nothing there").
// The difference, exact in float64, is split into hi (rounded to T) and lo (the rest, below
// an ulp of hi): e^(x - y) = e^hi (1 + lo). Rounding it to T instead would be a relative
// error of |x - y| ulps in the result (16 float32 eps at the backward's gap of 32).
// split_difference_wide gives (hi, lo); for x = -inf it gives (-inf, 0), so that
// e^hi (1 + lo) = 0 without forming -inf - (-inf). Kernels that take several exps as one
// vector (the CPU backward, backward_lanes.h) split here and finish as exp_of_difference_wide.
template <typename T>
struct SplitDifference {
  T hi;
  T lo;
};

template <typename T>
AAREN_HOST_DEVICE SplitDifference<T> split_difference_wide(double x, double y) {
  if (x == negative_infinity<double>()) {
    return {negative_infinity<T>(), T(0)};
  }
  const double difference = x - y;
  const T hi = static_cast<T>(difference);
  return {hi, static_cast<T>(difference - static_cast<double>(hi))};
}

template <typename T>
AAREN_HOST_DEVICE T exp_of_difference_wide(double x, double y) {
  const SplitDifference<T> split = split_difference_wide<T>(x, y);
  return std::exp(split.hi) * (T(1) + split.lo);
}

// L = m + log u in float64, -inf when u = 0 (nothing seen).
template <typename T>
AAREN_HOST_DEVICE double lse_of_wide(T running_max, double denominator) {
  return denominator == 0.0 ? negative_infinity<double>()
                            : static_cast<double>(running_max) + std::log(denominator);
}

// The online-softmax scalars (m, u): the running maximum in T, the denominator in float64.
// For a float64 log-sum L (a state, a chunk summary): m = L rounded to T, u = e^(L - m) in
// float64; (-inf, 0) for L = -inf. A state (L, o) enters a scan as (m, u, w = u o).
template <typename T>
struct MaxSum {
  T max;
  double sum;
};

template <typename T>
AAREN_HOST_DEVICE MaxSum<T> max_sum_of(double lse) {
  if (lse == negative_infinity<double>()) {
    return {negative_infinity<T>(), 0.0};
  }
  const T max = static_cast<T>(lse);
  return {max, std::exp(lse - static_cast<double>(max))};
}

// ---- The backward's Q ---------------------------------------------------------------
// The backward's reverse recurrences (docs/design.md, "Backward"), with g_i = dLoss/do_i,
// G_i = dLoss/dL_i and the gates a_i = e^(L_i - L_{i+1}) (a_N = 0):
//   R_i = g_i + a_i R_{i+1},   rho_i = (g_i . o_i - G_i) + a_i rho_{i+1},
//   ds_i = e^(s_i - L_i) (v_i . R_i - rho_i),   dL_0 = f (o_0 . R_1 - rho_1), f = e^(L_0 - L_1).
// v_i . R_i - rho_i = sum_j e^(L_i - L_j) (g_j . (v_i - o_j) + G_j) cancels two sums that
// grow as sqrt(N) where a token dominates the outputs after it (o_j ~ v_i). Both backwards
// keep instead Q_i = o_i . R_i - rho_i, whose steps are small where the outputs move little:
//   Q_i = a_i Q_{i+1} + q_term,  q_term = a_i (o_i - o_{i+1}) . R_{i+1} + G_i,
//   ds_i = e^(s_i - L_i) ((v_i - o_i) . R_i + Q_i)
// (and dL_0 = f (Q_1 + (o_0 - o_1) . R_1), which neither backward takes so: below, "The
// state's lse gradient").
// The CUDA backward runs these with its gates, taken in float64 (scan_backward.cu); the CPU
// backward holds R and Q against a reference r instead (S = e^(r - L_i) R_i, Q against it
// alike: the gate is 1 and G_i is weighted by e^(r - L_i); scan_kernel.cpp, "Backward"). Q is
// float64 in both (a scalar per sequence costs little, and it sums every G_i, which are
// float64).

// The constant of Q's affine step Q_i = gate Q_{i+1} + q_term: out_step_dot is
// (o_i - o_{i+1}) . R_{i+1} in the accumulation type, lse_term G_i (times e^(r - L_i)
// against a reference).
AAREN_HOST_DEVICE double q_term(double gate, double out_step_dot, double lse_term) {
  return gate * out_step_dot + lse_term;
}

// ds_i = e (dot + Q_i), e = e^(s_i - L_i) (or e^(s_i - r) against a reference) and
// dot = (v_i - o_i) . R_i; the sum in float64, rounded once.
template <typename acc_t>
AAREN_HOST_DEVICE acc_t score_gradient(acc_t e, double value_dot, double q) {
  return e * static_cast<acc_t>(value_dot + q);
}

// ---- The state's lse gradient -----------------------------------------------------
// dL_0 = sum_j f_j (G_j + g_j . (o_0 - o_j)), f_j = e^(L_0 - L_j), formed from the outputs
// (the Q form above), takes the rounding of every o_j (to the values' dtype) through
// o_0 - o_j, which is small where the gradient is small by cancellation: on one float32
// token 17x the tests' rule (tests/test_fuzz_ops.py). Unrolled, o_0 - o_j = sum_{i<=j}
// e^(s_i - L_j) (o_0 - v_i), so
//   dL_0 = sum_j f_j G_j + sum_i e^(L_0 + s_i) (o_0 - v_i) . sum_{j>=i} e^(-2 L_j) g_j,
// which reads the inputs v_i and not the outputs: the CPU backward keeps, against its
// reference r, S2 = sum_{j>=i} e^(2 (r - L_j)) g_j (S's recurrence with the weights squared)
// and Z = sum_{i} (e^(r - L_i) G_i + e^(s_i - r) (o_0 - v_i) . S2_i), so dL_0 = e^(L_0 - r) Z.
// Lowering r by a factor c multiplies S2 by c^2 and Z by c. All of it in float64, the
// weights too, whatever the values' dtype: in float32 (o_0 - v_i formed from o_0 split into
// hi + lo) the rule still failed on 36 of 2,000 random problems of 1-3 tokens, by up to 9.6x
// (an accumulation of float32 roundings of the terms), as another plain-PyTorch float32
// formulation fails it (91 of them, up to 6.9x); in float64, none. It costs the backward
// with a state (only) a float64 row per sequence (docs/performance.md). The CUDA backward
// takes the first form instead, with the o_j of a float64 forward (ops/cuda/scan_cuda.cpp),
// exact to float64 as these sums are.

// Z's term of one token: e (o_0 - v_i) . S2_i + w G_i, e = e^(s_i - r), w = e^(r - L_i).
AAREN_HOST_DEVICE double state_term(double e, double state_dot, double w, double grad_lse) {
  return e * state_dot + w * grad_lse;
}

// ---- The forward's running sums ---------------------------------------------------
// The denominator u = sum e^(s_i - m) is float64, and so is the numerator
// w = sum e^(s_i - m) v_i for float32 (and float64) values: their terms are the exps in the
// accumulation type, summed in float64, and out = w (1/u) is rounded once. Summed in float32,
// the sums' rounding, carried along the sequence, put several ulps of error into every out,
// and the backward, which takes the outs as they are, passed it on: the state's lse gradient
// sum_j e^(L_0 - L_j) (g_j . (o_0 - o_j) + G_j) broke the tests' rule on 20 of 300 random
// mixed problems (tests/scan_problems.py), by up to 3.4x; none now (docs/design.md,
// "Backward"). u alone in float64 made it worse where one token dominates (modelled: up to
// 9x, w / u no longer dividing sums rounded alike). The half types keep w in float32: their
// outputs round to 8 or 11 bits.
template <typename T, typename acc_t>
using numerator_type =
    std::conditional_t<std::is_same_v<T, float> || std::is_same_v<T, double>, double, acc_t>;

// ---- Streaming forms, for the sequential pass over tokens ---------------------
// The (lse, out) recurrence rounds lse at every token, and since out is renormalized
// with exp(L_{k-1} - L_k) the rounding drifts over long sequences. The kernels instead
// run FlashAttention's online softmax: (max m, denominator u = sum e^(s_i - m),
// numerator w = sum e^(s_i - m) v_i; the sums as above), rescaled only when the maximum
// rises, so that adding a token is a plain sum; out = w / u and lse = m + log u per token.

// Weights for a running (m, u, w) taking in a token with score s:
//   u <- weight_old * u + weight_new,  w <- weight_old * w + weight_new * v.
// Updates m. One of the two weights is exactly 1, so most tokens cost one exp.
template <typename T>
struct RescaleWeights {
  T weight_old;
  T weight_new;
};

template <typename T>
AAREN_HOST_DEVICE RescaleWeights<T> add_score(T& running_max, T score) {
  if (score <= running_max) {  // the usual case once a few tokens are in: one exp
    return {T(1), exp_of_difference(score, running_max)};
  }
  if (score > running_max) {  // a new maximum: rescale what was summed so far
    const T old_max = running_max;
    running_max = score;
    return {exp_of_difference(old_max, score), T(1)};
  }
  running_max = score + running_max;  // NaN in (either side), NaN out
  return {running_max, running_max};
}

// 1/u, or 0 while nothing has been seen (so out = 0, never 0/0).
template <typename T>
AAREN_HOST_DEVICE T reciprocal_or_zero(T denominator) {
  return denominator == T(0) ? T(0) : T(1) / denominator;
}

// 1/u of the float64 denominator in the numerator's type sum_t (rounded to it once where
// that is float32): out = w (1/u).
template <typename sum_t>
AAREN_HOST_DEVICE sum_t inverse_of_sum(double denominator) {
  return static_cast<sum_t>(reciprocal_or_zero(denominator));
}

// The backward sums run from the last token back: R_i = sum_{j>=i} e^(L_i - L_j) g_j and
// the like. They are kept as S = sum_{j>=i} e^(r - L_j) g_j against a reference r >= L_j,
// so that R_i = e^(L_i - r) S without a product of per-token gates. Going back, L falls;
// once r - L_i exceeds this gap the reference is lowered to L_i and the sums rescaled,
// so e^(r - L_j) stays below e^gap (far from overflow in float32).
template <typename T>
AAREN_HOST_DEVICE T rescale_gap() {
  return T(32);
}

// Lowers `reference` to `lse` (both float64 log-sums) if the gap is exceeded; returns the
// factor, in T, that the sums must be multiplied by (1 when nothing changed).
template <typename T>
AAREN_HOST_DEVICE T lower_reference(double& reference, double lse) {
  if (reference - lse <= static_cast<double>(rescale_gap<T>())) {
    return T(1);
  }
  const T factor = exp_of_difference_wide<T>(lse, reference);
  reference = lse;
  return factor;
}

// ---- Chunk summaries, for a sequence split into chunks --------------------------
// A chunk summarized from an empty start is the partial result (L, o) of its tokens, and
// consecutive chunks combine as any two partial results (the top of this file): the
// weights e^(L_A - L), e^(L_B - L) of the earlier and the later, and L = logaddexp(L_A, L_B).
// An empty side (L = -inf) takes weight 0 and the other side weight 1 exactly; NaN in
// either gives NaN. In float64: chunk summaries are combined once per chunk, not per token.
struct CombineWeights {
  double lse;
  double weight_a;
  double weight_b;
};

AAREN_HOST_DEVICE CombineWeights combine_weights(double lse_a, double lse_b) {
  if (lse_b == negative_infinity<double>()) {
    return {lse_a, 1.0, 0.0};
  }
  if (lse_a == negative_infinity<double>()) {
    return {lse_b, 0.0, 1.0};
  }
  const double top = lse_a > lse_b ? lse_a : lse_b;  // NaN in lse_a: top = lse_b, NaN below
  const double weight_a = std::exp(lse_a - top);
  const double weight_b = std::exp(lse_b - top);
  const double sum = weight_a + weight_b;
  return {top + std::log(sum), weight_a / sum, weight_b / sum};
}

// The backward's suffix sums (S, P above) of two runs of tokens, each held against its own
// reference r_own: S = sum e^(r_own - L_j) g_j is the same sum against r when multiplied by
// e^(r - r_own). Both move to the lower reference, so the factors are <= 1 and every term
// stays below e^gap (L rises along the sequence: the earlier run's reference is the lower).
// Returns the common reference and the two factors; an empty side (r = -inf) gets 0.
struct ReferenceFactors {
  double reference;
  double factor_a;
  double factor_b;
};

AAREN_HOST_DEVICE ReferenceFactors common_reference(double reference_a, double reference_b) {
  if (reference_b == negative_infinity<double>()) {
    return {reference_a, 1.0, 0.0};
  }
  if (reference_a == negative_infinity<double>()) {
    return {reference_b, 0.0, 1.0};
  }
  const double low = reference_a < reference_b ? reference_a : reference_b;
  return {low, std::exp(low - reference_a), std::exp(low - reference_b)};
}

}  // namespace aaren
