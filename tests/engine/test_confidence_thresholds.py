"""Confidence measures and the thresholds (FREE's Beta mixture fit, one estimator per exit)."""
import math

import pytest
import torch

from recursa.engine.exit_policy import confidence
from recursa.model.confidence import features, margin, max_prob, saturation
from recursa.engine.thresholds import BetaMixture, CALMDecay, Fixed, PerExit, make_threshold
from recursa.errors import RecursaError


def test_measures_by_hand():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.2]))
    assert float(max_prob(logits)) == pytest.approx(0.5)
    assert float(margin(logits)) == pytest.approx(0.2)
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])
    assert float(saturation(a, b)) == pytest.approx(1 / math.sqrt(2))
    assert confidence("margin")(logits, a, b, 2) == pytest.approx(0.2)
    assert confidence("saturation")(logits, a, a, 2) == pytest.approx(1.0)
    assert features(logits, a, b).tolist() == pytest.approx([0.5, 0.2, 1 / math.sqrt(2)])
    with pytest.raises(RecursaError):
        confidence("entropy")
    with pytest.raises(RecursaError, match="load_exit_classifier"):
        confidence("classifier")  # a name alone has no weights


def test_fixed_and_calm_decay():
    assert Fixed(0.7)(0) == Fixed(0.7)(100) == 0.7
    calm = CALMDecay(0.8, tau=4.0, max_steps=100)
    assert calm(0) == pytest.approx(0.9 * 0.8 + 0.1)
    assert calm(50) == pytest.approx(0.72 + 0.1 * math.exp(-2.0))
    assert calm(100) < calm(50) < calm(0)
    assert CALMDecay(1.0, tau=0.0, max_steps=10)(3) == 1.0  # clipped to [0, 1]
    assert isinstance(make_threshold("calm", 0.5, max_steps=8), CALMDecay)
    with pytest.raises(RecursaError):
        make_threshold("median")


def _feed(est, agree, disagree):
    for c in agree:
        est.observe(float(c), True)
    for c in disagree:
        est.observe(float(c), False)


def test_beta_mixture_recovers_known_parameters():
    torch.manual_seed(0)
    agree = torch.distributions.Beta(8.0, 2.0).sample((5000,))
    disagree = torch.distributions.Beta(2.0, 5.0).sample((5000,))
    est = BetaMixture(zeta=0.9)
    _feed(est, agree, disagree)
    fa, fd, prior = est.fit()
    assert fa.alpha == pytest.approx(8.0, rel=0.1) and fa.beta == pytest.approx(2.0, rel=0.1)
    assert fd.alpha == pytest.approx(2.0, rel=0.1) and fd.beta == pytest.approx(5.0, rel=0.1)
    assert prior == pytest.approx(0.5)


def test_beta_mixture_threshold_moves_with_zeta_and_prior():
    torch.manual_seed(1)
    agree = torch.distributions.Beta(8.0, 2.0).sample((3000,))
    disagree = torch.distributions.Beta(2.0, 5.0).sample((3000,))
    thresholds = []
    for zeta in (0.6, 0.9, 0.99):
        est = BetaMixture(zeta=zeta)
        _feed(est, agree, disagree)
        thresholds.append(est(0))
    assert thresholds[0] < thresholds[1] < thresholds[2] < 1.0
    # independent check: the chosen threshold is where the true posterior crosses zeta (equal priors)
    c = torch.tensor(thresholds[1], dtype=torch.float64)
    post = lambda x: 1 / (1 + torch.distributions.Beta(2.0, 5.0).log_prob(x).exp()
                          / torch.distributions.Beta(8.0, 2.0).log_prob(x).exp())
    assert float(post(c)) == pytest.approx(0.9, abs=0.05)
    # fewer agreements (lower prior) -> a higher threshold for the same zeta
    est = BetaMixture(zeta=0.9)
    _feed(est, agree[:1000], disagree)
    assert est(0) > thresholds[1]


def test_beta_mixture_waits_for_samples():
    est = BetaMixture(zeta=0.9, initial=0.8, min_samples=10)
    _feed(est, [0.9] * 5, [0.1] * 5)
    assert est(0) == 0.8 and est.fit() is None
    with pytest.raises(RecursaError):
        BetaMixture(zeta=1.5)


def test_free_threshold_has_one_estimator_per_exit():
    """Each exit depth fits its own mixture from its own pairs: thresholds and fits differ per exit."""
    torch.manual_seed(2)
    thr = make_threshold("free", 0.7, zeta=0.9)
    assert isinstance(thr, PerExit)
    samples = {10: ((8.0, 2.0), (2.0, 5.0)), 20: ((20.0, 2.0), (5.0, 3.0))}
    for depth, (a, d) in samples.items():
        for c in torch.distributions.Beta(*a).sample((3000,)):
            thr.observe(float(c), True, depth)
        for c in torch.distributions.Beta(*d).sample((3000,)):
            thr.observe(float(c), False, depth)
    assert set(thr.by_depth) == {10, 20}
    for depth, ((aa, ab), (da, db)) in samples.items():
        fa, fd, prior = thr.at(depth).fit()
        assert fa.alpha == pytest.approx(aa, rel=0.15) and fa.beta == pytest.approx(ab, rel=0.15)
        assert fd.alpha == pytest.approx(da, rel=0.15) and fd.beta == pytest.approx(db, rel=0.15)
        assert thr.at(depth).agree.n == thr.at(depth).disagree.n == 3000
    # the same zeta gives different thresholds: the depth-20 disagreements sit at higher confidence
    assert thr(0, 20) != thr(0, 10) and thr(0, 20) > thr(0, 10)
    ref = BetaMixture(zeta=0.9)
    torch.manual_seed(2)
    for c in torch.distributions.Beta(8.0, 2.0).sample((3000,)):
        ref.observe(float(c), True)
    for c in torch.distributions.Beta(2.0, 5.0).sample((3000,)):
        ref.observe(float(c), False)
    assert thr(0, 10) == ref(0)  # exactly the single estimator fed only with depth 10's pairs
    assert make_threshold("free", 0.7)(0, 5) == 0.7  # an exit not seen yet starts at the initial value
    with pytest.raises(RecursaError):
        make_threshold("free", 0.7, zeta=1.2)
