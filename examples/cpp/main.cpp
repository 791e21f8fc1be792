// aaren_deploy: runs a model with Aaren layers exported by examples/export.py, with no Python.
//
//   aaren_deploy MODEL [--inputs FILE] [--batch B --length N] [--device cpu|cuda]
//                      [--save-outputs FILE] [--atol A] [--warmup W] [--threads T] [--show K]
//
// MODEL is either export: a TorchScript file (model.pt: methods forward, prefill, step) or
// an AOTInductor package (model.pt2: models "forward" and "step"). The program
//   1. runs the whole sequence at once (forward: the parallel scan),
//   2. streams the same tokens one at a time with step (the RNN form: the state has the
//      same size after every token), printing outputs and per-token latency,
//   3. checks that both agree, and, when the inputs file holds the Python outputs
//      ("forward", "step", as examples/export.py writes reference.pt), that they match.
// Inputs: a file saved with torch.save (a dict with "x" [batch, tokens, features], or a
// tensor), or random ones of --batch x --length. Errors (missing or corrupt files, inputs
// of the wrong shape) print one clear line and exit with status 1; bad usage exits with 2;
// outputs that differ from the reference exit with 3.
//
// The aaren operators are found by name through the dispatcher, so this program calls no
// aaren function: CMakeLists.txt keeps libaaren_ops linked (docs/deploy.md).
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/script.h>
#include <torch/serialize.h>
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <memory>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

namespace {

// An error the user can act on: printed as one line, exit status 1.
struct DeployError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

std::string shape_of(const at::Tensor& t) {
  std::ostringstream s;
  s << t.sizes();
  return s.str();
}

// The first line of a c10::Error's message: enough to say what went wrong.
std::string first_line(const std::string& message) {
  const auto end = message.find('\n');
  return end == std::string::npos ? message : message.substr(0, end);
}

void require_file(const std::string& path, const std::string& what) {
  std::error_code ec;
  if (!std::filesystem::exists(path, ec)) {
    throw DeployError(what + " '" + path + "' does not exist");
  }
  if (!std::filesystem::is_regular_file(path, ec)) {
    throw DeployError(what + " '" + path + "' is not a file");
  }
}

std::vector<char> read_bytes(const std::string& path, const std::string& what) {
  require_file(path, what);
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    throw DeployError("cannot open " + what + " '" + path + "'");
  }
  return std::vector<char>(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

// Without libaaren_ops in the process, loading would fail with "Unknown builtin op".
void require_aaren_ops() {
  if (!c10::Dispatcher::singleton().findSchema({"aaren::step", ""}).has_value()) {
    throw DeployError(
        "the aaren operators are not registered in this process: link libaaren_ops so that the "
        "linker keeps it (see docs/deploy.md)");
  }
}

// ---------------------------------------------------------------- the two kinds of model

struct ModelInfo {
  int64_t in_features = 0, out_features = 0, num_layers = 0, num_heads = 0, head_dim = 0;
};

class Model {
 public:
  virtual ~Model() = default;
  virtual std::string kind() const = 0;
  virtual c10::Device device() const = 0;
  const ModelInfo& info() const { return info_; }
  // x [B, N, F] -> y [B, N, C], every token at once.
  virtual at::Tensor forward(const at::Tensor& x) = 0;
  // Starts a new stream of `batch` sequences.
  virtual void reset(int64_t batch) = 0;
  // One token x_t [B, F] -> y_t [B, C]; the state is kept inside.
  virtual at::Tensor step(const at::Tensor& x_t) = 0;
  // The state's tensors (one (lse, out) per layer), to show its size.
  virtual std::vector<at::Tensor> state() const = 0;

 protected:
  ModelInfo info_;
};

class TorchScriptModel : public Model {
 public:
  TorchScriptModel(const std::string& path, c10::Device device) : device_(device) {
    try {
      module_ = torch::jit::load(path, device);
    } catch (const c10::Error& e) {
      throw DeployError("cannot load '" + path + "' as a TorchScript model: " + first_line(e.msg()));
    }
    module_.eval();
    for (const char* method : {"forward", "prefill", "step"}) {
      if (!module_.find_method(method)) {
        throw DeployError("'" + path + "' is a TorchScript model without a '" + method +
                          "' method: export it with examples/export.py");
      }
    }
    info_.in_features = int_attribute(path, "in_features");
    info_.out_features = int_attribute(path, "out_features");
    info_.num_layers = int_attribute(path, "num_layers");
    info_.num_heads = int_attribute(path, "num_heads");
    info_.head_dim = int_attribute(path, "head_dim");
  }
  std::string kind() const override { return "TorchScript"; }
  c10::Device device() const override { return device_; }

  at::Tensor forward(const at::Tensor& x) override { return module_.forward({x}).toTensor(); }

  void reset(int64_t) override { states_ = c10::IValue(); }  // None: the empty state

  at::Tensor step(const at::Tensor& x_t) override {
    auto result = module_.get_method("step")({x_t, states_}).toTuple();
    states_ = result->elements()[1];  // List[Tuple[Tensor, Tensor]]: replaces the old one
    return result->elements()[0].toTensor();
  }

  std::vector<at::Tensor> state() const override {
    std::vector<at::Tensor> tensors;
    if (states_.isNone()) {
      return tensors;
    }
    for (const auto& layer : states_.toListRef()) {
      for (const auto& t : layer.toTupleRef().elements()) {
        tensors.push_back(t.toTensor());
      }
    }
    return tensors;
  }

 private:
  int64_t int_attribute(const std::string& path, const std::string& name) const {
    if (!module_.hasattr(name) || !module_.attr(name).isInt()) {
      throw DeployError("'" + path + "' has no int attribute '" + name +
                        "': export it with examples/export.py");
    }
    return module_.attr(name).toInt();
  }

  torch::jit::Module module_;
  c10::Device device_;
  c10::IValue states_;
};

class AotiModel : public Model {
 public:
  explicit AotiModel(const std::string& path) {
    forward_ = load(path, "forward");
    step_ = load(path, "step");
    const auto metadata = forward_->get_metadata();
    info_.in_features = int_metadata(metadata, path, "aaren.in_features");
    info_.out_features = int_metadata(metadata, path, "aaren.out_features");
    info_.num_layers = int_metadata(metadata, path, "aaren.num_layers");
    info_.num_heads = int_metadata(metadata, path, "aaren.num_heads");
    info_.head_dim = int_metadata(metadata, path, "aaren.head_dim");
    const auto device = metadata.find("AOTI_DEVICE_KEY");
    device_ = c10::Device(device == metadata.end() ? "cpu" : device->second);
  }
  std::string kind() const override { return "AOTInductor"; }
  c10::Device device() const override { return device_; }

  // Contiguous, as step's token below: the compiled kernels index x with the strides of the
  // example the package was compiled from, unchecked.
  at::Tensor forward(const at::Tensor& x) override { return forward_->run({x.contiguous()}).at(0); }

  void reset(int64_t batch) override {
    states_.clear();
    // The state is float64 (lse and out) whatever the model's dtype (aaren's docs/design.md).
    const auto options = torch::TensorOptions().dtype(torch::kFloat64).device(device_);
    for (int64_t layer = 0; layer < info_.num_layers; ++layer) {
      states_.push_back(torch::full({batch, info_.num_heads}, -INFINITY, options));  // lse
      states_.push_back(torch::zeros({batch, info_.num_heads, info_.head_dim}, options));  // out
    }
  }

  at::Tensor step(const at::Tensor& x_t) override {
    // Contiguous: AOTInductor's generated kernels index an input with the strides it was
    // compiled for (examples/export.py compiles a contiguous [B, F]) and do not check them; a
    // token sliced from [B, N, F] has a batch stride of N * F and read other tokens' numbers.
    std::vector<at::Tensor> inputs{x_t.contiguous()};
    inputs.insert(inputs.end(), states_.begin(), states_.end());
    auto outputs = step_->run(inputs);  // y_t, then the new states
    if (outputs.size() != states_.size() + 1) {
      throw DeployError("the 'step' model returned " + std::to_string(outputs.size()) +
                        " tensors, expected " + std::to_string(states_.size() + 1));
    }
    states_.assign(outputs.begin() + 1, outputs.end());
    return outputs[0];
  }

  std::vector<at::Tensor> state() const override { return states_; }

 private:
  static std::unique_ptr<torch::inductor::AOTIModelPackageLoader> load(const std::string& path,
                                                                      const std::string& name) {
    try {
      return std::make_unique<torch::inductor::AOTIModelPackageLoader>(path, name);
    } catch (const c10::Error& e) {
      throw DeployError("cannot load model '" + name + "' from the AOTInductor package '" + path +
                        "': " + first_line(e.msg()));
    } catch (const std::exception& e) {
      throw DeployError("cannot load model '" + name + "' from the AOTInductor package '" + path +
                        "': " + first_line(e.what()));
    }
  }

  static int64_t int_metadata(const std::unordered_map<std::string, std::string>& metadata,
                              const std::string& path, const std::string& key) {
    const auto it = metadata.find(key);
    if (it == metadata.end()) {
      throw DeployError("the AOTInductor package '" + path + "' has no metadata '" + key +
                        "': export it with examples/export.py");
    }
    return std::stoll(it->second);
  }

  std::unique_ptr<torch::inductor::AOTIModelPackageLoader> forward_, step_;
  std::vector<at::Tensor> states_;
  c10::Device device_{c10::kCPU};
};

// ---------------------------------------------------------------- inputs and outputs

struct Inputs {
  at::Tensor x;
  std::optional<at::Tensor> forward, step;  // the Python outputs, when the file has them
};

std::optional<at::Tensor> dict_tensor(const c10::impl::GenericDict& dict, const std::string& key,
                                      const std::string& path) {
  const auto it = dict.find(key);
  if (it == dict.end()) {
    return std::nullopt;
  }
  if (!it->value().isTensor()) {
    throw DeployError("'" + key + "' in the inputs file '" + path + "' is not a tensor");
  }
  return it->value().toTensor();
}

Inputs load_inputs(const std::string& path) {
  const auto bytes = read_bytes(path, "inputs file");
  c10::IValue value;
  try {
    value = torch::pickle_load(bytes);
  } catch (const c10::Error& e) {
    throw DeployError("cannot read the inputs file '" + path +
                      "' (expected a tensor or a dict of tensors saved with torch.save): " +
                      first_line(e.msg()));
  }
  Inputs inputs;
  if (value.isTensor()) {
    inputs.x = value.toTensor();
  } else if (value.isGenericDict()) {
    const auto dict = value.toGenericDict();
    const auto x = dict_tensor(dict, "x", path);
    if (!x) {
      throw DeployError("the inputs file '" + path + "' has no tensor 'x'");
    }
    inputs.x = *x;
    inputs.forward = dict_tensor(dict, "forward", path);
    inputs.step = dict_tensor(dict, "step", path);
  } else {
    throw DeployError("the inputs file '" + path + "' holds a " + value.tagKind() +
                      ", not a tensor or a dict of tensors");
  }
  return inputs;
}

void check_inputs(const at::Tensor& x, const ModelInfo& info) {
  if (x.dim() != 3 || x.size(0) < 1 || x.size(1) < 1 || x.size(2) != info.in_features) {
    throw DeployError("inputs 'x' must have shape [batch, tokens, " +
                      std::to_string(info.in_features) + "] (batch, tokens >= 1), got " +
                      shape_of(x));
  }
  if (x.scalar_type() != torch::kFloat32) {
    throw DeployError(std::string("inputs 'x' must be float32, got ") +
                      c10::toString(x.scalar_type()));
  }
}

void save_outputs(const std::string& path, const at::Tensor& forward, const at::Tensor& step) {
  c10::Dict<std::string, at::Tensor> outputs;
  outputs.insert("forward", forward.cpu());
  outputs.insert("step", step.cpu());
  const auto bytes = torch::pickle_save(outputs);
  std::ofstream out(path, std::ios::binary);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  if (!out) {
    throw DeployError("cannot write the outputs file '" + path + "'");
  }
}

std::string format_row(const at::Tensor& row, int64_t show) {
  const auto values = row.to(torch::kCPU, torch::kFloat32).contiguous();
  const auto* data = values.data_ptr<float>();
  std::ostringstream s;
  s << "[";
  const int64_t n = std::min<int64_t>(values.numel(), show);
  for (int64_t i = 0; i < n; ++i) {
    char buffer[32];
    std::snprintf(buffer, sizeof(buffer), "%s%8.4f", i ? ", " : "", data[i]);
    s << buffer;
  }
  s << (values.numel() > n ? ", ...]" : "]");
  return s.str();
}

double max_abs_diff(const at::Tensor& a, const at::Tensor& b) {
  return (a.cpu().to(torch::kFloat64) - b.cpu().to(torch::kFloat64)).abs().max().item<double>();
}

// |got - want| <= atol + atol * |want|, as torch.allclose with rtol = atol.
bool close(const at::Tensor& got, const at::Tensor& want, double atol) {
  return got.sizes() == want.sizes() &&
         torch::allclose(got.cpu().to(torch::kFloat64), want.cpu().to(torch::kFloat64), atol, atol);
}

int64_t bytes_of(const std::vector<at::Tensor>& tensors) {
  int64_t bytes = 0;
  for (const auto& t : tensors) {
    bytes += t.numel() * static_cast<int64_t>(t.element_size());
  }
  return bytes;
}

void synchronize(const c10::Device& device) {
  if (device.is_cuda()) {
    torch::cuda::synchronize(device.index() < 0 ? -1 : device.index());
  }
}

double percentile(std::vector<double> values, double q) {
  std::sort(values.begin(), values.end());
  const auto index = static_cast<size_t>(q * static_cast<double>(values.size() - 1) + 0.5);
  return values[index];
}

// ---------------------------------------------------------------- the program

struct Options {
  std::string model, inputs, save_outputs, device, format;
  int64_t batch = 1, length = 16, show = 8, warmup = 2, threads = 1;
  double atol = 1e-4;
};

const char* kUsage =
    "usage: aaren_deploy MODEL [--inputs FILE] [--batch B] [--length N] [--device cpu|cuda]\n"
    "                          [--format torchscript|aoti] [--save-outputs FILE] [--atol A]\n"
    "                          [--warmup W] [--threads T] [--show K]\n"
    "  MODEL             model.pt (TorchScript) or model.pt2 (AOTInductor) from examples/export.py\n"
    "  --inputs FILE     torch.save'd dict with 'x' [batch, tokens, features] (and the Python\n"
    "                    outputs 'forward', 'step' to compare with), or a tensor;\n"
    "                    default: random inputs of --batch (1) x --length (16) tokens\n"
    "  --device D        where a TorchScript model runs (default cpu; an AOTInductor package\n"
    "                    runs where it was compiled for)\n"
    "  --format F        torchscript or aoti (default: aoti for *.pt2, else torchscript)\n"
    "  --save-outputs F  save {'forward': ..., 'step': ...} for torch.load\n"
    "  --atol A          tolerance against the Python outputs and between forward and step (1e-4)\n"
    "  --warmup W        untimed calls of forward and step first (default 2: TorchScript\n"
    "                    optimizes a method during its first calls)\n"
    "  --threads T       intra-op threads (default 1: a token of a small model is too little\n"
    "                    work to share, and waiting for a busy core costs more; 0: PyTorch's)\n"
    "  --show K          print K tokens and K values per output row (default 8)\n";

Options parse(int argc, char** argv) {
  Options options;
  auto usage_error = [](const std::string& message) {
    throw std::invalid_argument(message);
  };
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) {
        usage_error(arg + " needs a value");
      }
      return argv[++i];
    };
    auto integer = [&](const std::string& text, int64_t min = 1) -> int64_t {
      try {
        size_t used = 0;
        const auto n = std::stoll(text, &used);
        if (used == text.size() && n >= min) {
          return n;
        }
      } catch (const std::exception&) {
      }
      usage_error(arg + (min > 0 ? " needs a positive integer" : " needs an integer >= 0") +
                  ", got '" + text + "'");
      return 0;
    };
    if (arg == "-h" || arg == "--help") {
      std::cout << kUsage;
      std::exit(0);
    } else if (arg == "--inputs") {
      options.inputs = value();
    } else if (arg == "--batch") {
      options.batch = integer(value());
    } else if (arg == "--length") {
      options.length = integer(value());
    } else if (arg == "--device") {
      options.device = value();
    } else if (arg == "--format") {
      options.format = value();
      if (options.format != "torchscript" && options.format != "aoti") {
        usage_error("--format must be torchscript or aoti, got '" + options.format + "'");
      }
    } else if (arg == "--save-outputs") {
      options.save_outputs = value();
    } else if (arg == "--atol") {
      const auto text = value();
      try {
        options.atol = std::stod(text);
      } catch (const std::exception&) {
        usage_error("--atol needs a number, got '" + text + "'");
      }
    } else if (arg == "--show") {
      options.show = integer(value(), 0);
    } else if (arg == "--warmup") {
      options.warmup = integer(value(), 0);
    } else if (arg == "--threads") {
      options.threads = integer(value(), 0);
    } else if (!arg.empty() && arg[0] == '-') {
      usage_error("unknown option " + arg);
    } else if (options.model.empty()) {
      options.model = arg;
    } else {
      usage_error("unexpected argument '" + arg + "'");
    }
  }
  if (options.model.empty()) {
    usage_error("no MODEL given");
  }
  if (options.format.empty()) {
    const auto extension = std::filesystem::path(options.model).extension().string();
    options.format = extension == ".pt2" ? "aoti" : "torchscript";
  }
  return options;
}

int run(const Options& options) {
  require_aaren_ops();
  require_file(options.model, "model file");

  std::optional<c10::Device> device;
  if (!options.device.empty()) {
    try {
      device = c10::Device(options.device);
    } catch (const c10::Error&) {
      throw DeployError("--device '" + options.device + "' is not a device (cpu, cuda, cuda:1)");
    }
    if (device->is_cuda() && !torch::cuda::is_available()) {
      throw DeployError("--device " + options.device + ": CUDA is not available");
    }
  }
  std::unique_ptr<Model> model;
  if (options.format == "aoti") {
    model = std::make_unique<AotiModel>(options.model);
    if (device && device->type() != model->device().type()) {
      throw DeployError("the AOTInductor package '" + options.model + "' was compiled for " +
                        model->device().str() + ", not " + device->str() +
                        ": export it again with --device " + device->str());
    }
    if (model->device().is_cuda() && !torch::cuda::is_available()) {
      throw DeployError("the AOTInductor package '" + options.model +
                        "' was compiled for CUDA, which is not available here");
    }
  } else {
    model = std::make_unique<TorchScriptModel>(options.model, device.value_or(c10::kCPU));
  }
  const auto& info = model->info();
  std::cout << "model: " << options.model << " (" << model->kind() << ") on " << model->device()
            << ": " << info.in_features << " -> " << info.out_features << " features, "
            << info.num_layers << " Aaren layers x " << info.num_heads << " heads x "
            << info.head_dim << "\n";

  Inputs inputs;
  if (!options.inputs.empty()) {
    inputs = load_inputs(options.inputs);
  } else {
    torch::manual_seed(0);
    inputs.x = torch::randn({options.batch, options.length, info.in_features});
  }
  check_inputs(inputs.x, info);
  const auto x = inputs.x.to(model->device());
  const int64_t batch = x.size(0), tokens = x.size(1);
  std::cout << "inputs: " << shape_of(x)
            << (options.inputs.empty() ? " (random)" : " from " + options.inputs) << "\n";

  if (options.threads > 0) {
    torch::set_num_threads(static_cast<int>(options.threads));
  }
  c10::InferenceMode inference;
  for (int64_t i = 0; i < options.warmup; ++i) {  // untimed, outputs discarded
    model->forward(x);
    model->reset(batch);
    model->step(x.select(1, 0));
  }
  synchronize(model->device());

  using clock = std::chrono::steady_clock;
  auto ms = [](clock::duration d) { return std::chrono::duration<double, std::milli>(d).count(); };

  // 1. The whole sequence at once.
  auto start = clock::now();
  const auto y = model->forward(x);
  synchronize(model->device());
  const double forward_ms = ms(clock::now() - start);
  std::printf("forward: %lld tokens x %lld sequences in parallel in %.3f ms -> %s\n",
              static_cast<long long>(tokens), static_cast<long long>(batch), forward_ms,
              shape_of(y).c_str());

  // 2. The same tokens one at a time. The state is replaced after every token and keeps
  //    its size: memory does not grow with the number of tokens.
  model->reset(batch);
  std::vector<at::Tensor> outputs;
  std::vector<double> latencies;
  int64_t state_bytes = -1;
  const int64_t show = std::min(tokens, options.show);
  std::cout << "step: one token at a time (sequence 0 shown)\n";
  for (int64_t t = 0; t < tokens; ++t) {
    start = clock::now();
    auto y_t = model->step(x.select(1, t));
    synchronize(model->device());
    latencies.push_back(ms(clock::now() - start));
    const auto bytes = bytes_of(model->state());
    if (state_bytes >= 0 && bytes != state_bytes) {
      throw DeployError("the state grew from " + std::to_string(state_bytes) + " to " +
                        std::to_string(bytes) + " bytes at token " + std::to_string(t));
    }
    state_bytes = bytes;
    if (t < show) {
      char latency[32];
      std::snprintf(latency, sizeof(latency), "%8.3f ms", latencies.back());
      std::cout << "  token " << t << "  " << latency << "  y = " << format_row(y_t[0], options.show)
                << "\n";
    }
    outputs.push_back(std::move(y_t));
  }
  if (tokens > show) {
    std::cout << "  ... (" << tokens - show << " more tokens)\n";
  }
  const auto y_step = torch::stack(outputs, 1);
  const auto state = model->state();
  std::cout << "state: " << state.size() / 2 << " layers x (lse " << shape_of(state.at(0))
            << ", out " << shape_of(state.at(1)) << ") = " << state_bytes
            << " bytes after every token\n";
  std::vector<double> steady(latencies.begin() + (tokens > 1 ? 1 : 0), latencies.end());
  double sum = 0;
  for (double l : steady) {
    sum += l;
  }
  const int threads = torch::get_num_threads();
  std::printf("per-token latency (%lld tokens x %lld sequences, %d thread%s): first %.3f ms; "
              "then mean %.3f ms, p50 %.3f ms, p90 %.3f ms, max %.3f ms\n",
              static_cast<long long>(tokens), static_cast<long long>(batch), threads,
              threads == 1 ? "" : "s",
              latencies.front(), sum / static_cast<double>(steady.size()), percentile(steady, 0.5),
              percentile(steady, 0.9), *std::max_element(steady.begin(), steady.end()));

  // 3. Checks.
  bool ok = true;
  auto report = [&](const std::string& what, const at::Tensor& got, const at::Tensor& want) {
    const bool same = close(got, want, options.atol);
    std::printf("%-28s max |difference| = %.2e  %s\n", what.c_str(),
                got.sizes() == want.sizes() ? max_abs_diff(got, want) : INFINITY,
                same ? "ok" : "MISMATCH");
    ok = ok && same;
  };
  report("step vs forward:", y_step, y);
  if (inputs.forward) {
    report("forward vs Python forward:", y, *inputs.forward);
  }
  if (inputs.step) {
    report("step vs Python step:", y_step, *inputs.step);
  }
  if (!options.save_outputs.empty()) {
    save_outputs(options.save_outputs, y, y_step);
    std::cout << "outputs saved to " << options.save_outputs << "\n";
  }
  if (!ok) {
    std::cerr << "error: the outputs differ by more than --atol " << options.atol << "\n";
    return 3;
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  Options options;
  try {
    options = parse(argc, argv);
  } catch (const std::invalid_argument& e) {
    std::cerr << "error: " << e.what() << "\n" << kUsage;
    return 2;
  }
  try {
    return run(options);
  } catch (const DeployError& e) {
    std::cerr << "error: " << e.what() << "\n";
  } catch (const c10::Error& e) {
    std::cerr << "error: " << first_line(e.msg()) << "\n";
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << "\n";
  }
  return 1;
}
