"""Aaren's masks: boolean and additive float key padding masks against the float64 reference,
causal attention masks (bool, float with -inf or finite "masked" values in any float dtype,
2-D or per batch and head) accepted as what Aaren computes anyway, every mask that is not
causal rejected with a clear error, and the mask Hugging Face models build passing through a
converted nn.TransformerEncoder.
"""
import pytest
import torch
from torch import nn

from aaren import Aaren, convert
from module_reference import F64, MODULE_MARKS, _float_mask, close, randn, reference_aaren

pytestmark = MODULE_MARKS


# ------------------------------------------------------------------------- masks

@pytest.mark.parametrize("batch_first", [True, False])
def test_bool_key_padding_mask(device, batch_first):
    attn = Aaren(8, 2, batch_first=batch_first, device=device, dtype=F64)
    x = randn(3, 6, 8, device=device) if batch_first else randn(6, 3, 8, device=device)
    mask = torch.zeros(3, 6, dtype=torch.bool, device=device)
    mask[0, :3] = True   # fully masked prefix: output 0 before out_proj
    mask[1, 2] = True
    mask[2, 4:] = True   # right padding
    y, _ = attn(x, x, x, key_padding_mask=mask)
    assert torch.isfinite(y).all()
    close(y, reference_aaren(attn, x, key_padding_mask=mask))
    y_bf = y if batch_first else y.transpose(0, 1)
    close(y_bf[0, :3], attn.out_proj.bias.expand(3, 8))
    # -inf float mask == bool mask
    float_mask = torch.zeros(3, 6, dtype=F64, device=device).masked_fill(mask, float("-inf"))
    close(attn(x, x, x, key_padding_mask=float_mask)[0], y, atol=0, rtol=0)


def test_float_key_padding_mask_is_added_to_scores(device):
    attn = Aaren(8, 2, batch_first=True, device=device, dtype=F64)
    x = randn(2, 5, 8, device=device)
    mask = randn(2, 5, device=device) * 2
    y, _ = attn(x, x, x, key_padding_mask=mask)
    close(y, reference_aaren(attn, x, key_padding_mask=mask))
    assert (y - attn(x, x, x)[0]).abs().max() > 1e-3


def test_bad_key_padding_masks(device):
    attn = Aaren(8, 2, batch_first=True, device=device)
    x = torch.randn(2, 5, 8, device=device)
    with pytest.raises(ValueError, match="key_padding_mask"):
        attn(x, x, x, key_padding_mask=torch.zeros(2, 4, dtype=torch.bool, device=device))
    with pytest.raises(TypeError, match="key_padding_mask"):
        attn(x, x, x, key_padding_mask=torch.zeros(2, 5, dtype=torch.int64, device=device))


def test_causal_attn_mask_is_accepted(device):
    attn = Aaren(8, 2, batch_first=True, device=device, dtype=F64)
    x = randn(3, 5, 8, device=device)
    y, _ = attn(x, x, x)
    bool_causal = torch.ones(5, 5, dtype=torch.bool, device=device).triu(1)
    float_causal = nn.Transformer.generate_square_subsequent_mask(5, device=device, dtype=F64)
    for mask in (bool_causal, float_causal, float_causal.float(),
                 bool_causal.expand(3 * 2, 5, 5)):
        for is_causal in (False, True):
            close(attn(x, x, x, attn_mask=mask, is_causal=is_causal)[0], y, atol=0, rtol=0)
    close(attn(x, x, x, is_causal=True)[0], y, atol=0, rtol=0)


def test_other_attn_masks_raise(device):
    attn = Aaren(8, 2, batch_first=True, device=device, dtype=F64)
    x = randn(2, 5, 8, device=device)
    causal = torch.ones(5, 5, dtype=torch.bool, device=device).triu(1)
    extra = causal.clone()
    extra[3, 1] = True
    not_causal = [
        torch.zeros(5, 5, device=device),                          # full attention
        extra,                                                     # more than causal
        torch.zeros(5, 5, dtype=torch.bool, device=device),        # full attention, bool
        torch.ones(5, 6, dtype=torch.bool, device=device).triu(1),  # wrong shape
        causal.T.contiguous(),                                     # anti-causal
    ]
    for mask in not_causal:
        with pytest.raises(ValueError, match="causal by construction"):
            attn(x, x, x, attn_mask=mask, is_causal=True)
    with pytest.raises(TypeError, match="attn_mask"):
        attn(x, x, x, attn_mask=causal.to(torch.int64))


MASK_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
MASKED_VALUES = {  # how code writes "masked" in a float attention mask
    "-inf": lambda dtype: float("-inf"),
    "-1e9": lambda dtype: -1e9,                              # (-inf in float16)
    "finfo.min": lambda dtype: torch.finfo(dtype).min,       # Hugging Face; -65504 in float16
    "-1e4": lambda dtype: -1e4,                              # the threshold; -9984 in bfloat16
}


@pytest.mark.parametrize("mask_dtype", MASK_DTYPES, ids=str)
@pytest.mark.parametrize("masked", list(MASKED_VALUES))
def test_float_causal_masks_with_finite_masked_values_are_accepted(device, mask_dtype, masked):
    """A float mask that is 0 on and below the diagonal and -inf or <= -1e4 above it is the
    causal mask, in any float dtype: 2-D and [B * H, N, N]."""
    attn = Aaren(8, 2, batch_first=True, device=device, dtype=F64)
    x = randn(3, 5, 8, device=device)
    y, _ = attn(x, x, x)
    causal = torch.ones(5, 5, dtype=torch.bool, device=device).triu(1)
    mask = _float_mask(causal, MASKED_VALUES[masked](mask_dtype), mask_dtype)
    mixed = mask.clone()
    mixed[0, 4] = float("-inf")  # -inf and finite masked values together
    for m in (mask, mask.expand(3 * 2, 5, 5), mask.repeat(3 * 2, 1, 1), mixed):
        for is_causal in (False, True):
            close(attn(x, x, x, attn_mask=m, is_causal=is_causal)[0], y, atol=0, rtol=0)


@pytest.mark.parametrize("mask_dtype", MASK_DTYPES, ids=str)
def test_float_masks_that_are_not_causal_raise(device, mask_dtype):
    attn = Aaren(8, 2, batch_first=True, device=device, dtype=F64)
    x = randn(3, 5, 8, device=device)
    causal = torch.ones(5, 5, dtype=torch.bool, device=device).triu(1)
    good = _float_mask(causal, -1e9, mask_dtype)

    def edit(mask, i, j, value):
        mask = mask.clone()
        mask[..., i, j] = value
        return mask

    one_slice = good.repeat(3 * 2, 1, 1)
    one_slice[4, 1, 3] = 0.0
    not_causal = {
        "0 above the diagonal somewhere": edit(good, 1, 3, 0.0),
        "masked on the diagonal": edit(good, 2, 2, -1e9),
        "masked below the diagonal": edit(good, 3, 1, float("-inf")),
        "a bias below the diagonal": edit(good, 3, 1, 0.5),
        "a bias on the diagonal": edit(good, 0, 0, -0.25),
        "a small negative above (a bias)": _float_mask(causal, -1.0, mask_dtype),
        "a negative above, short of -1e4": _float_mask(causal, -9000.0, mask_dtype),
        "+inf above": _float_mask(causal, float("inf"), mask_dtype),
        "NaN above": _float_mask(causal, float("nan"), mask_dtype),
        "NaN below": edit(good, 4, 0, float("nan")),
        "anti-causal": good.T.contiguous(),
        "one [B * H, N, N] slice not causal": one_slice,
        "full attention": torch.zeros(5, 5, dtype=mask_dtype, device=device),
    }
    for what, mask in not_causal.items():
        for is_causal in (False, True):
            with pytest.raises(ValueError, match="causal by construction"):
                attn(x, x, x, attn_mask=mask, is_causal=is_causal)
                pytest.fail(what)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_hugging_face_style_mask_through_a_converted_encoder(device, dtype):
    """The mask Hugging Face models build (finfo(dtype).min above the diagonal, in the
    model's dtype) passes through nn.TransformerEncoder into the converted Aaren layers."""
    encoder = convert(nn.TransformerEncoder(
        nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True, device=device,
                                   dtype=dtype), 2)).eval()
    x = torch.randn(2, 6, 8, device=device, dtype=dtype)
    causal = torch.ones(6, 6, dtype=torch.bool, device=device).triu(1)
    mask = _float_mask(causal, torch.finfo(dtype).min, dtype)
    with torch.no_grad():
        y = encoder(x)
        for is_causal in (None, True):
            close(encoder(x, mask=mask, is_causal=is_causal), y, atol=0, rtol=0)
        with pytest.raises(ValueError, match="causal by construction"):
            encoder(x, mask=_float_mask(causal, -1.0, dtype))


def test_causal_attn_mask_on_meta_is_accepted():
    """Found by fuzzing: a module on Meta (shape inference) with a causal mask raised
    'Tensor.item() cannot be called on meta tensors'; its values cannot be checked there."""
    attn = Aaren(8, 2, batch_first=True, device="meta")
    x = torch.empty(2, 5, 8, device="meta")
    for mask in (torch.ones(5, 5, dtype=torch.bool, device="meta").triu(1),
                 torch.zeros(5, 5, device="meta")):
        y, _ = attn(x, x, x, attn_mask=mask)
        assert y.shape == x.shape and y.device.type == "meta"
    with pytest.raises(ValueError, match="attn_mask"):  # the shape is still checked
        attn(x, x, x, attn_mask=torch.zeros(4, 4, device="meta"))


def test_key_padding_mask_on_another_device_is_named():
    attn = Aaren(8, 2, batch_first=True)
    x = torch.randn(2, 5, 8)
    with pytest.raises(ValueError, match=r"key_padding_mask must be on the input's device \(cpu\), got meta"):
        attn(x, x, x, key_padding_mask=torch.zeros(2, 5, dtype=torch.bool, device="meta"))
