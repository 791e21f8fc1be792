// The forward's walk over a task's lanes (sequences, or chunks of them), token by token:
// the online softmax of combine.h, with each lane's row updated as vectors over D. Compiled
// per instruction set with the kernels (scan_kernel.cpp, forward_typed).
//
// A task's weights e^(s - m) are taken as vectors: over its lanes when they fill half a
// vector (forward_lanes_by_vectors), otherwise over a block of tokens of each lane
// (forward_lanes_per_lane). Both take ATen's vector exp, which computes each element
// alike, and the same arithmetic around it, so a lane's bits do not depend on which path
// ran it. That matters: a task's lanes depend on the thread count (work_plan.cpp), and
// results must not (docs/design.md, "Performance on the CPU"; test_cpu_forward_lanes.py).
#pragma once

#ifndef CPU_CAPABILITY
#error "forward_lanes.h belongs to the per-instruction-set kernels (scan_kernel.cpp)"
#endif

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "aaren/combine.h"
#include "aaren/walk.h"
#include "ops/cpu/vec_io.h"

namespace aaren::ops::cpu::CPU_CAPABILITY {

// Tokens' lse computed together when a task has too few lanes to fill a float64 vector.
constexpr int64_t kPendingLogs = 32;

// A task's lanes in the forward: where each starts (its first token), how many tokens it
// has, and its online softmax (combine.h): running max m, denominator u (float64) and
// numerator row w (in sum_t: float64 for float32 values; combine.h, "The forward's running
// sums").
template <typename scalar_t>
struct ForwardScratch {
  using acc_t = typename VecIO<scalar_t>::acc_t;
  using sum_t = numerator_type<scalar_t, acc_t>;
  std::vector<const scalar_t*> score, value;
  std::vector<scalar_t*> out;
  std::vector<double*> lse;
  std::vector<int64_t> length;
  std::vector<acc_t> running_max;
  std::vector<double> denominator;
  std::vector<sum_t> numerator;
  // A token's (m, u) per lane, in float64, turned into lse = m + log u with one vectorized
  // float64 log over the lanes (a scalar one per lane cost as much as the rest of the forward).
  std::vector<double> token_max, token_sum, token_lse;
  // A token's score and the weights it gives, per lane (take_scores), and 1/u in float64
  // (update_row rounds it to sum_t).
  std::vector<acc_t> token_score, weight_old, weight_new;
  std::vector<double> inverse;
  // forward_lanes_per_lane's block of tokens per lane: the exps' arguments, the exps, the
  // running max after each token, and which weight each exp is (0: new, 1: old, 2: NaN).
  std::vector<acc_t> block_argument, block_exp, block_max;
  std::vector<int8_t> block_rescales;
  // With a lane or two, the (m, u) of several tokens wait here with where their lse goes, for
  // one vector log over all of them: a vector log per token for one lane (a long single
  // sequence) was a quarter of the forward's time (perf, bfloat16), and batching them cut
  // it by a quarter (alternated in one process). With 4 lanes it measured no faster.
  std::vector<double> pending_max, pending_sum;
  std::vector<double*> pending_lse;
  int64_t pending = 0;
  int64_t row_width;
  static constexpr int64_t kBlock = VecIO<scalar_t>::AccVec::size();

  ForwardScratch(int64_t lanes, int64_t row_width_)
      : score(lanes), value(lanes), out(lanes), lse(lanes), length(lanes), running_max(lanes),
        denominator(lanes), numerator(lanes * row_width_), token_max(lanes), token_sum(lanes),
        token_lse(lanes), token_score(2 * lanes), weight_old(lanes), weight_new(lanes),
        inverse(lanes), block_argument(lanes * kBlock), block_exp(lanes * kBlock),
        block_max(lanes * kBlock), block_rescales(lanes * kBlock),
        pending_max(pending_capacity(lanes)),
        pending_sum(pending_capacity(lanes)), pending_lse(pending_capacity(lanes)),
        row_width(row_width_) {}

  static int64_t pending_capacity(int64_t lanes) {
    return std::max<int64_t>(kPendingLogs, lanes);
  }

  // lse = m + log u (combine.h, lse_of_wide: u = 0 gives log 0 = -inf with m = -inf) for
  // every pending token, written where it goes.
  void flush_logs() {
    using DoubleVec = Vectorized<double>;
    alignas(64) double lse_values[DoubleVec::size()];
    for (int64_t i = 0; i < pending; i += DoubleVec::size()) {
      const int64_t count = std::min<int64_t>(DoubleVec::size(), pending - i);
      const DoubleVec m = DoubleVec::loadu(pending_max.data() + i, count);
      const DoubleVec u = DoubleVec::loadu(pending_sum.data() + i, count);
      (m + u.log()).store(lse_values, count);
      for (int64_t k = 0; k < count; ++k) {
        *pending_lse[i + k] = lse_values[k];
      }
    }
    pending = 0;
  }

  // Token n's lse, computed into token_lse, to each lane that has a token n (lanes whose lse
  // entries are not adjacent: chunks of a split sequence); lse_step: elements per token.
  void scatter_token_lse(int64_t lanes, int64_t n, int64_t lse_step) {
    for (int64_t j = 0; j < lanes; ++j) {
      if (n < length[j]) {
        lse[j][n * lse_step] = token_lse[j];
      }
    }
  }

  // Lane j starts from the state (L0, o0) (null: the empty state): aaren/walk.h's enter_state.
  void enter(int64_t j, int64_t head_dim, const double* state_lse, const double* state_out) {
    sum_t* w_row = numerator.data() + j * row_width;
    std::fill(w_row + head_dim, w_row + row_width, sum_t(0));  // the padding of the row
    enter_state(state_lse, state_out, head_dim, running_max[j], denominator[j], w_row);
  }

  // Lane j's (L, o) after its last token, unrounded (aaren/walk.h's leave_state).
  double leave(int64_t j, int64_t head_dim, double* out_row) const {
    return leave_state(running_max[j], denominator[j], numerator.data() + j * row_width,
                       head_dim, out_row);
  }
};

// Per-token strides of the forward's tensors, in elements.
struct ForwardSteps {
  int64_t score, value, out, lse;
};

// a b + c, fused where the instruction set has a fused multiply-add, as the vectors'
// at::vec::fmadd is: a lane's sum rounds alike whichever forward_lanes path takes it.
template <typename T>
inline T fused_multiply_add(T a, T b, T c) {
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  return std::fma(a, b, c);
#else
  return a * b + c;
#endif
}

// add_score (combine.h) for a vector of lanes, each with its score and running max m;
// updates m and gives the weights (take_scores adds them to the float64 u). Branch-free: the
// side holding the maximum has weight exactly 1, the other e^(low - high), 0 when
// low = -inf (never -inf - -inf); a NaN on either side gives NaN.
// forward_lanes_per_lane forms the same differences, exps and sums lane by lane (see the top
// of the file).
template <typename Vec>
inline void add_scores(const Vec& score, Vec& max, Vec& weight_old, Vec& weight_new) {
  using T = typename Vec::value_type;
  const Vec zero(T(0));
  const Vec one(T(1));
  const Vec score_below = score <= max;
  const Vec low = Vec::blendv(max, score, score_below);
  const Vec high = Vec::blendv(score, max, score_below);
  const Vec rescale = Vec::blendv((low - high).exp(), zero, low == Vec(negative_infinity<T>()));
  const Vec unordered = score.isnan() | max.isnan();
  const Vec nan = score + max;
  weight_old = Vec::blendv(Vec::blendv(rescale, one, score_below), nan, unordered);
  weight_new = Vec::blendv(Vec::blendv(one, rescale, score_below), nan, unordered);
  max = Vec::blendv(high, nan, unordered);
}

// 1/u per lane, 0 while nothing has been seen (combine.h, reciprocal_or_zero).
template <typename Vec>
inline Vec inverse_or_zero(const Vec& sum) {
  using T = typename Vec::value_type;
  return Vec::blendv(Vec(T(1)) / sum, Vec(T(0)), sum == Vec(T(0)));
}

// Lane j's score of its token n into t.token_score (one of two buffers, by n's parity: they
// are filled a token ahead, so that the vector load of the scores does not wait on these
// scalar stores), -inf past the lane's last token: weights (1, 0), its (m, u) unchanged.
template <typename scalar_t>
void gather_scores(ForwardScratch<scalar_t>& t, int64_t lanes, int64_t n,
                   const ForwardSteps& steps) {
  using acc_t = typename VecIO<scalar_t>::acc_t;
  acc_t* scores = t.token_score.data() + (n % 2) * lanes;
  for (int64_t j = 0; j < lanes; ++j) {
    scores[j] = n < t.length[j] ? static_cast<acc_t>(t.score[j][n * steps.score])
                                : negative_infinity<acc_t>();
  }
}

// Lane j takes in its token n (scores gathered): the weights (combine.h, add_score) that
// rescale its running (m, u, w), its updated (m, u) (u <- w_old u + w_new in float64) and,
// with kOutputs, 1/u and its lse = m + log u, written to lse_out, all as vectors over the
// lanes, in registers (a vector filled lane by lane through memory waits for the stores to
// reach the cache: perf put three quarters of the lse's time on such a load). Lane by lane,
// with glibc's exp and a division per lane, the forward took 1.35-1.4x this time at
// 8x2048x16x32 in half precision and 1.1-1.2x in float32 (one thread, alternated in one
// process).
template <typename scalar_t, bool kOutputs>
void take_scores(ForwardScratch<scalar_t>& t, int64_t lanes, int64_t n, double* lse_out,
                 bool streaming) {
  using acc_t = typename VecIO<scalar_t>::acc_t;
  using AccVec = Vectorized<acc_t>;
  using DoubleVec = Vectorized<double>;
  const acc_t* scores = t.token_score.data() + (n % 2) * lanes;
  for (int64_t j = 0; j < lanes; j += AccVec::size()) {
    const int64_t count = std::min<int64_t>(AccVec::size(), lanes - j);
    const AccVec score = AccVec::loadu(scores + j, count);
    AccVec max = AccVec::loadu(t.running_max.data() + j, count);
    AccVec weight_old, weight_new;
    add_scores(score, max, weight_old, weight_new);
    max.store(t.running_max.data() + j, count);
    weight_old.store(t.weight_old.data() + j, count);
    weight_new.store(t.weight_new.data() + j, count);
    // u in float64, a float64 vector at a time (two for float32 lanes).
    DoubleVec old_parts[2];
    DoubleVec new_parts[2];
    DoubleVec max_parts[2];
    const int parts = widen(weight_old, old_parts);
    widen(weight_new, new_parts);
    if constexpr (kOutputs) {
      widen(max, max_parts);
    }
    for (int p = 0; p < parts; ++p) {
      const int64_t first = j + p * DoubleVec::size();
      const int64_t part_count = std::min<int64_t>(DoubleVec::size(), lanes - first);
      if (part_count <= 0) {
        break;
      }
      const DoubleVec sum = at::vec::fmadd(
          old_parts[p], DoubleVec::loadu(t.denominator.data() + first, part_count), new_parts[p]);
      sum.store(t.denominator.data() + first, part_count);
      if constexpr (kOutputs) {
        // 1/u, 0 while nothing has been seen (combine.h, reciprocal_or_zero).
        inverse_or_zero(sum).store(t.inverse.data() + first, part_count);
        // lse = m + log u in float64 (combine.h, lse_of_wide): u = 0 gives log 0 = -inf
        // with m = -inf.
        store_vector(lse_out + first, max_parts[p] + sum.log(), part_count, streaming);
      }
    }
  }
}

// Lane j's row at its token n: w <- weight_old w + weight_new v and, with kOutputs,
// out = w (1/u), with inverse = 1/u in float64 (combine.h, reciprocal_or_zero), rounded to the
// row's sum_t (combine.h, inverse_of_sum). Shared by
// forward_lanes_per_lane and forward_lanes_by_vectors. A float64 row of float32 values
// (sum_t double, acc_t float) takes each vector of values as two float64 vectors and rounds
// out back to float32 once.
template <typename scalar_t, bool kOutputs>
inline void update_row(ForwardScratch<scalar_t>& t, int64_t j, int64_t n, int64_t head_dim,
                       const ForwardSteps& steps, typename VecIO<scalar_t>::acc_t weight_old,
                       typename VecIO<scalar_t>::acc_t weight_new, double inverse,
                       bool streaming) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using AccVec = typename IO::AccVec;
  using sum_t = typename ForwardScratch<scalar_t>::sum_t;
  using SumVec = Vectorized<sum_t>;
  constexpr int64_t acc_width = AccVec::size();
  constexpr int64_t sum_width = SumVec::size();
  const scalar_t* v_row = t.value[j] + n * steps.value;
  scalar_t* o_row = kOutputs ? t.out[j] + n * steps.out : nullptr;
  sum_t* w_row = t.numerator.data() + j * t.row_width;
  const SumVec old_vec(static_cast<sum_t>(weight_old));
  const SumVec new_vec(static_cast<sum_t>(weight_new));
  const SumVec inverse_vec(static_cast<sum_t>(inverse));
  for (int64_t d = 0; d < head_dim; d += IO::width) {
    const int64_t count = std::min(IO::width, head_dim - d);
    AccVec v[IO::parts];
    AccVec o[IO::parts];
    IO::load(v_row + d, count, v);
    for (int p = 0; p < IO::parts; ++p) {
      sum_t* w_ptr = w_row + d + p * acc_width;
      if constexpr (std::is_same_v<sum_t, acc_t>) {
        const SumVec updated = at::vec::fmadd(old_vec, SumVec::loadu(w_ptr), new_vec * v[p]);
        updated.store(w_ptr);
        if constexpr (kOutputs) {
          o[p] = updated * inverse_vec;
        }
      } else {
        static_assert(acc_width == 2 * sum_width);
        SumVec wide[2];
        SumVec out_parts[2];
        widen(v[p], wide);
        for (int q = 0; q < 2; ++q) {
          const SumVec updated = at::vec::fmadd(old_vec, SumVec::loadu(w_ptr + q * sum_width),
                                                new_vec * wide[q]);
          updated.store(w_ptr + q * sum_width);
          if constexpr (kOutputs) {
            out_parts[q] = updated * inverse_vec;
          }
        }
        if constexpr (kOutputs) {
          o[p] = narrow(out_parts);
        }
      }
    }
    if constexpr (kOutputs) {
      IO::store(o_row + d, count, o, streaming);
    }
  }
}

// forward_lanes for lanes too few to fill half a vector of take_scores (by vectors, 3 lanes
// ran 24-32% slower than lane by lane, one lane twice as slow). Each lane's exps are taken a
// block of tokens at a time, as one vector: their arguments need only the running max before
// each token, a scalar walk over the block's scores (add_score's cases: the score at or below
// the max, above it, or NaN). Against glibc's exp per token, one to four sequences ran 0-8%
// faster in float32 and 5-17% faster in bfloat16 (1x16384x2x64 0.83x the time).
template <typename scalar_t, bool kOutputs>
void forward_lanes_per_lane(ForwardScratch<scalar_t>& t, int64_t lanes, int64_t head_dim,
                            const ForwardSteps& steps, bool lanes_adjacent, bool streaming) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using AccVec = typename IO::AccVec;
  using DoubleVec = Vectorized<double>;
  constexpr int64_t block = ForwardScratch<scalar_t>::kBlock;
  const int64_t longest = *std::max_element(t.length.begin(), t.length.begin() + lanes);
  // A token's logs fill at most a quarter of a vector: they wait for others' (flush_logs).
  const bool batch_logs = 4 * lanes <= DoubleVec::size();
  const acc_t minus_infinity = negative_infinity<acc_t>();

  for (int64_t n0 = 0; n0 < longest; n0 += block) {
    const int64_t tokens = std::min(block, longest - n0);
    for (int64_t j = 0; j < lanes; ++j) {
      acc_t* argument = t.block_argument.data() + j * block;
      acc_t* max_after = t.block_max.data() + j * block;
      int8_t* rescales = t.block_rescales.data() + j * block;
      acc_t max = t.running_max[j];
      const int64_t own = std::clamp<int64_t>(t.length[j] - n0, 0, tokens);
      for (int64_t k = 0; k < own; ++k) {
        const acc_t score = static_cast<acc_t>(t.score[j][(n0 + k) * steps.score]);
        if (score <= max) {  // weights (1, e^(s - m)); e^-inf = 0 (never -inf - -inf)
          argument[k] = score == minus_infinity ? minus_infinity : score - max;
          rescales[k] = 0;
        } else if (score > max) {  // a new maximum: weights (e^(m - s), 1)
          argument[k] = max == minus_infinity ? minus_infinity : max - score;
          max = score;
          rescales[k] = 1;
        } else {  // NaN in (either side), NaN out
          max = score + max;
          argument[k] = max;
          rescales[k] = 2;
        }
        max_after[k] = max;
      }
      std::fill(argument + own, argument + block, acc_t(0));
      t.running_max[j] = max;
      AccVec::loadu(argument).exp().store(t.block_exp.data() + j * block);
    }
    for (int64_t k = 0; k < tokens; ++k) {
      const int64_t n = n0 + k;
      for (int64_t j = 0; j < lanes; ++j) {
        if (n >= t.length[j]) {  // a shorter lane (the last chunk): a harmless (m, u) for the log
          t.token_max[j] = 0;
          t.token_sum[j] = 1;
          continue;
        }
        const acc_t e = t.block_exp[j * block + k];
        const int8_t rescale = t.block_rescales[j * block + k];
        const acc_t nan = t.block_argument[j * block + k];
        const acc_t weight_old = rescale == 0 ? acc_t(1) : rescale == 1 ? e : nan;
        const acc_t weight_new = rescale == 0 ? e : rescale == 1 ? acc_t(1) : nan;
        t.denominator[j] = fused_multiply_add(static_cast<double>(weight_old), t.denominator[j],
                                              static_cast<double>(weight_new));
        if constexpr (kOutputs) {
          t.token_max[j] = t.block_max[j * block + k];
          t.token_sum[j] = t.denominator[j];
        }
        const double inverse = kOutputs ? reciprocal_or_zero(t.denominator[j]) : 0.0;
        update_row<scalar_t, kOutputs>(t, j, n, head_dim, steps, weight_old, weight_new, inverse,
                                       streaming);
      }
      if (kOutputs && batch_logs) {
        if (t.pending + lanes > static_cast<int64_t>(t.pending_max.size())) {
          t.flush_logs();
        }
        for (int64_t j = 0; j < lanes; ++j) {
          if (n < t.length[j]) {
            t.pending_max[t.pending] = t.token_max[j];
            t.pending_sum[t.pending] = t.token_sum[j];
            t.pending_lse[t.pending] = t.lse[j] + n * steps.lse;
            ++t.pending;
          }
        }
      } else if constexpr (kOutputs) {
        // lse = m + log u (combine.h, lse_of_wide): u = 0 gives log 0 = -inf with m = -inf.
        double* lse_out = lanes_adjacent ? t.lse[0] + n * steps.lse : t.token_lse.data();
        for (int64_t j = 0; j < lanes; j += DoubleVec::size()) {
          const int64_t count = std::min<int64_t>(DoubleVec::size(), lanes - j);
          const DoubleVec m = DoubleVec::loadu(t.token_max.data() + j, count);
          const DoubleVec u = DoubleVec::loadu(t.token_sum.data() + j, count);
          store_vector(lse_out + j, m + u.log(), count, streaming && lanes_adjacent);
        }
        if (!lanes_adjacent) {
          t.scatter_token_lse(lanes, n, steps.lse);
        }
      }
    }
  }
  if constexpr (kOutputs) {
    t.flush_logs();
  }
  if (streaming) {
    stream_fence();
  }
}

// forward_lanes with take_scores: the lanes' scores as vectors, then their rows. A lane past
// its last token (the last chunk of a split) takes a score of -inf: weights (1, 0).
template <typename scalar_t, bool kOutputs>
void forward_lanes_by_vectors(ForwardScratch<scalar_t>& t, int64_t lanes, int64_t head_dim,
                              const ForwardSteps& steps, bool lanes_adjacent, bool streaming) {
  const int64_t longest = *std::max_element(t.length.begin(), t.length.begin() + lanes);
  gather_scores(t, lanes, 0, steps);
  for (int64_t n = 0; n < longest; ++n) {
    double* lse_out = lanes_adjacent ? t.lse[0] + n * steps.lse : t.token_lse.data();
    take_scores<scalar_t, kOutputs>(t, lanes, n, lse_out, streaming && lanes_adjacent);
    if (n + 1 < longest) {
      gather_scores(t, lanes, n + 1, steps);
    }
    for (int64_t j = 0; j < lanes; ++j) {
      if (n < t.length[j]) {
        update_row<scalar_t, kOutputs>(t, j, n, head_dim, steps, t.weight_old[j],
                                       t.weight_new[j], t.inverse[j], streaming);
      }
    }
    if (kOutputs && !lanes_adjacent) {
      t.scatter_token_lse(lanes, n, steps.lse);
    }
  }
  if (streaming) {
    stream_fence();
  }
}

// The online softmax over the lanes' tokens, from the (m, u, w) in the scratch. kOutputs:
// writes out and lse at every token; otherwise only the final (m, u, w) matter (phase 1).
// lanes_adjacent: the lanes' lse entries are consecutive (a run of heads of one token).
// streaming: out and lse go out by streaming stores (use_streaming_stores).
template <typename scalar_t, bool kOutputs>
void forward_lanes(ForwardScratch<scalar_t>& t, int64_t lanes, int64_t head_dim,
                   const ForwardSteps& steps, bool lanes_adjacent, bool streaming) {
  if (2 * lanes >= VecIO<scalar_t>::AccVec::size()) {
    forward_lanes_by_vectors<scalar_t, kOutputs>(t, lanes, head_dim, steps, lanes_adjacent,
                                                 streaming);
  } else {
    forward_lanes_per_lane<scalar_t, kOutputs>(t, lanes, head_dim, steps, lanes_adjacent,
                                               streaming);
  }
}

}  // namespace aaren::ops::cpu::CPU_CAPABILITY
