// bench_edge_et: times one method of an ExecuTorch program token by token, for
// benchmarks/bench_edge.py (no libtorch; the same runtime libraries as aaren_runner).
//
//   bench_edge_et MODEL.pte [--method step] [--tokens N] [--windows 0,1024,8128] [--window 64]
//                           [--reset METHOD] [--jump] [--save FILE --save-calls K]
//                           [--single-thread]
//
// Every method of the program is loaded up front (they share their mutable buffers and
// memory arenas, as in aaren_runner); METHOD (default: "reset" when the program has one) is
// called once before the first token. Then `--method` runs N times. Its inputs, from the
// method's metadata: x [1, E] float32 (a new pseudo-random vector each call), and, when it
// takes a second input, the token's position as int64 [1] (0, 1, 2, ...: a KV-cache program
// writes the token at that position and attends to positions <= it).
//
// Prints "key value" lines: per window (the calls starting at each --windows position, --window
// calls each) the p50 and p90 in microseconds (--jump: only the windows' calls are made, at
// their positions, the tokens before them skipped: for a KV-cache program whose arithmetic at
// position p does not depend on what the cache holds), the p50 over all calls, and the process's
// resident set from /proc/self/status (VmRSS after loading, after the first call and at the
// end; VmHWM: the peak; RssAnon and RssFile at the end) and its threads. --save: the first K
// calls' x and output, float32 [K, 2E] (x, then y), for checking the program against the model
// in Python. --single-thread: every kernel on the calling thread, as aaren_runner's option of
// the same name (no thread pool). Errors: one line on stderr, exit 1.
#include <executorch/extension/module/module.h>
#include <executorch/extension/tensor/tensor.h>
#include <executorch/extension/threadpool/threadpool_guard.h>
#include <executorch/runtime/platform/runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

using executorch::aten::ScalarType;
using executorch::extension::make_tensor_ptr;
using executorch::extension::module::Module;
using executorch::runtime::Error;
using executorch::runtime::EValue;

#include "step_timing.h"

namespace {

void check(Error error, const std::string& what) {
  if (error != Error::Ok) {
    char hex[16];
    std::snprintf(hex, sizeof hex, "%x", static_cast<unsigned>(error));
    throw std::runtime_error(what + " failed (ExecuTorch error 0x" + hex + ")");
  }
}

using aaren::edge::now_us;
using aaren::edge::parse_list;
using aaren::edge::status_mib;

int run(int argc, char** argv) {
  std::string model, method = "step", reset, save;
  long save_calls = 0;
  bool jump = false, single_thread = false;
  long tokens = 256, window = 64;
  std::vector<long> windows{0};
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    const auto value = [&]() -> std::string {
      if (i + 1 >= argc) {
        throw std::runtime_error(arg + " needs a value");
      }
      return argv[++i];
    };
    if (arg == "--method") {
      method = value();
    } else if (arg == "--tokens") {
      tokens = std::stol(value());
    } else if (arg == "--window") {
      window = std::stol(value());
    } else if (arg == "--windows") {
      windows = parse_list(value());
    } else if (arg == "--reset") {
      reset = value();
    } else if (arg == "--save") {
      save = value();
    } else if (arg == "--save-calls") {
      save_calls = std::stol(value());
    } else if (arg == "--jump") {
      jump = true;
    } else if (arg == "--single-thread") {
      single_thread = true;
    } else if (!arg.empty() && arg[0] != '-' && model.empty()) {
      model = arg;
    } else {
      throw std::runtime_error("usage: bench_edge_et MODEL.pte [--method M] [--tokens N] "
                               "[--windows 0,1024] [--window W] [--reset METHOD] [--jump] "
                               "[--save FILE --save-calls K] [--single-thread]");
    }
  }
  if (model.empty() || tokens < 1 || window < 1) {
    throw std::runtime_error("give a program, --tokens >= 1 and --window >= 1");
  }
  // Held until the end of run(): loading and every call happen on this thread.
  std::optional<executorch::extension::threadpool::NoThreadPoolGuard> no_pool;
  if (single_thread) {
    no_pool.emplace();
  }
  executorch::runtime::runtime_init();
  Module module(model, Module::LoadMode::Mmap, nullptr, nullptr, nullptr,
                /*share_memory_arenas=*/true);
  check(module.load(), model + ": loading the program");
  const auto names = module.method_names();
  check(names.error(), "reading the methods");
  if (names->count(method) == 0) {
    throw std::runtime_error(model + " has no method '" + method + "'");
  }
  // Every method up front: loading one writes the initial values of the shared buffers.
  for (const auto& name : names.get()) {
    check(module.load_method(name), "loading method '" + name + "'");
  }
  if (reset.empty() && names->count("reset")) {
    reset = "reset";
  }
  const double rss_load = status_mib("VmRSS");

  const auto meta = module.method_meta(method);
  check(meta.error(), "reading method '" + method + "'");
  const auto x_info = meta->input_tensor_meta(0);
  check(x_info.error(), "reading the first input");
  if (x_info->scalar_type() != ScalarType::Float || x_info->sizes().size() != 2 ||
      x_info->sizes()[0] != 1) {
    throw std::runtime_error("'" + method + "' must take x [1, E] float32 first");
  }
  const int32_t width = x_info->sizes()[1];
  const bool takes_position = meta->num_inputs() >= 2;
  auto x = make_tensor_ptr({1, width}, std::vector<float>(static_cast<size_t>(width)));
  auto position = make_tensor_ptr({1}, std::vector<int64_t>{0});
  if (!reset.empty()) {
    check(module.execute(reset).error(), "calling '" + reset + "'");
  }

  aaren::edge::TokenSource source;
  double rss_first = -1.0;
  volatile float sink = 0.0f;
  std::vector<float> saved;
  // The positions called: every token, or (--jump) only the windows'.
  std::vector<long> positions;
  for (long t = 0; t < tokens; ++t) {
    bool in_window = !jump;
    for (const long begin : windows) {
      in_window = in_window || (t >= begin && t < begin + window);
    }
    if (in_window) {
      positions.push_back(t);
    }
  }
  std::vector<double> us_at(static_cast<size_t>(tokens), -1.0);
  for (const long t : positions) {
    float* data = x->mutable_data_ptr<float>();
    source.fill(data, width);
    position->mutable_data_ptr<int64_t>()[0] = t;
    std::vector<EValue> inputs{EValue(x)};
    if (takes_position) {
      inputs.emplace_back(position);
    }
    const double start = now_us();
    const auto result = module.execute(method, inputs);
    us_at[static_cast<size_t>(t)] = now_us() - start;
    check(result.error(), "'" + method + "' at token " + std::to_string(t));
    if (rss_first < 0) {
      rss_first = status_mib("VmRSS");
    }
    const float* y = result.get()[0].toTensor().const_data_ptr<float>();
    sink = sink + y[0];
    if (static_cast<long>(saved.size()) < save_calls * 2 * width) {
      saved.insert(saved.end(), data, data + width);
      saved.insert(saved.end(), y, y + width);
    }
  }
  if (!save.empty()) {
    std::ofstream out(save, std::ios::binary);
    out.write(reinterpret_cast<const char*>(saved.data()),
              static_cast<std::streamsize>(saved.size() * sizeof(float)));
    if (!out) {
      throw std::runtime_error(save + ": cannot write");
    }
  }
  std::vector<double> us;  // the calls' times, in order
  for (const long t : positions) {
    us.push_back(us_at[static_cast<size_t>(t)]);
  }
  aaren::edge::print_report(width, tokens, us_at, us, windows, window, rss_load, rss_first,
                            static_cast<double>(sink));
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const std::exception& error) {
    std::fprintf(stderr, "bench_edge_et: %s\n", error.what());
    return 1;
  }
}
