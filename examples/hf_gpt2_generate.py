"""Aaren inside a Hugging Face GPT-2: convert, train briefly, generate in constant memory.

1. Build a small GPT-2-style `GPT2LMHeadModel` from a config (bytes as tokens: no tokenizer
   or weights to download) and convert it with `aaren.hf.convert`: each `GPT2Attention`
   becomes Aaren (its key, value and output projections kept, one learned query per head).
2. Train it with the usual Hugging Face loop (`model(ids, labels=ids).loss`, AdamW) on real
   English text that ships with Python: the help topics of `pydoc_data.topics`. The loss on
   held-out text is printed before and after.
3. Generate with `model.generate(..., past_key_values=aaren.hf.AarenCache(config))`: one
   `(lse, out)` state per layer. Its size is printed against the `DynamicCache` of the same
   model left unconverted, after the same number of tokens.

Run: python examples/hf_gpt2_generate.py          (CPU: 3 minutes on a 2-core machine, several
                                                   times that while other jobs load it)
     python examples/hf_gpt2_generate.py --smoke  (seconds: a few steps, a few tokens)
"""
import argparse
import copy
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from pydoc_data.topics import topics  # English text shipped with CPython
from transformers import DynamicCache, GPT2Config, GPT2LMHeadModel

import aaren.hf

CONTEXT = 128


def text_bytes() -> torch.Tensor:
    text = "\n\n".join(topics[name] for name in sorted(topics))
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


def batches(data: torch.Tensor, batch: int, generator: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, data.numel() - CONTEXT, (batch,), generator=generator)
    return torch.stack([data[s:s + CONTEXT] for s in starts.tolist()])


@torch.no_grad()
def held_out_loss(model, data: torch.Tensor, rows: int) -> float:
    model.eval()
    ids = data[: (data.numel() // CONTEXT) * CONTEXT].view(-1, CONTEXT)[:rows]
    loss = model(ids, labels=ids).loss.item()
    model.train()
    return loss


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--new-tokens", type=int, default=400)
    parser.add_argument("--smoke", action="store_true", help="a few steps and tokens (a check)")
    args = parser.parse_args()
    batch, held_out_rows = 16, 32
    if args.smoke:
        args.steps, args.new_tokens, batch, held_out_rows = 2, 16, 2, 2
    torch.manual_seed(0)
    torch.set_num_threads(min(4, torch.get_num_threads()))

    data = text_bytes()
    split = int(0.95 * data.numel())
    train, held_out = data[:split], data[split:]
    config = GPT2Config(vocab_size=256, n_positions=CONTEXT + args.new_tokens + 64, n_embd=128,
                        n_layer=4, n_head=4, bos_token_id=None, eos_token_id=None)
    original = GPT2LMHeadModel(config)
    model = aaren.hf.convert(copy.deepcopy(original))
    print(f"converted: {', '.join(model.aaren_converted)}")
    print(f"parameters: GPT-2 {sum(p.numel() for p in original.parameters()):,}, "
          f"converted {sum(p.numel() for p in model.parameters()):,} (no query projections)")

    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    before = held_out_loss(model, held_out, held_out_rows)
    start = time.perf_counter()
    for step in range(args.steps):
        ids = batches(train, batch, generator)
        loss = model(ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  training loss {loss.item():.3f}")
    after = held_out_loss(model, held_out, held_out_rows)
    print(f"held-out loss (nats per byte): {before:.3f} before training, {after:.3f} after "
          f"{args.steps} steps ({time.perf_counter() - start:.0f} s)")
    if not args.smoke:
        assert after < before, "training did not reduce the held-out loss"

    model.eval()
    prompt = torch.tensor([list(b"The ")])
    cache = aaren.hf.AarenCache(model.config)
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                             do_sample=True, top_k=20, past_key_values=cache, pad_token_id=0)
        dynamic = DynamicCache(config=original.config)
        original.eval().generate(prompt, max_new_tokens=args.new_tokens,
                                 min_new_tokens=args.new_tokens, do_sample=False,
                                 past_key_values=dynamic, pad_token_id=0)
    print("sample:", bytes(out[0].tolist()).decode("utf-8", errors="replace")[:300].replace("\n", " "))
    tokens = cache.get_seq_length()
    print(f"after {tokens} tokens: Aaren state {cache.state_bytes():,} bytes "
          f"({len(cache.layers)} layers x (lse [1, 4] + out [1, 4, 32]), float64, whatever the length); "
          f"the unconverted model's DynamicCache {aaren.hf.cache_bytes(dynamic):,} bytes "
          f"(keys and values of every token, growing)")
    assert cache.state_bytes() == len(cache.layers) * (4 + 4 * 32) * 8


if __name__ == "__main__":
    main()
