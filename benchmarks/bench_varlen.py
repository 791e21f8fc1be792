"""Packed against padded sequences on the CPU: aaren.scan_varlen over N sequences packed along
the tokens against aaren.scan over the same sequences right-padded to the longest (scores -inf
on the padding), for a realistic long-tailed length distribution.

Lengths: lognormal (sigma 1) with mean 512, clipped to [1, 8192], a fixed seed; the run prints
what it drew (tokens, mean, longest, and the padding the padded batch carries).

Time: forward, and forward + backward through autograd, each variant on its own inputs made
beforehand; the two variants alternate call by call (packed, padded, packed, ...) so that both
meet the same load on a shared machine; medians over the rounds, and the median of the
per-round ratios. Memory: the peak resident memory of a fresh process that builds the
variant's inputs and runs one forward + backward, minus that of a process that runs both
variants on one token only (VmHWM of /proc/self/status, which starts anew at exec where ru_maxrss
would carry the parent's; everything the variant allocates, its inputs included).

    python benchmarks/bench_varlen.py                   # N = 64 sequences, H = 4, D = 64
    python benchmarks/bench_varlen.py --smoke           # tiny, seconds (checks the outputs)
"""
import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

import aaren


def draw_lengths(sequences, mean, longest, seed):
    generator = torch.Generator().manual_seed(seed)
    sigma = 1.0
    mu = torch.log(torch.tensor(float(mean))) - sigma ** 2 / 2  # lognormal mean = e^(mu + s^2/2)
    lengths = torch.exp(mu + sigma * torch.randn(sequences, generator=generator, dtype=torch.float64))
    return lengths.round().clamp(1, longest).to(torch.int64).tolist()


def make_inputs(variant, lengths, heads, head_dim, dtype, seed):
    """(run() -> out, leaves) for one variant, its inputs requiring grad."""
    generator = torch.Generator().manual_seed(seed + 1)
    tokens = sum(lengths)
    scores = torch.randn(tokens, heads, generator=generator).to(dtype)
    values = torch.randn(tokens, heads, head_dim, generator=generator).to(dtype)
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    if variant == "packed":
        s, v = scores.requires_grad_(), values.requires_grad_()
        longest = max(lengths)
        return (lambda: aaren.scan_varlen(s, v, cu, longest)[0]), (s, v)
    longest = max(lengths)
    valid = torch.arange(longest)[None, :] < torch.tensor(lengths)[:, None]
    padded_s = torch.full((len(lengths), longest, heads), float("-inf"), dtype=dtype)
    padded_v = torch.zeros(len(lengths), longest, heads, head_dim, dtype=dtype)
    padded_s[valid] = scores
    padded_v[valid] = values
    del scores, values
    s, v = padded_s.requires_grad_(), padded_v.requires_grad_()
    return (lambda: aaren.scan(s, v)[0]), (s, v)


def peak_rss_kib():
    """This process's peak resident memory since its exec, in KiB (Linux)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # elsewhere: may include the parent's


def peak_memory_child(args):
    """Runs in a fresh process: builds a variant's inputs, one forward + backward, prints the
    peak RSS in KiB."""
    torch.set_num_threads(args.threads)
    lengths = draw_lengths(args.sequences, args.mean, args.longest, args.seed)
    # Warm-up, in the baseline too: both variants once on one token, so that what the
    # libraries set up on a first call (thread pools, autograd's engine) is not counted.
    for variant in ("packed", "padded"):
        run, _ = make_inputs(variant, [1], args.heads, args.head_dim, getattr(torch, args.dtype),
                             args.seed)
        out = run()
        out.backward(torch.ones_like(out))
    if args.child != "baseline":
        run, _ = make_inputs(args.child, lengths, args.heads, args.head_dim,
                             getattr(torch, args.dtype), args.seed)
        out = run()
        out.backward(torch.ones_like(out))
    print(json.dumps({"maxrss_kib": peak_rss_kib()}))


def peak_memory(args, variant):
    command = [sys.executable, __file__, "--child", variant, "--dtype", args.dtype]
    for name in ("sequences", "mean", "longest", "heads", "head_dim", "seed", "threads"):
        command += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    result = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(result.stdout.strip().splitlines()[-1])["maxrss_kib"] / 1024


def time_side_by_side(runs, rounds, backward):
    """Median seconds per variant and the median per-round ratio padded / packed."""
    times = {name: [] for name in runs}
    for _ in range(rounds):
        for name, (run, leaves) in runs.items():
            for leaf in leaves:
                leaf.grad = None
            start = time.perf_counter()
            if backward:
                out = run()
                out.backward(torch.ones_like(out))
            else:
                with torch.no_grad():
                    run()
            times[name].append(time.perf_counter() - start)
    ratios = [padded / packed for packed, padded in zip(times["packed"], times["padded"])]
    return {name: statistics.median(t) for name, t in times.items()}, statistics.median(ratios)


def check(runs, lengths):
    """The packed outputs are the padded ones at the valid positions."""
    with torch.no_grad():
        packed = runs["packed"][0]()
        padded = runs["padded"][0]()
    longest = max(lengths)
    valid = torch.arange(longest)[None, :] < torch.tensor(lengths)[:, None]
    torch.testing.assert_close(packed.float(), padded[valid].float(), rtol=2e-2, atol=2e-2)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sequences", type=int, default=64)
    parser.add_argument("--mean", type=int, default=512)
    parser.add_argument("--longest", type=int, default=8192)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return peak_memory_child(args)
    if args.smoke:
        args.sequences, args.mean, args.longest, args.rounds = 8, 16, 64, 2
    torch.set_num_threads(args.threads)
    lengths = draw_lengths(args.sequences, args.mean, args.longest, args.seed)
    tokens, longest = sum(lengths), max(lengths)
    padded_tokens = len(lengths) * longest
    print(f"{len(lengths)} sequences: {tokens} tokens, mean {tokens / len(lengths):.0f}, "
          f"median {statistics.median(lengths):.0f}, longest {longest}; padded to "
          f"{len(lengths)} x {longest} = {padded_tokens} tokens ({padded_tokens / tokens:.1f}x); "
          f"H={args.heads}, D={args.head_dim}, {args.threads} thread(s), torch {torch.__version__}")
    print()
    print("| dtype | packed fwd ms | padded fwd ms | padded / packed fwd | packed fwd+bwd ms | "
          "padded fwd+bwd ms | padded / packed fwd+bwd | packed peak MiB | padded peak MiB | "
          "padded / packed memory |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        runs = {variant: make_inputs(variant, lengths, args.heads, args.head_dim, dtype, args.seed)
                for variant in ("packed", "padded")}
        check(runs, lengths)
        forward, forward_ratio = time_side_by_side(runs, args.rounds, backward=False)
        both, both_ratio = time_side_by_side(runs, args.rounds, backward=True)
        del runs
        args.dtype = dtype_name
        baseline = peak_memory(args, "baseline")
        memory = {variant: peak_memory(args, variant) - baseline for variant in ("packed", "padded")}
        print(f"| {dtype_name} | {forward['packed'] * 1e3:.2f} | {forward['padded'] * 1e3:.2f} | "
              f"{forward_ratio:.2f}x | {both['packed'] * 1e3:.2f} | {both['padded'] * 1e3:.2f} | "
              f"{both_ratio:.2f}x | {memory['packed']:.0f} | {memory['padded']:.0f} | "
              f"{memory['padded'] / max(memory['packed'], 1e-9):.2f}x |", flush=True)


if __name__ == "__main__":
    main()
