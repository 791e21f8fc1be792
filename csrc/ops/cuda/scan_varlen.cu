// The CUDA kernels of the packed variable-length scan (ops/scan_varlen.h): N sequences packed
// along the tokens, sequence i the tokens [cu_seqlens[i], cu_seqlens[i + 1]) of scores [T, H]
// and values [T, H, D], each scanned on its own from its own state. The arithmetic is the dense
// kernels' (scan_forward.cu, scan_backward.cu: aaren/combine.h and the warp helpers of
// scan_device.cuh), with each sequence's bounds read from cu_seqlens on the device.
//
// Grid: one warp per (sequence, chunk, head) (forward: and feature tile). The chunks are those
// of the dense kernels (scan_common.cuh): when the sequences x heads are too few warps to fill
// the GPU, every sequence is cut into C chunks of chunk_len tokens, planned on the host from
// the longest sequence (max_seqlen), in three phases:
//   1. summarize: each chunk from nothing before it (forward) or after it (backward);
//   2. combine, one thread per (sequence, head, feature), in float64: each chunk's carry from
//      the initial state and the chunks before it (forward: combine_weights, as the CPU's
//      phase 2) or from the chunks after it (backward: R and rho at the next chunk's first
//      token, through the chunk's gates e^(L_first(c) - L_first(c + 1)));
//   3. scan: every chunk from its carry, writing the outputs.
// A sequence has at most C chunks: where max_seqlen is below its length (not checked on the
// device), its chunks are longer than chunk_len rather than its tokens left out; sequences
// shorter than (C - 1) chunk_len leave their last chunks empty (those warps return at once).
// Every bound read from cu_seqlens is clamped to [0, T] and a sequence's end to at least its
// start, so that wrong values can give wrong results but never an access outside the tensors.
//
// The backward gives one warp all the features of its (sequence, chunk, head): lanes x VEC x
// SLOTS >= D, SLOTS 1 or 4 (D up to 512 float32 values with 16-byte accesses); the token sums
// g.o and v.R are warp reductions (group_token_sums), with no shared memory.
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "aaren/combine.h"
#include "ops/cuda/scan_common.cuh"
#include "ops/cuda/scan_varlen_kernels.h"

namespace aaren::ops::cuda {
namespace {

constexpr int kVarlenWarps = 4;  // independent warps per block
constexpr int kVarlenThreads = kVarlenWarps * kWarpSize;

// The packed problem and its chunking.
struct VarlenShape {
  int64_t sequences;  // N
  int64_t tokens;     // T
  int64_t heads;
  int64_t dim;
  int64_t chunk_len;   // planned from the longest sequence
  int64_t num_chunks;  // C, per sequence
  const void* bounds;  // cu_seqlens [N + 1]
  bool bounds_64;      // int64 (else int32)

  __device__ int64_t bound(int64_t i) const {
    const int64_t b = bounds_64 ? static_cast<const int64_t*>(bounds)[i]
                                : static_cast<const int32_t*>(bounds)[i];
    return std::min(std::max<int64_t>(b, 0), tokens);
  }
};

// Sequence i's tokens [begin, end) and chunk c's part of them [chunk_begin, chunk_end).
struct SequenceChunk {
  int64_t begin;
  int64_t end;
  int64_t chunk_len;  // this sequence's (chunk_len, or longer when it has more tokens than C of them)
  int64_t chunk_begin;
  int64_t chunk_end;

  __device__ SequenceChunk(const VarlenShape& shape, int64_t i, int64_t c) {
    begin = shape.bound(i);
    end = std::max(begin, shape.bound(i + 1));
    const int64_t needed = ceil_div_device(end - begin, shape.num_chunks);
    chunk_len = std::max(shape.chunk_len, ceil_div_device(needed, kWarpSize) * kWarpSize);
    chunk_begin = std::min(begin + c * chunk_len, end);
    chunk_end = std::min(chunk_begin + chunk_len, end);
  }
  // Chunks holding tokens: the first chunks_used() of the C.
  __device__ int64_t chunks_used() const {
    return ceil_div_device(end - begin, chunk_len);
  }
  __device__ static int64_t ceil_div_device(int64_t a, int64_t b) {
    return b > 0 ? (a + b - 1) / b : 0;
  }
};

// ---- Forward ------------------------------------------------------------------------

template <typename T>
struct VarlenForwardParams {
  VarlenShape shape;
  int64_t dtiles;  // warps per (sequence, chunk, head), each over 32 * VEC features
  const T* scores;  // [T, H], strides below
  int64_t score_stride_t, score_stride_h;
  const T* values;  // [T, H, D], features contiguous
  int64_t value_stride_t, value_stride_h;
  const double* state_lse;  // [N, H] contiguous; nullptr: the empty state
  const double* state_out;  // [N, H, D] contiguous
  // Scan, chunk c > 0: the state after chunks 0 .. c - 1, at index c - 1 of [N, C, H(, D)].
  const double* carry_lse;
  const double* carry_out;
  // Scan outputs, contiguous: out [T, H, D], lse [T, H], and each sequence's final state
  // final_lse [N, H], final_out [N, H, D] (unrounded).
  T* out;
  double* lse;
  double* final_lse;
  double* final_out;
  // Summarize: each chunk's (lse, out) from nothing before it, [N, C, H(, D)].
  double* summary_lse;
  double* summary_out;

  __host__ __device__ int64_t num_items() const {
    return shape.sequences * shape.num_chunks * shape.heads * dtiles;
  }
};

// One warp per (sequence, chunk, head, feature tile): the dense forward_chunk_kernel's online
// softmax over the chunk's tokens. kSummarize: phase 1, from the empty state, writing the
// chunk's (lse, out) only (the last chunk needs none); otherwise phase 3, from the chunk's
// carry (chunk 0: the sequence's state), writing out and lse per token and, from the chunk
// holding the sequence's last token (chunk 0 for a sequence of none), its final state.
template <typename T, int VEC, bool kSummarize>
__global__ void __launch_bounds__(kVarlenThreads, 4)
    varlen_forward_kernel(const VarlenForwardParams<T> p) {
  using acc_t = at::opmath_type<T>;
  constexpr int kBatch = std::min(sizeof(T) >= 8 ? 8 : 16, kWarpSize / VEC);

  const int lane = threadIdx.x % kWarpSize;
  const int64_t item = static_cast<int64_t>(blockIdx.x) * kVarlenWarps + threadIdx.x / kWarpSize;
  if (item >= p.num_items()) {
    return;  // a whole warp: everything below is warp-synchronous
  }
  const VarlenShape& shape = p.shape;
  const int64_t dtile = item % p.dtiles;
  int64_t rest = item / p.dtiles;
  const int64_t h = rest % shape.heads;
  rest /= shape.heads;
  const int64_t chunk = rest % shape.num_chunks;
  const int64_t i = rest / shape.num_chunks;
  if (kSummarize && chunk + 1 == shape.num_chunks) {
    return;
  }
  const SequenceChunk sc(shape, i, chunk);
  const int64_t d = (dtile * kWarpSize + lane) * VEC;
  const bool active = d < shape.dim;  // VEC divides dim: a lane's features are all in
  const int64_t state_index = i * shape.heads + h;

  if (sc.chunk_begin == sc.chunk_end) {  // no tokens in this chunk (warp-uniform)
    if constexpr (kSummarize) {  // the empty summary, which combines as nothing
      const int64_t index = (i * shape.num_chunks + chunk) * shape.heads + h;
      if (dtile == 0 && lane == 0) {
        p.summary_lse[index] = negative_infinity<double>();
      }
      if (active) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          p.summary_out[index * shape.dim + d + k] = 0.0;
        }
      }
    } else if (chunk == 0) {  // a sequence of no tokens: its state stays as it was
      const bool has_state = p.state_lse != nullptr;
      if (dtile == 0 && lane == 0) {
        p.final_lse[state_index] =
            has_state ? p.state_lse[state_index] : negative_infinity<double>();
      }
      if (active) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          const int64_t e = state_index * shape.dim + d + k;
          p.final_out[e] = has_state ? p.state_out[e] : 0.0;
        }
      }
    }
    return;
  }

  // The online softmax before the chunk's first token: the state (chunk 0) or the carry of
  // the chunks before it, entered as (m, u, u o) with (m, u) = max_sum_of(L).
  MaxSum<acc_t> carry{negative_infinity<acc_t>(), acc_t(0)};
  acc_t w[VEC];
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    w[k] = acc_t(0);
  }
  if constexpr (!kSummarize) {
    const double* carry_lse = nullptr;
    const double* carry_row = nullptr;
    if (chunk == 0) {
      if (p.state_lse != nullptr) {
        carry_lse = p.state_lse + state_index;
        carry_row = p.state_out + state_index * shape.dim;
      }
    } else {
      const int64_t index = (i * shape.num_chunks + chunk - 1) * shape.heads + h;
      carry_lse = p.carry_lse + index;
      carry_row = p.carry_out + index * shape.dim;
    }
    if (carry_lse != nullptr) {
      carry = max_sum_of<acc_t>(*carry_lse);
      if (active && carry.sum != acc_t(0)) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) {  // any alignment: per element
          w[k] = static_cast<acc_t>(carry.sum * carry_row[d + k]);
        }
      }
    }
  }

  const T* score_row = p.scores + h * p.score_stride_h;
  const T* value_row = p.values + h * p.value_stride_h + d;
  for (int64_t tile = sc.chunk_begin; tile < sc.chunk_end; tile += kWarpSize) {
    const int count = static_cast<int>(std::min<int64_t>(kWarpSize, sc.chunk_end - tile));
    const int64_t n = tile + lane;
    MaxSum<acc_t> token{negative_infinity<acc_t>(), acc_t(0)};
    if (lane < count) {
      const acc_t s = static_cast<acc_t>(score_row[n * p.score_stride_t]);
      token = {s, s == negative_infinity<acc_t>() ? acc_t(0) : acc_t(1)};
    }
    const TileSoftmax<acc_t> t = tile_online_softmax(token, carry, lane);
    acc_t inverse = 0;  // 1 / u after token `lane`
    if constexpr (!kSummarize) {
      if (dtile == 0 && lane < count) {
        p.lse[n * shape.heads + h] = lse_of_wide(t.state.max, t.state.sum);
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
          v[u] = load_pack<VEC>(value_row + (tile + first + u) * p.value_stride_t);
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
            store_pack<VEC>(p.out + ((tile + first + u) * shape.heads + h) * shape.dim + d, o);
          }
        }
      }
    }
  }

  const acc_t inverse = reciprocal_or_zero(carry.sum);
  if constexpr (kSummarize) {
    const int64_t index = (i * shape.num_chunks + chunk) * shape.heads + h;
    if (dtile == 0 && lane == 0) {
      p.summary_lse[index] = lse_of_wide(carry.max, carry.sum);
    }
    if (active) {
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        p.summary_out[index * shape.dim + d + k] = static_cast<double>(w[k] * inverse);
      }
    }
  } else if (sc.chunk_end == sc.end) {
    // The sequence's final state: its last token's lse, and its out unrounded (w / u).
    if (dtile == 0 && lane == 0) {
      p.final_lse[state_index] = lse_of_wide(carry.max, carry.sum);
    }
    if (active) {
      const double wide_inverse = reciprocal_or_zero(static_cast<double>(carry.sum));
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        p.final_out[state_index * shape.dim + d + k] = static_cast<double>(w[k]) * wide_inverse;
      }
    }
  }
}

// Phase 2 of the forward, one thread per (sequence, head, feature): the state after chunks
// 0 .. c, for c < C - 1, from the initial state and the chunk summaries in order, in float64
// (combine.h's combine_weights; an empty summary, L = -inf, takes weight 0 exactly).
template <typename T>
struct VarlenForwardCombine {
  VarlenForwardParams<T> p;
  double* carry_lse;  // [N, C, H]
  double* carry_out;  // [N, C, H, D]
};

template <typename T>
__global__ void __launch_bounds__(kVarlenThreads)
    varlen_forward_combine_kernel(const VarlenForwardCombine<T> combine) {
  const VarlenForwardParams<T>& p = combine.p;
  double* const carry_lse = combine.carry_lse;
  double* const carry_out = combine.carry_out;
  const VarlenShape& shape = p.shape;
  const int64_t features = std::max<int64_t>(shape.dim, 1);
  const int64_t index = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (index >= shape.sequences * shape.heads * features) {
    return;
  }
  const int64_t d = index % features;
  const int64_t state_index = index / features;  // i H + h
  const int64_t h = state_index % shape.heads;
  const int64_t i = state_index / shape.heads;
  const bool has_feature = d < shape.dim;
  const bool has_state = p.state_lse != nullptr;
  double running_lse = has_state ? p.state_lse[state_index] : negative_infinity<double>();
  double running = has_state && has_feature ? p.state_out[state_index * shape.dim + d] : 0.0;
  for (int64_t c = 0; c + 1 < shape.num_chunks; ++c) {
    const int64_t chunk_index = (i * shape.num_chunks + c) * shape.heads + h;
    const CombineWeights w = combine_weights(running_lse, p.summary_lse[chunk_index]);
    const double chunk_out = has_feature ? p.summary_out[chunk_index * shape.dim + d] : 0.0;
    running = w.weight_b == 0.0 ? running
        : w.weight_a == 0.0     ? chunk_out
                                : w.weight_a * running + w.weight_b * chunk_out;
    running_lse = w.lse;
    if (d == 0) {
      carry_lse[chunk_index] = running_lse;
    }
    if (has_feature) {
      carry_out[chunk_index * shape.dim + d] = running;
    }
  }
}

// ---- Backward -----------------------------------------------------------------------

template <typename T>
struct VarlenBackwardParams {
  using acc_t = at::opmath_type<T>;
  VarlenShape shape;
  const double* lse;  // [T, H] contiguous, the forward's: the gates e^(L_n - L_{n+1})
  const T* grad;      // g, [T, H, D]; nullptr reads as zeros
  int64_t grad_stride_t, grad_stride_h;
  const double* grad_lse;  // G, [T, H]; nullptr reads as zeros
  int64_t grad_lse_stride_t, grad_lse_stride_h;
  const T* scores;
  int64_t score_stride_t, score_stride_h;
  const T* values;
  int64_t value_stride_t, value_stride_h;
  const T* out;             // [T, H, D] contiguous
  const double* state_lse;  // [N, H] contiguous; nullptr: the empty state
  const double* state_out;  // [N, H, D] contiguous
  double* grad_state_lse;   // [N, H]
  double* grad_state_out;   // [N, H, D]
  // Scan, chunk c: R and rho at the first token of chunk c + 1 with everything after it,
  // [N, C, H(, D)] (zero after a sequence's last chunk); absent when C = 1.
  const acc_t* carry_R;
  const acc_t* carry_rho;
  // Scan outputs, contiguous.
  T* grad_values;  // [T, H, D]
  T* grad_scores;  // [T, H]
  // Summarize: R and rho at each chunk's first token from nothing after it, [N, C, H(, D)].
  acc_t* summary_R;
  acc_t* summary_rho;

  __host__ __device__ int64_t num_items() const {
    return shape.sequences * shape.num_chunks * shape.heads;
  }
};

// One warp per (sequence, chunk, head), its lane `lane` holding the VEC features at
// (s * 32 + lane) * VEC of each slot s: the dense backward_chunk_kernel's level 0 with a single
// warp (its reverse recurrences, last token first; values and outputs shifted by the state's
// rounded out, so that dL_0 = -f rho'_1). kSummarize: phase 1, chunks 1 .. C - 1 from nothing
// after them, writing R and rho at their first token; otherwise phase 3 from the carry,
// writing ds and dv, and chunk 0 the state's gradients.
template <typename T, int VEC, int SLOTS, bool kSummarize>
__global__ void __launch_bounds__(kVarlenThreads, 4)
    varlen_backward_kernel(const VarlenBackwardParams<T> p) {
  using acc_t = at::opmath_type<T>;
  constexpr int kGroup = 8;  // tokens per warp reduction of the feature sums
  constexpr int kBatch = std::max<int>(1, 32 / (VEC * SLOTS * sizeof(acc_t)));
  static_assert(kGroup % kBatch == 0 && kWarpSize % kGroup == 0);
  constexpr bool kNeedVR = !kSummarize;  // v.R, for ds

  const int lane = threadIdx.x % kWarpSize;
  const int64_t item = static_cast<int64_t>(blockIdx.x) * kVarlenWarps + threadIdx.x / kWarpSize;
  if (item >= p.num_items()) {
    return;  // a whole warp
  }
  const VarlenShape& shape = p.shape;
  const int64_t h = item % shape.heads;
  const int64_t rest = item / shape.heads;
  const int64_t chunk = rest % shape.num_chunks;
  const int64_t i = rest / shape.num_chunks;
  if (kSummarize && chunk == 0) {
    return;  // chunk 0's summary is never needed
  }
  const SequenceChunk sc(shape, i, chunk);
  const int64_t state_index = i * shape.heads + h;

  int64_t d[SLOTS];
  bool active[SLOTS];
#pragma unroll
  for (int s = 0; s < SLOTS; ++s) {
    d[s] = (static_cast<int64_t>(s) * kWarpSize + lane) * VEC;
    active[s] = d[s] < shape.dim;
  }

  if (sc.chunk_begin == sc.chunk_end) {  // no tokens (warp-uniform)
    if (!kSummarize && chunk == 0) {  // a sequence of none: nothing depends on its state
      if (lane == 0) {
        p.grad_state_lse[state_index] = 0.0;
      }
#pragma unroll
      for (int s = 0; s < SLOTS; ++s) {
        if (active[s]) {
#pragma unroll
          for (int k = 0; k < VEC; ++k) {
            p.grad_state_out[state_index * shape.dim + d[s] + k] = 0.0;
          }
        }
      }
    }
    return;  // (phase 2 reads no summary of an empty chunk)
  }

  // Values and outputs read shifted by o_0 (rounded_state_out, combine.h) with a state.
  acc_t shift[SLOTS][VEC];
#pragma unroll
  for (int s = 0; s < SLOTS; ++s) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      shift[s][k] = acc_t(0);
    }
  }
  if (p.state_lse != nullptr) {
    const double* state_row = p.state_out + state_index * shape.dim;  // per element
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

  // R and rho after the chunk's last token (rho held by every lane alike).
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
    if (p.carry_R != nullptr && chunk + 1 < shape.num_chunks) {
      const int64_t index = (i * shape.num_chunks + chunk) * shape.heads + h;
      rho = p.carry_rho[index];
#pragma unroll
      for (int s = 0; s < SLOTS; ++s) {
        if (active[s]) {
          const Pack<acc_t, VEC> carried = load_pack<VEC>(p.carry_R + index * shape.dim + d[s]);
#pragma unroll
          for (int k = 0; k < VEC; ++k) {
            R[s][k] = carried.elem[k];
          }
        }
      }
    }
  }

  const double* lse_row = p.lse + h;  // token stride H
  const T* grad_row = p.grad == nullptr ? nullptr : p.grad + h * p.grad_stride_h;
  const T* score_row = p.scores + h * p.score_stride_h;
  const T* value_row = p.values + h * p.value_stride_h;
  const T* out_row = p.out + h * shape.dim;  // token stride H D
  const double* grad_lse_row =
      p.grad_lse == nullptr ? nullptr : p.grad_lse + h * p.grad_lse_stride_h;
  const int64_t out_stride_t = shape.heads * shape.dim;

  const int64_t tiles = (sc.chunk_end - sc.chunk_begin + kWarpSize - 1) / kWarpSize;
  for (int64_t t = tiles - 1; t >= 0; --t) {
    const int64_t tile = sc.chunk_begin + t * kWarpSize;
    const int count = static_cast<int>(std::min<int64_t>(kWarpSize, sc.chunk_end - tile));
    const int64_t n = tile + lane;
    const bool valid = lane < count;

    // Token `lane`'s gate to the next token of its sequence (0 after the last; the identity
    // (1, 0) past the chunk), the weight e^(s - L) of its value and -G.
    acc_t gate = 1;
    acc_t weight = 0;
    acc_t rho_input = 0;
    if (valid) {
      const double lse_n = lse_row[n * shape.heads];
      gate = n + 1 < sc.end ? exp_of_difference_wide<acc_t>(lse_n, lse_row[(n + 1) * shape.heads])
                            : acc_t(0);
      if constexpr (kNeedVR) {
        weight = exp_of_difference_wide<acc_t>(
            static_cast<double>(static_cast<acc_t>(score_row[n * p.score_stride_t])), lse_n);
      }
      rho_input = grad_lse_row == nullptr
          ? acc_t(0)
          : -static_cast<acc_t>(grad_lse_row[n * p.grad_lse_stride_t]);
    }

    // The feature recurrence over the tile, last token first, in groups of kGroup tokens;
    // each token's g.o and v.R summed over the warp onto the lane whose index is the token's.
    acc_t go = 0;
    acc_t vr = 0;
    for (int group_first = (count - 1) / kGroup * kGroup; group_first >= 0;
         group_first -= kGroup) {
      acc_t go_part[kGroup];
      acc_t vr_part[kGroup];
#pragma unroll
      for (int u = 0; u < kGroup; ++u) {
        go_part[u] = acc_t(0);
        vr_part[u] = acc_t(0);
      }
#pragma unroll
      for (int batch = kGroup / kBatch - 1; batch >= 0; --batch) {
        const int first = group_first + batch * kBatch;
        if (first >= count) {
          continue;  // warp-uniform
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
                g[u][s] = load_pack<VEC>(grad_row + token * p.grad_stride_t + d[s]);
                o[u][s] = load_pack<VEC>(out_row + token * out_stride_t + d[s]);
              }
              if constexpr (kNeedVR) {
                v[u][s] = load_pack<VEC>(value_row + token * p.value_stride_t + d[s]);
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
              if (grad_row != nullptr) {
                go_share = fma(gk, static_cast<acc_t>(o[u][s].elem[k]) - shift[s][k], go_share);
              }
              if constexpr (kNeedVR) {
                vr_share =
                    fma(static_cast<acc_t>(v[u][s].elem[k]) - shift[s][k], R[s][k], vr_share);
                dv[k] = e * R[s][k];
              }
            }
            if constexpr (!kSummarize) {
              store_pack<VEC>(p.grad_values + (token * shape.heads + h) * shape.dim + d[s], dv);
            }
          }
          go_part[batch * kBatch + u] = go_share;
          vr_part[batch * kBatch + u] = vr_share;
        }
      }
      const bool mine = (lane & ~(kGroup - 1)) == group_first;
      const acc_t go_sum = group_token_sums(go_part, lane);
      go = mine ? go_sum : go;
      if constexpr (kNeedVR) {
        const acc_t vr_sum = group_token_sums(vr_part, lane);
        vr = mine ? vr_sum : vr;
      }
    }
    if (valid) {
      rho_input += go;  // g.o - G
    }

    const acc_t rho_n = reverse_linear_scan(gate, rho_input, rho, lane);
    if constexpr (!kSummarize) {
      if (valid) {
        p.grad_scores[n * shape.heads + h] = static_cast<T>(weight * (vr - rho_n));
      }
    }
    rho = __shfl_sync(kFullMask, rho_n, 0);
  }

  if constexpr (kSummarize) {
    const int64_t index = (i * shape.num_chunks + chunk) * shape.heads + h;
#pragma unroll
    for (int s = 0; s < SLOTS; ++s) {
      if (active[s]) {
        store_pack<VEC>(p.summary_R + index * shape.dim + d[s], R[s]);
      }
    }
    if (lane == 0) {
      p.summary_rho[index] = rho;
    }
  } else if (chunk == 0) {
    // The initial state as a token before the first: f = e^(L_0 - L_1) (0 for the empty
    // state), do_0 = f R_1, dL_0 = -f rho'_1.
    const bool has_state = p.state_lse != nullptr;
    const acc_t f = exp_of_difference_wide<acc_t>(
        has_state ? p.state_lse[state_index] : negative_infinity<double>(),
        lse_row[sc.begin * shape.heads]);
#pragma unroll
    for (int s = 0; s < SLOTS; ++s) {
      if (active[s]) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          p.grad_state_out[state_index * shape.dim + d[s] + k] = static_cast<double>(f * R[s][k]);
        }
      }
    }
    if (lane == 0) {
      p.grad_state_lse[state_index] = static_cast<double>(-f * rho);
    }
  }
}

// Phase 2 of the backward, one thread per (sequence, head, feature): R and rho at the first
// token of chunk c + 1 with everything after it, for every chunk c, from the last chunk holding
// tokens back, in float64: Y_c = S_c + e^(L_first(c) - L_first(c + 1)) Y_{c + 1}, S_c the
// chunk's own summary. Zero after the sequence's last chunk.
template <typename T>
struct VarlenBackwardCombine {
  VarlenBackwardParams<T> p;
  at::opmath_type<T>* carry_R;    // [N, C, H, D]
  at::opmath_type<T>* carry_rho;  // [N, C, H]
};

template <typename T>
__global__ void __launch_bounds__(kVarlenThreads)
    varlen_backward_combine_kernel(const VarlenBackwardCombine<T> combine) {
  using acc_t = at::opmath_type<T>;
  const VarlenBackwardParams<T>& p = combine.p;
  acc_t* const carry_R = combine.carry_R;
  acc_t* const carry_rho = combine.carry_rho;
  const VarlenShape& shape = p.shape;
  const int64_t features = std::max<int64_t>(shape.dim, 1);
  const int64_t index = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (index >= shape.sequences * shape.heads * features) {
    return;
  }
  const int64_t d = index % features;
  const int64_t state_index = index / features;
  const int64_t h = state_index % shape.heads;
  const int64_t i = state_index / shape.heads;
  const bool has_feature = d < shape.dim;
  const SequenceChunk sc(shape, i, 0);
  const int64_t used = sc.chunks_used();
  const auto carry_at = [&](int64_t c) { return (i * shape.num_chunks + c) * shape.heads + h; };
  for (int64_t c = std::max<int64_t>(used - 1, 0); c < shape.num_chunks; ++c) {
    if (d == 0) {
      carry_rho[carry_at(c)] = acc_t(0);
    }
    if (has_feature) {
      carry_R[carry_at(c) * shape.dim + d] = acc_t(0);
    }
  }
  double R = 0.0;
  double rho = 0.0;
  for (int64_t c = used - 1; c >= 1; --c) {
    const int64_t first = sc.begin + c * sc.chunk_len;
    const double gate = c + 1 < used
        ? exp_of_difference_wide<double>(p.lse[first * shape.heads + h],
                                         p.lse[(first + sc.chunk_len) * shape.heads + h])
        : 0.0;
    const int64_t own = carry_at(c);
    R = (has_feature ? static_cast<double>(p.summary_R[own * shape.dim + d]) : 0.0) + gate * R;
    rho = static_cast<double>(p.summary_rho[own]) + gate * rho;
    const int64_t previous = carry_at(c - 1);
    if (d == 0) {
      carry_rho[previous] = static_cast<acc_t>(rho);
    }
    if (has_feature) {
      carry_R[previous * shape.dim + d] = static_cast<acc_t>(R);
    }
  }
}

// ---- Host side ----------------------------------------------------------------------

// The longest sequence: max_seqlen when given (nothing read back), else from cu_seqlens
// copied to the host once, whose values are then checked.
int64_t longest_sequence(const at::Tensor& cu_seqlens, int64_t tokens,
                         std::optional<int64_t> max_seqlen, const char* op) {
  if (max_seqlen.has_value()) {
    return *max_seqlen;
  }
  const at::Tensor host = cu_seqlens.to(at::kCPU).to(at::kLong).contiguous();
  return check_cu_seqlens_values(op, host.const_data_ptr<int64_t>(), host.numel(), tokens,
                                 std::nullopt);
}

VarlenShape varlen_shape(const at::Tensor& values, const at::Tensor& cu_seqlens) {
  return {cu_seqlens.size(0) - 1, values.size(0), values.size(1), values.size(2), 0, 1,
          cu_seqlens.const_data_ptr(), cu_seqlens.scalar_type() == at::kLong};
}

template <typename scalar_t>
void varlen_forward_typed(const VarlenForwardArgs& args) {
  const at::Tensor& values = args.values;
  VarlenForwardParams<scalar_t> p{};
  p.shape = varlen_shape(values, args.cu_seqlens);
  VarlenShape& shape = p.shape;
  if (shape.sequences == 0) {
    return;  // nothing to write
  }
  const int64_t H = shape.heads, D = shape.dim;
  const int64_t longest = longest_sequence(args.cu_seqlens, shape.tokens, args.max_seqlen,
                                           "aaren.scan_varlen");
  p.scores = args.scores.const_data_ptr<scalar_t>();
  p.score_stride_t = args.scores.stride(0);
  p.score_stride_h = args.scores.stride(1);
  p.values = values.const_data_ptr<scalar_t>();
  p.value_stride_t = values.stride(0);
  p.value_stride_h = values.stride(1);
  if (args.state_lse.has_value()) {
    p.state_lse = args.state_lse->const_data_ptr<double>();
    p.state_out = args.state_out->const_data_ptr<double>();
  }
  p.out = args.out.mutable_data_ptr<scalar_t>();
  p.lse = args.lse.mutable_data_ptr<double>();
  p.final_lse = args.final_lse.mutable_data_ptr<double>();
  p.final_out = args.final_out.mutable_data_ptr<double>();
  const int vec = pick_vec<scalar_t>(
      D, {{p.values, sizeof(scalar_t), {p.value_stride_t, p.value_stride_h, p.value_stride_h}},
          {p.out, sizeof(scalar_t), {H * D, D, D}}});
  p.dtiles = std::max<int64_t>(1, ceil_div(D, kWarpSize * vec));
  KernelFn<VarlenForwardParams<scalar_t>> scan = nullptr;
  KernelFn<VarlenForwardParams<scalar_t>> summarize = nullptr;
  with_vec<scalar_t>(vec, [&](auto width) {
    scan = varlen_forward_kernel<scalar_t, decltype(width)::value, false>;
    summarize = varlen_forward_kernel<scalar_t, decltype(width)::value, true>;
  });
  const ChunkPlan plan = plan_chunks(longest, shape.sequences * H * p.dtiles, [&] {
    return resident_warps(scan, kVarlenThreads, 0);
  });
  shape.chunk_len = std::max<int64_t>(plan.chunk_len, 1);
  shape.num_chunks = plan.num_chunks;

  at::Tensor summary_lse, summary_out, carry_lse, carry_out;  // alive until all launches
  if (shape.num_chunks > 1) {
    const int64_t N = shape.sequences, C = shape.num_chunks;
    const at::TensorOptions wide = values.options().dtype(at::kDouble);
    summary_lse = at::empty({N, C, H}, wide);
    summary_out = at::empty({N, C, H, D}, wide);
    carry_lse = at::empty({N, C, H}, wide);
    carry_out = at::empty({N, C, H, D}, wide);
    p.summary_lse = summary_lse.mutable_data_ptr<double>();
    p.summary_out = summary_out.mutable_data_ptr<double>();
    launch(summarize, ceil_div(p.num_items(), kVarlenWarps), kVarlenThreads, 0, p);
    launch(varlen_forward_combine_kernel<scalar_t>,
           ceil_div(N * H * std::max<int64_t>(D, 1), kVarlenThreads), kVarlenThreads, 0,
           VarlenForwardCombine<scalar_t>{p, carry_lse.mutable_data_ptr<double>(),
                                          carry_out.mutable_data_ptr<double>()});
    p.carry_lse = carry_lse.const_data_ptr<double>();
    p.carry_out = carry_out.const_data_ptr<double>();
  }
  launch(scan, ceil_div(p.num_items(), kVarlenWarps), kVarlenThreads, 0, p);
}

constexpr int kVarlenMaxSlots = 4;

template <typename scalar_t>
void varlen_backward_typed(const VarlenBackwardArgs& args) {
  using acc_t = at::opmath_type<scalar_t>;
  const at::Tensor& values = args.values;
  VarlenBackwardParams<scalar_t> p{};
  p.shape = varlen_shape(values, args.cu_seqlens);
  VarlenShape& shape = p.shape;
  if (shape.sequences == 0) {
    return;
  }
  const int64_t H = shape.heads, D = shape.dim;
  const int64_t longest = longest_sequence(args.cu_seqlens, shape.tokens, args.max_seqlen,
                                           "aaren.scan_varlen_backward");
  p.lse = args.lse.const_data_ptr<double>();
  if (args.grad_out.has_value()) {
    p.grad = args.grad_out->const_data_ptr<scalar_t>();
    p.grad_stride_t = args.grad_out->stride(0);
    p.grad_stride_h = args.grad_out->stride(1);
  }
  if (args.grad_lse.has_value()) {
    p.grad_lse = args.grad_lse->const_data_ptr<double>();
    p.grad_lse_stride_t = args.grad_lse->stride(0);
    p.grad_lse_stride_h = args.grad_lse->stride(1);
  }
  p.scores = args.scores.const_data_ptr<scalar_t>();
  p.score_stride_t = args.scores.stride(0);
  p.score_stride_h = args.scores.stride(1);
  p.values = values.const_data_ptr<scalar_t>();
  p.value_stride_t = values.stride(0);
  p.value_stride_h = values.stride(1);
  p.out = args.out.const_data_ptr<scalar_t>();
  if (args.state_lse.has_value()) {
    p.state_lse = args.state_lse->const_data_ptr<double>();
    p.state_out = args.state_out->const_data_ptr<double>();
  }
  p.grad_state_lse = args.grad_state_lse.mutable_data_ptr<double>();
  p.grad_state_out = args.grad_state_out.mutable_data_ptr<double>();
  p.grad_values = args.grad_values.mutable_data_ptr<scalar_t>();
  p.grad_scores = args.grad_scores.mutable_data_ptr<scalar_t>();
  const int vec = pick_vec<scalar_t>(
      D, {{p.values, sizeof(scalar_t), {p.value_stride_t, p.value_stride_h, p.value_stride_h}},
          {p.grad, sizeof(scalar_t), {p.grad_stride_t, p.grad_stride_h, p.grad_stride_h}},
          {p.out, sizeof(scalar_t), {H * D, D, D}},
          {p.grad_values, sizeof(scalar_t), {H * D, D, D}}});
  const int64_t lanes_needed = ceil_div(std::max<int64_t>(D, 1), vec);
  TORCH_CHECK(lanes_needed <= kWarpSize * kVarlenMaxSlots,
              "aaren.scan_varlen (CUDA): the backward supports head_dim up to ",
              kWarpSize * kVarlenMaxSlots * vec,
              " for these inputs (features contiguous and aligned to ", vec, " elements), got ", D);
  const int slots = lanes_needed <= kWarpSize ? 1 : kVarlenMaxSlots;
  KernelFn<VarlenBackwardParams<scalar_t>> scan = nullptr;
  KernelFn<VarlenBackwardParams<scalar_t>> summarize = nullptr;
  with_vec<scalar_t>(vec, [&](auto width) {
    constexpr int VEC = decltype(width)::value;
    if (slots == 1) {
      scan = varlen_backward_kernel<scalar_t, VEC, 1, false>;
      summarize = varlen_backward_kernel<scalar_t, VEC, 1, true>;
    } else {
      scan = varlen_backward_kernel<scalar_t, VEC, kVarlenMaxSlots, false>;
      summarize = varlen_backward_kernel<scalar_t, VEC, kVarlenMaxSlots, true>;
    }
  });
  const ChunkPlan plan = plan_chunks(longest, shape.sequences * H, [&] {
    return resident_warps(scan, kVarlenThreads, 0);
  });
  shape.chunk_len = std::max<int64_t>(plan.chunk_len, 1);
  shape.num_chunks = plan.num_chunks;

  at::Tensor summary_R, summary_rho, carry_R, carry_rho;  // alive until all launches
  if (shape.num_chunks > 1) {
    const int64_t N = shape.sequences, C = shape.num_chunks;
    const at::TensorOptions options = acc_options<acc_t>(values);
    summary_R = at::empty({N, C, H, D}, options);
    summary_rho = at::empty({N, C, H}, options);
    carry_R = at::empty({N, C, H, D}, options);
    carry_rho = at::empty({N, C, H}, options);
    p.summary_R = summary_R.mutable_data_ptr<acc_t>();
    p.summary_rho = summary_rho.mutable_data_ptr<acc_t>();
    launch(summarize, ceil_div(p.num_items(), kVarlenWarps), kVarlenThreads, 0, p);
    launch(varlen_backward_combine_kernel<scalar_t>,
           ceil_div(N * H * std::max<int64_t>(D, 1), kVarlenThreads), kVarlenThreads, 0,
           VarlenBackwardCombine<scalar_t>{p, carry_R.mutable_data_ptr<acc_t>(),
                                           carry_rho.mutable_data_ptr<acc_t>()});
    p.carry_R = carry_R.const_data_ptr<acc_t>();
    p.carry_rho = carry_rho.const_data_ptr<acc_t>();
  }
  launch(scan, ceil_div(p.num_items(), kVarlenWarps), kVarlenThreads, 0, p);
}

}  // namespace

void dispatch_varlen_forward(const VarlenForwardArgs& args) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, args.values.scalar_type(),
                                  "aaren_scan_varlen_forward_cuda",
                                  [&] { varlen_forward_typed<scalar_t>(args); });
}

void dispatch_varlen_backward(const VarlenBackwardArgs& args) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, args.values.scalar_type(),
                                  "aaren_scan_varlen_backward_cuda",
                                  [&] { varlen_backward_typed<scalar_t>(args); });
}

}  // namespace aaren::ops::cuda
