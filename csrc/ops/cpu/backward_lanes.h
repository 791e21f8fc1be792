// The backward's walk over a task's lanes (sequences, or chunks of them), from each lane's
// last token to its first: the reverse sums of scan_kernel.cpp's "Backward" (r, S, Q), with
// each lane's row updated as vectors over D. Compiled per instruction set with the
// kernels (scan_kernel.cpp, backward_typed).
//
// Each token costs every lane two exps, w = e^(r - L_n) and e = e^(s_n - r). One glibc expf
// call each was a fifth of the bfloat16 backward at 16 heads, D = 32 (perf). They are taken
// a block of tokens per lane at a time, as one vector each (prepare_block): their arguments
// need only the saved lse, the scores and the reference r, whose lowering (combine.h,
// lower_reference) depends on the lse alone. Every lane is prepared alike, whatever the
// task's other lanes, with ATen's vector exp, which computes each element alike: a lane's bits
// do not depend on the thread count (work_plan.cpp splits the lanes into tasks by it;
// docs/design.md, "Performance on the CPU"; tests/test_cpu_backward_lanes.py).
#pragma once

#ifndef CPU_CAPABILITY
#error "backward_lanes.h belongs to the per-instruction-set kernels (scan_kernel.cpp)"
#endif

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "aaren/combine.h"
#include "ops/cpu/vec_io.h"

namespace aaren::ops::cpu::CPU_CAPABILITY {

// Asks for a row the backward will read kPrefetchTokens tokens from now. The backward walks its
// tokens from the last to the first; measured (perf, bfloat16), its loads of g, o and v stalled
// on memory although the walk has a constant stride, and prefetching them cut the backward's
// time by a quarter to a third (alternated in one process; the forward, walking up, gained
// nothing).
constexpr int64_t kPrefetchTokens = 4;

template <typename T>
void prefetch_row(const T* row, int64_t elements) {
  const char* bytes = reinterpret_cast<const char*>(row);
  for (int64_t offset = 0; offset < elements * static_cast<int64_t>(sizeof(T)); offset += 64) {
    __builtin_prefetch(bytes + offset, /*rw=*/0, /*locality=*/3);
  }
}

// A task's lanes in the backward: where each starts (its first token), how many tokens it
// has, and its sums against the reference r: S (a row) and Q = o . S - P (scan_kernel.cpp,
// "Backward"), with the out o that Q is taken against (the last token's the walk reached).
// With an initial state, also the state's sums, in float64 (with_state): S2 = sum
// e^(2 (r - L_j)) g_j (a row) and Z (combine.h, "The state's lse gradient").
template <typename scalar_t>
struct BackwardScratch {
  using acc_t = typename VecIO<scalar_t>::acc_t;
  static constexpr int64_t kBlock = VecIO<scalar_t>::AccVec::size();
  std::vector<const scalar_t*> score, value, out, grad_out;
  std::vector<const double*> lse, grad_lse;
  std::vector<scalar_t*> grad_score, grad_value;
  std::vector<int64_t> length;
  std::vector<double> reference;  // r, per lane (a log-sum: float64)
  std::vector<double> sum_q;  // float64: a scalar per lane costs little, and it sums every G
  std::vector<acc_t> sum_g;
  std::vector<const scalar_t*> out_of_q;  // the out row Q is taken against
  std::vector<double> rounded_carry;       // a carried S as the walk holds it (scan_kernel.cpp)
  std::vector<double> sum_g2;              // S2, per lane a row (with a state only)
  std::vector<double> sum_state;           // Z, per lane
  std::vector<const double*> state_out;    // o_0, per lane
  // A block of kBlock tokens per lane, going back (prepare_block): the factor the sums are
  // multiplied by before each token's term (1 but where r is lowered), and its w and e. Two
  // slots, [2, lanes, kBlock]: the walk reads one while the next block is prepared in the other.
  std::vector<acc_t> block_factor, block_weight, block_score_weight;
  // With a state, the same in float64 for the state's sums (with_state); the factor as its
  // log, 0 but where r is lowered (rarely: its exp is taken then, in the walk).
  std::vector<double> block_log_factor64, block_weight64, block_score_weight64;
  int64_t lanes;
  int64_t row_width;

  BackwardScratch(int64_t lanes_, int64_t row_width_)
      : score(lanes_), value(lanes_), out(lanes_), grad_out(lanes_), lse(lanes_), grad_lse(lanes_),
        grad_score(lanes_), grad_value(lanes_), length(lanes_), reference(lanes_), sum_q(lanes_),
        sum_g(lanes_ * row_width_), out_of_q(lanes_), rounded_carry(row_width_),
        block_factor(2 * lanes_ * kBlock), block_weight(2 * lanes_ * kBlock),
        block_score_weight(2 * lanes_ * kBlock), lanes(lanes_), row_width(row_width_) {}

  // Makes room for the state's sums.
  void with_state() {
    sum_g2.assign(lanes * row_width, 0.0);
    sum_state.assign(lanes, 0.0);
    state_out.assign(lanes, nullptr);
    block_log_factor64.assign(2 * lanes * kBlock, 0.0);
    block_weight64.assign(2 * lanes * kBlock, 0.0);
    block_score_weight64.assign(2 * lanes * kBlock, 0.0);
  }

  // Where lane j's block is in the block arrays, in slot 0 or 1.
  int64_t block_offset(int64_t slot, int64_t j) const {
    return (slot * lanes + j) * kBlock;
  }
};

// Per-token strides of the backward's tensors, in elements.
struct BackwardSteps {
  int64_t score, value, out, grad_out, lse, grad_lse, grad_score, grad_value;
};

// e^hi (1 + lo) for a block of split differences (combine.h, exp_of_difference_wide's
// formula, with the vector exp), into `result`.
template <typename acc_t>
void exp_of_split_differences(const acc_t* hi, const acc_t* lo, acc_t* result) {
  using AccVec = Vectorized<acc_t>;
  const AccVec e = AccVec::loadu(hi).exp();
  (e * (AccVec(acc_t(1)) + AccVec::loadu(lo))).store(result);
}

// The float64 log factor, w = e^(r - L) and e = e^(s - r) of a block for the state's sums,
// from the block's lse, scores and reference at each token (r before the block:
// first_reference); tokens past `own` and masked ones (L = -inf) get w = e = 0 and factor 1.
template <bool kOutputs, int64_t block>
void prepare_state_block(const double* lse, const double* score, const double* reference,
                         int64_t own, double first_reference, double* log_factor, double* weight,
                         double* score_weight) {
  using DoubleVec = Vectorized<double>;
  static_assert(block % DoubleVec::size() == 0);
  alignas(64) double weight_arg[block], score_arg[block];
  bool live[block];
  double previous = first_reference;
  for (int64_t k = 0; k < block; ++k) {
    live[k] = k < own && lse[k] != negative_infinity<double>();
    weight_arg[k] = live[k] ? reference[k] - lse[k] : 0.0;
    score_arg[k] = live[k] ? score[k] - reference[k] : 0.0;
    log_factor[k] = live[k] ? reference[k] - previous : 0.0;
    previous = reference[k];
  }
  for (int64_t k = 0; k < block; k += DoubleVec::size()) {
    DoubleVec::loadu(weight_arg + k).exp().store(weight + k);
    if constexpr (kOutputs) {
      DoubleVec::loadu(score_arg + k).exp().store(score_weight + k);
    }
  }
  for (int64_t k = 0; k < block; ++k) {
    if (!live[k]) {
      weight[k] = 0.0;
      score_weight[k] = 0.0;
    }
  }
}

// Lane j's factor, w and e for the tokens back0 .. back0 + tokens - 1 counted from its last
// token (those it has), into block slot `slot`, lowering its reference r as the walk will
// reach them (r runs a block ahead of the walk, which needs it no more). kOutputs: e is
// needed (phase 1 needs only the sums). A masked token (L = -inf: every token up to it is)
// gets factor 1, and the walk writes its zero gradients without w or e.
template <typename scalar_t, bool kOutputs, bool kState>
void prepare_block(BackwardScratch<scalar_t>& t, int64_t slot, int64_t j, int64_t back0,
                   int64_t tokens, const BackwardSteps& steps) {
  using acc_t = typename VecIO<scalar_t>::acc_t;
  constexpr int64_t block = BackwardScratch<scalar_t>::kBlock;
  alignas(64) acc_t weight_hi[block], weight_lo[block], score_hi[block], score_lo[block];
  const int64_t offset = t.block_offset(slot, j);
  acc_t* factor = t.block_factor.data() + offset;
  // Locals: the compiler cannot tell that the stores below leave them unchanged.
  const double* lse = t.lse[j];
  const scalar_t* score = t.score[j];
  const int64_t lse_step = steps.lse;
  const int64_t score_step = steps.score;
  const int64_t last = t.length[j] - 1 - back0;
  double reference = t.reference[j];
  const int64_t own = std::clamp<int64_t>(last + 1, 0, tokens);
  alignas(64) double lse_block[block], score_block[block];
  for (int64_t k = 0; k < own; ++k) {
    const int64_t n = last - k;
    lse_block[k] = lse[n * lse_step];
    if constexpr (kOutputs) {
      score_block[k] = static_cast<acc_t>(score[n * score_step]);
    }
  }
  std::fill(lse_block + own, lse_block + block, reference);  // e^0, unused
  std::fill(score_block + own, score_block + block, reference);
  alignas(64) double reference_block[block];  // r at each token (kState)
  std::fill(reference_block, reference_block + block, reference);
  const double first_reference = reference;
  // Mostly r stays put over a block and no token is masked: then the splits are plain loops
  // the compiler vectorizes (lane by lane, their float64 steps were half of this function).
  bool one_reference = reference != negative_infinity<double>();
  for (int64_t k = 0; k < block; ++k) {
    one_reference &= reference - lse_block[k] <= static_cast<double>(rescale_gap<acc_t>());
  }
  if (one_reference) {
    for (int64_t k = 0; k < block; ++k) {
      factor[k] = acc_t(1);
      const SplitDifference<acc_t> weight = split_difference_wide<acc_t>(reference, lse_block[k]);
      weight_hi[k] = weight.hi;
      weight_lo[k] = weight.lo;
    }
    if constexpr (kOutputs) {
      for (int64_t k = 0; k < block; ++k) {
        // s - r in float64: r may be far from 0 while s - r is not.
        const SplitDifference<acc_t> score_weight = split_difference_wide<acc_t>(score_block[k], reference);
        score_hi[k] = score_weight.hi;
        score_lo[k] = score_weight.lo;
      }
    }
  } else {
    for (int64_t k = 0; k < own; ++k) {
      const double lse_n = lse_block[k];
      if (lse_n == negative_infinity<double>()) {
        factor[k] = acc_t(1);
        weight_hi[k] = weight_lo[k] = score_hi[k] = score_lo[k] = acc_t(0);
        continue;
      }
      factor[k] = lower_reference<acc_t>(reference, lse_n);
      reference_block[k] = reference;
      const SplitDifference<acc_t> weight = split_difference_wide<acc_t>(reference, lse_n);
      weight_hi[k] = weight.hi;
      weight_lo[k] = weight.lo;
      if constexpr (kOutputs) {
        const SplitDifference<acc_t> score_weight = split_difference_wide<acc_t>(score_block[k], reference);
        score_hi[k] = score_weight.hi;
        score_lo[k] = score_weight.lo;
      }
    }
    std::fill(weight_hi + own, weight_hi + block, acc_t(0));
    std::fill(weight_lo + own, weight_lo + block, acc_t(0));
    std::fill(score_hi + own, score_hi + block, acc_t(0));
    std::fill(score_lo + own, score_lo + block, acc_t(0));
  }
  t.reference[j] = reference;
  exp_of_split_differences(weight_hi, weight_lo, t.block_weight.data() + offset);
  if constexpr (kOutputs) {
    exp_of_split_differences(score_hi, score_lo, t.block_score_weight.data() + offset);
  }
  if constexpr (kState) {
    prepare_state_block<kOutputs, block>(lse_block, score_block, reference_block, own,
                                         first_reference, t.block_log_factor64.data() + offset,
                                         t.block_weight64.data() + offset,
                                         t.block_score_weight64.data() + offset);
  }
}

// The reverse sums over the lanes' tokens, from each lane's last token to its first, from the
// (r, S, Q) in the scratch. kOutputs: writes ds and dv at every token; otherwise only the
// final sums matter (phase 1). kState: the state's sums too, S2 and (with kOutputs) Z, in
// float64. streaming: dv goes out by streaming stores (use_streaming_stores).
template <typename scalar_t, bool kOutputs, bool kState>
void backward_lanes(BackwardScratch<scalar_t>& t, int64_t lanes, int64_t head_dim,
                    const BackwardSteps& steps, bool streaming) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using AccVec = typename IO::AccVec;
  constexpr int64_t acc_width = AccVec::size();
  constexpr int64_t block = BackwardScratch<scalar_t>::kBlock;
  const auto sum_lanes = [](const AccVec& x) {
    return at::vec::vec_reduce_all<acc_t>([](const AccVec& p, const AccVec& q) { return p + q; }, x);
  };
  const int64_t longest = *std::max_element(t.length.begin(), t.length.begin() + lanes);

  for (int64_t j = 0; j < lanes; ++j) {
    prepare_block<scalar_t, kOutputs, kState>(t, 0, j, 0, std::min(block, longest), steps);
  }
  for (int64_t back0 = 0, slot = 0; back0 < longest; back0 += block, slot ^= 1) {
    const int64_t tokens = std::min(block, longest - back0);
    const int64_t next_tokens = std::min(block, longest - back0 - block);  // <= 0: none
    for (int64_t k = 0; k < tokens; ++k) {
      const int64_t back = back0 + k;
      for (int64_t j = 0; j < lanes; ++j) {
        // Lane j's next block is prepared at token j mod kBlock of this one (a full block,
        // when there is a next), spread over the walk: prepared all at once, between
        // blocks, the rows' loads waited (float32 ran 3% slower than with glibc's exp).
        if (next_tokens > 0 && k == j % block) {
          prepare_block<scalar_t, kOutputs, kState>(t, slot ^ 1, j, back0 + block, next_tokens, steps);
        }
        if (back >= t.length[j]) {
          continue;
        }
        const int64_t at = t.block_offset(slot, j) + k;
        const int64_t n = t.length[j] - 1 - back;
        scalar_t* dv_row = kOutputs ? t.grad_value[j] + n * steps.grad_value : nullptr;
        if (t.lse[j][n * steps.lse] == negative_infinity<double>()) {
          // Every token up to here is masked: gradients are exactly zero.
          if constexpr (kOutputs) {
            t.grad_score[j][n * steps.grad_score] = scalar_t(0);
            std::fill_n(dv_row, head_dim, scalar_t(0));
          }
          continue;
        }
        acc_t* s_row = t.sum_g.data() + j * t.row_width;
        const acc_t factor = t.block_factor[at];
        if (factor != acc_t(1)) {
          std::for_each(s_row, s_row + t.row_width, [factor](acc_t& x) { x *= factor; });
          t.sum_q[j] *= factor;
          if constexpr (kState) {  // S2 holds e^(2 r), Z e^r (combine.h, "The state's lse gradient")
            const double factor64 = std::exp(t.block_log_factor64[at]);
            const double factor2 = factor64 * factor64;
            double* s2_row = t.sum_g2.data() + j * t.row_width;
            std::for_each(s2_row, s2_row + t.row_width, [factor2](double& x) { x *= factor2; });
            t.sum_state[j] *= factor64;
          }
        }
        const acc_t w = t.block_weight[at];  // <= e^gap
        const AccVec weight(w);
        AccVec q_step(0);          // (o_n - o_{n+1}) . S_{n+1}
        AccVec v_dot_s(0);         // (v_n - o_n) . S_n
        // The state's sums, float64: S2 += w^2 g, state_dot = (o_0 - v_n) . S2, a partial sum
        // per vector lane (summed in order after the row: deterministic, and vectorizable).
        const double w64 = kState ? t.block_weight64[at] : 0.0;
        const double weight2 = w64 * w64;
        alignas(64) double state_dot[acc_width] = {};
        double* s2_row = kState ? t.sum_g2.data() + j * t.row_width : nullptr;
        const double* o0_row = kState ? t.state_out[j] : nullptr;
        const scalar_t* q_out_row = t.out_of_q[j];  // o_{n+1} (loaded a token ago: cached)
        const scalar_t* g_row = t.grad_out[j] + n * steps.grad_out;
        const scalar_t* o_row = t.out[j] + n * steps.out;
        const scalar_t* v_row = t.value[j] + n * steps.value;
        if (n >= kPrefetchTokens) {
          prefetch_row(g_row - kPrefetchTokens * steps.grad_out, head_dim);
          prefetch_row(o_row - kPrefetchTokens * steps.out, head_dim);
          if constexpr (kOutputs) {
            prefetch_row(v_row - kPrefetchTokens * steps.value, head_dim);
          }
        }
        const acc_t e = kOutputs ? t.block_score_weight[at] : acc_t(0);
        const AccVec e_vec(e);
        for (int64_t d = 0; d < head_dim; d += IO::width) {
          const int64_t count = std::min(IO::width, head_dim - d);
          AccVec g[IO::parts], o[IO::parts], o_next[IO::parts], v[IO::parts], dv[IO::parts];
          IO::load(g_row + d, count, g);
          IO::load(o_row + d, count, o);
          IO::load(q_out_row + d, count, o_next);
          if constexpr (kOutputs) {
            IO::load(v_row + d, count, v);
          }
          for (int p = 0; p < IO::parts; ++p) {
            acc_t* s_ptr = s_row + d + p * acc_width;
            const AccVec s_next = AccVec::loadu(s_ptr);
            q_step = at::vec::fmadd(o[p] - o_next[p], s_next, q_step);
            const AccVec updated = at::vec::fmadd(weight, g[p], s_next);
            updated.store(s_ptr);
            if constexpr (kOutputs) {
              v_dot_s = at::vec::fmadd(v[p] - o[p], updated, v_dot_s);
              dv[p] = e_vec * updated;
            }
            if constexpr (kState) {
              const int64_t first = d + p * acc_width;
              alignas(64) acc_t g_part[acc_width], v_part[acc_width];
              g[p].store(g_part);
              double* __restrict__ s2 = s2_row + first;
              for (int64_t k = 0; k < acc_width; ++k) {
                s2[k] += weight2 * static_cast<double>(g_part[k]);
              }
              if constexpr (kOutputs) {
                v[p].store(v_part);
                const double* __restrict__ o0 = o0_row + first;
                const int64_t live = std::clamp<int64_t>(head_dim - first, 0, acc_width);
                if (live == acc_width) {  // a whole part: a fixed count the compiler vectorizes
                  for (int64_t k = 0; k < acc_width; ++k) {  // o_0 - v_n exact in float64
                    state_dot[k] += (o0[k] - static_cast<double>(v_part[k])) * s2[k];
                  }
                } else {
                  for (int64_t k = 0; k < live; ++k) {
                    state_dot[k] += (o0[k] - static_cast<double>(v_part[k])) * s2[k];
                  }
                }
              }
            }
          }
          if constexpr (kOutputs) {
            IO::store(dv_row + d, count, dv, streaming);
          }
        }
        t.out_of_q[j] = o_row;
        const double G = t.grad_lse[j][n * steps.grad_lse];
        // Q's step against the reference (combine.h, "The backward's Q"): gate 1, G weighted.
        t.sum_q[j] +=
            q_term(1.0, static_cast<double>(sum_lanes(q_step)), static_cast<double>(w) * G);
        if constexpr (kOutputs) {
          t.grad_score[j][n * steps.grad_score] = static_cast<scalar_t>(
              score_gradient(e, static_cast<double>(sum_lanes(v_dot_s)), t.sum_q[j]));
        }
        if constexpr (kState && kOutputs) {
          double dot = 0;
          for (int64_t k = 0; k < acc_width; ++k) {
            dot += state_dot[k];
          }
          t.sum_state[j] += state_term(t.block_score_weight64[at], dot, w64, G);
        }
      }
    }
  }
}

}  // namespace aaren::ops::cpu::CPU_CAPABILITY
