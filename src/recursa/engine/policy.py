"""Span-selection policies: which span the engine runs next, and when new tokens may enter.

The engine cuts the model's depths into spans at its boundaries (llm_engine.py). Tokens waiting
at boundaries whose spans run the same stages (unique layers, in the same order; e.g. the loops
of a shared block) share weights, so they form one group keyed by the span key and run
together. A policy sees the groups {key: [sequences whose in-flight tokens wait there]} and
returns the key to run; `stage_keys` lists the keys in the order of their boundaries (the sweep).
Below, "depth" and "stage" read as "boundary" and "span": for a model with one layer per span
they are the same.

- DepthwisePolicy ("depthwise", the default): continuous depth-wise batching as a *sweep* over
  the depths. New tokens enter depth 0 every step; the engine visits depths 0, 1, .., L-1 and
  round again, and the run at depth d takes every token waiting at d's stage (unique layer),
  whatever its request or loop — so one run of a shared layer serves the new tokens at loop 0
  and the old ones at loop 2, a request whose token stopped early starts its next token while
  others still loop, and depths with nobody waiting are skipped. When the token budget binds
  (stages with a budget's worth of tokens waiting), the sweep visits only those, so every run
  is full; when it does not, a sweep costs no more runs than a synchronous round. Within the
  stage it runs, the earliest admitted request and then those that have generated the fewest
  tokens go first (`run_order`; the scheduler fills the run by first fit in that order; the
  earliest goes first so that no request starves): the runs of any admission order are
  equally full while many requests wait, but the order decides who is left behind — admission
  order lets the first requests race ahead and finish early, leaving a long tail of part-empty
  runs for the rest; progress order keeps the requests together, so runs stay full to the end
  (the demo MoR model at a 32-token budget: 956 stage runs instead of 1,142, 98% of the ideal).
- FullestPolicy ("fullest"): always run the stage with the most waiting tokens (ties: the
  deepest). The obvious greedy rule; it fragments the batch, because a token that leaves a
  crowded stage starts a new small group behind it.
- SynchronousPolicy ("synchronous"): the baseline every anchor uses. A batch enters together
  and steps through all depths; tokens that finish wait, and no new token enters until the
  whole batch has exited.
All give identical outputs; only the order of work (hence speed) differs.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

from recursa.engine.sequence import Sequence


class StagePolicy(ABC):
    @abstractmethod
    def admit(self, running: list[Sequence]) -> bool:
        """May new chunks enter depth 0 now?"""

    @abstractmethod
    def pick(self, groups: dict[int, list[Sequence]]) -> int:
        """The stage key whose waiting tokens run next (groups is non-empty)."""

    def run_order(self, seqs: list[Sequence]) -> list[Sequence]:
        """The picked stage's requests in the order the scheduler fills the run (default: admission)."""
        return seqs


class DepthwisePolicy(StagePolicy):
    def __init__(self, stage_keys: list[int], token_budget: int):
        self.order = list(stage_keys)    # the sweep: depth d's stage, for d = 0 .. L-1
        self.budget = token_budget
        self.last = -1

    def admit(self, running):
        return True

    def pick(self, groups):
        sizes = {k: sum(s.chunk_len for s in g) for k, g in groups.items()}
        full = {k for k, n in sizes.items() if n >= self.budget}
        if not full and sum(sizes.values()) >= self.budget:   # the budget binds but no stage fills it yet
            full = {max(sizes, key=sizes.get)}
        n = len(self.order)
        for step in range(1, n + 1):     # the next depth of the sweep whose stage has (enough) waiting tokens
            i = (self.last + step) % n
            if self.order[i] in (full or groups):
                self.last = i
                return self.order[i]
        raise ValueError("no waiting stage group")

    def run_order(self, seqs):
        # the earliest admitted first, as in admission order: it always gets in, so none starves (a chunk too big
        # for what a run has left would otherwise wait for ever behind newer ones); then the least advanced
        return seqs[:1] + sorted(seqs[1:], key=lambda s: s.num_tokens - s.num_prompt_tokens)   # stable sort


class FullestPolicy(StagePolicy):
    def admit(self, running):
        return True

    def pick(self, groups):
        return max(groups, key=lambda key: (sum(s.chunk_len for s in groups[key]), max(s.depth for s in groups[key])))


class SynchronousPolicy(StagePolicy):
    def admit(self, running):
        return not any(s.in_flight for s in running)

    def pick(self, groups):
        return min(groups, key=lambda key: min(s.depth for s in groups[key]))


def make_policy(name: str, stage_keys: list[int], token_budget: int) -> StagePolicy:
    """The policy `name` for a model whose depth d runs the stage `stage_keys[d]`, runs of <= token_budget tokens."""
    if name == "depthwise":
        return DepthwisePolicy(stage_keys, token_budget)
    return {"fullest": FullestPolicy, "synchronous": SynchronousPolicy}[name]()
