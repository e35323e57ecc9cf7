"""Runs one stage on a packed batch of in-flight tokens, with attention over each request's paged KV.

The tokens of a stage run are packed into one row of N tokens [1, N, D]: projections and the MLP
see exactly the real tokens, however different the chunk lengths (one prefill chunk of 200 and
30 decode tokens cost 230 tokens, not 31 x 200). Only attention is per request: queries are
scattered into a padded [B, H, Tmax, hd] view, keys/values gathered from the cache into
[B, Hkv, Smax, hd], and a boolean mask keeps each query to its own request's positions <= its
own. All of it is tensor indexing: no Python loop over tokens.

A request's in-flight positions need not be contiguous (tokens routed out of a recursion step,
exited tokens picked up from the early-exit stack); the metadata that depends only on them
(positions, rope, padding, causal mask, cache slots) is built once and reused while the same
tokens travel down the depths together. Where a depth reads another depth's cache (recursive KV
sharing: `model.kv_source`) the stage computes no keys/values and attends to that cache; where
tokens may have skipped a depth (recursion-wise caching) the mask also drops empty slots.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from recursa.engine.kv_cache import KVCacheManager
from recursa.engine.sequence import Sequence
from recursa.model.decoder import Decoder
from recursa.model.exits import exit_logits


class _Batch:
    """Positions, rope, padding, mask and depth-0 cache slots for one set of in-flight tokens."""

    def __init__(self, model: Decoder, kv: KVCacheManager, seqs: list[Sequence], device, dtype):
        lens = torch.tensor([s.n_in_flight for s in seqs])
        self.sizes = lens.tolist()
        self.decode = max(self.sizes) == 1                                        # one token per request
        t = torch.arange(max(self.sizes))
        self.valid = (t[None, :] < lens[:, None]).to(device)                     # [B, Tmax]
        packed = torch.cat([s.positions for s in seqs]).to(device)               # [N]
        offsets = torch.cumsum(lens, 0) - lens
        self.pad_index = torch.where(self.valid, (offsets[:, None] + t[None, :]).to(device), 0)  # packed index of (b, t)
        qpos = torch.where(self.valid, packed[self.pad_index], 0)                 # padded queries: position 0
        kv_len = int(packed.max()) + 1
        keys = torch.arange(kv_len, device=device)
        self.mask = (keys[None, None, :] <= qpos[:, :, None]) | ~self.valid[:, :, None]   # pad rows see all
        self.mask = self.mask[:, None]                                            # [B, 1, Tmax, Smax]
        if self.decode and len(seqs) == 1:
            self.mask = None                                                      # sees every cached key
        self.cos, self.sin = model.rope(packed, dtype)                            # [1, N, hd]
        self.slots = kv.slots([s.block_table for s in seqs], kv_len).to(device)  # [B, Smax] at cache layer 0
        self.new_slots = self.slots.gather(1, qpos)[self.valid]                   # [N]


class ModelRunner:
    def __init__(self, model: Decoder, kv: KVCacheManager):
        self.model, self.kv = model, kv
        weight = model.embed_tokens.weight
        self.device, self.dtype = weight.device, weight.dtype
        self.gqa = model.cfg.n_kv_heads != model.cfg.n_heads
        self.kv_source = [model.kv_source(d) for d in range(model.depth)]
        self._key: tuple | None = None
        self._batch: _Batch | None = None
        self.num_stage_runs = 0
        self.num_stage_tokens = 0
        self.num_head_tokens = 0

    def _batch_for(self, seqs: list[Sequence]) -> _Batch:
        key = (self.kv.version,) + tuple((id(s), s.layout) for s in seqs)
        if key != self._key:
            self._key, self._batch = key, _Batch(self.model, self.kv, seqs, self.device, self.dtype)
        return self._batch

    @torch.inference_mode()
    def embed(self, seqs: list[Sequence]) -> None:
        """Embed the chunks that are entering depth 0, all in one lookup."""
        ids = torch.tensor([t for s in seqs for t in s.token_ids[s.chunk_start:s.chunk_end]], device=self.device)
        for s, h in zip(seqs, self.model.embed(ids).split([s.chunk_end - s.chunk_start for s in seqs])):
            s.hidden = h

    @torch.inference_mode()
    def run_stage(self, seqs: list[Sequence]) -> None:
        """Run the stage every request in `seqs` waits at (one unique layer), advancing each a depth."""
        batch = self._batch_for(seqs)
        x = torch.cat([s.hidden for s in seqs])[None] if len(seqs) > 1 else seqs[0].hidden[None]
        depths = [s.depth for s in seqs]
        offsets = [self.kv.offset(self.kv_source[d]) for d in depths]
        if min(offsets) == max(offsets):
            slots, new_slots = batch.slots + offsets[0], batch.new_slots + offsets[0]
        else:  # a shared layer serving several depths at once (never a mix of writing and KV-sharing depths)
            shift = torch.tensor(offsets, device=self.device)
            slots = batch.slots + shift[:, None]
            new_slots = batch.new_slots + shift.repeat_interleave(torch.tensor(batch.sizes, device=self.device))
        kv = self.kv
        k_cache, v_cache = kv.k, kv.v

        def attend(q, k, v):
            # q [1,H,N,hd], k/v [1,Hkv,N,hd] (None: read another depth's cache) -> attention output
            if k is not None:
                k_cache.index_copy_(0, new_slots, k[0].transpose(0, 1))
                v_cache.index_copy_(0, new_slots, v[0].transpose(0, 1))
                kv.entries_written += len(new_slots)
                if kv.filled is not None:
                    kv.filled[new_slots] = True
            mask = batch.mask
            if kv.filled is not None:   # recursion-wise caching: tokens that skipped this step left no entry
                present = kv.filled[slots][:, None, None, :]                        # [B, 1, 1, Smax]
                mask = present if mask is None else mask & (present | ~batch.valid[:, None, :, None])
            shape = (*slots.shape, *k_cache.shape[1:])                              # index_select: ~5x faster
            keys = k_cache.index_select(0, slots.view(-1)).view(shape).permute(0, 2, 1, 3)    # than k[slots]
            values = v_cache.index_select(0, slots.view(-1)).view(shape).permute(0, 2, 1, 3)  # [B, Hkv, Smax, hd]
            if batch.decode:                                                        # [B, H, 1, hd], no copy
                out = F.scaled_dot_product_attention(q[0].transpose(0, 1)[:, :, None], keys, values,
                                                     attn_mask=mask, enable_gqa=self.gqa)
                return out[:, :, 0].transpose(0, 1)[None]
            qp = q[0][:, batch.pad_index].transpose(0, 1)                           # [B, H, Tmax, hd]
            out = F.scaled_dot_product_attention(qp, keys, values, attn_mask=mask, enable_gqa=self.gqa)
            return out.transpose(0, 1)[:, batch.valid][None]                        # [1, H, N, hd]

        x, _ = self.model.forward_stage(depths[0], x, batch.cos, batch.sin, attend=attend)
        for s, h in zip(seqs, x[0].split(batch.sizes)):
            s.hidden = h
            s.depth += 1
        self.num_stage_runs += 1
        self.num_stage_tokens += len(batch.new_slots)

    @torch.inference_mode()
    def run_head(self, hidden: torch.Tensor, depth: int | None = None, heads=None) -> torch.Tensor:
        """Logits [n, V] (fp32) of hidden [n, D]: the final norm + LM head, or the exit after `depth`
        (through `heads`, default the model's own exit norms)."""
        self.num_head_tokens += len(hidden)
        if depth is None or depth == self.model.depth:
            return self.model.head(hidden).float()
        return exit_logits(self.model, hidden, depth, heads).float()
