"""An independent reference for the scan: a masked softmax over every prefix, in float64.

Deliberately the obvious O(N^2) computation, sharing no code with the package.
"""
import torch


def reference_scan(scores, values, state=None):
    """Returns (out [B,N,H,D], lse [B,N,H]) in float64; `state` acts as a token before the first."""
    s = scores.to(torch.float64)
    v = values.to(torch.float64)
    if state is not None:
        s = torch.cat([state[0].to(torch.float64).unsqueeze(1), s], dim=1)
        v = torch.cat([state[1].to(torch.float64).unsqueeze(1), v], dim=1)
    n = s.size(1)
    later = torch.ones(n, n, dtype=torch.bool, device=s.device).triu(1)  # [k, i]: i > k
    logits = s.unsqueeze(1).expand(-1, n, -1, -1)  # [B, k, i, H]
    logits = logits.masked_fill(later[None, :, :, None], float("-inf"))
    lse = torch.logsumexp(logits, dim=2)  # [B, k, H]
    weights = torch.exp(logits - lse.unsqueeze(2))
    weights = torch.where(torch.isneginf(lse).unsqueeze(2), 0.0, weights)  # all masked: output 0
    out = torch.einsum("bkih,bihd->bkhd", weights, v)
    if state is not None:
        out, lse = out[:, 1:], lse[:, 1:]
    return out, lse


def reference_scan_in_dtype(scores, values):
    """The same computation done by plain PyTorch in the inputs' own dtype: the error this
    has against float64 is what a user gets without aaren, and sets the tolerances."""
    n = scores.size(1)
    later = torch.ones(n, n, dtype=torch.bool, device=scores.device).triu(1)
    logits = scores.unsqueeze(1).expand(-1, n, -1, -1).masked_fill(later[None, :, :, None], float("-inf"))
    weights = torch.softmax(logits, dim=2)
    return torch.einsum("bkih,bihd->bkhd", weights, values)
