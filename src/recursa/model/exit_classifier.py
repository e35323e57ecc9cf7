"""The learned exit classifier (CALM's "classifier" confidence): P(exit top-1 == final top-1).

A second-stage model trained on a frozen model with exits (recursa.train.exit_classifier,
`recursa train-exit-classifier`). One small MLP per exit depth, on the features of one token at
that exit:

    x = [ rms(h_e),  max_prob(z_e),  top1 − top2(z_e),  cos(h_e, h_prev) ]     (D + 3 values)

h_e is the exit's hidden state, RMS-normalised without a gain (raw residual streams of
pretrained models differ in scale per depth and carry a few huge channels), z_e the exit's
logits, h_prev the hidden state at the previous exit (the first exit: one layer below), as the
early-exit decoder sees them. The output is a logit; `score` gives its sigmoid, a calibrated
probability (plain BCE, no class reweighting), so a threshold of 0.9 asks for ~90% agreement.

Saved next to the model it was trained for, each file atomically:
`exit_classifier.safetensors` (weights) + `exit_classifier.json` (dim, depths, hidden_dim, and
the validation report of its training run).

    clf = load_exit_classifier("runs/ee/model", model)        # RecursaError if missing or mismatched
    policy = ExitPolicy(ExitSpec.from_config(model.cfg), clf, Fixed(0.9))
    recursa generate runs/ee/model --prompt "..." --exit-strategy parallel --exit-measure classifier
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from recursa.model.confidence import features
from recursa.errors import RecursaError
from recursa.io import save_safetensors, write_json_atomic

WEIGHTS_FILE = "exit_classifier.safetensors"
META_FILE = "exit_classifier.json"
N_STATS = 3  # max_prob, margin, saturation (confidence.features)


def rms_normalise(h: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    h = h.float()
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)


class ExitClassifier(nn.Module):
    """One MLP (D + 3 -> hidden_dim -> 1) per exit depth, keyed by str(depth)."""

    def __init__(self, dim: int, depths, hidden_dim: int = 64):
        super().__init__()
        depths = tuple(int(d) for d in depths)
        if not depths or dim <= 0 or hidden_dim <= 0:
            raise RecursaError(f"an exit classifier needs exit depths and positive sizes, got dim={dim}, "
                               f"depths={list(depths)}, hidden_dim={hidden_dim}")
        self.dim, self.depths, self.hidden_dim = int(dim), depths, int(hidden_dim)
        self.nets = nn.ModuleDict({str(d): nn.Sequential(nn.Linear(dim + N_STATS, hidden_dim), nn.GELU(),
                                                         nn.Linear(hidden_dim, 1)) for d in depths})

    def _net(self, depth: int | None) -> nn.Module:
        if depth is None:
            if len(self.depths) != 1:
                raise RecursaError(f"this exit classifier has exits {list(self.depths)}: say which depth")
            depth = self.depths[0]
        if str(depth) not in self.nets:
            raise RecursaError(f"the exit classifier has no net for depth {depth} (it has {list(self.depths)})")
        return self.nets[str(depth)]

    def forward(self, hidden: torch.Tensor, feats: torch.Tensor, depth: int | None = None) -> torch.Tensor:
        """hidden [..., D], feats [..., 3] -> logits [...] of "this exit agrees with the final layer"."""
        net = self._net(depth)
        x = torch.cat((rms_normalise(hidden), feats.float()), dim=-1)
        return net(x.to(net[0].weight.dtype)).squeeze(-1)

    @torch.no_grad()
    def score(self, logits: torch.Tensor, hidden: torch.Tensor, prev_hidden: torch.Tensor,
              depth: int | None = None) -> float:
        """The confidence-measure interface: P(agree) for one token at the exit after `depth` layers."""
        return float(torch.sigmoid(self(hidden, features(logits, hidden, prev_hidden), depth)))

    def save(self, directory: str | os.PathLike, report: dict | None = None) -> Path:
        """Write exit_classifier.safetensors + exit_classifier.json into the model directory."""
        directory = Path(directory)
        if not directory.is_dir():
            raise RecursaError(f"model directory {directory} does not exist")
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_safetensors(tensors, directory / WEIGHTS_FILE, metadata={"format": "pt", "library": "recursa"})
        meta = {"dim": self.dim, "depths": list(self.depths), "hidden_dim": self.hidden_dim,
                "features": ["rms(hidden)", "max_prob", "margin", "saturation"], "report": report or {}}
        write_json_atomic(directory / META_FILE, meta)
        return directory


def load_exit_classifier(directory: str | os.PathLike, model: nn.Module | None = None) -> ExitClassifier:
    """The classifier saved in a model directory; with `model`, check it fits that model's exits."""
    directory = Path(directory)
    meta_path, weights = directory / META_FILE, directory / WEIGHTS_FILE
    if not directory.is_dir():
        raise RecursaError(f"model directory {directory} does not exist")
    if not meta_path.is_file() or not weights.is_file():
        raise RecursaError(f"{directory} has no exit classifier ({WEIGHTS_FILE} + {META_FILE}): train one with "
                           f"`recursa train-exit-classifier {directory} --data DIR`")
    try:
        meta = json.loads(meta_path.read_text())
        clf = ExitClassifier(int(meta["dim"]), meta["depths"], int(meta["hidden_dim"]))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise RecursaError(f"{meta_path} is not a valid exit classifier description: {e}") from None
    try:
        clf.load_state_dict(load_file(str(weights)), strict=True)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        first = " ".join(str(e).strip().splitlines()[:2])
        raise RecursaError(f"{weights} does not hold the classifier {meta_path} describes: {first}") from None
    if model is not None:
        if clf.dim != model.cfg.dim:
            raise RecursaError(f"the exit classifier in {directory} is for hidden size {clf.dim}, "
                               f"the model has {model.cfg.dim}")
        missing = sorted(set(model.cfg.exit_depths) - set(clf.depths))
        if missing:
            raise RecursaError(f"the exit classifier in {directory} covers exits {list(clf.depths)} but the model "
                               f"also exits at {missing}: retrain it")
    return clf.eval()


__all__ = ["ExitClassifier", "load_exit_classifier", "rms_normalise", "WEIGHTS_FILE", "META_FILE"]
