"""Shared test fixtures: devices, dtypes, RNG hygiene, the needs_cuda mark."""
import pytest
import torch

import pyfastbayes
from pyfastbayes import _native

CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if CUDA else [])
FLOAT_DTYPES = [torch.float32, torch.float64]
ALL_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
NATIVE = _native.available()

needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
needs_native = pytest.mark.skipif(not NATIVE, reason="needs the compiled extension")


@pytest.fixture(autouse=True)
def _restore_rng():
    """Every test starts from seed 0 and leaves the global RNG as it found it."""
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if CUDA else None
    torch.manual_seed(0)
    yield
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


def pytest_report_header(config):
    return f"pyfastbayes build: {pyfastbayes.build_info()}"
