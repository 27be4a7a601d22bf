"""Shared test fixtures (RNG hygiene), the report header, and the CI rule: under CI=true a build
whose native extension did not load fails the run before any test is collected.

The device/dtype grid, the CI rules and the op-test base live in ``_helpers.py``: tests import
them from there (``from _helpers import DEVICES, needs_cuda, ...``), never from this file.
"""
import pytest
import torch

import pyfastbayes

from _helpers import CUDA, in_ci, native_problem


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
