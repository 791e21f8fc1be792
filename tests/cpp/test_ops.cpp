// The aaren operators called from C++ through the dispatcher, forward and backward.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "aaren/aaren.h"
#include "reference.h"

namespace {

using aaren::State;
using aaren::testing::reference_scan;

constexpr int64_t B = 2, N = 9, H = 3, D = 5;

torch::TensorOptions f64() {
  return torch::TensorOptions().dtype(torch::kFloat64);
}

State random_state() {
  return {torch::randn({B, H}, f64()), torch::randn({B, H, D}, f64())};
}

TEST(AarenOps, ScanMatchesReferenceWithAndWithoutState) {
  torch::manual_seed(0);
  const auto scores = torch::randn({B, N, H}, f64());
  const auto values = torch::randn({B, N, H, D}, f64());
  for (const std::optional<State>& state : {std::optional<State>(), std::optional<State>(random_state())}) {
    const auto [out, final_state] = aaren::scan(scores, values, state);
    const auto [ref_out, ref_lse] = reference_scan(scores, values, state);
    EXPECT_TRUE(torch::allclose(out, ref_out, 1e-12, 1e-12));
    EXPECT_TRUE(torch::allclose(final_state.lse, ref_lse.select(1, -1), 1e-12, 1e-12));
    EXPECT_TRUE(torch::allclose(final_state.out, ref_out.select(1, -1), 1e-12, 1e-12));
  }
}

TEST(AarenOps, BackwardMatchesReferenceAutograd) {
  torch::manual_seed(1);
  const auto scores = torch::randn({B, N, H}, f64());
  auto masked = scores.clone();
  masked.index_put_({torch::indexing::Slice(), 0}, -std::numeric_limits<double>::infinity());
  const auto values = torch::randn({B, N, H, D}, f64());
  const auto state = random_state();
  const auto grad_out = torch::randn({B, N, H, D}, f64());
  const auto grad_lse = torch::randn({B, H}, f64());

  const auto gradients = [&](bool use_reference, const torch::Tensor& s) {
    std::vector<torch::Tensor> leaves = {s.clone().requires_grad_(), values.clone().requires_grad_(),
                                         state.lse.clone().requires_grad_(), state.out.clone().requires_grad_()};
    const State leaf_state{leaves[2], leaves[3]};
    torch::Tensor out, lse;
    if (use_reference) {
      std::tie(out, lse) = reference_scan(leaves[0], leaves[1], leaf_state);
      lse = lse.select(1, -1);
    } else {
      auto result = aaren::scan(leaves[0], leaves[1], leaf_state);
      out = result.first;
      lse = result.second.lse;
    }
    ((out * grad_out).sum() + (lse * grad_lse).sum()).backward();
    std::vector<torch::Tensor> grads;
    for (const auto& leaf : leaves) {
      grads.push_back(leaf.grad());
    }
    return grads;
  };
  for (const auto& s : {scores, masked}) {
    const auto ours = gradients(false, s);
    const auto want = gradients(true, s);
    for (size_t i = 0; i < ours.size(); ++i) {
      EXPECT_TRUE(torch::isfinite(ours[i]).all().item<bool>()) << "input " << i;
      EXPECT_TRUE(torch::allclose(ours[i], torch::nan_to_num(want[i], 0.0), 1e-10, 1e-10)) << "input " << i;
    }
  }
}

TEST(AarenOps, StepByStepEqualsScanInFloat32) {
  torch::manual_seed(2);
  const auto scores = torch::randn({B, N, H});
  const auto values = torch::randn({B, N, H, D});
  const auto [whole, final_state] = aaren::scan(scores, values);
  std::optional<State> state;
  for (int64_t n = 0; n < N; ++n) {
    auto [y, next] = aaren::step(scores.select(1, n), values.select(1, n), state);
    EXPECT_TRUE(torch::allclose(y, whole.select(1, n), 1e-5, 1e-6)) << "token " << n;
    state = next;
  }
  EXPECT_TRUE(torch::allclose(state->lse, final_state.lse, 1e-5, 1e-6));
}

TEST(AarenOps, HalfInputsKeepAFloat64State) {
  torch::manual_seed(3);
  const auto scores = torch::randn({B, 64, H}, f64());
  const auto values = torch::randn({B, 64, H, D}, f64());
  const auto [out, state] = aaren::scan(scores.to(torch::kBFloat16), values.to(torch::kBFloat16));
  EXPECT_EQ(out.scalar_type(), torch::kBFloat16);
  EXPECT_EQ(state.lse.scalar_type(), torch::kFloat64);
  EXPECT_EQ(state.out.scalar_type(), torch::kFloat64);
  const auto [ref, ref_lse] = reference_scan(scores.to(torch::kBFloat16).to(torch::kFloat64),
                                             values.to(torch::kBFloat16).to(torch::kFloat64), std::nullopt);
  EXPECT_LT((out.to(torch::kFloat64) - ref).abs().max().item<double>(), 2e-2);
}

TEST(AarenOps, BadInputThrowsClearError) {
  const auto scores = torch::randn({B, N, H});
  const auto values = torch::randn({B, N, H, D});
  try {
    aaren::scan(scores, values.to(torch::kFloat64));
    FAIL() << "mixed dtypes were accepted";
  } catch (const c10::Error& error) {
    EXPECT_NE(std::string(error.what()).find("scores and values must have the same dtype"), std::string::npos);
  }
  EXPECT_THROW(aaren::scan(scores.select(0, 0), values), c10::Error);
  EXPECT_THROW(aaren::scan(scores.to(torch::kInt64), values.to(torch::kInt64)), c10::Error);
  EXPECT_THROW(aaren::step(scores, values), c10::Error);
}

TEST(AarenOps, AttentionStepIsProjectionStepProjection) {
  torch::manual_seed(0);
  constexpr int64_t E = H * D;
  const auto x = torch::randn({B, E}, f64());
  const auto proj_weight = torch::randn({H + E, E}, f64());
  const auto proj_bias = torch::randn({H + E}, f64());
  const auto out_weight = torch::randn({7, E}, f64());
  const auto out_bias = torch::randn({7}, f64());
  const State state = random_state();
  const auto [y, lse, state_out] = aaren::ops::attention_step(
      x, proj_weight, proj_bias, out_weight, out_bias, H, state.lse, state.out);
  const auto projected = torch::linear(x, proj_weight, proj_bias);
  const auto [out, next] = aaren::step(projected.narrow(1, 0, H),
                                       projected.narrow(1, H, E).reshape({B, H, D}), state);
  // The CPU kernel sums its small products in another order than BLAS: a rounding apart.
  EXPECT_TRUE(torch::allclose(y, torch::linear(out.flatten(1), out_weight, out_bias), 1e-12, 1e-12));
  EXPECT_TRUE(torch::allclose(lse, next.lse, 1e-12, 1e-12));
  EXPECT_TRUE(torch::allclose(state_out, next.out, 1e-12, 1e-12));
  EXPECT_THROW(aaren::ops::attention_step(x, proj_weight, proj_bias, out_weight, out_bias, H + 1,
                                          std::nullopt, std::nullopt),
               c10::Error);
}

TEST(AarenOps, EmptySequenceKeepsTheState) {
  const auto state = random_state();
  const auto [out, final_state] =
      aaren::scan(torch::zeros({B, 0, H}, f64()), torch::zeros({B, 0, H, D}, f64()), state);
  EXPECT_EQ(out.size(1), 0);
  EXPECT_TRUE(torch::equal(final_state.lse, state.lse));
  const auto [_, empty] = aaren::scan(torch::zeros({B, 0, H}, f64()), torch::zeros({B, 0, H, D}, f64()));
  EXPECT_TRUE(torch::isneginf(empty.lse).all().item<bool>());
}

// The packed scan from C++ (aaren::scan_varlen, its C++ autograd): each sequence as
// aaren::scan over it alone, values and gradients; an empty sequence keeps its state.
TEST(AarenOps, PackedSequencesEqualEachSequence) {
  torch::manual_seed(5);
  const std::vector<int64_t> lengths = {4, 0, 1, 7};
  const int64_t T = 12, S = 4;
  const auto scores = torch::randn({T, H}, f64()).requires_grad_();
  const auto values = torch::randn({T, H, D}, f64()).requires_grad_();
  const State state{torch::randn({S, H}, f64()).requires_grad_(),
                    torch::randn({S, H, D}, f64()).requires_grad_()};
  const auto cu = torch::tensor({0, 4, 4, 5, 12}, torch::TensorOptions().dtype(torch::kInt32));
  const auto [out, final_state] = aaren::scan_varlen(scores, values, cu, 7, state);
  const auto loss = [](const torch::Tensor& o, const State& st) {
    return (o * o).sum() + st.lse.sin().sum() + st.out.sum();
  };
  const auto packed_grads = torch::autograd::grad({loss(out, final_state)},
                                                  {scores, values, state.lse, state.out});
  int64_t start = 0;
  torch::Tensor each_loss = torch::zeros({}, f64());
  for (int64_t i = 0; i < S; ++i) {
    const int64_t n = lengths[i];
    const State st{state.lse.narrow(0, i, 1), state.out.narrow(0, i, 1)};
    const auto [o, f] = aaren::scan(scores.narrow(0, start, n).unsqueeze(0),
                                    values.narrow(0, start, n).unsqueeze(0), st);
    EXPECT_TRUE(torch::allclose(out.narrow(0, start, n), o.squeeze(0), 1e-12, 1e-12));
    EXPECT_TRUE(torch::allclose(final_state.lse[i], f.lse[0], 1e-12, 1e-12));
    EXPECT_TRUE(torch::allclose(final_state.out[i], f.out[0], 1e-12, 1e-12));
    each_loss = each_loss + loss(o, f);
    start += n;
  }
  const auto each_grads = torch::autograd::grad({each_loss}, {scores, values, state.lse, state.out});
  for (size_t k = 0; k < each_grads.size(); ++k) {
    EXPECT_TRUE(torch::allclose(packed_grads[k], each_grads[k], 1e-10, 1e-12)) << k;
  }
  EXPECT_THROW(aaren::scan_varlen(scores, values, torch::tensor({0, 5, 4, 5, 12}).to(torch::kInt32)),
               c10::Error);
}

TEST(AarenOps, BuildInfoIsJson) {
  const auto info = aaren::build_info_json();
  EXPECT_EQ(info.front(), '{');
  EXPECT_NE(info.find("\"torch_version\""), std::string::npos);
}

}  // namespace
