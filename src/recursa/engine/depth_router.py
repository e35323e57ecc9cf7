"""Where each in-flight token goes when it reaches a span boundary: on, out of the shared block, or out.

The engine calls `enter(seqs)` when chunks are embedded at depth 0 and `arrive(seqs)` after every
span run. A router moves tokens between depths for its model family and returns the requests
whose chunk is done, with the logits of the newest token when it is to be sampled now. It names
the depths where it must see tokens (`boundaries`), which is where the engine ends its spans,
and owns its family's per-request state (a small dataclass per request; `forget` drops it when a
request finishes, is aborted or preempted):

- Router (vanilla and recursive models): a chunk is done at the last depth; its newest
  token's logits come from the final norm + LM head.
- MoRRouting (Mixture-of-Recursions): engine/mor_router.py.
- EarlyExit (exits after chosen depths, e.g. the loop ends of a recursive model): at an exit
  depth the newest decode token's exit logits give a confidence; above the threshold the token
  is emitted from there (synchronized parallel decoding, FREE): its in-flight hidden states wait
  on `ExitState.stack` at that depth, and the next token of the request that reaches that depth
  takes them along, in one causal run, so every deeper KV entry is written exactly. Prefill chunks
  run full depth; each full-depth pass labels every exit it passed (ExitPolicy.observe, FREE's).

All of it works on whole tensors per request or per group of requests; no per-token loops.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from recursa.engine.exit_policy import ExitPolicy
from recursa.engine.model_runner import ModelRunner
from recursa.engine.sequence import Sequence
from recursa.model.exits import saturation_reference

Done = tuple[Sequence, "torch.Tensor | None"]   # (request whose chunk is done, logits [V] to sample from or None)


class Router:
    """Every token runs every depth (vanilla and recursive models); the base of the adaptive routers."""

    State = None    # the family's per-request state (a dataclass), kept in self.state by request
    loop_boundaries = True   # spans end at each loop entry of a shared block (where other loops' tokens join)
    capture_depth = None     # a depth inside a span whose input hidden states arrive() reads (runner.captured)

    def __init__(self, model, runner: ModelRunner):
        self.model, self.runner, self.depth = model, runner, model.depth
        self.state: dict[int, object] = {}

    def _of(self, seq: Sequence):
        st = self.state.get(id(seq))
        if st is None:
            st = self.state[id(seq)] = self.State()
        return st

    def boundaries(self) -> set[int]:
        """Depths where this router must see the tokens (spans end there)."""
        return {self.depth}

    def executed_depth(self, seq: Sequence) -> int:
        """Stage passes behind the newest token's prediction (reported per output token)."""
        return self.depth

    def enter(self, seqs: list[Sequence]) -> None:
        """Chunks just embedded at depth 0."""

    def forget(self, seq: Sequence) -> None:
        """Drop seq's routing state (finished, aborted, or preempted: recomputed from its tokens)."""
        self.state.pop(id(seq), None)

    def check(self, params) -> None:
        """Refuse sampling params this router cannot honour (RecursaError)."""

    def commit(self, seq: Sequence, token: int | None) -> list[tuple[int, int]]:
        """(token, depth) pairs seq outputs now, given the token just sampled for it (None: none was)."""
        return [] if token is None else [(token, self.executed_depth(seq))]

    def stats(self) -> dict:
        return {}

    def arrive(self, seqs: list[Sequence]) -> list[Done]:
        return self._finish([s for s in seqs if s.depth == self.depth])

    def _finish(self, done: list[Sequence]) -> list[Done]:
        sample = [s for s in done if s.chunk_end == s.num_tokens]
        logits = self.runner.run_head(torch.stack([s.hidden[-1] for s in sample])) if sample else []
        rows = dict(zip(map(id, sample), logits))
        return [(s, rows.get(id(s))) for s in done]


@dataclass
class ExitState:
    stack: list = field(default_factory=list)     # (positions, hidden, depth) of exited tokens missing deeper KV
    obs: list = field(default_factory=list)       # (exit depth, confidence, argmax) the newest token passed
    seen: dict = field(default_factory=dict)      # depth -> the newest token's hidden state there
    exit_depth: int = 0                           # depth the newest prediction came from


class EarlyExit(Router):
    """Exits after `policy.spec.depths` with a confidence threshold; lossless KV by parallel decoding."""
    State = ExitState

    def __init__(self, model, runner: ModelRunner, policy: ExitPolicy):
        super().__init__(model, runner)
        policy.spec.check(model.depth)
        self.policy, self.exits = policy, tuple(policy.spec.depths)
        self.refs = {saturation_reference(self.exits, d) for d in self.exits} if policy.uses_reference else set()

    def boundaries(self):
        return {self.depth} | set(self.exits) | self.refs

    def executed_depth(self, seq):
        return self._of(seq).exit_depth

    def _remember(self, seqs: list[Sequence]) -> None:
        """Keep the newest token's hidden state at the depths hidden-state measures compare with."""
        for s in seqs:
            if s.is_decode and s.depth in self.refs:
                self._of(s).seen[s.depth] = s.hidden[-1]

    def enter(self, seqs):
        self._remember(seqs)

    def arrive(self, seqs):
        self._remember(seqs)
        by_depth: dict[int, list[Sequence]] = {}
        for s in seqs:
            if s.is_decode and s.depth in self.exits:
                by_depth.setdefault(s.depth, []).append(s)
        done: list[Done] = []
        exited: set[int] = set()
        for d, group in sorted(by_depth.items()):
            h = torch.stack([s.hidden[-1] for s in group])
            ref_depth = saturation_reference(self.exits, d)
            ref = torch.stack([self._of(s).seen[ref_depth] for s in group]) if self.refs else None
            logits = self.runner.run_head(h, d, self.policy.heads) if self.policy.needs_logits else None
            confs = self.policy.confidences(logits, h, ref, d)
            argmax = logits.argmax(-1).tolist() if logits is not None else [None] * len(group)
            leaving = []
            for i, (s, conf) in enumerate(zip(group, confs)):
                st = self._of(s)
                st.seen[d] = h[i]
                st.obs.append((d, conf, argmax[i]))
                if conf >= self.policy.threshold(len(s.output_token_ids), d) and self.may_exit(s):
                    self.exit(s, d)
                    leaving.append(i)
                    exited.add(id(s))
            self.exited([group[i] for i in leaving], h[leaving], d)
            if leaving and logits is None:   # head-free checks: the head runs for the exiting tokens only
                rows = dict(zip(leaving, self.runner.run_head(h[leaving], d, self.policy.heads)))
            else:
                rows = {i: logits[i] for i in leaving}
            done += [(group[i], rows[i]) for i in leaving]
        for s in seqs:   # tokens waiting at this depth on the stack join the newest one's run
            st = self.state.get(id(s))
            if id(s) in exited or st is None or not st.stack or s.depth >= self.depth:
                continue
            join = [e for e in st.stack if e[2] == s.depth]
            if join:
                st.stack = [e for e in st.stack if e[2] != s.depth]
                s.set_tokens(torch.cat([e[0] for e in join] + [s.positions]),
                             torch.cat([e[1] for e in join] + [s.hidden]))
        return done + self.full_depth([s for s in seqs if s.depth == self.depth])

    # the strategy's hooks (parallel decoding here; state_copy.py and speculative.py change them)
    def may_exit(self, seq: Sequence) -> bool:
        return True

    def exit(self, seq: Sequence, depth: int) -> None:
        """seq's newest token leaves at `depth`: its in-flight tokens wait on the stack there."""
        st = self._of(seq)
        st.stack.append((seq.positions, seq.hidden, depth))
        st.obs, st.seen, st.exit_depth = [], {}, depth

    def exited(self, seqs: list[Sequence], hidden: torch.Tensor, depth: int) -> None:
        """All of this step's exits at `depth` were taken (hidden [n, D]: the exiting tokens')."""

    def full_depth(self, seqs: list[Sequence]) -> list[Done]:
        """Chunks at the model's end: sample the newest token, label the exits it passed."""
        full = self._finish(seqs)
        for s, row in full:
            st = self._of(s)
            if row is not None:
                self.policy.observe(st.obs, int(row.argmax()))
            st.obs, st.seen, st.exit_depth = [], {}, self.depth
        return full


__all__ = ["Router", "EarlyExit", "ExitState", "Done"]
