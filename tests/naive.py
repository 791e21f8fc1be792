"""An independent reference for the scan: a masked softmax over every prefix.

Deliberately the obvious O(N^2) computation, sharing no code with the package. Run in
float64 it is the reference every test compares with (`reference_scan`); run in the
inputs' own dtype it is what a user gets from plain PyTorch without aaren
(`naive_scan(..., dtype=values.dtype)`), whose error sets the tolerances (tolerance.py).

It is differentiable, with gradients that are never NaN: masked tokens (score -inf) and
prefixes where every token is masked get exactly zero gradient, like the operators.
"""
import torch


def naive_scan(scores, values, state=None, dtype=torch.float64):
    """(out [B,N,H,D], lse [B,N,H]) computed in `dtype`; `state` acts as a token before the first.

    Per prefix k: m = max_{i<=k} s_i (a constant: it cancels, so it carries no gradient),
    e_i = exp(s_i - m), out_k = sum e_i v_i / sum e_i, lse_k = m + log sum e_i. A prefix
    with every score -inf gives out 0 and lse -inf, formed without any -inf - -inf.
    """
    s = scores.to(dtype)
    v = values.to(dtype)
    if state is not None:
        s = torch.cat([state[0].to(dtype).unsqueeze(1), s], dim=1)
        v = torch.cat([state[1].to(dtype).unsqueeze(1), v], dim=1)
    n = s.size(1)
    if n == 0:
        return v.clone(), s.clone()  # no tokens: [B, 0, H, D] and [B, 0, H]
    later = torch.ones(n, n, dtype=torch.bool, device=s.device).triu(1)  # [k, i]: i > k
    logits = s.unsqueeze(1).expand(-1, n, -1, -1)  # [B, k, i, H]
    logits = logits.masked_fill(later[None, :, :, None], float("-inf"))
    m = logits.detach().amax(dim=2, keepdim=True)
    m = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    e = torch.exp(logits - m)  # exp(-inf - finite) = 0: masked and later tokens weigh 0
    denominator = e.sum(dim=2, keepdim=True)
    empty = denominator == 0  # every token so far masked
    denominator = torch.where(empty, torch.ones_like(denominator), denominator)
    out = torch.einsum("bkih,bihd->bkhd", e / denominator, v)
    lse = torch.where(empty, torch.full_like(m, float("-inf")), m + torch.log(denominator))
    lse = lse.squeeze(2)
    if state is not None:
        out, lse = out[:, 1:], lse[:, 1:]
    return out, lse


def reference_scan(scores, values, state=None):
    """Returns (out [B,N,H,D], lse [B,N,H]) in float64; `state` acts as a token before the first."""
    return naive_scan(scores, values, state, dtype=torch.float64)


def reference_scan_in_dtype(scores, values, state=None):
    """The output of the same computation done by plain PyTorch in the values' own dtype:
    the error this has against float64 is what a user gets without aaren."""
    return naive_scan(scores, values, state, dtype=values.dtype)[0]
