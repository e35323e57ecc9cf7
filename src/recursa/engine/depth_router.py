"""Where each in-flight token goes after a stage run: on, out of the shared block, or out of the model.

The engine calls `arrive(seqs)` when tokens reach a new depth (after embedding, and after every
stage run). A router moves tokens between depths for its model family and returns the requests
whose chunk is done, with the logits of the newest token when it is to be sampled now:

- FullDepth (vanilla and recursive models): a chunk is done at the last depth; its newest
  token's logits come from the final norm + LM head.
- MoRRouting (Mixture-of-Recursions, recursa.model.mor): at the start of each recursion step the
  router decides per token (`model.mor_route`, causal: a token's own hidden state only) whether
  it runs the step; at the step's end its residual update is gated (`model.mor_update`). Tokens
  that stop wait in `seq.parked` at the end of the shared block; the rest of their chunk joins
  them there and they all run the coda and head together, so causal order holds everywhere.
- EarlyExit (exits after chosen depths, e.g. the loop ends of a recursive model): at an exit
  depth the newest decode token's exit logits give a confidence; above the threshold the token
  is emitted from there (synchronized parallel decoding, FREE): its in-flight hidden states wait
  on `seq.stack` at that depth, and the next token of the request that reaches that depth takes
  them along, in one causal run, so every deeper KV entry is written exactly. Prefill chunks run
  full depth. Each full-depth pass feeds (confidence, exit argmax == final argmax, exit depth)
  for every exit the token passed to the threshold (FREE's online calibration, per exit).

All of it works on whole tensors per request or per group of requests; no per-token loops.
"""
from __future__ import annotations

import torch

from recursa.engine.model_runner import ModelRunner
from recursa.engine.sequence import Sequence
from recursa.errors import RecursaError

Done = tuple[Sequence, "torch.Tensor | None"]   # (request whose chunk is done, logits [V] to sample from or None)


class FullDepth:
    """Every token runs every depth."""

    def __init__(self, model, runner: ModelRunner):
        self.model, self.runner, self.depth = model, runner, model.depth

    def executed_depth(self, seq: Sequence) -> int:
        """Stage passes behind the newest token's prediction (reported per output token)."""
        return self.depth

    def arrive(self, seqs: list[Sequence]) -> list[Done]:
        return self._finish([s for s in seqs if s.depth == self.depth])

    def _finish(self, done: list[Sequence]) -> list[Done]:
        sample = [s for s in done if s.chunk_end == s.num_tokens]
        logits = self.runner.run_head(torch.stack([s.hidden[-1] for s in sample])) if sample else []
        rows = dict(zip(map(id, sample), logits))
        for s in done:
            s.exit_depth = self.executed_depth(s)
        return [(s, rows.get(id(s))) for s in done]


class MoRRouting(FullDepth):
    """Per-token recursion depth chosen causally by the model's router."""

    def __init__(self, model, runner: ModelRunner):
        super().__init__(model, runner)
        st = model.structure()
        self.k = len(st.shared_layers)
        self.n_steps = st.n_loops
        self.entry = st.shared[0]
        self.end = st.shared[-1] + 1
        self.outside = len(st.prelude) + len(st.coda)

    def executed_depth(self, seq: Sequence) -> int:
        return self.outside + self.k * seq.newest_steps

    def arrive(self, seqs: list[Sequence]) -> list[Done]:
        at_entry = [s for s in seqs if s.depth == self.entry and s.h_entry is None]
        if at_entry:
            self._route(at_entry, 0, entering=True)
        ends: dict[int, list[Sequence]] = {}
        for s in seqs:
            r, rem = divmod(s.depth - self.entry, self.k)
            if rem == 0 and 1 <= r <= self.n_steps and s.h_entry is not None:
                ends.setdefault(r, []).append(s)
        for r, group in sorted(ends.items()):
            for s in group:   # step r-1 ends: gate its residual branch
                s.hidden = self.model.mor_update(s.h_start, s.hidden, s.gate)
                s.route_log.append((s.positions, r))
                if int(s.positions[-1]) == s.chunk_end - 1:
                    s.newest_steps = r
            if r < self.n_steps:
                self._route(group, r)
            else:
                for s in group:
                    self._leave_block(s, active=True)
        return self._finish([s for s in seqs if s.depth == self.depth])

    def _route(self, seqs: list[Sequence], step: int, entering: bool = False) -> None:
        h = torch.cat([s.hidden for s in seqs])
        h_entry = h if entering else torch.cat([s.h_entry for s in seqs])
        with torch.inference_mode():
            go, gate = self.model.mor_route(step, h, h_entry)
        sizes = [s.n_in_flight for s in seqs]
        go_host = go.cpu()          # positions live on the host, hidden states on the model's device
        everyone = bool(go_host.all())   # the common case (always at step 0): one check, not one per request
        for s, g, gh, w, he in zip(seqs, go.split(sizes), go_host.split(sizes), gate.split(sizes), h_entry.split(sizes)):
            if everyone or bool(gh.all()):
                s.h_entry, s.h_start, s.gate = he, s.hidden, w
                continue
            s.parked.append((s.positions[~gh], s.hidden[~g]))
            if not bool(gh.any()):      # nothing left to recur: the chunk jumps to the block's end
                s.depth = self.end
                self._leave_block(s, active=False)
                continue
            s.set_tokens(s.positions[gh], s.hidden[g])
            s.h_entry, s.h_start, s.gate = he[g], s.hidden, w[g]

    def _leave_block(self, s: Sequence, active: bool) -> None:
        """The whole chunk is at the shared block's end: parked and active tokens rejoin in position order."""
        parts = s.parked + ([(s.positions, s.hidden)] if active else [])
        if len(parts) > 1:
            positions = torch.cat([p for p, _ in parts])
            order = positions.argsort()
            hidden = torch.cat([h for _, h in parts])
            s.set_tokens(positions[order], hidden[order.to(hidden.device)])
        else:
            s.set_tokens(*parts[0])
        s.parked = []
        s.h_entry = s.h_start = s.gate = None


def steps_run(seq: Sequence) -> dict[int, int]:
    """Recursion steps each position ran (Mixture-of-Recursions), from the request's routing log."""
    out: dict[int, int] = {}
    for positions, r in seq.route_log:
        out.update(dict.fromkeys(positions.tolist(), r))
    return out


class EarlyExit(FullDepth):
    """Exits after `policy.spec.depths` with a confidence threshold; lossless KV by parallel decoding."""

    def __init__(self, model, runner: ModelRunner, policy):
        super().__init__(model, runner)
        policy.spec.check(model.depth)
        self.policy = policy
        self.exits = set(policy.spec.depths)
        self.first = min(self.exits)

    def arrive(self, seqs: list[Sequence]) -> list[Done]:
        for s in seqs:
            if s.is_decode and s.depth + 1 == self.first:
                s.prev_exit_hidden = s.hidden[-1]    # "one layer below" for the saturation measure
        by_depth: dict[int, list[Sequence]] = {}
        for s in seqs:
            if s.is_decode and s.depth in self.exits:
                by_depth.setdefault(s.depth, []).append(s)
        done: list[Done] = []
        exited: set[int] = set()
        for d, group in sorted(by_depth.items()):
            h = torch.stack([s.hidden[-1] for s in group])
            logits = self.runner.run_head(h, d, self.policy.heads)
            for s, row, hs in zip(group, logits, h):
                conf = self.policy.measure(row, hs, s.prev_exit_hidden, d)
                s.prev_exit_hidden = hs
                s.exit_obs.append((d, conf, int(row.argmax())))
                if conf >= self.policy.threshold(len(s.output_token_ids), d):
                    s.stack.append((s.positions, s.hidden, d))
                    s.exit_obs = []
                    s.exit_depth = d
                    done.append((s, row))
                    exited.add(id(s))
        for s in seqs:   # tokens waiting at this depth on the stack join the newest one's run
            if id(s) in exited or not s.stack or s.depth >= self.depth:
                continue
            join = [e for e in s.stack if e[2] == s.depth]
            if join:
                s.stack = [e for e in s.stack if e[2] != s.depth]
                s.set_tokens(torch.cat([e[0] for e in join] + [s.positions]),
                             torch.cat([e[1] for e in join] + [s.hidden]))
        full = self._finish([s for s in seqs if s.depth == self.depth])
        for s, row in full:
            if row is not None:
                final = int(row.argmax())
                for d, conf, argmax in s.exit_obs:
                    self.policy.threshold.observe(conf, argmax == final, d)
            s.exit_obs = []
        return done + full


def make_router(model, runner: ModelRunner, exit_policy=None) -> FullDepth:
    """The router for `model`'s family (an exit policy turns on early exit)."""
    if model.cfg.is_mor and exit_policy is not None:
        raise RecursaError("a Mixture-of-Recursions model chooses depth with its router; it takes no exit policy")
    if model.cfg.is_mor:
        return MoRRouting(model, runner)
    if exit_policy is not None:
        return EarlyExit(model, runner, exit_policy)
    return FullDepth(model, runner)


__all__ = ["FullDepth", "MoRRouting", "EarlyExit", "make_router", "steps_run"]
