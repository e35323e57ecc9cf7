"""Recursion-wise KV with compact per-(request, step) tables (engine/recursion_kv.py).

The manager alone, against hand-computed layouts: entries appended only for the tokens that reach a
step and holding their own positions, room promised at admission and handed out only as used, a
reused block never showing its previous owner's entries. The engine-level exactness of the
compact cache is in test_engine_mor.py (every MoR test under mor_kv="recursion" runs it).
"""
import pytest
import torch

from recursa.engine.recursion_kv import EMPTY, RecursionKVCache
from recursa.engine.sampling_params import SamplingParams
from recursa.engine.sequence import Sequence

BS = 4
REGIONS = [[0, 5], [1, 2], [3, 4]]   # prelude + coda, step 0, step 1 (K = 2): 6 depths


def _kv(blocks=40):
    return RecursionKVCache(REGIONS, 1, 2, block_size=BS, memory_bytes=blocks * BS * 2 * 2 * 4)


def _chunk(kv, seq, n):
    """Admit seq's next n tokens as the scheduler does."""
    need = kv.blocks_needed(seq, seq.num_cached + n)
    assert kv.can_allocate(need)
    kv.allocate(seq, seq.num_cached + n)
    seq.start_chunk(n)


def _at_step1(seq, positions):
    """The router let `positions` of the chunk run step 1: they wait at its first depth."""
    seq.depth = 3
    seq.set_tokens(torch.tensor(positions), None)


def _done(seq):
    seq.num_cached = seq.chunk_end
    seq.end_chunk()


def test_entries_hold_their_positions_and_only_reached_steps_hold_blocks():
    kv = _kv()
    a = Sequence("a", [1] * 6, SamplingParams())
    _chunk(kv, a, 6)
    # held: 2 blocks x 2 layers in each of regions 0 and 1; promised: step 1 for all 6 tokens
    assert kv.num_free_blocks == 40 - 8 and kv.promised == 4 and not kv.can_allocate(40 - 8 - 3)
    _at_step1(a, [1, 4, 5])
    slots, keys, new = kv.span_view([a], 2)
    assert keys.tolist() == [[1, 4, 5]]                      # compact: three entries, their own positions
    assert slots.shape == (2, 1, 3) and torch.equal(new, slots[:, 0])
    assert kv.num_free_blocks == 40 - 10 and kv.promised == 0   # one block of step 1, at its 2 layers
    assert len({int(s) for s in slots.view(-1)}) == 6          # one slot per (entry, layer)
    kv.span_view([a], 2)                                           # the span's next run: placed once per chunk
    assert kv.tables[id(a)][2].count == 3
    _done(a)
    a.token_ids.append(9)
    _chunk(kv, a, 1)                                           # the decode token 6 reaches step 1 as well
    _at_step1(a, [6])
    slots, keys, new = kv.span_view([a], 2)
    assert keys.tolist() == [[1, 4, 5, 6]] and torch.equal(new, slots[:, 0, 3:])
    # region 0 is dense by position: the prelude (its layer 0) of position p
    a.depth, a.positions = 0, torch.tensor([6])
    slots, keys, new = kv.span_view([a], 1)
    assert keys.tolist() == [list(range(7))] and slots.shape == (1, 1, 7) and torch.equal(new, slots[:, 0, 6:])
    # a span from the prelude on through step 0 (both hold every token): region 0's layer 0, then step 0's
    prelude, step0 = kv.span_view([a], 1)[0], kv.span_view([a], 3)[0]
    assert step0.shape == (3, 1, 7) and torch.equal(step0[0], prelude[0])
    units = kv.tables[id(a)][1].units   # step 0: block-major, 2 layers per block
    assert step0[1:, 0].tolist() == [[units[(p // BS) * 2 + j] * BS + p % BS for p in range(7)] for j in (0, 1)]
    kv.free(a)
    assert kv.num_free_blocks == 40 and kv.promised == 0


def test_reused_block_shows_no_stale_entries():
    kv = _kv()
    c = Sequence("c", [1] * 4, SamplingParams())
    _chunk(kv, c, 4)
    _at_step1(c, [0, 1, 2, 3])
    kv.span_view([c], 2)
    step1_blocks = list(kv.tables[id(c)][2].units)
    d, e = Sequence("d", [1] * 4, SamplingParams()), Sequence("e", [1] * 3, SamplingParams())
    _chunk(kv, d, 4)
    _chunk(kv, e, 3)
    kv.free(c)                                                 # its step-1 block is the next one handed out
    _at_step1(d, [3])
    _at_step1(e, [0, 1, 2])
    slots, keys, new = kv.span_view([d, e], 2)
    assert set(kv.tables[id(d)][2].units) & set(step1_blocks), "the test needs d to reuse c's block"
    # d's row is 3 wide (e's count): its tail slots are c's old entries and must read as empty
    assert keys.tolist() == [[3, EMPTY, EMPTY], [0, 1, 2]]
    assert new.shape == (2, 4) and torch.equal(new[:, 0], slots[:, 0, 0]) and torch.equal(new[:, 1:], slots[:, 1])


def test_admission_counts_the_promise():
    """A chunk is admitted only if its room in the deeper steps is free too; once its tokens stop
    early the room goes back to the pool (the dense cache would hold it to the end)."""
    kv = _kv(blocks=16)
    a, b = Sequence("a", [1] * 8, SamplingParams()), Sequence("b", [1] * 8, SamplingParams())
    _chunk(kv, a, 8)                                           # holds 8 (regions 0, 1), promised 4
    assert kv.blocks_needed(b, 8) == 12 and not kv.can_allocate(12)
    _at_step1(a, [7])                                          # only the last token goes on
    kv.span_view([a], 2)
    assert kv.num_free_blocks == 6 and kv.promised == 0
    _done(a)
    assert not kv.can_allocate(kv.blocks_needed(b, 8))
    kv.free(a)
    assert kv.can_allocate(kv.blocks_needed(b, 8))


def test_a_router_that_skips_step_0_is_caught():
    kv = _kv()
    a = Sequence("a", [1] * 4, SamplingParams())
    _chunk(kv, a, 4)
    a.depth = 1
    a.set_tokens(torch.tensor([0, 2]), None)
    with pytest.raises(RuntimeError, match="tokens in flight"):
        kv.span_view([a], 2)


def test_a_span_group_mixes_recursion_steps():
    """Continuous depth-wise batching runs step 0 of one request with step 1 of another (same
    weights): each row reads its own step's table."""
    kv = _kv()
    a, b = Sequence("a", [1] * 3, SamplingParams()), Sequence("b", [1] * 5, SamplingParams())
    _chunk(kv, a, 3)
    _chunk(kv, b, 5)
    a.depth = 1                                                # a's chunk at step 0: every token
    _at_step1(b, [2, 4])
    slots, keys, new = kv.span_view([a, b], 2)
    assert keys.tolist() == [[0, 1, 2], [2, 4, EMPTY]]
    assert torch.equal(new[:, :3], slots[:, 0]) and torch.equal(new[:, 3:], slots[:, 1, :2])
    assert not set(slots[:, 0].reshape(-1).tolist()) & set(slots[:, 1, :2].reshape(-1).tolist())
