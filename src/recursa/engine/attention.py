"""Attention of a packed batch of in-flight tokens over each request's paged KV cache.

The tokens of a span run are packed into one row of N tokens [1, N, D]: projections and the MLP
see exactly the real tokens, however different the chunk lengths (one prefill chunk of 200 and
30 decode tokens cost 230 tokens, not 31 x 200). Only attention is per request: queries are
scattered into a padded [B, H, Tmax, hd] view (decode: [B, H, 1, hd], no copy), keys/values read
from the cache into [B, Hkv, Smax, hd], and a boolean mask keeps each query to its own request's
positions <= its own. All of it is tensor indexing: no Python loop over tokens.

`PagedBatch` holds what depends only on the set of tokens (positions, rope, padding, causal mask,
cache slots): it is built once per span run and reused at every depth of the span. `attend(...)`
gives the `attend(q, k, v)` callable a model stage takes for one depth: it writes the new keys/
values through the KV manager and attends to the request's cache. Where a depth reads another
depth's cache (MoR KV sharing) the stage passes k = v = None and only reads. Under recursion-wise
caching (recursion_kv.py) a request's keys are its compact table's entries for the span's
recursion step, masked by the position each entry holds, and every depth has its own slots.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from recursa import kernels
from recursa.engine.kv_cache import KVCacheManager
from recursa.engine.sequence import Sequence

IN_PLACE_CHUNK = 16     # tokens per request up to which a chunk always attends through the in-place kernel
IN_PLACE_WORK = 32768   # past that, while (tokens per request) x keys stays within this: it reads each
# query's keys alone, one task per request, which beats the padded SDPA at short contexts (a 32-token
# prefill chunk of SmolLM2 over <= 512 keys: 1.5x) and loses at long ones (64 tokens over 2,000: 0.7x)


class PagedBatch:
    """Positions, rope, padding, mask and cache-layer-0 slots for one set of in-flight tokens."""

    def __init__(self, model, kv: KVCacheManager, seqs: list[Sequence], device, dtype, rope, depths: int):
        """rope: (cos, sin) [1, max_len, hd] of every position (ModelRunner's table); depths: the
        span's (recursion-wise caching keeps a slot table per depth of the span)."""
        self.sizes = [s.n_in_flight for s in seqs]
        self.num_tokens = sum(self.sizes)
        tmax = max(self.sizes)
        self.decode = tmax == 1                                                   # one token per request
        packed = torch.cat([s.positions for s in seqs]) if len(seqs) > 1 else seqs[0].positions   # [N] host
        self.per_layer = kv.compact   # recursion-wise caching: a slot tensor per layer, keys by entry position
        if self.per_layer:
            slots, keys, self.new_slots = kv.span_view(seqs, depths)              # [L, B, W], [B, W], [L, N]
        else:
            kv_len = int(packed.max()) + 1
            slots = kv.slots([s.block_table for s in seqs], kv_len)              # [B, Smax] host
            keys = torch.arange(kv_len)[None]                                     # key positions [1, Smax]
        kv_len = keys.shape[-1]
        # on the CPU recursa's kernel reads the cache where it lies, for decode tokens and for short
        # chunks (speculative verification, parallel decoding's catch-up, small prefill chunks):
        # each query reads its request's row up to the keys it sees (see _prefix_lens)
        want = ((self.decode or tmax <= IN_PLACE_CHUNK or tmax * kv_len <= IN_PLACE_WORK)
                and kernels.supports_attention(model.cfg.n_heads, kv.k, dtype))
        rows = None if self.decode else torch.from_numpy(np.repeat(np.arange(len(seqs)), self.sizes))
        lens = self._prefix_lens(keys, packed, rows) if want else None
        self.in_place = lens is not None
        self.rows = rows.to(device) if self.in_place and rows is not None else None   # query -> slot row
        if self.in_place:
            self.valid = self.pad_index = self.unpad = mask = None
            self.lens = lens.to(device)
            if not self.per_layer:
                self.new_slots = slots[rows, packed] if rows is not None else slots.gather(1, packed[:, None])[:, 0]
        elif self.decode:
            self.valid = self.pad_index = self.unpad = None
            qpos = packed[:, None]                                                # [B, 1]
            mask = keys <= qpos                                                   # [B, Smax]
            if not self.per_layer:
                self.new_slots = slots.gather(1, qpos)[:, 0]
        else:
            lens = torch.tensor(self.sizes)
            t = torch.arange(tmax)
            valid = t[None, :] < lens[:, None]                                    # [B, Tmax]
            offsets = torch.cumsum(lens, 0) - lens
            pad_index = torch.where(valid, offsets[:, None] + t[None, :], 0)     # packed index of (b, t)
            qpos = torch.where(valid, packed[pad_index], 0)                       # padded queries: position 0
            mask = (keys[:, None, :] <= qpos[:, :, None]) | ~valid[:, :, None]    # pad rows see all
            if not self.per_layer:
                self.new_slots = slots.gather(1, qpos)[valid]
            self.valid, self.pad_index = valid.to(device), pad_index.to(device)
            self.unpad = valid.view(-1).nonzero()[:, 0].to(device)                 # flat (b, t) of each token
        # [B, 1, Tmax, Smax]; a lone decode token sees every cached key: no mask at all
        self.mask = None if self.in_place or self.decode and len(seqs) == 1 else mask.view(len(seqs), 1, -1, kv_len).to(device)
        cos, sin = rope[0][:, packed], rope[1][:, packed]                         # [1, N, hd]
        self.cos, self.sin = cos[:, None], sin[:, None]                           # [1, 1, N, hd]: every layer's shape
        self.slots, self.new_slots = slots.to(device), self.new_slots.to(device)
        self.device = device

    def _prefix_lens(self, keys: torch.Tensor, packed: torch.Tensor, rows: torch.Tensor | None):
        """How many keys each query sees (positions <= its own), or None where for some query those
        are not the first entries of its row (the in-place kernel reads a prefix). A dense row holds
        position p at index p; a compact table holds the entries of the tokens that ran its step, in
        position order, so a query's keys are its table's first entries, up to its own."""
        if not self.per_layer:
            return packed + 1
        keys, packed = keys.numpy(), packed.numpy()
        row_keys = keys if rows is None else keys[rows.numpy()]                   # [N, W]
        visible = row_keys <= packed[:, None]
        if (visible[:, 1:] > visible[:, :-1]).any():   # a key seen after one unseen: not a prefix
            return None
        return torch.from_numpy(visible.sum(-1))

    def shifted(self, offsets: list[int]):
        """(slots [B, Smax], new slots [N]) at the cache layers `offsets` (one slot offset per request)."""
        if self.per_layer:   # recursion-wise caching: offsets are the depth's index in the span
            return self.slots[offsets[0]], self.new_slots[offsets[0]]
        if min(offsets) == max(offsets):
            return self.slots + offsets[0], self.new_slots + offsets[0]
        shift = torch.tensor(offsets, device=self.device)
        return self.slots + shift[:, None], self.new_slots + shift.repeat_interleave(
            torch.tensor(self.sizes, device=self.device))


def attend(batch: PagedBatch, kv: KVCacheManager, offsets: list[int], gqa: bool):
    """The `attend(q, k, v)` of one depth: q [1,H,N,hd], k/v [1,Hkv,N,hd] (None: read only) -> [1,H,N,hd]."""
    slots, new_slots = batch.shifted(offsets)
    same = min(offsets) == max(offsets)

    def run(q, k, v):
        if k is not None:
            kv.write(new_slots, k[0].transpose(0, 1), v[0].transpose(0, 1))
        if batch.in_place:
            kernel = kernels.paged_decode_attention_op if torch.compiler.is_compiling() else kernels.paged_decode_attention
            dense_same = same and not batch.per_layer
            out = kernel(q[0].transpose(0, 1), kv.k, kv.v, batch.slots if dense_same else slots,
                         offsets[0] if dense_same else 0, batch.lens, batch.rows)  # [N, H, hd]
            return out.transpose(0, 1)[None]
        keys, values = kv.read(slots)
        mask = batch.mask
        if batch.decode:                                                          # [B, H, 1, hd], no copy
            out = F.scaled_dot_product_attention(q[0].transpose(0, 1)[:, :, None], keys, values,
                                                 attn_mask=mask, enable_gqa=gqa)
            return out[:, :, 0].transpose(0, 1)[None]
        qp = q[0][:, batch.pad_index].transpose(0, 1)                             # [B, H, Tmax, hd]
        out = F.scaled_dot_product_attention(qp, keys, values, attn_mask=mask, enable_gqa=gqa)
        out = out.transpose(0, 1).reshape(out.shape[1], -1, out.shape[3])          # [H, B * Tmax, hd]
        return out.index_select(1, batch.unpad)[None]                              # [1, H, N, hd]

    return run
