// A reference for the C++ tests: the masked softmax over every prefix, built from
// LibTorch ops (so LibTorch's autograd gives the reference gradients).
#pragma once

#include <torch/torch.h>

#include <limits>
#include <optional>
#include <utility>

#include "aaren/aaren.h"

namespace aaren::testing {

// Returns out [B,N,H,D] and lse [B,N,H]; the state acts as a token before the first.
inline std::pair<torch::Tensor, torch::Tensor> reference_scan(torch::Tensor scores, torch::Tensor values,
                                                              const std::optional<State>& state) {
  if (state.has_value()) {
    scores = torch::cat({state->lse.to(scores.dtype()).unsqueeze(1), scores}, 1);
    values = torch::cat({state->out.unsqueeze(1), values}, 1);
  }
  const int64_t n = scores.size(1);
  const auto later = torch::ones({n, n}, torch::kBool).triu(1).view({1, n, n, 1});
  const auto logits = scores.unsqueeze(1).expand({-1, n, -1, -1})
                          .masked_fill(later, -std::numeric_limits<double>::infinity());
  const auto lse = torch::logsumexp(logits, 2);
  const auto weights = torch::softmax(logits, 2);
  auto out = torch::einsum("bkih,bihd->bkhd", {weights, values});
  if (state.has_value()) {
    return {out.slice(1, 1), lse.slice(1, 1)};
  }
  return {out, lse};
}

}  // namespace aaren::testing
