"""Engine tests run many tiny matmuls; with more torch threads than free cores (a shared CI box)
each one waits on spinning threads and the suite gets 10x slower, so they run single-threaded."""
import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
