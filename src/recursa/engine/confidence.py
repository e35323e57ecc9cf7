"""Confidence measures: how sure an exit is that its prediction equals the full model's.

Every measure maps (logits [V], hidden [D], prev_hidden [D], depth) of one token at the exit after
`depth` layers to a float, larger = more confident, compared against a threshold by the
early-exit decoder:

    max_prob     the largest softmax probability (CALM "softmax", FREE's confidence)
    margin       top-1 minus top-2 softmax probability
    saturation   cosine similarity of the hidden state at this exit and at the previous exit
                 (for the first exit: the hidden state one layer below) — CALM's "state" measure
    classifier   a learned ExitClassifier (recursa.engine.exit_classifier): P(exit agrees with the
                 final layer) from the hidden state and the three measures above; trained in a
                 second stage (`recursa train-exit-classifier`) and loaded from the model directory.

    conf = confidence("max_prob")(logits, h, h_prev, depth)
    conf = confidence(load_exit_classifier("runs/ee/model"))(logits, h, h_prev, depth)
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from recursa.errors import RecursaError

Confidence = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], float]


def max_prob(logits: torch.Tensor) -> torch.Tensor:
    """Largest softmax probability over the last dim."""
    return F.softmax(logits.float(), dim=-1).amax(-1)


def margin(logits: torch.Tensor) -> torch.Tensor:
    """Top-1 minus top-2 softmax probability over the last dim."""
    top = F.softmax(logits.float(), dim=-1).topk(2, dim=-1).values
    return top[..., 0] - top[..., 1]


def saturation(hidden: torch.Tensor, prev_hidden: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of two hidden states over the last dim."""
    return F.cosine_similarity(hidden.float(), prev_hidden.float(), dim=-1)


def features(logits: torch.Tensor, hidden: torch.Tensor, prev_hidden: torch.Tensor) -> torch.Tensor:
    """The classifier's scalar features [..., 3]: max_prob, margin, saturation (one softmax)."""
    probs = F.softmax(logits.float(), dim=-1)
    top = probs.topk(2, dim=-1).values
    return torch.stack((top[..., 0], top[..., 0] - top[..., 1], saturation(hidden, prev_hidden)), dim=-1)


MEASURES = {
    "max_prob": lambda logits, h, prev, depth=None: float(max_prob(logits)),
    "margin": lambda logits, h, prev, depth=None: float(margin(logits)),
    "saturation": lambda logits, h, prev, depth=None: float(saturation(h, prev)),
}
CHOICES = (*MEASURES, "classifier")  # "classifier" needs a trained ExitClassifier (the CLI loads the model's)


def confidence(measure) -> Confidence:
    """The measure as a callable (logits [V], hidden [D], prev_hidden [D], depth) -> float.

    `measure` is a name in MEASURES or a trained ExitClassifier (see `load_exit_classifier`)."""
    from recursa.engine.exit_classifier import ExitClassifier

    if isinstance(measure, ExitClassifier):
        return measure.score
    if measure == "classifier":
        raise RecursaError("the classifier measure needs a trained exit classifier: pass "
                           "load_exit_classifier(MODEL_DIR) instead of the name")
    if measure not in MEASURES:
        raise RecursaError(f"unknown confidence measure {measure!r}; choose from {', '.join(CHOICES)}")
    return MEASURES[measure]


__all__ = ["Confidence", "max_prob", "margin", "saturation", "features", "confidence", "MEASURES", "CHOICES"]
