"""Exit heads: where a token may stop, and how a shallow hidden state becomes logits.

An exit at depth `e` reads the hidden state after the first `e` layers (`hidden[e]` in
`Decoder.forward_hidden`'s list, whose entry 0 is the embedding) and sends it through the
shared final norm + LM head (`model.head`), as LayerSkip and FREE do: no new weights, so a
pretrained model has usable exits once they are fine-tuned. `own_norm=True` gives each exit its
own RMSNorm (initialised to the final norm's gain) in front of the shared LM head; those norms
live in an `ExitHeads` module.

The model's exits are part of its config (`ModelConfig.exit_depths`, `exit_own_norm`); a model
whose config has own-norm exits owns its `ExitHeads` as `model.exit_heads`, so the norms are
saved, loaded and trained with the other weights, and `exit_logits` uses them by default.

    spec = ExitSpec.from_config(model.cfg)    # or ExitSpec(depths=(2,)) for a one-off spec
    logits = exit_logits(model, hidden[2], 2)
    model = with_exits(load("models/smollm2-135m"), [10, 20], own_norm=True)  # add exits to a model

The final depth L is always an exit and is not listed in `depths`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from recursa.errors import RecursaError
from recursa.model.layers import RMSNorm


class ExitSpecError(RecursaError, ValueError):
    """An exit specification that does not fit the model; the message says why."""


@dataclass(frozen=True)
class ExitSpec:
    depths: tuple[int, ...] = field(default_factory=tuple)  # layers run before each exit, ascending, < L
    own_norm: bool = False                                   # per-exit RMSNorm instead of the final norm

    def __post_init__(self):
        depths = tuple(int(d) for d in self.depths)
        object.__setattr__(self, "depths", depths)
        if any(d <= 0 for d in depths):
            raise ExitSpecError(f"exit depths must be positive (layers run before the exit), got {list(depths)}")
        if list(depths) != sorted(set(depths)):
            raise ExitSpecError(f"exit depths must be strictly ascending, got {list(depths)}")

    def check(self, n_layers: int) -> "ExitSpec":
        """Raise unless every exit lies strictly inside a model of depth `n_layers`."""
        if not self.depths:
            raise ExitSpecError("no exit depths given")
        if self.depths[-1] >= n_layers:
            raise ExitSpecError(f"exit depth {self.depths[-1]} is not below the model depth {n_layers} "
                                f"(the final depth is always an exit; list only intermediate ones)")
        return self

    @classmethod
    def from_config(cls, cfg) -> "ExitSpec":
        """The exits a ModelConfig declares (empty when it has none)."""
        return cls(depths=tuple(cfg.exit_depths), own_norm=cfg.exit_own_norm)

    def to_dict(self) -> dict:
        return {"depths": list(self.depths), "own_norm": self.own_norm}

    @classmethod
    def from_dict(cls, d: dict) -> "ExitSpec":
        unknown = set(d) - {"depths", "own_norm"}
        if unknown:
            raise ExitSpecError(f"unknown exit spec keys {sorted(unknown)}")
        return cls(depths=tuple(d.get("depths", ())), own_norm=bool(d.get("own_norm", False)))


class ExitHeads(nn.Module):
    """One RMSNorm per exit depth (own_norm exits), keyed by str(depth)."""

    def __init__(self, model: nn.Module, spec: ExitSpec):
        super().__init__()
        spec.check(model.depth)
        self.spec = spec
        self.norms = nn.ModuleDict({str(d): RMSNorm(model.cfg.dim, model.cfg.norm_eps) for d in spec.depths})
        with torch.no_grad():
            for norm in self.norms.values():
                norm.weight.copy_(model.norm.weight)


def lm_weight(model: nn.Module) -> torch.Tensor:
    """The LM head's weight [V, D] (the tied embedding when there is no separate head)."""
    return model.embed_tokens.weight if model.lm_head is None else model.lm_head.weight


def exit_logits(model: nn.Module, hidden: torch.Tensor, depth: int, heads: ExitHeads | None = None) -> torch.Tensor:
    """Logits [..., V] of the exit after `depth` layers from hidden [..., D].

    The final depth and exits without an own norm go through `model.head`; with `heads` (by
    default the model's own `exit_heads`, if any), an exit listed there uses its own norm
    before the shared LM head.
    """
    if heads is None:
        heads = getattr(model, "exit_heads", None)
    if heads is None or depth == model.depth or str(depth) not in heads.norms:
        return model.head(hidden)
    return model.lm_logits(heads.norms[str(depth)](hidden))


def with_exits(model: nn.Module, depths, own_norm: bool = False) -> nn.Module:
    """Give `model` (in place) the exits `depths`: its config changes, own norms start as the final norm.

    Own norms the model already has for a kept depth keep their trained gains."""
    cfg = model.cfg.replace(exit_depths=list(depths), exit_own_norm=own_norm)
    old = getattr(model, "exit_heads", None)
    heads = ExitHeads(model, ExitSpec.from_config(cfg)) if own_norm else None
    if heads is not None and old is not None:
        with torch.no_grad():
            for key, norm in heads.norms.items():
                if key in old.norms:
                    norm.weight.copy_(old.norms[key].weight)
    if heads is not None:
        heads.to(device=model.norm.weight.device, dtype=model.norm.weight.dtype)
    model.cfg = cfg
    model.exit_heads = heads
    return model


__all__ = ["ExitSpec", "ExitSpecError", "ExitHeads", "exit_logits", "lm_weight", "with_exits"]
