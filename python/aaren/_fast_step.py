"""The one-token step's inference fast paths (docs/modules.md, "Streaming"): the stacked
score/value projection of `Aaren.step` cached between calls, and
`AarenEncoder.compile_step`; kept apart from modules.py, which holds the layers themselves.
"""
from typing import Callable, List, Optional, Tuple

import torch
from torch import Tensor

from .functional import State, _check_token

_CACHE = "_step_cache"  # the attribute, in the module's __dict__ (not a buffer: no state dict)


def stamps(tensors) -> List[Tuple[int, int]]:
    """(version counter, storage address) of each tensor (None -> (0, 0)): what changes
    when a parameter is written in place or given new data."""
    return [(0, 0) if t is None else (t._version, t.data_ptr()) for t in tensors]


def drop_step_cache(attention) -> None:
    attention.__dict__.pop(_CACHE, None)


def without_step_cache(state: dict) -> dict:
    """A module's pickled state (``__getstate__``) without the cache."""
    state = dict(state)
    state.pop(_CACHE, None)
    return state


def cached_step_projection(attention) -> Tuple[Tensor, Optional[Tensor]]:
    """``attention._step_projection()``, kept between ``step`` calls while nothing can go
    stale.

    Used only in eval mode with autograd off (``torch.no_grad`` / ``torch.inference_mode``),
    outside tracing and compilation (a compiled graph computes the projection itself). The
    cache holds the source parameters (``query``, ``k_proj``'s and ``v_proj``'s weights and
    biases) and is used only while each is the same object with the same version counter
    (bumped by every in-place write: optimizer steps, ``load_state_dict``'s copies) and
    storage address; it also holds detached references to their storages, so no other
    tensor can take over an address while it lives. ``Aaren._apply`` (``.to()``,
    ``.half()``, ...), ``load_state_dict`` and ``train()``/``eval()`` drop it. Writes
    through ``.data`` bypass version counters (as they bypass autograd): after those, call
    ``eval()`` again. Parameters without a version counter (created under
    ``torch.inference_mode``) are never cached.
    (Hand-written: PyTorch has no facility for memoizing a function of parameters.)
    """
    if attention.training or torch.is_grad_enabled() or torch.jit.is_tracing() or \
            torch.compiler.is_compiling():
        return attention._step_projection()
    # The registries themselves: nn.Module.__getattr__ costs about 1 us a lookup, more than
    # the rest of the check. A parameter that is not a plain entry there (a
    # parametrization, a wrapped projection) is never cached.
    k_params = attention._modules["k_proj"]._parameters
    v_params = attention._modules["v_proj"]._parameters
    try:
        sources = (attention._parameters["query"], k_params["weight"], k_params["bias"],
                   v_params["weight"], v_params["bias"])
    except KeyError:
        drop_step_cache(attention)
        return attention._step_projection()
    cache = attention.__dict__.get(_CACHE)
    if cache is not None:
        held, held_stamps, _, weight, bias = cache
        if all(p is h for p, h in zip(sources, held)) and stamps(sources) == held_stamps:
            return weight, bias
    weight, bias = attention._step_projection()
    if any(p is not None and p.is_inference() for p in sources):
        drop_step_cache(attention)
        return weight, bias
    storages = [p.detach() for p in sources if p is not None]
    attention.__dict__[_CACHE] = (sources, stamps(sources), storages, weight, bias)
    return weight, bias


def compile_step(encoder, **compile_options) -> Callable[..., Tuple[Tensor, List[State]]]:
    """``AarenEncoder.compile_step`` (its docstring says what it gives)."""
    compile_options.setdefault("fullgraph", True)

    def graph(x: Tensor, states: List[State]) -> Tuple[Tensor, List[State]]:
        return encoder.step(x, states)

    # Dynamo keeps its compiled graphs per code object, at most recompile_limit (8) of
    # them: compiling `encoder.step` itself would make every encoder, batch size and dtype
    # share AarenEncoder.step's 8, and past them fall back to eager (or fail, with
    # fullgraph). A copy of the code object gives this encoder a cache of its own.
    graph.__code__ = graph.__code__.replace()
    compiled = torch.compile(graph, **compile_options)

    # Looked up once: nn.Module attribute lookups cost about 1 us each, per token.
    width = encoder.layers[0].self_attn.embed_dim if encoder.num_layers else None

    def fast_step(x: Tensor, states: Optional[List[State]] = None) -> Tuple[Tensor, List[State]]:
        # Checked here: inside a fullgraph compilation a ValueError would surface as
        # Dynamo's "Unsupported: Observed exception" instead.
        encoder._check_states(states)
        _check_token(x, width, "AarenEncoder.step")
        if states is None:
            states = encoder.empty_states(x)
        return compiled(x, states)
    return fast_step
