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

// ---- Streaming forms, for the sequential pass over tokens ---------------------
// The (lse, out) recurrence rounds lse at every token, and since out is renormalized
// with exp(L_{k-1} - L_k) the rounding drifts over long sequences. The kernels instead
// run FlashAttention's online softmax: (max m, denominator u = sum e^(s_i - m),
// numerator w = sum e^(s_i - m) v_i), rescaled only when the maximum rises, so that
// adding a token is a plain sum; out = w / u and lse = m + log u per token.

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

// lse = m + log u, with u = 0 (nothing seen) meaning -inf.
template <typename T>
AAREN_HOST_DEVICE T lse_of(T running_max, T denominator) {
  return denominator == T(0) ? negative_infinity<T>() : running_max + std::log(denominator);
}

// 1/u, or 0 while nothing has been seen (so out = 0, never 0/0).
template <typename T>
AAREN_HOST_DEVICE T reciprocal_or_zero(T denominator) {
  return denominator == T(0) ? T(0) : T(1) / denominator;
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

// Lowers `reference` to `lse` if the gap is exceeded; returns the factor the sums
// must be multiplied by (1 when nothing changed).
template <typename T>
AAREN_HOST_DEVICE T lower_reference(T& reference, T lse) {
  if (reference - lse <= rescale_gap<T>()) {
    return T(1);
  }
  const T factor = std::exp(lse - reference);
  reference = lse;
  return factor;
}

}  // namespace aaren
