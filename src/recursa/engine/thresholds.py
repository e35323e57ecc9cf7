"""Exit thresholds: a token exits when its confidence is >= threshold(step).

All share one small interface, so the early-exit decoder does not care which it holds:
`threshold(step, depth)` gives the value for generation step t (0-based new-token index) at the
exit after `depth` layers, and `observe(confidence, agreed, depth)` receives, for every exit a
token passed (or exited at) whose full-depth prediction is later computed, that exit's
confidence and whether its prediction equalled the deep one (only FREE's estimator uses it).
`depth` may be None for a caller with a single exit.

- `Fixed(value)`.
- `CALMDecay(value, tau, max_steps)`: CALM's step-decaying threshold. We use the formula of the
  CALM paper (Schuster et al. 2022, eq. 5):  λ(t) = clip_[0,1]( 0.9·λ + 0.1·exp(−τ·t/N) ),
  N = max new tokens. It starts at 0.9λ + 0.1 and decays towards 0.9λ, i.e. it never reaches λ
  itself and is higher than λ early only when λ < 1. ANCHORS.md notes that CALM's public code
  writes the decay differently; we did not reproduce that variant, so thresholds tuned with the
  public code do not transfer one to one.
- `PerExit(prototype)`: one threshold per exit depth, a fresh copy of `prototype` on first use; what
  `make_threshold("free")` returns, with one `BetaMixture` per exit, so each exit is calibrated
  on its own (confidence, agreed) pairs — a depth-20 exit agrees with the final layer far more
  often than a depth-10 one at the same confidence.
- `BetaMixture(zeta)`: FREE's adaptive estimator (one exit). Pairs (c, agreed) are split by outcome; each
  outcome's confidences are fitted with a Beta distribution by the method of moments (running
  sums, O(1) memory, refit on demand), the prior is the share of agreements. The posterior we use
  is the point posterior at c = thr (density ratio),
      P(agree | c) = π·f_a(c) / (π·f_a(c) + (1 − π)·f_d(c)),
  because the exit decision is made per token at its own confidence. The threshold is the
  smallest grid value t such that P(agree | c) >= ζ for every grid c >= t (so a bump of the
  posterior in the low range cannot open a window of bad exits). Until both outcomes have
  `min_samples` observations, or when no grid value qualifies, it returns `initial`.
  (The tail posterior P(agree | c >= t) would be the other choice: it is larger at every t, so
  it exits earlier for the same ζ.)
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch

from recursa.errors import RecursaError


class Fixed:
    def __init__(self, value: float):
        self.value = float(value)

    def __call__(self, step: int, depth: int | None = None) -> float:
        return self.value

    def observe(self, confidence: float, agreed: bool, depth: int | None = None) -> None:
        """A non-adaptive threshold ignores what the deep passes say."""


class CALMDecay:
    def __init__(self, value: float, tau: float, max_steps: int):
        if max_steps <= 0:
            raise RecursaError(f"CALM decay needs max_steps > 0, got {max_steps}")
        self.value, self.tau, self.max_steps = float(value), float(tau), int(max_steps)

    def __call__(self, step: int, depth: int | None = None) -> float:
        lam = 0.9 * self.value + 0.1 * math.exp(-self.tau * step / self.max_steps)
        return min(1.0, max(0.0, lam))

    def observe(self, confidence: float, agreed: bool, depth: int | None = None) -> None:
        """A non-adaptive threshold ignores what the deep passes say."""


@dataclass
class BetaFit:
    alpha: float
    beta: float

    def log_pdf(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.alpha, self.beta
        log_norm = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
        return log_norm + (a - 1) * torch.log(x) + (b - 1) * torch.log1p(-x)


class _Moments:
    """Running count, sum and sum of squares of confidences clipped into (0, 1)."""

    def __init__(self):
        self.n, self.s, self.ss = 0, 0.0, 0.0

    def add(self, x: float) -> None:
        self.n += 1
        self.s += x
        self.ss += x * x

    def fit(self) -> BetaFit | None:
        if self.n < 2:
            return None
        mean = self.s / self.n
        var = max(self.ss / self.n - mean * mean, 0.0) * self.n / (self.n - 1)
        if var <= 0 or var >= mean * (1 - mean):
            return None  # no Beta has these moments
        common = mean * (1 - mean) / var - 1
        return BetaFit(mean * common, (1 - mean) * common)


class BetaMixture:
    EPS = 1e-4

    def __init__(self, zeta: float = 0.9, initial: float = 1.0, min_samples: int = 20, grid_size: int = 200):
        if not 0 < zeta < 1:
            raise RecursaError(f"zeta must lie in (0, 1), got {zeta}")
        self.zeta, self.initial, self.min_samples = float(zeta), float(initial), int(min_samples)
        self.grid = torch.linspace(self.EPS, 1 - self.EPS, grid_size, dtype=torch.float64)
        self.agree, self.disagree = _Moments(), _Moments()
        self._cached: float | None = None

    def observe(self, confidence: float, agreed: bool, depth: int | None = None) -> None:
        x = min(1 - self.EPS, max(self.EPS, float(confidence)))
        (self.agree if agreed else self.disagree).add(x)
        self._cached = None

    def fit(self) -> tuple[BetaFit, BetaFit, float] | None:
        """(agree component, disagree component, prior of agreement), or None while too few samples."""
        if min(self.agree.n, self.disagree.n) < self.min_samples:
            return None
        fa, fd = self.agree.fit(), self.disagree.fit()
        if fa is None or fd is None:
            return None
        return fa, fd, self.agree.n / (self.agree.n + self.disagree.n)

    def posterior(self, c: torch.Tensor) -> torch.Tensor | None:
        fitted = self.fit()
        if fitted is None:
            return None
        fa, fd, prior = fitted
        la = math.log(prior) + fa.log_pdf(c)
        ld = math.log(1 - prior) + fd.log_pdf(c)
        return torch.sigmoid(la - ld)

    def value(self) -> float:
        if self._cached is None:
            post = self.posterior(self.grid)
            self._cached = self.initial
            if post is not None:
                ok = post >= self.zeta
                # suffix-all: ok_from[i] is True when every grid point >= grid[i] qualifies
                ok_from = torch.flip(torch.cumprod(torch.flip(ok, [0]).to(torch.int64), 0), [0]).bool()
                if ok_from.any():
                    self._cached = float(self.grid[int(ok_from.nonzero()[0])])
        return self._cached

    def __call__(self, step: int, depth: int | None = None) -> float:
        return self.value()


class PerExit:
    """One threshold per exit depth: a copy of `prototype` (as it is when first copied) per depth seen."""

    def __init__(self, prototype):
        self.prototype = prototype
        self.by_depth: dict[int | None, object] = {}

    def at(self, depth: int | None):
        """The threshold of the exit after `depth` layers."""
        if depth not in self.by_depth:
            self.by_depth[depth] = copy.deepcopy(self.prototype)
        return self.by_depth[depth]

    def __call__(self, step: int, depth: int | None = None) -> float:
        return self.at(depth)(step, depth)

    def observe(self, confidence: float, agreed: bool, depth: int | None = None) -> None:
        self.at(depth).observe(confidence, agreed, depth)


def make_threshold(kind: str, value: float = 0.9, *, tau: float = 4.0, max_steps: int = 1,
                   zeta: float = 0.9, min_samples: int = 20) -> Fixed | CALMDecay | PerExit:
    """Build a threshold by name: fixed | calm | free (one BetaMixture per exit, each at `value` until fitted)."""
    if kind == "fixed":
        return Fixed(value)
    if kind == "calm":
        return CALMDecay(value, tau, max_steps)
    if kind == "free":
        return PerExit(BetaMixture(zeta, initial=value, min_samples=min_samples))
    raise RecursaError(f"unknown threshold {kind!r}; choose from fixed, calm, free")


__all__ = ["Fixed", "CALMDecay", "BetaMixture", "BetaFit", "PerExit", "make_threshold"]
