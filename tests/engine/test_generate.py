"""The cached single-request decoder agrees with argmax of the plain full-sequence forward."""
import pytest
import torch

from recursa.config import preset
from recursa.engine.generate import generate
from recursa.engine.sampling import sample
from recursa.errors import RecursaError
from recursa.model import Decoder


@pytest.fixture
def model():
    torch.manual_seed(0)
    return Decoder(preset("tiny")).eval()


def test_greedy_equals_full_forward_argmax(model):
    prompt = [5, 17, 99, 3, 250]
    out = generate(model, prompt, 20)
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(20):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert out == ids[len(prompt):]


def test_stop_ids_and_seeded_sampling(model):
    first = generate(model, [1, 2, 3], 5)[0]
    assert generate(model, [1, 2, 3], 5, stop_ids=[first]) == [first]
    a = generate(model, [1, 2, 3], 10, temperature=1.0, seed=7)
    b = generate(model, [1, 2, 3], 10, temperature=1.0, seed=7)
    assert a == b


def test_top_k_and_top_p_restrict_support():
    logits = torch.tensor([[5.0, 4.0, 1.0, 0.0, -1.0]]).repeat(200, 1)
    g = torch.Generator().manual_seed(0)
    assert set(sample(logits, 1.0, top_k=2, generator=g).tolist()) <= {0, 1}
    # p(0)=0.70, p(1)=0.26: top_p=0.5 keeps only token 0
    assert set(sample(logits, 1.0, top_p=0.5, generator=g).tolist()) == {0}


def test_too_long_prompt_is_a_user_error(model):
    with pytest.raises(RecursaError, match="max_seq_len"):
        generate(model, [1] * 250, 10)
