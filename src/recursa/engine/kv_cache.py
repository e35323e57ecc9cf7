"""The KV memory manager: owns every byte of key/value cache, hands it out in blocks, and writes it.

Memory is one pool of slots per key and value tensor ([slots, Hkv, hd]). Blocks are handed out
in *groups*: one block of `block_size` positions per cache layer, group g holding the slots
[g * C * block_size, (g + 1) * C * block_size) for C cache layers. A request's block table is its
list of groups, so the slot of position p at cache layer c is `base(p) + c * block_size` — one
table serves every depth, and a span run turns it into slots with one add per depth.

Model KV strategies (DESIGN, "Mixture-of-Recursions"): normally every depth has its own cache
layer; under recursive KV sharing the depths of loops >= 1 read loop 0's (`cache_layer_of`),
so only the distinct ones get memory. Recursion-wise caching (a token that skipped a recursion
step has no entry there) has its own manager, which reserves only the entries it writes:
recursion_kv.RecursionKVCache, a subclass with compact per-(request, step) tables (`compact`).

The manager alone writes the cache (`write`), counts what was written, and bumps `version`
whenever a block table changes. The byte budget fixes the number of groups; the scheduler asks
`can_allocate` before admitting a chunk and preempts a request when a running one cannot grow.
"""
from __future__ import annotations

import torch

from recursa import kernels
from recursa.engine.sequence import Sequence
from recursa.errors import RecursaError


class KVCacheManager:
    compact = False   # recursion_kv.RecursionKVCache: per-layer slots from compact tables, placed per span

    def __init__(self, model_depth: int, n_kv_heads: int, head_dim: int, *, block_size: int, memory_bytes: int,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 cache_layer_of: list[int] | None = None):
        sources = list(cache_layer_of) if cache_layer_of is not None else list(range(model_depth))
        layers = sorted(set(sources))
        self.cache_layer_of = [layers.index(c) for c in sources]   # depth -> cache layer
        self.num_cache_layers, self.block_size = len(layers), block_size
        elem = torch.empty((), dtype=dtype).element_size()
        self.entry_bytes = 2 * n_kv_heads * head_dim * elem          # one token at one cache layer
        self.kv_bytes_per_token = self.entry_bytes * self.num_cache_layers   # reserved per token
        self.num_blocks = memory_bytes // (block_size * self.kv_bytes_per_token)   # groups
        if self.num_blocks < 1:
            raise RecursaError(f"KV cache memory of {memory_bytes} bytes is less than one block "
                               f"({block_size} tokens x {self.kv_bytes_per_token} bytes over all depths)")
        self.group_slots = self.num_cache_layers * block_size
        self._init_pool(self.num_blocks * self.group_slots, n_kv_heads, head_dim, dtype, device)

    def _init_pool(self, num_slots: int, n_kv_heads: int, head_dim: int, dtype, device) -> None:
        # zeros, not empty: padded attention reads (masked) slots, and 0 * NaN would poison the output
        self.k = torch.zeros((num_slots, n_kv_heads, head_dim), dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.entries_written = 0   # token entries written over the engine's life (KV bytes actually used)
        self.num_positions = 0     # token positions given KV over the engine's life
        self.reserved_bytes = 0    # bytes of the blocks handed out over the engine's life (block tails included)
        self.free_blocks: list[int] = list(range(self.num_blocks - 1, -1, -1))  # pop() hands out 0, 1, ...
        self.version = 0   # changes exactly when some block table changes

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    @property
    def memory_bytes(self) -> int:
        return self.num_blocks * self.block_size * self.kv_bytes_per_token

    @property
    def reserved_bytes_per_token(self) -> float:
        """KV bytes reserved per token position that entered the model (block tails included)."""
        return self.reserved_bytes / self.num_positions if self.num_positions else 0.0

    @property
    def written_bytes_per_token(self) -> float:
        """KV bytes written per token position that entered the model."""
        return self.entries_written * self.entry_bytes / self.num_positions if self.num_positions else 0.0

    @property
    def usage(self) -> float:
        """Share of block groups held by requests (vLLM's kv_cache_usage_perc / 100)."""
        return 1 - len(self.free_blocks) / self.num_blocks

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
        self.num_positions += num_tokens - seq.num_cached
        if not need:
            return
        seq.block_table.extend(self.free_blocks.pop() for _ in range(need))
        self.reserved_bytes += need * self.block_size * self.kv_bytes_per_token
        self.version += 1

    def free(self, seq: Sequence) -> None:
        if seq.block_table:
            self.free_blocks.extend(reversed(seq.block_table))
            seq.block_table = []
            self.version += 1

    def offset(self, depth: int) -> int:
        """Slot offset of `depth`'s cache layer inside a block group."""
        return self.cache_layer_of[depth] * self.block_size

    def slots(self, tables: list[list[int]], length: int) -> torch.Tensor:
        """Cache slots of positions 0..length-1 at cache layer 0 for each table: [len(tables), length].

        Add `offset(depth)` for another depth. Positions past a table's end map into group 0:
        only masked attention reads them.
        """
        width = max(len(t) for t in tables)
        padded = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.long)
        pos = torch.arange(length)
        return padded[:, pos // self.block_size] * self.group_slots + pos % self.block_size

    def write(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store keys/values [n, Hkv, hd] of n tokens at their slots [n]."""
        if not kernels.kv_write(self.k, self.v, slots, k, v):   # one C call on the CPU, in eager mode
            self.k.index_copy_(0, slots, k)
            self.v.index_copy_(0, slots, v)
        self.entries_written += len(slots)

    def read(self, slots: torch.Tensor):
        """Keys, values [B, Hkv, S, hd] at slots [B, S]."""
        shape = (*slots.shape, *self.k.shape[1:])
        flat = slots.view(-1)    # index_select: ~5x faster than k[slots]
        keys = self.k.index_select(0, flat).view(shape).permute(0, 2, 1, 3)
        values = self.v.index_select(0, flat).view(shape).permute(0, 2, 1, 3)
        return keys, values
