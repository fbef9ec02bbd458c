import os
from pathlib import Path

import pytest
import torch

from minivar import parity

# Upstream's fixtures were recorded with ATen's AVX2 kernels; ask for them before any kernel runs.
# Subprocesses (CLI, batch, notebooks) inherit the choice through the environment.
parity.reference_mode()
# The suite's default numerics are the reference ones, which the fixtures are compared against; the tests
# of the fast modes ask for "bf16", "fp32" or "auto" by name (test_numerics_modes.py). Subprocesses inherit it.
os.environ["MINIVAR_NUMERICS"] = "reference"

FIXTURES = Path(__file__).parent / "fixtures"
TINY = FIXTURES / "tiny-a"


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny runs: a second thread mostly waits on a busy machine,
    and bit-identity across runs needs only the same count throughout."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_dir() -> Path:
    return TINY


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))
