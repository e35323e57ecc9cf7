"""One request's state: its tokens, its KV block table, and the tokens in flight.

A request moves one *chunk* of tokens at a time through the model's depths: a prefill chunk
(positions [chunk_start, chunk_end) of the prompt) or the single newest token. `depth` is the
stage the in-flight tokens wait at (-1: nothing in flight), `positions` [n] which positions
they are and `hidden` [n, D] their hidden states. Adaptive-depth models change that set on
the way (engine/depth_router.py):

- Mixture-of-Recursions: tokens the router stops leave the shared block early and wait in
  `parked` at its end; `h_entry`, `h_start` and `gate` carry the routing state of the rest.
- Early exit with parallel decoding: a token that exits at depth e is emitted from there and
  its hidden state waits in `stack` (with depth e) until the next token that goes deeper picks
  it up at depth e, so its deep keys/values are written exactly.

When the chunk leaves the last depth (or exits), `num_cached` advances and, if it reached the end
of the tokens, the request samples its next token.
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
        self.num_cached = 0                       # tokens done with every depth (or parked on the exit stack)
        self.block_table: list[int] = []          # KV block groups, one block per cache layer each (kv_cache.py)
        self.chunk_start = self.chunk_end = 0
        self.depth = -1
        self.positions: torch.Tensor | None = None   # [n] positions in flight
        self.hidden: torch.Tensor | None = None      # [n, D] their hidden states (None: not embedded yet)
        self.layout = 0                              # bumped whenever `positions` changes (runner metadata key)
        self.n_in_flight = 0                         # len(positions), kept as an int: the scheduler asks often
        # Mixture-of-Recursions routing state of the in-flight tokens, and the tokens that stopped early
        self.h_entry = self.h_start = self.gate = None
        self.parked: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.route_log: list[tuple[torch.Tensor, int]] = []   # (positions, steps they ran), depth_router.steps_run
        self.newest_steps = 0                        # recursion steps of the newest token
        # early exit: (positions, hidden, depth) of exited tokens whose deeper KV is still missing
        self.stack: list[tuple[torch.Tensor, torch.Tensor, int]] = []
        self.exit_depths: list[int] = []             # per output token: the depth it was predicted from
        self.exit_obs: list[tuple[int, float, int]] = []  # (exit depth, confidence, argmax) of the newest token
        self.prev_exit_hidden: torch.Tensor | None = None # saturation measure: hidden at the previous exit
        self.exit_depth = 0                          # depth the newest prediction came from
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
        """Tokens in flight (what a stage run over this request costs)."""
        return self.n_in_flight if self.depth >= 0 else 0

    @property
    def is_decode(self) -> bool:
        """The chunk in flight is the single newest token of a request that is generating."""
        return self.chunk_end == self.num_tokens and self.chunk_start >= self.num_prompt_tokens

    def start_chunk(self, n: int) -> None:
        """Send the next n uncached tokens into depth 0 (embedded when the stage runs)."""
        self.chunk_start, self.chunk_end, self.depth, self.hidden = self.num_cached, self.num_cached + n, 0, None
        self.set_tokens(torch.arange(self.chunk_start, self.chunk_end), None)

    def set_tokens(self, positions: torch.Tensor, hidden: torch.Tensor | None) -> None:
        self.positions, self.hidden = positions, hidden
        self.n_in_flight = len(positions)
        self.layout += 1

    def end_chunk(self) -> None:
        """The chunk left the last depth (its KV is complete), exited, or was dropped (preemption, abort)."""
        self.depth, self.hidden, self.positions, self.n_in_flight = -1, None, None, 0
        self.h_entry = self.h_start = self.gate = None
        self.parked = []

    def reset_cache_state(self) -> None:
        """Preempted: everything derived from the KV is recomputed from the tokens."""
        self.end_chunk()
        self.stack, self.num_cached = [], 0

    def __repr__(self) -> str:
        return (f"Sequence({self.request_id!r}, tokens={self.num_tokens}, cached={self.num_cached}, "
                f"depth={self.depth}, status={self.status.name})")
