"""From a trained Aaren model to a program that streams on the edge (docs/edge.md).

Trains a small AarenEncoder for a few seconds (the running mean of a stream of vectors),
exports it with aaren.edge.export (prefill / step / reset, the state inside the program),
runs it with the C++ runner (no libtorch) on a prompt and then token by token, and checks the
runner's outputs against the model's own streaming in Python.

    python examples/edge_stream.py [--out-dir build/edge/demo] [--runner build/edge/aaren_runner]

Needs executorch and the runner: `scripts/run.sh edge` installs the one, builds the other and
runs this script. Exits with status 1 if the outputs differ by more than 1e-5 relative.
"""
import argparse
import pathlib
import subprocess
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

import aaren
import aaren.edge

ROOT = pathlib.Path(__file__).resolve().parents[1]


def stream_in_python(encoder, x, prefill, chunk):
    """What the runner must give for tokens x [T, E]: the first `prefill` tokens through
    ``encoder.prefill`` in chunks of at most `chunk` (the program's max_prefill), the rest one
    at a time through ``encoder.step``, from the empty state. Returns [T, E]."""
    with torch.no_grad():
        pieces, states = [], None
        for begin in range(0, prefill, chunk):
            y, states = encoder.prefill(x[None, begin:min(prefill, begin + chunk)], states)
            pieces.append(y[0])
        for t in range(prefill, x.size(0)):
            y, states = encoder.step(x[None, t], states)
            pieces.append(y)
    return torch.cat(pieces)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=pathlib.Path, default=ROOT / "build" / "edge" / "demo")
    parser.add_argument("--runner", type=pathlib.Path, default=ROOT / "build" / "edge" / "aaren_runner")
    parser.add_argument("--steps", type=int, default=150, help="training steps")
    parser.add_argument("--tokens", type=int, default=300, help="tokens streamed by the runner")
    parser.add_argument("--prompt", type=int, default=100, help="of which through prefill")
    args = parser.parse_args()
    if not args.runner.exists():
        parser.error(f"{args.runner} does not exist: build it with scripts/run.sh edge")
    if not 0 <= args.prompt <= args.tokens:
        parser.error("--prompt must be between 0 and --tokens")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)

    # 1. Train: the running mean of the inputs, which needs attention over every prefix.
    width = 64
    layer = aaren.AarenEncoderLayer(width, 4, 128, dropout=0.0, batch_first=True)
    model = aaren.AarenEncoder(layer, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    counts = torch.arange(1, 65).view(1, 64, 1)
    start = time.perf_counter()
    for _ in range(args.steps):
        x = torch.randn(16, 64, width)
        loss = F.mse_loss(model(x), x.cumsum(1) / counts)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    print(f"trained {args.steps} steps in {time.perf_counter() - start:.1f} s, loss {loss.item():.4f}")
    model.eval()

    # 2. Export.
    start = time.perf_counter()
    program = args.out_dir / "encoder.pte"
    info = aaren.edge.export(model, program, max_prefill=64)
    print(f"exported {program.name} in {time.perf_counter() - start:.1f} s: {info['bytes']:,} bytes, "
          f"state {info['state_bytes']:,} bytes")

    # 3. The runner: prompt through prefill, the rest one token at a time.
    x = torch.randn(args.tokens, width)
    inputs, outputs = args.out_dir / "x.f32", args.out_dir / "y.f32"
    x.numpy().astype("<f4").tofile(inputs)
    result = subprocess.run([str(args.runner), str(program), "--input", str(inputs), "--output",
                             str(outputs), "--prefill", str(args.prompt)],
                            capture_output=True, text=True)
    print(result.stdout.strip())
    if result.returncode != 0:
        print(result.stderr.strip(), file=sys.stderr)
        return 1
    got = torch.from_numpy(np.fromfile(outputs, dtype="<f4").reshape(args.tokens, width))

    # 4. The same stream in Python.
    want = stream_in_python(model, x, args.prompt, info["max_prefill"])
    error = (got - want).abs().max().item() / want.abs().max().item()
    print(f"runner vs Python streaming: max error {error:.2e} relative to the largest output")
    if error > 1e-5:
        print("FAILED: the runner's outputs differ from the model's", file=sys.stderr)
        return 1
    print("OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
