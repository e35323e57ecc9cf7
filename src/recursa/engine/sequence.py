"""One request's state: its tokens, its KV block table, and the chunk of tokens in flight.

nano-vllm's fields plus the chunk in flight. A request moves one *chunk* at a time through the
model's depths: a prefill chunk (positions [chunk_start, chunk_end) of the prompt) or the single
newest token. `depth` is the span boundary the in-flight tokens wait at (-1: nothing in flight),
`positions` [n] which positions they are and `hidden` [n, D] their hidden states (None until the
chunk is embedded). An adaptive-depth router may change that set on the way (tokens that stop
early, exited tokens picked up again): positions need not be contiguous. Family-specific state
(Mixture-of-Recursions routing, early-exit stacks) belongs to the router (depth_router.py), the
streaming text to the output processor.

When the chunk leaves the model (or exits), `num_cached` advances to `chunk_end` and, if it
reached the end of the tokens, the request samples its next token.
"""
from __future__ import annotations

from enum import Enum, auto

import torch

from recursa.engine.sampling_params import SamplingParams
from recursa.errors import RecursaError


def check_prompt(ids, vocab_size: int, max_len: int) -> list[int]:
    """A prompt's token ids as ints, checked: non-empty, inside the vocabulary, room left to generate."""
    try:
        ids = [int(t) for t in ids]
    except (TypeError, ValueError):
        raise RecursaError("a prompt is a string or a list of token ids") from None
    if not ids:
        raise RecursaError("the prompt is empty")
    if min(ids) < 0 or max(ids) >= vocab_size:
        raise RecursaError(f"prompt holds token ids outside the vocabulary (0..{vocab_size - 1})")
    if len(ids) >= max_len:
        raise RecursaError(f"prompt of {len(ids)} tokens leaves no room to generate within max_model_len {max_len}")
    return ids


class SequenceStatus(Enum):
    WAITING = auto()    # no KV held (new, or preempted: recompute from scratch)
    RUNNING = auto()    # holds KV blocks


class Sequence:
    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 prompt: str | None = None):
        self.request_id = request_id
        self.prompt = prompt
        self.token_ids = list(prompt_token_ids)   # prompt + output, what the KV must cover
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params = params
        self.status = SequenceStatus.WAITING
        self.num_cached = 0                       # tokens done with every depth (or parked on an exit stack)
        self.block_table: list[int] = []          # KV block groups (kv_cache.py)
        self.chunk_start = self.chunk_end = 0
        self.depth = -1
        self.positions: torch.Tensor | None = None   # [n] positions in flight (host)
        self.hidden: torch.Tensor | None = None      # [n, D] their hidden states (model device)
        self.n_in_flight = 0                         # len(positions), kept as an int: the scheduler asks often
        self.depths: list[int] = []                  # per output token: depth (stage passes) behind its prediction
        self.generator = None if params.seed is None else torch.Generator().manual_seed(params.seed)
        self.finish_reason: str | None = None
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
        """Tokens in flight (what a span run over this request costs)."""
        return self.n_in_flight if self.depth >= 0 else 0

    @property
    def is_decode(self) -> bool:
        """The chunk in flight is the single newest token of a request that is generating."""
        return self.chunk_end == self.num_tokens and self.chunk_start >= self.num_prompt_tokens

    def start_chunk(self, n: int) -> None:
        """Send the next n uncached tokens into depth 0 (embedded when their span runs)."""
        self.chunk_start, self.chunk_end, self.depth, self.hidden = self.num_cached, self.num_cached + n, 0, None
        self.set_tokens(torch.arange(self.chunk_start, self.chunk_end), None)

    def set_tokens(self, positions: torch.Tensor, hidden: torch.Tensor | None) -> None:
        self.positions, self.hidden, self.n_in_flight = positions, hidden, len(positions)

    def end_chunk(self) -> None:
        """The chunk left the model (its KV is complete), exited, or was dropped (preemption, abort)."""
        self.depth, self.hidden, self.positions, self.n_in_flight = -1, None, None, 0

    def __repr__(self) -> str:
        return (f"Sequence({self.request_id!r}, tokens={self.num_tokens}, cached={self.num_cached}, "
                f"depth={self.depth}, status={self.status.name})")
