"""Loads the compiled operator library, refusing a torch it was not built for."""
import json
from typing import Any, Dict

import torch


def _major_minor(version: str) -> str:
    return ".".join(version.split("+")[0].split(".")[:2])


def check_torch_version(built_against: str, running: str) -> None:
    """C++ extensions are tied to the PyTorch ABI they were compiled against."""
    if _major_minor(built_against) != _major_minor(running):
        raise ImportError(
            f"aaren was compiled against PyTorch {built_against}, but PyTorch {running} is "
            f"installed. Rebuild aaren against this PyTorch "
            f"(pip install --no-build-isolation --force-reinstall <aaren source>) "
            f"or install torch=={built_against}."
        )


try:
    from . import _build_config
except ImportError as error:  # a source checkout that was never built
    raise ImportError(
        "aaren's operator library is not built: install the package with "
        "`pip install --no-build-isolation .` from the source checkout"
    ) from error

check_torch_version(_build_config.TORCH_VERSION, torch.__version__)

from . import _C  # noqa: E402  (loads libaaren_ops, which registers torch.ops.aaren)


def build_info() -> Dict[str, Any]:
    """How the operator library was built, and what it runs with now."""
    info = json.loads(_C.build_info_json())
    info["torch_version_running"] = torch.__version__
    info["cuda_available"] = torch.cuda.is_available()
    return info
