"""Confidence measures, the exit classifier, and the three thresholds (FREE's Beta mixture fit)."""
import math

import pytest
import torch

from recursa.config import preset
from recursa.engine.confidence import (ExitClassifier, classifier_data, confidence, features, margin, max_prob,
                                       saturation, train_exit_classifier)
from recursa.engine.thresholds import BetaMixture, CALMDecay, Fixed, make_threshold
from recursa.errors import RecursaError
from recursa.model import Decoder


def test_measures_by_hand():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.2]))
    assert float(max_prob(logits)) == pytest.approx(0.5)
    assert float(margin(logits)) == pytest.approx(0.2)
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])
    assert float(saturation(a, b)) == pytest.approx(1 / math.sqrt(2))
    assert confidence("margin")(logits, a, b) == pytest.approx(0.2)
    assert confidence("saturation")(logits, a, a) == pytest.approx(1.0)
    assert features(logits, a, b).tolist() == pytest.approx([0.5, 0.2, 1 / math.sqrt(2)])
    with pytest.raises(RecursaError):
        confidence("entropy")


def test_exit_classifier_learns_a_separable_rule():
    torch.manual_seed(0)
    n, dim = 2000, 8
    hidden = torch.randn(n, dim)
    feats = torch.rand(n, 3)
    labels = (feats[:, 0] > 0.5).float()  # agreement decided by the max-prob feature
    clf = ExitClassifier(dim, hidden_dim=16)
    losses = train_exit_classifier(clf, hidden, feats, labels, steps=300, lr=1e-2)
    assert losses[-1] < 0.5 * losses[0]
    with torch.no_grad():
        acc = ((clf(hidden, feats) > 0).float() == labels).float().mean()
    assert acc > 0.9
    score = confidence(clf)(torch.log(torch.tensor([0.9, 0.05, 0.05])), hidden[0], hidden[0])
    assert 0.0 <= score <= 1.0


def test_classifier_data_labels_match_argmax_agreement():
    torch.manual_seed(0)
    model = Decoder(preset("tiny", n_layers=3, vocab_size=128)).eval()
    ids = torch.randint(0, 128, (2, 10))
    h, f, y = classifier_data(model, ids, depth=1)
    assert h.shape == (20, model.cfg.dim) and f.shape == (20, 3) and y.shape == (20,)
    hidden = model.forward_hidden(ids)
    ref = (model.head(hidden[1]).argmax(-1) == model.head(hidden[3]).argmax(-1)).float().flatten()
    assert torch.equal(y, ref)
    with pytest.raises(RecursaError):
        classifier_data(model, ids, depth=3)


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
