"""Aaren on the edge: an exported model as an ExecuTorch program, run by a C++ runner that
links no libtorch (docs/edge.md).

`export(model, path)` writes a `.pte` program with three methods over one batch row:

- ``prefill(x [1, T, E]) -> y [1, T, E]``: a chunk of 1 <= T <= ``max_prefill`` tokens
  through the parallel scan, from the current state;
- ``step(x [1, E]) -> y [1, E]``: one token;
- ``reset() -> lse [1]``: back to the empty state (what a loaded program starts from).

The state lives inside the program, in mutable buffers that the three methods share (as
ExecuTorch's LLM export keeps its KV cache): one ``(lse [1, H], out [1, H, D])`` pair per layer,
float64 as in the LibTorch path (docs/design.md, "The state"). Inside, a device app calls
prefill/step with tokens only, and the program cannot be handed a state of the wrong shape,
dtype or layer; the state's bytes are fixed at export, whatever the number of tokens. The
Linear layers are delegated to XNNPACK (float32); the aaren operators run as ExecuTorch
kernels of this project (``csrc/edge/kernels.cpp``, the same ``combine.h`` arithmetic as the
CPU kernels), which ``aaren_runner`` links (``scripts/run.sh edge`` builds it).

Model kinds: an `aaren.AarenEncoder`, or an ``nn.TransformerEncoder`` converted by
`aaren.convert` (exported as `AarenEncoder.from_transformer_encoder` of it, the same weights).

Needs the ``executorch`` package (``pip install aaren[edge]``, or ``scripts/run.sh edge``,
which installs only what export uses). This module imports without it; `export` raises an
ImportError that names the install.
"""
import copy
import os
from typing import Dict, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .functional import State, empty_state
from .modules import Aaren, AarenEncoder

__all__ = ["export", "EXECUTORCH_VERSION", "register_out_variants"]

# The version the project tests; docs/edge.md says how it installs.
EXECUTORCH_VERSION = "1.5.1"
_INSTALL_HINT = (f"pip install aaren[edge] (executorch=={EXECUTORCH_VERSION}), or "
                 f"scripts/run.sh edge from a checkout")


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

class _StatefulEncoder(nn.Module):
    """The encoder and its per-layer state as buffers (``state_lse_i [1, H]`` = -inf,
    ``state_out_i [1, H, D]`` = 0, float64). Every method's module holds this same object as
    ``core``, so the buffers have the same names in every method: what ExecuTorch matches to
    share them."""

    def __init__(self, encoder: AarenEncoder) -> None:
        super().__init__()
        self.encoder = encoder
        self.num_layers = encoder.num_layers
        for i, layer in enumerate(encoder.layers):
            attention = layer.self_attn
            lse, out = empty_state(1, attention.num_heads, attention.head_dim, torch.float64)
            self.register_buffer(f"state_lse_{i}", lse)
            self.register_buffer(f"state_out_{i}", out)

    def states(self) -> List[State]:
        return [(getattr(self, f"state_lse_{i}"), getattr(self, f"state_out_{i}"))
                for i in range(self.num_layers)]

    def store(self, states: List[State]) -> None:
        for i, (lse, out) in enumerate(states):
            getattr(self, f"state_lse_{i}").copy_(lse)
            getattr(self, f"state_out_{i}").copy_(out)


class _Prefill(nn.Module):
    def __init__(self, core: _StatefulEncoder) -> None:
        super().__init__()
        self.core = core

    def forward(self, x: Tensor) -> Tensor:
        y, states = self.core.encoder.prefill(x, self.core.states())
        self.core.store(states)
        return y


class _Step(nn.Module):
    def __init__(self, core: _StatefulEncoder) -> None:
        super().__init__()
        self.core = core

    def forward(self, x: Tensor) -> Tensor:
        y, states = self.core.encoder.step(x, self.core.states())
        self.core.store(states)
        return y


class _Reset(nn.Module):
    def __init__(self, core: _StatefulEncoder) -> None:
        super().__init__()
        self.core = core

    def forward(self) -> Tensor:
        for lse, out in self.core.states():
            lse.fill_(float("-inf"))
            out.zero_()
        return self.core.state_lse_0[:, 0].clone()  # a method returns something


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
    parameters = list(encoder.parameters())
    if any(p.dtype != torch.float32 for p in parameters):
        raise TypeError("aaren.edge.export: the model must be float32 (XNNPACK's dtype); "
                        "call model.float() first")
    if any(p.device.type != "cpu" for p in parameters):
        raise ValueError("aaren.edge.export: the model must be on the CPU; call model.cpu() first")
    return encoder


def export(model: nn.Module, path: Union[str, os.PathLike], *, max_prefill: int = 256,
           delegate: bool = True) -> Dict[str, object]:
    """Writes ``model`` as an ExecuTorch program with methods ``prefill``, ``step`` and
    ``reset`` (the module docstring says what they take), its state inside.

    Args:
        model: an `aaren.AarenEncoder`, or an ``nn.TransformerEncoder`` converted by
            `aaren.convert`; float32, on the CPU, batch_first. Exported in eval mode (a copy:
            ``model`` is left as it was).
        path: the ``.pte`` file to write.
        max_prefill: the most tokens one ``prefill`` call takes (its activation memory is
            planned for this many; a runner splits longer prompts into chunks).
        delegate: delegate the Linear layers to XNNPACK (False: every operator on ExecuTorch's
            portable and optimized CPU kernels).

    Returns:
        a dict: ``path``, ``bytes`` (the file's size), ``embed_dim``, ``num_layers``,
        ``max_prefill``, ``state_bytes`` (the state's bytes inside the program) and
        ``operators`` (per method, the operators it runs outside the delegate).

    Raises:
        ImportError without executorch (naming the install); TypeError for a model of another
        kind, or not float32; ValueError for ``max_prefill < 1``, a model off the CPU or not
        batch_first.
    """
    if not isinstance(max_prefill, int) or max_prefill < 1:
        raise ValueError(f"aaren.edge.export: max_prefill must be an int >= 1, got {max_prefill!r}")
    encoder = _as_encoder(model)
    et = _executorch()
    register_out_variants()
    encoder = copy.deepcopy(encoder).eval()
    core = _StatefulEncoder(encoder)
    width = encoder.layers[0].self_attn.embed_dim

    tokens = torch.export.Dim("tokens", min=1, max=max_prefill)
    # An example chunk of two tokens (one would let export specialize T to 1).
    example_chunk = torch.zeros(1, min(2, max_prefill), width)
    with torch.no_grad():
        programs = {
            "prefill": torch.export.export(_Prefill(core), (example_chunk,),
                                           dynamic_shapes=({1: tokens},) if max_prefill > 1 else None),
            "step": torch.export.export(_Step(core), (torch.zeros(1, width),)),
            "reset": torch.export.export(_Reset(core), ()),
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
    program = edge.to_executorch(et["ExecutorchBackendConfig"](
        # The state's initial values (lse = -inf) are written into the buffers when a method
        # is loaded; the methods share the buffers (and a runtime must share its arenas).
        passes=[et["InitializedMutableBufferPass"](["state_lse", "state_out"])],
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
        "embed_dim": width,
        "num_layers": encoder.num_layers,
        "max_prefill": max_prefill,
        "state_bytes": sum(t.numel() * t.element_size() for t in core.buffers()),
        "operators": operators,
    }
