// The backward of the CUDA scan, with the CPU kernel's results and arithmetic
// (aaren/combine.h, "The backward's Q"): from the last token to the first,
//   R_i = g_i + a_i R_{i+1},   a_i = e^(L_i - L_{i+1}) from the saved lse,
//   Q_i = a_i Q_{i+1} + q_term,   q_term = a_i (o_i - o_{i+1}) . R_{i+1} + G_i,
//   dv_i = e^(s_i - L_i) R_i,   ds_i = e^(s_i - L_i) ((v_i - o_i) . R_i + Q_i),
// and for the initial state, a token before the first: do_0 = f R_1, f = e^(L_0 - L_1) (its
// lse gradient: scan_cuda.cpp, from the inputs). Q = o . R - rho, rho the design page's sum: formed as
// v_i . R_i - rho_i, d/d scores cancelled two sums growing as sqrt(N) wherever one token
// dominates the outputs after it (in float32, up to 10x the CPU kernel's largest error in the
// emulation's test of such problems). Q is float64, as the CPU's: a scalar per token. The
// gates are taken in float64: Q takes them so, R as acc_t's hi + lo (R <- hi R + (lo R + g)),
// since R's terms are products of gates, and gates rounded to acc_t put an ulp per token
// into them (with float32 gates: up to 1.7x the CPU kernel's largest error in d/d scores and
// 2.6x in the state's lse gradient, in one pass over 1024 or 2048 tokens).
// Work layout and chunks: scan_common.cuh; the same kernels run aaren.scan's dense sequences
// and aaren.scan_varlen's packed ones (its sequence locators). The chunk summaries are the same recurrence a
// level up: chunk c is a token whose g is its R^c at its first token from nothing after it,
// whose G is its Q^c so, whose out is the out at its first token, with the gate
// A_c = e^(L_first(c) - L_first(c+1)), since
//   R_first(c) = R^c + A_c R_first(c+1),
//   Q_first(c) = Q^c + A_c (Q_first(c+1) + (o_first(c) - o_first(c+1)) . R_first(c+1)).
//
// The reductions over the features ((o_i - o_{i+1}) . R_{i+1} for Q, (v_i - o_i) . R_i for
// ds) are per token; a block of up to 8 warps covers all the features of a sequence (each
// lane 1 or 4 slots of VEC features). Each warp sums its lanes' shares of 8 tokens at a time
// with a butterfly that leaves token t's sum on lane t (group_token_sums), then warp 0 adds
// the warps' sums from shared memory, one barrier per tile. Fixed order: deterministic, no
// atomics.
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <type_traits>

#include "aaren/combine.h"
#include "ops/cuda/scan_common.cuh"

namespace aaren::ops::cuda {
namespace {

// T is the type of the vectors g (and, on level 0, of scores and values): the input dtype
// on level 0, the accumulation type on the levels of chunk summaries. O is the type of the
// outputs o, the input dtype on every level (the summary levels read level 0's out).
// Seq locates each sequence's tokens (scan_common.cuh): DenseSequences for aaren.scan and
// every level of chunk summaries, PackedSequences for aaren.scan_varlen's tokens.
template <typename T, typename O, typename state_t, typename Seq = DenseSequences>
struct BackwardParams {
  using acc_t = at::opmath_type<T>;
  Shape shape;
  Seq sequences;
  Strided<const double> lse;  // [B, N, H]: the gates a_i = e^(L_i - L_{i+1})
  Strided<const T> grad;      // g_i, [B, N, H, D]; data == nullptr reads as zeros
  // o_i, [B, N, H, D]: level 0 the forward's out; a summary level the out at each chunk's
  // first token (level 0's, every so many tokens, as `lse`).
  Strided<const O> out;
  // Level 0.
  Strided<const double> grad_lse;  // G_i, [B, N, H]; data == nullptr reads as zeros
  Strided<const T> scores;         // [B, N, H]
  Strided<const T> values;         // [B, N, H, D]
  Strided<const double> state_lse;   // [B, H], data == nullptr: empty state
  double* grad_state_lse;            // [B, H] contiguous
  state_t* grad_state_out;           // [B, H, D] contiguous, any alignment (per element)
  // Summary levels: each chunk's Q^c (the G of the level's Q recurrence), [B, N, H].
  const double* q_in;
  // Scan, chunk c < C - 1: R and Q at the first token of chunk c + 1, [B, C, H(, D)].
  const acc_t* carry_R;
  const double* carry_Q;
  // Scan outputs, contiguous: level 0 grad_values [B, N, H, D] and grad_scores [B, N, H];
  // summary levels R (vec_out) and Q (q_out) at every token.
  T* vec_out;
  T* scalar_out;
  double* q_out;
  // Summarize: R and Q at each chunk's first token, from nothing after the chunk.
  acc_t* summary_R;
  double* summary_Q;
  // Summarize, packed sequences only (else nullptr): the lse and out at each chunk's first
  // token, [B, C, H(, D)], the summary level's lse and out (a dense level reads them in
  // place, every chunk_len tokens). A chunk past its sequence's end gets out 0 and the lse of
  // the sequence's last token: its summary is zero, and its gates stay finite.
  double* first_lse;
  O* first_out;
};

constexpr int kBackwardMaxWarps = 8;  // warps sharing one sequence's features
constexpr int kBackwardMaxThreads = kBackwardMaxWarps * kWarpSize;

// One block per (sequence, chunk); its warps (blockDim.x / 32 of them, at most 8) cover
// the features, lane `lane` of warp `warp` the VEC features at
// ((slot * warps + warp) * 32 + lane) * VEC for each of its SLOTS slots. Tokens are
// walked from the chunk's last to its first.
//   kLevel0: the sequence of tokens (g = grad_out, G = grad_lse, outputs dv, ds and the
//            state gradients); otherwise a sequence of chunk summaries (g = chunk R,
//            G = chunk Q, outputs R and Q per token).
//   kSummarize: phase 1, from nothing after the chunk, writing R and Q at its first token.
template <typename T, typename O, typename state_t, typename Seq, int VEC, int SLOTS,
          bool kLevel0, bool kSummarize>
__global__ void __launch_bounds__(kBackwardMaxThreads, 2)
    backward_chunk_kernel(const BackwardParams<T, O, state_t, Seq> p) {
  using acc_t = at::opmath_type<T>;
  constexpr int kGroup = 8;  // tokens per warp reduction of the feature sums
  // Tokens loaded ahead, three loads each: kBatch * VEC * SLOTS = 32 bytes of
  // accumulators (8 float, 4 double) per load stream.
  constexpr int kBatch = std::max<int>(1, 32 / (VEC * SLOTS * sizeof(acc_t)));
  static_assert(kGroup % kBatch == 0 && kWarpSize % kGroup == 0);
  constexpr bool kNeedVR = kLevel0 && !kSummarize;  // (v - o) . R, for ds

  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int warps = blockDim.x / kWarpSize;
  const Shape& shape = p.shape;
  int64_t rest = blockIdx.x;
  const int64_t h = rest % shape.heads;
  rest /= shape.heads;
  const int64_t chunk = rest % shape.num_chunks;
  const int64_t b = rest / shape.num_chunks;
  const Span span = p.sequences.span(shape, b);
  const int64_t n_begin = span.chunk_begin(chunk);
  const int64_t n_end = span.chunk_end(chunk);

  int64_t d[SLOTS];
  bool active[SLOTS];
#pragma unroll
  for (int s = 0; s < SLOTS; ++s) {
    d[s] = ((static_cast<int64_t>(s) * warps + warp) * kWarpSize + lane) * VEC;
    active[s] = d[s] < shape.dim;
  }

  const double* lse_row = p.lse.row(span.key, h);
  const T* grad_row = p.grad.data == nullptr ? nullptr : p.grad.row(span.key, h);
  const O* out_row = p.out.row(span.key, h);
  const T* score_row = nullptr;
  const T* value_row = nullptr;
  const double* grad_lse_row = nullptr;
  if constexpr (kLevel0) {
    score_row = p.scores.row(span.key, h);
    value_row = p.values.row(span.key, h);
    grad_lse_row = p.grad_lse.data == nullptr ? nullptr : p.grad_lse.row(span.key, h);
  }

  // R and Q after the chunk's last token (Q is tracked by warp 0 only), and the out there,
  // o_{n+1} of the chunk's last token: the next chunk's carry and its first out, or nothing
  // (R = 0, whatever o). Without g, R is 0 everywhere and o is never read.
  acc_t R[SLOTS][VEC];
  acc_t out_next[SLOTS][VEC];
  double q = 0;
#pragma unroll
  for (int s = 0; s < SLOTS; ++s) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      R[s][k] = acc_t(0);
      out_next[s][k] = acc_t(0);
    }
  }
  if constexpr (!kSummarize) {
    if (n_end < span.length) {  // the next chunk holds tokens
      const int64_t index = shape.chunk_index(b, chunk + 1, h);
      q = p.carry_Q[index];
#pragma unroll
      for (int s = 0; s < SLOTS; ++s) {
        if (active[s]) {
          const Pack<acc_t, VEC> carry = load_pack<VEC>(p.carry_R + index * shape.dim + d[s]);
#pragma unroll
          for (int k = 0; k < VEC; ++k) {
            R[s][k] = carry.elem[k];
          }
          if (grad_row != nullptr) {
            const Pack<O, VEC> next = load_pack<VEC>(out_row + n_end * p.out.stride_n + d[s]);
#pragma unroll
            for (int k = 0; k < VEC; ++k) {
              out_next[s][k] = static_cast<acc_t>(next.elem[k]);
            }
          }
        }
      }
    }
  }

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
    // map (1, 0) on lanes past the chunk), the weight e^(s - L) of its value, and G (level
    // 0) or the chunk's Q^c (summary levels). The gate is taken in float64 and enters R as
    // acc_t's hi + lo (two fmas: R's terms are products of gates, which rounded to acc_t
    // would each add an ulp along the sequence) and Q as it is.
    double gate_wide = 1;
    acc_t gate = 1;
    acc_t gate_lo = 0;
    acc_t weight = 0;
    double lse_term = 0;
    if (valid) {
      // Differences of log-sums in float64 (combine.h); the gate's exponential in float64,
      // the weight's in acc_t.
      const double lse_n = lse_row[n * p.lse.stride_n];
      gate_wide = n + 1 < span.length
          ? exp_of_difference(lse_n, lse_row[(n + 1) * p.lse.stride_n])
          : 0.0;
      gate = static_cast<acc_t>(gate_wide);
      gate_lo = static_cast<acc_t>(gate_wide - static_cast<double>(gate));
      if constexpr (kLevel0) {
        if constexpr (kNeedVR) {
          weight = exp_of_difference_wide<acc_t>(
              static_cast<double>(static_cast<acc_t>(score_row[n * p.scores.stride_n])), lse_n);
        }
        lse_term = grad_lse_row == nullptr ? 0.0 : grad_lse_row[n * p.grad_lse.stride_n];
      } else {
        lse_term = p.q_in[(span.base + n) * shape.heads + h];
      }
    }

    // The feature recurrence over the tile, last token first, in groups of kGroup
    // tokens: per group, this lane's share of each token's (o_n - o_{n+1}) . R_{n+1} and
    // (v_n - o_n) . R_n, summed over the warp at the end of the group into qd/vr of the
    // lane whose index is the token's.
    acc_t qd = 0;
    acc_t vr = 0;
    for (int group_first = (count - 1) / kGroup * kGroup; group_first >= 0;
         group_first -= kGroup) {
      acc_t qd_part[kGroup];
      acc_t vr_part[kGroup];
#pragma unroll
      for (int t = 0; t < kGroup; ++t) {
        qd_part[t] = acc_t(0);
        vr_part[t] = acc_t(0);
      }
#pragma unroll
      for (int batch = kGroup / kBatch - 1; batch >= 0; --batch) {
        const int first = group_first + batch * kBatch;
        if (first >= count) {
          continue;  // warp-uniform: only the last tile of a sequence is partial
        }
        Pack<T, VEC> g[kBatch][SLOTS];
        Pack<O, VEC> o[kBatch][SLOTS];
        Pack<T, VEC> v[kBatch][SLOTS];
#pragma unroll
        for (int u = 0; u < kBatch; ++u) {
          const int64_t token = tile + first + u;
#pragma unroll
          for (int s = 0; s < SLOTS; ++s) {
            if (first + u < count && active[s]) {
              if (grad_row != nullptr) {
                g[u][s] = load_pack<VEC>(grad_row + token * p.grad.stride_n + d[s]);
                o[u][s] = load_pack<VEC>(out_row + token * p.out.stride_n + d[s]);
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
          const acc_t a_lo = __shfl_sync(kFullMask, gate_lo, j);
          const acc_t e = kNeedVR ? __shfl_sync(kFullMask, weight, j) : acc_t(0);
          if (j >= count) {
            continue;
          }
          const int64_t token = tile + j;
          acc_t qd_share = 0;
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
              const acc_t ok =
                  grad_row == nullptr ? acc_t(0) : static_cast<acc_t>(o[u][s].elem[k]);
              qd_share = fma(ok - out_next[s][k], R[s][k], qd_share);  // R_{n+1}
              R[s][k] = fma(a, R[s][k], fma(a_lo, R[s][k], gk));
              out_next[s][k] = ok;
              if constexpr (kNeedVR) {
                vr_share = fma(static_cast<acc_t>(v[u][s].elem[k]) - ok, R[s][k], vr_share);
                dv[k] = e * R[s][k];
              }
            }
            if constexpr (!kSummarize) {
              T* dst = p.vec_out + ((span.base + token) * shape.heads + h) * shape.dim + d[s];
              if constexpr (kLevel0) {
                store_pack<VEC>(dst, dv);
              } else {
                store_pack<VEC>(dst, R[s]);
              }
            }
          }
          qd_part[batch * kBatch + u] = qd_share;
          vr_part[batch * kBatch + u] = vr_share;
        }
      }
      // Lane l holds the sums of token l % kGroup of the group: keep them on the lanes
      // of the group's own tokens (group_first is a multiple of kGroup).
      const bool mine = (lane & ~(kGroup - 1)) == group_first;
      const acc_t qd_sum = group_token_sums(qd_part, lane);
      qd = mine ? qd_sum : qd;
      if constexpr (kNeedVR) {
        const acc_t sum = group_token_sums(vr_part, lane);
        vr = mine ? sum : vr;
      }
    }

    // Token sums over all the features, on lane j for token j of warp 0.
    if (warps > 1) {
      acc_t* const sums = partials + buffer * 2 * warps * kWarpSize;
      sums[warp * kWarpSize + lane] = qd;
      if constexpr (kNeedVR) {
        sums[(warps + warp) * kWarpSize + lane] = vr;
      }
      __syncthreads();
      if (warp == 0) {
        qd = 0;
        vr = 0;
        for (int w = 0; w < warps; ++w) {
          qd += sums[w * kWarpSize + lane];
          if constexpr (kNeedVR) {
            vr += sums[(warps + w) * kWarpSize + lane];
          }
        }
      }
      buffer ^= 1;
    }

    // Q over the tile from the one after it; ds (level 0) or Q (summaries) out.
    if (warp == 0) {
      const double term = valid ? q_term(gate_wide, qd, lse_term) : 0.0;
      const double q_n = reverse_linear_scan(gate_wide, term, q, lane);
      if constexpr (!kSummarize) {
        if (valid) {
          if constexpr (kLevel0) {
            p.scalar_out[(span.base + n) * shape.heads + h] =
                static_cast<T>(score_gradient(weight, static_cast<double>(vr), q_n));
          } else {
            p.q_out[(span.base + n) * shape.heads + h] = q_n;
          }
        }
      }
      q = __shfl_sync(kFullMask, q_n, 0);
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
      p.summary_Q[index] = q;
    }
    if (p.first_lse != nullptr) {  // packed sequences: the summary level's lse and out
      const bool empty = n_begin == n_end;  // block-uniform
      if (warp == 0 && lane == 0) {
        p.first_lse[index] = !empty         ? lse_row[n_begin * p.lse.stride_n]
                             : span.length > 0 ? lse_row[(span.length - 1) * p.lse.stride_n]
                                               : 0.0;
      }
#pragma unroll
      for (int s = 0; s < SLOTS; ++s) {
        if (active[s]) {
          O* first = p.first_out + index * shape.dim + d[s];
          if (empty) {
#pragma unroll
            for (int k = 0; k < VEC; ++k) {
              first[k] = O(0);
            }
          } else {
            const Pack<O, VEC> at_first = load_pack<VEC>(out_row + n_begin * p.out.stride_n + d[s]);
            store_pack<VEC>(first, at_first.elem);
          }
        }
      }
    }
  } else if constexpr (kLevel0) {
    if (chunk != 0) {
      return;  // block-uniform
    }
    // The initial state as a token before the first: f = e^(L_0 - L_1) (0 for the empty
    // state), do_0 = f R_1, with R now at token 0. Its lse gradient is not taken here
    // (scan_cuda.cpp, "The state's lse gradient": from the inputs, in float64); without a
    // state it is 0. A sequence of no tokens (packed only): nothing depends on its state.
    const bool has_state = p.state_lse.data != nullptr && span.length > 0;  // block-uniform
    const acc_t f = has_state ? exp_of_difference_wide<acc_t>(*p.state_lse.row(b, h), lse_row[0])
                              : acc_t(0);
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
    if (!has_state && warp == 0 && lane == 0) {
      p.grad_state_lse[b * shape.heads + h] = 0;
    }
  }
}

// ---- Host side ----

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

template <bool kSummarize, typename T, typename O, typename state_t, typename Seq>
KernelFn<BackwardParams<T, O, state_t, Seq>> backward_kernel(const BackwardGeometry& geometry,
                                                             bool level0) {
  using acc_t = at::opmath_type<T>;
  KernelFn<BackwardParams<T, O, state_t, Seq>> kernel = nullptr;
  const auto select = [&](auto width, auto slots) {
    constexpr int VEC = decltype(width)::value;
    constexpr int SLOTS = decltype(slots)::value;
    if (level0) {
      if constexpr (std::is_same_v<T, O>) {  // level 0 reads its own dtype throughout
        kernel = backward_chunk_kernel<T, O, state_t, Seq, VEC, SLOTS, true, kSummarize>;
      }
    } else if constexpr (std::is_same_v<T, acc_t> && std::is_same_v<Seq, DenseSequences>) {
      kernel = backward_chunk_kernel<T, O, state_t, Seq, VEC, SLOTS, false, kSummarize>;
    }
  };
  with_vec<T>(geometry.vec, [&](auto width) {
    if (geometry.slots == 1) {
      select(width, std::integral_constant<int, 1>{});
    } else {
      select(width, std::integral_constant<int, kMaxSlots>{});
    }
  });
  TORCH_INTERNAL_ASSERT(kernel != nullptr, "aaren (CUDA): chunk summaries are in the accumulation "
                        "type, level 0 in the outputs' dtype");
  return kernel;
}

template <bool kSummarize, typename T, typename O, typename state_t, typename Seq>
void launch_backward(const BackwardParams<T, O, state_t, Seq>& p, bool level0,
                     const BackwardGeometry& geometry) {
  using acc_t = at::opmath_type<T>;
  launch(backward_kernel<kSummarize, T, O, state_t, Seq>(geometry, level0),
         p.shape.batch * p.shape.num_chunks * p.shape.heads, geometry.threads(),
         geometry.shared_bytes<acc_t>(), p);
}

// Runs the backward of one level: p has its shape (less the chunking; length: the longest
// sequence), inputs and outputs filled. The chunk summaries of either layout are a dense
// [B, C, H(, D)] problem.
template <typename T, typename O, typename state_t, typename Seq>
void backward_level(BackwardParams<T, O, state_t, Seq> p, bool level0, int vec,
                    const at::Tensor& like) {
  using acc_t = at::opmath_type<T>;
  Shape& shape = p.shape;
  const BackwardGeometry geometry = backward_geometry(shape.dim, vec);
  const ChunkPlan plan =
      plan_chunks(shape.length, shape.batch * shape.heads * geometry.warps, [&] {
        return resident_warps(backward_kernel<false, T, O, state_t, Seq>(geometry, level0),
                              geometry.threads(), geometry.shared_bytes<acc_t>());
      });
  shape.chunk_len = std::max<int64_t>(plan.chunk_len, 1);
  shape.num_chunks = plan.num_chunks;

  at::Tensor summary_R, summary_Q, carry_R, carry_Q, first_lse, first_out;  // alive until
                                                                            // all launches
  if (plan.num_chunks > 1) {
    const int64_t B = shape.batch, C = plan.num_chunks, H = shape.heads, D = shape.dim;
    const at::TensorOptions options = acc_options<acc_t>(like);
    const at::TensorOptions q_options = acc_options<double>(like);
    summary_R = at::empty({B, C, H, D}, options);
    summary_Q = at::empty({B, C, H}, q_options);
    p.summary_R = summary_R.mutable_data_ptr<acc_t>();
    p.summary_Q = summary_Q.mutable_data_ptr<double>();
    constexpr bool kPacked = !std::is_same_v<Seq, DenseSequences>;
    if constexpr (kPacked) {
      first_lse = at::empty({B, C, H}, q_options);
      first_out = at::empty({B, C, H, D}, acc_options<O>(like));
      p.first_lse = first_lse.mutable_data_ptr<double>();
      p.first_out = first_out.mutable_data_ptr<O>();
    }
    launch_backward<true>(p, level0, geometry);

    // The chunks as tokens (the top of this file): g = chunk R, G = chunk Q, out = the out
    // at the chunk's first token, and the gate from chunk c to c + 1 is the product of
    // chunk c's gates, e^(L_first(c) - L_first(c+1)): lse and out taken every chunk_len
    // tokens.
    carry_R = at::empty({B, C, H, D}, options);
    carry_Q = at::empty({B, C, H}, q_options);
    BackwardParams<acc_t, O, state_t> chunks{};
    chunks.shape = {B, C, H, D, C, 1};
    if constexpr (kPacked) {
      chunks.lse = contiguous<const double>(p.first_lse, C, H, 1);
      chunks.out = contiguous<const O>(p.first_out, C, H, D);
    } else {
      chunks.lse = {p.lse.data, p.lse.stride_b, p.lse.stride_n * plan.chunk_len, p.lse.stride_h};
      chunks.out = {p.out.data, p.out.stride_b, p.out.stride_n * plan.chunk_len, p.out.stride_h};
    }
    chunks.grad = contiguous<const acc_t>(p.summary_R, C, H, D);
    chunks.q_in = p.summary_Q;
    chunks.vec_out = carry_R.mutable_data_ptr<acc_t>();
    chunks.q_out = carry_Q.mutable_data_ptr<double>();
    const int chunk_vec = pick_vec<acc_t>(
        D, {{chunks.grad.data, sizeof(acc_t), {C * H * D, H * D, D}},
            {chunks.vec_out, sizeof(acc_t), {C * H * D, H * D, D}},
            {chunks.out.data, sizeof(O),
             {chunks.out.stride_b, chunks.out.stride_n, chunks.out.stride_h}}});
    backward_level(chunks, /*level0=*/false, chunk_vec, like);
    p.carry_R = chunks.vec_out;
    p.carry_Q = chunks.q_out;
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
  BackwardParams<scalar_t, scalar_t, state_t> p{};
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
  p.out = contiguous<const scalar_t>(args.out.const_data_ptr<scalar_t>(), N, H, D);
  if (args.state_lse.has_value()) {
    p.state_lse = state_view(args.state_lse->const_data_ptr<double>(), *args.state_lse);
  }
  p.grad_state_lse = args.grad_state_lse.mutable_data_ptr<double>();
  p.grad_state_out = args.grad_state_out.mutable_data_ptr<state_t>();
  p.vec_out = args.grad_values.mutable_data_ptr<scalar_t>();
  p.scalar_out = args.grad_scores.mutable_data_ptr<scalar_t>();
  const std::array<int64_t, 3> contiguous_strides = {N * H * D, H * D, D};
  const int vec = pick_vec<scalar_t>(
      D, {{p.values.data, sizeof(scalar_t), {p.values.stride_b, p.values.stride_n, p.values.stride_h}},
          {p.grad.data, sizeof(scalar_t), {p.grad.stride_b, p.grad.stride_n, p.grad.stride_h}},
          {p.out.data, sizeof(scalar_t), contiguous_strides},
          {p.vec_out, sizeof(scalar_t), contiguous_strides}});
  backward_level(p, /*level0=*/true, vec, values);
}

// aaren.scan_varlen's backward: the same kernels over the packed tokens, each sequence located
// by cu_seqlens on the device (PackedSequences), the chunks planned for `longest`.
template <typename scalar_t>
void varlen_backward_typed(const VarlenBackwardArgs& args, int64_t longest) {
  const at::Tensor& values = args.values;
  const int64_t N = args.cu_seqlens.size(0) - 1;
  const int64_t T = values.size(0), H = values.size(1), D = values.size(2);
  using state_t = double;  // the state's out (ops/scan_varlen.h)
  BackwardParams<scalar_t, scalar_t, state_t, PackedSequences> p{};
  p.shape = {N, longest, H, D, longest, 1};
  p.sequences = {args.cu_seqlens.const_data_ptr(), args.cu_seqlens.scalar_type() == at::kLong, T};
  p.lse = packed_view(args.lse.const_data_ptr<double>(), args.lse);
  if (args.grad_out.has_value()) {
    p.grad = packed_view(args.grad_out->const_data_ptr<scalar_t>(), *args.grad_out);
  }
  if (args.grad_lse.has_value()) {
    p.grad_lse = packed_view(args.grad_lse->const_data_ptr<double>(), *args.grad_lse);
  }
  p.scores = packed_view(args.scores.const_data_ptr<scalar_t>(), args.scores);
  p.values = packed_view(values.const_data_ptr<scalar_t>(), values);
  p.out = packed_view(args.out.const_data_ptr<scalar_t>(), args.out);
  if (args.state_lse.has_value()) {
    p.state_lse = state_view(args.state_lse->const_data_ptr<double>(), *args.state_lse);
  }
  p.grad_state_lse = args.grad_state_lse.mutable_data_ptr<double>();
  p.grad_state_out = args.grad_state_out.mutable_data_ptr<state_t>();
  p.vec_out = args.grad_values.mutable_data_ptr<scalar_t>();
  p.scalar_out = args.grad_scores.mutable_data_ptr<scalar_t>();
  const std::array<int64_t, 3> contiguous_strides = {H * D, H * D, D};
  const int vec = pick_vec<scalar_t>(
      D, {{p.values.data, sizeof(scalar_t), {p.values.stride_b, p.values.stride_n, p.values.stride_h}},
          {p.grad.data, sizeof(scalar_t), {p.grad.stride_b, p.grad.stride_n, p.grad.stride_h}},
          {p.out.data, sizeof(scalar_t), {p.out.stride_b, p.out.stride_n, p.out.stride_h}},
          {p.vec_out, sizeof(scalar_t), contiguous_strides}});
  backward_level(p, /*level0=*/true, vec, values);
}

}  // namespace

void dispatch_backward(const BackwardArgs& args) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, args.values.scalar_type(),
                                  "aaren_scan_backward_cuda", [&] { backward_typed<scalar_t>(args); });
}

void varlen_backward(const VarlenBackwardArgs& args, int64_t longest) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, args.values.scalar_type(),
                                  "aaren_scan_varlen_backward_cuda",
                                  [&] { varlen_backward_typed<scalar_t>(args, longest); });
}

}  // namespace aaren::ops::cuda
