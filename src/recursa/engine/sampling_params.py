"""Per-request sampling settings, with vLLM's names and defaults.

    SamplingParams(temperature=0.0, max_tokens=32)               # greedy
    SamplingParams(temperature=0.8, top_p=0.95, seed=1, stop=["\n\n"])
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

from recursa.errors import RecursaError


def _is_int(value) -> bool:
    """An integer (Python or numpy), not a bool (True is an int to Python, not a count)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    """A finite real number, not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(slots=True)
class SamplingParams:
    temperature: float = 1.0          # 0 = greedy
    top_k: int = 0                    # 0 or -1 = no top-k cut
    top_p: float = 1.0                # 1 = no nucleus cut
    seed: int | None = None           # per-request generator: same seed, same tokens, whatever the batch
    max_tokens: int = 16
    stop: list[str] = field(default_factory=list)          # stop strings (not included in the text)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    n: int = 1                        # completions per prompt; only 1 is supported

    def __post_init__(self) -> None:
        """Check types and ranges here, so a bad value is refused when the request is added and
        never reaches a step (where it would fail the requests batched with it)."""
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not isinstance(self.stop, (list, tuple)) or any(not isinstance(s, str) or not s for s in self.stop):
            raise RecursaError("stop must be a string or a list of non-empty strings")
        if not isinstance(self.stop_token_ids, (list, tuple)) or any(not _is_int(t) for t in self.stop_token_ids):
            raise RecursaError(f"stop_token_ids must be a list of integers, got {self.stop_token_ids!r}")
        self.stop, self.stop_token_ids = list(self.stop), [int(t) for t in self.stop_token_ids]
        if not _is_real(self.temperature) or not self.temperature >= 0:
            raise RecursaError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not _is_int(self.top_k) or self.top_k < -1:
            raise RecursaError(f"top_k must be an integer: -1 or 0 (off) or positive, got {self.top_k!r}")
        if not _is_real(self.top_p) or not 0 < self.top_p <= 1:
            raise RecursaError(f"top_p must be a number in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (not _is_int(self.seed) or not -2**63 <= self.seed < 2**64):
            raise RecursaError(f"seed must be a 64-bit integer or None, got {self.seed!r}")
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise RecursaError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not isinstance(self.ignore_eos, bool):
            raise RecursaError(f"ignore_eos must be True or False, got {self.ignore_eos!r}")
        if not _is_int(self.n) or self.n != 1:
            raise RecursaError(f"n={self.n!r}: only one completion per request (n=1) is supported; "
                               f"add the prompt several times with different seeds instead")
        self.top_k, self.max_tokens = int(self.top_k), int(self.max_tokens)
        self.temperature, self.top_p = float(self.temperature), float(self.top_p)
        self.seed = None if self.seed is None else int(self.seed)
