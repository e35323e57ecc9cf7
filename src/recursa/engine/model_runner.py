"""Runs one stage on a packed batch of chunks, with attention over each request's paged KV.

The chunks of a stage run are packed into one row of N tokens [1, N, D]: projections and the MLP
see exactly the real tokens, however different the chunk lengths (one prefill chunk of 200 and
30 decode tokens cost 230 tokens, not 31 x 200). Only attention is per request: queries are
scattered into a padded [B, H, Tmax, hd] view, keys/values gathered from the cache into
[B, Hkv, Smax, hd], and a boolean mask keeps each query to its own request's positions <= its
own. All of it is tensor indexing: no Python loop over tokens.

Metadata that depends only on the chunks (positions, rope, padding, mask, depth-0 cache slots)
is built once and reused while the same chunks travel down the depths together; a depth's slots
are the depth-0 slots shifted by `depth * block_size` (kv_cache.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from recursa.engine.kv_cache import KVCacheManager
from recursa.engine.sequence import Sequence
from recursa.model.decoder import Decoder


class _Batch:
    """Positions, rope, padding, mask and depth-0 cache slots for one set of chunks."""

    def __init__(self, model: Decoder, kv: KVCacheManager, seqs: list[Sequence], device, dtype):
        starts = torch.tensor([s.chunk_start for s in seqs], device=device)
        lens = torch.tensor([s.chunk_end - s.chunk_start for s in seqs], device=device)
        self.sizes = lens.tolist()
        self.decode = max(self.sizes) == 1                                        # one token per request
        t = torch.arange(max(self.sizes), device=device)
        self.valid = t[None, :] < lens[:, None]                                  # [B, Tmax]
        qpos = torch.where(self.valid, starts[:, None] + t[None, :], 0)          # padded queries: position 0
        offsets = torch.cumsum(lens, 0) - lens
        self.pad_index = torch.where(self.valid, offsets[:, None] + t[None, :], 0)  # packed index of each (b, t)
        kv_len = max(s.chunk_end for s in seqs)
        keys = torch.arange(kv_len, device=device)
        self.mask = (keys[None, None, :] <= qpos[:, :, None])[:, None]            # [B, 1, Tmax, Smax]
        if self.decode and len(seqs) == 1:
            self.mask = None                                                      # sees every cached key
        self.cos, self.sin = model.rope(qpos[self.valid], dtype)                  # [1, N, hd]
        self.slots = kv.slots([s.block_table for s in seqs], kv_len).to(device)  # [B, Smax] at depth 0
        self.new_slots = self.slots.gather(1, qpos)[self.valid]                   # [N]


class ModelRunner:
    def __init__(self, model: Decoder, kv: KVCacheManager):
        self.model, self.kv = model, kv
        weight = model.embed_tokens.weight
        self.device, self.dtype = weight.device, weight.dtype
        self.gqa = model.cfg.n_kv_heads != model.cfg.n_heads
        self._key: tuple | None = None
        self._batch: _Batch | None = None
        self.num_stage_runs = 0
        self.num_stage_tokens = 0

    def _batch_for(self, seqs: list[Sequence]) -> _Batch:
        key = (self.kv.version,) + tuple((id(s), s.chunk_start, s.chunk_end) for s in seqs)
        if key != self._key:
            self._key, self._batch = key, _Batch(self.model, self.kv, seqs, self.device, self.dtype)
        return self._batch

    @torch.inference_mode()
    def run_stage(self, seqs: list[Sequence]) -> None:
        """Run the stage every chunk in `seqs` waits at (one unique layer), advancing each a depth."""
        batch = self._batch_for(seqs)
        fresh = [s for s in seqs if s.hidden is None]
        if fresh:  # chunks entering depth 0: embed them together
            ids = torch.tensor([t for s in fresh for t in s.token_ids[s.chunk_start:s.chunk_end]], device=self.device)
            for s, h in zip(fresh, self.model.embed(ids).split([s.chunk_end - s.chunk_start for s in fresh])):
                s.hidden = h
        x = torch.cat([s.hidden for s in seqs])[None] if len(seqs) > 1 else seqs[0].hidden[None]
        depths = [s.depth for s in seqs]
        if min(depths) == max(depths):
            shift = depths[0] * self.kv.block_size
            slots, new_slots = batch.slots + shift, batch.new_slots + shift
        else:  # a shared layer serving several depths at once: each reads its own depth's cache
            shift = torch.tensor(depths, device=self.device) * self.kv.block_size
            slots = batch.slots + shift[:, None]
            new_slots = batch.new_slots + shift.repeat_interleave(torch.tensor(batch.sizes, device=self.device))
        k_cache, v_cache = self.kv.k, self.kv.v

        def attend(q, k, v):
            # q [1,H,N,hd], k/v [1,Hkv,N,hd] -> write the new keys/values, attend over the cache
            k_cache.index_copy_(0, new_slots, k[0].transpose(0, 1))
            v_cache.index_copy_(0, new_slots, v[0].transpose(0, 1))
            shape = (*slots.shape, *k_cache.shape[1:])                              # index_select: ~5x faster
            keys = k_cache.index_select(0, slots.view(-1)).view(shape).permute(0, 2, 1, 3)    # than k[slots]
            values = v_cache.index_select(0, slots.view(-1)).view(shape).permute(0, 2, 1, 3)  # [B, Hkv, Smax, hd]
            if batch.decode:                                                        # [B, H, 1, hd], no copy
                out = F.scaled_dot_product_attention(q[0].transpose(0, 1)[:, :, None], keys, values,
                                                     attn_mask=batch.mask, enable_gqa=self.gqa)
                return out[:, :, 0].transpose(0, 1)[None]
            qp = q[0][:, batch.pad_index].transpose(0, 1)                           # [B, H, Tmax, hd]
            out = F.scaled_dot_product_attention(qp, keys, values, attn_mask=batch.mask, enable_gqa=self.gqa)
            return out.transpose(0, 1)[:, batch.valid][None]                        # [1, H, N, hd]

        x, _ = self.model.forward_stage(depths[0], x, batch.cos, batch.sin, attend=attend)
        for s, h in zip(seqs, x[0].split(batch.sizes)):
            s.hidden = h
            s.depth += 1
        self.num_stage_runs += 1
        self.num_stage_tokens += len(batch.new_slots)

    @torch.inference_mode()
    def run_head(self, seqs: list[Sequence]) -> torch.Tensor:
        """Final norm + LM head on each sequence's last hidden state: logits [len(seqs), V] (fp32)."""
        return self.model.head(torch.stack([s.hidden[-1] for s in seqs])).float()

