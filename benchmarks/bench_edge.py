"""Aaren on the edge against a KV-cache Transformer and against LibTorch: per-token latency after
1, 1k and 8k tokens, peak memory, bytes on disk, and the floor of the step's arithmetic.

For each size (E=64, 2 layers, 4 heads; E=256, 4 layers, 8 heads; feed-forward 4E, post-norm,
ReLU, float32, batch 1), measured side by side in one run, on one thread: every ExecuTorch
process runs its kernels on the calling thread (``--single-thread``, no thread pool), LibTorch
with one intra-op thread, and every measured process is pinned to one CPU. (The runner's default,
the runtime's pool of one thread per core, is measured once per round too: "with its pool".)

  - Aaren (the product): ``aaren.AarenEncoder(AarenEncoderLayer(E, H, 4E, dropout=0,
    batch_first=True), L)`` in eval mode, exported by ``aaren.edge.export`` (prefill / step /
    reset, the state in the program's mutable buffers, the Linears on XNNPACK) and run by the
    project's runner, build/edge/aaren_runner, unchanged. The runner prints one p50 over all
    the tokens it steps, so the latency "after n tokens" comes from one runner process per
    length: the first n tokens through ``prefill`` (the same state as n steps; the prefill's
    time is not in the figure), then 64 tokens through ``step``, whose p50 is the figure
    (n = 0: 64 steps from the empty state, "after 1 token"; n = 1024 and 8128: "1k", "8k").
    The runner's peak RSS is that of a run of 8192 tokens all through ``step`` (prefill 0), as
    it prints it (VmHWM). The runner streams its input and output a token (or a prefill chunk)
    at a time, so the figure holds no buffer that grows with the tokens.
  - Aaren in a timing harness: the same .pte through ``bench_edge_et`` (benchmarks/edge/
    et_step.cpp: the runner's runtime libraries plus the aaren kernels; no I/O buffers), 8192
    tokens all through ``step``, p50 over the 64 calls at each length: a cross-check of the
    runner's windows without prefill, and the RSS after the first step vs after the last
    (memory that does not grow with the tokens), split into anonymous and file-backed pages.
  - KV-cache Transformer, with ExecuTorch's own export (``to_edge_transform_and_lower`` +
    ``XnnpackPartitioner``, the cache in mutable buffers, ``run_reinplace_pass`` so that the
    cache is written in place): the same width, depth, heads, feed-forward, norms and biases,
    causal attention whose keys and values go into a static cache of max context 8192 per layer
    ([H, 8192, D] each for K and V, float32, written with ``index_put`` at the token's position,
    as ExecuTorch's llama ``KVCache`` does without its custom ops); one method,
    ``step(x [1, E], pos int64 [1]) -> [1, E]``. ExecuTorch's LLM export attends with its custom
    operators (``llama::update_cache``, ``llama::custom_sdpa``), but the installed wheel has
    their runtime kernels only in extension/llm/custom_ops/libcustom_ops_aot_lib.so, which links
    libtorch and the Python extension: no standalone C++ program can run them. So the program is
    written with standard operators, in two forms, both reported:
      * "KV static": attention over all 8192 slots with the mask ``slot <= pos`` (the static-
        shape form of ExecuTorch's llama export, whose cost is the full context's from the first
        token), as explicit ``bmm`` / ``softmax`` / ``bmm``, which XNNPACK takes whole
        (``F.scaled_dot_product_attention`` decomposes into full-cache copies and elementwise
        ops on the portable kernels: about 5x slower at E=64, measured while writing this);
      * "KV sliced": attention over slots 0..pos only (the cache narrowed to ``pos + 1``, the
        work ``llama::custom_sdpa`` would do), on ExecuTorch's portable ``bmm`` / ``softmax``
        kernels (XNNPACK does not take the data-dependent shape), keys @ q rather than
        q @ keys^T (no transposed copy of the keys: 3.7x faster at 8k than the latter).
    Both run in ``bench_edge_et`` (the runner cannot: it needs prefill/step/reset and passes
    only x), a C++ process on the same runtime libraries as the runner, so its peak RSS compares
    with the runner's (through executorch.runtime in Python it would include Python and torch).
    The tokens are streamed one by one from position 0 (--jump-kv: only the windows' calls, at
    their positions: the same arithmetic, for quick looks).
  - LibTorch: the same Aaren encoder's step compiled by AOTInductor
    (``torch._inductor.aoti_compile_and_package`` of ``step`` with a flat state, batch 1 static,
    as examples/export.py's ``FlatStep``; not frozen, so the step's stacked [H+E, E] projection
    is rebuilt from the parameters at each call, as in that path) and run from C++ by
    ``bench_edge_libtorch`` (benchmarks/edge/libtorch_step.cpp: LibTorch + libaaren_ops, one
    intra-op thread, the state replaced after each token as examples/cpp does), 8192 tokens,
    p50 over the same windows, and that process's peak RSS (VmHWM). (examples/cpp's
    aaren_deploy is not used: it first runs the whole sequence through ``forward`` and holds
    every output, and prints no RSS.)
  - The floor: the step's matrix-vector products alone, per layer the stacked score/value
    projection [H+E, E] (as the exported step folds it), out_proj [E, E], linear1 [4E, E],
    linear2 [E, 4E], chained as the step chains them (out_proj takes the value part), exported
    as a .pte of just those Linears (XNNPACK) and timed by ``bench_edge_et`` (p50 over 2048
    calls), just before and just after the runner's windows of each round: the step / floor
    ratio of a round is against the median of the two. The same products in eager PyTorch
    (``F.linear``, one thread, in this process) are shown too, for the LibTorch figures.

Rounds (--repeats, default 3): each runs every Aaren program, the floor and LibTorch once; the
KV programs, slow to stream and far from the others, run in the first round only
(--kv-every-round: in each). The table shows medians over the rounds.

Also: bytes of the runner plus every shared library it loads (``ldd``; the same for the
LibTorch program), the .pte / .pt2 sizes, the state and cache bytes. Every ExecuTorch program
is first checked against its PyTorch model on 16 tokens (the harness saves its inputs and
outputs), and the runner's outputs on 64.

Targets (the issue's item 5), checked and printed: Aaren's step <= 1.5x the floor at every
length; the runner's peak RSS < 32 MiB for both sizes and <= 1/10 of the LibTorch process's;
Aaren faster than the KV-cache program at 1k and 8k tokens (either KV form), with memory that
does not grow with the context.

    python benchmarks/bench_edge.py                  # both sizes: ~6 minutes on 2 cores
    python benchmarks/bench_edge.py --smoke          # E=16, context 256, no LibTorch: ~30 s
    python benchmarks/bench_edge.py --json out.json  # the figures as JSON too

Needs build/edge/aaren_runner and build/edge/libaaren_edge_kernels.so (``scripts/run.sh
edge``); builds benchmarks/edge into build/edge-bench/ when its programs are missing (CMake
from the venv, -j2; the LibTorch program ~30 s, which --smoke skips with the rest of the
LibTorch side). Exit status 1 when a check fails (a program's outputs differ from its
model's); missed targets are reported, not failed.
"""
import argparse
import importlib.util
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import aaren
import aaren.edge

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # its sibling cmake_cache.py
import cmake_cache  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNNER = os.path.join(ROOT, "build", "edge", "aaren_runner")
EDGE_KERNELS = os.path.join(ROOT, "build", "edge", "libaaren_edge_kernels.so")
BENCH_SRC = os.path.join(ROOT, "benchmarks", "edge")
BENCH_BUILD = os.path.join(ROOT, "build", "edge-bench")
ET_BENCH = os.path.join(BENCH_BUILD, "executorch", "bench_edge_et")
LT_BENCH = os.path.join(BENCH_BUILD, "libtorch", "bench_edge_libtorch")

SIZES = [(64, 2, 4), (256, 4, 8)]  # (E, layers, heads)
CONTEXT = 8192
STARTS = [0, 1024, 8128]  # the windows: "after 1, 1k, 8k tokens"
LABELS = ["1", "1k", "8k"]
WINDOW = 64
FLOOR_CALLS = 2048
CHECK_TOKENS = 16
SMOKE = dict(sizes=[(16, 1, 2)], context=256, starts=[0, 64, 192], window=16, floor_calls=64)


# --------------------------------------------------------------------------- the programs


class KVLayer(nn.Module):
    """The KV-cache counterpart of ``AarenEncoderLayer(E, H, ff, dropout=0)`` (post-norm,
    ReLU, biases): causal multi-head attention whose keys and values go into a static cache of
    ``context`` slots (buffers ``k_cache``/``v_cache`` [H, context, D], written at ``pos``)."""

    def __init__(self, width: int, heads: int, ff: int, context: int, sliced: bool) -> None:
        super().__init__()
        self.heads, self.head_dim, self.context, self.sliced = heads, width // heads, context, sliced
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(width, width) for _ in range(4))
        self.linear1, self.linear2 = nn.Linear(width, ff), nn.Linear(ff, width)
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.register_buffer("k_cache", torch.zeros(heads, context, self.head_dim))
        self.register_buffer("v_cache", torch.zeros(heads, context, self.head_dim))

    def forward(self, x: Tensor, pos: Tensor, mask: Tensor) -> Tensor:
        h, d = self.heads, self.head_dim
        q = self.wq(x).view(h, 1, d) * d ** -0.5
        # The cache update of ExecuTorch's llama KVCache (static shapes): index_put at pos.
        self.k_cache[:, pos] = self.wk(x).view(h, 1, d)
        self.v_cache[:, pos] = self.wv(x).view(h, 1, d)
        if self.sliced:  # slots 0..pos only: a shape that depends on the data
            n = pos[0].item()
            torch._check(n >= 0)
            torch._check(n < self.context)
            keys, values = self.k_cache.narrow(1, 0, n + 1), self.v_cache.narrow(1, 0, n + 1)
            # keys @ q rather than q @ keys^T: no transposed copy of the keys (3.7x faster here)
            scores = torch.bmm(keys, q.view(h, d, 1))  # [H, n + 1, 1]
            weights = torch.softmax(scores, 1).view(h, 1, n + 1)
        else:  # every slot, the ones after pos masked out (XNNPACK takes this form whole)
            weights = torch.softmax(torch.bmm(q, self.k_cache.transpose(1, 2)) + mask, -1)
            values = self.v_cache
        attention = self.wo(torch.bmm(weights, values).reshape(1, h * d))
        x = self.norm1(x + attention)
        return self.norm2(x + self.linear2(F.relu(self.linear1(x))))


class KVTransformer(nn.Module):
    """``step(x [1, E], pos [1]) -> [1, E]``: one token at position ``pos`` through every layer."""

    def __init__(self, width: int, layers: int, heads: int, ff: int, context: int,
                 sliced: bool) -> None:
        super().__init__()
        self.layers = nn.ModuleList(KVLayer(width, heads, ff, context, sliced) for _ in range(layers))
        self.register_buffer("slots", torch.arange(context), persistent=False)

    def forward(self, x: Tensor, pos: Tensor) -> Tensor:
        mask = torch.where(self.slots <= pos, 0.0, float("-inf"))  # [context]
        for layer in self.layers:
            x = layer(x, pos, mask)
        return x

    def cache_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for name, b in self.named_buffers() if "cache" in name)


def zero_caches(model: KVTransformer) -> None:
    with torch.no_grad():
        for layer in model.layers:
            layer.k_cache.zero_()
            layer.v_cache.zero_()


def export_kv(model: KVTransformer, path: str) -> Dict[str, object]:
    """The KV program: ExecuTorch's export, the cache in mutable buffers. No reset method: the
    runtime's Module zero-fills the planned memory that holds the cache (as the model's
    buffers start), and a new stream needs none (slots after pos are masked or not read); a
    reset written in the graph would add cache-sized temporaries to the planned memory."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import (EdgeCompileConfig, ExecutorchBackendConfig,
                                 to_edge_transform_and_lower)
    from executorch.exir.passes import MemoryPlanningPass

    width = model.layers[0].wq.in_features
    with torch.no_grad():
        programs = {"step": torch.export.export(model, (torch.zeros(1, width), torch.tensor([3])))}
    edge = to_edge_transform_and_lower(programs, partitioner=[XnnpackPartitioner()],
                                       compile_config=EdgeCompileConfig())
    program = edge.to_executorch(ExecutorchBackendConfig(
        memory_planning_pass=MemoryPlanningPass(alloc_graph_input=True, share_mutable_buffers=True),
        emit_mutable_buffer_names=True, run_reinplace_pass=True))
    with open(path, "wb") as f:
        program.write_to_file(f)
    return {"bytes": os.path.getsize(path), "operators": _operators(program)}


class Products(nn.Module):
    """The step's matrix-vector products alone, chained as the step chains them: per layer
    the stacked score/value projection [H+E, E] (as the exported step folds it), out_proj on
    the value part, linear1, linear2."""

    def __init__(self, encoder: aaren.AarenEncoder) -> None:
        super().__init__()
        self.heads = encoder.layers[0].self_attn.num_heads
        self.weights = []
        for i, layer in enumerate(encoder.layers):
            with torch.no_grad():
                weight, bias = layer.self_attn._step_projection()
            pairs = [(weight, bias), (layer.self_attn.out_proj.weight, layer.self_attn.out_proj.bias),
                     (layer.linear1.weight, layer.linear1.bias), (layer.linear2.weight, layer.linear2.bias)]
            names = []
            for j, (w, b) in enumerate(pairs):
                self.register_buffer(f"w{i}_{j}", w.detach().clone())
                self.register_buffer(f"b{i}_{j}", b.detach().clone())
                names.append((f"w{i}_{j}", f"b{i}_{j}"))
            self.weights.append(names)

    def pairs(self, i: int) -> List[Tuple[Tensor, Tensor]]:
        return [(getattr(self, w), getattr(self, b)) for w, b in self.weights[i]]

    def forward(self, x: Tensor) -> Tensor:
        for i in range(len(self.weights)):
            projection, out, up, down = self.pairs(i)
            value = F.linear(x, *projection)[:, self.heads:]
            x = F.linear(F.linear(F.linear(value, *out), *up), *down)
        return x


def export_products(products: Products, path: str) -> Dict[str, object]:
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    width = products.pairs(0)[0][0].size(1)
    with torch.no_grad():
        exported = torch.export.export(products, (torch.zeros(1, width),))
    program = to_edge_transform_and_lower(exported, partitioner=[XnnpackPartitioner()]).to_executorch()
    with open(path, "wb") as f:
        program.write_to_file(f)
    return {"bytes": os.path.getsize(path), "operators": _operators(program)}


def _operators(program) -> Dict[str, List[str]]:
    return {plan.name: sorted(op.name for op in plan.operators) + [f"{len(plan.delegates)} delegate calls"]
            for plan in program.executorch_program.execution_plan}


def export_aoti(encoder: aaren.AarenEncoder, path: str) -> Dict[str, object]:
    """The encoder's step as the project's LibTorch deployment packages it: examples/export.py's
    FlatStep (inputs x, lse_0, out_0, ..., flattened by AOTInductor as bench_edge_libtorch
    passes them), batch 1."""
    spec = importlib.util.spec_from_file_location(
        "aaren_export_example", os.path.join(ROOT, "examples", "export.py"))
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    width = encoder.layers[0].self_attn.embed_dim
    x = torch.zeros(1, width)
    flat = [t for state in encoder.empty_states(x) for t in state]
    with torch.no_grad():
        exported = torch.export.export(example.FlatStep(encoder), (x, flat))
        torch._inductor.aoti_compile_and_package(exported, package_path=path)
    return {"bytes": os.path.getsize(path)}


# --------------------------------------------------------------------------- building, running


def build_programs(want_libtorch: bool) -> None:
    """Configures benchmarks/edge's two builds when they are not there, and brings them up to
    date (ninja: nothing to do when nothing changed)."""
    bin_dir = os.path.dirname(sys.executable)
    cmake = os.path.join(bin_dir, "cmake") if os.path.exists(os.path.join(bin_dir, "cmake")) else "cmake"
    generator = ["-G", "Ninja"]
    if os.path.exists(os.path.join(bin_dir, "ninja")):
        generator.append(f"-DCMAKE_MAKE_PROGRAM={os.path.join(bin_dir, 'ninja')}")
    builds = [(ET_BENCH, ["-DBENCH_EDGE_RUNTIME=executorch",
                          f"-DCMAKE_PREFIX_PATH={_executorch_prefix()}",
                          f"-DAAREN_EDGE_KERNELS={EDGE_KERNELS}"])]
    if want_libtorch:
        builds.append((LT_BENCH, ["-DBENCH_EDGE_RUNTIME=libtorch",
                                  f"-DCMAKE_PREFIX_PATH={os.path.dirname(aaren.__file__)};"
                                  f"{torch.utils.cmake_prefix_path}"]))
    packages = {"executorch": _executorch_prefix()}
    if want_libtorch:
        packages.update(Torch=torch.utils.cmake_prefix_path, aaren=os.path.dirname(aaren.__file__))
    for binary, options in builds:
        build = os.path.dirname(binary)
        # A cache another environment configured (a removed venv's cmake or ninja, another
        # torch, aaren or executorch) is configured again from scratch.
        stale = cmake_cache.stale_reason(build, packages)
        if stale or not os.path.exists(os.path.join(build, "CMakeCache.txt")):
            print(f"configuring {build}{f' again ({stale})' if stale else ''} ...", flush=True)
            subprocess.run([cmake, "-S", BENCH_SRC, "-B", build, *generator, *options,
                            *(["--fresh"] if stale else [])], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if not os.path.exists(binary):
            print(f"building {binary} ...", flush=True)
        subprocess.run([cmake, "--build", build, "-j", "2"], check=True, stdout=subprocess.DEVNULL)


def _executorch_prefix() -> str:
    import executorch
    return list(executorch.__path__)[0]


PIN: Optional[int] = None  # the one CPU every measured process runs on (main sets it)


def run(command: List[str]) -> str:
    """Runs a measured program pinned to one CPU (``PIN``): its threads, if it has several,
    share that CPU."""
    pin = None if PIN is None else (lambda: os.sched_setaffinity(0, {PIN}))
    result = subprocess.run(command, capture_output=True, text=True, preexec_fn=pin)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed (exit {result.returncode}):\n"
                           f"{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
    return result.stdout


def parse_harness(out: str) -> Dict[str, object]:
    """bench_edge_et / bench_edge_libtorch output: windows' p50 by start, and the scalars."""
    figures: Dict[str, object] = {"windows": {}}
    for line in out.splitlines():
        parts = line.split()
        if parts[:1] == ["window"]:
            figures["windows"][int(parts[1])] = float(parts[4])
        elif len(parts) == 2:
            try:
                figures[parts[0]] = float(parts[1])
            except ValueError:
                pass
    return figures


def harness(program: str, tokens: int, starts: List[int], window: int, *, method: str = "step",
            jump: bool = False, save: Optional[Tuple[str, int]] = None) -> Dict[str, object]:
    command = [ET_BENCH, program, "--method", method, "--tokens", str(tokens), "--window",
               str(window), "--windows", ",".join(str(s) for s in starts), "--single-thread"]
    if jump:
        command.append("--jump")
    if save:
        command += ["--save", save[0], "--save-calls", str(save[1])]
    return parse_harness(run(command))


def saved_pairs(path: str, width: int) -> Tuple[Tensor, Tensor]:
    data = torch.from_numpy(np.fromfile(path, dtype="<f4").reshape(-1, 2 * width))
    return data[:, :width].clone(), data[:, width:].clone()


def runner(program: str, inputs: str, outputs: str, prefill: int, *,
           single_thread: bool = True) -> Dict[str, float]:
    out = run([RUNNER, program, "--input", inputs, "--output", outputs, "--prefill", str(prefill)]
              + (["--single-thread"] if single_thread else []))
    latency = re.search(r"step latency per token: p50 ([0-9.]+) us, p90 ([0-9.]+) us", out)
    rss = re.search(r"peak RSS ([0-9.]+) MiB", out)
    if latency is None or rss is None:
        raise RuntimeError(f"{RUNNER} printed no latency / peak RSS:\n{out}")
    return {"p50_us": float(latency.group(1)), "p90_us": float(latency.group(2)),
            "peak_rss_mib": float(rss.group(1))}


def loaded_bytes(binary: str) -> Dict[str, int]:
    """The binary and every shared library it loads (ldd), by file name, in bytes (names
    rather than paths: where they are installed is this machine's business)."""
    files = {os.path.basename(binary): os.path.getsize(binary)}
    for line in run(["ldd", binary]).splitlines():
        found = re.search(r"(?:=>\s*)?(/\S+)\s+\(0x", line)
        if found:
            path = os.path.realpath(found.group(1))
            files[os.path.basename(path)] = os.path.getsize(path)
    return files


def torch_floor_us(products: Products, width: int, calls: int) -> float:
    """The products in eager PyTorch, one thread, this process pinned to ``PIN`` meanwhile:
    median per call."""
    xs = torch.rand(calls, 1, width) * 2 - 1
    times = []
    affinity = os.sched_getaffinity(0) if PIN is not None else None
    try:
        if PIN is not None:
            os.sched_setaffinity(0, {PIN})
        with torch.inference_mode():
            for x in xs[:16]:
                products(x)
            for x in xs:
                start = time.perf_counter()
                products(x)
                times.append(time.perf_counter() - start)
    finally:
        if affinity is not None:
            os.sched_setaffinity(0, affinity)
    return 1e6 * statistics.median(times)


def check(name: str, got: Tensor, want: Tensor, failures: List[str], tol: float = 1e-4) -> None:
    err = (got - want).abs().max().item()
    ok = torch.allclose(got, want, rtol=tol, atol=tol)
    print(f"  check {name}: {got.size(0)} tokens, max |diff| vs PyTorch {err:.1e} "
          f"{'ok' if ok else 'MISMATCH'}", flush=True)
    if not ok:
        failures.append(name)


# --------------------------------------------------------------------------- one size


def measure(width: int, layers: int, heads: int, cfg: dict, work: str, args,
            failures: List[str]) -> Dict[str, object]:
    ff = args.ff_mult * width
    context, starts, window = cfg["context"], cfg["starts"], cfg["window"]
    tokens = context  # streamed: the last window ends at the context's end
    tag = f"E{width}_L{layers}_H{heads}"
    res: Dict[str, object] = {"E": width, "layers": layers, "heads": heads, "ff": ff,
                              "context": context, "starts": starts, "window": window}
    print(f"\n== E={width}, {layers} layers, {heads} heads, feed-forward {ff}, context {context}",
          flush=True)
    torch.manual_seed(0)
    layer = aaren.AarenEncoderLayer(width, heads, ff, dropout=0.0, batch_first=True)
    model = aaren.AarenEncoder(layer, layers).eval()
    for lyr in model.layers:  # each its own weights (the copies start identical)
        lyr.self_attn.reset_parameters()
        lyr.linear1.reset_parameters()
        lyr.linear2.reset_parameters()

    # Exports.
    t0 = time.perf_counter()
    paths = {k: os.path.join(work, f"{k}_{tag}.pte") for k in ("aaren", "kv_static", "kv_sliced", "floor")}
    info = aaren.edge.export(model, paths["aaren"], max_prefill=args.max_prefill)
    res["aaren_pte_bytes"], res["aaren_state_bytes"] = info["bytes"], info["state_bytes"]
    res["aaren_operators"] = info["operators"]
    kv = {}
    for form in ("static", "sliced"):
        torch.manual_seed(1)
        kv[form] = KVTransformer(width, layers, heads, ff, context, sliced=form == "sliced").eval()
        if form == "sliced":
            kv[form].load_state_dict(kv["static"].state_dict())
        out = export_kv(kv[form], paths[f"kv_{form}"])
        res[f"kv_{form}_pte_bytes"], res[f"kv_{form}_operators"] = out["bytes"], out["operators"]
    res["kv_cache_bytes"] = kv["static"].cache_bytes()
    products = Products(model).eval()
    out = export_products(products, paths["floor"])
    res["floor_pte_bytes"], res["floor_operators"] = out["bytes"], out["operators"]
    print(f"  exported Aaren / KV static / KV sliced / floor .pte in {time.perf_counter() - t0:.0f} s",
          flush=True)
    if not args.no_libtorch:
        t0 = time.perf_counter()
        paths["aoti"] = os.path.join(work, f"aaren_{tag}.pt2")
        res["aoti_pt2_bytes"] = export_aoti(model, paths["aoti"])["bytes"]
        print(f"  AOTInductor package compiled in {time.perf_counter() - t0:.0f} s", flush=True)

    # Checks: every ExecuTorch program against its PyTorch model (and the runner's outputs).
    n = CHECK_TOKENS
    save = os.path.join(work, "saved.f32")
    harness(paths["aaren"], n, [0], n, save=(save, n))
    xs, got = saved_pairs(save, width)
    with torch.no_grad():
        states, want = None, []
        for x in xs:
            y, states = model.step(x[None], states)
            want.append(y[0])
    check("Aaren .pte (harness)", got, torch.stack(want), failures)
    for form, m in kv.items():
        harness(paths[f"kv_{form}"], n, [0], n, save=(save, n))
        xs, got = saved_pairs(save, width)
        with torch.no_grad():
            zero_caches(m)
            want = torch.cat([m(x[None], torch.tensor([t])) for t, x in enumerate(xs)])
        check(f"KV {form} .pte", got, want, failures)
    harness(paths["floor"], n, [0], n, method="forward", save=(save, n))
    xs, got = saved_pairs(save, width)
    with torch.no_grad():
        check("floor .pte", got, products(xs), failures)

    # The runner's inputs: one stream of tokens; the window runs read its first start + window.
    torch.manual_seed(2)
    stream = (torch.rand(tokens, width) * 2 - 1).numpy().astype("<f4")
    inputs = {}
    for s in starts:
        inputs[s] = os.path.join(work, f"x_{tag}_{s}.f32")
        stream[:s + window].tofile(inputs[s])
    inputs["all"] = os.path.join(work, f"x_{tag}_all.f32")
    stream.tofile(inputs["all"])
    y_path = os.path.join(work, "y.f32")

    # Measurements, side by side: each round runs the Aaren programs, the floor (just before
    # and just after the runner's windows: the ratio of a round is against their median) and
    # LibTorch once; the KV programs, slow to stream and far apart, run in the first round only
    # (--kv-every-round: in each). Medians over the rounds.
    rounds: List[Dict[str, object]] = []
    floor_args = (paths["floor"], cfg["floor_calls"], [0], cfg["floor_calls"])
    for r in range(args.repeats):
        m: Dict[str, object] = {}
        before = harness(*floor_args, method="forward")
        m["runner_windows"] = {}
        for s in starts:
            m["runner_windows"][s] = runner(paths["aaren"], inputs[s], y_path, s)
            if r == 0 and s == 0:  # the runner's outputs against the model's steps
                got = torch.from_numpy(np.fromfile(y_path, dtype="<f4").reshape(-1, width))
                with torch.no_grad():
                    states, want = None, []
                    for x in torch.from_numpy(stream[:window]):
                        y, states = model.step(x[None], states)
                        want.append(y[0])
                check("runner outputs", got, torch.stack(want), failures)
        after = harness(*floor_args, method="forward")
        m["floor"] = after
        m["floor_us"] = statistics.median([before["p50_us"], after["p50_us"]])
        m["runner_all"] = runner(paths["aaren"], inputs["all"], y_path, 0)
        m["runner_all_pool"] = runner(paths["aaren"], inputs["all"], y_path, 0, single_thread=False)
        m["aaren_harness"] = harness(paths["aaren"], tokens, starts, window)
        if r == 0 or args.kv_every_round:
            for form in kv:
                m[f"kv_{form}"] = harness(paths[f"kv_{form}"], tokens, starts, window, jump=args.jump_kv)
        m["torch_floor_us"] = torch_floor_us(products, width, cfg["floor_calls"])
        if not args.no_libtorch:
            attention = model.layers[0].self_attn
            m["libtorch"] = parse_harness(run([
                LT_BENCH, paths["aoti"], "--layers", str(layers), "--heads", str(heads),
                "--head-dim", str(attention.head_dim), "--tokens", str(tokens),
                "--window", str(window), "--windows", ",".join(str(s) for s in starts)]))
        rounds.append(m)
        print(f"  round {r + 1}/{args.repeats} measured", flush=True)
    res["rounds"] = rounds

    def med(get, where=rounds) -> float:
        return statistics.median(get(m) for m in where)

    kv_rounds = [m for m in rounds if "kv_static" in m]
    res["step_floor_ratio"] = [med(lambda m, s=s: m["runner_windows"][s]["p50_us"] / m["floor_us"])
                               for s in starts]
    res["harness_floor_ratio"] = [med(lambda m, s=s: m["aaren_harness"]["windows"][s] / m["floor_us"])
                                  for s in starts]
    res["aaren_runner_us"] = [med(lambda m, s=s: m["runner_windows"][s]["p50_us"]) for s in starts]
    res["aaren_runner_all_us"] = med(lambda m: m["runner_all"]["p50_us"])
    res["aaren_runner_rss_mib"] = med(lambda m: m["runner_all"]["peak_rss_mib"])
    res["aaren_runner_pool_all_us"] = med(lambda m: m["runner_all_pool"]["p50_us"])
    res["aaren_runner_pool_rss_mib"] = med(lambda m: m["runner_all_pool"]["peak_rss_mib"])
    res["aaren_runner_rss_window_mib"] = [med(lambda m, s=s: m["runner_windows"][s]["peak_rss_mib"])
                                          for s in starts]
    res["aaren_harness_us"] = [med(lambda m, s=s: m["aaren_harness"]["windows"][s]) for s in starts]
    memory = ("peak_rss_mib", "rss_load_mib", "rss_first_mib", "rss_end_mib", "rss_anon_mib",
              "rss_file_mib", "os_threads")
    for key in memory:
        res[f"aaren_harness_{key}"] = med(lambda m: m["aaren_harness"][key])
    for form in kv:
        res[f"kv_{form}_us"] = [med(lambda m, s=s: m[f"kv_{form}"]["windows"][s], kv_rounds) for s in starts]
        for key in memory:
            res[f"kv_{form}_{key}"] = med(lambda m: m[f"kv_{form}"][key], kv_rounds)
    res["floor_us"] = med(lambda m: m["floor_us"])
    res["floor_peak_rss_mib"] = med(lambda m: m["floor"]["peak_rss_mib"])
    res["torch_floor_us"] = med(lambda m: m["torch_floor_us"])
    if not args.no_libtorch:
        res["libtorch_us"] = [med(lambda m, s=s: m["libtorch"]["windows"][s]) for s in starts]
        for key in memory:
            res[f"libtorch_{key}"] = med(lambda m: m["libtorch"][key])
    return res


# --------------------------------------------------------------------------- report


def mib(n: float) -> str:
    return f"{n / 2 ** 20:.2f} MiB"


def report(results: List[Dict[str, object]], args, bytes_info: Dict[str, object]) -> List[str]:
    labels = args.labels
    lines = []
    head = ["E / L / H", "program"] + [f"p50 after {l} (us)" for l in labels] + \
           ["peak RSS (MiB)", "RSS anon + file at end (MiB)", "program file (B)", "state / cache (B)"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))

    def split(r, key):
        return f"{r[key + '_rss_anon_mib']:.1f} + {r[key + '_rss_file_mib']:.1f}"

    for r in results:
        size = f"{r['E']} / {r['layers']} / {r['heads']}"
        us = lambda v: [f"{x:.1f}" for x in v]  # noqa: E731
        rows = [
            ["**Aaren .pte, aaren_runner**", *us(r["aaren_runner_us"]),
             f"**{r['aaren_runner_rss_mib']:.1f}**",
             "-", f"{r['aaren_pte_bytes']:,}", f"{r['aaren_state_bytes']:,}"],
            [f"Aaren .pte, bench_edge_et ({r['context']} steps)", *us(r["aaren_harness_us"]),
             f"{r['aaren_harness_peak_rss_mib']:.1f}", split(r, "aaren_harness"),
             f"{r['aaren_pte_bytes']:,}", f"{r['aaren_state_bytes']:,}"],
            [f"KV static ({r['context']} slots masked, XNNPACK)", *us(r["kv_static_us"]),
             f"{r['kv_static_peak_rss_mib']:.1f}", split(r, "kv_static"),
             f"{r['kv_static_pte_bytes']:,}", f"{r['kv_cache_bytes']:,}"],
            ["KV sliced (slots <= pos, portable)", *us(r["kv_sliced_us"]),
             f"{r['kv_sliced_peak_rss_mib']:.1f}", split(r, "kv_sliced"),
             f"{r['kv_sliced_pte_bytes']:,}", f"{r['kv_cache_bytes']:,}"],
        ]
        if "libtorch_us" in r:
            rows.append(["Aaren, AOTInductor .pt2, LibTorch C++", *us(r["libtorch_us"]),
                         f"{r['libtorch_peak_rss_mib']:.1f}", split(r, "libtorch"),
                         f"{r['aoti_pt2_bytes']:,}", f"{r['aaren_state_bytes']:,}"])
        rows.append(["floor: the products, XNNPACK .pte", *([f"{r['floor_us']:.1f}"] * len(labels)),
                     f"{r['floor_peak_rss_mib']:.1f}", "-", f"{r['floor_pte_bytes']:,}", "-"])
        rows.append(["(floor: the products, torch eager)", *([f"{r['torch_floor_us']:.1f}"] * len(labels)),
                     "-", "-", "-", "-"])
        for row in rows:
            lines.append("| " + " | ".join([size] + row) + " |")

    lines.append("")
    runner_total = sum(bytes_info["runner"].values())
    lines.append(f"Bytes on disk: aaren_runner and the {len(bytes_info['runner']) - 1} shared libraries "
                 f"it loads (ldd): {runner_total:,} B = {runner_total / 2 ** 20:.1f} MiB (the system's "
                 f"libc, libstdc++, libm, libgcc_s, ld.so: {bytes_info['runner_system']:,} B; "
                 f"the rest, the runner, ExecuTorch and aaren's: "
                 f"{runner_total - bytes_info['runner_system']:,} B)")
    for path, n in sorted(bytes_info["runner"].items(), key=lambda kv: -kv[1]):
        lines.append(f"  {n:>12,}  {path}")
    if "libtorch" in bytes_info:
        total = sum(bytes_info["libtorch"].values())
        lines.append(f"Bytes on disk: bench_edge_libtorch and the {len(bytes_info['libtorch']) - 1} shared "
                     f"libraries it loads (ldd): {total:,} B = {total / 2 ** 20:.1f} MiB")
    lines.append("")

    targets = []
    lines.append("Ratios:")
    for r in results:
        size = f"E={r['E']}/{r['layers']}L/{r['heads']}H"
        step_floor = r["step_floor_ratio"]
        targets.append((f"{size}: Aaren step <= 1.5x its products at every length",
                        all(x <= 1.5 for x in step_floor),
                        ", ".join(f"after {l}: {x:.2f}x" for l, x in zip(labels, step_floor))))
        rss = r["aaren_runner_rss_mib"]
        targets.append((f"{size}: runner peak RSS < 32 MiB", rss < 32, f"{rss:.1f} MiB"))
        if "libtorch_peak_rss_mib" in r:
            ratio = rss / r["libtorch_peak_rss_mib"]
            targets.append((f"{size}: runner peak RSS <= 1/10 of the LibTorch process's", ratio <= 0.1,
                            f"{rss:.1f} / {r['libtorch_peak_rss_mib']:.1f} MiB = {ratio:.3f}"))
        for form in ("static", "sliced"):
            speedups = [k / a for k, a in zip(r[f"kv_{form}_us"], r["aaren_runner_us"])]
            targets.append((f"{size}: Aaren faster than KV {form} after {labels[1]} and {labels[2]} tokens",
                            all(x > 1 for x in speedups[1:]),
                            ", ".join(f"KV / Aaren after {l}: {x:.2f}x" for l, x in zip(labels, speedups))))
        grow = r["aaren_harness_rss_end_mib"] - r["aaren_harness_rss_first_mib"]
        targets.append((f"{size}: Aaren's memory does not grow with the context", abs(grow) < 0.5,
                        f"RSS after the first step {r['aaren_harness_rss_first_mib']:.2f} MiB, after "
                        f"{r['context']} steps {r['aaren_harness_rss_end_mib']:.2f} MiB; state "
                        f"{r['aaren_state_bytes']:,} B, fixed (KV: cache {r['kv_cache_bytes']:,} B, "
                        f"allocated for {r['context']} tokens)"))
        extra = ["bench_edge_et's Aaren step / floor: " +
                 ", ".join(f"{x:.2f}x" for x in r["harness_floor_ratio"])]
        extra.append(f"runner p50 over {r['context']} steps from token 1: {r['aaren_runner_all_us']:.1f} us "
                     f"(with its pool, the default: {r['aaren_runner_pool_all_us']:.1f} us, peak RSS "
                     f"{r['aaren_runner_pool_rss_mib']:.1f} MiB)")
        if "libtorch_us" in r:
            extra.append("LibTorch step / runner step: " + ", ".join(
                f"{lt / a:.2f}x" for lt, a in zip(r["libtorch_us"], r["aaren_runner_us"])))
            extra.append("LibTorch step / torch floor: " + ", ".join(
                f"{lt / r['torch_floor_us']:.2f}x" for lt in r["libtorch_us"]))
        lines.append(f"- {size}: " + "; ".join(extra))
    lines.append("")
    if args.smoke:
        # Tiny sizes and a few tokens: the figures check that everything runs, the targets
        # (set for E=64 and E=256 over 8192 tokens) are not judged.
        lines.append("Targets: not judged in smoke mode (tiny sizes; run without --smoke)")
        return lines
    lines.append("Targets:")
    for name, ok, detail in targets:
        lines.append(f"- [{'met' if ok else 'MISSED'}] {name}: {detail}")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes, a short context, no LibTorch: checks that everything runs")
    parser.add_argument("--json", metavar="OUT", help="write the figures as JSON")
    parser.add_argument("--repeats", type=int, default=3,
                        help="rounds of measurements (medians; default 3, --smoke 1)")
    parser.add_argument("--kv-every-round", action="store_true",
                        help="stream the KV programs in every round (default: the first only)")
    parser.add_argument("--ff-mult", type=int, default=4, help="feed-forward width / E (4)")
    parser.add_argument("--max-prefill", type=int, default=256, help="the Aaren program's longest prefill")
    parser.add_argument("--jump-kv", action="store_true",
                        help="KV programs: only the windows' calls (same arithmetic), not 8192 tokens")
    parser.add_argument("--no-libtorch", action="store_true", help="skip the AOTInductor/LibTorch side")
    parser.add_argument("--keep", metavar="DIR",
                        help="write the programs here (default: a temporary directory)")
    parser.add_argument("--size", action="append", metavar="E,L,H",
                        help="only these sizes (repeatable; default 64,2,4 and 256,4,8)")
    args = parser.parse_args()
    for path, what in ((RUNNER, "the runner"), (EDGE_KERNELS, "the aaren ExecuTorch kernels")):
        if not os.path.exists(path):
            parser.error(f"{path} ({what}) does not exist: build it with scripts/run.sh edge")
    if args.smoke:
        args.no_libtorch = True
        args.repeats = 1
        cfg = dict(SMOKE)
        args.labels = ["1", str(cfg["starts"][1]), str(cfg["starts"][2])]
    else:
        cfg = dict(sizes=SIZES, context=CONTEXT, starts=STARTS, window=WINDOW, floor_calls=FLOOR_CALLS)
        args.labels = LABELS
    if args.size:
        cfg["sizes"] = [tuple(int(v) for v in size.split(",")) for size in args.size]
    torch.set_num_threads(1)
    build_programs(want_libtorch=not args.no_libtorch)
    global PIN
    if hasattr(os, "sched_getaffinity"):
        PIN = max(os.sched_getaffinity(0))
    print(f"torch {torch.__version__}, executorch {aaren.edge.EXECUTORCH_VERSION}, batch 1, one "
          f"thread (ExecuTorch: --single-thread), every measured process pinned to CPU {PIN}; windows of "
          f"{cfg['window']} tokens starting at {cfg['starts']}", flush=True)

    failures: List[str] = []
    start = time.perf_counter()
    work = args.keep or tempfile.mkdtemp(prefix="bench_edge_")
    os.makedirs(work, exist_ok=True)
    try:
        results = [measure(E, L, H, cfg, work, args, failures) for E, L, H in cfg["sizes"]]
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    system = ("libc.so", "libstdc++.so", "libm.so", "libgcc_s.so", "ld-linux", "libpthread.so", "libdl.so",
              "librt.so")
    runner_files = loaded_bytes(RUNNER)
    bytes_info: Dict[str, object] = {
        "runner": runner_files,
        "runner_system": sum(n for p, n in runner_files.items()
                             if any(os.path.basename(p).startswith(s) for s in system)),
    }
    if not args.no_libtorch:
        bytes_info["libtorch"] = loaded_bytes(LT_BENCH)

    print(f"\nmeasured in {time.perf_counter() - start:.0f} s\n")
    lines = report(results, args, bytes_info)
    print("\n".join(lines))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": results, "bytes": bytes_info, "report": lines,
                       "failures": failures, "torch": torch.__version__}, f, indent=1, default=str)
    if failures:
        print(f"\nchecks FAILED: {failures}")
        return 1
    print("\nchecks passed" + (" (smoke)" if args.smoke else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
