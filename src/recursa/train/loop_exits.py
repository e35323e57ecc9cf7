"""Loop-end early-exit losses for recursive models (cycle / middle_cycle sharing).

A recursive model can stop after any loop r of its shared block: the hidden state at the loop's
last depth goes through the coda layers (middle_cycle: the last unique layer; none for cycle)
and the shared final norm + LM head. Post-training for early exit (Bae et al. 2025) adds, to the
final-loop CE (the `ce` term):

    loop_exit_ce       sum over intermediate loops r < N-1 of CE(exit r)          weight λ = 0.1
    loop_exit_distill  sum over r < N-1 of KL(final loop's softmax || exit r's)  (optional)

The final loop's distribution is detached: it teaches the exits, the exits do not pull it back.
Both terms read the hidden states after every depth ("hidden") and share one computation of the
exit logits per batch (cached in the outputs dict under "loop_exit_logits").

    terms = loop_exit_terms(model, weight=0.1, distill_weight=1.0)
    recursa train --init models/smol-10x3 --data data/corpus-smollm --out runs/ee --loop-exit-weight 0.1
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from recursa.errors import RecursaError
from recursa.train.data import Batch
from recursa.train.losses import LossTerm

NEEDS = frozenset({"logits", "hidden"})


def loop_exit_logits(model: nn.Module, hidden: list[torch.Tensor]) -> list[torch.Tensor]:
    """Logits [B,T,V] of every intermediate loop's exit (r = 0..N-2), coda layers included."""
    s = model.structure()
    T = hidden[0].shape[1]
    cos, sin = model.rope(torch.arange(T, device=hidden[0].device), hidden[0].dtype)
    exits = []
    for end in s.loop_ends[:-1]:
        h = hidden[end + 1]  # hidden[0] is the embedding, hidden[d + 1] the output of depth d
        for d in s.coda:
            h, _ = model.forward_stage(d, h, cos, sin)
        exits.append(model.head(h))
    return exits


def _exits(model: nn.Module, outputs: dict) -> list[torch.Tensor]:
    if "loop_exit_logits" not in outputs:
        outputs["loop_exit_logits"] = loop_exit_logits(model, outputs["hidden"])
    return outputs["loop_exit_logits"]


def loop_exit_ce(model: nn.Module, batch: Batch, outputs: dict) -> torch.Tensor:
    """Sum over intermediate loops of the mean next-token CE at that loop's exit."""
    targets = batch.targets.flatten()
    return sum(F.cross_entropy(z.float().flatten(0, 1), targets) for z in _exits(model, outputs))


def loop_exit_distill(model: nn.Module, batch: Batch, outputs: dict) -> torch.Tensor:
    """Sum over intermediate loops of KL(final exit || loop exit) per token, the final one detached."""
    teacher = F.log_softmax(outputs["logits"].detach().float(), dim=-1).flatten(0, 1)
    return sum(F.kl_div(F.log_softmax(z.float(), dim=-1).flatten(0, 1), teacher, log_target=True,
                        reduction="batchmean") for z in _exits(model, outputs))


def loop_exit_terms(model: nn.Module, weight: float = 0.1, distill_weight: float = 0.0) -> list[LossTerm]:
    """The loss terms to add to the objective (none when both weights are 0)."""
    if weight <= 0 and distill_weight <= 0:
        return []
    s = model.structure()
    if s.sharing not in ("cycle", "middle_cycle") or s.n_loops < 2:
        raise RecursaError(f"loop-end exits need a model with cycle or middle_cycle sharing and n_loops >= 2; "
                           f"this one has sharing={s.sharing!r}, n_loops={model.cfg.n_loops}")
    terms = []
    if weight > 0:
        terms.append(LossTerm("loop_exit_ce", weight, loop_exit_ce, needs=NEEDS))
    if distill_weight > 0:
        terms.append(LossTerm("loop_exit_distill", distill_weight, loop_exit_distill, needs=NEEDS))
    return terms


__all__ = ["loop_exit_logits", "loop_exit_ce", "loop_exit_distill", "loop_exit_terms"]
