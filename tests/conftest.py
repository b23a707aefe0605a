"""Fixtures shared by the bound-core tests (opted into with pytestmark = usefixtures(...))."""
import pytest
import torch


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
