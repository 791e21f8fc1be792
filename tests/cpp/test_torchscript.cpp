// A TorchScript model calling aaren.scan and aaren.step, scripted and saved from Python
// (make_scripted_model.py), loaded and run here with no Python.
#include <gtest/gtest.h>
#include <torch/script.h>
#include <torch/torch.h>

#include <cstdlib>

#include "aaren/aaren.h"
#include "reference.h"

TEST(AarenTorchScript, LoadedModelRunsForwardAndBackward) {
  const char* path = std::getenv("AAREN_SCRIPTED_MODEL");
  ASSERT_NE(path, nullptr) << "AAREN_SCRIPTED_MODEL is set by CTest";
  torch::jit::script::Module model = torch::jit::load(path);

  torch::manual_seed(4);
  const auto options = torch::TensorOptions().dtype(torch::kFloat64);
  const auto scores = torch::randn({2, 7, 3}, options).requires_grad_();
  const auto values = torch::randn({2, 7, 3, 4}, options);
  const auto outputs = model.forward({scores, values}).toTuple();
  const auto out = outputs->elements()[0].toTensor();
  const auto lse = outputs->elements()[1].toTensor();

  const auto [ref_out, ref_lse] = aaren::testing::reference_scan(scores.detach(), values, std::nullopt);
  EXPECT_TRUE(torch::allclose(out, ref_out, 1e-12, 1e-12));
  EXPECT_TRUE(torch::allclose(lse, ref_lse.select(1, -1), 1e-12, 1e-12));

  // Gradients flow through the C++ autograd kernels inside the loaded model.
  (out.sum() + lse.sum()).backward();
  ASSERT_TRUE(scores.grad().defined());
  EXPECT_TRUE(torch::isfinite(scores.grad()).all().item<bool>());
}
