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

// Sequences per parallel task: enough tokens x features that a task outweighs the
// cost of handing it out.
int64_t grain_size(int64_t length, int64_t head_dim) {
  constexpr int64_t kMinElementsPerTask = 1 << 14;
  return std::max<int64_t>(1, kMinElementsPerTask / std::max<int64_t>(1, length * head_dim));
}

int64_t padded(int64_t head_dim, int64_t width) {
  return (head_dim + width - 1) / width * width;
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

  const scalar_t* scores = args.scores.const_data_ptr<scalar_t>();
  const scalar_t* values = args.values.const_data_ptr<scalar_t>();
  scalar_t* out = args.out.mutable_data_ptr<scalar_t>();
  acc_t* lse = args.lse.mutable_data_ptr<acc_t>();
  const auto s_strides = args.scores.strides();
  const auto v_strides = args.values.strides();
  // out [B,N,H,D] and lse [B,N,H] are contiguous.
  const int64_t out_n = heads * head_dim;
  const int64_t lse_n = heads;

  const bool has_state = args.state_lse.has_value();
  const acc_t* state_lse = has_state ? args.state_lse->const_data_ptr<acc_t>() : nullptr;
  const scalar_t* state_out = has_state ? args.state_out->const_data_ptr<scalar_t>() : nullptr;

  at::parallel_for(0, batch * heads, grain_size(length, head_dim), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> numerator(padded(head_dim, IO::width));
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / heads;
      const int64_t h = bh % heads;
      // Online softmax (see combine.h): the state (L0, o0) is (max L0, denominator 1, numerator o0).
      acc_t running_max = negative_infinity<acc_t>();
      acc_t denominator = 0;
      std::fill(numerator.begin(), numerator.end(), acc_t(0));
      if (has_state) {
        running_max = state_lse[b * args.state_lse->stride(0) + h * args.state_lse->stride(1)];
        if (running_max != negative_infinity<acc_t>()) {
          denominator = 1;
          const scalar_t* row =
              state_out + b * args.state_out->stride(0) + h * args.state_out->stride(1);
          for (int64_t d = 0; d < head_dim; ++d) {
            numerator[d] = static_cast<acc_t>(row[d]);
          }
        }
      }
      const scalar_t* score_ptr = scores + b * s_strides[0] + h * s_strides[2];
      const scalar_t* value_ptr = values + b * v_strides[0] + h * v_strides[2];
      scalar_t* out_ptr = out + (b * length * heads + h) * head_dim;
      acc_t* lse_ptr = lse + b * length * heads + h;

      for (int64_t n = 0; n < length; ++n) {
        const auto w = add_score(running_max, static_cast<acc_t>(score_ptr[n * s_strides[1]]));
        denominator = w.weight_old * denominator + w.weight_new;
        lse_ptr[n * lse_n] = lse_of(running_max, denominator);
        const AccVec weight_old(w.weight_old);
        const AccVec weight_new(w.weight_new);
        const AccVec inverse(reciprocal_or_zero(denominator));
        const scalar_t* v_row = value_ptr + n * v_strides[1];
        scalar_t* o_row = out_ptr + n * out_n;
        for (int64_t d = 0; d < head_dim; d += IO::width) {
          const int64_t count = std::min(IO::width, head_dim - d);
          AccVec v[IO::parts];
          AccVec o[IO::parts];
          IO::load(v_row + d, count, v);
          for (int p = 0; p < IO::parts; ++p) {
            acc_t* w_ptr = numerator.data() + d + p * acc_width;
            const AccVec updated = at::vec::fmadd(weight_old, AccVec::loadu(w_ptr), weight_new * v[p]);
            updated.store(w_ptr);
            o[p] = updated * inverse;
          }
          IO::store(o_row + d, count, o);
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
  const scalar_t* out = args.out.const_data_ptr<scalar_t>();
  const acc_t* lse = args.lse.const_data_ptr<acc_t>();
  const auto s_strides = args.scores.strides();
  const auto v_strides = args.values.strides();

  // An absent gradient reads as zeros: a zero row (or scalar) with stride 0.
  const std::vector<scalar_t> zero_row(row_width, scalar_t(0));
  const acc_t zero_scalar = 0;
  const bool has_grad_out = args.grad_out.has_value();
  const scalar_t* grad_out = has_grad_out ? args.grad_out->const_data_ptr<scalar_t>() : zero_row.data();
  const int64_t g_stride_b = has_grad_out ? args.grad_out->stride(0) : 0;
  const int64_t g_stride_n = has_grad_out ? args.grad_out->stride(1) : 0;
  const int64_t g_stride_h = has_grad_out ? args.grad_out->stride(2) : 0;
  const bool has_grad_lse = args.grad_lse.has_value();
  const acc_t* grad_lse = has_grad_lse ? args.grad_lse->const_data_ptr<acc_t>() : &zero_scalar;
  const int64_t G_stride_b = has_grad_lse ? args.grad_lse->stride(0) : 0;
  const int64_t G_stride_n = has_grad_lse ? args.grad_lse->stride(1) : 0;
  const int64_t G_stride_h = has_grad_lse ? args.grad_lse->stride(2) : 0;

  const bool has_state = args.state_lse.has_value();
  const acc_t* state_lse = has_state ? args.state_lse->const_data_ptr<acc_t>() : nullptr;
  const scalar_t* state_out = has_state ? args.state_out->const_data_ptr<scalar_t>() : nullptr;

  scalar_t* grad_scores = args.grad_scores.mutable_data_ptr<scalar_t>();
  scalar_t* grad_values = args.grad_values.mutable_data_ptr<scalar_t>();
  acc_t* grad_state_lse = args.grad_state_lse.mutable_data_ptr<acc_t>();
  scalar_t* grad_state_out = args.grad_state_out.mutable_data_ptr<scalar_t>();

  at::parallel_for(0, batch * heads, grain_size(length, head_dim), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> sum_g(row_width);  // S
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / heads;
      const int64_t h = bh % heads;
      std::fill(sum_g.begin(), sum_g.end(), acc_t(0));
      acc_t sum_rho = 0;  // P

      const scalar_t* score_ptr = scores + b * s_strides[0] + h * s_strides[2];
      const scalar_t* value_ptr = values + b * v_strides[0] + h * v_strides[2];
      const int64_t out_offset = (b * length * heads + h) * head_dim;  // contiguous outputs
      const acc_t* lse_ptr = lse + b * length * heads + h;
      const scalar_t* g_ptr = grad_out + b * g_stride_b + h * g_stride_h;
      const acc_t* G_ptr = grad_lse + b * G_stride_b + h * G_stride_h;
      scalar_t* ds_ptr = grad_scores + b * length * heads + h;
      acc_t reference = length > 0 ? lse_ptr[(length - 1) * heads] : acc_t(0);

      int64_t n = length - 1;
      for (; n >= 0; --n) {
        const acc_t lse_n = lse_ptr[n * heads];
        if (lse_n == negative_infinity<acc_t>()) {
          break;  // everything up to here is masked: gradients are exactly zero
        }
        const acc_t factor = lower_reference(reference, lse_n);
        if (factor != acc_t(1)) {
          for (auto& x : sum_g) {
            x *= factor;
          }
          sum_rho *= factor;
        }
        const acc_t w = std::exp(reference - lse_n);  // <= e^gap
        const AccVec weight(w);
        const acc_t e = exp_of_difference(static_cast<acc_t>(score_ptr[n * s_strides[1]]), reference);
        const AccVec e_vec(e);
        AccVec g_dot_o(0);
        AccVec v_dot_s(0);
        const scalar_t* g_row = g_ptr + n * g_stride_n;
        const scalar_t* o_row = out + out_offset + n * heads * head_dim;
        const scalar_t* v_row = value_ptr + n * v_strides[1];
        scalar_t* dv_row = grad_values + out_offset + n * heads * head_dim;
        for (int64_t d = 0; d < head_dim; d += IO::width) {
          const int64_t count = std::min(IO::width, head_dim - d);
          AccVec g[IO::parts], o[IO::parts], v[IO::parts], dv[IO::parts];
          IO::load(g_row + d, count, g);
          IO::load(o_row + d, count, o);
          IO::load(v_row + d, count, v);
          for (int p = 0; p < IO::parts; ++p) {
            acc_t* s_ptr = sum_g.data() + d + p * acc_width;
            const AccVec updated = at::vec::fmadd(weight, g[p], AccVec::loadu(s_ptr));
            updated.store(s_ptr);
            g_dot_o = at::vec::fmadd(g[p], o[p], g_dot_o);
            v_dot_s = at::vec::fmadd(v[p], updated, v_dot_s);
            dv[p] = e_vec * updated;
          }
          IO::store(dv_row + d, count, dv);
        }
        const auto sum = [](const AccVec& x) {
          return at::vec::vec_reduce_all<acc_t>([](const AccVec& p, const AccVec& q) { return p + q; }, x);
        };
        sum_rho += w * (sum(g_dot_o) - G_ptr[n * G_stride_n]);
        ds_ptr[n * heads] = static_cast<scalar_t>(e * (sum(v_dot_s) - sum_rho));
      }
      for (; n >= 0; --n) {  // the masked prefix
        ds_ptr[n * heads] = scalar_t(0);
        std::fill_n(grad_values + out_offset + n * heads * head_dim, head_dim, scalar_t(0));
      }

      // The initial state as a token before the first: f R_1 = e^(L_0 - r) S.
      const acc_t lse_0 = has_state
          ? state_lse[b * args.state_lse->stride(0) + h * args.state_lse->stride(1)]
          : negative_infinity<acc_t>();
      const acc_t f = length == 0 ? acc_t(0) : exp_of_difference(lse_0, reference);
      const scalar_t* o0_row = has_state
          ? state_out + b * args.state_out->stride(0) + h * args.state_out->stride(1)
          : zero_row.data();
      scalar_t* do0_row = grad_state_out + (b * heads + h) * head_dim;
      acc_t o0_dot_s = 0;
      for (int64_t d = 0; d < head_dim; ++d) {
        o0_dot_s += static_cast<acc_t>(o0_row[d]) * sum_g[d];
        do0_row[d] = static_cast<scalar_t>(f * sum_g[d]);
      }
      grad_state_lse[b * heads + h] = f * (o0_dot_s - sum_rho);
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
