"""A Transformer with a KV cache, written the way users write it, as a baseline for Aaren:
the same width, depth, heads and layer structure as an `aaren.AarenEncoder`, causal
self-attention through `scaled_dot_product_attention`, and a key/value cache for streaming.
Used by benchmarks/bench_streaming.py and examples/classify_timeseries.py (docs/results.md).
`remove_attention` makes the ablation of the quality benchmarks: the Transformer stack with
every attention's output replaced by zeros.
"""
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .modules import AarenEncoder, AarenEncoderLayer


class KVCache:
    """One layer's keys and values, [B, H, n, head_dim] each.

    mode "prealloc": a preallocated buffer whose capacity doubles when full (amortized O(1)
    per token, like std::vector); `append` returns views of the filled part.
    mode "cat": `torch.cat` of the new token onto the cache, as users commonly write it
    (copies the whole cache at every token).
    """

    def __init__(self, mode: str = "prealloc", capacity: int = 256) -> None:
        if mode not in ("prealloc", "cat"):
            raise ValueError(f"KVCache mode must be 'prealloc' or 'cat', got {mode!r}")
        self.mode = mode
        self.initial_capacity = capacity
        self.k: Optional[Tensor] = None
        self.v: Optional[Tensor] = None
        self.length = 0

    def append(self, k: Tensor, v: Tensor) -> Tuple[Tensor, Tensor]:
        t = k.size(2)
        if self.mode == "cat":
            if self.k is None:
                self.k, self.v = k.contiguous(), v.contiguous()
            else:
                self.k = torch.cat([self.k, k], dim=2)
                self.v = torch.cat([self.v, v], dim=2)
            self.length += t
            return self.k, self.v
        need = self.length + t
        capacity = 0 if self.k is None else self.k.size(2)
        if need > capacity:
            new_capacity = max(self.initial_capacity, capacity)
            while new_capacity < need:
                new_capacity *= 2
            shape = (k.size(0), k.size(1), new_capacity, k.size(3))
            new_k = torch.empty(shape, dtype=k.dtype, device=k.device)
            new_v = torch.empty(shape, dtype=v.dtype, device=v.device)
            if self.length:
                new_k[:, :, :self.length].copy_(self.k[:, :, :self.length])
                new_v[:, :, :self.length].copy_(self.v[:, :, :self.length])
            self.k, self.v = new_k, new_v
        self.k[:, :, self.length:need].copy_(k)
        self.v[:, :, self.length:need].copy_(v)
        self.length = need
        return self.k[:, :, :need], self.v[:, :, :need]

    def used_bytes(self) -> int:
        """Bytes of the keys and values of the tokens seen."""
        if self.k is None:
            return 0
        per_token = self.k[:, :, :1].numel() * self.k.element_size()
        return 2 * self.length * per_token

    def allocated_bytes(self) -> int:
        """Bytes of the cache tensors as allocated (capacity included)."""
        if self.k is None:
            return 0
        return (self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size())


class CausalSelfAttention(nn.Module):
    """Causal multi-head self-attention written the way users write it: a fused q/k/v
    projection, `F.scaled_dot_product_attention` (is_causal=True over a sequence; the one
    new query against the whole cache when streaming), an output projection."""

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.head_dim = embed_dim // num_heads
        self.dropout = dropout
        self.qkv = nn.Linear(embed_dim, 3 * embed_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """As nn.MultiheadAttention: Xavier-uniform fused in-projection, zero biases."""
        nn.init.xavier_uniform_(self.qkv.weight)
        self.out_proj.reset_parameters()
        for linear in (self.qkv, self.out_proj):
            if linear.bias is not None:
                nn.init.zeros_(linear.bias)

    def forward(self, x: Tensor) -> Tensor:
        """x [B, N, E] -> [B, N, E]; token k attends to tokens 1..k."""
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(y.transpose(1, 2).reshape(b, n, self.embed_dim))

    def step(self, x: Tensor, cache: KVCache) -> Tensor:
        """One token x [B, E]; appends its key and value to `cache`."""
        b = x.size(0)
        q, k, v = self.qkv(x).view(b, 3, self.num_heads, 1, self.head_dim).unbind(1)
        keys, values = cache.append(k, v)  # [B, H, n, hd]: every token so far, this one too
        y = F.scaled_dot_product_attention(q, keys, values)  # no mask: all of them are visible
        return self.out_proj(y.reshape(b, self.embed_dim))


class TransformerLayer(nn.Module):
    """The layer of `aaren.AarenEncoderLayer` (norm_first=True) with attention instead of
    Aaren: x + attn(norm1(x)), then + ff(norm2(x))."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float = 0.0,
                 activation: str = "gelu"):
        super().__init__()
        self.self_attn = CausalSelfAttention(d_model, nhead, dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.activation = F.gelu if activation == "gelu" else F.relu

    def _ff(self, x: Tensor) -> Tensor:
        return self.dropout2(self.linear2(self.dropout(self.activation(self.linear1(x)))))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.dropout1(self.self_attn(self.norm1(x)))
        return x + self._ff(self.norm2(x))

    def step(self, x: Tensor, cache: KVCache) -> Tensor:
        x = x + self.dropout1(self.self_attn.step(self.norm1(x), cache))
        return x + self._ff(self.norm2(x))


class KVCacheTransformer(nn.Module):
    """A causal Transformer encoder stack (pre-norm layers, final LayerNorm), batch first,
    with `forward` over a sequence and `step` over one token with per-layer KV caches."""

    def __init__(self, d_model: int, nhead: int, num_layers: int, dim_feedforward: int,
                 dropout: float = 0.0, activation: str = "gelu"):
        super().__init__()
        self.layers = nn.ModuleList([TransformerLayer(d_model, nhead, dim_feedforward, dropout,
                                                      activation) for _ in range(num_layers)])
        self.norm = nn.LayerNorm(d_model)

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)

    def new_state(self, mode: str = "prealloc") -> List[KVCache]:
        return [KVCache(mode) for _ in self.layers]

    def step(self, x: Tensor, caches: Optional[List[KVCache]] = None
             ) -> Tuple[Tensor, List[KVCache]]:
        """One token x [B, E] -> (y [B, E], caches); the caches grow by one token."""
        if caches is None:
            caches = self.new_state()
        for layer, cache in zip(self.layers, caches):
            x = layer.step(x, cache)
        return self.norm(x), caches


class ZeroAttention(nn.Module):
    """The ablation's attention: no parameters, and an output of zeros of its input's shape,
    so that a pre-norm layer becomes x + 0, then + ff(norm2(x)): each token's output then
    depends on that token alone (no sequence mixing). `step` ignores its cache."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.zeros_like(x)

    def step(self, x: Tensor, cache: Optional[KVCache] = None) -> Tensor:
        return torch.zeros_like(x)


def remove_attention(stack: KVCacheTransformer) -> KVCacheTransformer:
    """The ablation, in place: every layer's `self_attn` of a `KVCacheTransformer` becomes a
    `ZeroAttention`. The norms, feed-forward blocks, residuals, dropout and final LayerNorm,
    and their parameters (initialization included), are those of `stack`; only the attention's
    4 E^2 + 4 E parameters per layer are gone. Returns `stack`."""
    if not isinstance(stack, KVCacheTransformer):
        raise TypeError(f"remove_attention takes a KVCacheTransformer, got {type(stack).__name__}")
    for layer in stack.layers:
        layer.self_attn = ZeroAttention()
    return stack


def aaren_ffn_width(d_model: int, dim_feedforward: int) -> int:
    """Feed-forward width that gives an Aaren layer the parameters of a Transformer layer.

    Per layer, attention has 4 E^2 + 4 E parameters (W_q, W_k, W_v, W_o and biases) and
    Aaren 3 E^2 + 3 E + E (W_k, W_v, W_o, biases, one learned query per head): E^2 fewer.
    Each unit of feed-forward width adds 2 E + 1 parameters, so Aaren gets
    round(E^2 / (2 E + 1)) more (about E / 2): the counts then differ by less than E.
    """
    return dim_feedforward + round(d_model * d_model / (2 * d_model + 1))


def build_stacks(d_model: int = 64, nhead: int = 4, num_layers: int = 2,
                 dim_feedforward: Optional[int] = None, dropout: float = 0.0,
                 activation: str = "gelu", match_params: bool = True
                 ) -> Tuple[nn.Module, KVCacheTransformer, Dict[str, int]]:
    """The two stacks compared everywhere in docs/results.md: an `aaren.AarenEncoder` and a
    `KVCacheTransformer` of the same width, depth, heads, layer structure (pre-norm,
    final LayerNorm, GELU feed-forward) and parameter count (with match_params, by giving
    Aaren's feed-forward `aaren_ffn_width` units; otherwise the same width and Aaren has
    E^2 fewer parameters per layer). Returns (aaren, transformer, info)."""
    ff = 4 * d_model if dim_feedforward is None else dim_feedforward
    ff_aaren = aaren_ffn_width(d_model, ff) if match_params else ff
    layer = AarenEncoderLayer(d_model, nhead, dim_feedforward=ff_aaren, dropout=dropout,
                                    activation=activation, batch_first=True, norm_first=True)
    aaren_stack = AarenEncoder(layer, num_layers, norm=nn.LayerNorm(d_model))
    # deepcopy'd layers start identical (as in nn.TransformerEncoder); give each its own init
    for lyr in aaren_stack.layers:
        lyr.self_attn.reset_parameters()
        lyr.linear1.reset_parameters()
        lyr.linear2.reset_parameters()
    transformer = KVCacheTransformer(d_model, nhead, num_layers, ff, dropout, activation)
    info = {
        "d_model": d_model, "nhead": nhead, "num_layers": num_layers,
        "ffn_transformer": ff, "ffn_aaren": ff_aaren,
        "params_aaren": sum(p.numel() for p in aaren_stack.parameters()),
        "params_transformer": sum(p.numel() for p in transformer.parameters()),
    }
    return aaren_stack, transformer, info


def state_bytes(state) -> Tuple[int, int]:
    """(bytes in use, bytes allocated) of a model's inference state."""
    if state is None:
        return 0, 0
    if isinstance(state[0], KVCache):
        return sum(c.used_bytes() for c in state), sum(c.allocated_bytes() for c in state)
    total = sum(t.numel() * t.element_size() for layer_state in state for t in layer_state)
    return total, total
