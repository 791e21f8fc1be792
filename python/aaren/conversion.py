"""`convert(model)`: swaps every `nn.MultiheadAttention` used as self-attention in a model for
an `Aaren` that reuses its key, value and output projections (docs/modules.md,
"convert"). Above the layers (`modules`); `aaren.hf.convert` does the same for Hugging Face models.
"""
import logging
from typing import Iterable, List, Optional, Tuple

from torch import nn

from .modules import Aaren

__all__ = ["convert"]

_log = logging.getLogger("aaren")


def convert(model: nn.Module, names: Optional[Iterable[str]] = None) -> nn.Module:
    """Replaces ``nn.MultiheadAttention`` self-attention in ``model`` by ``Aaren``, in place.

    By default every ``nn.MultiheadAttention`` registered as ``self_attn`` (PyTorch's name
    for self-attention in ``nn.TransformerEncoderLayer`` / ``nn.TransformerDecoderLayer``,
    hence inside ``nn.TransformerEncoder``/``Decoder``/``Transformer``) is replaced; cross-
    attention (``multihead_attn`` of a decoder layer) and any other attention are left
    alone, since Aaren can only attend over its own input. For custom models, ``names``
    lists the qualified names of the modules to replace (each must be an
    ``nn.MultiheadAttention`` used as self-attention).

    Each ``Aaren`` has the embed_dim, num_heads, dropout, batch_first, dtype, device and
    training mode of the module it replaces and copies its key, value and output projections
    (``in_proj_weight[E:2E]``, ``[2E:3E]``, ``out_proj``), each with its source's
    ``requires_grad`` (the new query trains unless the whole module was frozen; see
    ``Aaren.from_multihead_attention``); the query projection is dropped and
    the learned queries are freshly initialized, so a converted model needs training (it is
    also causal now, which changes what a bidirectional encoder computes). Modules shared
    between several places stay shared. ``nn.TransformerEncoder``s whose layers now hold an
    ``Aaren`` get ``use_nested_tensor = False``.

    Returns ``model`` (or the new ``Aaren`` if ``model`` itself is an
    ``nn.MultiheadAttention``); the qualified names replaced are stored in its
    ``aaren_converted`` attribute (a list of str) and logged to the "aaren" logger.
    Raises ValueError for a module that cannot be converted (kdim/vdim != embed_dim,
    add_bias_kv, add_zero_attn) and for ``names`` that are not ``nn.MultiheadAttention``.
    """
    if isinstance(model, nn.MultiheadAttention):
        attn = Aaren.from_multihead_attention(model)
        attn.aaren_converted = [""]
        return attn
    wanted = None if names is None else set(names)
    targets: List[Tuple[nn.Module, str, str, nn.MultiheadAttention]] = []
    for parent_name, parent in model.named_modules():
        for child_name, child in parent._modules.items():  # every name, shared ones too
            if child is None:
                continue
            qualified = f"{parent_name}.{child_name}" if parent_name else child_name
            if wanted is None:
                if child_name == "self_attn" and isinstance(child, nn.MultiheadAttention):
                    targets.append((parent, child_name, qualified, child))
            elif qualified in wanted:
                if not isinstance(child, nn.MultiheadAttention):
                    raise ValueError(f"convert: {qualified} is a {type(child).__name__}, "
                                     f"not nn.MultiheadAttention")
                targets.append((parent, child_name, qualified, child))
    if wanted is not None:
        missing = wanted - {t[2] for t in targets}
        if missing:
            raise ValueError(f"convert: no modules named {sorted(missing)} in the model")
    converted = {}  # id(MultiheadAttention) -> Aaren: shared modules stay shared
    replaced: List[str] = []
    for _, _, qualified, mha in targets:  # check every module before changing any
        if id(mha) not in converted:
            converted[id(mha)] = Aaren.from_multihead_attention(mha)
    for parent, child_name, qualified, mha in targets:
        setattr(parent, child_name, converted[id(mha)])
        replaced.append(qualified)
    for module in model.modules():
        if isinstance(module, nn.TransformerEncoder) and any(
                isinstance(getattr(layer, "self_attn", None), Aaren) for layer in module.layers):
            module.use_nested_tensor = False
    previous = getattr(model, "aaren_converted", None)
    model.aaren_converted = (list(previous) if isinstance(previous, list) else []) + replaced
    if replaced:
        _log.info("aaren.convert replaced %d nn.MultiheadAttention: %s", len(replaced),
                  ", ".join(replaced))
    else:
        _log.warning("aaren.convert found no nn.MultiheadAttention used as self-attention")
    return model
