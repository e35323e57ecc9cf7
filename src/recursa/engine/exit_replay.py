"""The exit rule replayed on full forwards, and the Learn-then-Test choice of its threshold.

`replay(model, policy, sequences, prompt_len)` runs one full forward per sequence and keeps, at
every position the engine decides by the exit rule, each exit's confidence (the policy's own measure
code) and whether that exit's argmax equals the final layer's. `Replay.outcome(t)` is the whole
rule under threshold t: a token leaves at the FIRST exit whose confidence is >= t, else at full
depth. `choose_threshold` tests candidate thresholds from the most conservative down (fixed-sequence
testing): each needs a one-sided Clopper-Pearson lower bound on its agreement >= target at
confidence 1 - delta, the first failure stops, the last success is chosen. recursa.engine.calibration
builds the sequences and the saved result on top of this.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from recursa.engine.exit_policy import ExitPolicy
from recursa.errors import RecursaError
from recursa.model.exits import exit_logits, saturation_reference


def binomial_tail(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p), summed in log space."""
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    if p <= 0.0 or p >= 1.0:
        return float(p >= 1.0)
    j = torch.arange(k, n + 1, dtype=torch.float64)
    log_pmf = (math.lgamma(n + 1) - torch.lgamma(j + 1) - torch.lgamma(n - j + 1)
               + j * math.log(p) + (n - j) * math.log1p(-p))
    return float(torch.logsumexp(log_pmf, 0).exp())


def clopper_pearson_lower(k: int, n: int, delta: float) -> float:
    """One-sided Clopper-Pearson lower bound on a binomial proportion from k successes in n trials:
    the p with P(X >= k | p) = delta (0 when k = 0), so that P(true p >= bound) >= 1 - delta."""
    if not 0 < delta < 1:
        raise RecursaError(f"delta must lie in (0, 1), got {delta}")
    if not 0 <= k <= n:
        raise RecursaError(f"need 0 <= k <= n, got k={k}, n={n}")
    if k == 0:
        return 0.0
    if k == n:
        return delta ** (1.0 / n)   # the tail is p^n
    lo, hi = 0.0, 1.0             # the tail grows with p: bisect
    for _ in range(80):
        mid = (lo + hi) / 2
        if binomial_tail(k, n, mid) < delta:
            lo = mid
        else:
            hi = mid
    return lo


@dataclass
class Replay:
    """Per decided token: each exit's confidence [N, E], whether its argmax equals the final one [N, E],
    and which sequence it belongs to [N]."""
    confidence: torch.Tensor
    agrees: torch.Tensor
    depths: tuple[int, ...]
    n_layers: int
    sequence: torch.Tensor | None = None

    def rule(self, threshold: float | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per token, whether the rule at `threshold` (None: never exit) agrees with full depth, and its depth."""
        n = self.confidence.shape[0]
        if threshold is None:
            return torch.ones(n, dtype=torch.bool), torch.full((n,), self.n_layers)
        passes = self.confidence >= threshold
        exits = passes.any(1)
        first = passes.to(torch.int8).argmax(1)              # first exit that passes
        agree = torch.where(exits, self.agrees.gather(1, first[:, None])[:, 0], torch.ones_like(exits))
        return agree, torch.where(exits, torch.tensor(self.depths)[first], torch.tensor(self.n_layers))

    def outcome(self, threshold: float | None) -> tuple[int, int, float]:
        """(tokens that agree with full depth, tokens, mean depth) of the rule at `threshold`."""
        agree, depth = self.rule(threshold)
        n = agree.numel()
        return int(agree.sum()), n, float(depth.float().mean()) if n else float(self.n_layers)


def effective_counts(agree: torch.Tensor, sequence: torch.Tensor) -> tuple[int, int]:
    """(k, n) of an independent sample as informative as `agree`, whose tokens come in correlated
    sequences: n / the design effect (the variance of the agreement rate estimated over sequences as
    clusters, over the variance it would have with independent tokens), k = rate x n, rounded down."""
    n = agree.numel()
    rate = float(agree.double().mean())
    groups = int(sequence.max()) + 1
    if groups < 2 or rate in (0.0, 1.0):
        return int(agree.sum()), n
    a = torch.zeros(groups, dtype=torch.float64).index_add_(0, sequence, agree.double())
    m = torch.zeros(groups, dtype=torch.float64).index_add_(0, sequence, torch.ones(n, dtype=torch.float64))
    cluster_var = float(((a - rate * m) ** 2).sum()) / n ** 2 * groups / (groups - 1)
    design_effect = max(1.0, cluster_var / (rate * (1 - rate) / n))
    n_eff = max(1, int(n / design_effect))
    return int(rate * n_eff), n_eff


@torch.inference_mode()
def replay(model, policy: ExitPolicy, sequences: list[list[int]], prompt_len: int) -> Replay:
    """The exit rule's inputs at every decided position of `sequences` (prompt_len prompt tokens, then
    the continuation): one full forward each."""
    depths = tuple(policy.spec.depths)
    confs, agrees, which = [], [], []
    for i, ids in enumerate(sequences):
        hidden = model.forward_hidden(torch.tensor([ids[:-1]]))
        rows = slice(prompt_len, len(ids) - 1)   # these predict continuation tokens 1.. (token 0: prefill)
        final = model.head(hidden[-1][0, rows]).argmax(-1)
        c, a = [], []
        for d in depths:
            h = hidden[d][0, rows]
            logits = exit_logits(model, h, d, policy.heads)
            ref = hidden[saturation_reference(depths, d)][0, rows] if policy.uses_reference else None
            c.append(torch.tensor(policy.confidences(logits, h, ref, d), dtype=torch.float64))
            a.append(logits.argmax(-1) == final)
        confs.append(torch.stack(c, 1))
        agrees.append(torch.stack(a, 1))
        which.append(torch.full((len(ids) - 1 - prompt_len,), i))
    return Replay(torch.cat(confs), torch.cat(agrees), depths, model.depth, torch.cat(which))


def candidates(replay: Replay, n: int = 200) -> list[float]:
    """Thresholds to test, most conservative first: quantiles of the observed confidences."""
    values = replay.confidence.flatten()
    if values.numel() == 0:
        return []
    q = torch.quantile(values, torch.linspace(1, 0, n, dtype=torch.float64)).tolist()
    return sorted(set(q), reverse=True)


UNITS = ("token", "sequence")


def choose_threshold(replay: Replay, target: float, delta: float, grid: list[float] | None = None,
                     unit: str = "token") -> dict:
    """Fixed-sequence test of `grid` (descending): the least conservative threshold whose agreement's
    lower bound is >= target, with its figures; threshold None when not even the first passes.
    unit "token": tokens as independent trials; "sequence": the bound on the effective sample size
    that sequences as correlated clusters leave (effective_counts)."""
    check_target(target, delta)
    if unit not in UNITS:
        raise RecursaError(f"unknown bound unit {unit!r}; choose from {', '.join(UNITS)}")
    chosen = dict(threshold=None, bound=None, agree=None, effective_tokens=None, mean_depth=float(replay.n_layers),
                  tested=0)
    for t in (candidates(replay) if grid is None else grid):
        agree, depth = replay.rule(t)
        k, n = int(agree.sum()), agree.numel()
        if unit == "sequence" and n:
            k, n = effective_counts(agree, replay.sequence)
        bound = clopper_pearson_lower(k, n, delta) if n else 0.0
        chosen["tested"] += 1
        if bound < target:
            break
        chosen.update(threshold=t, bound=bound, agree=float(agree.double().mean()), effective_tokens=n,
                      mean_depth=float(depth.float().mean()))
    return chosen


def check_target(target: float, delta: float) -> None:
    if not (isinstance(target, (int, float)) and 0 < target < 1):
        raise RecursaError(f"the target agreement must lie in (0, 1), got {target}")
    if not (isinstance(delta, (int, float)) and 0 < delta < 1):
        raise RecursaError(f"delta (1 - the confidence of the bound) must lie in (0, 1), got {delta}")


__all__ = ["Replay", "replay", "candidates", "choose_threshold", "check_target", "clopper_pearson_lower",
           "binomial_tail", "effective_counts", "UNITS"]
