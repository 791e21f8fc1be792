import os

import pytest
import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

# AAREN_TEST_DEVICES=cuda (or cpu, or cpu,cuda) limits the `device` fixture to those devices,
# e.g. to run the whole suite on the GPU only (scripts/gpu_check.sh). Naming a device that is
# not available is an error rather than a silent skip.
if os.environ.get("AAREN_TEST_DEVICES"):
    _requested = [name.strip() for name in os.environ["AAREN_TEST_DEVICES"].split(",") if name.strip()]
    _missing = [name for name in _requested if name not in DEVICES]
    if _missing or not _requested:
        raise pytest.UsageError(f"AAREN_TEST_DEVICES={os.environ['AAREN_TEST_DEVICES']!r}: "
                                f"available devices are {DEVICES}")
    DEVICES = _requested


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
