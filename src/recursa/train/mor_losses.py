"""Router loss terms for Mixture-of-Recursions models (recursa.model.mor), for the training Objective.

The forward of a MoR model in training is `forward_mor(ids, mode="topk")` (ForwardOutputs does
it when a term needs the "mor" output); `outputs["mor"]` is its routing info. Terms:

    mor_bce       expert choice: for steps r >= 1, binary CE between the router score of each
                  token that survived step r-1 and whether top-k selected it at step r, averaged
                  over steps. It teaches sigmoid(score) > threshold to reproduce top-k causally
                  at inference (Bae et al.: coefficient 0.001). With an auxiliary router the
                  BCE trains that router (on detached hidden states) instead.
    mor_z         router z-loss: expert, mean squared score of the competing tokens per step;
                  token, mean squared logsumexp of the Nr logits (1e-5).
    mor_balance   token choice, mor_balance="loss": Nr * sum_i f_i * P_i with f_i the fraction of
                  tokens given depth i+1 and P_i the mean (normalised) router probability (0.1).
    mor_bias      token choice, mor_balance="bias" (loss-free balancing): weight 0; computing the
                  term updates the router's `bias` buffer under no_grad, by `rate` * sign(mean
                  load - load) per depth, once per micro-batch (DDP broadcasts buffers from rank
                  0, so ranks agree). Its logged value is max load / mean load.
    mor_steps     weight 0: the mean number of recursion steps a token ran (logged).

    terms = mor_terms(model, bce_weight=0.001, z_weight=1e-5, balance_weight=0.1, bias_rate=1e-3)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from recursa.train.data import Batch
from recursa.train.losses import LossTerm

NEEDS = frozenset({"logits", "mor"})


def expert_bce(model: nn.Module, batch: Batch, outputs: dict) -> torch.Tensor:
    info = outputs["mor"]
    scores = info["aux_scores"] if info["aux_scores"] is not None else info["scores"]
    losses = []
    for r in range(1, len(scores)):
        alive = info["alive"][r]
        target = info["selected"][r][alive].to(scores[r].dtype)
        losses.append(F.binary_cross_entropy_with_logits(scores[r][alive].float(), target.float()))
    return torch.stack(losses).mean()


def router_z(model: nn.Module, batch: Batch, outputs: dict) -> torch.Tensor:
    info = outputs["mor"]
    if info["scores"] is None:  # token choice
        return torch.logsumexp(info["logits"].float(), -1).pow(2).mean()
    return torch.stack([s[a].float().pow(2).mean() for s, a in zip(info["scores"], info["alive"])]).mean()


def _load(info: dict) -> torch.Tensor:
    """Fraction of tokens given each depth 1..Nr, [Nr]."""
    nr = info["probs"].shape[-1]
    return F.one_hot(info["depth"].flatten() - 1, nr).float().mean(0)


def token_balance(model: nn.Module, batch: Batch, outputs: dict) -> torch.Tensor:
    info = outputs["mor"]
    probs = info["probs"].float().flatten(0, -2)
    probs = probs / probs.sum(-1, keepdim=True)  # sigmoid gates: normalise to a distribution
    return probs.shape[-1] * (_load(info) * probs.mean(0)).sum()


def token_bias(rate: float):
    def fn(model: nn.Module, batch: Batch, outputs: dict) -> torch.Tensor:
        load = _load(outputs["mor"])
        if model.training:
            model.router.update_bias(load, rate)
        return (load.max() / load.mean()).detach()

    return fn


def mean_steps(model: nn.Module, batch: Batch, outputs: dict) -> torch.Tensor:
    return torch.stack([s.float().mean() for s in outputs["mor"]["selected"]]).sum().detach()


def mor_terms(model: nn.Module, bce_weight: float = 0.001, z_weight: float = 1e-5, balance_weight: float = 0.1,
              bias_rate: float = 1e-3) -> list[LossTerm]:
    """The router terms for `model` (none for a non-MoR model). Always includes `mor_steps`, so a
    MoR model's training forward is the top-k one."""
    cfg = model.cfg
    if not cfg.is_mor:
        return []
    terms = [LossTerm("mor_steps", 0.0, mean_steps, needs=NEEDS)]
    if cfg.mor_router == "expert" and bce_weight > 0:
        terms.append(LossTerm("mor_bce", bce_weight, expert_bce, needs=NEEDS))
    if z_weight > 0:
        terms.append(LossTerm("mor_z", z_weight, router_z, needs=NEEDS))
    if cfg.mor_router == "token" and cfg.mor_balance == "loss" and balance_weight > 0:
        terms.append(LossTerm("mor_balance", balance_weight, token_balance, needs=NEEDS))
    if cfg.mor_router == "token" and cfg.mor_balance == "bias" and bias_rate > 0:
        terms.append(LossTerm("mor_bias", 0.0, token_bias(bias_rate), needs=NEEDS))
    return terms


__all__ = ["expert_bce", "router_z", "token_balance", "token_bias", "mean_steps", "mor_terms", "NEEDS"]
