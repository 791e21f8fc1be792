"""Swap a Transformer's attention for Aaren, train it, then run it as an RNN.

1. Build a small model around a stock `nn.TransformerEncoder`.
2. `aaren.convert` replaces its self-attention by `aaren.Aaren` (causal, one learned query
   per head, computed by a parallel scan).
3. Train it for a few seconds on a synthetic sequence task: after each token of a random
   stream, name the token seen most often so far (ties: the smallest).
4. Stream a new sequence token by token with `step` (constant memory per layer: the state
   never grows), after a `prefill` of a prompt, and check that it gives exactly what the
   parallel forward gives.

Run: python examples/train_and_stream.py   (CPU, well under a minute)
"""
import time

import torch
import torch.nn.functional as F
from torch import nn

import aaren

VOCAB, D_MODEL, HEADS, LAYERS, LENGTH = 5, 32, 4, 2, 16
TRAIN_SECONDS = 6.0


def batch_of_sequences(batch_size: int, length: int = LENGTH):
    tokens = torch.randint(VOCAB, (batch_size, length))
    counts = F.one_hot(tokens, VOCAB).cumsum(dim=1)  # occurrences of each token so far
    return tokens, counts.argmax(dim=-1)  # the most frequent token so far


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D_MODEL)
        layer = nn.TransformerEncoderLayer(D_MODEL, HEADS, dim_feedforward=4 * D_MODEL,
                                           dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, LAYERS, enable_nested_tensor=False)
        self.head = nn.Linear(D_MODEL, VOCAB)

    def forward(self, tokens):
        return self.head(self.encoder(self.embed(tokens)))


def main():
    torch.manual_seed(0)
    torch.set_num_threads(1)  # a tiny model: threads would only add overhead

    model = Model()
    aaren.convert(model)
    print(f"converted: {model.aaren_converted}")
    print(f"parameters: {sum(p.numel() for p in model.parameters())}")

    # --- train (the parallel scan) ---------------------------------------------------
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    start, step, losses = time.time(), 0, []
    while time.time() - start < TRAIN_SECONDS:
        tokens, labels = batch_of_sequences(32)
        loss = F.cross_entropy(model(tokens).flatten(0, 1), labels.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        step += 1
        if step % 100 == 0:
            print(f"step {step:4d}  loss {sum(losses[-100:]) / 100:.3f}")
    print(f"trained {step} steps in {time.time() - start:.1f} s: loss "
          f"{sum(losses[:20]) / 20:.3f} -> {sum(losses[-20:]) / 20:.3f}")

    model.eval()
    tokens, labels = batch_of_sequences(256)
    with torch.no_grad():
        accuracy = (model(tokens).argmax(-1) == labels).float().mean().item()
    print(f"eval accuracy (parallel forward): {accuracy:.1%}")

    # --- stream (the RNN form) -------------------------------------------------------
    # The trained nn.TransformerEncoder, as an AarenEncoder (same weights) with step/prefill.
    stream = aaren.AarenEncoder.from_transformer_encoder(model.encoder).eval()
    tokens, labels = batch_of_sequences(1, 24)
    prompt = 8
    outputs = []
    with torch.no_grad():
        hidden, states = stream.prefill(model.embed(tokens[:, :prompt]))  # prompt in parallel
        outputs.append(hidden)
        for t in range(prompt, tokens.size(1)):  # then one token at a time
            hidden, states = stream.step(model.embed(tokens[:, t]), states)
            outputs.append(hidden.unsqueeze(1))
        streamed = torch.cat(outputs, dim=1)
        parallel = model.encoder(model.embed(tokens))
    difference = (streamed - parallel).abs().max().item()
    assert difference < 1e-5, difference
    print(f"streamed == parallel forward (max difference {difference:.1e})")

    predictions = model.head(streamed).argmax(-1)[0].tolist()
    print("token:     " + " ".join(str(t) for t in tokens[0].tolist()))
    print("answer:    " + " ".join(str(t) for t in labels[0].tolist()))
    print("streamed:  " + " ".join(str(t) for t in predictions))
    state_bytes = sum(t.numel() * t.element_size() for state in states for t in state)
    print(f"state after {tokens.size(1)} tokens: {len(states)} layers x (lse {tuple(states[0][0].shape)}, "
          f"out {tuple(states[0][1].shape)}) = {state_bytes} bytes, whatever the length")


if __name__ == "__main__":
    main()
