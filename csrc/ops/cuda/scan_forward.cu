// The forward of the CUDA scan: the online softmax (docs/design.md) over each sequence,
// with the CPU kernel's results and arithmetic (aaren/combine.h). Running max m_k,
// denominator u_k = sum e^(s_i - m_k) and, per feature, the unnormalized numerator
//   w_k = alpha_k w_{k-1} + beta_k v_k,  alpha_k = e^(m_{k-1} - m_k), beta_k = e^(s_k - m_k)
// (one of them exactly 1); out_k = w_k / u_k and L_k = m_k + log u_k. The sums u and w are
// float64 as the CPU's (combine.h, "The forward's running sums": w float32 for half
// types), and so are the chunk summaries of float32 values. (The normalized form
// o_k = a_k o_{k-1} + b_k v_k with a_k = e^(L_{k-1} - L_k) would round L at every token, and
// those roundings accumulate in o.) Between tiles a warp carries (m, u) and w, so nothing
// is renormalized within a chunk. Work layout and chunks: scan_common.cuh. The same kernels
// run aaren.scan's dense sequences and aaren.scan_varlen's packed ones (the sequence locators
// of scan_common.cuh); scan_varlen.cu is the latter's entry point.
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "aaren/combine.h"
#include "ops/cuda/scan_common.cuh"

namespace aaren::ops::cuda {
namespace {

// score_t is the type of the scores: T on level 0, float64 on the levels of chunk
// summaries (whose "scores" are the chunks' log-sums, float64 as every stored lse).
// state_t is the type of the state's out (float64, ops/scan.h).
// Seq locates each sequence's tokens (scan_common.cuh): DenseSequences for aaren.scan and
// every level of chunk summaries, PackedSequences for aaren.scan_varlen's tokens.
template <typename T, typename score_t, typename state_t, typename Seq = DenseSequences>
struct ForwardParams {
  using acc_t = at::opmath_type<T>;
  using sum_t = numerator_type<T, acc_t>;  // the numerators' (combine.h): float64 for float32
  Shape shape;
  Seq sequences;
  int64_t dtiles;  // warps per (sequence, chunk), each over 32 * VEC features
  Strided<const score_t> scores;  // [B, N, H]
  Strided<const T> values;        // [B, N, H, D]
  // The state before the first token; state_lse.data == nullptr is the empty state.
  Strided<const double> state_lse;  // [B, H]
  Strided<const state_t> state_out; // [B, H, D]
  // Scan, chunk c > 0: the state after chunk c - 1, [B, C, H(, D)] contiguous.
  const double* carry_lse;
  const sum_t* carry_out;
  // Scan: out [B, N, H, D] and lse [B, N, H], contiguous (packed: [T, H(, D)]); final_out
  // [B, H, D] (level 0 only, else nullptr): the unrounded out after the last token, and
  // final_lse [B, H] its lse (packed only: the dense lse's last token is it).
  T* out;
  double* lse;
  state_t* final_out;
  double* final_lse;
  // Summarize: (lse, out) of each chunk's tokens alone, [B, C, H(, D)] contiguous.
  double* summary_lse;
  sum_t* summary_out;

  __host__ __device__ int64_t num_items() const {
    return shape.batch * shape.num_chunks * shape.heads * dtiles;
  }
};

constexpr int kForwardWarps = 4;  // independent warps per block
constexpr int kForwardThreads = kForwardWarps * kWarpSize;

// One warp per (sequence, chunk, feature tile), running the online softmax over the
// chunk's tokens: (m, u) per tile by tile_online_softmax (every dtile warp of a sequence
// computes the same scalars), w per feature. kSummarize: phase 1, the chunk from the
// empty state, writing only its final (lse, out); otherwise the chunk from its carried-in
// state, writing out = w / u and lse = m + log u for every token.
template <typename T, typename score_t, typename state_t, typename Seq, int VEC, bool kSummarize>
__global__ void __launch_bounds__(kForwardThreads, 4)
    forward_chunk_kernel(const ForwardParams<T, score_t, state_t, Seq> p) {
  using acc_t = at::opmath_type<T>;
  using sum_t = numerator_type<T, acc_t>;
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
  const Span span = p.sequences.span(shape, b);
  const int64_t n_begin = span.chunk_begin(chunk);
  const int64_t n_end = span.chunk_end(chunk);
  const int64_t d = (dtile * kWarpSize + lane) * VEC;
  const bool active = d < shape.dim;  // VEC divides dim: a lane's features are all in

  if (span.length == 0) {  // a sequence of no tokens (packed only): its state stays as it was
    if (!kSummarize && chunk == 0 && (p.final_out != nullptr || p.final_lse != nullptr)) {
      const bool has_state = p.state_lse.data != nullptr;
      if (p.final_lse != nullptr && dtile == 0 && lane == 0) {
        p.final_lse[b * shape.heads + h] =
            has_state ? *p.state_lse.row(b, h) : negative_infinity<double>();
      }
      if (active) {  // (D = 0: final_out may be nullptr, and no lane is active)
        state_t* row = p.final_out + (b * shape.heads + h) * shape.dim + d;  // per element
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          row[k] = has_state ? p.state_out.row(b, h)[d + k] : state_t(0);
        }
      }
    }
    if (!kSummarize) {
      return;  // (a summary of no tokens is written below: (-inf, 0), which combines as none)
    }
  }

  // The online softmax before the chunk's first token: (m, u) and this lane's numerators
  // w. The state (L0, o0) (chunk 0) or the carry from the previous chunks enters as
  // (m, u, u o0) with (m, u) = max_sum_of(L0), the empty one (L0 = -inf) as (-inf, 0, 0).
  MaxSum<acc_t> carry{negative_infinity<acc_t>(), 0.0};
  sum_t w[VEC];
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    w[k] = sum_t(0);
  }
  if constexpr (!kSummarize) {
    if (chunk == 0) {
      if (p.state_lse.data != nullptr) {
        carry = max_sum_of<acc_t>(*p.state_lse.row(b, h));
        if (active && carry.sum != 0.0) {
          const state_t* row = p.state_out.row(b, h) + d;  // any alignment: per element
#pragma unroll
          for (int k = 0; k < VEC; ++k) {
            w[k] = static_cast<sum_t>(carry.sum * row[k]);
          }
        }
      }
    } else {
      const int64_t index = shape.chunk_index(b, chunk - 1, h);
      carry = max_sum_of<acc_t>(p.carry_lse[index]);
      if (active && carry.sum != 0.0) {
        const Pack<sum_t, VEC> carried = load_pack<VEC>(p.carry_out + index * shape.dim + d);
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          w[k] = static_cast<sum_t>(carry.sum * static_cast<double>(carried.elem[k]));
        }
      }
    }
  }

  const score_t* score_row = p.scores.row(span.key, h);
  const T* value_row = p.values.row(span.key, h) + d;
  for (int64_t tile = n_begin; tile < n_end; tile += kWarpSize) {
    const int count = static_cast<int>(std::min<int64_t>(kWarpSize, n_end - tile));
    const int64_t n = tile + lane;
    // A token (s, 1) on level 0; a chunk summary's float64 lse as max_sum_of(lse).
    MaxSum<acc_t> token{negative_infinity<acc_t>(), 0.0};
    if (lane < count) {
      const score_t score = score_row[n * p.scores.stride_n];
      if constexpr (std::is_same_v<score_t, double> && !std::is_same_v<acc_t, double>) {
        token = max_sum_of<acc_t>(score);
      } else {
        const acc_t s = static_cast<acc_t>(score);
        token = {s, s == negative_infinity<acc_t>() ? 0.0 : 1.0};
      }
    }
    const TileSoftmax<acc_t> t = tile_online_softmax(token, carry, lane);
    sum_t inverse = 0;  // 1 / u after token `lane`
    if constexpr (!kSummarize) {
      if (dtile == 0 && lane < count) {
        p.lse[(span.base + n) * shape.heads + h] = lse_of_wide(t.state.max, t.state.sum);
      }
      inverse = inverse_of_sum<sum_t>(t.state.sum);
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
        sum_t scale = 0;
        if constexpr (!kSummarize) {
          scale = __shfl_sync(kFullMask, inverse, first + u);
        }
        if (active && first + u < count) {
          sum_t o[VEC];
#pragma unroll
          for (int k = 0; k < VEC; ++k) {
            w[k] = fma(static_cast<sum_t>(keep), w[k],
                       static_cast<sum_t>(take) * static_cast<sum_t>(v[u].elem[k]));
            o[k] = w[k] * scale;
          }
          if constexpr (!kSummarize) {
            store_pack<VEC>(p.out + ((span.base + tile + first + u) * shape.heads + h) * shape.dim + d,
                            o);
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
      const sum_t inverse = inverse_of_sum<sum_t>(carry.sum);
      sum_t o[VEC];
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        o[k] = w[k] * inverse;
      }
      store_pack<VEC>(p.summary_out + index * shape.dim + d, o);
    }
  } else if ((p.final_out != nullptr || p.final_lse != nullptr) && n_begin < n_end &&
             n_end == span.length) {
    // The state after the last token, from the chunk holding it: its lse, and its out
    // unrounded, w / u.
    if (p.final_lse != nullptr && dtile == 0 && lane == 0) {
      p.final_lse[b * shape.heads + h] = lse_of_wide(carry.max, carry.sum);
    }
    if (active) {
      const state_t inverse = reciprocal_or_zero(static_cast<state_t>(carry.sum));
      state_t* row = p.final_out + (b * shape.heads + h) * shape.dim + d;  // per element
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        row[k] = static_cast<state_t>(w[k]) * inverse;
      }
    }
  }
}

// ---- Host side ----

template <bool kSummarize, typename T, typename score_t, typename state_t, typename Seq>
KernelFn<ForwardParams<T, score_t, state_t, Seq>> forward_kernel(int vec) {
  KernelFn<ForwardParams<T, score_t, state_t, Seq>> kernel = nullptr;
  with_vec<T>(vec, [&](auto width) {
    kernel = forward_chunk_kernel<T, score_t, state_t, Seq, decltype(width)::value, kSummarize>;
  });
  return kernel;
}

template <bool kSummarize, typename T, typename score_t, typename state_t, typename Seq>
void launch_forward(const ForwardParams<T, score_t, state_t, Seq>& p, int vec) {
  launch(forward_kernel<kSummarize, T, score_t, state_t, Seq>(vec),
         ceil_div(p.num_items(), kForwardWarps), kForwardThreads, 0, p);
}

// Runs the forward of one level: p has its shape (less the chunking; length: the longest
// sequence), inputs, state and outputs filled. `like` gives the device for workspace. The
// chunk summaries of either layout are a dense [B, C, H(, D)] problem.
template <typename T, typename score_t, typename state_t, typename Seq>
void forward_level(ForwardParams<T, score_t, state_t, Seq> p, int vec, const at::Tensor& like) {
  using acc_t = at::opmath_type<T>;
  using sum_t = numerator_type<T, acc_t>;
  Shape& shape = p.shape;
  p.dtiles = std::max<int64_t>(1, ceil_div(shape.dim, kWarpSize * vec));
  const ChunkPlan plan =
      plan_chunks(shape.length, shape.batch * shape.heads * p.dtiles, [&] {
        return resident_warps(forward_kernel<false, T, score_t, state_t, Seq>(vec),
                              kForwardThreads, 0);
      });
  shape.chunk_len = std::max<int64_t>(plan.chunk_len, 1);
  shape.num_chunks = plan.num_chunks;

  at::Tensor summary_lse, summary_out, carry_lse, carry_out;  // alive until all launches
  if (plan.num_chunks > 1) {
    const int64_t B = shape.batch, C = plan.num_chunks, H = shape.heads, D = shape.dim;
    const at::TensorOptions options = acc_options<sum_t>(like);
    const at::TensorOptions lse_options = acc_options<double>(like);
    summary_lse = at::empty({B, C, H}, lse_options);
    summary_out = at::empty({B, C, H, D}, options);
    p.summary_lse = summary_lse.mutable_data_ptr<double>();
    p.summary_out = summary_out.mutable_data_ptr<sum_t>();
    launch_forward<true>(p, vec);

    // The chunks as tokens (score = chunk lse, value = chunk out) from the same initial
    // state: their outputs are the states after each chunk.
    carry_lse = at::empty({B, C, H}, lse_options);
    carry_out = at::empty({B, C, H, D}, options);
    ForwardParams<sum_t, double, state_t> chunks{};
    chunks.shape = {B, C, H, D, C, 1};
    chunks.scores = contiguous<const double>(p.summary_lse, C, H, 1);
    chunks.values = contiguous<const sum_t>(p.summary_out, C, H, D);
    chunks.state_lse = p.state_lse;
    chunks.state_out = p.state_out;
    chunks.out = carry_out.mutable_data_ptr<sum_t>();
    chunks.lse = carry_lse.mutable_data_ptr<double>();
    const int chunk_vec = pick_vec<sum_t>(
        D, {{chunks.values.data, sizeof(sum_t), {C * H * D, H * D, D}},
            {chunks.out, sizeof(sum_t), {C * H * D, H * D, D}}});
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

// aaren.scan_varlen's forward: the same kernels over the packed tokens, each sequence located
// by cu_seqlens on the device (PackedSequences), the chunks planned for `longest`.
template <typename scalar_t>
void varlen_forward_typed(const VarlenForwardArgs& args, int64_t longest) {
  const at::Tensor& values = args.values;
  const int64_t N = args.cu_seqlens.size(0) - 1;
  const int64_t T = values.size(0), H = values.size(1), D = values.size(2);
  using state_t = double;  // the state's out (ops/scan_varlen.h)
  ForwardParams<scalar_t, scalar_t, state_t, PackedSequences> p{};
  p.shape = {N, longest, H, D, longest, 1};
  p.sequences = {args.cu_seqlens.const_data_ptr(), args.cu_seqlens.scalar_type() == at::kLong, T};
  p.scores = packed_view(args.scores.const_data_ptr<scalar_t>(), args.scores);
  p.values = packed_view(values.const_data_ptr<scalar_t>(), values);
  if (args.state_lse.has_value()) {
    p.state_lse = state_view(args.state_lse->const_data_ptr<double>(), *args.state_lse);
    p.state_out = state_view(args.state_out->const_data_ptr<state_t>(), *args.state_out);
  }
  p.out = args.out.mutable_data_ptr<scalar_t>();
  p.lse = args.lse.mutable_data_ptr<double>();
  p.final_out = args.final_out.mutable_data_ptr<state_t>();
  p.final_lse = args.final_lse.mutable_data_ptr<double>();
  const int vec = pick_vec<scalar_t>(
      D, {{p.values.data, sizeof(scalar_t), {p.values.stride_b, p.values.stride_n, p.values.stride_h}},
          {p.out, sizeof(scalar_t), {H * D, H * D, D}}});
  forward_level(p, vec, values);
}

}  // namespace

void dispatch_forward(const ForwardArgs& args) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, args.values.scalar_type(),
                                  "aaren_scan_forward_cuda", [&] { forward_typed<scalar_t>(args); });
}

void varlen_forward(const VarlenForwardArgs& args, int64_t longest) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, args.values.scalar_type(),
                                  "aaren_scan_varlen_forward_cuda",
                                  [&] { varlen_forward_typed<scalar_t>(args, longest); });
}

}  // namespace aaren::ops::cuda
