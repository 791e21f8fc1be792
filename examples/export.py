"""Train a small model with Aaren layers, then export it for a C++ program (no Python at run time).

The model: an input projection, an `aaren.AarenEncoder` and a linear head, trained for a
few seconds on a synthetic causal task (after each token of a stream of random vectors,
output the mean of the vectors seen so far). It is exported in eval mode as:

1. `model.pt`: TorchScript (`torch.jit.script`), with the methods
       forward(x [B, N, F]) -> y [B, N, C]
       prefill(x [B, N, F], states=None) -> (y [B, N, C], states)
       step(x_t [B, F], states=None) -> (y_t [B, C], states)
   where `states` is a list with one `(lse [B, H], out [B, H, D])` per layer.
2. `model.pt2`: an AOTInductor package (`torch.export` + AOTInductor), the path that
   replaces TorchScript. It holds two models:
       "forward": x [B, N, F] -> y [B, N, C]          (B and N dynamic)
       "step":    x_t [B, F], lse_0, out_0, ..., lse_{L-1}, out_{L-1}
                  -> y_t [B, C], lse_0', out_0', ...  (B dynamic; lse and out float64)
   and metadata (`aaren.*` keys: sizes, layers, heads, device) that the C++ program reads.
3. `reference.pt`: example inputs and the Python outputs on them (a dict saved with
   torch.save: "x" [B, N, F], "forward" [B, N, C] and "step" [B, N, C], the outputs of
   step fed one token at a time), for checking the C++ outputs.

Run:   python examples/export.py --out-dir build/deploy       (CPU: about a minute, mostly
       the AOTInductor C++ compile). Then build and run examples/cpp (docs/deploy.md).
Options: --steps (training steps), --device cuda, --no-aoti (TorchScript only), --seed.

The C++ process that loads either file must have the aaren operators registered, i.e.
link libaaren_ops (docs/deploy.md); in this process `import aaren` registers them.
"""
import argparse
import math
import os
import time
import warnings
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import aaren

IN_FEATURES, D_MODEL, HEADS, LAYERS = 4, 32, 4, 2


class StreamingModel(nn.Module):
    """Input projection -> AarenEncoder (causal) -> head, with forward / prefill / step.

    `encoder` replaces the encoder built here (post-norm layers, 2 * d_model feed-forward
    units) by the caller's `aaren.AarenEncoder` of `num_layers` layers of width d_model;
    projections=False leaves out the input projection and the head (in_features and
    out_features must then be d_model): benchmarks/bench_step_cpu.py --cpp exports its stacks
    so.
    """

    def __init__(self, in_features: int = IN_FEATURES, d_model: int = D_MODEL,
                 num_heads: int = HEADS, num_layers: int = LAYERS,
                 out_features: int = IN_FEATURES, encoder: Optional[nn.Module] = None,
                 projections: bool = True) -> None:
        super().__init__()
        if not projections and not in_features == out_features == d_model:
            raise ValueError(f"projections=False needs in_features == out_features == d_model, "
                             f"got {in_features}, {out_features}, {d_model}")
        # Plain int attributes: kept by TorchScript, read by the C++ program.
        self.in_features = in_features
        self.out_features = out_features
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.head_dim = d_model // num_heads
        self.in_proj = nn.Linear(in_features, d_model) if projections else nn.Identity()
        if encoder is None:
            layer = aaren.AarenEncoderLayer(d_model, num_heads, dim_feedforward=2 * d_model,
                                            dropout=0.0, batch_first=True)
            encoder = aaren.AarenEncoder(layer, num_layers)
        self.encoder = encoder
        self.head = nn.Linear(d_model, out_features) if projections else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        """x [B, N, F] -> y [B, N, C], every token in parallel (the scan)."""
        return self.head(self.encoder(self.in_proj(x)))

    @torch.jit.export
    def prefill(self, x: Tensor, states: Optional[List[Tuple[Tensor, Tensor]]] = None
                ) -> Tuple[Tensor, List[Tuple[Tensor, Tensor]]]:
        """A chunk of tokens in parallel, continuing from `states` (None: the start)."""
        h, new_states = self.encoder.prefill(self.in_proj(x), states)
        return self.head(h), new_states

    @torch.jit.export
    def step(self, x: Tensor, states: Optional[List[Tuple[Tensor, Tensor]]] = None
             ) -> Tuple[Tensor, List[Tuple[Tensor, Tensor]]]:
        """One token x [B, F] -> (y [B, C], new states); constant memory per token."""
        h, new_states = self.encoder.step(self.in_proj(x), states)
        return self.head(h), new_states

    def empty_states(self, batch: int, dtype: torch.dtype, device: torch.device
                     ) -> List[Tuple[Tensor, Tensor]]:
        """The states before any token (what `states=None` means), as tensors."""
        return [aaren.empty_state(batch, self.num_heads, self.head_dim, dtype, device)
                for _ in range(self.num_layers)]


class FlatStep(nn.Module):
    """`step` with flat tensor inputs and outputs, for torch.export / AOTInductor:
    (x_t, [lse_0, out_0, lse_1, out_1, ...]) -> (y_t, [lse_0', out_0', ...])."""

    def __init__(self, model: StreamingModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor, flat_states: List[Tensor]) -> Tuple[Tensor, List[Tensor]]:
        states = [(flat_states[2 * i], flat_states[2 * i + 1])
                  for i in range(len(flat_states) // 2)]
        y, new_states = self.model.step(x, states)
        return y, [t for state in new_states for t in state]


def make_batch(batch: int, length: int, features: int = IN_FEATURES,
               device: Optional[torch.device] = None) -> Tuple[Tensor, Tensor]:
    """Random vectors and, after each token, the mean of the vectors so far."""
    x = torch.randn(batch, length, features, device=device)
    counts = torch.arange(1, length + 1, device=device, dtype=x.dtype).view(1, length, 1)
    return x, x.cumsum(dim=1) / counts


def train(model: StreamingModel, steps: int, device: torch.device) -> None:
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    start, losses = time.time(), []
    for i in range(steps):
        x, target = make_batch(32, 32, device=device)
        loss = F.mse_loss(model(x), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if (i + 1) % 100 == 0:
            print(f"  step {i + 1:4d}  loss {sum(losses[-100:]) / 100:.4f}")
    if losses:
        first = sum(losses[:10]) / len(losses[:10])
        last = sum(losses[-10:]) / len(losses[-10:])
        print(f"trained {steps} steps in {time.time() - start:.1f} s: loss {first:.4f} -> {last:.4f}")
    model.eval()


def stream(step_fn, x: Tensor, states) -> Tensor:
    """Feeds x [B, N, F] one token at a time; returns the outputs [B, N, C]."""
    outputs = []
    for t in range(x.size(1)):
        y, states = step_fn(x[:, t], states)
        outputs.append(y)
    return torch.stack(outputs, dim=1)


def max_diff(a: Tensor, b: Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def export_torchscript(model: StreamingModel, path: str, x: Tensor, want: Tensor) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript's deprecation warning
        scripted = torch.jit.script(model)
        scripted.save(path)
        loaded = torch.jit.load(path)
    with torch.no_grad():
        got_forward = loaded(x)
        got_step = stream(loaded.step, x, None)
        prompt = x.size(1) // 2
        y, states = loaded.prefill(x[:, :prompt])
        got_prefill = torch.cat([y, stream(loaded.step, x[:, prompt:], states)], dim=1)
    diffs = [max_diff(got, want) for got in (got_forward, got_step, got_prefill)]
    print(f"TorchScript: {path}  (reloaded: forward / step / prefill+step differ from eager "
          f"by {diffs[0]:.1e} / {diffs[1]:.1e} / {diffs[2]:.1e})")
    assert max(diffs) < 1e-4, diffs


def aoti_compile(module: nn.Module, args: tuple, dynamic_shapes, metadata: dict) -> list:
    """torch.export, then AOTInductor; returns the generated files for package_aoti."""
    exported = torch.export.export(module, args, dynamic_shapes=dynamic_shapes)
    return torch._inductor.aot_compile(
        exported.module(), args,
        options={"aot_inductor.package": True, "aot_inductor.metadata": metadata})


def export_aoti(model: StreamingModel, path: str, device: torch.device, x: Tensor,
                want: Tensor, want_step: Tensor) -> None:
    from torch._inductor.package import load_package, package_aoti

    start = time.time()
    metadata = {
        "aaren.format": "1",
        "aaren.in_features": str(model.in_features),
        "aaren.out_features": str(model.out_features),
        "aaren.num_layers": str(model.num_layers),
        "aaren.num_heads": str(model.num_heads),
        "aaren.head_dim": str(model.head_dim),
        "aaren.device": device.type,
    }
    batch, length = torch.export.Dim("batch", min=1), torch.export.Dim("length", min=1)
    # Example inputs of sizes other than the reference's: the shapes really are dynamic.
    example = torch.randn(2, 8, model.in_features, device=device)
    forward_files = aoti_compile(model, (example,), ({0: batch, 1: length},), metadata)

    states = [t for state in model.empty_states(2, example.dtype, device) for t in state]
    # The token contiguous, as callers must pass it: the compiled kernels index x_t with the
    # example's strides, unchecked (a slice of [2, 8, F] would bake in a batch stride of 8 F).
    step_files = aoti_compile(FlatStep(model), (example[:, 0].contiguous(), states),
                              ({0: batch}, [{0: batch}] * len(states)), metadata)
    package_aoti(path, {"forward": forward_files, "step": step_files})
    print(f"AOTInductor: {path}  (models 'forward' and 'step', compiled in "
          f"{time.time() - start:.0f} s)")

    # Check the package in this process, as the C++ program will run it.
    forward = load_package(path, "forward")
    step = load_package(path, "step")
    with torch.no_grad():
        got = forward(x)
        flat = [t for state in model.empty_states(x.size(0), x.dtype, device) for t in state]
        outputs = []
        for t in range(x.size(1)):
            y, flat = step(x[:, t].contiguous(), flat)
            outputs.append(y)
        got_step = torch.stack(outputs, dim=1)
    diffs = max_diff(got, want), max_diff(got_step, want_step)
    print(f"  reloaded: forward / step differ from eager by {diffs[0]:.1e} / {diffs[1]:.1e}")
    assert max(diffs) < 1e-4, diffs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out-dir", default="build/deploy",
                        help="where model.pt, model.pt2 and reference.pt go (default build/deploy)")
    parser.add_argument("--steps", type=int, default=200, help="training steps (default 200)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--no-aoti", action="store_true",
                        help="skip the AOTInductor package (TorchScript only)")
    parser.add_argument("--batch", type=int, default=3, help="reference inputs: batch (3)")
    parser.add_argument("--length", type=int, default=20, help="reference inputs: tokens (20)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available here")
    if device.type == "cuda" and not aaren.build_info()["cuda"]:
        parser.error("--device cuda: aaren was built without CUDA kernels")
    os.makedirs(args.out_dir, exist_ok=True)
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)  # a tiny model: a second thread costs more than it brings

    model = StreamingModel().to(device)
    print(f"model: {sum(p.numel() for p in model.parameters())} parameters, {model.num_layers} "
          f"Aaren layers, {model.num_heads} heads, on {device}")
    train(model, args.steps, device)

    # The reference: eager Python outputs on fixed inputs.
    x, target = make_batch(args.batch, args.length, device=device)
    with torch.no_grad():
        want = model(x)
        want_step = stream(model.step, x, None)
    print(f"reference inputs {list(x.shape)}: loss {F.mse_loss(want, target).item():.4f}; "
          f"step vs forward {max_diff(want_step, want):.1e}")

    export_torchscript(model, os.path.join(args.out_dir, "model.pt"), x, want)
    if not args.no_aoti:
        export_aoti(model, os.path.join(args.out_dir, "model.pt2"), device, x, want, want_step)

    reference = os.path.join(args.out_dir, "reference.pt")
    torch.save({"x": x.cpu(), "forward": want.cpu(), "step": want_step.cpu()}, reference)
    print(f"reference: {reference}  (x {list(x.shape)}, Python outputs 'forward' and 'step')")


if __name__ == "__main__":
    main()
