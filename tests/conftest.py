import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """For tiny models: intra-op threads only add sync overhead (and spin badly on a loaded machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
