"""Confidence measures: how sure an exit is that its prediction equals the full model's.

Every measure maps (logits [V], hidden [D], prev_hidden [D], depth) of one token at the exit after
`depth` layers to a float, larger = more confident, compared against a threshold by the
engine's exit policy:

    max_prob     the largest softmax probability (CALM "softmax", FREE's confidence)
    margin       top-1 minus top-2 softmax probability
    saturation   cosine similarity of the hidden state at this exit and at the previous exit
                 (for the first exit: the hidden state one layer below) — CALM's "state" measure
    classifier   a learned ExitClassifier (recursa.model.exit_classifier): P(exit agrees with the
                 final layer) from the hidden state and the three measures above; trained in a
                 second stage (`recursa train-exit-classifier`) and loaded from the model directory.

Pure tensor math shared by training (exit classifier examples) and the engine's exit policy
(recursa.engine.exit_policy.confidence turns a name or a classifier into a callable).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F


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


__all__ = ["Confidence", "max_prob", "margin", "saturation", "features", "MEASURES", "CHOICES"]
