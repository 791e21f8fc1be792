import os
import socket

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


@pytest.fixture
def one_thread():
    """Tiny models and token-at-a-time loops: intra-op threads only add synchronization,
    which made these tests up to 20x slower on a busy 2-core machine. (Multi-threaded
    kernels are tested with the operators.)"""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a network connection fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("the network was used")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
