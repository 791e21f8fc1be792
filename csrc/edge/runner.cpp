// aaren_runner: runs an Aaren program exported by aaren.edge.export with the ExecuTorch runtime
// (no libtorch): a prompt through the parallel scan (`prefill`), then one token at a time
// (`step`), the recurrent state kept inside the program (docs/edge.md).
//
//   aaren_runner MODEL.pte --input X.f32 --output Y.f32 [--prefill K]   (encoder programs)
//   aaren_runner MODEL.pte --prompt-ids 1,2,3 --generate N              (language models)
//
// Encoder programs: X is raw little-endian float32 [T, E] (batch 1, E from the program), Y
// the outputs [T, E]; the first K tokens (default 0) go through `prefill`, in chunks of at most
// the program's longest prefill, the rest one at a time through `step`. Language models: the
// prompt through `prefill`, then N tokens by greedy decoding, each fed back through `step`;
// the generated ids are printed. Both print the step's per-token latency (p50, p90), the
// prefill's time, the process's peak RSS and its threads. Bad input gets one line on stderr and exit 1.
//
// --single-thread runs every kernel on the calling thread (ExecuTorch's NoThreadPoolGuard, held
// while the program loads and runs): the XNNPACK delegate then gets no thread pool. The default
// is the runtime's pool, one thread per core. For a step's matrix-vector products on a few
// hundred weights a pool costs more in wake-ups than it gains (docs/edge.md measures both).
#include <executorch/extension/module/module.h>
#include <executorch/extension/tensor/tensor.h>
#include <executorch/extension/threadpool/threadpool_guard.h>
#include <executorch/runtime/platform/platform.h>
#include <executorch/runtime/platform/runtime.h>

#include "process_stats.h"

#include <sys/stat.h>

#include <algorithm>
#include <cerrno>
#include <set>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
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

namespace {

// A bad input or a failed call: main prints the message as one line and exits with 1.
struct Failure : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// ExecuTorch reports the cause of a failure (an operator without a kernel, a program that
// does not parse) in its log, not in the returned error code: the runner keeps the first error
// line logged since the last call it checked (the cause; later lines summarize) for its own
// one-line message, and prints the log only with --verbose.
std::string first_runtime_error;
bool verbose = false;

void keep_log_message(et_timestamp_t, et_pal_log_level_t level, const char* filename,
                      const char*, size_t line, const char* message, size_t length) {
  if ((level == kError || level == kFatal) && first_runtime_error.empty()) {
    // One printable line: a message about a corrupt file may quote its bytes.
    while (length > 0 && (message[length - 1] == '\n' || message[length - 1] == '\r')) {
      --length;
    }
    for (size_t i = 0; i < length; ++i) {
      const unsigned char c = static_cast<unsigned char>(message[i]);
      first_runtime_error.push_back(c >= 0x20 && c < 0x7f ? static_cast<char>(c) : '?');
    }
  }
  if (verbose) {
    std::fprintf(stderr, "[executorch %c %s:%zu] %.*s\n", static_cast<char>(level), filename,
                 line, static_cast<int>(length), message);
  }
}

std::string runtime_cause() {
  return first_runtime_error.empty() ? std::string() : ": " + first_runtime_error;
}

void check(Error error, const std::string& what) {
  const std::string cause = runtime_cause();
  first_runtime_error.clear();
  if (error != Error::Ok) {
    char code[48];
    std::snprintf(code, sizeof code, " failed (ExecuTorch error 0x%x)", static_cast<unsigned>(error));
    throw Failure(what + code + cause);
  }
}

using aaren::edge::now_us;
using aaren::edge::percentile;

void print_step_latency(const std::vector<double>& step_us) {
  if (step_us.empty()) {
    std::printf("step latency per token: n/a (no step)\n");
    return;
  }
  std::printf("step latency per token: p50 %.1f us, p90 %.1f us\n", percentile(step_us, 0.5),
              percentile(step_us, 0.9));
}

struct Options {
  std::string model, input, output, prompt_ids;
  long prefill = 0;
  long generate = -1;
  bool single_thread = false;
};

long parse_count(const std::string& flag, const char* text) {
  char* end = nullptr;
  errno = 0;
  const long value = std::strtol(text, &end, 10);
  if (end == text || *end != '\0' || value < 0 || errno == ERANGE) {
    throw Failure(flag + " takes a count of 0 or more, got '" + text + "'");
  }
  return value;
}

Options parse(int argc, char** argv) {
  const std::string usage =
      "usage: aaren_runner MODEL.pte --input X.f32 --output Y.f32 [--prefill K] | "
      "aaren_runner MODEL.pte --prompt-ids 1,2,3 --generate N  [--single-thread] [--verbose]";
  Options options;
  std::set<std::string> given;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg.rfind("--", 0) == 0 && !given.insert(arg).second) {
      throw Failure(arg + " is given twice");
    }
    const auto value = [&]() -> const char* {
      if (i + 1 >= argc) {
        throw Failure(arg + " needs a value; " + usage);
      }
      return argv[++i];
    };
    if (arg == "--input") {
      options.input = value();
    } else if (arg == "--output") {
      options.output = value();
    } else if (arg == "--prefill") {
      options.prefill = parse_count(arg, value());
    } else if (arg == "--prompt-ids") {
      options.prompt_ids = value();
    } else if (arg == "--generate") {
      options.generate = parse_count(arg, value());
    } else if (arg == "--single-thread") {
      options.single_thread = true;
    } else if (arg == "--verbose") {
      verbose = true;
    } else if (arg == "--help" || arg == "-h") {
      std::printf("%s\n", usage.c_str());
      std::exit(0);
    } else if (!arg.empty() && arg[0] == '-') {
      throw Failure("unknown option " + arg + "; " + usage);
    } else if (options.model.empty()) {
      options.model = arg;
    } else {
      throw Failure("more than one program given ('" + options.model + "', '" + arg + "'); " +
                    usage);
    }
  }
  if (options.model.empty()) {
    throw Failure(usage);
  }
  const bool encoder = !options.input.empty() || !options.output.empty();
  const bool language = !options.prompt_ids.empty() || options.generate >= 0;
  if (encoder == language) {
    throw Failure("give either --input and --output (an encoder) or --prompt-ids and "
                  "--generate (a language model); " + usage);
  }
  if (encoder && (options.input.empty() || options.output.empty())) {
    throw Failure("an encoder program needs both --input and --output");
  }
  if (language && (options.prompt_ids.empty() || options.generate < 0)) {
    throw Failure("a language model needs both --prompt-ids and --generate");
  }
  return options;
}

// The program, its three methods loaded up front: loading a method writes the initial
// (empty) state into the mutable buffers the methods share, so loading one later would wipe
// the state that the others have built.
struct Program {
  explicit Program(const std::string& path)
      : module(path, Module::LoadMode::Mmap, nullptr, nullptr, nullptr,
               /*share_memory_arenas=*/true) {
    struct stat info{};
    if (stat(path.c_str(), &info) != 0) {
      throw Failure(path + ": no such file");
    }
    if (info.st_size == 0) {
      throw Failure(path + ": the file is empty, not an ExecuTorch program");
    }
    check(module.load(), path + ": loading the program (truncated or not an ExecuTorch .pte?)");
    const auto names = module.method_names();
    check(names.error(), path + ": reading its methods");
    for (const char* method : {"prefill", "step", "reset"}) {
      if (names.get().count(method) == 0) {
        throw Failure(path + ": the program has no '" + method +
                      "' method; export it with aaren.edge.export");
      }
    }
    for (const char* method : {"prefill", "step", "reset"}) {
      check(module.load_method(method),
            path + ": loading method '" + method + "' (does the runner have its kernels?)");
    }
  }

  // A method's first input: its dtype and sizes (a dynamic size at its upper bound).
  struct Input {
    ScalarType dtype;
    std::vector<int32_t> sizes;
  };

  Input input(const char* method) {
    const auto meta = module.method_meta(method);
    check(meta.error(), std::string("reading method '") + method + "'");
    const auto info = meta->input_tensor_meta(0);
    check(info.error(), std::string("reading the input of '") + method + "'");
    return {info->scalar_type(), {info->sizes().begin(), info->sizes().end()}};
  }

  Module module;
};

// ---- encoder programs: prefill(x [1, T, E]) -> [1, T, E], step(x [1, E]) -> [1, E]

// The input tokens, read a chunk at a time (the runner holds no more than one prefill chunk of
// inputs and outputs, whatever T: its memory does not grow with the stream).
struct TokenFile {
  TokenFile(const std::string& path, int64_t width) : path(path), width(width) {
    struct stat info{};
    if (stat(path.c_str(), &info) != 0) {
      throw Failure(path + ": cannot open the input");
    }
    if (!S_ISREG(info.st_mode)) {
      throw Failure(path + ": the input is not a regular file");
    }
    in.open(path, std::ios::binary | std::ios::ate);
    if (!in) {
      throw Failure(path + ": cannot open the input");
    }
    const std::streamsize bytes = in.tellg();
    const int64_t row_bytes = width * static_cast<int64_t>(sizeof(float));
    if (bytes % row_bytes != 0) {
      throw Failure(path + ": " + std::to_string(bytes) + " bytes is not a whole number of " +
                    "tokens of " + std::to_string(width) + " float32 (" +
                    std::to_string(row_bytes) + " bytes each)");
    }
    if (bytes == 0) {
      throw Failure(path + ": the input holds no tokens (T = 0)");
    }
    tokens = bytes / row_bytes;
    in.seekg(0);
  }

  // The next `count` tokens into `rows` (count * width floats).
  void read(int64_t count, float* rows) {
    in.read(reinterpret_cast<char*>(rows),
            static_cast<std::streamsize>(count * width * static_cast<int64_t>(sizeof(float))));
    if (!in) {
      throw Failure(path + ": reading the input failed");
    }
  }

  std::string path;
  int64_t width;
  int64_t tokens = 0;
  std::ifstream in;
};

void write_rows(std::ofstream& out, const std::string& path, const float* rows, int64_t count) {
  out.write(reinterpret_cast<const char*>(rows),
            static_cast<std::streamsize>(count * static_cast<int64_t>(sizeof(float))));
  if (!out) {
    throw Failure(path + ": cannot write the output");
  }
}

int run_encoder(Program& program, const Options& options) {
  const Program::Input step = program.input("step");
  if (step.dtype != ScalarType::Float) {
    throw Failure(options.model + ": not an encoder program (its step takes token ids); use "
                  "--prompt-ids and --generate");
  }
  const std::vector<int32_t>& step_sizes = step.sizes;
  const std::vector<int32_t> prefill_sizes = program.input("prefill").sizes;
  if (step_sizes.size() != 2 || step_sizes[0] != 1 || prefill_sizes.size() != 3) {
    throw Failure(options.model + ": expected step to take [1, E] and prefill [1, T, E]");
  }
  const int64_t width = step_sizes[1];
  const int64_t longest_prefill = prefill_sizes[1];  // the upper bound of its dynamic T
  TokenFile x(options.input, width);
  const int64_t tokens = x.tokens;
  if (options.prefill > tokens) {
    throw Failure("--prefill " + std::to_string(options.prefill) + " is more than the " +
                  std::to_string(tokens) + " tokens of " + options.input);
  }
  std::ofstream y(options.output, std::ios::binary);
  if (!y) {
    throw Failure(options.output + ": cannot open the output");
  }

  double prefill_us = 0.0;
  std::vector<float> rows(static_cast<size_t>(std::min(options.prefill, longest_prefill) * width));
  for (int64_t begin = 0; begin < options.prefill; begin += longest_prefill) {
    const int64_t count = std::min<int64_t>(longest_prefill, options.prefill - begin);
    x.read(count, rows.data());
    auto chunk = make_tensor_ptr({1, static_cast<int32_t>(count), static_cast<int32_t>(width)},
                                 rows.data());  // a view of `rows`, no copy
    const double start = now_us();
    const auto result = program.module.execute("prefill", {EValue(chunk)});
    prefill_us += now_us() - start;
    check(result.error(), "prefill");
    write_rows(y, options.output, result.get()[0].toTensor().const_data_ptr<float>(),
               count * width);
  }

  std::vector<double> step_us;
  step_us.reserve(static_cast<size_t>(tokens - options.prefill));
  std::vector<float> token(static_cast<size_t>(width));
  auto input = make_tensor_ptr({1, static_cast<int32_t>(width)}, token.data());
  for (int64_t t = options.prefill; t < tokens; ++t) {
    x.read(1, token.data());
    const double start = now_us();
    const auto result = program.module.execute("step", {EValue(input)});
    step_us.push_back(now_us() - start);
    check(result.error(), "step at token " + std::to_string(t));
    write_rows(y, options.output, result.get()[0].toTensor().const_data_ptr<float>(), width);
  }
  std::printf("tokens %lld (E = %lld): prefill %lld in %.3f ms, step %zu\n",
              static_cast<long long>(tokens), static_cast<long long>(width),
              static_cast<long long>(options.prefill), prefill_us / 1000.0, step_us.size());
  print_step_latency(step_us);
  std::printf("peak RSS %.1f MiB, threads %.0f\n", aaren::edge::status_mib("VmHWM"),
              aaren::edge::status_value("Threads"));
  return 0;
}

// ---- language models: prefill(ids [1, T]) -> logits [1, V], step(id [1, 1]) -> logits [1, V]

std::vector<int64_t> parse_ids(const std::string& text) {
  std::vector<int64_t> ids;
  size_t begin = 0;
  while (begin <= text.size()) {
    const size_t end = std::min(text.find(',', begin), text.size());
    const std::string item = text.substr(begin, end - begin);
    char* stop = nullptr;
    const long long id = std::strtoll(item.c_str(), &stop, 10);
    if (item.empty() || *stop != '\0' || id < 0) {
      throw Failure("--prompt-ids takes comma-separated token ids of 0 or more, got '" + text +
                    "'");
    }
    ids.push_back(id);
    begin = end + 1;
  }
  return ids;
}

int64_t argmax(const executorch::aten::Tensor& logits) {
  const float* row = logits.const_data_ptr<float>();
  const int64_t vocab = logits.size(logits.dim() - 1);
  return std::max_element(row, row + vocab) - row;
}

int run_language_model(Program& program, const Options& options) {
  if (program.input("step").dtype != ScalarType::Long) {
    throw Failure(options.model + ": not a language model (its step takes vectors); use "
                  "--input and --output");
  }
  const std::vector<int32_t> prefill_sizes = program.input("prefill").sizes;
  const int64_t longest_prefill = prefill_sizes.size() == 2 ? prefill_sizes[1] : 1;
  const std::vector<int64_t> prompt = parse_ids(options.prompt_ids);

  double prefill_us = 0.0;
  int64_t next = 0;
  for (size_t begin = 0; begin < prompt.size(); begin += static_cast<size_t>(longest_prefill)) {
    const size_t count = std::min(prompt.size() - begin, static_cast<size_t>(longest_prefill));
    auto chunk = make_tensor_ptr({1, static_cast<int32_t>(count)},
                                 std::vector<int64_t>(prompt.begin() + begin,
                                                      prompt.begin() + begin + count));
    const double start = now_us();
    const auto result = program.module.execute("prefill", {EValue(chunk)});
    prefill_us += now_us() - start;
    check(result.error(), "prefill");
    next = argmax(result.get()[0].toTensor());
  }
  std::vector<int64_t> generated;
  std::vector<double> step_us;
  auto input = make_tensor_ptr({1, 1}, std::vector<int64_t>{0});
  for (long i = 0; i < options.generate; ++i) {
    generated.push_back(next);
    if (i + 1 == options.generate) {
      break;
    }
    input->mutable_data_ptr<int64_t>()[0] = next;
    const double start = now_us();
    const auto result = program.module.execute("step", {EValue(input)});
    step_us.push_back(now_us() - start);
    check(result.error(), "step");
    next = argmax(result.get()[0].toTensor());
  }
  std::printf("generated:");
  for (size_t i = 0; i < generated.size(); ++i) {
    std::printf("%s%lld", i ? "," : " ", static_cast<long long>(generated[i]));
  }
  std::printf("\nprompt %zu tokens: prefill %.3f ms; step %zu\n", prompt.size(),
              prefill_us / 1000.0, step_us.size());
  print_step_latency(step_us);
  std::printf("peak RSS %.1f MiB, threads %.0f\n", aaren::edge::status_mib("VmHWM"),
              aaren::edge::status_value("Threads"));
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    const Options options = parse(argc, argv);
    // Thread-local: this thread loads the program and makes every call.
    std::optional<executorch::extension::threadpool::NoThreadPoolGuard> no_pool;
    if (options.single_thread) {
      no_pool.emplace();
    }
    executorch::runtime::register_pal(
        executorch::runtime::PalImpl::create(keep_log_message, __FILE__));
    executorch::runtime::runtime_init();
    Program program(options.model);
    return options.input.empty() ? run_language_model(program, options)
                                 : run_encoder(program, options);
  } catch (const Failure& failure) {
    std::fprintf(stderr, "aaren_runner: %s\n", failure.what());
    return 1;
  } catch (const std::exception& error) {
    std::fprintf(stderr, "aaren_runner: %s\n", error.what());
    return 1;
  }
}
