// Autocast for scan_forward and step: inside torch.autocast, scores and values are cast to
// the autocast dtype of their device, as PyTorch's own scaled_dot_product_attention is (a
// "lower precision" op): mixed inputs that autocast produced (bf16 scores from a matmul,
// float32 values from a LayerNorm, say) then run instead of failing on their dtypes. The
// state is left as it is: the operator converts it to its own dtypes (float64 lse,
// accumulation-dtype out) whatever autocast would do.
#include <ATen/autocast_mode.h>
#include <torch/library.h>

#include "aaren/aaren.h"

namespace aaren::ops {
namespace {

template <c10::DeviceType kDevice>
std::tuple<at::Tensor, at::Tensor, at::Tensor> scan_forward_autocast(
    const at::Tensor& scores, const at::Tensor& values,
    const std::optional<at::Tensor>& state_lse, const std::optional<at::Tensor>& state_out) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(
      at::autocast::get_autocast_dispatch_key_from_device_type(kDevice));
  const at::ScalarType dtype = at::autocast::get_autocast_dtype(kDevice);
  return scan_forward(at::autocast::cached_cast(dtype, scores, kDevice),
                      at::autocast::cached_cast(dtype, values, kDevice), state_lse, state_out);
}

template <c10::DeviceType kDevice>
std::tuple<at::Tensor, at::Tensor, at::Tensor> step_autocast(
    const at::Tensor& score, const at::Tensor& value, const std::optional<at::Tensor>& state_lse,
    const std::optional<at::Tensor>& state_out) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(
      at::autocast::get_autocast_dispatch_key_from_device_type(kDevice));
  const at::ScalarType dtype = at::autocast::get_autocast_dtype(kDevice);
  return step(at::autocast::cached_cast(dtype, score, kDevice),
              at::autocast::cached_cast(dtype, value, kDevice), state_lse, state_out);
}

}  // namespace
}  // namespace aaren::ops

TORCH_LIBRARY_IMPL(aaren, AutocastCPU, m) {
  m.impl("scan_forward", aaren::ops::scan_forward_autocast<c10::DeviceType::CPU>);
  m.impl("step", aaren::ops::step_autocast<c10::DeviceType::CPU>);
}

TORCH_LIBRARY_IMPL(aaren, AutocastCUDA, m) {
  m.impl("scan_forward", aaren::ops::scan_forward_autocast<c10::DeviceType::CUDA>);
  m.impl("step", aaren::ops::step_autocast<c10::DeviceType::CUDA>);
}
