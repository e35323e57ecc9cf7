"""Suite-wide settings. The CI and dev machines have 2 cores, often shared: with more torch
threads than free cores every small matmul waits on spinning threads (10-100x slower, SVD
stalls), so the whole suite runs on one intra-op thread."""
import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
