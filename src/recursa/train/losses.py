"""The training objective as a weighted sum of named loss terms.

Why terms: later model families add losses (exit heads, routers) without touching the loop. A
`LossTerm` is (name, weight, fn(model, batch, outputs) -> scalar, needs). `needs` says which
outputs it reads: "logits" (always computed), "hidden" (hidden state after the embedding and
after every depth, from `Decoder.forward_hidden`), "teacher_logits" (a frozen teacher's logits,
computed without grad), "mor" (a Mixture-of-Recursions model's routing info from its top-k
training forward, `forward_mor(ids, mode="topk")`; see train/mor_losses.py). Each term's unweighted value is logged under its name.

The forward runs through `ForwardOutputs`, one nn.Module around the decoder, so DDP / FSDP2
hooks see a single `forward` call whatever the terms need. Terms receive the unwrapped decoder
as `model` for reading its config or structure; they compute from `outputs`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from recursa.train.data import Batch

OUTPUTS = ("logits", "hidden", "teacher_logits", "mor")


class ForwardOutputs(nn.Module):
    """The module that training wraps in DDP/FSDP: input ids -> dict of outputs."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, hidden: bool = False, mor: bool = False) -> dict:
        if mor:
            logits, info = self.model.forward_mor(input_ids, mode="topk")
            return {"logits": logits, "mor": info}
        if not hidden:
            return {"logits": self.model(input_ids)}
        states = self.model.forward_hidden(input_ids)
        return {"logits": self.model.head(states[-1]), "hidden": states}


@dataclass
class LossTerm:
    name: str
    weight: float
    fn: Callable[[nn.Module, Batch, dict], torch.Tensor]
    needs: frozenset = field(default_factory=lambda: frozenset({"logits"}))

    def __post_init__(self):
        unknown = set(self.needs) - set(OUTPUTS)
        if unknown:
            raise ValueError(f"loss term {self.name!r} needs unknown outputs {sorted(unknown)}; known: {OUTPUTS}")


def next_token_ce(model: nn.Module, batch: Batch, outputs: dict) -> torch.Tensor:
    """Mean next-token cross-entropy (nats), computed in fp32."""
    logits = outputs["logits"]
    return F.cross_entropy(logits.float().flatten(0, 1), batch.targets.flatten())


def distill_kl(temperature: float = 1.0) -> Callable:
    """Forward KL(teacher || student) per token on temperature-softened logits, scaled by T^2."""

    def fn(model: nn.Module, batch: Batch, outputs: dict) -> torch.Tensor:
        s = F.log_softmax(outputs["logits"].float() / temperature, dim=-1).flatten(0, 1)
        t = F.log_softmax(outputs["teacher_logits"].float() / temperature, dim=-1).flatten(0, 1)
        return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature**2

    return fn


class Objective:
    """Runs the forward once, then every term; returns (weighted total, {name: value})."""

    def __init__(self, terms: list[LossTerm], teacher: nn.Module | None = None):
        names = [t.name for t in terms]
        if len(set(names)) != len(names):
            raise ValueError(f"loss term names must be unique, got {names}")
        self.terms, self.teacher = terms, teacher
        self.needs = frozenset().union(*(t.needs for t in terms))
        if "teacher_logits" in self.needs and teacher is None:
            raise ValueError("a loss term needs teacher_logits but no teacher model was given")

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.terms]

    def __call__(self, forward: nn.Module, model: nn.Module, batch: Batch):
        outputs = forward(batch.inputs, hidden="hidden" in self.needs, **({"mor": True} if "mor" in self.needs else {}))
        if "teacher_logits" in self.needs:
            with torch.no_grad():
                outputs["teacher_logits"] = self.teacher(batch.inputs)
        values = {t.name: t.fn(model, batch, outputs) for t in self.terms}
        total = sum(t.weight * values[t.name] for t in self.terms)
        return total, {k: v.detach() for k, v in values.items()}


def default_objective(teacher: nn.Module | None = None, distill_weight: float = 0.0,
                      temperature: float = 1.0) -> Objective:
    """Next-token CE, plus forward KL to a teacher when one is given with a positive weight."""
    terms = [LossTerm("ce", 1.0, next_token_ce)]
    if teacher is not None and distill_weight > 0:
        terms.append(LossTerm("distill_kl", distill_weight, distill_kl(temperature),
                              needs=frozenset({"logits", "teacher_logits"})))
    return Objective(terms, teacher if distill_weight > 0 else None)
