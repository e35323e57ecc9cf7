"""LayerSkip layer dropout: per-sample stochastic skipping of layers, more often the deeper they are.

Why: a model whose upper layers are sometimes missing in training learns to predict from
shallower hidden states, which makes early exits accurate (LayerSkip, Elhoushi et al. 2024,
trains with this beside its early-exit loss). For each sequence in the batch and each depth l
(0-based, of L), the layer's residual update is dropped (the hidden state passes through
unchanged) with probability

    p_l = p_max · D(l),   D(l) = exp(l·ln2 / (L−1)) − 1   ("exp", LayerSkip's default)
                          D(l) = l / (L−1)                 ("linear")

so p_0 = 0 and p_{L−1} = p_max. (LayerSkip also scales p over training time; we keep p fixed.)
Draws are independent per sample and depth; the kept samples of a layer are gathered, run through
it in one call, and scattered back (no per-sample Python loop, and dropped samples cost nothing).
The layer is called even when every sample skips it (with an empty batch), so every rank runs the
same modules — what FSDP's gathers and DDP's reducer expect.

Dropout is active only in training mode with gradients enabled; eval mode or `torch.no_grad()`
(the loop's `evaluate`) run the plain forward. `LayerDropForward` subclasses `ForwardOutputs`, so
the loop wraps it in DDP/FSDP exactly as the plain one and loss terms see the same outputs
("hidden" holds the states after the possibly skipped layers, so exit losses train on them).

    forward = LayerDropForward(model, 0.2)               # or layer_drop_rates(L, 0.2, "linear")
    recursa train --data data/corpus --out runs/ls --preset small --exit-depths 2,4 --exit-weight 0.3 \\
        --layer-drop 0.2 --max-minutes 4
"""
from __future__ import annotations

import math

import torch
from torch import nn

from recursa.errors import RecursaError
from recursa.train.config import LAYER_DROP_SCHEDULES as SCHEDULES
from recursa.train.losses import ForwardOutputs


def layer_drop_rates(n_layers: int, p_max: float, schedule: str = "exp") -> list[float]:
    """Drop probability per depth: 0 at the first layer rising to p_max at the last."""
    if schedule not in SCHEDULES:
        raise RecursaError(f"unknown layer-drop schedule {schedule!r}; choose from {', '.join(SCHEDULES)}")
    if not 0 <= p_max <= 1:
        raise RecursaError(f"the layer-drop rate must lie in [0, 1], got {p_max}")
    if n_layers < 2:
        return [0.0] * n_layers
    span = n_layers - 1
    if schedule == "exp":
        return [p_max * (math.exp(l * math.log(2) / span) - 1) for l in range(n_layers)]
    return [p_max * l / span for l in range(n_layers)]


class LayerDropForward(ForwardOutputs):
    """ForwardOutputs whose training forward skips layers per sample with probability rates[l]."""

    def __init__(self, model: nn.Module, p_max: float = 0.0, schedule: str = "exp",
                 rates: list[float] | None = None):
        super().__init__(model)
        if model.cfg.is_mor:
            raise RecursaError("layer dropout skips fixed depths; a Mixture-of-Recursions model routes its own "
                               "depth per token: train it without --layer-drop")
        self.rates = list(rates) if rates is not None else layer_drop_rates(model.depth, p_max, schedule)
        if len(self.rates) != model.depth or not all(0 <= r <= 1 for r in self.rates):
            raise RecursaError(f"layer-drop rates need one value in [0, 1] per depth ({model.depth}), got {self.rates}")

    @property
    def active(self) -> bool:
        return self.training and torch.is_grad_enabled() and any(r > 0 for r in self.rates)

    def forward(self, input_ids: torch.Tensor, hidden: bool = False, **kwargs) -> dict:
        if not self.active or any(kwargs.values()):  # other outputs (e.g. routing info): the plain forward
            return super().forward(input_ids, hidden, **kwargs)
        m = self.model
        B, T = input_ids.shape
        h = m.embed(input_ids)
        cos, sin = m.rope(torch.arange(T, device=input_ids.device), h.dtype)
        states = [h]
        for d, rate in enumerate(self.rates):
            if rate <= 0:
                h, _ = m.forward_stage(d, h, cos, sin)
            else:
                keep = (torch.rand(B, device=h.device) >= rate).nonzero().squeeze(1)
                out, _ = m.forward_stage(d, h.index_select(0, keep), cos, sin)
                h = h.index_copy(0, keep, out)
            states.append(h)
        out = {"logits": m.head(h)}
        if hidden:
            out["hidden"] = states
        return out


def make_forward(model: nn.Module, p_max: float = 0.0, schedule: str = "exp") -> ForwardOutputs:
    """The module training wraps: the plain ForwardOutputs, or LayerDropForward when p_max > 0."""
    return LayerDropForward(model, p_max, schedule) if p_max > 0 else ForwardOutputs(model)


__all__ = ["SCHEDULES", "layer_drop_rates", "LayerDropForward", "make_forward"]
