// CUDA kernels of the scan, forward and backward. Same results as the CPU kernels
// (ops/cpu/scan_kernel.cpp), with the same arithmetic (aaren/combine.h).
//
// Both directions are first-order linear recurrences over the tokens of each (batch,
// head) sequence, with gates that depend only on per-token scalars:
//   forward   the online softmax (docs/design.md): running max m_k, denominator
//             u_k = sum e^(s_i - m_k) and, per feature, the unnormalized numerator
//             w_k = alpha_k w_{k-1} + beta_k v_k,  alpha_k = e^(m_{k-1} - m_k),
//             beta_k = e^(s_k - m_k) (one of them exactly 1); out_k = w_k / u_k and
//             L_k = m_k + log u_k. (The normalized form o_k = a_k o_{k-1} + b_k v_k with
//             a_k = e^(L_{k-1} - L_k) would round L at every token, and those roundings
//             accumulate in o.)
//   backward  R_i = g_i + a_i R_{i+1},  rho_i = (g_i . o_i - G_i) + a_i rho_{i+1},
//             a_i = e^(L_i - L_{i+1}) from the saved lse; dv_i = e^(s_i - L_i) R_i,
//             ds_i = e^(s_i - L_i) (v_i . R_i - rho_i).
//
// Work layout. A warp walks the tokens of one sequence (or one chunk of it) in tiles of
// 32: lane j holds token j's scalars, so the scalar recurrences of a tile are warp scans
// (scan_device.cuh: forward, a scan of the (m, u) merge, whose maxima are exact; backward,
// an affine suffix scan), and then every lane steps through the tile's tokens for its own
// features (VEC contiguous ones per access), the gates broadcast by shuffles. Values are
// loaded a batch of tokens ahead of their use to keep enough bytes in flight. Between
// tiles the forward carries (m, u) and w, so nothing is renormalized within a chunk.
//
// Chunks. When the sequences x feature tiles are too few warps to fill the GPU, the
// sequence is split into chunks, in three phases, with no inter-block waiting:
//   1. summarize: each chunk's own result from an empty start (forward: the (lse, out)
//      of its tokens, (m + log u, w / u); backward: R and rho at its first token with
//      nothing after it);
//   2. the summaries form a sequence of their own, with the same recurrence (a chunk is
//      one "token" with score = its lse and value = its out; backward: gate
//      e^(L_first(c) - L_first(c+1)), the product of the chunk's gates), scanned by the
//      same code, itself chunked when long;
//   3. scan: each chunk again, from the state its predecessor (forward) or successor
//      (backward) left, writing the outputs (the forward enters a state (L, o) as
//      (m, u, w) = (L, 1, o), or (-inf, 0, 0) for L = -inf, like the initial state).
// Phases 1 and 3 both read the chunk, so a split pass moves 1.5x the bytes of a single
// one: it is used only when a single pass would leave the GPU mostly idle.
//
// Backward reductions over the features (g.o for rho, v.R for ds) are per token; a
// block of up to 8 warps covers all the features of a sequence (each lane 1 or 4 slots
// of VEC features). Each warp sums its lanes' shares of 8 tokens at a time with a
// butterfly that leaves token t's sum on lane t (group_token_sums), then warp 0 adds the
// warps' sums from shared memory, one barrier per tile. Fixed order: deterministic, no
// atomics.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <climits>
#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include "aaren/combine.h"
#include "ops/cuda/scan_device.cuh"
#include "ops/scan.h"

namespace aaren::ops::cuda {
namespace {

// ---- Problem description shared by host and device -------------------------------

// Sizes of one scan problem and its split into chunks: chunk c holds the tokens
// [c chunk_len, min((c + 1) chunk_len, length)).
struct Shape {
  int64_t batch;
  int64_t length;
  int64_t heads;
  int64_t dim;
  int64_t chunk_len;
  int64_t num_chunks;

  // Offsets into contiguous [B, N, H] and [B, C, H] tensors (times dim for [.., D]).
  __host__ __device__ int64_t token_index(int64_t b, int64_t n, int64_t h) const {
    return (b * length + n) * heads + h;
  }
  __host__ __device__ int64_t chunk_index(int64_t b, int64_t c, int64_t h) const {
    return (b * num_chunks + c) * heads + h;
  }
  __device__ int64_t chunk_end(int64_t chunk) const {
    return std::min(chunk * chunk_len + chunk_len, length);
  }
};

// A [B, N, H] or [B, N, H, D] tensor with arbitrary strides over B, N and H (features,
// if any, contiguous). [B, H] tensors use it with stride_n unused.
template <typename T>
struct Strided {
  T* data;
  int64_t stride_b;
  int64_t stride_n;
  int64_t stride_h;

  __device__ T* row(int64_t b, int64_t h) const {
    return data + b * stride_b + h * stride_h;
  }
};

// Views of the operator's tensors: sequences [B, N, H(, D)] and states [B, H(, D)].
template <typename T>
Strided<T> sequence_view(T* data, const at::Tensor& t) {
  return {data, t.stride(0), t.stride(1), t.stride(2)};
}

template <typename T>
Strided<T> state_view(T* data, const at::Tensor& t) {
  return {data, t.stride(0), 0, t.stride(1)};
}

// A contiguous [B, N, H, D] tensor (or [B, N, H] with dim = 1).
template <typename T>
Strided<T> contiguous(T* data, int64_t length, int64_t heads, int64_t dim) {
  return {data, length * heads * dim, heads * dim, dim};
}

// score_t is the type of the scores: T on level 0, float64 on the levels of chunk
// summaries (whose "scores" are the chunks' log-sums, float64 as every stored lse).
// state_t is the type of the state's out (float64, ops/scan.h).
template <typename T, typename score_t, typename state_t>
struct ForwardParams {
  using acc_t = at::opmath_type<T>;
  Shape shape;
  int64_t dtiles;  // warps per (sequence, chunk), each over 32 * VEC features
  Strided<const score_t> scores;  // [B, N, H]
  Strided<const T> values;        // [B, N, H, D]
  // The state before the first token; state_lse.data == nullptr is the empty state.
  Strided<const double> state_lse;  // [B, H]
  Strided<const state_t> state_out; // [B, H, D]
  // Scan, chunk c > 0: the state after chunk c - 1, [B, C, H(, D)] contiguous.
  const double* carry_lse;
  const acc_t* carry_out;
  // Scan: out [B, N, H, D] and lse [B, N, H], contiguous; final_out [B, H, D] (level 0
  // only, else nullptr): the unrounded out after the last token.
  T* out;
  double* lse;
  state_t* final_out;
  // Summarize: (lse, out) of each chunk's tokens alone, [B, C, H(, D)] contiguous.
  double* summary_lse;
  acc_t* summary_out;

  __host__ __device__ int64_t num_items() const {
    return shape.batch * shape.num_chunks * shape.heads * dtiles;
  }
};

// T is the type of the vectors g (and, on level 0, of scores, values and out): the
// input dtype on level 0, the accumulation type on the levels of chunk summaries.
template <typename T, typename state_t>
struct BackwardParams {
  using acc_t = at::opmath_type<T>;
  Shape shape;
  Strided<const double> lse;  // [B, N, H]: the gates a_i = e^(L_i - L_{i+1})
  Strided<const T> grad;      // g_i, [B, N, H, D]; data == nullptr reads as zeros
  // Level 0.
  Strided<const double> grad_lse;  // G_i, [B, N, H]; data == nullptr reads as zeros
  Strided<const T> scores;         // [B, N, H]
  Strided<const T> values;         // [B, N, H, D]
  const T* out;                    // [B, N, H, D] contiguous
  Strided<const double> state_lse;   // [B, H], data == nullptr: empty state
  Strided<const state_t> state_out;  // [B, H, D]
  double* grad_state_lse;            // [B, H] contiguous
  state_t* grad_state_out;           // [B, H, D] contiguous, any alignment (per element)
  // Summary levels: each chunk's rho (the scalar input of the rho recurrence), [B, N, H].
  const acc_t* rho_in;
  // Scan, chunk c < C - 1: R and rho at the first token of chunk c + 1, [B, C, H(, D)].
  const acc_t* carry_R;
  const acc_t* carry_rho;
  // Scan outputs, contiguous: level 0 grad_values [B, N, H, D] and grad_scores [B, N, H];
  // summary levels R and rho at every token.
  T* vec_out;
  T* scalar_out;
  // Summarize: R and rho at each chunk's first token, from nothing after the chunk.
  acc_t* summary_R;
  acc_t* summary_rho;
};

// ---- Kernels ----------------------------------------------------------------------

constexpr int kForwardWarps = 4;  // independent warps per block
constexpr int kForwardThreads = kForwardWarps * kWarpSize;
constexpr int kBackwardMaxWarps = 8;  // warps sharing one sequence's features
constexpr int kBackwardMaxThreads = kBackwardMaxWarps * kWarpSize;

// One warp per (sequence, chunk, feature tile), running the online softmax over the
// chunk's tokens: (m, u) per tile by tile_online_softmax (every dtile warp of a sequence
// computes the same scalars), w per feature. kSummarize: phase 1, the chunk from the
// empty state, writing only its final (lse, out); otherwise the chunk from its carried-in
// state, writing out = w / u and lse = m + log u for every token.
template <typename T, typename score_t, typename state_t, int VEC, bool kSummarize>
__global__ void __launch_bounds__(kForwardThreads, 4)
    forward_chunk_kernel(const ForwardParams<T, score_t, state_t> p) {
  using acc_t = at::opmath_type<T>;
  // Tokens whose values are loaded ahead of use: 32 to 128 bytes in flight per lane
  // (at most 16 tokens, 8 of an 8-byte type: more than that spills registers, since each
  // token's three broadcast weights are held alongside its values).
  constexpr int kBatch = std::min(sizeof(T) >= 8 ? 8 : 16, kWarpSize / VEC);

  const int lane = threadIdx.x % kWarpSize;
  const int64_t item =
      static_cast<int64_t>(blockIdx.x) * kForwardWarps + threadIdx.x / kWarpSize;
  if (item >= p.num_items()) {
    return;  // a whole warp: everything below is warp-synchronous
  }
  const Shape& shape = p.shape;
  const int64_t dtile = item % p.dtiles;
  int64_t rest = item / p.dtiles;
  const int64_t h = rest % shape.heads;
  rest /= shape.heads;
  const int64_t chunk = rest % shape.num_chunks;
  const int64_t b = rest / shape.num_chunks;
  const int64_t n_begin = chunk * shape.chunk_len;
  const int64_t n_end = shape.chunk_end(chunk);
  const int64_t d = (dtile * kWarpSize + lane) * VEC;
  const bool active = d < shape.dim;  // VEC divides dim: a lane's features are all in

  // The online softmax before the chunk's first token: (m, u) and this lane's numerators
  // w. The state (L0, o0) (chunk 0) or the carry from the previous chunks enters as
  // (m, u, u o0) with (m, u) = max_sum_of(L0), the empty one (L0 = -inf) as (-inf, 0, 0).
  MaxSum<acc_t> carry{negative_infinity<acc_t>(), acc_t(0)};
  acc_t w[VEC];
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    w[k] = acc_t(0);
  }
  if constexpr (!kSummarize) {
    if (chunk == 0) {
      if (p.state_lse.data != nullptr) {
        carry = max_sum_of<acc_t>(*p.state_lse.row(b, h));
        if (active && carry.sum != acc_t(0)) {
          const state_t* row = p.state_out.row(b, h) + d;  // any alignment: per element
#pragma unroll
          for (int k = 0; k < VEC; ++k) {
            w[k] = static_cast<acc_t>(carry.sum * row[k]);
          }
        }
      }
    } else {
      const int64_t index = shape.chunk_index(b, chunk - 1, h);
      carry = max_sum_of<acc_t>(p.carry_lse[index]);
      if (active && carry.sum != acc_t(0)) {
        const Pack<acc_t, VEC> carried = load_pack<VEC>(p.carry_out + index * shape.dim + d);
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          w[k] = carry.sum * carried.elem[k];
        }
      }
    }
  }

  const score_t* score_row = p.scores.row(b, h);
  const T* value_row = p.values.row(b, h) + d;
  for (int64_t tile = n_begin; tile < n_end; tile += kWarpSize) {
    const int count = static_cast<int>(std::min<int64_t>(kWarpSize, n_end - tile));
    const int64_t n = tile + lane;
    // A token (s, 1) on level 0; a chunk summary's float64 lse as max_sum_of(lse).
    MaxSum<acc_t> token{negative_infinity<acc_t>(), acc_t(0)};
    if (lane < count) {
      const score_t score = score_row[n * p.scores.stride_n];
      if constexpr (std::is_same_v<score_t, double> && !std::is_same_v<acc_t, double>) {
        token = max_sum_of<acc_t>(score);
      } else {
        const acc_t s = static_cast<acc_t>(score);
        token = {s, s == negative_infinity<acc_t>() ? acc_t(0) : acc_t(1)};
      }
    }
    const TileSoftmax<acc_t> t = tile_online_softmax(token, carry, lane);
    acc_t inverse = 0;  // 1 / u after token `lane`
    if constexpr (!kSummarize) {
      if (dtile == 0 && lane < count) {
        p.lse[shape.token_index(b, n, h)] = lse_of_wide(t.state.max, t.state.sum);
      }
      inverse = reciprocal_or_zero(t.state.sum);
    }
    carry = {__shfl_sync(kFullMask, t.state.max, kWarpSize - 1),
             __shfl_sync(kFullMask, t.state.sum, kWarpSize - 1)};

    for (int first = 0; first < count; first += kBatch) {
      Pack<T, VEC> v[kBatch];
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        if (active && first + u < count) {
          v[u] = load_pack<VEC>(value_row + (tile + first + u) * p.values.stride_n);
        }
      }
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        const acc_t keep = __shfl_sync(kFullMask, t.keep, first + u);
        const acc_t take = __shfl_sync(kFullMask, t.take, first + u);
        acc_t scale = 0;
        if constexpr (!kSummarize) {
          scale = __shfl_sync(kFullMask, inverse, first + u);
        }
        if (active && first + u < count) {
          acc_t o[VEC];
#pragma unroll
          for (int k = 0; k < VEC; ++k) {
            w[k] = fma(keep, w[k], take * static_cast<acc_t>(v[u].elem[k]));
            o[k] = w[k] * scale;
          }
          if constexpr (!kSummarize) {
            store_pack<VEC>(p.out + shape.token_index(b, tile + first + u, h) * shape.dim + d, o);
          }
        }
      }
    }
  }

  if constexpr (kSummarize) {
    // The chunk as one (lse, out) pair: m + log u and w / u.
    const int64_t index = shape.chunk_index(b, chunk, h);
    if (dtile == 0 && lane == 0) {
      p.summary_lse[index] = lse_of_wide(carry.max, carry.sum);
    }
    if (active) {
      const acc_t inverse = reciprocal_or_zero(carry.sum);
      acc_t o[VEC];
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        o[k] = w[k] * inverse;
      }
      store_pack<VEC>(p.summary_out + index * shape.dim + d, o);
    }
  } else {
    // The state's out after the last token, unrounded: w / u of the last chunk.
    if (p.final_out != nullptr && chunk + 1 == shape.num_chunks && active) {
      const state_t inverse = reciprocal_or_zero(static_cast<state_t>(carry.sum));
      state_t* row = p.final_out + (b * shape.heads + h) * shape.dim + d;  // per element
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        row[k] = static_cast<state_t>(w[k]) * inverse;
      }
    }
  }
}

// One block per (sequence, chunk); its warps (blockDim.x / 32 of them, at most 8) cover
// the features, lane `lane` of warp `warp` the VEC features at
// ((slot * warps + warp) * 32 + lane) * VEC for each of its SLOTS slots. Tokens are
// walked from the chunk's last to its first.
//   kLevel0: the sequence of tokens (g = grad_out, rho input g.o - G, outputs dv, ds and
//            the state gradients); otherwise a sequence of chunk summaries (g = chunk R,
//            rho input = chunk rho, outputs R and rho per token).
//   kSummarize: phase 1, from nothing after the chunk, writing R and rho at its first token.
template <typename T, typename state_t, int VEC, int SLOTS, bool kLevel0, bool kSummarize>
__global__ void __launch_bounds__(kBackwardMaxThreads, 2)
    backward_chunk_kernel(const BackwardParams<T, state_t> p) {
  using acc_t = at::opmath_type<T>;
  constexpr int kGroup = 8;  // tokens per warp reduction of the feature sums
  // Tokens loaded ahead, three loads each: kBatch * VEC * SLOTS = 32 bytes of
  // accumulators (8 float, 4 double) per load stream.
  constexpr int kBatch = std::max<int>(1, 32 / (VEC * SLOTS * sizeof(acc_t)));
  static_assert(kGroup % kBatch == 0 && kWarpSize % kGroup == 0);
  constexpr bool kNeedGO = kLevel0;                  // g.o, for rho
  constexpr bool kNeedVR = kLevel0 && !kSummarize;  // v.R, for ds

  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int warps = blockDim.x / kWarpSize;
  const Shape& shape = p.shape;
  int64_t rest = blockIdx.x;
  const int64_t h = rest % shape.heads;
  rest /= shape.heads;
  const int64_t chunk = rest % shape.num_chunks;
  const int64_t b = rest / shape.num_chunks;
  const int64_t n_begin = chunk * shape.chunk_len;
  const int64_t n_end = shape.chunk_end(chunk);

  int64_t d[SLOTS];
  bool active[SLOTS];
#pragma unroll
  for (int s = 0; s < SLOTS; ++s) {
    d[s] = ((static_cast<int64_t>(s) * warps + warp) * kWarpSize + lane) * VEC;
    active[s] = d[s] < shape.dim;
  }

  // Level 0 with a state: values and outputs are read shifted by o_0 (rounded_state_out in
  // aaren/combine.h), so that dL_0 = -f rho'_1 needs no cancelling dot product.
  acc_t shift[SLOTS][VEC];
#pragma unroll
  for (int s = 0; s < SLOTS; ++s) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      shift[s][k] = acc_t(0);
    }
  }
  if constexpr (kLevel0) {
    if (p.state_lse.data != nullptr) {
      const state_t* state_row = p.state_out.row(b, h);  // any alignment: per element
#pragma unroll
      for (int s = 0; s < SLOTS; ++s) {
        if (active[s]) {
#pragma unroll
          for (int k = 0; k < VEC; ++k) {
            shift[s][k] = rounded_state_out<T, acc_t>(state_row[d[s] + k]);
          }
        }
      }
    }
  }

  // R and rho after the chunk's last token (rho is tracked by warp 0 only).
  acc_t R[SLOTS][VEC];
  acc_t rho = 0;
#pragma unroll
  for (int s = 0; s < SLOTS; ++s) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      R[s][k] = acc_t(0);
    }
  }
  if constexpr (!kSummarize) {
    if (chunk + 1 < shape.num_chunks) {
      const int64_t index = shape.chunk_index(b, chunk + 1, h);
      rho = p.carry_rho[index];
#pragma unroll
      for (int s = 0; s < SLOTS; ++s) {
        if (active[s]) {
          const Pack<acc_t, VEC> carry = load_pack<VEC>(p.carry_R + index * shape.dim + d[s]);
#pragma unroll
          for (int k = 0; k < VEC; ++k) {
            R[s][k] = carry.elem[k];
          }
        }
      }
    }
  }

  const double* lse_row = p.lse.row(b, h);
  const T* grad_row = p.grad.data == nullptr ? nullptr : p.grad.row(b, h);
  const T* score_row = nullptr;
  const T* value_row = nullptr;
  const T* out_row = nullptr;
  const double* grad_lse_row = nullptr;
  if constexpr (kLevel0) {
    score_row = p.scores.row(b, h);
    value_row = p.values.row(b, h);
    out_row = p.out + (b * shape.length * shape.heads + h) * shape.dim;  // token stride H D
    grad_lse_row = p.grad_lse.data == nullptr ? nullptr : p.grad_lse.row(b, h);
  }
  const int64_t out_stride_n = shape.heads * shape.dim;

  // Per-warp token sums, [2 buffers][2 sums][warps][32]. Double buffering lets the next
  // tile write while warp 0 still reads: one barrier per tile.
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  acc_t* const partials = reinterpret_cast<acc_t*>(shared_bytes);
  int buffer = 0;

  const int64_t tiles = (n_end - n_begin + kWarpSize - 1) / kWarpSize;
  for (int64_t t = tiles - 1; t >= 0; --t) {
    const int64_t tile = n_begin + t * kWarpSize;
    const int count = static_cast<int>(std::min<int64_t>(kWarpSize, n_end - tile));
    const int64_t n = tile + lane;
    const bool valid = lane < count;

    // Token `lane`'s scalars: the gate to the next token (0 after the last; the identity
    // map (1, 0) on lanes past the chunk), the weight e^(s - L) of its value, G or its rho.
    acc_t gate = 1;
    acc_t weight = 0;
    acc_t rho_input = 0;
    if (valid) {
      // Differences of log-sums in float64 (combine.h), exponentials in acc_t.
      const double lse_n = lse_row[n * p.lse.stride_n];
      gate = n + 1 < shape.length
          ? exp_of_difference_wide<acc_t>(lse_n, lse_row[(n + 1) * p.lse.stride_n])
          : acc_t(0);
      if constexpr (kLevel0) {
        if constexpr (kNeedVR) {
          weight = exp_of_difference_wide<acc_t>(
              static_cast<double>(static_cast<acc_t>(score_row[n * p.scores.stride_n])), lse_n);
        }
        rho_input = grad_lse_row == nullptr
            ? acc_t(0)
            : -static_cast<acc_t>(grad_lse_row[n * p.grad_lse.stride_n]);
      } else {
        rho_input = p.rho_in[shape.token_index(b, n, h)];
      }
    }

    // The feature recurrence over the tile, last token first, in groups of kGroup
    // tokens: per group, this lane's share of each token's g.o and v.R, summed over the
    // warp at the end of the group into go/vr of the lane whose index is the token's.
    acc_t go = 0;
    acc_t vr = 0;
    for (int group_first = (count - 1) / kGroup * kGroup; group_first >= 0;
         group_first -= kGroup) {
      acc_t go_part[kGroup];
      acc_t vr_part[kGroup];
#pragma unroll
      for (int t = 0; t < kGroup; ++t) {
        go_part[t] = acc_t(0);
        vr_part[t] = acc_t(0);
      }
#pragma unroll
      for (int batch = kGroup / kBatch - 1; batch >= 0; --batch) {
        const int first = group_first + batch * kBatch;
        if (first >= count) {
          continue;  // warp-uniform: only the last tile of a sequence is partial
        }
        Pack<T, VEC> g[kBatch][SLOTS];
        Pack<T, VEC> o[kBatch][SLOTS];
        Pack<T, VEC> v[kBatch][SLOTS];
#pragma unroll
        for (int u = 0; u < kBatch; ++u) {
          const int64_t token = tile + first + u;
#pragma unroll
          for (int s = 0; s < SLOTS; ++s) {
            if (first + u < count && active[s]) {
              if (grad_row != nullptr) {
                g[u][s] = load_pack<VEC>(grad_row + token * p.grad.stride_n + d[s]);
                if constexpr (kNeedGO) {
                  o[u][s] = load_pack<VEC>(out_row + token * out_stride_n + d[s]);
                }
              }
              if constexpr (kNeedVR) {
                v[u][s] = load_pack<VEC>(value_row + token * p.values.stride_n + d[s]);
              }
            }
          }
        }
#pragma unroll
        for (int u = kBatch - 1; u >= 0; --u) {
          const int j = first + u;
          const acc_t a = __shfl_sync(kFullMask, gate, j);
          const acc_t e = kNeedVR ? __shfl_sync(kFullMask, weight, j) : acc_t(0);
          if (j >= count) {
            continue;
          }
          const int64_t token = tile + j;
          acc_t go_share = 0;
          acc_t vr_share = 0;
#pragma unroll
          for (int s = 0; s < SLOTS; ++s) {
            if (!active[s]) {
              continue;
            }
            acc_t dv[VEC];
#pragma unroll
            for (int k = 0; k < VEC; ++k) {
              const acc_t gk =
                  grad_row == nullptr ? acc_t(0) : static_cast<acc_t>(g[u][s].elem[k]);
              R[s][k] = fma(a, R[s][k], gk);
              if constexpr (kNeedGO) {
                if (grad_row != nullptr) {
                  go_share = fma(gk, static_cast<acc_t>(o[u][s].elem[k]) - shift[s][k], go_share);
                }
              }
              if constexpr (kNeedVR) {
                vr_share = fma(static_cast<acc_t>(v[u][s].elem[k]) - shift[s][k], R[s][k], vr_share);
                dv[k] = e * R[s][k];
              }
            }
            if constexpr (!kSummarize) {
              T* dst = p.vec_out + shape.token_index(b, token, h) * shape.dim + d[s];
              if constexpr (kLevel0) {
                store_pack<VEC>(dst, dv);
              } else {
                store_pack<VEC>(dst, R[s]);
              }
            }
          }
          go_part[batch * kBatch + u] = go_share;
          vr_part[batch * kBatch + u] = vr_share;
        }
      }
      // Lane l holds the sums of token l % kGroup of the group: keep them on the lanes
      // of the group's own tokens (group_first is a multiple of kGroup).
      const bool mine = (lane & ~(kGroup - 1)) == group_first;
      if constexpr (kNeedGO) {
        const acc_t sum = group_token_sums(go_part, lane);
        go = mine ? sum : go;
      }
      if constexpr (kNeedVR) {
        const acc_t sum = group_token_sums(vr_part, lane);
        vr = mine ? sum : vr;
      }
    }

    // Token sums over all the features, on lane j for token j of warp 0.
    if constexpr (kLevel0) {
      if (warps > 1) {
        acc_t* const sums = partials + buffer * 2 * warps * kWarpSize;
        sums[warp * kWarpSize + lane] = go;
        if constexpr (kNeedVR) {
          sums[(warps + warp) * kWarpSize + lane] = vr;
        }
        __syncthreads();
        if (warp == 0) {
          go = 0;
          vr = 0;
          for (int w = 0; w < warps; ++w) {
            go += sums[w * kWarpSize + lane];
            if constexpr (kNeedVR) {
              vr += sums[(warps + w) * kWarpSize + lane];
            }
          }
        }
        buffer ^= 1;
      }
      if (valid) {
        rho_input += go;  // g.o - G
      }
    }

    // rho over the tile from the one after it; ds (level 0) or rho (summaries) out.
    if (warp == 0) {
      const acc_t rho_n = reverse_linear_scan(gate, rho_input, rho, lane);
      if constexpr (!kSummarize) {
        if (valid) {
          if constexpr (kLevel0) {
            p.scalar_out[shape.token_index(b, n, h)] = static_cast<T>(weight * (vr - rho_n));
          } else {
            p.scalar_out[shape.token_index(b, n, h)] = rho_n;
          }
        }
      }
      rho = __shfl_sync(kFullMask, rho_n, 0);
    }
  }

  if constexpr (kSummarize) {
    const int64_t index = shape.chunk_index(b, chunk, h);
#pragma unroll
    for (int s = 0; s < SLOTS; ++s) {
      if (active[s]) {
        store_pack<VEC>(p.summary_R + index * shape.dim + d[s], R[s]);
      }
    }
    if (warp == 0 && lane == 0) {
      p.summary_rho[index] = rho;
    }
  } else if constexpr (kLevel0) {
    if (chunk != 0) {
      return;  // block-uniform
    }
    // The initial state as a token before the first: f = e^(L_0 - L_1) (0 for the empty
    // state), do_0 = f R_1 and, with outputs shifted by o_0, dL_0 = f ((o_0 - o_0) . R_1 -
    // rho'_1) = -f rho'_1, with R and rho now at token 0.
    const bool has_state = p.state_lse.data != nullptr;
    const acc_t f = exp_of_difference_wide<acc_t>(
        has_state ? *p.state_lse.row(b, h) : negative_infinity<double>(), lse_row[0]);
#pragma unroll
    for (int s = 0; s < SLOTS; ++s) {
      if (!active[s]) {
        continue;
      }
      state_t* grad_row = p.grad_state_out + (b * shape.heads + h) * shape.dim + d[s];
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        grad_row[k] = static_cast<state_t>(f * R[s][k]);
      }
    }
    if (warp == 0 && lane == 0) {
      p.grad_state_lse[b * shape.heads + h] = -f * rho;
    }
  }
}

// ---- Host side: geometry, chunking, launches ----------------------------------------

int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

template <typename Params>
using KernelFn = void (*)(Params);

template <typename Params>
void launch(KernelFn<Params> kernel, int64_t blocks, int threads, size_t shared,
            const Params& params) {
  if (blocks == 0) {
    return;
  }
  TORCH_CHECK(blocks <= INT_MAX, "aaren (CUDA): problem too large for one launch (", blocks,
              " blocks)");
  kernel<<<static_cast<unsigned>(blocks), threads, shared, at::cuda::getCurrentCUDAStream()>>>(
      params);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Warps of `kernel` resident on the whole GPU at once (registers and shared memory
// decide how many blocks fit on an SM).
template <typename Params>
int64_t resident_warps(KernelFn<Params> kernel, int threads, size_t shared) {
  int blocks_per_sm = 0;
  C10_CUDA_CHECK(
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks_per_sm, kernel, threads, shared));
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  return std::max(1, blocks_per_sm) * int64_t{threads / kWarpSize} * sms;
}

// Tokens per chunk: a multiple of the 32-token tile, and long enough that the chunk
// summaries (one D-vector per chunk) stay a small fraction of the traffic.
constexpr int64_t kMinChunkLen = 64;

struct ChunkPlan {
  int64_t chunk_len;
  int64_t num_chunks;
};

// `warps`: the warps of one pass over whole sequences; `capacity()`: how many warps the
// GPU holds at once. A split pass moves 1.5x the bytes, so split only when a single pass
// would fill less than half of the GPU; then make as many chunks as fill it in one wave.
// Short sequences (a step: N = 1) never ask for the capacity.
template <typename Capacity>
ChunkPlan plan_chunks(int64_t length, int64_t warps, const Capacity& capacity) {
  if (length < 2 * kMinChunkLen) {
    return {length, 1};
  }
  const int64_t resident = capacity();
  if (2 * warps >= resident) {
    return {length, 1};
  }
  const int64_t wanted = resident / warps;  // >= 2
  const int64_t chunk_len =
      std::max(kMinChunkLen, ceil_div(ceil_div(length, wanted), kWarpSize) * kWarpSize);
  const int64_t num_chunks = ceil_div(length, chunk_len);
  return num_chunks > 1 ? ChunkPlan{chunk_len, num_chunks} : ChunkPlan{length, 1};
}

// A tensor read or written with VEC-wide accesses along its contiguous features.
struct VecOperand {
  const void* data;  // nullptr: not used
  int64_t element_size;
  std::array<int64_t, 3> strides;  // over B, N, H (in elements)
};

// Features per access: among the widths alignment allows, the narrowest that covers the
// features with the fewest warps (D = 64 float: 32 lanes x 2, not 16 lanes x 4; D = 96
// half: 24 lanes x 4, one warp rather than two).
template <typename T>
int pick_vec(int64_t dim, std::initializer_list<VecOperand> operands) {
  const auto fits = [&](int width) {
    if (dim % width != 0) {
      return false;
    }
    for (const VecOperand& operand : operands) {
      if (operand.data == nullptr) {
        continue;
      }
      if (reinterpret_cast<uintptr_t>(operand.data) % (width * operand.element_size) != 0) {
        return false;
      }
      for (const int64_t stride : operand.strides) {
        if (stride % width != 0) {
          return false;
        }
      }
    }
    return true;
  };
  const auto warps = [&](int width) { return ceil_div(dim, kWarpSize * width); };
  int best = 1;
  for (int width = 2; width <= kMaxVec<T>; width *= 2) {
    if (fits(width) && warps(width) < warps(best)) {
      best = width;
    }
  }
  return best;
}

// Calls f(std::integral_constant<int, VEC>) for a runtime vec among those T supports.
template <typename T, typename F>
void with_vec(int vec, const F& f) {
  if constexpr (kMaxVec<T> >= 4) {
    if (vec == 4) {
      return f(std::integral_constant<int, 4>{});
    }
  }
  if (vec == 2) {
    return f(std::integral_constant<int, 2>{});
  }
  f(std::integral_constant<int, 1>{});
}

template <typename acc_t>
at::TensorOptions acc_options(const at::Tensor& like) {
  return like.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
}

// ---- Forward ----

template <bool kSummarize, typename T, typename score_t, typename state_t>
KernelFn<ForwardParams<T, score_t, state_t>> forward_kernel(int vec) {
  KernelFn<ForwardParams<T, score_t, state_t>> kernel = nullptr;
  with_vec<T>(vec, [&](auto width) {
    kernel = forward_chunk_kernel<T, score_t, state_t, decltype(width)::value, kSummarize>;
  });
  return kernel;
}

template <bool kSummarize, typename T, typename score_t, typename state_t>
void launch_forward(const ForwardParams<T, score_t, state_t>& p, int vec) {
  launch(forward_kernel<kSummarize, T, score_t, state_t>(vec),
         ceil_div(p.num_items(), kForwardWarps), kForwardThreads, 0, p);
}

// Runs the forward of one level: p has its shape (less the chunking), inputs, state and
// outputs filled. `like` gives the device for workspace.
template <typename T, typename score_t, typename state_t>
void forward_level(ForwardParams<T, score_t, state_t> p, int vec, const at::Tensor& like) {
  using acc_t = at::opmath_type<T>;
  Shape& shape = p.shape;
  p.dtiles = std::max<int64_t>(1, ceil_div(shape.dim, kWarpSize * vec));
  const ChunkPlan plan =
      plan_chunks(shape.length, shape.batch * shape.heads * p.dtiles, [&] {
        return resident_warps(forward_kernel<false, T, score_t, state_t>(vec), kForwardThreads, 0);
      });
  shape.chunk_len = plan.chunk_len;
  shape.num_chunks = plan.num_chunks;

  at::Tensor summary_lse, summary_out, carry_lse, carry_out;  // alive until all launches
  if (plan.num_chunks > 1) {
    const int64_t B = shape.batch, C = plan.num_chunks, H = shape.heads, D = shape.dim;
    const at::TensorOptions options = acc_options<acc_t>(like);
    const at::TensorOptions lse_options = acc_options<double>(like);
    summary_lse = at::empty({B, C, H}, lse_options);
    summary_out = at::empty({B, C, H, D}, options);
    p.summary_lse = summary_lse.mutable_data_ptr<double>();
    p.summary_out = summary_out.mutable_data_ptr<acc_t>();
    launch_forward<true>(p, vec);

    // The chunks as tokens (score = chunk lse, value = chunk out) from the same initial
    // state: their outputs are the states after each chunk.
    carry_lse = at::empty({B, C, H}, lse_options);
    carry_out = at::empty({B, C, H, D}, options);
    ForwardParams<acc_t, double, state_t> chunks{};
    chunks.shape = {B, C, H, D, C, 1};
    chunks.scores = contiguous<const double>(p.summary_lse, C, H, 1);
    chunks.values = contiguous<const acc_t>(p.summary_out, C, H, D);
    chunks.state_lse = p.state_lse;
    chunks.state_out = p.state_out;
    chunks.out = carry_out.mutable_data_ptr<acc_t>();
    chunks.lse = carry_lse.mutable_data_ptr<double>();
    const int chunk_vec = pick_vec<acc_t>(
        D, {{chunks.values.data, sizeof(acc_t), {C * H * D, H * D, D}},
            {chunks.out, sizeof(acc_t), {C * H * D, H * D, D}}});
    forward_level(chunks, chunk_vec, like);
    p.carry_lse = chunks.lse;
    p.carry_out = chunks.out;
  }
  launch_forward<false>(p, vec);
}

template <typename scalar_t>
void forward_typed(const ForwardArgs& args) {
  using acc_t = at::opmath_type<scalar_t>;
  const at::Tensor& values = args.values;
  const int64_t B = values.size(0), N = values.size(1), H = values.size(2), D = values.size(3);
  if (B * N * H == 0) {
    return;  // nothing to write
  }
  using state_t = double;  // the state's out (ops/scan.h)
  ForwardParams<scalar_t, scalar_t, state_t> p{};
  p.shape = {B, N, H, D, N, 1};
  p.scores = sequence_view(args.scores.const_data_ptr<scalar_t>(), args.scores);
  p.values = sequence_view(values.const_data_ptr<scalar_t>(), values);
  if (args.state_lse.has_value()) {
    p.state_lse = state_view(args.state_lse->const_data_ptr<double>(), *args.state_lse);
    p.state_out = state_view(args.state_out->const_data_ptr<state_t>(), *args.state_out);
  }
  p.out = args.out.mutable_data_ptr<scalar_t>();
  p.lse = args.lse.mutable_data_ptr<double>();
  p.final_out = args.final_out.mutable_data_ptr<state_t>();
  const int vec = pick_vec<scalar_t>(
      D, {{p.values.data, sizeof(scalar_t), {p.values.stride_b, p.values.stride_n, p.values.stride_h}},
          {p.out, sizeof(scalar_t), {N * H * D, H * D, D}}});
  forward_level(p, vec, values);
}

// ---- Backward ----

// How a backward block covers the features: warps x 32 lanes x slots x vec >= D.
struct BackwardGeometry {
  int vec;
  int slots;
  int warps;

  int threads() const {
    return warps * kWarpSize;
  }
  // Token sums exchanged between warps: 2 buffers x 2 sums x warps x 32.
  template <typename acc_t>
  size_t shared_bytes() const {
    return warps > 1 ? 4 * kWarpSize * warps * sizeof(acc_t) : 0;
  }
};

constexpr int kMaxSlots = 4;

BackwardGeometry backward_geometry(int64_t dim, int vec) {
  const int64_t lanes = std::max<int64_t>(1, ceil_div(dim, vec));
  const int64_t per_slot = kBackwardMaxWarps * kWarpSize;
  if (lanes <= per_slot) {
    return {vec, 1, static_cast<int>(ceil_div(lanes, kWarpSize))};
  }
  TORCH_CHECK(lanes <= per_slot * kMaxSlots, "aaren (CUDA): the backward supports head_dim up to ",
              per_slot * kMaxSlots * vec, " for these inputs (features contiguous and aligned to ",
              vec, " elements), got ", dim);
  return {vec, kMaxSlots, static_cast<int>(ceil_div(lanes, kWarpSize * kMaxSlots))};
}

template <bool kSummarize, typename T, typename state_t>
KernelFn<BackwardParams<T, state_t>> backward_kernel(const BackwardGeometry& geometry,
                                                     bool level0) {
  using acc_t = at::opmath_type<T>;
  KernelFn<BackwardParams<T, state_t>> kernel = nullptr;
  const auto select = [&](auto width, auto slots) {
    constexpr int VEC = decltype(width)::value;
    constexpr int SLOTS = decltype(slots)::value;
    if (level0) {
      kernel = backward_chunk_kernel<T, state_t, VEC, SLOTS, true, kSummarize>;
    } else if constexpr (std::is_same_v<T, acc_t>) {
      kernel = backward_chunk_kernel<T, state_t, VEC, SLOTS, false, kSummarize>;
    }
  };
  with_vec<T>(geometry.vec, [&](auto width) {
    if (geometry.slots == 1) {
      select(width, std::integral_constant<int, 1>{});
    } else {
      select(width, std::integral_constant<int, kMaxSlots>{});
    }
  });
  TORCH_INTERNAL_ASSERT(kernel != nullptr, "aaren (CUDA): chunk summaries are in the accumulation type");
  return kernel;
}

template <bool kSummarize, typename T, typename state_t>
void launch_backward(const BackwardParams<T, state_t>& p, bool level0,
                     const BackwardGeometry& geometry) {
  using acc_t = at::opmath_type<T>;
  launch(backward_kernel<kSummarize, T, state_t>(geometry, level0),
         p.shape.batch * p.shape.num_chunks * p.shape.heads, geometry.threads(),
         geometry.shared_bytes<acc_t>(), p);
}

// Runs the backward of one level: p has its shape (less the chunking), inputs and
// outputs filled.
template <typename T, typename state_t>
void backward_level(BackwardParams<T, state_t> p, bool level0, int vec, const at::Tensor& like) {
  using acc_t = at::opmath_type<T>;
  Shape& shape = p.shape;
  const BackwardGeometry geometry = backward_geometry(shape.dim, vec);
  const ChunkPlan plan =
      plan_chunks(shape.length, shape.batch * shape.heads * geometry.warps, [&] {
        return resident_warps(backward_kernel<false, T, state_t>(geometry, level0), geometry.threads(),
                              geometry.shared_bytes<acc_t>());
      });
  shape.chunk_len = plan.chunk_len;
  shape.num_chunks = plan.num_chunks;

  at::Tensor summary_R, summary_rho, carry_R, carry_rho;  // alive until all launches
  if (plan.num_chunks > 1) {
    const int64_t B = shape.batch, C = plan.num_chunks, H = shape.heads, D = shape.dim;
    const at::TensorOptions options = acc_options<acc_t>(like);
    summary_R = at::empty({B, C, H, D}, options);
    summary_rho = at::empty({B, C, H}, options);
    p.summary_R = summary_R.mutable_data_ptr<acc_t>();
    p.summary_rho = summary_rho.mutable_data_ptr<acc_t>();
    launch_backward<true>(p, level0, geometry);

    // The chunks as tokens: g = chunk R, rho input = chunk rho, and the gate from chunk
    // c to c + 1 is the product of chunk c's gates, e^(L_first(c) - L_first(c+1)), i.e.
    // the gates of this level's lse taken every chunk_len tokens.
    carry_R = at::empty({B, C, H, D}, options);
    carry_rho = at::empty({B, C, H}, options);
    BackwardParams<acc_t, state_t> chunks{};
    chunks.shape = {B, C, H, D, C, 1};
    chunks.lse = {p.lse.data, p.lse.stride_b, p.lse.stride_n * plan.chunk_len, p.lse.stride_h};
    chunks.grad = contiguous<const acc_t>(p.summary_R, C, H, D);
    chunks.rho_in = p.summary_rho;
    chunks.vec_out = carry_R.mutable_data_ptr<acc_t>();
    chunks.scalar_out = carry_rho.mutable_data_ptr<acc_t>();
    const int chunk_vec = pick_vec<acc_t>(
        D, {{chunks.grad.data, sizeof(acc_t), {C * H * D, H * D, D}},
            {chunks.vec_out, sizeof(acc_t), {C * H * D, H * D, D}}});
    backward_level(chunks, /*level0=*/false, chunk_vec, like);
    p.carry_R = chunks.vec_out;
    p.carry_rho = chunks.scalar_out;
  }
  launch_backward<false>(p, level0, geometry);
}

template <typename scalar_t>
void backward_typed(const BackwardArgs& args) {
  using acc_t = at::opmath_type<scalar_t>;
  const at::Tensor& values = args.values;
  const int64_t B = values.size(0), N = values.size(1), H = values.size(2), D = values.size(3);
  if (B * N * H == 0) {
    // No tokens: f = 0, so the state gradients are zero (and everything else is empty).
    args.grad_state_lse.zero_();
    args.grad_state_out.zero_();
    return;
  }
  using state_t = double;  // the state's out (ops/scan.h)
  BackwardParams<scalar_t, state_t> p{};
  p.shape = {B, N, H, D, N, 1};
  p.lse = sequence_view(args.lse.const_data_ptr<double>(), args.lse);
  if (args.grad_out.has_value()) {
    p.grad = sequence_view(args.grad_out->const_data_ptr<scalar_t>(), *args.grad_out);
  }
  if (args.grad_lse.has_value()) {
    p.grad_lse = sequence_view(args.grad_lse->const_data_ptr<double>(), *args.grad_lse);
  }
  p.scores = sequence_view(args.scores.const_data_ptr<scalar_t>(), args.scores);
  p.values = sequence_view(values.const_data_ptr<scalar_t>(), values);
  p.out = args.out.const_data_ptr<scalar_t>();
  if (args.state_lse.has_value()) {
    p.state_lse = state_view(args.state_lse->const_data_ptr<double>(), *args.state_lse);
    p.state_out = state_view(args.state_out->const_data_ptr<state_t>(), *args.state_out);
  }
  p.grad_state_lse = args.grad_state_lse.mutable_data_ptr<double>();
  p.grad_state_out = args.grad_state_out.mutable_data_ptr<state_t>();
  p.vec_out = args.grad_values.mutable_data_ptr<scalar_t>();
  p.scalar_out = args.grad_scores.mutable_data_ptr<scalar_t>();
  const std::array<int64_t, 3> contiguous_strides = {N * H * D, H * D, D};
  const int vec = pick_vec<scalar_t>(
      D, {{p.values.data, sizeof(scalar_t), {p.values.stride_b, p.values.stride_n, p.values.stride_h}},
          {p.grad.data, sizeof(scalar_t), {p.grad.stride_b, p.grad.stride_n, p.grad.stride_h}},
          {p.out, sizeof(scalar_t), contiguous_strides},
          {p.vec_out, sizeof(scalar_t), contiguous_strides}});
  backward_level(p, /*level0=*/true, vec, values);
}

}  // namespace

void scan_forward(const ForwardArgs& args) {
  const c10::cuda::CUDAGuard guard(args.values.device());
  if (args.values.size(1) == 1 && args.state_lse.has_value() &&
      args.values.scalar_type() != at::kDouble) {
    // One token after a state (a step): in float64 against the float64 state, as on the CPU
    // (docs/design.md, "The state"), by the float64 kernel on converted inputs.
    const ForwardArgs wide{args.scores.to(at::kDouble), args.values.to(at::kDouble),
                           args.state_lse, args.state_out,
                           at::empty(args.values.sizes(), args.values.options().dtype(at::kDouble)),
                           args.lse, args.final_out};
    forward_typed<double>(wide);
    args.out.copy_(wide.out);
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, args.values.scalar_type(),
                                  "aaren_scan_forward_cuda", [&] { forward_typed<scalar_t>(args); });
}

void scan_backward(const BackwardArgs& args) {
  const c10::cuda::CUDAGuard guard(args.values.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, args.values.scalar_type(),
                                  "aaren_scan_backward_cuda", [&] { backward_typed<scalar_t>(args); });
}

}  // namespace aaren::ops::cuda

TORCH_LIBRARY_IMPL(aaren, CUDA, m) {
  aaren::ops::register_backend<aaren::ops::cuda::scan_forward, aaren::ops::cuda::scan_backward>(m);
}
