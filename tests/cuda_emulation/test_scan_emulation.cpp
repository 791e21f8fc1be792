// The CUDA kernels of the scan (csrc/ops/cuda/*.cu), run on the host by the CUDA
// emulation (cuda_shim.h: every GPU thread a fiber, warp shuffles and __syncthreads as
// barriers), against the CPU kernels (aaren::ops::cpu::DEFAULT), on a machine with no GPU.
// The emulated source is generated from the .cu files at build time (make_emulated_kernel.py).
//
// What this checks: the kernels' arithmetic and control flow as the .cu writes them, for
// every dtype, and the host code's plans (vector widths, backward geometry, chunking into
// one or two levels of chunk summaries, forced by the size of the emulated GPU); masks, an
// all-masked prefix, NaN, +-1e4 scores, strided and unaligned inputs, initial states
// (including an empty one), absent gradients, N = 0 and D = 0; that every output element
// is written (outputs start as a sentinel); that shuffles and barriers are reached by whole
// warps / blocks at one call site and nothing deadlocks; that results do not depend on the
// order of blocks or of threads between barriers (some cases run in reverse order);
// misaligned vector accesses (the alignment sanitizer, on by default) and out-of-bounds ones
// (with AAREN_SANITIZE=address). Also the float32 accuracy against float64: the forward next
// to the CPU kernel's and plain PyTorch's (as tests/test_scan_*.py do on a GPU), and the
// backward next to the CPU kernel's, up to N = 8192.
// What it does not check: anything that needs the GPU itself: timing, the real occupancy
// and so the real chunk plans (the emulated occupancy ignores registers), the memory model
// and races between synchronization points, nvcc's code generation (registers, spills) and
// its rounding (it contracts a * b + c into fma, the host compiler here does not, and the
// device's exp and log differ from glibc's in the last bits). tests/test_scan_*.py and
// benchmarks/ cover those where a GPU is present.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "cuda_shim.h"
#include "emulation_testing.h"
#include "ops/cpu/scan_kernel.h"
#include "ops/scan.h"

namespace aaren::ops::cuda {
void scan_forward(const ForwardArgs& args);
void scan_backward(const BackwardArgs& args);
}  // namespace aaren::ops::cuda

namespace {

using aaren::ops::BackwardArgs;
using aaren::ops::ForwardArgs;
namespace cpu = aaren::ops::cpu::DEFAULT;
namespace gpu = aaren::ops::cuda;

using emulation_testing::GpuPlan;
using emulation_testing::kAccuracyPlans;
using emulation_testing::DeviceScope;
using emulation_testing::kInf;
using emulation_testing::mismatch;
using emulation_testing::UnsplitCpuScope;

enum class Mask {
  kNone,
  kRandom,   // a quarter of the scores -inf
  kPrefix,   // head 0: the first 2/3 of the tokens masked; head 1: everything masked
  kHuge,     // scores of magnitude up to ~1e4
  kNaN,      // one NaN score in the middle of head 0
};

enum class State { kNone, kRandom, kEmptyFirst };  // kEmptyFirst: batch 0 has lse -inf

// The layout of scores, values and grad_out (the kernels take any strides over B, N, H).
enum class Layout {
  kContiguous,
  kOffset,  // permuted, values at an odd element offset: no vector access is aligned
  kPadded,  // permuted, values aligned but rows of D + 1: strides allow no vector access
};

struct Case {
  std::string name;
  at::ScalarType dtype = at::kFloat;
  int64_t B, N, H, D;
  State state = State::kNone;
  Layout layout = Layout::kContiguous;
  Mask mask = Mask::kNone;
  bool grad_out = true;
  bool grad_lse = true;
  // The emulated GPU: multiprocessors x 2048 threads (small: chunks; see DeviceScope).
  int multiprocessors = 108;
  bool reverse = false;
  // Launches the forward must take at least: 1 single pass, 3 one chunk level, 5 two.
  int forward_launches = 1;
};

std::string dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kDouble: return "Float64";
    case at::kFloat: return "Float32";
    case at::kHalf: return "Float16";
    default: return "BFloat16";
  }
}

struct Problem {
  at::Tensor scores, values;
  std::optional<at::Tensor> state_lse, state_out, grad_out, grad_lse;
};

// A tensor of dtype `dtype` with the layout of `like` (strides kept), holding like's values.
at::Tensor same_layout(const at::Tensor& like, at::ScalarType dtype) {
  at::Tensor t = at::empty_strided(like.sizes(), like.strides(), like.options().dtype(dtype));
  t.copy_(like);
  return t;
}

Problem make_problem(const Case& c) {
  const auto f64 = at::TensorOptions().dtype(at::kDouble);
  at::Tensor scores, values;
  if (c.layout != Layout::kContiguous) {  // scores [B, H, N], values [H, N, B, D + 2 or 1]
    const bool offset = c.layout == Layout::kOffset;
    scores = (at::randn({c.B, c.H, c.N}, f64) * 3).permute({0, 2, 1});
    values = at::randn({c.H, c.N, c.B, c.D + (offset ? 2 : 1)}, f64)
                 .narrow(3, offset ? 1 : 0, c.D)
                 .permute({2, 1, 0, 3});
  } else {
    scores = at::randn({c.B, c.N, c.H}, f64) * 3;
    values = at::randn({c.B, c.N, c.H, c.D}, f64);
  }
  if (c.mask == Mask::kRandom) {
    scores.masked_fill_(at::rand(scores.sizes(), f64) < 0.25, -kInf);
  } else if (c.mask == Mask::kPrefix && c.N > 0) {
    scores.narrow(1, 0, std::max<int64_t>(1, c.N * 2 / 3)).select(2, 0).fill_(-kInf);
    if (c.H > 1) {
      scores.select(2, 1).fill_(-kInf);
    }
  } else if (c.mask == Mask::kHuge) {
    scores.mul_(3000).add_((at::rand(scores.sizes(), f64) < 0.5).to(at::kDouble) * 1e4 - 5e3);
  } else if (c.mask == Mask::kNaN && c.N > 2) {
    scores.select(1, c.N / 2).select(1, 0).fill_(std::numeric_limits<double>::quiet_NaN());
  }
  Problem p;
  p.scores = same_layout(scores, c.dtype);
  p.values = same_layout(values, c.dtype);
  if (c.state != State::kNone) {
    at::Tensor lse = at::randn({c.H, c.B}, f64).t() * 2;  // strided [B, H]
    if (c.state == State::kEmptyFirst) {
      lse.select(0, 0).fill_(-kInf);
    }
    p.state_lse = same_layout(lse, at::kDouble);  // the kernels' state dtypes (ops/scan.h)
    p.state_out = at::randn({c.B, c.H, c.D}, f64);
  }
  if (c.grad_out) {
    p.grad_out = c.layout != Layout::kContiguous
        ? same_layout(at::randn({c.N, c.H, c.B, c.D}, f64).permute({2, 0, 1, 3}), c.dtype)
        : at::randn({c.B, c.N, c.H, c.D}, f64).to(c.dtype);
  }
  if (c.grad_lse) {
    p.grad_lse = at::randn({c.B, c.N, c.H}, f64);
  }
  return p;
}

ForwardArgs forward_args(const Problem& p, double fill) {
  const int64_t B = p.values.size(0), H = p.values.size(2), D = p.values.size(3);
  return {p.scores, p.values, p.state_lse, p.state_out,
          at::full(p.values.sizes(), fill, p.values.options()),
          at::full(p.scores.sizes(), fill, p.values.options().dtype(at::kDouble)),
          at::full({B, H, D}, fill, p.values.options().dtype(at::kDouble))};
}

BackwardArgs backward_args(const Problem& p, const ForwardArgs& forward, double fill) {
  const at::ScalarType dtype = p.values.scalar_type();
  const auto options = p.values.options();
  const int64_t B = p.values.size(0), H = p.values.size(2), D = p.values.size(3);
  BackwardArgs a;
  a.grad_out = p.grad_out;
  a.grad_lse = p.grad_lse;
  a.scores = p.scores;
  a.values = p.values;
  a.out = forward.out;
  a.lse = forward.lse;
  a.state_lse = p.state_lse;
  a.state_out = p.state_out;
  a.grad_scores = at::full(p.scores.sizes(), fill, options);
  a.grad_values = at::full(p.values.sizes(), fill, options);
  a.grad_state_lse = at::full({B, H}, fill, options.dtype(at::kDouble));
  a.grad_state_out = at::full({B, H, D}, fill, options.dtype(at::kDouble));
  return a;
}

// Problem p's gradients from a forward and then a backward of the same kernels (cpu:: or
// gpu::), each output buffer starting at zero; the forward's outputs are kept in the result.
template <typename Forward, typename Backward>
BackwardArgs gradients(const Problem& p, Forward forward, Backward backward) {
  ForwardArgs f = forward_args(p, 0);
  forward(f);
  BackwardArgs b = backward_args(p, f, 0);
  backward(b);
  return b;
}

// The largest finite magnitude, at least 1: gradients grow with the number of tokens, so
// they are compared relative to their scale.
double scale_of(const at::Tensor& t) {
  const at::Tensor d = t.to(at::kDouble);
  const at::Tensor finite = d.masked_select(d.isfinite());
  return finite.numel() > 0 ? std::max(1.0, finite.abs().max().item<double>()) : 1.0;
}

void PrintTo(const Case& c, std::ostream* os) {
  *os << c.name;
}

class EmulatedScanMatchesCpu : public testing::TestWithParam<Case> {};

TEST_P(EmulatedScanMatchesCpu, ForwardAndBackward) {
  const Case& c = GetParam();
  at::manual_seed(1234);
  const Problem p = make_problem(c);
  const DeviceScope device(c.multiprocessors, 2048, c.reverse);
  const auto start = std::chrono::steady_clock::now();

  ForwardArgs ref = forward_args(p, 0);
  ForwardArgs got = forward_args(p, 777);  // a sentinel: every element must be written
  cpu::scan_forward(ref);
  const int64_t launches_before = emu::stats().launches;
  gpu::scan_forward(got);
  const int64_t forward_launches = emu::stats().launches - launches_before;
  if (c.N > 0) {
    EXPECT_GE(forward_launches, c.forward_launches)
        << "the case no longer reaches the chunk levels it was written for";
  }

  const double tol = c.dtype == at::kDouble ? 1e-9
                   : c.dtype == at::kFloat  ? 2e-4
                   : c.dtype == at::kHalf   ? 4e-3
                                            : 2e-2;
  const double lse_tol = c.dtype == at::kDouble ? 1e-9 : 1e-4;
  EXPECT_EQ(mismatch(ref.out, got.out, tol, tol), "") << "out";
  EXPECT_EQ(mismatch(ref.lse, got.lse, lse_tol, lse_tol), "") << "lse";
  if (c.N > 0) {  // the kernels run only for N > 0 (the operator copies the state for N = 0)
    EXPECT_EQ(mismatch(ref.final_out, got.final_out, tol, tol), "") << "final_out";
  }

  // The backward, both from the CPU forward's outputs.
  BackwardArgs bref = backward_args(p, ref, 0);
  BackwardArgs bgot = backward_args(p, ref, 555);
  cpu::scan_backward(bref);
  gpu::scan_backward(bgot);
  const double gtol = c.dtype == at::kDouble ? 1e-8
                    : c.dtype == at::kFloat  ? 1e-3
                    : c.dtype == at::kHalf   ? 1e-2
                                             : 5e-2;
  EXPECT_EQ(mismatch(bref.grad_scores, bgot.grad_scores, gtol * scale_of(bref.grad_scores), gtol), "")
      << "grad_scores";
  EXPECT_EQ(mismatch(bref.grad_values, bgot.grad_values, gtol * scale_of(bref.grad_values), gtol), "")
      << "grad_values";
  EXPECT_EQ(mismatch(bref.grad_state_lse, bgot.grad_state_lse, gtol * scale_of(bref.grad_state_lse), gtol), "")
      << "grad_state_lse";
  EXPECT_EQ(mismatch(bref.grad_state_out, bgot.grad_state_out, gtol * scale_of(bref.grad_state_out), gtol), "")
      << "grad_state_out";

  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  RecordProperty("forward_launches", std::to_string(forward_launches));
  RecordProperty("seconds", std::to_string(seconds));
}

std::vector<Case> cases() {
  std::vector<Case> all;
  for (const at::ScalarType t : {at::kDouble, at::kFloat, at::kHalf, at::kBFloat16}) {
    const std::string d = dtype_name(t);
    const auto add = [&](Case c) {
      c.dtype = t;
      c.name = d + "_" + c.name;
      all.push_back(c);
    };
    // Steps (N = 1) from nothing and from a state; an empty sequence.
    add({.name = "N1_D64_step", .B = 2, .N = 1, .H = 3, .D = 64});
    add({.name = "N1_D64_step_from_state", .B = 2, .N = 1, .H = 3, .D = 64, .state = State::kRandom});
    add({.name = "N0_D5_state", .B = 1, .N = 0, .H = 2, .D = 5, .state = State::kRandom});
    // Short, strided, masked; no features at all.
    add({.name = "N37_D3_strided_masked", .B = 2, .N = 37, .H = 2, .D = 3, .state = State::kRandom,
         .layout = Layout::kOffset, .mask = Mask::kRandom});
    add({.name = "N40_D64_padded_rows", .B = 2, .N = 40, .H = 2, .D = 64, .state = State::kRandom,
         .layout = Layout::kPadded});
    add({.name = "N33_D0", .B = 2, .N = 33, .H = 3, .D = 0, .state = State::kRandom,
         .mask = Mask::kRandom});
    // One chunk level (16 chunks of 64), with an all-masked prefix and a fully masked head.
    add({.name = "N1000_D64_chunked_masked_prefix", .B = 1, .N = 1000, .H = 2, .D = 64,
         .state = State::kRandom, .mask = Mask::kPrefix, .multiprocessors = 2,
         .forward_launches = 3});
    // Wide: 9 forward warps per sequence (vec 1), 3 backward warps of 4 slots; no grad_lse.
    // Then 600 features: vec 4 (2 for float64), 2 or 5 backward warps, blocks in reverse.
    // (Threads run in order between barriers, so a missing barrier between warps shows in
    // one of the two orders: the warp reading first, or last.)
    add({.name = "N300_D257_chunked_masked", .B = 1, .N = 300, .H = 1, .D = 257,
         .state = State::kRandom, .mask = Mask::kRandom, .grad_lse = false,
         .multiprocessors = 1, .forward_launches = 3});
    add({.name = "N40_D600_wide_reversed", .B = 1, .N = 40, .H = 2, .D = 600,
         .state = State::kRandom, .mask = Mask::kPrefix, .reverse = true});
    // Huge scores; an empty initial state for one batch entry, no grad_out; NaN.
    add({.name = "N260_D5_huge_scores", .B = 1, .N = 260, .H = 1, .D = 5, .state = State::kRandom,
         .mask = Mask::kHuge, .multiprocessors = 1, .forward_launches = 3});
    add({.name = "N200_D1_strided_empty_state", .B = 2, .N = 200, .H = 3, .D = 1,
         .state = State::kEmptyFirst, .layout = Layout::kOffset, .mask = Mask::kRandom, .grad_out = false,
         .multiprocessors = 1, .reverse = true, .forward_launches = 3});
    add({.name = "N300_D8_nan", .B = 1, .N = 300, .H = 2, .D = 8, .state = State::kRandom,
         .mask = Mask::kNaN, .multiprocessors = 1, .forward_launches = 3});
    // Two chunk levels: 8192 tokens -> 128 chunks of 64 -> 2 chunks.
    add({.name = "N8192_D3_two_chunk_levels", .B = 1, .N = 8192, .H = 1, .D = 3,
         .state = State::kRandom, .mask = Mask::kPrefix, .multiprocessors = 2,
         .forward_launches = 5});
  }
  return all;
}

INSTANTIATE_TEST_SUITE_P(Cases, EmulatedScanMatchesCpu, testing::ValuesIn(cases()),
                         [](const testing::TestParamInfo<Case>& info) { return info.param.name; });

// ---- Accuracy in float32, against float64 ------------------------------------------------

// Softmax attention of every prefix, in float64 (tests/naive.py's reference_scan).
at::Tensor reference_out(const at::Tensor& scores, const at::Tensor& values, at::ScalarType dtype) {
  const at::Tensor s = scores.to(dtype);
  const at::Tensor v = values.to(dtype);
  const int64_t n = s.size(1);
  const at::Tensor later = at::ones({n, n}, at::kBool).triu(1);  // [k, i]: i > k
  const at::Tensor logits =
      s.unsqueeze(1).expand({-1, n, -1, -1}).masked_fill(later.view({1, n, n, 1}), -kInf);
  const at::Tensor weights = at::softmax(logits, 2);
  return at::einsum("bkih,bihd->bkhd", {weights, v});
}

double max_error(const at::Tensor& got, const at::Tensor& ref) {
  return (got.to(at::kDouble) - ref).abs().max().item<double>();
}

// The forward's error in float32 (2 x 300 tokens x 4 heads x 64 features, scores of scale 3,
// as tests/test_scan_*.py): no worse than the CPU kernel's x 1.5 (the normalized recurrence
// the CUDA forward had made 6x plain PyTorch's), and within tests/test_scan_*.py's bound of 2x
// plain PyTorch's float32 softmax. Run on a GPU large enough to chunk the sequences (a real
// one would) and on one small enough for a single pass.
TEST(EmulatedScanAccuracy, Float32ForwardWithinCpuError) {
  at::manual_seed(0);
  const auto f64 = at::TensorOptions().dtype(at::kDouble);
  const at::Tensor scores = (at::randn({2, 300, 4}, f64) * 3).to(at::kFloat);
  const at::Tensor values = at::randn({2, 300, 4, 64}, f64).to(at::kFloat);
  const at::Tensor ref = reference_out(scores, values, at::kDouble);
  const at::Tensor ref_lse = at::logcumsumexp(scores.to(at::kDouble), 1);
  const double plain_error = max_error(reference_out(scores, values, at::kFloat), ref);

  const auto lse_like = [](const at::Tensor& s) { return at::empty_like(s, at::kDouble); };
  const auto final_like = [](const at::Tensor& v) {
    return at::empty({v.size(0), v.size(2), v.size(3)}, v.options().dtype(at::kDouble));
  };
  ForwardArgs cpu_args{scores, values, std::nullopt, std::nullopt, at::empty_like(values),
                       lse_like(scores), final_like(values)};
  cpu::scan_forward(cpu_args);
  const double cpu_error = max_error(cpu_args.out, ref);
  RecordProperty("plain_pytorch_error", std::to_string(plain_error));
  RecordProperty("cpu_error", std::to_string(cpu_error));

  for (const int multiprocessors : {108, 1}) {
    const DeviceScope device(multiprocessors, multiprocessors == 1 ? 512 : 2048, false);
    ForwardArgs args{scores, values, std::nullopt, std::nullopt, at::empty_like(values),
                     lse_like(scores), final_like(values)};
    const int64_t launches_before = emu::stats().launches;
    gpu::scan_forward(args);
    const int64_t launches = emu::stats().launches - launches_before;
    const double error = max_error(args.out, ref);
    std::printf("float32 forward, %s: max error %.3g (CPU kernel %.3g, plain PyTorch %.3g)\n",
                launches > 1 ? "chunked" : "single pass", error, cpu_error, plain_error);
    RecordProperty(launches > 1 ? "chunked_error" : "single_pass_error", std::to_string(error));
    EXPECT_LE(error, 1.5 * cpu_error + 1e-6) << "launches " << launches;
    EXPECT_LE(error, 2.0 * plain_error + 1e-6) << "launches " << launches;
    EXPECT_EQ(mismatch(ref_lse, args.lse, 1e-5, 1e-5), "") << "lse, launches " << launches;
  }
}

// The backward's error in float32 against float64, next to the CPU kernel's, for
// grad_values and grad_scores: normwise, max |error| / max |reference| and
// ||error||_2 / ||reference||_2. The CUDA backward multiplies the gates e^(L_i - L_{i+1})
// along the sequence where the CPU sums against a reference lse, so its error could grow
// with N. Both kernels from float32 forward outputs of their own; the emulated GPU either
// large (the sequences are chunked, as a real GPU would) or small (one pass over each).
TEST(EmulatedScanAccuracy, Float32BackwardVsFloat64) {
  const UnsplitCpuScope unsplit_cpu;
  const auto f64 = at::TensorOptions().dtype(at::kDouble);
  const auto max_relative = [](const at::Tensor& got, const at::Tensor& ref) {
    return (got.to(at::kDouble) - ref).abs().max().item<double>() / ref.abs().max().item<double>();
  };
  const auto l2_relative = [](const at::Tensor& got, const at::Tensor& ref) {
    return (got.to(at::kDouble) - ref).norm().item<double>() / ref.norm().item<double>();
  };
  for (const int64_t N : {300, 1000, 4096, 8192}) {
    at::manual_seed(N);
    const int64_t B = 1, H = 2, D = 64;
    // Float64 copies of float32 values: both kernels see the same problem.
    const auto in_f32 = [](const at::Tensor& t) { return t.to(at::kFloat).to(at::kDouble); };
    Problem p64;
    p64.scores = in_f32(at::randn({B, N, H}, f64) * 3);
    p64.values = in_f32(at::randn({B, N, H, D}, f64));
    p64.state_lse = in_f32(at::randn({B, H}, f64) * 2);
    p64.state_out = in_f32(at::randn({B, H, D}, f64));
    p64.grad_out = in_f32(at::randn({B, N, H, D}, f64));
    p64.grad_lse = in_f32(at::randn({B, N, H}, f64));
    Problem p32;
    p32.scores = p64.scores.to(at::kFloat);
    p32.values = p64.values.to(at::kFloat);
    p32.state_lse = p64.state_lse;  // float64 in every dtype
    p32.state_out = p64.state_out;  // float64 in every dtype
    p32.grad_out = p64.grad_out->to(at::kFloat);
    p32.grad_lse = p64.grad_lse;

    const BackwardArgs b_ref = gradients(p64, cpu::scan_forward, cpu::scan_backward);
    const BackwardArgs b_cpu = gradients(p32, cpu::scan_forward, cpu::scan_backward);

    for (const GpuPlan& plan : kAccuracyPlans) {
      const DeviceScope device(plan.multiprocessors, plan.threads_per_multiprocessor, false);
      const BackwardArgs b_gpu = gradients(p32, gpu::scan_forward, gpu::scan_backward);
      for (const auto& [what, got, cpu_got, ref] :
           {std::tuple{"grad_values", b_gpu.grad_values, b_cpu.grad_values, b_ref.grad_values},
            std::tuple{"grad_scores", b_gpu.grad_scores, b_cpu.grad_scores, b_ref.grad_scores}}) {
        const double max_error = max_relative(got, ref), cpu_max_error = max_relative(cpu_got, ref);
        const double l2_error = l2_relative(got, ref), cpu_l2_error = l2_relative(cpu_got, ref);
        std::printf("float32 backward N=%-5lld %-8s %s: max %.2e (CPU kernel %.2e), "
                    "l2 %.2e (CPU kernel %.2e)\n",
                    static_cast<long long>(N), plan.name, what, max_error, cpu_max_error,
                    l2_error, cpu_l2_error);
        RecordProperty(std::string(what) + "_N" + std::to_string(N) + "_" + plan.name,
                       std::to_string(max_error));
        EXPECT_LE(max_error, 2 * cpu_max_error + 1e-6) << what << " N=" << N << " " << plan.name;
        EXPECT_LE(l2_error, 2 * cpu_l2_error + 1e-6) << what << " N=" << N << " " << plan.name;
      }
    }
  }
}

// The backward's float32 error where it is hardest, next to the CPU kernel's on the same
// problems: scores that fall along the sequence or spread widely (one token dominates the
// outputs after it, out_j ~ v_i, where d/d s_i = sum_j e^(s_i - L_j) (g_j . (v_i - out_j) + G_j)
// is formed from sums that must not cancel: docs/design.md, "Backward"), with and without a
// state, and scores at large constant offsets (+-1e4, 1e6) with a state near them; on a GPU
// that chunks the sequences (two levels of chunk summaries at N = 8192) and on one that runs
// each in one pass. Every gradient (d/d scores, values and the state's lse and out), against
// the CPU kernel in float64, is held to the CPU kernel's error, each from float32 forward
// outputs of its own: normwise, ||error||_2 / ||reference||_2 within
// kL2 times the CPU's, and max |error| / max |reference| within kMax times (the largest of
// thousands of errors moves by more between two equally good orders of summation: the CPU
// kernel split into chunks ranged from 0.1x to 1.2x its unsplit self here). Formed as
// v . R - rho, the CUDA backward's d/d scores had 1.4x to 10x the CPU kernel's max error here.
// The state's lse gradient is float64 arithmetic on both (combine.h, "The state's lse
// gradient"): where the CPU kernel's error is below kFloat64Level (the falling scores: exact to
// 1e-52 there, its sums and the reference's being the same float64 operations), the CUDA
// backward's (a float64 forward and ATen's sums: 1e-15) is held to kFloat64Level instead.
TEST(EmulatedScanAccuracy, Float32BackwardWithinCpuErrorWhereOneTokenDominates) {
  constexpr double kL2 = 1.25;
  constexpr double kMax = 2.0;
  constexpr double kFloat64Level = 1e-12;
  const UnsplitCpuScope unsplit_cpu;
  const auto f64 = at::TensorOptions().dtype(at::kDouble);
  // Float64 copies of float32 numbers: every run differentiates the same loss.
  const auto in_f32 = [](const at::Tensor& t) { return t.to(at::kFloat).to(at::kDouble); };
  struct Kind {
    std::string name;
    int64_t N;
    bool state;
    double offset;  // 0: falling and widely spread scores; else randn * 2 + offset
  };
  const std::vector<Kind> kinds = {
      {"dominated", 8192, false, 0.0},
      {"dominated_state", 2048, true, 0.0},
      {"offset+1e4_state", 2048, true, 1e4},
      {"offset-1e4_state", 2048, true, -1e4},
      {"offset+1e6_state", 1024, true, 1e6},
  };
  const int64_t B = 1, H = 4, D = 32;
  for (const Kind& kind : kinds) {
    at::manual_seed(kind.N + static_cast<int64_t>(kind.offset) + kind.state);
    const int64_t N = kind.N;
    at::Tensor scores;
    if (kind.offset == 0.0) {
      const at::Tensor t = at::linspace(0, 1, N, f64).view({1, N, 1});
      const at::Tensor noise = at::randn({B, N, H}, f64);
      scores = at::cat({100 - 200 * t + noise.narrow(2, 0, 2), 30 * noise.narrow(2, 2, 2)}, 2);
    } else {
      scores = at::randn({B, N, H}, f64) * 2 + kind.offset;
    }
    Problem p64;
    p64.scores = in_f32(scores);
    p64.values = in_f32(at::randn({B, N, H, D}, f64));
    p64.grad_out = in_f32(at::randn({B, N, H, D}, f64));
    p64.grad_lse = in_f32(at::randn({B, N, H}, f64));
    if (kind.state) {
      p64.state_lse = kind.offset == 0.0 ? at::randn({B, H}, f64) * 5
                                         : at::randn({B, H}, f64) + kind.offset + 3;
      p64.state_out = at::randn({B, H, D}, f64);
    }
    Problem p32 = p64;
    p32.scores = p64.scores.to(at::kFloat);
    p32.values = p64.values.to(at::kFloat);
    p32.grad_out = p64.grad_out->to(at::kFloat);

    const BackwardArgs b_ref = gradients(p64, cpu::scan_forward, cpu::scan_backward);
    const BackwardArgs b_cpu = gradients(p32, cpu::scan_forward, cpu::scan_backward);

    for (const GpuPlan& plan : kAccuracyPlans) {
      const DeviceScope device(plan.multiprocessors, plan.threads_per_multiprocessor, false);
      const BackwardArgs b_gpu = gradients(p32, gpu::scan_forward, gpu::scan_backward);
      std::vector<std::tuple<const char*, at::Tensor, at::Tensor, at::Tensor>> gradients = {
          {"grad_scores", b_gpu.grad_scores, b_cpu.grad_scores, b_ref.grad_scores},
          {"grad_values", b_gpu.grad_values, b_cpu.grad_values, b_ref.grad_values}};
      if (kind.state) {
        gradients.push_back({"grad_state_lse", b_gpu.grad_state_lse, b_cpu.grad_state_lse,
                             b_ref.grad_state_lse});
        gradients.push_back({"grad_state_out", b_gpu.grad_state_out, b_cpu.grad_state_out,
                             b_ref.grad_state_out});
      }
      for (const auto& [what, got, cpu_got, ref] : gradients) {
        const double scale = ref.abs().max().item<double>();
        const double norm = ref.norm().item<double>();
        const at::Tensor error = got.to(at::kDouble) - ref;
        const at::Tensor cpu_error = cpu_got.to(at::kDouble) - ref;
        const double max_error = error.abs().max().item<double>() / scale;
        const double cpu_max_error = cpu_error.abs().max().item<double>() / scale;
        const double l2_error = error.norm().item<double>() / norm;
        const double cpu_l2_error = cpu_error.norm().item<double>() / norm;
        std::printf("float32 backward %-17s N=%-5lld %-8s %-14s: max %.2e, CPU kernel %.2e "
                    "(%.2fx); l2 %.2e, CPU kernel %.2e (%.2fx)\n",
                    kind.name.c_str(), static_cast<long long>(N), plan.name, what, max_error,
                    cpu_max_error, max_error / cpu_max_error, l2_error, cpu_l2_error,
                    l2_error / cpu_l2_error);
        const std::string where = std::string(what) + " " + kind.name + " " + plan.name;
        RecordProperty(kind.name + "_" + plan.name + "_" + what,
                       std::to_string(l2_error / cpu_l2_error));
        EXPECT_LE(l2_error, std::max(kL2 * cpu_l2_error, kFloat64Level)) << where;
        EXPECT_LE(max_error, std::max(kMax * cpu_max_error, kFloat64Level)) << where;
      }
    }
  }
}

// ---- The emulator itself ------------------------------------------------------------------

// Shuffles with each width, CUDA's rules at the segment edges, and a block barrier around
// static shared memory.
__global__ void probe_kernel(int* out, int width) {
  __shared__ int shared[128];
  const int t = static_cast<int>(threadIdx.x);
  const int lane = t % warpSize;
  int* o = out + (static_cast<int>(blockIdx.x) * static_cast<int>(blockDim.x) + t) * 6;
  o[0] = __shfl_sync(0xffffffffu, t, lane + 5, width);
  o[1] = __shfl_up_sync(0xffffffffu, t, 3, width);
  o[2] = __shfl_down_sync(0xffffffffu, t, 3, width);
  o[3] = __shfl_xor_sync(0xffffffffu, t, 6, width);
  shared[t] = 3 * t + static_cast<int>(blockIdx.x);
  __syncthreads();
  o[4] = shared[(t + 37) % static_cast<int>(blockDim.x)];
  __syncthreads();
  o[5] = static_cast<int>(gridDim.x);
}

TEST(CudaEmulator, ShufflesAndBarriersFollowCuda) {
  for (const bool reverse : {false, true}) {
    for (const int width : {32, 8, 4}) {
      const DeviceScope device(1, 2048, reverse);
      const int blocks = 2, threads = 128;
      std::vector<int> out(static_cast<size_t>(blocks * threads * 6), -1);
      emu::launch(probe_kernel, emu::LaunchConfig{blocks, threads}, out.data(), width);
      for (int b = 0; b < blocks; ++b) {
        for (int t = 0; t < threads; ++t) {
          const int lane = t % 32, base = t - lane, segment = lane / width * width;
          const int* o = out.data() + (b * threads + t) * 6;
          const int up = lane % width >= 3 ? t - 3 : t;
          const int down = lane % width + 3 < width ? t + 3 : t;
          const int x = lane ^ 6;
          const int xored = x < segment + width ? base + x : t;
          const std::string where = "width " + std::to_string(width) + ", block " +
                                    std::to_string(b) + ", thread " + std::to_string(t);
          EXPECT_EQ(o[0], base + segment + (lane + 5) % width) << where;
          EXPECT_EQ(o[1], up) << where;
          EXPECT_EQ(o[2], down) << where;
          EXPECT_EQ(o[3], xored) << where;
          EXPECT_EQ(o[4], 3 * ((t + 37) % threads) + b) << where;
          EXPECT_EQ(o[5], blocks) << where;
        }
      }
    }
  }
}

TEST(CudaEmulator, RefusesWhatCudaRefuses) {
  std::vector<int> out(6 * 2048);
  EXPECT_THROW(emu::launch(probe_kernel, emu::LaunchConfig{0, 32}, out.data(), 32), c10::Error);
  EXPECT_THROW(emu::launch(probe_kernel, emu::LaunchConfig{1, 2048}, out.data(), 32), c10::Error);
  EXPECT_THROW(emu::launch(probe_kernel, emu::LaunchConfig{1, 32, 64 * 1024}, out.data(), 32),
               c10::Error);
}

__global__ void divergent_shuffle_kernel(int* out) {
  const int t = static_cast<int>(threadIdx.x);
  if (t < 16) {
    out[t] = __shfl_sync(0xffffffffu, t, 0);
  } else {
    out[t] = __shfl_sync(0xffffffffu, t, 1);
  }
}

__device__ void block_barrier() {
  __syncthreads();
}

__global__ void deadlock_kernel(int*) {
  if (threadIdx.x >= 32 && threadIdx.x < 48) {
    __syncwarp();  // lanes 48..63 of this warp never come: they wait at the block barrier
  }
  block_barrier();
}

__global__ void early_exit_kernel(int* out) {
  if (threadIdx.x == 7) {
    return;
  }
  out[threadIdx.x] = __shfl_down_sync(0xffffffffu, 1, 1);
}

TEST(CudaEmulatorDeathTest, FailsLoudlyOnKernelBugs) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  std::vector<int> out(64);
  EXPECT_DEATH(emu::launch(divergent_shuffle_kernel, emu::LaunchConfig{1, 32}, out.data()),
               "different warp intrinsics");
  EXPECT_DEATH(emu::launch(deadlock_kernel, emu::LaunchConfig{1, 64}, out.data()), "deadlock");
  EXPECT_DEATH(emu::launch(early_exit_kernel, emu::LaunchConfig{1, 32}, out.data()),
               "lanes have exited|lane exited");
}

}  // namespace
