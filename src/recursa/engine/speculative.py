"""Self-speculative decoding (LayerSkip's draft-and-verify) in the batching engine, at any batch size.

EngineConfig.exit_strategy "speculative": lossless, greedy only. Per request:

- draft: a decode token whose exit is confident enough (the exit policy's measure and threshold)
  leaves there, as in parallel decoding: its in-flight hidden states wait on the exit stack and
  the exit head's argmax becomes a *draft* — appended to the request's tokens so the next step
  feeds it, but not output yet (`DraftState.drafts`). At most `max_draft` drafts are pending; the
  draft length adapts: it ends as soon as a token's exit confidence is below the threshold.
- verify: the token that does not exit (unsure, or the draft budget is spent) takes the stacked
  tokens along from their exit depths (depth_router.EarlyExit's join), so one pass of the deeper
  layers runs a chunk of d+1 tokens per request — batched with every other request's chunks —
  reusing the draft's keys/values below the exit and writing exact ones above it. The final
  head over the chunk gives the deep prediction at every drafted position: the longest prefix of
  drafts equal to it is accepted, then the deep token follows (the correction at the first
  mismatch, or the bonus token after the last draft). Rejected drafts leave the tokens; their
  cache entries lie past the request's new length and are overwritten when those positions are
  fed again (attention masks by position), so nothing is rolled back in the cache.
- a draft that would end the request (its length, a stop or EOS token: `ends`) is not fed:
  the stacked tokens run on alone (`_flush`) and verify the drafts.

Greedy output equals full-depth greedy decoding token for token (tests/engine/test_engine_speculative.py
checks it against tests/reference.py's full forwards, batched, with chunked prefill and preemption).
Preemption drops unverified drafts (`forget`); the request is recomputed from what it output.
Sampling (temperature > 0) is refused: speculative rejection sampling is not implemented.

    llm = recursa.LLM(model, exit_policy=policy, exit_strategy="speculative", max_draft=4)
    llm.stats()["acceptance_rate"]
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from recursa.engine.depth_router import Done, EarlyExit, ExitState
from recursa.engine.sequence import Sequence
from recursa.errors import RecursaError


@dataclass
class DraftState(ExitState):
    drafts: list = field(default_factory=list)       # (token, exit depth) of the drafts ending seq.token_ids
    draft_obs: dict = field(default_factory=dict)    # position -> exits passed by the token fed there (a draft's source)
    verified: list = field(default_factory=list)     # (token, depth) the last verification accepted, to output
    drafting: bool = False                           # the row just returned came from an exit: a draft


class SelfSpeculative(EarlyExit):
    """Exited tokens are drafts; the next deep pass verifies them."""
    State = DraftState

    def __init__(self, model, runner, policy, max_draft: int = 4, ends=None):
        super().__init__(model, runner, policy)
        if max_draft < 1:
            raise RecursaError(f"max_draft must be >= 1, got {max_draft}")
        self.max_draft = max_draft
        self.ends = ends or (lambda seq, token: None)   # (seq, newest token) -> finish reason or None
        self.num_drafted = self.num_accepted = self.num_verifications = 0

    def check(self, params) -> None:
        if params.temperature > 0:
            raise RecursaError("self-speculative decoding is greedy only (temperature 0); "
                               "use exit_strategy 'parallel' to sample")

    def may_exit(self, seq: Sequence) -> bool:
        return len(self._of(seq).drafts) < self.max_draft

    def exit(self, seq: Sequence, depth: int) -> None:
        st = self._of(seq)
        st.draft_obs[int(seq.positions[-1])] = st.obs
        st.drafting = True
        super().exit(seq, depth)

    def commit(self, seq: Sequence, token: int | None) -> list[tuple[int, int]]:
        st = self._of(seq)
        if st.drafting:     # fed next step, output once verified
            st.drafting = False
            seq.token_ids.append(token)
            st.drafts.append((token, st.exit_depth))
            self.num_drafted += 1
            if self.ends(seq, token) is not None:
                self._flush(seq)
            return []
        out = st.verified + ([] if token is None else [(token, self.depth)])
        st.verified = []
        return out

    def _flush(self, seq: Sequence) -> None:
        """Verify without feeding the newest draft: the stacked tokens run on from their exit depths
        (the lowest first; the others join them on the way, as in a deep pass)."""
        st = self._of(seq)
        low = min(e[2] for e in st.stack)
        join = [e for e in st.stack if e[2] == low]
        st.stack = [e for e in st.stack if e[2] != low]
        seq.chunk_start = seq.chunk_end = seq.num_tokens - 1
        seq.depth = low
        seq.set_tokens(torch.cat([e[0] for e in join]), torch.cat([e[1] for e in join]))

    def full_depth(self, seqs: list[Sequence]) -> list[Done]:
        verify = [s for s in seqs if self._of(s).drafts]
        out = super().full_depth([s for s in seqs if not self._of(s).drafts])
        if verify:
            logits = self.runner.run_head(torch.cat([s.hidden for s in verify]))
            out += [(s, self._verify(s, z)) for s, z in zip(verify, logits.split([s.n_in_flight for s in verify]))]
        return out

    def _verify(self, seq: Sequence, logits: torch.Tensor) -> torch.Tensor | None:
        """Accept the drafts the deep logits [n, V] agree with; the row to sample the deep token from."""
        st = self._of(seq)
        n = len(st.drafts)
        first = seq.num_tokens - n - 1            # the position the first draft was predicted from
        fed = seq.n_in_flight == n + 1            # the newest draft ran too (not a flush)
        assert int(seq.positions[0]) == first and seq.n_in_flight in (n, n + 1), (seq, n)
        deep = logits.argmax(-1).tolist()
        reject = next((i for i, (t, _) in enumerate(st.drafts) if deep[i] != t), None)
        accepted = n if reject is None else reject
        for i in range(n if reject is None else reject + 1):   # a rejected draft's successors saw a wrong token
            self.policy.observe(st.draft_obs[first + i], deep[i])
        if fed and reject is None:
            self.policy.observe(st.obs, deep[-1])
        del seq.token_ids[first + 1:]            # the accepted drafts come back as outputs (commit)
        st.verified, st.drafts, st.draft_obs = st.drafts[:accepted], [], {}
        st.obs, st.seen, st.exit_depth = [], {}, self.depth
        self.num_accepted += accepted
        self.num_verifications += 1
        if reject is not None:
            seq.chunk_end = first + reject + 1    # positions up to the rejected draft's source are final
            return logits[reject]
        seq.chunk_end = first + n + int(fed)
        return logits[-1] if fed else None

    def forget(self, seq: Sequence) -> None:
        st = self.state.get(id(seq))
        if st is not None and st.drafts:          # unverified drafts go: recomputed from what was output
            del seq.token_ids[len(seq.token_ids) - len(st.drafts):]
        super().forget(seq)

    def stats(self) -> dict:
        return {"draft_tokens": self.num_drafted, "accepted_draft_tokens": self.num_accepted,
                "acceptance_rate": self.num_accepted / self.num_drafted if self.num_drafted else 0.0,
                "verifications": self.num_verifications}


__all__ = ["SelfSpeculative", "DraftState"]
