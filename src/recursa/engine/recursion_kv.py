"""Recursion-wise KV caching that reserves only the entries it writes: compact per-step tables.

Under Mixture-of-Recursions recursion-wise caching, recursion step r caches (and attends to) only
the tokens that ran step r. A dense cache keeps a slot for every (token, depth) and leaves the
skipped ones empty: it saves no memory. Here each request holds one table per *region* — a set of
depths that the same tokens run: region 0 is the prelude + coda (every token), region 1 + r the K
depths of recursion step r — and a region's entries e = 0, 1, .. are the tokens that reached it,
appended in the order they arrive (a request has one chunk in flight, so that is position order).
The in-flight tokens of a span always hold the table's last entries; they write them and attend to
all of them.

Memory is one pool of *layer blocks* (`block_size` slots of one cache layer) with one free list.
Block b of a region table is L layer blocks, one per depth of the region, so entry e at the
region's j-th depth lives at slot `units[b * L + j] * block_size + e % block_size`, b = e // block_size.
Beside each entry of a recursion step >= 1 the pool keeps the position it holds (`entry_pos`, at
the step's first depth; in the regions every token runs, entry e holds position e); attention
masks a key by entry < count (no stale tail of a reused block, no padding) and position <= the
query's position.

Allocation: the regions every token of a chunk runs (region 0 and step 0: the routers send every
token through step 0) take their entries when the chunk is admitted (`allocate`, as in the dense
manager). For step r >= 1 the chunk is *promised* room for all its tokens at admission (counted
against the free blocks by `blocks_needed` / `can_allocate`, so the scheduler's admission and
preemption stay as they are and a placed token always finds room), but blocks are handed out only
when tokens are about to run step r (`place`, from `span_view` before the span) and only for
those tokens; the rest of the promise shrinks to what the survivors could still need. A request
routed shallow holds no blocks for the steps it skipped, and the blocks it does not hold serve
other requests: at a fixed byte budget more requests run at once.
"""
from __future__ import annotations

import numpy as np
import torch

from recursa.engine.kv_cache import KVCacheManager
from recursa.engine.sequence import Sequence
from recursa.errors import RecursaError

EMPTY = 2**62   # the position of no entry: no query sees it


class RegionTable:
    """One request's entries in one region: L layer blocks per block of entries, and their count."""
    __slots__ = ("units", "count", "chunk", "row")

    def __init__(self, row: int = -1):
        self.units: list[int] = []   # layer blocks, L per block of entries (block-major)
        self.count = 0               # entries held
        self.chunk = -1              # chunk_start of the chunk whose tokens were placed last (lazy regions)
        self.row = row               # its row of the manager's unit_rows (the units as one numpy row), -1: none


def mor_regions(model) -> list[list[int]]:
    """Depths of each region of a Mixture-of-Recursions model: [prelude + coda, step 0, step 1, ..]."""
    st = model.structure()
    k = len(st.shared_layers)
    return [list(st.prelude) + list(st.coda)] + [list(st.shared[r * k:(r + 1) * k]) for r in range(st.n_loops)]


class RecursionKVCache(KVCacheManager):
    compact = True
    EAGER = 2   # regions 0 (prelude + coda) and 1 (step 0) take a chunk's entries at admission

    def __init__(self, regions: list[list[int]], n_kv_heads: int, head_dim: int, *, block_size: int,
                 memory_bytes: int, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        depth = sum(map(len, regions))
        self.region_of, self.layer_of = [0] * depth, [0] * depth
        for i, depths in enumerate(regions):
            for j, d in enumerate(depths):
                self.region_of[d], self.layer_of[d] = i, j
        self.widths = [len(r) for r in regions]
        self.cache_layer_of = list(range(depth))
        self.num_cache_layers, self.block_size = depth, block_size
        self.entry_bytes = 2 * n_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()
        self.kv_bytes_per_token = self.entry_bytes * depth   # what a token that ran every step would hold
        self.num_blocks = memory_bytes // (block_size * self.entry_bytes)   # layer blocks
        if self.num_blocks < depth:
            raise RecursaError(f"KV cache memory of {memory_bytes} bytes is less than one block "
                               f"({block_size} tokens x {self.kv_bytes_per_token} bytes over all depths)")
        self._init_pool(self.num_blocks * block_size, n_kv_heads, head_dim, dtype, device)
        self.entry_pos = np.full(self.num_blocks * block_size, EMPTY, dtype=np.int64)   # host
        self.tables: dict[int, list[RegionTable]] = {}   # id(seq) -> one table per region
        self.unit_rows = np.zeros((0, 0), dtype=np.int64)   # row per held table: its units (a span's view gathers rows)
        self.free_rows: list[int] = []
        self.promise: dict[int, int] = {}   # id(seq) -> layer blocks its chunk may still take in steps >= 1
        self.promised = 0                   # their sum: never more than the free blocks
        self.region_entries = [0] * len(regions)    # entries appended per region over the engine's life
        self.region_reserved = [0] * len(regions)   # bytes of the blocks handed out per region

    @classmethod
    def for_model(cls, model, **kwargs) -> "RecursionKVCache":
        cfg = model.cfg
        weight = model.embed_tokens.weight
        return cls(mor_regions(model), cfg.n_kv_heads, cfg.head_dim, dtype=weight.dtype, device=weight.device,
                   **kwargs)

    @property
    def memory_bytes(self) -> int:
        return self.num_blocks * self.block_size * self.entry_bytes

    def offset(self, depth: int) -> int:
        """The depth's layer inside its region (a span's view holds one slot table per depth of it, so
        the runner addresses them by the depth's index in the span instead)."""
        return self.layer_of[depth]

    def blocks_for(self, num_tokens: int) -> int:
        """Layer blocks a request of num_tokens tokens holds at most (every token at every step)."""
        return -(-num_tokens // self.block_size) * self.num_cache_layers

    def _tables(self, seq: Sequence) -> list[RegionTable]:
        tabs = self.tables.get(id(seq))
        if tabs is None:
            tabs = self.tables[id(seq)] = [RegionTable(self._row()) for _ in self.widths]
        return tabs

    def _row(self) -> int:
        if not self.free_rows:   # double the rows
            n = len(self.unit_rows)
            self.unit_rows = np.concatenate([self.unit_rows, np.zeros((max(n, 16), self.unit_rows.shape[1]), np.int64)])
            self.free_rows = list(range(len(self.unit_rows) - 1, n - 1, -1))
        return self.free_rows.pop()

    def _grow(self, tab: RegionTable, width: int, count: int) -> int:
        """Layer blocks tab needs to hold count entries."""
        return width * max(0, -(-count // self.block_size) - len(tab.units) // width) if width else 0

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= len(self.free_blocks) - self.promised

    def _worst(self, tabs: list[RegionTable], n: int, first: int) -> int:
        """Layer blocks regions first.. would take if n more tokens reached every one of them."""
        return sum(self._grow(tabs[i], self.widths[i], tabs[i].count + n) for i in range(first, len(tabs)))

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """Layer blocks (held + promised) seq's chunk up to num_tokens positions adds: entries in the
        regions every token runs, and room in every deeper step as if all its tokens went on."""
        tabs = self.tables.get(id(seq)) or [RegionTable() for _ in self.widths]
        n = num_tokens - seq.num_cached
        eager = sum(self._grow(tabs[i], self.widths[i], num_tokens) for i in range(self.EAGER))
        return eager + self._worst(tabs, n, self.EAGER) - self.promise.get(id(seq), 0)

    def _set_promise(self, seq: Sequence, blocks: int) -> None:
        self.promised += blocks - self.promise.get(id(seq), 0)
        self.promise[id(seq)] = blocks

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        """Entries for positions num_cached..num_tokens-1 in the regions every token runs; room in the
        deeper steps promised (the caller checked can_allocate(blocks_needed(..)))."""
        n = num_tokens - seq.num_cached
        tabs = self._tables(seq)
        self._set_promise(seq, 0)
        for i in range(self.EAGER):
            self._append(tabs[i], i, n)
        self._set_promise(seq, self._worst(tabs, n, self.EAGER))
        self.num_positions += n

    def place(self, seq: Sequence) -> None:
        """Append seq's in-flight tokens to the table of the recursion step they are about to run
        (once per chunk and step), out of the room promised to the chunk."""
        i = self.region_of[seq.depth]
        tabs = self.tables[id(seq)]
        tab = tabs[i]
        if i < self.EAGER:
            if seq.n_in_flight != tab.count - seq.chunk_start:   # a router let a token skip step 0
                raise RuntimeError(f"request {seq.request_id}: {seq.n_in_flight} tokens in flight at depth "
                                   f"{seq.depth}, {tab.count - seq.chunk_start} entries for the chunk")
            return
        if tab.chunk == seq.chunk_start:
            return
        self._set_promise(seq, 0)
        self._append(tab, i, seq.n_in_flight, seq.positions)
        tab.chunk = seq.chunk_start
        self._set_promise(seq, self._worst(tabs, seq.n_in_flight, i + 1))
        if self.promised > len(self.free_blocks):
            raise RuntimeError(f"request {seq.request_id} took more than its promised KV room at depth {seq.depth}")

    def _append(self, tab: RegionTable, region: int, n: int, positions: torch.Tensor | None = None) -> None:
        """n entries at the end of tab (holding `positions`; None: the regions where entry = position)."""
        width = self.widths[region]
        if width and n:
            need = self._grow(tab, width, tab.count + n)
            if need > len(self.free_blocks):
                raise RuntimeError(f"KV region {region} grows by {need} blocks, {len(self.free_blocks)} free")
            if need:
                tab.units.extend(self.free_blocks.pop() for _ in range(need))
                if len(tab.units) > self.unit_rows.shape[1]:   # widen (doubling) to the longest table
                    extra = max(len(tab.units) - self.unit_rows.shape[1], self.unit_rows.shape[1])
                    self.unit_rows = np.pad(self.unit_rows, ((0, 0), (0, extra)))
                self.unit_rows[tab.row, len(tab.units) - need:len(tab.units)] = tab.units[-need:]
                self.reserved_bytes += need * self.block_size * self.entry_bytes
                self.region_reserved[region] += need * self.block_size * self.entry_bytes
                self.version += 1
            if positions is not None and n == 1:   # a decode token: no tensor ops
                unit = tab.units[tab.count // self.block_size * width]
                self.entry_pos[unit * self.block_size + tab.count % self.block_size] = int(positions[0])
            elif positions is not None:
                e = np.arange(tab.count, tab.count + n)
                first = np.array(tab.units[0::width])   # each block's layer block at the region's first depth
                self.entry_pos[first[e // self.block_size] * self.block_size + e % self.block_size] = positions.numpy()
        tab.count += n
        self.region_entries[region] += n

    def free(self, seq: Sequence) -> None:
        self._set_promise(seq, 0)
        del self.promise[id(seq)]
        tabs = self.tables.pop(id(seq), None)
        for t in tabs or []:
            self.unit_rows[t.row] = 0
            self.free_rows.append(t.row)
        if tabs and any(t.units for t in tabs):
            for t in tabs:
                self.free_blocks.extend(reversed(t.units))
            self.version += 1

    def span_view(self, seqs: list[Sequence], n: int):
        """For a span group of n depths (its tokens placed first): slots [n, B, W] of each depth of the
        span, key positions [B, W] (EMPTY where no entry) and the slots of the in-flight tokens' own
        entries [n, N] (their table's last entries). A span may run on from one region into the next
        where both hold every token (the prelude into recursion step 0: the same entries). Built in
        numpy: a few dozen small host ops per span, each a tenth of a torch op's dispatch."""
        regions = [self.region_of[s.depth] for s in seqs]   # a span group may mix recursion steps
        for s, r in zip(seqs, regions):
            if r < self.EAGER or self.tables[id(s)][r].chunk != s.chunk_start:   # (else placed already)
                self.place(s)
        d0 = seqs[0].depth
        counts = [self.tables[id(s)][r].count for s, r in zip(seqs, regions)]
        w = max(counts)
        e = np.arange(w)
        # per depth of the span: (region after the request's own, layer in it), the same for the group
        plan = [(self.region_of[d0 + j] - self.region_of[d0], self.layer_of[d0 + j]) for j in range(n)]
        layers = {delta: self._slots([self.tables[id(s)][r + delta] for s, r in zip(seqs, regions)],
                                     self.widths[regions[0] + delta], w, e) for delta in {p[0] for p in plan}}
        slots = np.ascontiguousarray(np.stack([layers[delta][layer] for delta, layer in plan]))   # [n, B, W]
        counts = np.array(counts)
        if min(regions) >= self.EAGER:
            keys = self.entry_pos[slots[0]]
        elif max(regions) < self.EAGER:
            keys = np.broadcast_to(e, slots.shape[1:])
        else:
            keys = np.where(np.array(regions)[:, None] >= self.EAGER, self.entry_pos[slots[0]], e[None])
        keys = np.where(e[None] < counts[:, None], keys, EMPTY)
        sizes = [s.n_in_flight for s in seqs]
        first = np.arange(len(seqs)) * w + counts                          # flat index past each request's entries
        if max(sizes) == 1:   # decode tokens: each holds its table's last entry
            idx = first - 1
        else:
            ends = np.cumsum(sizes)
            idx = np.repeat(first - ends, sizes) + np.arange(int(ends[-1]))
        new = slots.reshape(n, -1)[:, idx]
        return torch.from_numpy(slots), torch.from_numpy(keys), torch.from_numpy(np.ascontiguousarray(new))

    def _slots(self, tabs: list[RegionTable], width: int, w: int, e: np.ndarray) -> np.ndarray:
        """Slots [width, B, w] of entries 0..w-1 at every layer of the tables' region (unused: block 0)."""
        nb = -(-w // self.block_size)
        units = self.unit_rows[[t.row for t in tabs], :nb * width]   # past a table's own units: block 0
        bs = self.block_size
        return units.reshape(len(tabs), nb, width).transpose(2, 0, 1)[:, :, e // bs] * bs + e % bs

__all__ = ["RecursionKVCache", "RegionTable", "mor_regions", "EMPTY"]
