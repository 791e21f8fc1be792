"""Aaren on the edge: an exported model as an ExecuTorch program, run by a C++ runner that
links no libtorch (docs/edge.md).

`export(model, path)` writes a `.pte` program with three methods over one batch row:

- ``prefill``: a chunk of 1 <= T <= ``max_prefill`` tokens through the parallel scan, from the
  current state: for an encoder ``x [1, T, E] float32 -> y [1, T, E]``, for a causal language
  model ``ids [1, T] int64 -> logits [1, V]`` (the last token's);
- ``step``: one token, ``x [1, E] -> y [1, E]`` or ``ids [1, 1] -> logits [1, V]``;
- ``reset() -> [1]``: back to the empty state (what a loaded program starts from).

The state lives inside the program, in mutable buffers that the three methods share (as
ExecuTorch's LLM export keeps its KV cache): one ``(lse [1, H], out [1, H, D])`` pair per layer,
float64 as in the LibTorch path (docs/design.md, "The state"). Inside, a device app calls
prefill/step with tokens only, and the program cannot be handed a state of the wrong shape,
dtype or layer; the state's bytes are fixed at export, whatever the number of tokens. The
Linear layers are delegated to XNNPACK (float32); the aaren operators run as ExecuTorch
kernels of this project (``csrc/edge/kernels.cpp``, the same ``combine.h`` arithmetic as the
CPU kernels), which ``aaren_runner`` links (``scripts/run.sh edge`` builds it).

Model kinds: an `aaren.AarenEncoder`; an ``nn.TransformerEncoder`` converted by
`aaren.convert` (exported as `AarenEncoder.from_transformer_encoder` of it, the same weights);
a Hugging Face causal language model converted by `aaren.hf.convert` (the program also keeps
the number of tokens seen, for positions: a model with learned absolute positions, GPT-2's,
stops at its ``n_positions``).

Needs the ``executorch`` package (``pip install --no-build-isolation '.[edge]'`` in a checkout,
or ``scripts/run.sh edge``, which installs only what export uses). This module imports without it; `export` raises an
ImportError that names the install.
"""
import copy
import functools
import os
import sys
import warnings
from typing import Dict, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .functional import State, empty_state
from .modules import Aaren, AarenEncoder

__all__ = ["export", "EXECUTORCH_VERSION", "register_out_variants"]

# The version the project tests; docs/edge.md says how it installs.
EXECUTORCH_VERSION = "1.5.1"
_INSTALL_HINT = (f"in an aaren checkout, pip install --no-build-isolation '.[edge]' "
                 f"(executorch=={EXECUTORCH_VERSION}), or scripts/run.sh edge")


def _executorch():
    """The executorch modules export needs, or an ImportError naming the install."""
    try:
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.exir import (EdgeCompileConfig, ExecutorchBackendConfig,
                                     to_edge_transform_and_lower)
        from executorch.exir.passes import MemoryPlanningPass
        from executorch.exir.passes.constant_prop_pass import constant_prop_pass
        from executorch.exir.passes.init_mutable_pass import InitializedMutableBufferPass
    except ImportError as error:
        raise ImportError(f"aaren.edge needs the executorch package: {_INSTALL_HINT}") from error
    return dict(XnnpackPartitioner=XnnpackPartitioner, EdgeCompileConfig=EdgeCompileConfig,
                ExecutorchBackendConfig=ExecutorchBackendConfig,
                to_edge_transform_and_lower=to_edge_transform_and_lower,
                MemoryPlanningPass=MemoryPlanningPass, constant_prop_pass=constant_prop_pass,
                InitializedMutableBufferPass=InitializedMutableBufferPass)


# ---- the operators' out variants ----------------------------------------------------------
# The ExecuTorch runtime runs out variants only: `to_executorch` swaps each functional
# operator for the overload of the same name whose arguments are the functional's (defaults
# included) plus keyword-only outputs. Defined here, at export time, rather than in the
# operator library: only export needs them. The runtime's kernels are csrc/edge/kernels.cpp.
_OUT_SCHEMAS = {
    "scan_forward.out": (
        "scan_forward.out(Tensor scores, Tensor values, Tensor? state_lse=None, "
        "Tensor? state_out=None, *, Tensor(a!) out, Tensor(b!) lse, Tensor(c!) final_out) "
        "-> (Tensor(a!), Tensor(b!), Tensor(c!))"),
    "step.out": (
        "step.out(Tensor score, Tensor value, Tensor? state_lse=None, Tensor? state_out=None, "
        "*, Tensor(a!) out, Tensor(b!) lse, Tensor(c!) new_state_out) "
        "-> (Tensor(a!), Tensor(b!), Tensor(c!))"),
}
_out_library: Optional[torch.library.Library] = None


def _into(results: Tuple[Tensor, ...], outs: Tuple[Tensor, ...]) -> Tuple[Tensor, ...]:
    for result, out in zip(results, outs):
        out.resize_(result.shape).copy_(result)
    return outs


def register_out_variants() -> None:
    """Defines ``aaren::scan_forward.out`` and ``aaren::step.out`` (idempotent; `export`
    calls it). Eager calls compute with the functional operator and copy into the outputs."""
    global _out_library
    if _out_library is not None:
        return
    library = torch.library.Library("aaren", "FRAGMENT")
    for schema in _OUT_SCHEMAS.values():
        library.define(schema)

    def scan_forward_out(scores, values, state_lse=None, state_out=None, *, out, lse, final_out):
        return _into(torch.ops.aaren.scan_forward(scores, values, state_lse, state_out),
                     (out, lse, final_out))

    def step_out(score, value, state_lse=None, state_out=None, *, out, lse, new_state_out):
        return _into(torch.ops.aaren.step(score, value, state_lse, state_out),
                     (out, lse, new_state_out))

    library.impl("scan_forward.out", scan_forward_out, "CompositeExplicitAutograd")
    library.impl("step.out", step_out, "CompositeExplicitAutograd")
    _out_library = library


def _attention_step_as_calls(x, proj_weight, proj_bias, out_weight, out_bias, num_heads,
                             state_lse=None, state_out=None):
    """``aaren::attention_step`` as its three calls (what it runs in C++: docs/operators.md),
    so that its two products reach XNNPACK instead of staying inside one custom operator."""
    projected = F.linear(x, proj_weight, proj_bias)
    score = projected[:, :num_heads]
    value = projected[:, num_heads:].reshape(x.size(0), num_heads, -1)
    out, lse, new_out = torch.ops.aaren.step(score, value, state_lse, state_out)
    return F.linear(out.flatten(1), out_weight, out_bias), lse, new_out


# ---- the program's modules: the state in buffers shared by every method ---------------------

class _StatefulModel(nn.Module):
    """A model and its per-layer state as buffers (``state_lse_i [1, H]`` = -inf,
    ``state_out_i [1, H, D]`` = 0, float64). Every method's module holds this same object as
    ``core``, so the buffers have the same names in every method: what ExecuTorch matches to
    share them. `run` maps a chunk of inputs to the method's output, reading and writing the
    state."""

    def __init__(self, model: nn.Module, attention_modules) -> None:
        super().__init__()
        self.model = model
        self.num_layers = len(attention_modules)
        for i, attention in enumerate(attention_modules):
            lse, out = empty_state(1, attention.num_heads, attention.head_dim, torch.float64)
            self.register_buffer(f"state_lse_{i}", lse)
            self.register_buffer(f"state_out_{i}", out)

    def states(self) -> List[State]:
        return [(getattr(self, f"state_lse_{i}"), getattr(self, f"state_out_{i}"))
                for i in range(self.num_layers)]

    def store(self, states: List[State]) -> None:
        for (lse, out), (new_lse, new_out) in zip(self.states(), states):
            lse.copy_(new_lse)
            out.copy_(new_out)

    def reset(self) -> None:
        for lse, out in self.states():
            lse.fill_(float("-inf"))
            out.zero_()


class _StatefulEncoder(_StatefulModel):
    """An AarenEncoder: x [1, T, E] -> y [1, T, E] (prefill), x [1, E] -> y [1, E] (step)."""

    def __init__(self, encoder: AarenEncoder) -> None:
        super().__init__(encoder, [layer.self_attn for layer in encoder.layers])

    def run(self, x: Tensor, one_token: bool) -> Tensor:
        forward = self.model.step if one_token else self.model.prefill
        y, states = forward(x, self.states())
        self.store(states)
        return y


class _StatefulCausalLM(_StatefulModel):
    """A Hugging Face causal LM converted by aaren.hf: token ids [1, T] -> the last token's
    logits [1, V]. Also keeps the number of tokens seen (``position``, int64), which gives the
    tokens' positions (absolute embeddings, RoPE). Each layer's state is handed to the model
    through a `transformers` Cache whose layers are the buffers (`_BufferLayer`)."""

    def __init__(self, model: nn.Module, attention_modules) -> None:
        super().__init__(model, sorted(attention_modules, key=lambda m: m.layer_idx))
        self.register_buffer("position", torch.zeros(1, dtype=torch.long))

    def run(self, ids: Tensor, one_token: bool) -> Tensor:
        from transformers.cache_utils import Cache
        layers = [_buffer_layer(lse, out) for lse, out in self.states()]
        positions = self.position + torch.arange(ids.size(1), device=ids.device)
        logits = self.model(input_ids=ids, past_key_values=Cache(layers=layers),
                            position_ids=positions.unsqueeze(0), cache_position=positions,
                            use_cache=True).logits
        self.store([layer.state for layer in layers])
        self.position.add_(ids.size(1))
        return logits[:, -1]

    def reset(self) -> None:
        super().reset()
        self.position.zero_()


@functools.lru_cache(maxsize=None)
def _buffer_layer_class():
    """An aaren.hf cache layer that takes the layer's new state without counting tokens as a
    Python number (which would fix the chunk's length at export: the program counts them in
    its ``position`` buffer instead). Made on first use: aaren.hf imports transformers."""
    from .hf import AarenLayer

    class _BufferLayer(AarenLayer):
        def set_state(self, state: State, new_tokens) -> None:
            self.lse, self.out = state

    return _BufferLayer


def _buffer_layer(lse: Tensor, out: Tensor):
    """A `_buffer_layer_class` layer starting from the state (lse, out)."""
    layer = _buffer_layer_class()()
    layer.lse, layer.out = lse, out
    layer.is_initialized = True
    return layer


class _Method(nn.Module):
    """One method of the program over the shared core: ``prefill`` (a chunk), ``step`` (one
    token) or ``reset`` (returns lse[0, 0] of the first layer, -inf: a method returns
    something)."""

    def __init__(self, core: _StatefulModel, name: str) -> None:
        super().__init__()
        self.core = core
        self.name = name

    def forward(self, x: Optional[Tensor] = None) -> Tensor:
        if x is None:  # reset
            self.core.reset()
            return self.core.state_lse_0[:, 0].clone()
        return self.core.run(x, one_token=self.name == "step")


def _transformers_model(model: nn.Module) -> bool:
    """A `transformers` model (without importing transformers where it is not loaded)."""
    transformers = sys.modules.get("transformers")
    return transformers is not None and isinstance(model, transformers.PreTrainedModel)


def _core_of(model: nn.Module):
    """(the stateful core, the width E of its inputs (None for token ids), whether it takes
    token ids) for an AarenEncoder, a converted nn.TransformerEncoder or a converted causal LM."""
    if _transformers_model(model):
        from .hf import _AarenHFAttention
        attention = [m for m in model.modules() if isinstance(m, _AarenHFAttention)]
        if not attention:
            raise TypeError(f"aaren.edge.export: this {type(model).__name__} has no attention "
                            f"converted by aaren.hf.convert; convert it (and train it) first")
        if not hasattr(model, "lm_head") and not type(model).__name__.endswith("ForCausalLM"):
            raise TypeError(f"aaren.edge.export: a Hugging Face model must be a causal language "
                            f"model (…ForCausalLM, …LMHeadModel), got {type(model).__name__}")
        _check_parameters(model)
        return _StatefulCausalLM(model, attention), None, True
    encoder = _as_encoder(model)
    return _StatefulEncoder(encoder), encoder.layers[0].self_attn.embed_dim, False


def _as_encoder(model: nn.Module) -> AarenEncoder:
    if isinstance(model, AarenEncoder):
        encoder = model
    elif isinstance(model, nn.TransformerEncoder):
        if not all(isinstance(getattr(layer, "self_attn", None), Aaren) for layer in model.layers):
            raise TypeError("aaren.edge.export: this nn.TransformerEncoder still has "
                            "nn.MultiheadAttention layers; convert it with aaren.convert "
                            "(and train it) first")
        encoder = AarenEncoder.from_transformer_encoder(model)
    else:
        raise TypeError(f"aaren.edge.export: expected an aaren.AarenEncoder or an "
                        f"nn.TransformerEncoder converted by aaren.convert, got "
                        f"{type(model).__name__}")
    if encoder.num_layers == 0:
        raise ValueError("aaren.edge.export: the encoder has no layers")
    for layer in encoder.layers:
        if not layer.self_attn.batch_first:
            raise ValueError("aaren.edge.export: the layers must be batch_first (the program "
                             "takes [1, T, E])")
    _check_parameters(encoder)
    return encoder


def _check_parameters(model: nn.Module) -> None:
    parameters = list(model.parameters())
    if any(p.dtype != torch.float32 for p in parameters):
        raise TypeError("aaren.edge.export: the model must be float32 (XNNPACK's dtype); "
                        "call model.float() first")
    if any(p.device.type != "cpu" for p in parameters):
        raise ValueError("aaren.edge.export: the model must be on the CPU; call model.cpu() first")


def export(model: nn.Module, path: Union[str, os.PathLike], *, max_prefill: int = 256,
           delegate: bool = True) -> Dict[str, object]:
    """Writes ``model`` as an ExecuTorch program with methods ``prefill``, ``step`` and
    ``reset``, its state inside (the module docstring; docs/edge.md).

    Args:
        model: an `aaren.AarenEncoder`; an ``nn.TransformerEncoder`` converted by
            `aaren.convert` (batch_first); or a Hugging Face causal language model converted by
            `aaren.hf.convert`. Float32, on the CPU. Exported in eval mode, from a copy
            (``model`` is left as it was).
        path: the ``.pte`` file to write (missing parent directories are created).
        max_prefill: the most tokens one ``prefill`` call takes (its activation memory is
            planned for this many; a runner splits longer prompts into chunks).
        delegate: delegate the Linear layers to XNNPACK (False: every operator on ExecuTorch's
            portable and optimized CPU kernels).

    Returns:
        a dict: ``path``, ``bytes`` (the file's size), ``kind`` ("encoder" or "causal_lm"),
        ``embed_dim`` (encoders; None for a language model), ``num_layers``, ``max_prefill``,
        ``state_bytes`` (the state's bytes inside the program: the same after any number of
        tokens) and ``operators`` (per method, the operators it runs outside the delegate).

    Raises:
        ImportError without executorch (naming the install); TypeError for a model of another
        kind, or not float32; ValueError for ``max_prefill < 1``, a model off the CPU or
        not batch_first.
    """
    if not isinstance(max_prefill, int) or isinstance(max_prefill, bool) or max_prefill < 1:
        raise ValueError(f"aaren.edge.export: max_prefill must be an int >= 1, got {max_prefill!r}")
    core, width, takes_ids = _core_of(model)  # checks the model before anything is imported
    et = _executorch()
    register_out_variants()
    # A copy in eval mode without gradients (constant_prop_pass would otherwise fold
    # parameters that require grad into constants and warn about each).
    core = copy.deepcopy(core).eval().requires_grad_(False)

    # Example inputs: a chunk of two tokens (one would let export fix T to 1) and one token.
    chunk_length = min(2, max_prefill)
    if takes_ids:
        chunk, token = torch.zeros(1, chunk_length, dtype=torch.long), torch.zeros(1, 1, dtype=torch.long)
    else:
        chunk, token = torch.zeros(1, chunk_length, width), torch.zeros(1, width)
    tokens = torch.export.Dim("tokens", min=1, max=max_prefill)
    with torch.no_grad():
        programs = {
            "prefill": torch.export.export(
                _Method(core, "prefill"), (chunk,),
                dynamic_shapes=({1: tokens},) if max_prefill > 1 else None),
            "step": torch.export.export(_Method(core, "step"), (token,)),
            "reset": torch.export.export(_Method(core, "reset"), ()),
        }
    decompositions = {torch.ops.aaren.attention_step.default: _attention_step_as_calls}
    # constant_prop_pass folds what depends on parameters only (the score projection, the
    # query folded into the key projection): its product then has a constant weight, which
    # XNNPACK takes.
    programs = {name: et["constant_prop_pass"](program.run_decompositions(decompositions))
                for name, program in programs.items()}
    partitioners = [et["XnnpackPartitioner"]()] if delegate else []
    edge = et["to_edge_transform_and_lower"](programs, partitioner=partitioners,
                                             compile_config=et["EdgeCompileConfig"]())
    with warnings.catch_warnings():
        # The emitter warns of a "meaningless initial state" for every mutated buffer, even
        # those InitializedMutableBufferPass gives their initial values (ours, all of them).
        warnings.filterwarnings("ignore", message="Mutation on a buffer in the model is detected")
        program = edge.to_executorch(et["ExecutorchBackendConfig"](
            # The state's initial values (lse = -inf, position 0) are written into the buffers
            # when a method is loaded; the methods share the buffers (a runtime must share its
            # memory arenas too, and load every method before running one: docs/edge.md).
            passes=[et["InitializedMutableBufferPass"](["state_lse", "state_out", "position"])],
            memory_planning_pass=et["MemoryPlanningPass"](alloc_graph_input=True,
                                                          share_mutable_buffers=True),
            emit_mutable_buffer_names=True,
        ))
    path = os.fspath(path)
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    with open(path, "wb") as file:
        program.write_to_file(file)
    operators = {plan.name: sorted(f"{op.name}.{op.overload}" if op.overload else op.name
                                   for op in plan.operators)
                 for plan in program.executorch_program.execution_plan}
    return {
        "path": path,
        "bytes": os.path.getsize(path),
        "kind": "causal_lm" if takes_ids else "encoder",
        "embed_dim": width,
        "num_layers": core.num_layers,
        "max_prefill": max_prefill,
        "state_bytes": sum(t.numel() * t.element_size() for t in core.buffers()),
        "operators": operators,
    }
