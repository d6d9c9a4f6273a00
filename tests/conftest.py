import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Test models are tiny: extra intra-op threads only add spin-waits, which cost seconds per step on a
    busy 2-core CI machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
