"""aaren: attention computed as a many-to-many RNN by a parallel prefix scan.

Functional API: `aaren.scan` (all tokens, in parallel), `aaren.scan_varlen` (packed
sequences of different lengths) and `aaren.step` (one token, constant memory). The
operators are `torch.ops.aaren.*`, usable from Python, TorchScript, C++, torch.compile and
torch.export.
"""
from ._library import build_info
from .functional import State, empty_state, scan, scan_varlen, step
from .modules import Aaren, AarenEncoder, AarenEncoderLayer
from .conversion import convert

__version__ = build_info()["version"]

__all__ = ["State", "build_info", "empty_state", "scan", "scan_varlen", "step", "__version__",
           "Aaren", "AarenEncoderLayer", "AarenEncoder", "convert"]
