// The CPU kernels, one set per instruction set compiled (see scan_kernel.cpp).
#pragma once

#include "ops/scan.h"

namespace aaren::ops::cpu {

#define AAREN_DECLARE_CPU_KERNELS(isa)             \
  namespace isa {                                  \
  void scan_forward(const ForwardArgs& args);      \
  void scan_backward(const BackwardArgs& args);    \
  }

AAREN_DECLARE_CPU_KERNELS(DEFAULT)
#ifdef AAREN_HAVE_AVX2
AAREN_DECLARE_CPU_KERNELS(AVX2)
#endif
#ifdef AAREN_HAVE_AVX512
AAREN_DECLARE_CPU_KERNELS(AVX512)
#endif
#ifdef AAREN_HAVE_AVX512_BF16
AAREN_DECLARE_CPU_KERNELS(AVX512_BF16)
#endif

#undef AAREN_DECLARE_CPU_KERNELS

// The kernels of the selected instruction set: what the CPU registrations run.
void forward(const ForwardArgs& args);
void backward(const BackwardArgs& args);

// The instruction set the kernels run with: the best one compiled that PyTorch
// itself uses on this CPU (so ATEN_CPU_CAPABILITY lowers both alike), AVX512 with its
// bfloat16 instructions (AVX512_BF16) where the CPU has them.
const char* selected_isa();

}  // namespace aaren::ops::cpu
