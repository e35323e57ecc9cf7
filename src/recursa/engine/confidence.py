"""Confidence measures: how sure an exit is that its prediction equals the full model's.

Every measure maps (logits [V], hidden [D], prev_hidden [D]) of one token at one exit to a
float, larger = more confident, compared against a threshold by the early-exit decoder:

    max_prob     the largest softmax probability (CALM "softmax", FREE's confidence)
    margin       top-1 minus top-2 softmax probability
    saturation   cosine similarity of the hidden state at this exit and at the previous exit
                 (for the first exit: the hidden state one layer below) — CALM's "state" measure
    ExitClassifier  a small MLP on [hidden, max_prob, margin, saturation] giving P(exit agrees
                 with the final prediction); trained in a second stage with `train_exit_classifier`
                 on `classifier_data` (exits frozen, labels = exit argmax == final argmax).

    conf = confidence("max_prob")(logits, h, h_prev)
    clf = ExitClassifier(dim); train_exit_classifier(clf, *classifier_data(model, ids, depth=2))
    conf = confidence(clf)(logits, h, h_prev)
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from recursa.errors import RecursaError
from recursa.model.exits import ExitHeads, exit_logits

Confidence = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], float]


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
    """The classifier's scalar features [..., 3]: max_prob, margin, saturation."""
    return torch.stack((max_prob(logits), margin(logits), saturation(hidden, prev_hidden)), dim=-1)


class ExitClassifier(nn.Module):
    """MLP on [hidden, scalar confidence features] -> logit of "this exit agrees with the final"."""

    def __init__(self, dim: int, hidden_dim: int = 64):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim + 3, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, 1))

    def forward(self, hidden: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        """hidden [..., D], feats [..., 3] -> logits [...]."""
        x = torch.cat((hidden.float(), feats.float()), dim=-1)
        return self.net(x.to(self.net[0].weight.dtype)).squeeze(-1)

    @torch.no_grad()
    def score(self, logits: torch.Tensor, hidden: torch.Tensor, prev_hidden: torch.Tensor) -> float:
        return float(torch.sigmoid(self(hidden, features(logits, hidden, prev_hidden))))


@torch.no_grad()
def classifier_data(model: nn.Module, input_ids: torch.Tensor, depth: int, prev_depth: int | None = None,
                    heads: ExitHeads | None = None):
    """(hidden [N,D], feats [N,3], labels [N]) for the exit at `depth` over every position of input_ids [B,T].

    label 1 when the exit's argmax equals the full model's argmax. `prev_depth` is the previous
    exit's depth for the saturation feature (default depth - 1, as the decoder uses for a first exit).
    """
    if not 0 < depth < model.depth:
        raise RecursaError(f"exit depth {depth} must lie in 1..{model.depth - 1}")
    hidden = model.forward_hidden(input_ids)
    h, prev = hidden[depth], hidden[depth - 1 if prev_depth is None else prev_depth]
    logits = exit_logits(model, h, depth, heads)
    labels = (logits.argmax(-1) == model.head(hidden[-1]).argmax(-1)).float()
    return h.flatten(0, 1), features(logits, h, prev).flatten(0, 1), labels.flatten()


def train_exit_classifier(classifier: ExitClassifier, hidden: torch.Tensor, feats: torch.Tensor,
                          labels: torch.Tensor, steps: int = 200, lr: float = 1e-2, batch_size: int = 256,
                          seed: int = 0) -> list[float]:
    """Second-stage training: BCE of the classifier on frozen (hidden, feats, labels); returns the losses."""
    if hidden.shape[0] == 0:
        raise RecursaError("no examples to train the exit classifier on")
    generator = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(classifier.parameters(), lr=lr, weight_decay=0.0)
    # balance the classes so a mostly-agreeing exit does not learn "always exit"
    pos = labels.mean().clamp(1e-3, 1 - 1e-3)
    pos_weight = (1 - pos) / pos
    losses = []
    classifier.train()
    for _ in range(steps):
        idx = torch.randint(0, hidden.shape[0], (min(batch_size, hidden.shape[0]),), generator=generator)
        loss = F.binary_cross_entropy_with_logits(classifier(hidden[idx], feats[idx]), labels[idx],
                                                  pos_weight=pos_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    classifier.eval()
    return losses


MEASURES = {
    "max_prob": lambda logits, h, prev: float(max_prob(logits)),
    "margin": lambda logits, h, prev: float(margin(logits)),
    "saturation": lambda logits, h, prev: float(saturation(h, prev)),
}


def confidence(measure: str | ExitClassifier) -> Confidence:
    """The measure as a callable (logits [V], hidden [D], prev_hidden [D]) -> float."""
    if isinstance(measure, ExitClassifier):
        return measure.score
    if measure not in MEASURES:
        raise RecursaError(f"unknown confidence measure {measure!r}; choose from {', '.join(MEASURES)} "
                           f"or pass a trained ExitClassifier")
    return MEASURES[measure]


__all__ = ["Confidence", "max_prob", "margin", "saturation", "features", "ExitClassifier", "classifier_data",
           "train_exit_classifier", "confidence", "MEASURES"]
