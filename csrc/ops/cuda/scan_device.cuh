// Warp-level building blocks of the CUDA scan kernels (scan_kernel.cu).
//
// The kernels give each warp a tile of 32 consecutive tokens at a time. The per-token
// scalars (scores, lse, gates) live one token per lane, so the scalar recurrences of a
// tile are warp scans over the lanes; the D-vector recurrences run per feature, lanes
// over features, stepping through the tile's tokens with the gates broadcast by shuffles.
// The arithmetic on (lse, out) values is that of aaren/combine.h, shared with the CPU.
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

// The forward step of one token, o' = keep * o + take * v, and the lse after it.
template <typename acc_t>
struct StepWeights {
  acc_t lse;
  acc_t keep;
  acc_t take;
};

// The forward weights of a tile, token `lane` on each lane, given the lse before the
// tile. The lse of every prefix is a log-sum-exp scan over the lanes (log_add_exp is
// associative; this only regroups the CPU's left-to-right sum). The weights then follow
// from consecutive lse values exactly as combine_weights forms them, so masked tokens
// and an all-masked prefix get exactly 0 (exp_of_difference never forms -inf - -inf).
// Lanes past the end of the sequence must pass score = -inf: they repeat the last lse.
template <typename acc_t>
__device__ __forceinline__ StepWeights<acc_t> tile_step_weights(acc_t score, acc_t carry_lse,
                                                                 int lane) {
  acc_t prefix = score;
#pragma unroll
  for (int offset = 1; offset < kWarpSize; offset *= 2) {
    const acc_t earlier = __shfl_up_sync(kFullMask, prefix, offset);
    if (lane >= offset) {
      prefix = log_add_exp(earlier, prefix);
    }
  }
  const acc_t lse = log_add_exp(carry_lse, prefix);
  acc_t previous = __shfl_up_sync(kFullMask, lse, 1);
  if (lane == 0) {
    previous = carry_lse;
  }
  return {lse, exp_of_difference(previous, lse), exp_of_difference(score, lse)};
}

// A reverse first-order linear recurrence over the lanes of a tile:
//     y_j = c_j + a_j * y_{j+1}  (j = 0..31),  y_32 = carry.
// Each lane holds the affine map y -> c + a y of its token; a suffix scan composes the
// maps (log-depth), and lane j returns y_j. Gates a <= 1 keep every product bounded;
// a gate of exactly 0 (a masked token) cuts off everything after it, as in the
// sequential recurrence. Lanes past the end of the sequence pass the identity (1, 0).
template <typename acc_t>
__device__ __forceinline__ acc_t reverse_linear_scan(acc_t a, acc_t c, acc_t carry, int lane) {
#pragma unroll
  for (int offset = 1; offset < kWarpSize; offset *= 2) {
    const acc_t a_later = __shfl_down_sync(kFullMask, a, offset);
    const acc_t c_later = __shfl_down_sync(kFullMask, c, offset);
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

// Sum over the warp, on every lane.
template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t x) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset >= 1; offset /= 2) {
    x += __shfl_xor_sync(kFullMask, x, offset);
  }
  return x;
}

}  // namespace aaren::ops::cuda
