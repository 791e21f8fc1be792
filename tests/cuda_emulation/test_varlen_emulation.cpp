// The CUDA kernels of the packed variable-length scan (csrc/ops/cuda/scan_varlen.cu: the dense
// scan's kernels with the packed sequence locator), run on the host by the CUDA emulation
// (cuda_shim.h), against the dense CPU kernels run on each sequence alone
// (aaren::ops::cpu::DEFAULT on [1, len, H, D] slices): what the CPU's scan_varlen does.
//
// What this checks, as test_scan_emulation.cpp does for the dense kernels: the kernels'
// arithmetic and control flow for every dtype, sequences of no tokens, of one, a long one among
// short ones and many short ones, with and without initial states, masked tokens, strided
// inputs and absent gradients; the three phases with chunks (the emulated GPU made small) and
// without; max_seqlen given, absent (cu_seqlens read back and checked) and below the longest
// sequence (still every token, in longer chunks); int32 and int64 cu_seqlens; that every output
// element is written (outputs start as a sentinel), and wrong cu_seqlens values (not checked on
// the device with max_seqlen given) read nothing outside the tensors. And the float32 backward's
// error where one token dominates, within the CPU kernel's on the same sequences (as
// test_scan_emulation.cpp holds the dense kernels to).
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdio>
#include <map>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "cuda_shim.h"
#include "emulation_testing.h"
#include "ops/cpu/scan_kernel.h"
#include "ops/cuda/scan_varlen_kernels.h"
#include "ops/scan_varlen.h"

// The backward's entry point (scan_cuda.cpp): the kernels, then the state's lse gradient.
namespace aaren::ops::cuda {
void scan_varlen_backward(const VarlenBackwardArgs& args);
}  // namespace aaren::ops::cuda

namespace {

using aaren::ops::BackwardArgs;
using aaren::ops::ForwardArgs;
using aaren::ops::VarlenBackwardArgs;
using aaren::ops::VarlenForwardArgs;
namespace cpu = aaren::ops::cpu::DEFAULT;
namespace gpu = aaren::ops::cuda;

using emulation_testing::GpuPlan;
using emulation_testing::kAccuracyPlans;
using emulation_testing::DeviceScope;
using emulation_testing::kInf;
using emulation_testing::mismatch;
using emulation_testing::relative_error;
using emulation_testing::RelativeError;
using emulation_testing::UnsplitCpuScope;

double scale_of(const at::Tensor& t) {
  const at::Tensor d = t.to(at::kDouble);
  const at::Tensor finite = d.masked_select(d.isfinite());
  return finite.numel() > 0 ? std::max(1.0, finite.abs().max().item<double>()) : 1.0;
}

enum class MaxSeqlen { kGiven, kAbsent, kTooSmall };

struct Case {
  std::string name;
  at::ScalarType dtype = at::kFloat;
  std::vector<int64_t> lengths;
  int64_t H = 2;
  int64_t D = 8;
  bool state = false;
  bool strided = false;  // scores and values slices of a fused [T, H + H D + 1] buffer
  bool masked = false;   // a quarter of the scores -inf, and sequence 0 masked throughout
  bool grad_lse = true;
  bool int64_bounds = false;
  MaxSeqlen max_seqlen = MaxSeqlen::kGiven;
  int multiprocessors = 108;  // small: chunks
  bool reverse = false;
  int min_forward_launches = 1;  // 3 with chunks: summarize, combine, scan
};

void PrintTo(const Case& c, std::ostream* os) {
  *os << c.name;
}

struct Packed {
  at::Tensor scores, values, cu_seqlens;
  std::vector<int64_t> bounds;
  std::optional<at::Tensor> state_lse, state_out;
  at::Tensor grad_out;
  std::optional<at::Tensor> grad_lse;
};

Packed make_packed(const Case& c) {
  const auto f64 = at::TensorOptions().dtype(at::kDouble);
  Packed p;
  p.bounds = {0};
  for (const int64_t n : c.lengths) {
    p.bounds.push_back(p.bounds.back() + n);
  }
  const int64_t T = p.bounds.back(), H = c.H, D = c.D, N = static_cast<int64_t>(c.lengths.size());
  at::Tensor scores = at::randn({T, H}, f64) * 3;
  at::Tensor values = at::randn({T, H, D}, f64);
  if (c.masked) {
    scores.masked_fill_(at::rand({T, H}, f64) < 0.25, -kInf);
    if (N > 0 && c.lengths[0] > 0) {
      scores.narrow(0, 0, c.lengths[0]).fill_(-kInf);
    }
  }
  if (c.strided) {  // [T, 1 + H + H D]: scores at column 1, values after them (odd offsets)
    at::Tensor fused = at::zeros({T, 1 + H + H * D}, at::TensorOptions().dtype(c.dtype));
    fused.narrow(1, 1, H).copy_(scores);
    fused.narrow(1, 1 + H, H * D).copy_(values.reshape({T, H * D}));
    p.scores = fused.narrow(1, 1, H);
    p.values = fused.narrow(1, 1 + H, H * D).view({T, H, D});
  } else {
    p.scores = scores.to(c.dtype);
    p.values = values.to(c.dtype);
  }
  p.cu_seqlens = at::tensor(p.bounds, at::TensorOptions().dtype(at::kLong))
                     .to(c.int64_bounds ? at::kLong : at::kInt);
  if (c.state) {
    at::Tensor lse = at::randn({N, H}, f64) * 2;
    if (N > 1) {
      lse.select(0, 1).fill_(-kInf);  // an empty state among the others
    }
    p.state_lse = lse;
    p.state_out = at::randn({N, H, D}, f64);
  }
  p.grad_out = at::randn({T, H, D}, f64).to(c.dtype);
  if (c.grad_lse) {
    p.grad_lse = at::randn({T, H}, f64);
  }
  return p;
}

struct Outputs {
  at::Tensor out, lse, final_lse, final_out;
  at::Tensor grad_scores, grad_values, grad_state_lse, grad_state_out;
};

Outputs allocate(const Packed& p, int64_t N, double fill) {
  const auto options = p.values.options();
  const auto wide = options.dtype(at::kDouble);
  const int64_t T = p.values.size(0), H = p.values.size(1), D = p.values.size(2);
  return {at::full({T, H, D}, fill, options), at::full({T, H}, fill, wide),
          at::full({N, H}, fill, wide),       at::full({N, H, D}, fill, wide),
          at::full({T, H}, fill, options),    at::full({T, H, D}, fill, options),
          at::full({N, H}, fill, wide),       at::full({N, H, D}, fill, wide)};
}

std::optional<at::Tensor> row(const std::optional<at::Tensor>& t, int64_t i) {
  return t.has_value() ? std::optional<at::Tensor>(t->narrow(0, i, 1)) : std::nullopt;
}

// The reference: the dense CPU kernels on each sequence alone (a sequence of no tokens keeps
// its state, whose gradients are zero), forward then backward from its own outputs.
Outputs reference(const Packed& p) {
  const int64_t N = static_cast<int64_t>(p.bounds.size()) - 1;
  Outputs r = allocate(p, N, 0);
  for (int64_t i = 0; i < N; ++i) {
    const int64_t begin = p.bounds[i], len = p.bounds[i + 1] - begin;
    if (len == 0) {
      r.final_lse[i] = p.state_lse.has_value() ? p.state_lse->select(0, i) : at::full_like(r.final_lse[i], -kInf);
      r.final_out[i] = p.state_out.has_value() ? p.state_out->select(0, i) : at::zeros_like(r.final_out[i]);
      r.grad_state_lse[i].zero_();
      r.grad_state_out[i].zero_();
      continue;
    }
    const auto tokens = [&](const at::Tensor& t) { return t.narrow(0, begin, len).unsqueeze(0); };
    const ForwardArgs f{tokens(p.scores), tokens(p.values), row(p.state_lse, i), row(p.state_out, i),
                        tokens(r.out), tokens(r.lse), r.final_out.narrow(0, i, 1)};
    cpu::scan_forward(f);
    r.final_lse[i] = r.lse[begin + len - 1];
    BackwardArgs b;
    b.grad_out = tokens(p.grad_out);
    b.grad_lse = p.grad_lse.has_value() ? std::optional<at::Tensor>(tokens(*p.grad_lse)) : std::nullopt;
    b.scores = f.scores;
    b.values = f.values;
    b.out = f.out;
    b.lse = f.lse;
    b.state_lse = f.state_lse;
    b.state_out = f.state_out;
    b.grad_scores = tokens(r.grad_scores);
    b.grad_values = tokens(r.grad_values);
    b.grad_state_lse = r.grad_state_lse.narrow(0, i, 1);
    b.grad_state_out = r.grad_state_out.narrow(0, i, 1);
    cpu::scan_backward(b);
  }
  return r;
}

std::optional<int64_t> max_seqlen_of(const Case& c) {
  int64_t longest = 0;
  for (const int64_t n : c.lengths) {
    longest = std::max(longest, n);
  }
  switch (c.max_seqlen) {
    case MaxSeqlen::kGiven: return longest;
    case MaxSeqlen::kAbsent: return std::nullopt;
    default: return longest / 4;
  }
}

class EmulatedVarlenMatchesCpu : public testing::TestWithParam<Case> {};

TEST_P(EmulatedVarlenMatchesCpu, ForwardAndBackward) {
  const Case& c = GetParam();
  at::manual_seed(4321);
  const Packed p = make_packed(c);
  const int64_t N = static_cast<int64_t>(c.lengths.size());
  const Outputs ref = reference(p);
  const DeviceScope device(c.multiprocessors, c.reverse);

  Outputs got = allocate(p, N, 777);  // a sentinel: every element must be written
  VarlenForwardArgs f{p.scores, p.values, p.cu_seqlens, max_seqlen_of(c), p.state_lse,
                      p.state_out, got.out, got.lse, got.final_lse, got.final_out};
  const int64_t launches_before = emu::stats().launches;
  gpu::dispatch_varlen_forward(f);
  EXPECT_GE(emu::stats().launches - launches_before, c.min_forward_launches)
      << "the case no longer reaches the chunks it was written for";

  const double tol = c.dtype == at::kDouble ? 1e-9
                   : c.dtype == at::kFloat  ? 2e-4
                   : c.dtype == at::kHalf   ? 4e-3
                                            : 2e-2;
  const double lse_tol = c.dtype == at::kDouble ? 1e-9 : 1e-4;
  EXPECT_EQ(mismatch(ref.out, got.out, tol, tol), "") << "out";
  EXPECT_EQ(mismatch(ref.lse, got.lse, lse_tol, lse_tol), "") << "lse";
  EXPECT_EQ(mismatch(ref.final_lse, got.final_lse, lse_tol, lse_tol), "") << "final_lse";
  EXPECT_EQ(mismatch(ref.final_out, got.final_out, tol, tol), "") << "final_out";

  // The backward from the reference forward's outputs.
  VarlenBackwardArgs b;
  b.grad_out = p.grad_out;
  b.grad_lse = p.grad_lse;
  b.scores = p.scores;
  b.values = p.values;
  b.cu_seqlens = p.cu_seqlens;
  b.max_seqlen = max_seqlen_of(c);
  b.out = ref.out;
  b.lse = ref.lse;
  b.state_lse = p.state_lse;
  b.state_out = p.state_out;
  b.grad_scores = got.grad_scores;
  b.grad_values = got.grad_values;
  b.grad_state_lse = got.grad_state_lse;
  b.grad_state_out = got.grad_state_out;
  gpu::scan_varlen_backward(b);
  const double gtol = c.dtype == at::kDouble ? 1e-8
                    : c.dtype == at::kFloat  ? 1e-3
                    : c.dtype == at::kHalf   ? 1e-2
                                             : 5e-2;
  // (keep_zeros false: a zero of the reference, e.g. d/d score of a sequence's only visible
  // token without grad_lse, may come out as a rounding error.)
  EXPECT_EQ(mismatch(ref.grad_scores, got.grad_scores, gtol * scale_of(ref.grad_scores), gtol,
                     /*keep_zeros=*/false), "")
      << "grad_scores";
  // Masked tokens get exactly zero gradients.
  const at::Tensor masked = p.scores.isinf();
  EXPECT_TRUE(at::equal(got.grad_scores.masked_select(masked),
                        at::zeros({masked.sum().item<int64_t>()}, got.grad_scores.options())))
      << "grad_scores of masked tokens";
  EXPECT_TRUE(at::equal(got.grad_values.masked_select(masked.unsqueeze(-1).expand_as(got.grad_values)),
                        at::zeros({masked.sum().item<int64_t>() * p.values.size(2)},
                                  got.grad_values.options())))
      << "grad_values of masked tokens";
  EXPECT_EQ(mismatch(ref.grad_values, got.grad_values, gtol * scale_of(ref.grad_values), gtol), "")
      << "grad_values";
  EXPECT_EQ(mismatch(ref.grad_state_lse, got.grad_state_lse, gtol * scale_of(ref.grad_state_lse), gtol), "")
      << "grad_state_lse";
  EXPECT_EQ(mismatch(ref.grad_state_out, got.grad_state_out, gtol * scale_of(ref.grad_state_out), gtol), "")
      << "grad_state_out";
}

std::vector<Case> cases() {
  const std::vector<int64_t> zeros_and_ones = {0, 1, 0, 0, 1, 1, 0};
  const std::vector<int64_t> one_long = {3, 1, 700, 2, 0, 5};
  std::vector<int64_t> many_short;
  for (int r = 0; r < 3; ++r) {
    for (int64_t n = 0; n < 14; ++n) {
      many_short.push_back(n);
    }
  }
  std::vector<Case> all;
  for (const at::ScalarType t : {at::kDouble, at::kFloat, at::kHalf, at::kBFloat16}) {
    const std::string d = t == at::kDouble ? "Float64" : t == at::kFloat ? "Float32"
                        : t == at::kHalf   ? "Float16" : "BFloat16";
    const auto add = [&](Case c) {
      c.dtype = t;
      c.name = d + "_" + c.name;
      all.push_back(c);
    };
    add({.name = "zeros_and_ones_state", .lengths = zeros_and_ones, .state = true});
    add({.name = "many_short_masked", .lengths = many_short, .H = 3, .D = 5, .masked = true,
         .int64_bounds = true});
    add({.name = "one_long_state_strided", .lengths = one_long, .D = 64, .state = true,
         .strided = true, .max_seqlen = MaxSeqlen::kAbsent});
    add({.name = "one_long_chunked_state", .lengths = one_long, .D = 64, .state = true,
         .multiprocessors = 1, .min_forward_launches = 3});
    add({.name = "one_long_chunked_masked_no_grad_lse", .lengths = one_long, .D = 32,
         .masked = true, .grad_lse = false, .multiprocessors = 1, .reverse = true,
         .min_forward_launches = 3});
    add({.name = "max_seqlen_too_small_chunked", .lengths = {300, 5, 700, 0}, .D = 16,
         .state = true, .max_seqlen = MaxSeqlen::kTooSmall, .multiprocessors = 1});
    add({.name = "all_empty_state", .lengths = {0, 0, 0}, .state = true});
    add({.name = "D0", .lengths = {4, 0, 33}, .D = 0, .state = true});
  }
  // Wide heads: the backward's four slots per lane.
  all.push_back({.name = "Float32_D200_slots", .dtype = at::kFloat, .lengths = {40, 3, 0, 90},
                 .D = 200, .state = true});
  return all;
}

INSTANTIATE_TEST_SUITE_P(Cases, EmulatedVarlenMatchesCpu, testing::ValuesIn(cases()),
                         [](const testing::TestParamInfo<Case>& info) { return info.param.name; });

// The float32 backward's error against float64 where it is hardest (test_scan_emulation.cpp's
// Float32BackwardWithinCpuErrorWhereOneTokenDominates, on packed sequences): scores that fall
// along each sequence or spread widely, with and without states, and scores at large offsets
// with states near them, on a GPU that chunks the long sequences and on one that runs each in
// one pass. Both backwards from the CPU kernel's float32 forward outputs (the backwards alone;
// the forwards are held to the CPU's results above). Every gradient held to the CPU kernel's
// error on the same sequences (each alone, in one pass): normwise within kL2 times, max |error|
// / max |reference| within kMax times. d/d scores and d/d values per kind; the state's
// gradients, N x H values per kind (12 to 16 of them not zero), pooled over the kinds (each
// kind's errors and reference divided by its largest |reference|): one kind's dozen values are
// too few for a ratio (per kind the state's lse gradient ranged over 0.38x-1.81x the CPU
// kernel's error, l2 and max, H = 4; with H = 16 at offset +1e4, 0.53x-1.31x).
TEST(EmulatedVarlenAccuracy, Float32BackwardWithinCpuErrorWhereOneTokenDominates) {
  constexpr double kL2 = 1.25;
  constexpr double kMax = 2.0;
  struct Pool {
    std::vector<at::Tensor> gpu_error, cpu_error, reference;
  };
  std::map<std::string, Pool> pooled;  // the state's gradients, by plan and gradient
  const UnsplitCpuScope unsplit_cpu;
  const auto f64 = at::TensorOptions().dtype(at::kDouble);
  const auto in_f32 = [](const at::Tensor& t) { return t.to(at::kFloat).to(at::kDouble); };
  struct Kind {
    std::string name;
    std::vector<int64_t> lengths;
    bool state;
    double offset;  // 0: falling and widely spread scores; else randn * 2 + offset
  };
  const std::vector<Kind> kinds = {
      {"dominated", {3000, 1, 0, 700}, false, 0.0},
      {"dominated_state", {2048, 5, 0, 900, 64}, true, 0.0},
      {"offset+1e4_state", {1500, 0, 300, 2}, true, 1e4},
      {"offset-1e4_state", {1500, 40, 0, 600}, true, -1e4},
  };
  const int64_t H = 4, D = 32;
  for (const Kind& kind : kinds) {
    at::manual_seed(static_cast<int64_t>(kind.lengths[0] + kind.offset) + kind.state);
    Packed p64;
    p64.bounds = {0};
    std::vector<at::Tensor> per_sequence;
    for (const int64_t n : kind.lengths) {
      p64.bounds.push_back(p64.bounds.back() + n);
      if (kind.offset == 0.0) {  // along each sequence's own tokens
        const at::Tensor t = at::linspace(0, 1, n, f64).view({n, 1});
        const at::Tensor noise = at::randn({n, H}, f64);
        per_sequence.push_back(
            at::cat({100 - 200 * t + noise.narrow(1, 0, 2), 30 * noise.narrow(1, 2, 2)}, 1));
      } else {
        per_sequence.push_back(at::randn({n, H}, f64) * 2 + kind.offset);
      }
    }
    const int64_t T = p64.bounds.back(), N = static_cast<int64_t>(kind.lengths.size());
    p64.scores = in_f32(at::cat(per_sequence, 0));
    p64.values = in_f32(at::randn({T, H, D}, f64));
    p64.cu_seqlens = at::tensor(p64.bounds, at::TensorOptions().dtype(at::kLong));
    p64.grad_out = in_f32(at::randn({T, H, D}, f64));
    p64.grad_lse = in_f32(at::randn({T, H}, f64));
    if (kind.state) {
      p64.state_lse = kind.offset == 0.0 ? at::randn({N, H}, f64) * 5
                                         : at::randn({N, H}, f64) + kind.offset + 3;
      p64.state_out = at::randn({N, H, D}, f64);
    }
    Packed p32 = p64;
    p32.scores = p64.scores.to(at::kFloat);
    p32.values = p64.values.to(at::kFloat);
    p32.grad_out = p64.grad_out.to(at::kFloat);
    const Outputs exact = reference(p64);
    const Outputs cpu_got = reference(p32);

    for (const GpuPlan& plan : kAccuracyPlans) {
      const DeviceScope device(plan.multiprocessors, plan.threads_per_multiprocessor, false);
      Outputs got = allocate(p32, N, 0);
      const int64_t longest = *std::max_element(kind.lengths.begin(), kind.lengths.end());
      gpu::dispatch_varlen_forward({p32.scores, p32.values, p32.cu_seqlens, longest,
                                    p32.state_lse, p32.state_out, got.out, got.lse,
                                    got.final_lse, got.final_out});
      VarlenBackwardArgs b;
      b.grad_out = p32.grad_out;
      b.grad_lse = p32.grad_lse;
      b.scores = p32.scores;
      b.values = p32.values;
      b.cu_seqlens = p32.cu_seqlens;
      b.max_seqlen = longest;
      b.out = cpu_got.out;  // the CPU kernel's float32 forward outputs: the backwards alone
      b.lse = cpu_got.lse;
      b.state_lse = p32.state_lse;
      b.state_out = p32.state_out;
      b.grad_scores = got.grad_scores;
      b.grad_values = got.grad_values;
      b.grad_state_lse = got.grad_state_lse;
      b.grad_state_out = got.grad_state_out;
      gpu::scan_varlen_backward(b);
      std::vector<std::tuple<const char*, at::Tensor, at::Tensor, at::Tensor>> gradients = {
          {"grad_scores", got.grad_scores, cpu_got.grad_scores, exact.grad_scores},
          {"grad_values", got.grad_values, cpu_got.grad_values, exact.grad_values}};
      if (kind.state) {
        gradients.push_back({"grad_state_lse", got.grad_state_lse, cpu_got.grad_state_lse,
                             exact.grad_state_lse});
        gradients.push_back({"grad_state_out", got.grad_state_out, cpu_got.grad_state_out,
                             exact.grad_state_out});
      }
      for (const auto& [what, gpu_result, cpu_result, ref] : gradients) {
        const bool state_gradient = std::string(what).rfind("grad_state", 0) == 0;
        if (state_gradient) {
          const double scale = ref.abs().max().item<double>();
          Pool& pool = pooled[std::string(plan.name) + " " + what];
          pool.gpu_error.push_back((gpu_result.to(at::kDouble) - ref).reshape(-1) / scale);
          pool.cpu_error.push_back((cpu_result.to(at::kDouble) - ref).reshape(-1) / scale);
          pool.reference.push_back(ref.reshape(-1) / scale);
        }
        const RelativeError error = relative_error(gpu_result, ref);
        const RelativeError cpu_error = relative_error(cpu_result, ref);
        std::printf("float32 varlen backward %-17s %-8s %-14s: max %.2e, CPU kernel %.2e "
                    "(%.2fx); l2 %.2e, CPU kernel %.2e (%.2fx)\n",
                    kind.name.c_str(), plan.name, what, error.max, cpu_error.max,
                    error.max / cpu_error.max, error.l2, cpu_error.l2, error.l2 / cpu_error.l2);
        if (!state_gradient) {
          const std::string where = std::string(what) + " " + kind.name + " " + plan.name;
          RecordProperty(kind.name + "_" + plan.name + "_" + what,
                         std::to_string(error.l2 / cpu_error.l2));
          EXPECT_LE(error.l2, kL2 * cpu_error.l2) << where;
          EXPECT_LE(error.max, kMax * cpu_error.max) << where;
        }
      }
    }
  }
  for (const auto& [where, pool] : pooled) {
    const at::Tensor gpu_error = at::cat(pool.gpu_error), cpu_error = at::cat(pool.cpu_error);
    const double norm = at::cat(pool.reference).norm().item<double>();
    const double l2 = gpu_error.norm().item<double>() / norm;
    const double cpu_l2 = cpu_error.norm().item<double>() / norm;
    const double max = gpu_error.abs().max().item<double>();
    const double cpu_max = cpu_error.abs().max().item<double>();
    std::printf("float32 varlen backward, pooled %-23s: max %.2e, CPU kernel %.2e (%.2fx); "
                "l2 %.2e, CPU kernel %.2e (%.2fx)\n",
                where.c_str(), max, cpu_max, max / cpu_max, l2, cpu_l2, l2 / cpu_l2);
    RecordProperty("pooled " + where, std::to_string(l2 / cpu_l2));
    EXPECT_LE(l2, kL2 * cpu_l2) << where;
    EXPECT_LE(max, kMax * cpu_max) << where;
  }
}

// Wrong cu_seqlens with max_seqlen given are not checked on the device (no synchronization):
// they must still read and write nothing outside the tensors (the bounds are clamped).
TEST(EmulatedVarlen, WrongBoundsStayInsideTheTensors) {
  at::manual_seed(1);
  const int64_t T = 10, H = 2, D = 4;
  const at::Tensor scores = at::randn({T, H});
  const at::Tensor values = at::randn({T, H, D});
  for (const std::vector<int64_t>& bounds :
       std::vector<std::vector<int64_t>>{{-5, 4, 2, 30}, {3, 100, -1, 10}, {0, 0, 0, 0}}) {
    const at::Tensor cu = at::tensor(bounds, at::TensorOptions().dtype(at::kLong)).to(at::kInt);
    const int64_t N = static_cast<int64_t>(bounds.size()) - 1;
    VarlenForwardArgs f{scores, values, cu, 4, std::nullopt, std::nullopt,
                        at::zeros({T, H, D}), at::zeros({T, H}, at::kDouble),
                        at::zeros({N, H}, at::kDouble), at::zeros({N, H, D}, at::kDouble)};
    gpu::dispatch_varlen_forward(f);  // AddressSanitizer (AAREN_EMULATION_ASAN) sees the rest
    EXPECT_FALSE(f.final_out.isnan().any().item<bool>());
  }
}

// Without max_seqlen the values are read back and checked, as on the CPU.
TEST(EmulatedVarlen, BoundsCheckedWithoutMaxSeqlen) {
  const at::Tensor scores = at::randn({6, 2});
  const at::Tensor values = at::randn({6, 2, 3});
  const at::Tensor cu = at::tensor(std::vector<int64_t>{0, 4, 2, 6}).to(at::kInt);
  VarlenForwardArgs f{scores, values, cu, std::nullopt, std::nullopt, std::nullopt,
                      at::zeros({6, 2, 3}), at::zeros({6, 2}, at::kDouble),
                      at::zeros({3, 2}, at::kDouble), at::zeros({3, 2, 3}, at::kDouble)};
  EXPECT_THROW(
      {
        try {
          gpu::dispatch_varlen_forward(f);
        } catch (const c10::Error& e) {
          EXPECT_NE(std::string(e.what()).find("cu_seqlens must be non-decreasing"),
                    std::string::npos);
          throw;
        }
      },
      c10::Error);
}

}  // namespace
