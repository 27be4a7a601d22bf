"""Shared test fixtures (RNG hygiene), the report header, and the CI rule: under CI=true a build
whose native extension did not load fails the run before any test is collected.

The device/dtype grid and the op-test base live in ``_helpers.py``; the names tests import from
here (``from conftest import DEVICES, needs_cuda, ...``) are re-exported.
"""
import pytest
import torch

import pyfastbayes

from _helpers import (ALL_DTYPES, CUDA, DEVICES, FLOAT_DTYPES, NATIVE, in_ci, native_problem,  # noqa: F401
                      needs_cuda, needs_native, require)


def pytest_configure(config):
    problem = native_problem()
    if problem is not None:
        raise pytest.UsageError(problem)


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
    return f"pyfastbayes build: {pyfastbayes.build_info()} (CI={in_ci()})"
