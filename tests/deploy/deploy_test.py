"""The deployment tests' steps, run by CTest (tests/deploy/CMakeLists.txt).

    readme README ROOT            run the bash block of README's "Deploy from C++" section
                                  in ROOT, exactly as written
    export --device D --out-dir O examples/export.py for device D (CUDA: skipped without a GPU)
    run BINARY MODEL REFERENCE OUTPUTS [--device D]
                                  run the C++ program on REFERENCE's inputs, then compare its
                                  saved outputs with the Python ones, here, in Python; for a
                                  TorchScript MODEL, also check its backward (see gradients)
    gradients MODEL REFERENCE [--device D]
                                  load the TorchScript MODEL and check the gradients through
                                  it (aaren's C++ autograd kernels, scan and step) by finite
                                  differences in float64, on REFERENCE's first inputs
    error BINARY PATTERN [--garbage P] [--truncate SRC P] [--inputs-shape P SHAPE] -- ARGS
                                  the C++ program must fail cleanly: exit status 1 (no crash,
                                  no signal) and an "error: ..." line matching PATTERN

Exit status 77 means skipped (CTest SKIP_RETURN_CODE): CUDA asked for but not available.
"""
import argparse
import os
import re
import subprocess
import sys
import time

SKIP = 77
ATOL = RTOL = 1e-4  # float32 through a differently fused graph (AOTInductor), step vs scan


def skip_without_cuda(device: str) -> None:
    if not device.startswith("cuda"):
        return
    import torch

    if not torch.cuda.is_available():
        print(f"skipped: --device {device} but CUDA is not available")
        sys.exit(SKIP)
    import aaren

    if not aaren.build_info()["cuda"]:
        print(f"skipped: --device {device} but aaren was built without CUDA kernels")
        sys.exit(SKIP)


def readme_block(readme: str, heading: str = "## Deploy from C++") -> str:
    text = open(readme, encoding="utf-8").read()
    start = text.find(heading + "\n")
    if start < 0:
        sys.exit(f"{readme}: no section '{heading}'")
    section = text[start + len(heading):]
    end = re.search(r"^## ", section, flags=re.MULTILINE)
    section = section[:end.start()] if end else section
    match = re.search(r"^```bash\n(.*?)^```", section, flags=re.MULTILINE | re.DOTALL)
    if not match:
        sys.exit(f"{readme}: the section '{heading}' has no ```bash block")
    return match.group(1)


def cmd_readme(args) -> int:
    block = readme_block(args.readme)
    print(f"running the 'Deploy from C++' commands of {args.readme} in {args.root}:\n{block}",
          flush=True)
    # `python` in the block is the interpreter running this (the one aaren is installed in).
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    return subprocess.run(["bash", "-euxo", "pipefail", "-c", block], cwd=args.root,
                          env=env).returncode


def cmd_export(args) -> int:
    skip_without_cuda(args.device)
    command = [sys.executable, args.export_script, "--device", args.device, "--out-dir",
               args.out_dir, "--steps", str(args.steps)]
    print(" ".join(command), flush=True)
    return subprocess.run(command).returncode


def load_outputs(path: str):
    import torch
    from torch.jit._pickle import restore_type_tag

    # The C++ program saves a typed dict (torch::pickle_save), tagged with restore_type_tag.
    with torch.serialization.safe_globals([restore_type_tag]):
        return torch.load(path, weights_only=True)


def cmd_run(args) -> int:
    skip_without_cuda(args.device)
    import torch

    if os.path.exists(args.outputs):
        os.remove(args.outputs)
    command = [args.binary, args.model, "--inputs", args.reference, "--save-outputs",
               args.outputs, "--show", "4"]
    if args.device != "cpu" and not args.model.endswith(".pt2"):
        command += ["--device", args.device]
    print(" ".join(command), flush=True)
    start = time.time()
    status = subprocess.run(command).returncode
    print(f"(exit status {status} after {time.time() - start:.1f} s)")
    if status != 0:
        print(f"FAIL: the C++ program exited with status {status}")
        return 1

    reference = torch.load(args.reference, weights_only=True)
    outputs = load_outputs(args.outputs)
    ok = True
    for key in ("forward", "step"):
        got, want = outputs[key], reference[key]
        if got.shape != want.shape:
            print(f"FAIL: C++ {key} has shape {list(got.shape)}, Python {list(want.shape)}")
            ok = False
            continue
        diff = (got.double() - want.double()).abs().max().item()
        same = torch.allclose(got, want, atol=ATOL, rtol=RTOL)
        print(f"C++ vs Python {key:8s} {list(got.shape)}: max |difference| {diff:.2e} "
              f"{'ok' if same else 'FAIL'} (atol {ATOL}, rtol {RTOL})")
        ok = ok and same
    if args.model.endswith(".pt"):
        ok = check_torchscript_gradients(args.model, args.reference, args.device) and ok
    return 0 if ok else 1


def check_torchscript_gradients(model_path: str, reference_path: str, device: str) -> bool:
    """The backward through a loaded TorchScript model: aaren's autograd is C++ code registered
    for the Autograd key, so this is the backward a C++ training program runs. The model in
    float64, gradcheck (finite differences, independent of that backward) of forward(x) and of
    streaming the tokens through step(x_t, states), with respect to x."""
    import warnings

    import torch

    import aaren  # noqa: F401  (registers the operators the model calls)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = torch.jit.load(model_path, map_location=device).double()
    x = torch.load(reference_path, weights_only=True)["x"][:2, :4].double().to(device)
    # gradients with respect to x pass through the scan's backward for both of its inputs
    # (scores and values are projections of x) and, in the stream, for the state.
    leaves = (x.clone().requires_grad_(),)

    def stream(x):
        states = None
        outputs = []
        for t in range(x.size(1)):
            y, states = model.step(x[:, t], states)
            outputs.append(y)
        return torch.stack(outputs, dim=1)

    ok = True
    for name, fn in [("forward(x)", model), ("step(x_t, states) token by token", stream)]:
        try:
            torch.autograd.gradcheck(fn, leaves)
            print(f"gradients through the loaded TorchScript model, {name}: ok (gradcheck, float64)")
        except Exception as e:  # gradcheck raises with the Jacobians that differ
            print(f"FAIL: gradients through the loaded TorchScript model, {name}: {e}")
            ok = False
    return ok


def cmd_gradients(args) -> int:
    skip_without_cuda(args.device)
    return 0 if check_torchscript_gradients(args.model, args.reference, args.device) else 1


def cmd_error(args) -> int:
    if args.garbage:
        os.makedirs(os.path.dirname(os.path.abspath(args.garbage)), exist_ok=True)
        with open(args.garbage, "wb") as f:
            f.write(b"this is not a model\n" + os.urandom(4096))
    if args.truncate:
        source, target = args.truncate
        data = open(source, "rb").read()
        with open(target, "wb") as f:
            f.write(data[:len(data) // 2])
    if args.inputs_shape:
        import torch

        path, shape = args.inputs_shape
        torch.save({"x": torch.randn([int(n) for n in shape.split(",")])}, path)
    command = [args.binary] + [a for a in args.args if a != "--"]
    print(" ".join(command), flush=True)
    result = subprocess.run(command, capture_output=True, text=True)
    print(result.stdout, end="")
    print(result.stderr, end="")
    if result.returncode < 0:
        print(f"FAIL: the C++ program was killed by signal {-result.returncode}")
        return 1
    if result.returncode != args.status:
        print(f"FAIL: exit status {result.returncode}, expected {args.status}")
        return 1
    if not re.search(args.pattern, result.stderr, flags=re.MULTILINE):
        print(f"FAIL: stderr does not match {args.pattern!r}")
        return 1
    print(f"ok: exit status {args.status} and a message matching {args.pattern!r}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("readme")
    p.add_argument("readme")
    p.add_argument("root")
    p.set_defaults(func=cmd_readme)

    p = sub.add_parser("export")
    p.add_argument("export_script")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out-dir", required=True)
    p.add_argument("--steps", type=int, default=20)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("run")
    for name in ("binary", "model", "reference", "outputs"):
        p.add_argument(name)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("gradients")
    p.add_argument("model")
    p.add_argument("reference")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_gradients)

    p = sub.add_parser("error")
    p.add_argument("binary")
    p.add_argument("pattern")
    p.add_argument("--status", type=int, default=1)
    p.add_argument("--garbage", metavar="PATH", help="write a file of garbage bytes there first")
    p.add_argument("--truncate", nargs=2, metavar=("SRC", "PATH"),
                   help="write the first half of SRC to PATH first")
    p.add_argument("--inputs-shape", nargs=2, metavar=("PATH", "SHAPE"),
                   help="write an inputs file with x of SHAPE (e.g. 2,5,3) there first")
    p.add_argument("args", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_error)

    args = parser.parse_args()
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
