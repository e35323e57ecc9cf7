"""The scheduler: waiting/running queues, admission under the token and KV budgets, preemption.

Each engine step it (1) lets idle running requests and then waiting ones send their next chunk
into depth 0 — decode tokens and prefill chunks alike, within `max_num_batched_tokens` — and
(2) returns the span group the policy picks, capped at the token budget: the requests whose
in-flight tokens wait at boundaries with the same span key (the same stages in the same order).
A preempted request is recomputed in chunks that stop short of its newest token, which then runs
alone as a decode token — so adaptive-depth decisions (early exit) do not depend on memory pressure.

KV memory: a chunk's blocks are allocated at every depth when it enters. A waiting request is
admitted only if its first chunk fits (admission control); a running request that cannot grow
preempts the most recently admitted other request (its blocks are freed and it is recomputed
from its prompt + output so far when readmitted), or is preempted itself if it is the latest.
Under recursion-wise caching (recursion_kv.py) the same calls account each recursion step: a
chunk's room in step r's table is promised when it enters and handed out only to the tokens that
reach step r, so admission never over-commits and a shallow request holds no deep blocks.
"""
from __future__ import annotations

from collections import deque
from typing import Callable

from recursa.engine.config import EngineConfig
from recursa.engine.kv_cache import KVCacheManager
from recursa.engine.policy import StagePolicy
from recursa.engine.sequence import Sequence, SequenceStatus


class Scheduler:
    def __init__(self, config: EngineConfig, kv: KVCacheManager, policy: StagePolicy, span_key: dict[int, int],
                 on_reset: Callable[[Sequence], None]):
        """span_key: boundary depth -> key of the span that starts there; on_reset(seq): the request's
        chunk state is dropped (finished, aborted or preempted)."""
        self.max_num_seqs, self.max_num_batched_tokens = config.max_num_seqs, config.max_num_batched_tokens
        self.kv, self.policy, self.span_key, self.on_reset = kv, policy, span_key, on_reset
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, seq: Sequence) -> None:
        """Drop a finished or aborted request and free its memory."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.end_chunk()
        self.on_reset(seq)
        self.kv.free(seq)

    def preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.kv.free(seq)
        seq.end_chunk()
        self.on_reset(seq)
        seq.num_cached = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    # ---- step part 1: new chunks into depth 0 -----------------------------------------------------
    def admit(self) -> None:
        if not self.policy.admit(self.running):
            return
        budget = self.max_num_batched_tokens - sum(s.chunk_len for s in self.running if s.depth == 0)
        for seq in list(self.running):
            if budget <= 0:
                return
            if seq.status is not SequenceStatus.RUNNING or seq.in_flight:
                continue  # preempted earlier in this loop, or its chunk is still travelling
            n = self._chunk(seq, budget)
            need = self.kv.blocks_needed(seq, seq.num_cached + n)
            while not self.kv.can_allocate(need) and self.running[-1] is not seq:
                victim = self.running[-1]
                if victim.depth == 0:
                    budget += victim.chunk_len
                self.preempt(victim)
            if not self.kv.can_allocate(need):
                self.preempt(seq)
                continue
            self.kv.allocate(seq, seq.num_cached + n)
            seq.start_chunk(n)
            budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            n = self._chunk(seq, budget)
            need = self.kv.blocks_needed(seq, n)
            if not self.kv.can_allocate(need):
                return
            self.waiting.popleft()
            self.kv.allocate(seq, n)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            seq.start_chunk(n)
            budget -= n

    @staticmethod
    def _chunk(seq: Sequence, budget: int) -> int:
        """Tokens of seq's next chunk: what is uncached, within the budget; recomputation after a
        preemption stops before the newest token, which comes next as a decode token of its own."""
        end = seq.num_tokens - 1 if seq.num_cached < seq.num_tokens - 1 and seq.output_token_ids else seq.num_tokens
        return min(end - seq.num_cached, budget)

    # ---- step part 2: the span group to run ----------------------------------------------------------
    def next_group(self) -> list[Sequence]:
        groups: dict[int, list[Sequence]] = {}
        for seq in self.running:
            if seq.in_flight:
                groups.setdefault(self.span_key[seq.depth], []).append(seq)
        if not groups:
            return []
        chosen, budget = [], self.max_num_batched_tokens
        for seq in self.policy.run_order(groups[self.policy.pick(groups)]):
            if chosen and seq.chunk_len > budget:
                continue   # first fit: a smaller chunk further on may still fill the run
            chosen.append(seq)
            budget -= seq.chunk_len
        return chosen
