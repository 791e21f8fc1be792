// CPU kernels of the scan, forward and backward. This file is compiled once per CPU
// instruction set (as PyTorch compiles its own kernels: DEFAULT, AVX2, AVX512), each
// time into the namespace named by CPU_CAPABILITY; scan_cpu.cpp picks one at run time.
//
// Work is split over the B x H independent sequences with at::parallel_for; each
// sequence is one streaming pass over its tokens, vectorized over D, with the running
// output kept in an accumulator of the accumulation type (float32 for half types).
#include "ops/cpu/scan_kernel.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <vector>

#include "aaren/combine.h"

namespace aaren::ops::cpu::CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;

// Loads and stores a run of up to `width` elements of scalar_t as vectors of the
// accumulation type. Half types widen one vector into two float vectors.
template <typename scalar_t, typename = void>
struct VecIO {
  using acc_t = scalar_t;
  using AccVec = Vectorized<acc_t>;
  static constexpr int64_t width = AccVec::size();
  static constexpr int parts = 1;

  static void load(const scalar_t* src, int64_t count, AccVec* dst) {
    dst[0] = count == width ? AccVec::loadu(src) : AccVec::loadu(src, count);
  }
  static void store(scalar_t* dst, int64_t count, const AccVec* src) {
    if (count == width) {
      src[0].store(dst);
    } else {
      src[0].store(dst, count);
    }
  }
};

template <typename scalar_t>
struct VecIO<scalar_t, std::enable_if_t<at::vec::is_reduced_floating_point_v<scalar_t>>> {
  using acc_t = float;
  using AccVec = Vectorized<float>;
  using Vec = Vectorized<scalar_t>;
  static constexpr int64_t width = Vec::size();
  static constexpr int parts = 2;

  static void load(const scalar_t* src, int64_t count, AccVec* dst) {
    const Vec v = count == width ? Vec::loadu(src) : Vec::loadu(src, count);
    std::tie(dst[0], dst[1]) = at::vec::convert_to_float<scalar_t>(v);
  }
  static void store(scalar_t* dst, int64_t count, const AccVec* src) {
    const Vec v = at::vec::convert_from_float<scalar_t>(src[0], src[1]);
    if (count == width) {
      v.store(dst);
    } else {
      v.store(dst, count);
    }
  }
};

// Work is split into tasks of (batch, run of heads). Within a task the loop runs over
// tokens and, inside that, over the task's heads: rows [b, n, h0:h1, :] are adjacent in
// the [B, N, H, D] layout, so a task streams through memory as a copy does (one sequence
// at a time would jump H*D elements per token, defeating the hardware prefetchers), and
// the heads' independent recurrences overlap their exp/log latencies.
struct TaskSplit {
  int64_t heads_per_task;
  int64_t tasks_per_batch;
  int64_t grain;  // tasks per thread at least, so small problems stay on one thread
};

TaskSplit split_tasks(int64_t batch, int64_t length, int64_t heads, int64_t head_dim) {
  const int64_t wanted_tasks = 2 * at::get_num_threads();
  const int64_t tasks_per_batch = std::clamp<int64_t>((wanted_tasks + batch - 1) / std::max<int64_t>(batch, 1), 1, std::max<int64_t>(heads, 1));
  const int64_t heads_per_task = (heads + tasks_per_batch - 1) / tasks_per_batch;
  constexpr int64_t kMinElementsPerTask = 1 << 15;
  const int64_t task_elements = std::max<int64_t>(1, length * heads_per_task * std::max<int64_t>(head_dim, 1));
  return {heads_per_task, (heads + heads_per_task - 1) / std::max<int64_t>(heads_per_task, 1),
          std::max<int64_t>(1, kMinElementsPerTask / task_elements)};
}

int64_t padded(int64_t head_dim, int64_t width) {
  return (head_dim + width - 1) / width * width;
}

// One token after a state (a step, or a chunk of one token), in float64 against the float64
// state, whatever the values' dtype: float32 arithmetic at every step of a stream is a random
// walk (docs/design.md, "The state"). The state (L0, o0) enters as (m, u, w) = (L0, 1, o0).
template <typename scalar_t>
void step_in_float64(const ForwardArgs& args) {
  const int64_t batch = args.values.size(0);
  const int64_t heads = args.values.size(2);
  const int64_t head_dim = args.values.size(3);
  const scalar_t* scores = args.scores.const_data_ptr<scalar_t>();
  const scalar_t* values = args.values.const_data_ptr<scalar_t>();
  const double* state_lse = args.state_lse->const_data_ptr<double>();
  const double* state_out = args.state_out->const_data_ptr<double>();
  scalar_t* out = args.out.mutable_data_ptr<scalar_t>();
  double* lse = args.lse.mutable_data_ptr<double>();
  double* final_out = args.final_out.mutable_data_ptr<double>();
  const auto s_strides = args.scores.strides();
  const auto v_strides = args.values.strides();
  at::parallel_for(0, batch * heads, std::max<int64_t>(1, (1 << 15) / std::max<int64_t>(head_dim, 1)),
                   [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / heads;
      const int64_t h = item % heads;
      double running_max = state_lse[b * args.state_lse->stride(0) + h * args.state_lse->stride(1)];
      const bool has_prefix = running_max != negative_infinity<double>();
      const auto w = add_score(running_max, static_cast<double>(scores[b * s_strides[0] + h * s_strides[2]]));
      const double denominator = w.weight_old * (has_prefix ? 1.0 : 0.0) + w.weight_new;
      lse[b * heads + h] = lse_of_wide(running_max, denominator);
      const double inverse = reciprocal_or_zero(denominator);
      const double* o0 = state_out + b * args.state_out->stride(0) + h * args.state_out->stride(1);
      const scalar_t* v = values + b * v_strides[0] + h * v_strides[2];
      double* f_row = final_out + item * head_dim;
      scalar_t* o_row = out + item * head_dim;
      for (int64_t d = 0; d < head_dim; ++d) {
        const double numerator = (has_prefix ? w.weight_old * o0[d] : 0.0) +
                                 w.weight_new * static_cast<double>(v[d]);
        f_row[d] = numerator * inverse;
        o_row[d] = static_cast<scalar_t>(f_row[d]);
      }
    }
  });
}

template <typename scalar_t>
void forward_typed(const ForwardArgs& args) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using AccVec = typename IO::AccVec;
  constexpr int64_t acc_width = AccVec::size();

  const int64_t batch = args.values.size(0);
  const int64_t length = args.values.size(1);
  const int64_t heads = args.values.size(2);
  const int64_t head_dim = args.values.size(3);
  const int64_t row_width = padded(head_dim, IO::width);

  if (length == 1 && args.state_lse.has_value() && !std::is_same_v<acc_t, double>) {
    step_in_float64<scalar_t>(args);
    return;
  }

  const scalar_t* scores = args.scores.const_data_ptr<scalar_t>();
  const scalar_t* values = args.values.const_data_ptr<scalar_t>();
  scalar_t* out = args.out.mutable_data_ptr<scalar_t>();  // contiguous [B,N,H,D]
  using state_t = double;  // the state's out (ops/scan.h)
  double* lse = args.lse.mutable_data_ptr<double>();      // contiguous [B,N,H]
  state_t* final_out = args.final_out.mutable_data_ptr<state_t>();  // contiguous [B,H,D]
  const auto s_strides = args.scores.strides();
  const auto v_strides = args.values.strides();

  const bool has_state = args.state_lse.has_value();
  const double* state_lse = has_state ? args.state_lse->const_data_ptr<double>() : nullptr;
  const state_t* state_out = has_state ? args.state_out->const_data_ptr<state_t>() : nullptr;

  const TaskSplit split = split_tasks(batch, length, heads, head_dim);
  at::parallel_for(0, batch * split.tasks_per_batch, split.grain, [&](int64_t begin, int64_t end) {
    // Online softmax per head (see combine.h): running max, denominator, numerator row.
    std::vector<acc_t> running_max(split.heads_per_task);
    std::vector<acc_t> denominator(split.heads_per_task);
    // A token's (m, u) for the task's heads, in float64, turned into lse = m + log u with
    // one vectorized float64 log over the heads (a scalar one per head cost as much as
    // the rest of the forward).
    std::vector<double> token_max(split.heads_per_task);
    std::vector<double> token_sum(split.heads_per_task);
    std::vector<acc_t> numerator(split.heads_per_task * row_width);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / split.tasks_per_batch;
      const int64_t h_begin = (task % split.tasks_per_batch) * split.heads_per_task;
      const int64_t task_heads = std::min(split.heads_per_task, heads - h_begin);

      // The state (L0, o0) enters as (m, u, u o0) with (m, u) = max_sum_of(L0) (combine.h).
      std::fill(numerator.begin(), numerator.end(), acc_t(0));
      for (int64_t j = 0; j < task_heads; ++j) {
        const int64_t h = h_begin + j;
        running_max[j] = negative_infinity<acc_t>();
        denominator[j] = 0;
        if (!has_state) {
          continue;
        }
        const MaxSum<acc_t> entering = max_sum_of<acc_t>(
            state_lse[b * args.state_lse->stride(0) + h * args.state_lse->stride(1)]);
        running_max[j] = entering.max;
        denominator[j] = entering.sum;
        if (entering.sum != acc_t(0)) {
          const state_t* row = state_out + b * args.state_out->stride(0) + h * args.state_out->stride(1);
          for (int64_t d = 0; d < head_dim; ++d) {
            numerator[j * row_width + d] = static_cast<acc_t>(entering.sum * row[d]);
          }
        }
      }

      for (int64_t n = 0; n < length; ++n) {
        const scalar_t* score_row = scores + b * s_strides[0] + n * s_strides[1];
        const scalar_t* value_row = values + b * v_strides[0] + n * v_strides[1];
        const int64_t token = b * length + n;
        for (int64_t j = 0; j < task_heads; ++j) {
          const int64_t h = h_begin + j;
          const auto w = add_score(running_max[j], static_cast<acc_t>(score_row[h * s_strides[2]]));
          denominator[j] = w.weight_old * denominator[j] + w.weight_new;
          token_max[j] = running_max[j];
          token_sum[j] = denominator[j];
          const AccVec weight_old(w.weight_old);
          const AccVec weight_new(w.weight_new);
          const AccVec inverse(reciprocal_or_zero(denominator[j]));
          const scalar_t* v_row = value_row + h * v_strides[2];
          scalar_t* o_row = out + (token * heads + h) * head_dim;
          acc_t* w_row = numerator.data() + j * row_width;
          for (int64_t d = 0; d < head_dim; d += IO::width) {
            const int64_t count = std::min(IO::width, head_dim - d);
            AccVec v[IO::parts];
            AccVec o[IO::parts];
            IO::load(v_row + d, count, v);
            for (int p = 0; p < IO::parts; ++p) {
              acc_t* w_ptr = w_row + d + p * acc_width;
              const AccVec updated = at::vec::fmadd(weight_old, AccVec::loadu(w_ptr), weight_new * v[p]);
              updated.store(w_ptr);
              o[p] = updated * inverse;
            }
            IO::store(o_row + d, count, o);
          }
        }
        // lse = m + log u (combine.h, lse_of_wide): u = 0 gives log 0 = -inf with m = -inf.
        double* lse_row = lse + token * heads + h_begin;
        using DoubleVec = Vectorized<double>;
        for (int64_t j = 0; j < task_heads; j += DoubleVec::size()) {
          const int64_t count = std::min<int64_t>(DoubleVec::size(), task_heads - j);
          const DoubleVec m = DoubleVec::loadu(token_max.data() + j, count);
          const DoubleVec u = DoubleVec::loadu(token_sum.data() + j, count);
          (m + u.log()).store(lse_row + j, count);
        }
      }

      // The state's out after the last token, unrounded: w / u in the state's type.
      for (int64_t j = 0; j < task_heads; ++j) {
        const state_t inverse = reciprocal_or_zero(static_cast<state_t>(denominator[j]));
        const acc_t* w_row = numerator.data() + j * row_width;
        state_t* f_row = final_out + (b * heads + h_begin + j) * head_dim;
        for (int64_t d = 0; d < head_dim; ++d) {
          f_row[d] = static_cast<state_t>(w_row[d]) * inverse;
        }
      }
    }
  });
}

// The reverse recurrences of the design page, per sequence, from the last token back:
//   R_i = g_i + a_i R_{i+1},  rho_i = (g_i . o_i - G_i) + a_i rho_{i+1},  a_i = e^(L_i - L_{i+1}),
//   dv_i = e^(s_i - L_i) R_i,  ds_i = e^(s_i - L_i) (v_i . R_i - rho_i),
// and for the initial state (a token before the first): dL_0 = f (o_0 . R_1 - rho_1),
// do_0 = f R_1 with f = e^(L_0 - L_1). Unrolled, R_i = sum_{j>=i} e^(L_i - L_j) g_j: the
// kernel keeps S = sum e^(r - L_j) g_j and P = sum e^(r - L_j) (g_j . o_j - G_j) against a
// reference r (combine.h), so dv_i = e^(s_i - r) S and ds_i = e^(s_i - r) (v_i . S - P).
// With a state, dL_0 = -f P' where P' is P with the outputs shifted by o_0 (combine.h,
// rounded_state_out): a sum of small per-token terms where f (o_0 . S - P) would cancel
// two large ones. P itself stays unshifted for ds.
template <typename scalar_t>
void backward_typed(const BackwardArgs& args) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using AccVec = typename IO::AccVec;
  constexpr int64_t acc_width = AccVec::size();

  const int64_t batch = args.values.size(0);
  const int64_t length = args.values.size(1);
  const int64_t heads = args.values.size(2);
  const int64_t head_dim = args.values.size(3);
  const int64_t row_width = padded(head_dim, IO::width);

  const scalar_t* scores = args.scores.const_data_ptr<scalar_t>();
  const scalar_t* values = args.values.const_data_ptr<scalar_t>();
  const scalar_t* out = args.out.const_data_ptr<scalar_t>();  // contiguous, as forward wrote it
  const double* lse = args.lse.const_data_ptr<double>();
  const auto s_strides = args.scores.strides();
  const auto v_strides = args.values.strides();

  // An absent gradient reads as zeros: a zero row (or scalar) with stride 0.
  const std::vector<scalar_t> zero_row(row_width, scalar_t(0));
  const double zero_scalar = 0;
  const bool has_grad_out = args.grad_out.has_value();
  const scalar_t* grad_out = has_grad_out ? args.grad_out->const_data_ptr<scalar_t>() : zero_row.data();
  const int64_t g_stride_b = has_grad_out ? args.grad_out->stride(0) : 0;
  const int64_t g_stride_n = has_grad_out ? args.grad_out->stride(1) : 0;
  const int64_t g_stride_h = has_grad_out ? args.grad_out->stride(2) : 0;
  const bool has_grad_lse = args.grad_lse.has_value();
  const double* grad_lse = has_grad_lse ? args.grad_lse->const_data_ptr<double>() : &zero_scalar;
  const int64_t G_stride_b = has_grad_lse ? args.grad_lse->stride(0) : 0;
  const int64_t G_stride_n = has_grad_lse ? args.grad_lse->stride(1) : 0;
  const int64_t G_stride_h = has_grad_lse ? args.grad_lse->stride(2) : 0;

  using state_t = double;  // the state's out (ops/scan.h)
  const bool has_state = args.state_lse.has_value();
  const double* state_lse = has_state ? args.state_lse->const_data_ptr<double>() : nullptr;
  const state_t* state_out = has_state ? args.state_out->const_data_ptr<state_t>() : nullptr;

  scalar_t* grad_scores = args.grad_scores.mutable_data_ptr<scalar_t>();
  scalar_t* grad_values = args.grad_values.mutable_data_ptr<scalar_t>();
  double* grad_state_lse = args.grad_state_lse.mutable_data_ptr<double>();
  state_t* grad_state_out = args.grad_state_out.mutable_data_ptr<state_t>();

  const auto sum_lanes = [](const AccVec& x) {
    return at::vec::vec_reduce_all<acc_t>([](const AccVec& p, const AccVec& q) { return p + q; }, x);
  };

  const TaskSplit split = split_tasks(batch, length, heads, head_dim);
  at::parallel_for(0, batch * split.tasks_per_batch, split.grain, [&](int64_t begin, int64_t end) {
    std::vector<double> reference(split.heads_per_task);  // r, per head (a log-sum: float64)
    std::vector<acc_t> sum_rho(split.heads_per_task);    // P, per head
    std::vector<acc_t> sum_rho_shifted(split.heads_per_task);  // P', per head
    std::vector<acc_t> sum_g(split.heads_per_task * row_width);  // S, per head
    std::vector<acc_t> shift(split.heads_per_task * row_width);  // o_0 (rounded), per head
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / split.tasks_per_batch;
      const int64_t h_begin = (task % split.tasks_per_batch) * split.heads_per_task;
      const int64_t task_heads = std::min(split.heads_per_task, heads - h_begin);
      std::fill(sum_g.begin(), sum_g.end(), acc_t(0));
      std::fill(sum_rho.begin(), sum_rho.end(), acc_t(0));
      std::fill(sum_rho_shifted.begin(), sum_rho_shifted.end(), acc_t(0));
      std::fill(shift.begin(), shift.end(), acc_t(0));
      for (int64_t j = 0; j < task_heads; ++j) {
        const int64_t h = h_begin + j;
        reference[j] = length > 0 ? lse[((b * length + length - 1) * heads) + h] : 0.0;
        if (has_state) {
          const state_t* o0_row = state_out + b * args.state_out->stride(0) + h * args.state_out->stride(1);
          for (int64_t d = 0; d < head_dim; ++d) {
            shift[j * row_width + d] = rounded_state_out<scalar_t, acc_t>(o0_row[d]);
          }
        }
      }

      for (int64_t n = length - 1; n >= 0; --n) {
        const int64_t token = b * length + n;
        const scalar_t* score_row = scores + b * s_strides[0] + n * s_strides[1];
        for (int64_t j = 0; j < task_heads; ++j) {
          const int64_t h = h_begin + j;
          const double lse_n = lse[token * heads + h];
          scalar_t* dv_row = grad_values + (token * heads + h) * head_dim;
          if (lse_n == negative_infinity<double>()) {
            // Every token up to here is masked: gradients are exactly zero.
            grad_scores[token * heads + h] = scalar_t(0);
            std::fill_n(dv_row, head_dim, scalar_t(0));
            continue;
          }
          acc_t* s_row = sum_g.data() + j * row_width;
          const acc_t factor = lower_reference<acc_t>(reference[j], lse_n);
          if (factor != acc_t(1)) {
            std::for_each(s_row, s_row + row_width, [factor](acc_t& x) { x *= factor; });
            sum_rho[j] *= factor;
            sum_rho_shifted[j] *= factor;
          }
          const acc_t w = exp_of_difference_wide<acc_t>(reference[j], lse_n);  // <= e^gap
          // s - r in float64: r may be far from 0 while s - r is not.
          const acc_t e = exp_of_difference_wide<acc_t>(
              static_cast<double>(static_cast<acc_t>(score_row[h * s_strides[2]])), reference[j]);
          const AccVec weight(w);
          const AccVec e_vec(e);
          AccVec g_dot_o(0);
          AccVec g_dot_shifted_o(0);  // g . (o - o_0), with a state
          AccVec v_dot_s(0);
          const scalar_t* g_row = grad_out + b * g_stride_b + n * g_stride_n + h * g_stride_h;
          const scalar_t* o_row = out + (token * heads + h) * head_dim;
          const scalar_t* v_row = values + b * v_strides[0] + n * v_strides[1] + h * v_strides[2];
          const acc_t* shift_row = shift.data() + j * row_width;
          for (int64_t d = 0; d < head_dim; d += IO::width) {
            const int64_t count = std::min(IO::width, head_dim - d);
            AccVec g[IO::parts], o[IO::parts], v[IO::parts], dv[IO::parts];
            IO::load(g_row + d, count, g);
            IO::load(o_row + d, count, o);
            IO::load(v_row + d, count, v);
            for (int p = 0; p < IO::parts; ++p) {
              if (has_state) {
                const AccVec o0 = AccVec::loadu(shift_row + d + p * acc_width);
                g_dot_shifted_o = at::vec::fmadd(g[p], o[p] - o0, g_dot_shifted_o);
              }
              acc_t* s_ptr = s_row + d + p * acc_width;
              const AccVec updated = at::vec::fmadd(weight, g[p], AccVec::loadu(s_ptr));
              updated.store(s_ptr);
              g_dot_o = at::vec::fmadd(g[p], o[p], g_dot_o);
              v_dot_s = at::vec::fmadd(v[p], updated, v_dot_s);
              dv[p] = e_vec * updated;
            }
            IO::store(dv_row + d, count, dv);
          }
          const acc_t G = static_cast<acc_t>(grad_lse[b * G_stride_b + n * G_stride_n + h * G_stride_h]);
          sum_rho[j] += w * (sum_lanes(g_dot_o) - G);
          if (has_state) {
            sum_rho_shifted[j] += w * (sum_lanes(g_dot_shifted_o) - G);
          }
          grad_scores[token * heads + h] = static_cast<scalar_t>(e * (sum_lanes(v_dot_s) - sum_rho[j]));
        }
      }

      // The initial state as a token before the first: f R_1 = e^(L_0 - r) S, and with
      // outputs shifted by o_0, dL_0 = f ((o_0 - o_0) . R_1 - rho'_1) = -f P'.
      for (int64_t j = 0; j < task_heads; ++j) {
        const int64_t h = h_begin + j;
        const double lse_0 = has_state
            ? state_lse[b * args.state_lse->stride(0) + h * args.state_lse->stride(1)]
            : negative_infinity<double>();
        const acc_t f = length == 0 ? acc_t(0) : exp_of_difference_wide<acc_t>(lse_0, reference[j]);
        const acc_t* s_row = sum_g.data() + j * row_width;
        state_t* do0_row = grad_state_out + (b * heads + h) * head_dim;
        for (int64_t d = 0; d < head_dim; ++d) {
          do0_row[d] = static_cast<state_t>(f * s_row[d]);
        }
        grad_state_lse[b * heads + h] = static_cast<double>(-f * sum_rho_shifted[j]);
      }
    }
  });
}

}  // namespace

void scan_forward(const ForwardArgs& args) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, args.values.scalar_type(),
                                  "aaren_scan_forward_cpu", [&] { forward_typed<scalar_t>(args); });
}

void scan_backward(const BackwardArgs& args) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, args.values.scalar_type(),
                                  "aaren_scan_backward_cpu", [&] { backward_typed<scalar_t>(args); });
}

}  // namespace aaren::ops::cpu::CPU_CAPABILITY
