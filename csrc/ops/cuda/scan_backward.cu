// The backward of the CUDA scan, with the CPU kernel's results and arithmetic
// (aaren/combine.h): from the last token to the first,
//   R_i = g_i + a_i R_{i+1},  rho_i = (g_i . o_i - G_i) + a_i rho_{i+1},
//   a_i = e^(L_i - L_{i+1}) from the saved lse; dv_i = e^(s_i - L_i) R_i,
//   ds_i = e^(s_i - L_i) (v_i . R_i - rho_i).
// Work layout and chunks: scan_common.cuh.
//
// The reductions over the features (g.o for rho, v.R for ds) are per token; a block of up
// to 8 warps covers all the features of a sequence (each lane 1 or 4 slots of VEC
// features). Each warp sums its lanes' shares of 8 tokens at a time with a butterfly that
// leaves token t's sum on lane t (group_token_sums), then warp 0 adds the warps' sums from
// shared memory, one barrier per tile. Fixed order: deterministic, no atomics.
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

constexpr int kBackwardMaxWarps = 8;  // warps sharing one sequence's features
constexpr int kBackwardMaxThreads = kBackwardMaxWarps * kWarpSize;

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

void dispatch_backward(const BackwardArgs& args) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, args.values.scalar_type(),
                                  "aaren_scan_backward_cuda", [&] { backward_typed<scalar_t>(args); });
}

}  // namespace aaren::ops::cuda
