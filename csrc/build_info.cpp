// How the library was built, for `python -m aaren` and bug reports. The build
// system passes the facts it decided as definitions; the rest is read here.
#include <ATen/Parallel.h>
#include <torch/csrc/api/include/torch/version.h>

#include <sstream>

#include "aaren/aaren.h"
#include "ops/cpu/scan_kernel.h"

#ifndef AAREN_VERSION
#error "AAREN_VERSION must be defined by the build"
#endif
#ifndef AAREN_CPU_ISAS
#error "AAREN_CPU_ISAS must be defined by the build"
#endif

namespace aaren {

std::string build_info_json() {
  std::ostringstream json;
  json << "{\"version\": \"" << AAREN_VERSION << "\"";
  json << ", \"torch_version\": \"" << TORCH_VERSION << "\"";
#ifdef AAREN_WITH_CUDA
  json << ", \"cuda\": true, \"cuda_version\": \"" << AAREN_CUDA_VERSION
       << "\", \"cuda_architectures\": \"" << AAREN_CUDA_ARCHITECTURES << "\"";
#else
  json << ", \"cuda\": false, \"cuda_version\": null, \"cuda_architectures\": null";
#endif
#ifdef _OPENMP
  json << ", \"openmp\": true";
#else
  json << ", \"openmp\": false";
#endif
  json << ", \"threads\": " << at::get_num_threads();
  json << ", \"cpu_isas_compiled\": \"" << AAREN_CPU_ISAS << "\"";
  json << ", \"cpu_isa_selected\": \"" << ops::cpu::selected_isa() << "\"";
  json << ", \"compiler\": \"" << __VERSION__ << "\"";
  json << ", \"cxx_standard\": " << __cplusplus;
#ifdef AAREN_SANITIZE
  json << ", \"sanitizers\": \"" << AAREN_SANITIZE << "\"";  // a test build (scripts/run.sh sanitize)
#else
  json << ", \"sanitizers\": null";
#endif
  json << "}";
  return json.str();
}

}  // namespace aaren
