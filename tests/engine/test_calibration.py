"""Calibrated early exit (recursa.engine.exit_replay, .calibration): the bound, the choice, the engine under it.

References: an exact binomial tail from math.comb (and scipy's beta quantile where installed) for
the Clopper-Pearson bound; a per-token Python loop for the rule's outcome; the exit rule replayed
on one full forward (tests/reference.py) for the engine running the calibrated policy.
"""
import math

import pytest
import torch

import recursa
from recursa import SamplingParams
from recursa.data.packed import write_tokens
from recursa.engine.calibration import Calibration, calibrate
from recursa.engine.exit_replay import Replay, binomial_tail, choose_threshold, clopper_pearson_lower, effective_counts
from recursa.errors import RecursaError
from recursa.model.confidence import MEASURES
from reference import replay_exit_rule
from tiny_models import agreeing_exit_model


def exact_tail(k, n, p):
    return sum(math.comb(n, j) * p ** j * (1 - p) ** (n - j) for j in range(k, n + 1))


@pytest.mark.parametrize("k,n", [(0, 10), (1, 10), (7, 10), (10, 10), (45, 50), (180, 200)])
@pytest.mark.parametrize("delta", [0.05, 0.2])
def test_clopper_pearson_lower_bound(k, n, delta):
    lb = clopper_pearson_lower(k, n, delta)
    if k == 0:
        assert lb == 0.0
        return
    assert exact_tail(k, n, lb) == pytest.approx(delta, rel=1e-6)      # the defining equation
    assert binomial_tail(k, n, lb) == pytest.approx(exact_tail(k, n, lb), rel=1e-9)
    assert lb < k / n
    stats = pytest.importorskip("scipy.stats")
    assert lb == pytest.approx(stats.beta.ppf(delta, k, n - k + 1), abs=1e-9)


def test_clopper_pearson_known_value():
    assert clopper_pearson_lower(10, 10, 0.05) == pytest.approx(0.05 ** 0.1)   # 0.7411
    with pytest.raises(RecursaError):
        clopper_pearson_lower(3, 2, 0.05)


def _synthetic(n=2000, seed=0):
    """Confidences at two exits; an exit agrees more often the more confident it is."""
    g = torch.Generator().manual_seed(seed)
    conf = torch.rand(n, 2, generator=g, dtype=torch.float64)
    conf[:, 1] = (conf[:, 1] + conf[:, 0]) / 2
    agrees = torch.rand(n, 2, generator=g, dtype=torch.float64) < (0.3 + 0.7 * conf)
    return Replay(conf, agrees, (2, 4), 6)


def test_outcome_is_the_first_passing_exit():
    r = _synthetic(300)
    for t in (0.2, 0.5, 0.9):
        agree, depth = 0, 0
        for c, a in zip(r.confidence.tolist(), r.agrees.tolist()):
            e = next((i for i in range(2) if c[i] >= t), None)
            agree += True if e is None else a[e]
            depth += 6 if e is None else r.depths[e]
        assert r.outcome(t) == (agree, 300, pytest.approx(depth / 300))
    assert r.outcome(None) == (300, 300, 6.0)


@pytest.mark.parametrize("target", [0.8, 0.9, 0.95])
def test_chosen_threshold_meets_the_target_on_the_calibration_replay(target):
    r = _synthetic()
    grid = [1 - i / 100 for i in range(101)]
    chosen = choose_threshold(r, target, 0.05, grid)
    k, n, _ = r.outcome(chosen["threshold"])
    assert chosen["bound"] == pytest.approx(clopper_pearson_lower(k, n, 0.05))
    assert chosen["bound"] >= target and k / n >= chosen["bound"]
    i = grid.index(chosen["threshold"])          # fixed sequence: the next candidate failed
    assert clopper_pearson_lower(*r.outcome(grid[i + 1])[:2], 0.05) < target
    assert all(clopper_pearson_lower(*r.outcome(t)[:2], 0.05) >= target for t in grid[:i + 1])


def test_effective_sample_size_of_correlated_sequences():
    g = torch.Generator().manual_seed(0)
    seq = torch.arange(100).repeat_interleave(20)                        # 100 sequences of 20 tokens
    independent = torch.rand(2000, generator=g) < 0.9
    k, n = effective_counts(independent, seq)
    assert 1500 < n <= 2000 and k / n == pytest.approx(float(independent.double().mean()), abs=0.01)
    clustered = (torch.rand(100, generator=g) < 0.9).repeat_interleave(20)  # a sequence agrees all or nothing
    k, n = effective_counts(clustered, seq)
    assert 80 <= n <= 125                                              # about one trial per sequence
    assert effective_counts(torch.ones(40, dtype=torch.bool), seq[:40]) == (40, 40)


def test_the_sequence_bound_is_more_conservative():
    r = _synthetic()
    r.sequence = torch.arange(100).repeat_interleave(20)
    r.agrees[:] = r.agrees[::20].repeat_interleave(20, 0)              # tokens of a sequence agree together
    tok, seq = (choose_threshold(r, 0.8, 0.05, unit=u) for u in ("token", "sequence"))
    assert seq["effective_tokens"] < tok["effective_tokens"] == 2000
    assert seq["mean_depth"] >= tok["mean_depth"]


def test_a_target_of_almost_one_gives_full_depth():
    chosen = choose_threshold(_synthetic(), 0.9999, 0.05)
    assert chosen["threshold"] is None and chosen["mean_depth"] == 6.0


@pytest.mark.parametrize("target,delta", [(0.0, 0.05), (1.0, 0.05), (1.5, 0.05), (0.9, 0.0), (0.9, 1.0)])
def test_bad_target_or_delta_is_refused(target, delta):
    with pytest.raises(RecursaError, match="must lie in"):
        choose_threshold(_synthetic(10), target, delta)


def _corpus(tmp_path, vocab=256, n=20000):
    g = torch.Generator().manual_seed(1)
    write_tokens(tmp_path, "val", [torch.randint(0, vocab, (n,), generator=g).tolist()], vocab)
    return tmp_path


@pytest.fixture(scope="module")
def model():
    return agreeing_exit_model(n_layers=6, exit_depths=[2, 4])


@pytest.mark.parametrize("source", ["greedy", "corpus"])
def test_engine_with_the_calibrated_policy_equals_a_replay_of_the_rule(tmp_path, model, source):
    cal = calibrate(model, _corpus(tmp_path), target=0.6, delta=0.1, source=source, sequences=6,
                    prompt_len=8, new_tokens=12)
    assert cal.threshold is not None and cal.bound >= 0.6
    assert cal.calibration["agree"] >= cal.bound and 0 <= cal.test["agree"] <= 1
    again = Calibration.load(cal.save(tmp_path / "cal.json"))
    assert again == cal
    llm = recursa.LLM(model, exit_policy=again.exit_policy(model), exit_strategy="parallel", max_num_seqs=4)
    prompts = [[5, 17, 99, 3, 250], list(range(1, 20)), [7] * 9, [200, 2, 3, 4] * 3]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=14, ignore_eos=True))
    all_depths = []
    for prompt, out in zip(prompts, outs):
        with torch.no_grad():
            hidden = model.forward_hidden(torch.tensor([prompt + out.token_ids[:-1]]))
        tokens, depths, _ = replay_exit_rule(model, hidden, len(prompt), len(out.token_ids), (2, 4),
                                             MEASURES["max_prob"], cal.threshold)
        assert out.token_ids == tokens and out.exit_depths == depths
        all_depths += depths
    assert {2, 6} <= set(all_depths)          # the calibrated rule does exit early, and not always


def test_calibration_of_an_unreachable_target_runs_full_depth(tmp_path, model):
    cal = calibrate(model, _corpus(tmp_path), target=0.9999, sequences=2, prompt_len=4, new_tokens=6)
    assert cal.threshold is None and cal.exit_policy(model) is None
    assert cal.test["agree"] == 1.0 and cal.test["mean_depth"] == 6.0


def test_bad_calibration_inputs_are_one_line_errors(tmp_path, model):
    data = _corpus(tmp_path, n=500)
    with pytest.raises(RecursaError, match="fewer than"):
        calibrate(model, data, sequences=50, prompt_len=8, new_tokens=8, source="corpus")
    with pytest.raises(RecursaError, match="unknown calibration source"):
        calibrate(model, data, source="sampled")
    (tmp_path / "bad.json").write_text('{"target": 0.9}')
    with pytest.raises(RecursaError, match="not an exit calibration"):
        Calibration.load(tmp_path / "bad.json")
    with pytest.raises(RecursaError, match="no exit calibration"):
        Calibration.load(tmp_path / "missing.json")
