"""The KV memory manager: owns every byte of key/value cache and hands it out in blocks.

Memory is one pool of blocks per key and value tensor ([slots, Hkv, hd]); a block holds
`block_size` tokens of one depth. Blocks are handed out in *groups*: one block per depth for
the same `block_size` positions of one request, group g holding block g * num_depths + d for
depth d. A request's block table is its list of groups, so the cache slot of position p at
depth d is `base(p) + d * block_size` — one table serves every depth, and a stage run turns it
into slots with one add.

Model KV strategies (DESIGN, "Mixture-of-Recursions"): a *cache layer* is one block per group.
Normally every depth has its own; under recursive KV sharing the depths of loops >= 1 read the
cache layer of loop 0 (`cache_layer_of`), so only the distinct ones get memory. Under
recursion-wise caching a token that skipped a recursion step writes nothing there: `filled`
marks the slots that hold a real entry, and attention masks the rest (`track_filled`).

The byte budget fixes the number of groups; the scheduler asks `can_allocate` before admitting
a chunk (admission control) and preempts a request — frees its blocks, recomputes it later —
when a running request cannot grow.
"""
from __future__ import annotations

import torch

from recursa.engine.sequence import Sequence
from recursa.errors import RecursaError


class KVCacheManager:
    def __init__(self, num_depths: int, n_kv_heads: int, head_dim: int, *, block_size: int, memory_bytes: int,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 cache_layer_of: list[int] | None = None, track_filled: bool = False):
        # depth -> cache layer; the distinct cache layers are what a block group holds
        self.cache_layer_of = list(cache_layer_of) if cache_layer_of is not None else list(range(num_depths))
        layers = sorted(set(self.cache_layer_of))
        self.cache_layer_of = [layers.index(c) for c in self.cache_layer_of]
        self.num_depths, self.block_size = len(layers), block_size
        num_depths = self.num_depths
        elem = torch.empty((), dtype=dtype).element_size()
        self.entry_bytes = 2 * n_kv_heads * head_dim * elem          # one token at one cache layer
        self.kv_bytes_per_token = self.entry_bytes * num_depths      # reserved per token
        self.num_blocks = memory_bytes // (block_size * self.kv_bytes_per_token)   # groups
        if self.num_blocks < 1:
            raise RecursaError(f"KV cache memory of {memory_bytes} bytes is less than one block "
                               f"({block_size} tokens x {self.kv_bytes_per_token} bytes over all depths)")
        shape = (self.num_blocks * num_depths * block_size, n_kv_heads, head_dim)
        # zeros, not empty: padded attention reads (masked) slots, and 0 * NaN would poison the output
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.track_filled = track_filled
        self.filled = torch.zeros(shape[0], dtype=torch.bool, device=device) if track_filled else None
        self.entries_written = 0   # token entries written over the engine's life (KV bytes actually used)
        self.free_blocks: list[int] = list(range(self.num_blocks - 1, -1, -1))  # pop() hands out 0, 1, ...
        self.version = 0   # bumped by every allocate/free: the runner's cached slot maps check it

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    @property
    def memory_bytes(self) -> int:
        return self.num_blocks * self.block_size * self.kv_bytes_per_token

    def blocks_for(self, num_tokens: int) -> int:
        """Block groups a request of num_tokens tokens holds."""
        return -(-num_tokens // self.block_size)

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """New block groups seq needs so that its table covers num_tokens positions."""
        return max(0, self.blocks_for(num_tokens) - len(seq.block_table))

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= len(self.free_blocks)

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        """Grow seq's table to cover num_tokens positions (the caller checked can_allocate)."""
        need = self.blocks_needed(seq, num_tokens)
        if need > len(self.free_blocks):
            raise RuntimeError(f"allocate({seq.request_id}) without free blocks: need {need}")
        new = [self.free_blocks.pop() for _ in range(need)]
        seq.block_table.extend(new)
        if self.filled is not None and new:   # a reused block must not show its previous owner's entries
            span = self.num_depths * self.block_size
            idx = (torch.tensor(new)[:, None] * span + torch.arange(span)).view(-1)
            self.filled[idx.to(self.filled.device)] = False
        self.version += 1

    def free(self, seq: Sequence) -> None:
        self.free_blocks.extend(reversed(seq.block_table))
        seq.block_table = []
        self.version += 1

    def offset(self, depth: int) -> int:
        """Slot offset of `depth`'s cache layer inside a block group."""
        return self.cache_layer_of[depth] * self.block_size

    def slots(self, tables: list[list[int]], length: int) -> torch.Tensor:
        """Cache slots of positions 0..length-1 at depth 0 for each table: [len(tables), length].

        Add `offset(depth)` for another depth. Positions past a table's end map into group 0:
        only masked attention reads them.
        """
        width = max(len(t) for t in tables)
        padded = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.long)
        pos = torch.arange(length)
        return padded[:, pos // self.block_size] * (self.num_depths * self.block_size) + pos % self.block_size
