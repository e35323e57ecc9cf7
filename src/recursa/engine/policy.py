"""Stage-selection policies: which stage the engine runs next, and when new tokens may enter.

Tokens waiting at depths that map to the same unique layer (`model.depth_to_layer`) share
weights, so they form one *stage group* and run together. A policy sees the groups
{layer: [sequences whose in-flight chunk waits there]} and returns the layer to run.

- DepthwisePolicy: continuous depth-wise batching. New tokens enter depth 0 every step and the
  fullest stage runs (ties: the deepest, so requests finish and free memory sooner).
- SynchronousPolicy: the baseline every anchor uses. A batch enters together and steps through
  all depths; tokens that finish wait, and no new token enters until the whole batch has exited.
Both give identical outputs; only the order of work (hence speed) differs.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

from recursa.engine.sequence import Sequence


class StagePolicy(ABC):
    name = "base"

    @abstractmethod
    def admit(self, running: list[Sequence]) -> bool:
        """May new chunks enter depth 0 now?"""

    @abstractmethod
    def pick(self, groups: dict[int, list[Sequence]]) -> int:
        """The layer whose waiting tokens run next (groups is non-empty)."""


class DepthwisePolicy(StagePolicy):
    name = "depthwise"

    def admit(self, running):
        return True

    def pick(self, groups):
        return max(groups, key=lambda layer: (sum(s.chunk_len for s in groups[layer]),
                                              max(s.depth for s in groups[layer])))


class SynchronousPolicy(StagePolicy):
    name = "synchronous"

    def admit(self, running):
        return not any(s.in_flight for s in running)

    def pick(self, groups):
        return min(groups, key=lambda layer: min(s.depth for s in groups[layer]))


def make_policy(name: str) -> StagePolicy:
    return {"depthwise": DepthwisePolicy, "synchronous": SynchronousPolicy}[name]()
