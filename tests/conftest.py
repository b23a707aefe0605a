"""Shared fixtures. Tests are split into ``unit/`` (library functions on small inputs) and
``pipeline/`` (stages, Snakemake, DVC, SLURM on the smoke experiment); the helpers in this
directory serve both. ``pytest -m "not slow"`` is the quick loop."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # net_helpers, pipeline_helpers


@pytest.fixture
def own_rng():
    """Tests seed the global RNG for layer initialisation; keep that from leaking into other tests."""
    with torch.random.fork_rng():
        yield


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: intra-op threads only add synchronisation (and stall badly on a loaded machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
