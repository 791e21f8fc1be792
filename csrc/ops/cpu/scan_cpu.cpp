// Registers the CPU kernels, choosing the instruction set once at load time.
#include <ATen/Version.h>
#include <torch/library.h>

#include "ops/cpu/scan_kernel.h"

namespace aaren::ops::cpu {
namespace {

struct Kernels {
  const char* isa;
  ForwardKernel forward;
  BackwardKernel backward;
};

Kernels choose_kernels() {
  // PyTorch's choice for this CPU, e.g. "AVX2"; it honours ATEN_CPU_CAPABILITY.
  const std::string capability = at::get_cpu_capability();
#ifdef AAREN_HAVE_AVX512_BF16
  if (capability == "AVX512" && __builtin_cpu_supports("avx512bf16")) {
    return {"AVX512_BF16", AVX512_BF16::scan_forward, AVX512_BF16::scan_backward};
  }
#endif
#ifdef AAREN_HAVE_AVX512
  if (capability == "AVX512") {
    return {"AVX512", AVX512::scan_forward, AVX512::scan_backward};
  }
#endif
#ifdef AAREN_HAVE_AVX2
  if (capability == "AVX2" || capability == "AVX512") {
    return {"AVX2", AVX2::scan_forward, AVX2::scan_backward};
  }
#endif
  return {"DEFAULT", DEFAULT::scan_forward, DEFAULT::scan_backward};
}

const Kernels& kernels() {
  static const Kernels chosen = choose_kernels();
  return chosen;
}

}  // namespace

void forward(const ForwardArgs& args) {
  kernels().forward(args);
}

void backward(const BackwardArgs& args) {
  kernels().backward(args);
}

const char* selected_isa() {
  return kernels().isa;
}

}  // namespace aaren::ops::cpu

TORCH_LIBRARY_IMPL(aaren, CPU, m) {
  aaren::ops::register_backend<aaren::ops::cpu::forward, aaren::ops::cpu::backward>(m);
}
