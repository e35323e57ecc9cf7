"""One request's state: its tokens, its KV block tables, and the chunk of tokens in flight.

A request moves one *chunk* of tokens at a time through the model's depths: a prefill chunk
(positions [chunk_start, chunk_end) of the prompt) or the single newest token. `depth` is the
stage the chunk waits at (-1: nothing in flight) and `hidden` its hidden states [n, D].
When the chunk leaves the last depth, its keys/values are cached at every depth (`num_cached`
advances) and, if it reached the end of the tokens, the request samples its next token.
"""
from __future__ import annotations

from enum import Enum, auto

import torch

from recursa.engine.sampling_params import SamplingParams


class SequenceStatus(Enum):
    WAITING = auto()    # no KV held (new, or preempted: recompute from scratch)
    RUNNING = auto()    # holds KV blocks
    FINISHED = auto()


class Sequence:
    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 prompt: str | None = None):
        self.request_id = request_id
        self.prompt = prompt
        self.token_ids = list(prompt_token_ids)   # prompt + output, what the KV must cover
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params = params
        self.status = SequenceStatus.WAITING
        self.num_cached = 0                       # tokens whose KV is written at every depth
        self.block_table: list[int] = []          # KV block groups, one block per depth each (kv_cache.py)
        self.chunk_start = self.chunk_end = 0
        self.depth = -1
        self.hidden: torch.Tensor | None = None
        self.generator = None if params.seed is None else torch.Generator().manual_seed(params.seed)
        self.finish_reason: str | None = None
        self.text = ""              # detokenized output (stop string cut off)
        self.num_sent_tokens = 0    # streaming: what earlier deltas already carried
        self.num_sent_chars = 0
        self.num_preemptions = 0

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[:self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def in_flight(self) -> bool:
        return self.depth >= 0

    @property
    def chunk_len(self) -> int:
        return self.chunk_end - self.chunk_start if self.in_flight else 0

    def start_chunk(self, n: int) -> None:
        """Send the next n uncached tokens into depth 0 (embedded when the stage runs)."""
        self.chunk_start, self.chunk_end, self.depth, self.hidden = self.num_cached, self.num_cached + n, 0, None

    def end_chunk(self) -> None:
        """The chunk left the last depth (its KV is complete) or was dropped (preemption, abort)."""
        self.depth, self.hidden = -1, None

    def __repr__(self) -> str:
        return (f"Sequence({self.request_id!r}, tokens={self.num_tokens}, cached={self.num_cached}, "
                f"depth={self.depth}, status={self.status.name})")
