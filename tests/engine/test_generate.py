"""Sampling rules, and the engine at batch 1 agreeing with argmax of the plain full-sequence forward."""
import pytest
import torch

from recursa.presets import preset
from recursa import LLM, SamplingParams
from recursa.engine.sampling import sample
from recursa.errors import RecursaError
from recursa.model import Decoder


@pytest.fixture
def model():
    torch.manual_seed(0)
    return Decoder(preset("tiny")).eval()


def test_greedy_equals_full_forward_argmax(model):
    prompt = [5, 17, 99, 3, 250]
    out = LLM(model).generate(prompt, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))[0].token_ids
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(20):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert out == ids[len(prompt):]


def test_stop_ids_and_seeded_sampling(model):
    llm = LLM(model)
    first = llm.generate([1, 2, 3], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))[0].token_ids[0]
    out = llm.generate([1, 2, 3], SamplingParams(temperature=0, max_tokens=5, stop_token_ids=[first]))[0]
    assert out.token_ids == [first] and out.finish_reason == "stop"
    a, b = (llm.generate([1, 2, 3], SamplingParams(temperature=1.0, max_tokens=10, seed=7))[0].token_ids for _ in "ab")
    assert a == b


def test_top_k_and_top_p_restrict_support():
    logits = torch.tensor([[5.0, 4.0, 1.0, 0.0, -1.0]]).repeat(200, 1)
    g = torch.Generator().manual_seed(0)
    assert set(sample(logits, 1.0, top_k=2, generator=g).tolist()) <= {0, 1}
    # p(0)=0.70, p(1)=0.26: top_p=0.5 keeps only token 0
    assert set(sample(logits, 1.0, top_p=0.5, generator=g).tolist()) == {0}


def test_too_long_prompt_is_a_user_error(model):
    with pytest.raises(RecursaError, match="max_model_len"):
        LLM(model).generate([1] * 256, SamplingParams(max_tokens=10))


def test_batched_draws_follow_softmax_and_rows_keep_their_settings():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).repeat(4000, 1)
    g = torch.Generator().manual_seed(1)
    freq = torch.bincount(sample(logits, 1.0, generator=g), minlength=4).float() / 4000
    torch.testing.assert_close(freq, logits[0].softmax(-1), atol=0.03, rtol=0)
    from recursa.engine.sampling import sample_rows
    rows = torch.tensor([[0.0, 3.0, 1.0, 2.0]] * 3)
    out = sample_rows(rows, [0.0, 1.0, 1.0], [0, 1, 0], [1.0, 1.0, 0.01], [None, None, torch.Generator().manual_seed(0)])
    assert out == [1, 1, 1]   # greedy; top-k 1; a tiny nucleus keeps only the top token


def test_a_top_p_below_float32_range_keeps_the_top_token():
    rows = torch.tensor([[0.0, 3.0, 1.0, 2.0]] * 50)
    assert set(sample(rows, 1.0, top_p=1e-300, generator=torch.Generator().manual_seed(0)).tolist()) == {1}


def test_stack_rows_reuses_the_batch_it_came_from_and_copies_otherwise():
    from recursa.engine.sampling import stack_rows

    logits = torch.randn(5, 11)
    assert stack_rows(list(logits)) is logits                      # one head call: no copy
    for rows in (list(logits)[::-1], list(logits)[:4], [logits[0], torch.randn(11)], list(logits[:, :10])):
        got = stack_rows(rows)                                     # reordered, partial, foreign, strided
        assert got is not logits and torch.equal(got, torch.stack(rows))
