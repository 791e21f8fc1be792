"""generate() with a Llama-style Hugging Face model: Aaren (aaren.hf.convert + AarenCache) vs
the original (sdpa attention + DynamicCache), side by side in one run.

Both models are the same random-initialized LlamaForCausalLM built from a config (no download;
default: hidden 256, 4 layers, 8 heads, 4 KV heads, RoPE, float32), one of them converted.
Each generates --tokens new tokens (greedy, every token forced: min_new_tokens) from the same
prompt, batch 1, under torch.inference_mode. Measured at every generated token, through a
LogitsProcessor that generate() calls once per token:
  - cache bytes: sum(numel * element_size) of the cache's tensors (Aaren: one (lse, out) per
    layer; DynamicCache: every layer's keys and values);
  - per-token latency: time between consecutive calls (one forward + the sampling step),
    reported as the median over the window of tokens since the previous sample point;
  - on CUDA also torch.cuda.max_memory_allocated (reset before each model's run).
With --rounds R, each model generates R times, the two taking turns (who goes first
alternates), and the median over rounds is reported, so both are timed under similar load.

    python benchmarks/bench_hf_generate.py                 # 4096 tokens
    python benchmarks/bench_hf_generate.py --tokens 512    # quicker
"""
import argparse
import copy
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, LogitsProcessor

import aaren.hf as ah


class _Recorder(LogitsProcessor):
    """Called by generate() once per new token: records the time and the cache's bytes."""

    def __init__(self, cache, device):
        self.cache, self.device = cache, device
        self.times, self.bytes = [], []

    def __call__(self, input_ids, scores):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())
        self.bytes.append(ah.cache_bytes(self.cache))
        return scores


def _run(model, cache, prompt, tokens, device):
    recorder = _Recorder(cache, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode():
        out = model.generate(prompt, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                             past_key_values=cache, logits_processor=[recorder], pad_token_id=0)
    assert out.shape[1] == prompt.shape[1] + tokens
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    return recorder, peak


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1024, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads,
                         max_position_embeddings=args.prompt + args.tokens + 1,
                         bos_token_id=None, eos_token_id=None, pad_token_id=None,
                         attn_implementation="sdpa")
    original = LlamaForCausalLM(config).to(device).eval()
    aaren_model = ah.convert(copy.deepcopy(original)).eval()
    prompt = torch.randint(0, config.vocab_size, (1, args.prompt), device=device)

    runs = {"sdpa + DynamicCache": [], "Aaren + AarenCache": []}
    peaks = {name: [] for name in runs}
    for round_ in range(args.rounds):
        for name in (list(runs) if round_ % 2 == 0 else list(runs)[::-1]):  # alternate who goes first
            if name.startswith("sdpa"):
                recorder, peak = _run(original, DynamicCache(config=config), prompt, args.tokens, device)
            else:
                recorder, peak = _run(aaren_model, ah.AarenCache(config), prompt, args.tokens, device)
            runs[name].append(recorder)
            peaks[name].append(peak)

    points = [n for n in (64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384) if n < args.tokens]
    points.append(args.tokens)
    params = sum(p.numel() for p in original.parameters())
    print(f"generate(): {args.tokens} new tokens after a {args.prompt}-token prompt, batch 1, "
          f"{device.type}, float32, {args.threads} thread(s); Llama-style model: hidden {args.hidden}, "
          f"{args.layers} layers, {args.heads} heads, {args.kv_heads} KV heads, "
          f"{params / 1e6:.2f} M parameters; {args.rounds} round(s), medians")
    print("latency: median ms per token over the tokens since the previous row; "
          "cache: bytes held when that token is generated")
    print(f"{'tokens':>7} | {'sdpa ms/tok':>11} {'Aaren ms/tok':>12} {'ratio':>6} | "
          f"{'DynamicCache B':>15} {'Aaren state B':>14} {'ratio':>8}")
    previous = 1
    for n in points:
        row = {}
        for name, recorders in runs.items():
            latencies, sizes = [], []
            for rec in recorders:
                gaps = [b - a for a, b in zip(rec.times[previous - 1:n - 1], rec.times[previous:n])]
                latencies.append(statistics.median(gaps) * 1e3 if gaps else float("nan"))
                sizes.append(rec.bytes[n - 1])
            row[name] = (statistics.median(latencies), max(sizes))
        (ls, bs), (la, ba) = row["sdpa + DynamicCache"], row["Aaren + AarenCache"]
        print(f"{n:>7} | {ls:>11.3f} {la:>12.3f} {ls / la:>6.2f} | {bs:>15,} {ba:>14,} {bs / ba:>8.1f}")
        previous = n
    totals = {name: statistics.median(r.times[-1] - r.times[0] for r in recs) for name, recs in runs.items()}
    print("total generation time (first to last token): " + ", ".join(
        f"{name} {t:.2f} s" for name, t in totals.items()))
    if device.type == "cuda":
        print("torch.cuda.max_memory_allocated: " + ", ".join(
            f"{name} {max(p) / 2**20:.1f} MiB" for name, p in peaks.items()))


if __name__ == "__main__":
    main()
