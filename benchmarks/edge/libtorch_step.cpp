// bench_edge_libtorch: times the one-token step of an Aaren encoder compiled by AOTInductor,
// run from C++ with LibTorch (the project's LibTorch deployment path, docs/deploy.md), for
// benchmarks/bench_edge.py.
//
//   bench_edge_libtorch STEP.pt2 --layers L --heads H --head-dim D [--tokens N]
//                       [--windows 0,1024,8128] [--window 64]
//
// STEP.pt2: an AOTInductor package (model "model") of
//   (x [1, E], lse_0 [1, H], out_0 [1, H, D], ..., lse_{L-1}, out_{L-1})
//     -> (y [1, E], lse_0', out_0', ...)   (the state float64, as aaren's)
// The state starts empty (lse = -inf, out = 0) and is replaced after every token, as in
// examples/cpp. One intra-op thread, inference mode. Prints the same "key value" lines as
// bench_edge_et (windows' p50/p90, p50 over all tokens, VmRSS after loading, after the first
// token and at the end, VmHWM, RssAnon, RssFile, threads). The aaren operators must be
// registered: the build links libaaren_ops.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "step_timing.h"

namespace {

using aaren::edge::now_us;
using aaren::edge::parse_list;
using aaren::edge::status_mib;

int run(int argc, char** argv) {
  std::string model;
  long tokens = 256, window = 64, layers = 0, heads = 0, head_dim = 0;
  std::vector<long> windows{0};
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    const auto value = [&]() -> std::string {
      if (i + 1 >= argc) {
        throw std::runtime_error(arg + " needs a value");
      }
      return argv[++i];
    };
    if (arg == "--tokens") {
      tokens = std::stol(value());
    } else if (arg == "--window") {
      window = std::stol(value());
    } else if (arg == "--windows") {
      windows = parse_list(value());
    } else if (arg == "--layers") {
      layers = std::stol(value());
    } else if (arg == "--heads") {
      heads = std::stol(value());
    } else if (arg == "--head-dim") {
      head_dim = std::stol(value());
    } else if (!arg.empty() && arg[0] != '-' && model.empty()) {
      model = arg;
    } else {
      throw std::runtime_error("usage: bench_edge_libtorch STEP.pt2 --layers L --heads H "
                               "--head-dim D [--tokens N] [--windows 0,1024] [--window W]");
    }
  }
  if (model.empty() || layers < 1 || heads < 1 || head_dim < 1 || tokens < 1 || window < 1) {
    throw std::runtime_error("give a package, --layers, --heads, --head-dim and --tokens >= 1");
  }
  if (!c10::Dispatcher::singleton().findSchema({"aaren::step", ""}).has_value()) {
    throw std::runtime_error("the aaren operators are not registered: link libaaren_ops");
  }
  torch::set_num_threads(1);
  c10::InferenceMode inference;
  torch::inductor::AOTIModelPackageLoader step(model, "model");
  const double rss_load = status_mib("VmRSS");
  const int64_t width = heads * head_dim;

  const auto f64 = torch::TensorOptions().dtype(torch::kFloat64);
  std::vector<at::Tensor> state;
  for (long layer = 0; layer < layers; ++layer) {
    state.push_back(torch::full({1, heads}, -INFINITY, f64));
    state.push_back(torch::zeros({1, heads, head_dim}, f64));
  }
  // The tokens as bench_edge_et makes them: one [1, E] vector at a time, nothing held.
  const at::Tensor x = torch::empty({1, width});
  aaren::edge::TokenSource source;
  std::vector<double> us;
  us.reserve(static_cast<size_t>(tokens));
  double sink = 0.0, rss_first = -1.0;
  for (long t = 0; t < tokens; ++t) {
    source.fill(x.data_ptr<float>(), width);
    std::vector<at::Tensor> inputs{x};
    inputs.insert(inputs.end(), state.begin(), state.end());
    const double start = now_us();
    auto outputs = step.run(inputs);
    us.push_back(now_us() - start);
    if (outputs.size() != state.size() + 1) {
      throw std::runtime_error("the package returned " + std::to_string(outputs.size()) +
                               " tensors, expected " + std::to_string(state.size() + 1));
    }
    sink += outputs[0].data_ptr<float>()[0];
    state.assign(outputs.begin() + 1, outputs.end());
    if (rss_first < 0) {
      rss_first = status_mib("VmRSS");
    }
  }
  aaren::edge::print_report(width, tokens, us, us, windows, window, rss_load, rss_first, sink);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const c10::Error& error) {
    const std::string message = error.msg();
    std::fprintf(stderr, "bench_edge_libtorch: %s\n", message.substr(0, message.find('\n')).c_str());
  } catch (const std::exception& error) {
    std::fprintf(stderr, "bench_edge_libtorch: %s\n", error.what());
  }
  return 1;
}
