"""Pure-PyTorch implementations, for checking results and as benchmark baselines."""
import torch
from torch import Tensor


def hillis_steele_scan(scores: Tensor, values: Tensor) -> Tensor:
    """The scan a user would write in plain PyTorch: log2(N) rounds of the (lse, out)
    combine operator, each over the whole sequence (O(N D log N) work).

    scores [B, N, H], values [B, N, H, D] -> out [B, N, H, D], from the empty state.
    """
    acc = torch.float64 if values.dtype == torch.float64 else torch.float32
    lse = scores.to(acc).unsqueeze(-1)  # [B, N, H, 1]
    out = torch.where(lse == float("-inf"), 0.0, values.to(acc))  # a masked token alone: 0
    n = values.size(1)
    offset = 1
    while offset < n:
        earlier_lse, earlier_out = lse[:, :-offset], out[:, :-offset]
        later_lse, later_out = lse[:, offset:], out[:, offset:]
        merged = torch.logaddexp(earlier_lse, later_lse)
        # exp(-inf - -inf) is NaN: an empty side weighs 0.
        w_earlier = torch.where(earlier_lse == float("-inf"), 0.0, torch.exp(earlier_lse - merged))
        w_later = torch.where(later_lse == float("-inf"), 0.0, torch.exp(later_lse - merged))
        lse = torch.cat([lse[:, :offset], merged], dim=1)
        out = torch.cat([out[:, :offset], w_earlier * earlier_out + w_later * later_out], dim=1)
        offset *= 2
    return out.to(values.dtype)
