"""The KV memory manager: byte budget -> blocks, allocation by groups, slots, freeing."""
import pytest
import torch

from recursa.engine.kv_cache import KVCacheManager
from recursa.engine.sampling_params import SamplingParams
from recursa.engine.sequence import Sequence
from recursa.errors import RecursaError


def test_budget_blocks_and_slots():
    # 3 depths, 2 KV heads x 8 dims, fp32: 2 * 2 * 8 * 4 * 3 = 384 bytes per token
    kv = KVCacheManager(3, 2, 8, block_size=4, memory_bytes=384 * 4 * 5 + 100)
    assert kv.kv_bytes_per_token == 384 and kv.num_blocks == 5
    assert kv.k.shape == (5 * 3 * 4, 2, 8)
    a, b = Sequence("a", [1] * 6, SamplingParams()), Sequence("b", [1] * 3, SamplingParams())
    assert kv.blocks_needed(a, 6) == 2
    kv.allocate(a, 6)
    kv.allocate(b, 3)
    assert kv.num_free_blocks == 2 and kv.blocks_needed(a, 8) == 0 and kv.blocks_needed(a, 9) == 1
    assert not kv.can_allocate(3)
    # position p of a request lives at group(p) * depths * block + p % block, + depth * block
    slots = kv.slots([a.block_table, b.block_table], 6)
    expected_a = [a.block_table[p // 4] * 12 + p % 4 for p in range(6)]
    assert slots[0].tolist() == expected_a
    assert slots[1, :3].tolist() == [b.block_table[0] * 12 + p for p in range(3)]
    all_slots = {int(s) + d * 4 for s in slots[0] for d in range(3)} | {int(s) + d * 4 for s in slots[1, :3] for d in range(3)}
    assert len(all_slots) == 9 * 3   # no two (request, position, depth) share a slot
    kv.free(a)
    kv.free(b)
    assert kv.num_free_blocks == 5 and a.block_table == [] and kv.memory_bytes == 5 * 4 * 384


def test_too_small_budget_is_a_user_error():
    with pytest.raises(RecursaError, match="less than one block"):
        KVCacheManager(30, 3, 64, block_size=16, memory_bytes=1000, dtype=torch.float32)
