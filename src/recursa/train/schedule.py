"""Learning-rate schedules: linear warmup, then cosine or warmup-stable-decay (WSD).

`lr_factor` is a pure function of (step, progress) so a resumed run recomputes the same rate
with no scheduler object to save. `progress` in [0, 1] is how far the post-warmup part of the run
has gone: by steps when --max-steps is given, by wall time when --max-minutes is (the larger of
the two when both are), so a time-budgeted demo still cools down before its deadline.
"""
from __future__ import annotations

import math


def lr_factor(kind: str, step: int, progress: float, warmup_steps: int,
              min_ratio: float = 0.1, decay_frac: float = 0.2) -> float:
    """Multiplier on the peak lr for optimizer step `step` (0-based)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    p = min(max(progress, 0.0), 1.0)
    if kind == "cosine":
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * p))
    if kind == "wsd":
        start = 1.0 - decay_frac
        if p <= start or decay_frac == 0:
            return 1.0
        return 1.0 - (1.0 - min_ratio) * (p - start) / decay_frac
    raise ValueError(f"unknown schedule {kind!r}")


def progress(step: int, warmup_steps: int, max_steps: int | None,
             elapsed_s: float, max_minutes: float | None) -> float:
    """Fraction of the run done after warmup: max of the step fraction and the time fraction."""
    p = 0.0
    if max_steps is not None:
        p = max(p, (step - warmup_steps) / max(max_steps - warmup_steps, 1))
    if max_minutes is not None:
        p = max(p, elapsed_s / (60.0 * max_minutes))
    return min(max(p, 0.0), 1.0)
