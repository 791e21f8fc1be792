// The (lse, out) arithmetic of Aaren, shared by the CPU and CUDA kernels so that
// the CPU tests exercise the same formulas the GPU runs.
//
// A partial result over some tokens is (L, o): L the log-sum-exp of their scores,
// o the softmax-weighted mean of their values. Combining A (earlier) with B:
//     L = logaddexp(L_A, L_B);   o = o_A e^(L_A - L) + o_B e^(L_B - L)
// A token (s, v) is the partial result (s, v); the empty result is (-inf, 0), so
// one RNN step is combine_weights(state lse, token score).
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

// log(e^x + e^y) without overflow; -inf stands for an empty partial result.
template <typename T>
AAREN_HOST_DEVICE T log_add_exp(T x, T y) {
  if (x != x || y != y) {
    return x + y;  // NaN in, NaN out (max/min would silently drop it)
  }
  const T hi = x > y ? x : y;
  const T lo = x > y ? y : x;
  if (lo == negative_infinity<T>()) {
    return hi;
  }
  return hi + std::log1p(std::exp(lo - hi));
}

// The merged lse and the weights of each side: o = weight_a * o_A + weight_b * o_B.
template <typename T>
struct CombineWeights {
  T lse;
  T weight_a;
  T weight_b;
};

template <typename T>
AAREN_HOST_DEVICE CombineWeights<T> combine_weights(T lse_a, T lse_b) {
  const T lse = log_add_exp(lse_a, lse_b);
  return {lse, exp_of_difference(lse_a, lse), exp_of_difference(lse_b, lse)};
}

}  // namespace aaren
