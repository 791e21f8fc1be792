// aaren_threads: several threads stream their own tokens and states through the `step`
// method of one TorchScript model (an AarenEncoder saved with torch.jit.script) at the same
// time; each thread's outputs and final states must equal, bit for bit, those of the same
// stream run alone, one stream after another.
//
//   aaren_threads MODEL [--threads 8] [--tokens 2000] [--width 32] [--quick]
//
// Stream i has batch 1 + i % 2 and its own random tokens [tokens, batch, width] (seeded by i).
// --quick streams 100 tokens per thread. Prints one line per phase; exit status 0 when every
// stream agrees, 3 when one differs, 1 on an error (a missing model, a failed call), 2 on
// bad usage.
#include <ATen/CPUGeneratorImpl.h>
#include <torch/script.h>
#include <torch/torch.h>

#include <algorithm>
#include <barrier>
#include <chrono>
#include <cstdio>
#include <iostream>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace {

struct Stream {
  at::Tensor outputs;              // [tokens, batch, width]
  std::vector<at::Tensor> states;  // the final (lse, out) of every layer
};

// One stream through `step` from the empty state (None), in inference mode (thread-local).
Stream run_stream(torch::jit::Module& module, const at::Tensor& tokens) {
  c10::InferenceMode inference;
  c10::IValue states;  // None
  std::vector<at::Tensor> outputs;
  outputs.reserve(tokens.size(0));
  auto step = module.get_method("step");
  for (int64_t t = 0; t < tokens.size(0); ++t) {
    auto result = step({tokens[t], states}).toTuple();
    states = result->elements()[1];
    outputs.push_back(result->elements()[0].toTensor());
  }
  Stream stream{torch::stack(outputs), {}};
  for (const auto& layer : states.toListRef()) {
    for (const auto& t : layer.toTupleRef().elements()) {
      stream.states.push_back(t.toTensor());
    }
  }
  return stream;
}

bool same_bits(const Stream& a, const Stream& b) {
  if (!torch::equal(a.outputs, b.outputs) || a.states.size() != b.states.size()) {
    return false;
  }
  for (size_t i = 0; i < a.states.size(); ++i) {
    if (!torch::equal(a.states[i], b.states[i])) {
      return false;
    }
  }
  return true;
}

int64_t positive(const std::string& option, const char* text) {
  try {
    size_t used = 0;
    const long long value = std::stoll(text, &used);
    if (used == std::string(text).size() && value > 0) {
      return value;
    }
  } catch (const std::exception&) {
  }
  throw std::invalid_argument(option + " needs a positive integer, got '" + text + "'");
}

}  // namespace

int main(int argc, char** argv) {
  std::string model_path;
  int64_t threads = 8, tokens = 2000, width = 32;
  try {
    for (int i = 1; i < argc; ++i) {
      const std::string arg = argv[i];
      if (arg == "--quick") {
        tokens = 100;
      } else if ((arg == "--threads" || arg == "--tokens" || arg == "--width") && i + 1 < argc) {
        const int64_t value = positive(arg, argv[++i]);
        (arg == "--threads" ? threads : arg == "--tokens" ? tokens : width) = value;
      } else if (!arg.empty() && arg[0] != '-' && model_path.empty()) {
        model_path = arg;
      } else {
        throw std::invalid_argument("unexpected argument '" + arg + "'");
      }
    }
    if (model_path.empty()) {
      throw std::invalid_argument("usage: aaren_threads MODEL [--threads T] [--tokens N] [--width E] [--quick]");
    }
  } catch (const std::invalid_argument& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 2;
  }
  try {
    torch::set_num_threads(1);  // the threads below are the parallelism
    torch::jit::Module module = torch::jit::load(model_path);
    module.eval();
    std::vector<at::Tensor> inputs;
    for (int64_t i = 0; i < threads; ++i) {
      auto generator = at::make_generator<at::CPUGeneratorImpl>(static_cast<uint64_t>(100 + i));
      inputs.push_back(torch::randn({tokens, 1 + i % 2, width}, generator));
    }
    // Warm-up, untimed: TorchScript profiles a method's first calls and then runs an
    // optimized plan; every stream compared below runs on the optimized plan.
    for (int64_t i = 0; i < std::min<int64_t>(threads, 2); ++i) {
      run_stream(module, inputs[i].narrow(0, 0, std::min<int64_t>(tokens, 20)));
    }
    using clock = std::chrono::steady_clock;
    auto seconds = [](clock::duration d) { return std::chrono::duration<double>(d).count(); };

    std::vector<Stream> alone;
    const auto start_alone = clock::now();
    for (const auto& x : inputs) {
      alone.push_back(run_stream(module, x));
    }
    const double alone_s = seconds(clock::now() - start_alone);
    std::printf("one at a time: %lld streams x %lld tokens in %.2f s\n",
                static_cast<long long>(threads), static_cast<long long>(tokens), alone_s);

    std::vector<Stream> together(threads);
    std::vector<std::string> errors(threads);
    std::barrier start_line(static_cast<std::ptrdiff_t>(threads));
    std::vector<std::thread> workers;
    const auto start_together = clock::now();
    for (int64_t i = 0; i < threads; ++i) {
      workers.emplace_back([&, i] {
        start_line.arrive_and_wait();
        try {
          together[i] = run_stream(module, inputs[i]);
        } catch (const std::exception& e) {
          errors[i] = e.what();
        }
      });
    }
    for (auto& w : workers) {
      w.join();
    }
    const double together_s = seconds(clock::now() - start_together);
    int64_t equal = 0;
    for (int64_t i = 0; i < threads; ++i) {
      if (!errors[i].empty()) {
        std::printf("thread %lld failed: %s\n", static_cast<long long>(i), errors[i].c_str());
      } else if (same_bits(together[i], alone[i])) {
        ++equal;
      } else {
        std::printf("thread %lld: outputs differ from the stream run alone\n", static_cast<long long>(i));
      }
    }
    std::printf("%lld threads at once: %lld streams x %lld tokens in %.2f s; %lld of %lld "
                "bitwise equal to one at a time\n",
                static_cast<long long>(threads), static_cast<long long>(threads),
                static_cast<long long>(tokens), together_s, static_cast<long long>(equal),
                static_cast<long long>(threads));
    return equal == threads ? 0 : 3;
  } catch (const c10::Error& e) {
    std::cerr << "error: " << e.what_without_backtrace() << "\n";
    return 1;
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  }
}
