// Warp-level building blocks of the CUDA scan kernels (scan_forward.cu, scan_backward.cu).
//
// The kernels give each warp a tile of 32 consecutive tokens at a time. The per-token
// scalars (scores, lse, gates) live one token per lane, so the scalar recurrences of a
// tile are warp scans over the lanes; the D-vector recurrences run per feature, lanes
// over features, stepping through the tile's tokens with the gates broadcast by shuffles.
// The arithmetic (the forward's online softmax, the backward's (lse, out) gates) is that
// of aaren/combine.h, shared with the CPU.
#pragma once

#include <cstdint>

#include "aaren/combine.h"

namespace aaren::ops::cuda {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;

// Widest access per lane: 16 bytes, at most 4 elements (4 float, 2 double, 4 half).
template <typename T>
constexpr int kMaxVec = sizeof(T) >= 8 ? 2 : 4;

// VEC consecutive features, moved as one aligned load or store.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T elem[VEC];
};

template <int VEC, typename T>
__device__ __forceinline__ Pack<T, VEC> load_pack(const T* ptr) {
  return *reinterpret_cast<const Pack<T, VEC>*>(ptr);
}

template <int VEC, typename T, typename acc_t>
__device__ __forceinline__ void store_pack(T* ptr, const acc_t (&x)[VEC]) {
  Pack<T, VEC> pack;
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    pack.elem[k] = static_cast<T>(x[k]);
  }
  *reinterpret_cast<Pack<T, VEC>*>(ptr) = pack;
}

// The scalars of the forward's online softmax (aaren/combine.h) over some tokens: their
// maximum score m and the denominator u = sum e^(s_i - m) (float64), as MaxSum. A token is
// (s, 1); a masked token (s = -inf) and the empty state are (-inf, 0); a float64 log-sum L (a
// state, a chunk summary) is max_sum_of(L) = (L rounded, e^(L - rounded)). The numerator
// w = sum e^(s_i - m) v_i is kept per feature; per token, out = w / u and lse = m + log u.

// A then B: m = max(m_A, m_B), u = u_A e^(m_A - m) + u_B e^(m_B - m), with the weights as
// add_score forms them: the side holding the maximum has weight exactly 1, -inf - -inf is
// never formed, and NaN on either side gives NaN. Associative up to rounding.
template <typename acc_t>
__device__ __forceinline__ MaxSum<acc_t> merge_max_sum(const MaxSum<acc_t>& a,
                                                       const MaxSum<acc_t>& b) {
  acc_t max = a.max;
  const RescaleWeights<acc_t> w = add_score(max, b.max);
  return {max,
          fma(static_cast<double>(w.weight_old), a.sum, static_cast<double>(w.weight_new) * b.sum)};
}

// The online softmax of a tile, token `lane` on each lane, from the state `carry` before
// the tile: `state` is (m, u) after the token, and the token's step of the numerator is
// w' = keep * w + take * v, keep = e^(m_before - m), take = u_token e^(m_token - m).
template <typename acc_t>
struct TileSoftmax {
  MaxSum<acc_t> state;
  acc_t keep;
  acc_t take;
};

// The states are an inclusive scan of merge_max_sum over the lanes: the maxima are exact
// (a max-scan) and the denominators only regroup the CPU's left-to-right sum, with no
// rounding carried from token to token beyond that of a sum. keep and take are exactly
// the CPU's: add_score of the token's score into the maximum before it, so one of them is
// 1, and masked tokens and an all-masked prefix get exactly (1, 0) (then out = 0 and
// lse = -inf via reciprocal_or_zero and lse_of_wide). Lanes past the end of the sequence
// must pass the empty token (-inf, 0): they repeat the last state. A token whose u is not 1
// (a chunk summary) scales its take by u.
template <typename acc_t>
__device__ __forceinline__ TileSoftmax<acc_t> tile_online_softmax(const MaxSum<acc_t>& token,
                                                                  const MaxSum<acc_t>& carry,
                                                                  int lane) {
  MaxSum<acc_t> prefix = token;
#pragma unroll
  for (int offset = 1; offset < kWarpSize; offset *= 2) {
    const MaxSum<acc_t> earlier{__shfl_up_sync(kFullMask, prefix.max, offset),
                                __shfl_up_sync(kFullMask, prefix.sum, offset)};
    if (lane >= offset) {
      prefix = merge_max_sum(earlier, prefix);
    }
  }
  const MaxSum<acc_t> state = merge_max_sum(carry, prefix);
  acc_t max_before = __shfl_up_sync(kFullMask, state.max, 1);
  if (lane == 0) {
    max_before = carry.max;
  }
  const RescaleWeights<acc_t> weights = add_score(max_before, token.max);
  return {state, weights.weight_old,
          static_cast<acc_t>(static_cast<double>(weights.weight_new) * token.sum)};
}

// A reverse first-order linear recurrence over the lanes of a tile:
//     y_j = c_j + a_j * y_{j+1}  (j = 0..31),  y_32 = carry.
// Each lane holds the affine map y -> c + a y of its token; a suffix scan composes the
// maps (log-depth), and lane j returns y_j. Gates a <= 1 keep every product bounded;
// a gate of exactly 0 (a masked token) cuts off everything after it, as in the
// sequential recurrence. Lanes past the end of the sequence pass the identity (1, 0).
template <typename T>
__device__ __forceinline__ T reverse_linear_scan(T a, T c, T carry, int lane) {
#pragma unroll
  for (int offset = 1; offset < kWarpSize; offset *= 2) {
    const T a_later = __shfl_down_sync(kFullMask, a, offset);
    const T c_later = __shfl_down_sync(kFullMask, c, offset);
    if (lane + offset < kWarpSize) {
      c = c + a * c_later;
      a = a * a_later;
    }
  }
  return c + a * carry;
}

// One step of group_token_sums: lanes pair up across lane bit HALF; each keeps half of
// the 2 HALF token sums it carries (the upper lane the upper half) and adds its
// partner's. HALF is a template parameter so that every index into x is a compile-time
// constant and x stays in registers.
template <int HALF, int TOKENS, typename acc_t>
__device__ __forceinline__ void token_sums_step(acc_t (&x)[TOKENS], int lane) {
  const bool upper = (lane & HALF) != 0;
#pragma unroll
  for (int i = 0; i < HALF; ++i) {
    // Select values, not elements: a select of two array elements is a select of
    // their addresses, which would put x in local memory.
    const acc_t low = x[i];
    const acc_t high = x[i + HALF];
    const acc_t send = upper ? low : high;
    const acc_t keep = upper ? high : low;
    x[i] = keep + __shfl_xor_sync(kFullMask, send, HALF);
  }
  if constexpr (HALF > 1) {
    token_sums_step<HALF / 2>(x, lane);
  }
}

// x[t] on every lane is the lane's share of a sum for token t of a group of TOKENS
// (a power of two <= 32). Returns, on lane l, the warp's sum for token l % TOKENS.
// A butterfly that halves the values each lane carries at every step, then adds across
// the remaining lane bits: TOKENS - 1 + log2(32 / TOKENS) shuffles for TOKENS sums, where
// a reduction per token takes 5 each. Fixed order, so deterministic. x is clobbered.
template <int TOKENS, typename acc_t>
__device__ __forceinline__ acc_t group_token_sums(acc_t (&x)[TOKENS], int lane) {
  static_assert(TOKENS >= 1 && TOKENS <= kWarpSize && (TOKENS & (TOKENS - 1)) == 0);
  if constexpr (TOKENS > 1) {
    token_sums_step<TOKENS / 2>(x, lane);
  }
  acc_t sum = x[0];
#pragma unroll
  for (int offset = TOKENS; offset < kWarpSize; offset *= 2) {
    sum += __shfl_xor_sync(kFullMask, sum, offset);
  }
  return sum;
}

}  // namespace aaren::ops::cuda
