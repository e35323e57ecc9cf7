"""Where a Mixture-of-Recursions model's in-flight tokens go at span boundaries (recursa.model.mor).

The router of depth_router.py's family for MoR models. At the start of each recursion step it
decides per token (`model.mor_route`, causal: a token's own hidden state only) whether the token
runs the step; at the step's end its residual update is gated (`model.mor_update`). Tokens that
stop wait (`MoRState.parked`) at the end of the shared block; the rest of their chunk joins them
there and they all run the coda and head together, so causal order holds everywhere.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from recursa.engine.depth_router import Router
from recursa.engine.model_runner import ModelRunner
from recursa.engine.sequence import Sequence


class Routed:
    """One routing call's tensors for the tokens it sent on: hidden states at the shared block's
    entry and at the step's start [N, D], and their gates [N, 1]. A request's tokens are rows
    row .. row + n of them (MoRState), so a group that arrives as it was routed gathers nothing."""
    __slots__ = ("h_entry", "h_start", "gate")

    def __init__(self, h_entry: torch.Tensor, h_start: torch.Tensor, gate: torch.Tensor):
        self.h_entry, self.h_start, self.gate = h_entry, h_start, gate


@dataclass
class MoRState:
    routed: Routed | None = None            # where the in-flight tokens' routing tensors are (None: not in the block)
    row: int = 0                            # ... their first row there
    parked: list = field(default_factory=list)       # (positions, hidden) of tokens that stopped early
    route_log: list = field(default_factory=list)    # (positions, steps run): see `steps_run`
    newest_steps: int = 0                   # recursion steps of the newest token


def gather(seqs: list[Sequence], states: list[MoRState], names=Routed.__slots__) -> list[torch.Tensor]:
    """The Routed tensors `names` of the requests' in-flight tokens, concatenated in order: the
    routing call's own where the requests are all of its rows in order (the usual case at step 0),
    its rows where they come from one call (some of its requests stopped), else each request's rows."""
    first, at, one = states[0].routed, 0, True
    for s, st in zip(seqs, states):
        one = one and st.routed is first
        at = at + s.n_in_flight if at == st.row else -1
    if one and at == len(first.gate):
        return [getattr(first, name) for name in names]
    if one:
        idx = torch.tensor([st.row + i for s, st in zip(seqs, states) for i in range(s.n_in_flight)])
        return [getattr(first, name).index_select(0, idx) for name in names]
    rows = [(st.routed, st.row, st.row + s.n_in_flight) for s, st in zip(seqs, states)]
    return [torch.cat([getattr(r, name)[a:b] for r, a, b in rows]) for name in names]


class MoRRouting(Router):
    """Per-token recursion depth chosen causally by the model's router."""
    State = MoRState
    loop_boundaries = False   # its own boundaries: the recursion steps' ends (not the block's entry)

    def __init__(self, model, runner: ModelRunner):
        super().__init__(model, runner)
        st = model.structure()
        self.k, self.n_steps = len(st.shared_layers), st.n_loops
        self.entry, self.end = st.shared[0], st.shared[-1] + 1
        self.outside = len(st.prelude) + len(st.coda)
        self.capture_depth = self.entry if self.entry > 0 else None

    def boundaries(self):
        # no boundary at the shared block's entry: every token runs step 0, so the prelude's span runs
        # on through step 0, and the runner captures the hidden states at the entry (capture_depth)
        return {self.depth} | {self.entry + r * self.k for r in range(1, self.n_steps + 1)}

    def executed_depth(self, seq):
        return self.outside + self.k * self._of(seq).newest_steps

    def steps_run(self, seq: Sequence) -> dict[int, int]:
        """Recursion steps each position of seq ran, from its routing log."""
        out: dict[int, int] = {}
        for positions, r in self._of(seq).route_log:
            out.update(dict.fromkeys(positions.tolist(), r))
        return out

    def enter(self, seqs):
        if self.entry == 0:
            self._route(seqs, 0, entering=True)

    def arrive(self, seqs):
        if self.runner.captured is not None:   # a span from depth 0 through step 0: route step 0 at the entry
            self._route(seqs, 0, self.runner.captured, entering=True)
        ends: dict[int, list[Sequence]] = {}
        for s in seqs:
            r, rem = divmod(s.depth - self.entry, self.k)
            if rem == 0 and 1 <= r <= self.n_steps and self._of(s).routed is not None:
                ends.setdefault(r, []).append(s)
        for r, group in sorted(ends.items()):
            states = [self._of(s) for s in group]   # step r-1 ends: gate its residual branch, the
            h_start, gate = gather(group, states, ("h_start", "gate"))   # group's tokens in one (elementwise) update
            whole = len(ends) == 1 and len(group) == len(seqs)   # the span's own output, in its order
            h_end = self.runner.output if whole else torch.cat([s.hidden for s in group])
            h = self.model.mor_update(h_start, h_end, gate)
            for s, st, h_s in zip(group, states, h.split([s.n_in_flight for s in group])):
                s.hidden = h_s
                st.route_log.append((s.positions, r))
                # the newest token is still in flight (a whole chunk is, e.g. every decode token)
                if s.n_in_flight == s.chunk_end - s.chunk_start or int(s.positions[-1]) == s.chunk_end - 1:
                    st.newest_steps = r
            if r < self.n_steps:
                self._route(group, r, h)
            else:
                for s in group:
                    self._leave_block(s, active=True)
        return self._finish([s for s in seqs if s.depth == self.depth])

    def _route(self, seqs: list[Sequence], step: int, h: torch.Tensor | None = None, entering: bool = False) -> None:
        """Route seqs' in-flight tokens at the start of `step` (h: their hidden states, concatenated)."""
        h = torch.cat([s.hidden for s in seqs]) if h is None else h
        h_entry = h if entering else gather(seqs, [self._of(s) for s in seqs], ("h_entry",))[0]
        with torch.inference_mode():
            go, gate = self.model.mor_route(step, h, h_entry)
        sizes = [s.n_in_flight for s in seqs]
        go_host = go.cpu()          # positions live on the host, hidden states on the model's device
        routed = Routed(h_entry, h, gate)
        if len(sizes) == len(go_host):   # one token each (decode): a request goes on or stops whole
            for i, (s, keep) in enumerate(zip(seqs, go_host.tolist())):
                st = self._of(s)
                if keep:
                    st.routed, st.row = routed, i
                else:   # waits at the block's end with its hidden state at this step's start
                    st.parked.append((s.positions, h[i:i + 1]))
                    s.depth = self.end
                    self._leave_block(s, active=False)
            return
        everyone, row = bool(go_host.all()), 0   # everyone: the common case (always at step 0), one check
        for s, n in zip(seqs, sizes):
            st, hs, gh = self._of(s), h[row:row + n], go_host[row:row + n]
            if everyone or bool(gh.all()):
                st.routed, st.row = routed, row
            elif not bool(gh.any()):      # nothing left to recur: the chunk jumps to the block's end
                st.parked.append((s.positions, hs))
                s.depth = self.end
                self._leave_block(s, active=False)
            else:
                g = go[row:row + n]
                st.parked.append((s.positions[~gh], hs[~g]))
                s.set_tokens(s.positions[gh], hs[g])
                st.routed, st.row = Routed(h_entry[row:row + n][g], s.hidden, gate[row:row + n][g]), 0
            row += n

    def _leave_block(self, s: Sequence, active: bool) -> None:
        """The whole chunk is at the shared block's end: parked and active tokens rejoin in position order."""
        st = self._of(s)
        parts = st.parked + ([(s.positions, s.hidden)] if active else [])
        if len(parts) > 1:
            positions = torch.cat([p for p, _ in parts])
            order = positions.argsort()
            hidden = torch.cat([h for _, h in parts])
            s.set_tokens(positions[order], hidden[order.to(hidden.device)])
        else:
            s.set_tokens(*parts[0])
        st.parked = []
        st.routed = None


__all__ = ["MoRRouting", "MoRState", "Routed", "gather"]
