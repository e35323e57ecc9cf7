"""Per-request sampling settings, with vLLM's names and defaults.

    SamplingParams(temperature=0.0, max_tokens=32)               # greedy
    SamplingParams(temperature=0.8, top_p=0.95, seed=1, stop=["\n\n"])
"""
from __future__ import annotations

from dataclasses import dataclass, field

from recursa.errors import RecursaError


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

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids)
        if not self.temperature >= 0:
            raise RecursaError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < -1:
            raise RecursaError(f"top_k must be -1, 0 (off) or positive, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise RecursaError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_tokens < 1:
            raise RecursaError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise RecursaError("stop strings must be non-empty strings")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0
