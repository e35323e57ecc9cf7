"""Second-stage training of the learned exit classifier (CALM) on a frozen model with exits.

1. Examples: the frozen model runs over windows of the packed corpus (train split); at every
   exit depth each token gives (hidden state, [max_prob, margin, saturation], label) with
   label = 1 when the exit's top-1 equals the final layer's top-1 (`exit_examples`). The hidden
   state and features are those the early-exit decoder sees (saturation against the previous
   exit, the first exit against one layer below).
2. Fit: one small MLP per exit (recursa.model.exit_classifier.ExitClassifier), plain BCE with
   AdamW on random minibatches of the collected examples, all exits each step (`fit`).
3. Report on held-out windows of the val split (`evaluate`): per exit the agreement rate, the
   classifier's accuracy at 0.5, ROC AUC of the classifier and of max-prob, and the precision
   of exiting (share of exited tokens that agree) for the classifier at 0.5 and for max-prob at
   the same exit rate — the comparison that says whether the classifier beats the free measure.
4. The classifier (with the report) is saved into the model directory.

    train_exit_classifier("runs/ee/model", "data/corpus-smollm", steps=300, tokens=16384)
    recursa train-exit-classifier runs/smol-exits-lr1e-1/model --data data/corpus-smollm --steps 300 --threads 1
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from recursa.data.packed import read_tokens
from recursa.model.confidence import features
from recursa.model.exit_classifier import ExitClassifier
from recursa.errors import RecursaError
from recursa.model import load
from recursa.model.exits import ExitSpec, exit_logits, saturation_reference
from recursa.train.data import data_vocab_size, val_windows

Examples = dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # depth -> (hidden [N,D], feats [N,3], labels [N])


@torch.no_grad()
def exit_examples(model: nn.Module, input_ids: torch.Tensor, depths) -> Examples:
    """(hidden, feats, labels) at each exit depth for every position of input_ids [B, T]."""
    depths = ExitSpec(tuple(depths)).check(model.depth).depths
    hidden = model.forward_hidden(input_ids)
    final = model.head(hidden[-1]).argmax(-1)
    out = {}
    for d in depths:
        h = hidden[d]
        logits = exit_logits(model, h, d)
        labels = (logits.argmax(-1) == final).float()
        feats = features(logits, h, hidden[saturation_reference(depths, d)])
        out[d] = (h.flatten(0, 1).float(), feats.flatten(0, 1), labels.flatten())
    return out


def collect(model: nn.Module, windows: np.ndarray, depths, batch_size: int = 4) -> Examples:
    """exit_examples over token windows [N, T], concatenated per exit."""
    parts: dict[int, list] = {}
    for i in range(0, len(windows), batch_size):
        ids = torch.as_tensor(np.asarray(windows[i:i + batch_size]).astype(np.int64))
        for d, ex in exit_examples(model, ids, depths).items():
            parts.setdefault(d, []).append(ex)
    return {d: tuple(torch.cat(t) for t in zip(*p)) for d, p in parts.items()}


def fit(clf: ExitClassifier, examples: Examples, steps: int, lr: float = 3e-3, batch_size: int = 256,
        seed: int = 0) -> list[float]:
    """AdamW on the BCE summed over exits; returns the loss per step (mean over exits)."""
    if steps <= 0:
        raise RecursaError(f"steps must be positive, got {steps}")
    if not examples or any(ex[0].shape[0] == 0 for ex in examples.values()):
        raise RecursaError("no examples to train the exit classifier on")
    generator = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(clf.parameters(), lr=lr, weight_decay=0.01)
    losses = []
    clf.train()
    for _ in range(steps):
        total = 0.0
        for d, (h, f, y) in examples.items():
            idx = torch.randint(0, h.shape[0], (min(batch_size, h.shape[0]),), generator=generator)
            total = total + F.binary_cross_entropy_with_logits(clf(h[idx], f[idx], d), y[idx])
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        losses.append(float(total.detach()) / len(examples))
    clf.eval()
    return losses


def auc(scores: torch.Tensor, labels: torch.Tensor) -> float | None:
    """ROC AUC (probability a random agreeing token outranks a disagreeing one; ties count half)."""
    pos, neg = int(labels.sum()), int((1 - labels).sum())
    if pos == 0 or neg == 0:
        return None
    order = torch.argsort(scores.double())
    ranks = torch.empty(len(scores), dtype=torch.float64)
    sorted_scores = scores.double()[order]
    # average ranks over ties
    _, inverse, counts = torch.unique_consecutive(sorted_scores, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).double()
    ranks[order] = (ends - (counts.double() - 1) / 2)[inverse]
    return float((ranks[labels.bool()].sum() - pos * (pos + 1) / 2) / (pos * neg))


def precision_at_rate(scores: torch.Tensor, labels: torch.Tensor, n_exit: int) -> float | None:
    """Share of agreeing tokens among the `n_exit` most confident ones (None when none exit)."""
    if n_exit <= 0:
        return None
    return float(labels[torch.argsort(scores, descending=True)[:n_exit]].mean())


@torch.no_grad()
def evaluate(clf: ExitClassifier, examples: Examples) -> dict[int, dict]:
    """Per exit depth: n, agree_rate, accuracy, auc, auc_max_prob, exit_rate, precision, precision_max_prob."""
    report = {}
    for d, (h, f, y) in examples.items():
        p = torch.sigmoid(clf(h, f, d))
        n_exit = int((p >= 0.5).sum())
        report[d] = {"n": len(y), "agree_rate": float(y.mean()), "accuracy": float(((p >= 0.5).float() == y).float().mean()),
                     "auc": auc(p, y), "auc_max_prob": auc(f[:, 0], y), "exit_rate": n_exit / len(y),
                     "precision": precision_at_rate(p, y, n_exit),
                     "precision_max_prob": precision_at_rate(f[:, 0], y, n_exit)}
    return report


def train_exit_classifier(model_dir: str | Path, data_dir: str | Path, *, steps: int = 300, tokens: int = 16384,
                          val_tokens: int = 4096, seq_len: int = 256, batch_size: int = 4, lr: float = 3e-3,
                          hidden_dim: int = 64, seed: int = 0,
                          log: Callable[[str], None] = print) -> tuple[ExitClassifier, dict]:
    """Collect examples from `data_dir` with the frozen model in `model_dir`, fit, evaluate, save there."""
    model_dir, data_dir = Path(model_dir), Path(data_dir)
    for name, v in (("steps", steps), ("tokens", tokens), ("val_tokens", val_tokens), ("seq_len", seq_len),
                    ("batch_size", batch_size), ("hidden_dim", hidden_dim)):
        if not isinstance(v, int) or v <= 0:
            raise RecursaError(f"{name} must be a positive integer, got {v!r}")
    if not lr > 0:
        raise RecursaError(f"lr must be positive, got {lr}")
    if not data_dir.is_dir():
        raise RecursaError(f"data directory {data_dir} does not exist (run `recursa data prepare` first)")
    model = load(model_dir).requires_grad_(False)
    spec = ExitSpec.from_config(model.cfg)
    if not spec.depths:
        raise RecursaError(f"{model_dir} has no exits (config exit_depths is empty): train it with "
                           f"`recursa train --exit-depths ...`")
    if data_vocab_size(data_dir) != model.cfg.vocab_size:
        raise RecursaError(f"the data in {data_dir} uses vocab_size {data_vocab_size(data_dir)}, the model at "
                           f"{model_dir} has {model.cfg.vocab_size}: tokenize with the model's tokenizer")
    if seq_len > model.cfg.max_seq_len:
        raise RecursaError(f"seq_len {seq_len} exceeds the model's max_seq_len {model.cfg.max_seq_len}")
    t0 = time.perf_counter()
    train_w = val_windows(read_tokens(data_dir, "train"), seq_len, -(-tokens // seq_len))[:, :-1]
    val_w = val_windows(read_tokens(data_dir, "val"), seq_len, -(-val_tokens // seq_len))[:, :-1]
    train_ex, val_ex = collect(model, train_w, spec.depths, batch_size), collect(model, val_w, spec.depths, batch_size)
    log(f"collected {train_w.size} train / {val_w.size} val tokens at exits {list(spec.depths)} "
        f"in {time.perf_counter() - t0:.1f}s")
    torch.manual_seed(seed)
    clf = ExitClassifier(model.cfg.dim, spec.depths, hidden_dim)
    losses = fit(clf, train_ex, steps, lr, seed=seed)
    report = {"steps": steps, "train_tokens": int(train_w.size), "val_tokens": int(val_w.size),
              "loss_first": losses[0], "loss_last": float(np.mean(losses[-max(1, steps // 10):])),
              "exits": {str(d): r for d, r in evaluate(clf, val_ex).items()}}
    clf.save(model_dir, report)
    log(f"loss {report['loss_first']:.4f} -> {report['loss_last']:.4f} over {steps} steps "
        f"({time.perf_counter() - t0:.1f}s); saved to {model_dir}")
    for d, r in report["exits"].items():
        log(f"exit {d}: agree {r['agree_rate']:.1%} | accuracy {r['accuracy']:.1%} | AUC {_fmt(r['auc'])} "
            f"(max_prob {_fmt(r['auc_max_prob'])}) | exits {r['exit_rate']:.1%} at 0.5 with precision "
            f"{_fmt(r['precision'])} (max_prob at the same rate {_fmt(r['precision_max_prob'])})")
    return clf, report


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


__all__ = ["exit_examples", "collect", "fit", "evaluate", "auc", "precision_at_rate", "train_exit_classifier"]
