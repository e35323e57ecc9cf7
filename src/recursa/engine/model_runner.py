"""Runs a span of depths on a packed batch of in-flight tokens; embeds chunks; runs LM heads.

A *span* is every consecutive depth from a boundary up to the next one (llm_engine.py builds
the boundaries: the model's end, exits, recursion-step ends, shared-block entries), so one
`run_span` call — one Python engine step — covers many layers: a vanilla model's whole stack,
as in nano-vllm; a decode span whose layers allow it is one C call (engine/fused_decode.py). The attention metadata (engine/attention.py) is built once per run and reused
at every depth of the span; nothing syncs with the host inside a span.

Every request in the group waits at a boundary whose span runs the same stages (the scheduler
groups by span key), possibly at different depths (loops of a shared block): each depth of the
span reads and writes the cache layer of its own request's depth.
"""
from __future__ import annotations

import torch

from recursa.engine.attention import PagedBatch, attend
from recursa.engine.fused_decode import FusedDecode
from recursa.engine.kv_cache import KVCacheManager
from recursa.engine.sequence import Sequence
from recursa.model.decoder import Decoder
from recursa.model.exits import exit_logits


def run_depths(model: Decoder, kv: KVCacheManager, batch: PagedBatch, x: torch.Tensor,
               offsets: list[list[int]], first: int, gqa: bool, capture: int = -1):
    """The span's forward: depth first + j reads/writes the cache layers offsets[j] (one slot offset
    per request); (hidden states after the span, after depth first + capture or None). One function
    for eager and compiled runs (torch.compile traces the whole span: every layer's norms, rotary and
    activations fused, one graph per span and batch shape kind)."""
    captured = None
    for j, offs in enumerate(offsets):
        x, _ = model.forward_stage(first + j, x, batch.cos, batch.sin, attend=attend(batch, kv, offs, gqa))
        if j == capture:
            captured = x
    return x, captured


class ModelRunner:
    def __init__(self, model: Decoder, kv: KVCacheManager, compile: bool = False):
        self.model, self.kv = model, kv
        if compile:   # one graph per span start and batch kind: a deep recursive model has many
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        self.forward = torch.compile(run_depths, dynamic=True) if compile else run_depths
        self.span_len: dict[int, int] = {}   # boundary depth -> depths in the span starting there (set by the engine)
        weight = model.embed_tokens.weight
        self.device, self.dtype = weight.device, weight.dtype
        self.fused = FusedDecode(model, kv, self.dtype)   # decode spans in one C call where they allow
        # rope of every position, once: a span indexes it (the same values model.rope gives, elementwise)
        self.rope = model.rope(torch.arange(model.cfg.max_seq_len, device=self.device), self.dtype)
        self.gqa = model.cfg.n_kv_heads != model.cfg.n_heads
        self.offset = [kv.offset(model.kv_source(d)) for d in range(model.depth)]   # depth -> slot offset
        self.capture_depth: int | None = None   # a depth whose input hidden states the router reads (set by the engine)
        self.captured: torch.Tensor | None = None   # ... of the last span that passed it [N, D], else None
        self.output: torch.Tensor | None = None     # the last span's output hidden states [N, D]
        self.num_span_runs = 0
        self._last_batch = None        # (key, PagedBatch) of the last span run, see _batch
        self.num_stage_runs = 0        # stage (layer) runs: a span of n depths counts n
        self.num_stage_tokens = 0      # token-layer forwards
        self.num_head_tokens = 0

    @torch.inference_mode()
    def embed(self, seqs: list[Sequence]) -> None:
        """Embed the chunks that are entering depth 0, all in one lookup."""
        ids = torch.tensor([t for s in seqs for t in s.token_ids[s.chunk_start:s.chunk_end]], device=self.device)
        for s, h in zip(seqs, self.model.embed(ids).split([s.chunk_end - s.chunk_start for s in seqs])):
            s.hidden = h

    @torch.inference_mode()
    def run_span(self, seqs: list[Sequence]) -> None:
        """Run the span every request in `seqs` waits at, advancing each to the next boundary."""
        starts = [s.depth for s in seqs]
        n = self.span_len[starts[0]]
        batch = self._batch(seqs, n)
        x = torch.cat([s.hidden for s in seqs])[None] if len(seqs) > 1 else seqs[0].hidden[None]
        same = min(starts) == max(starts)
        if self.kv.compact:   # one slot table per depth of the span (recursion_kv.span_view)
            offsets = [[j] for j in range(n)]
        else:
            offsets = [[self.offset[starts[0] + j]] if same else [self.offset[d + j] for d in starts] for j in range(n)]
        c = self.capture_depth
        j = c - 1 - starts[0] if c is not None and same and starts[0] < c < starts[0] + n else -1
        out = torch.empty_like(x) if j >= 0 else None
        fused = self.fused.run(batch, x, starts[0], offsets, None if out is None else (j, out))
        if fused is not None:
            x, captured = fused, out
        else:
            x, captured = self.forward(self.model, self.kv, batch, x, offsets, starts[0], self.gqa, j)
        self.captured = None if captured is None else captured[0]
        self.output = x[0]   # [N, D] in the group's order (a router may take it whole, not per request)
        for s, h in zip(seqs, x[0].split(batch.sizes) if len(seqs) > 1 else (x[0],)):
            s.hidden = h
            s.depth += n
        self.num_span_runs += 1
        self.num_stage_runs += n
        self.num_stage_tokens += n * batch.num_tokens

    def _batch(self, seqs: list[Sequence], n: int) -> PagedBatch:
        """The span's attention metadata, reused when the previous span ran the same tokens over the
        same block tables (a token passing an exit it does not take, into the next span): the same
        positions tensors (held by the key, so none is freed and its id reused) and KV version. Not
        under recursion-wise caching, whose span view places entries as it goes."""
        key = (self.kv.version, [s.positions for s in seqs])
        last = self._last_batch
        if (last is not None and not self.kv.compact and last[0][0] == key[0] and len(last[0][1]) == len(seqs)
                and all(a is b for a, b in zip(last[0][1], key[1]))):
            return last[1]
        batch = PagedBatch(self.model, self.kv, seqs, self.device, self.dtype, self.rope, n)
        self._last_batch = (key, batch)
        return batch

    @torch.inference_mode()
    def run_head(self, hidden: torch.Tensor, depth: int | None = None, heads=None) -> torch.Tensor:
        """Logits [n, V] (fp32) of hidden [n, D]: the final norm + LM head, or the exit after `depth`
        (through `heads`, default the model's own exit norms)."""
        self.num_head_tokens += len(hidden)
        if depth is None or depth == self.model.depth:
            return self.model.head(hidden).float()
        return exit_logits(self.model, hidden, depth, heads).float()
