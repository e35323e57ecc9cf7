"""Schedules, batch sampling and loss terms against hand-computed references."""
import math
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from recursa.data.packed import read_tokens
from recursa.model import Decoder
from recursa.train.data import Batches, unigram_loss, val_batches, val_windows
from recursa.train.losses import ForwardOutputs, LossTerm, Objective, default_objective
from recursa.train.schedule import lr_factor, progress

from train_helpers import micro_config


# ---- schedules ---------------------------------------------------------------------------------
def test_warmup_then_cosine_endpoints():
    assert lr_factor("cosine", 0, 0.0, 4) == pytest.approx(0.25)
    assert lr_factor("cosine", 3, 0.0, 4) == pytest.approx(1.0)
    assert lr_factor("cosine", 4, 0.0, 4, min_ratio=0.1) == pytest.approx(1.0)
    assert lr_factor("cosine", 9, 0.5, 4, min_ratio=0.1) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor("cosine", 99, 1.0, 4, min_ratio=0.1) == pytest.approx(0.1)


def test_wsd_is_flat_then_linear_cooldown():
    f = [lr_factor("wsd", 10, p, 0, min_ratio=0.0, decay_frac=0.25) for p in (0.0, 0.5, 0.75, 0.875, 1.0)]
    assert f == pytest.approx([1.0, 1.0, 1.0, 0.5, 0.0])


def test_progress_takes_the_further_of_steps_and_time():
    assert progress(12, 2, 22, 0.0, None) == pytest.approx(0.5)
    assert progress(12, 2, 22, 45.0, 1.0) == pytest.approx(0.75)
    assert progress(0, 0, None, 30.0, 1.0) == pytest.approx(0.5)
    assert progress(50, 2, 22, 0.0, None) == 1.0


# ---- batches -----------------------------------------------------------------------------------
def test_batches_are_shifted_windows_of_the_stream(data_dir):
    tokens = read_tokens(data_dir, "train")
    b = Batches(tokens, 16, 4, seed=3)
    starts = b.offsets(0)
    batch = b.next()
    for row, s in enumerate(starts):
        assert batch.inputs[row].tolist() == tokens[s:s + 16].tolist()
        assert batch.targets[row].tolist() == tokens[s + 1:s + 17].tolist()


def test_batches_resume_from_position_and_ranks_split_the_global_batch(data_dir):
    tokens = read_tokens(data_dir, "train")
    a = Batches(tokens, 16, 4, seed=3)
    seq = [a.next().inputs for _ in range(5)]
    b = Batches(tokens, 16, 4, seed=3)
    b.load_state_dict({"position": 3, "seed": 3})
    assert torch.equal(b.next().inputs, seq[3])
    assert not torch.equal(seq[0], seq[1])
    whole = Batches(tokens, 16, 4, seed=3).next().inputs
    r0 = Batches(tokens, 16, 2, seed=3, rank=0, world_size=2).next().inputs
    r1 = Batches(tokens, 16, 2, seed=3, rank=1, world_size=2).next().inputs
    assert torch.equal(torch.cat([r0, r1]), whole)
    assert not torch.equal(r0, r1)


def test_val_windows_are_fixed_and_shared_out_by_rank(data_dir):
    val = read_tokens(data_dir, "val")
    w = val_windows(val, 16, 6)
    assert np.array_equal(w, val_windows(val, 16, 6)) and w.shape == (6, 17)
    ranks = [val_batches(w, 2, r, 2) for r in range(2)]
    rows = sorted(tuple(x.tolist()) for bs in ranks for b in bs for x in b.inputs)
    assert rows == sorted(tuple(x) for x in w[:, :-1].tolist())


def test_unigram_loss_matches_counting_by_hand():
    train = np.array([0, 0, 1, 2, 2, 2], dtype=np.uint16)
    targets = np.array([[2, 0], [3, 1]])
    c, V = Counter(train.tolist()), 4
    expected = -sum(math.log((c[t] + 1) / (len(train) + V)) for t in targets.ravel()) / targets.size
    assert unigram_loss(train, targets, V) == pytest.approx(expected)


# ---- losses ------------------------------------------------------------------------------------
def _batch(data_dir):
    return Batches(read_tokens(data_dir, "train"), 16, 3, seed=0).next()


def test_ce_term_equals_manual_log_softmax(data_dir):
    torch.manual_seed(0)
    model = Decoder(micro_config())
    batch = _batch(data_dir)
    total, values = default_objective()(ForwardOutputs(model), model, batch)
    logp = torch.log_softmax(model(batch.inputs), -1)
    manual = -logp.gather(-1, batch.targets[..., None]).mean()
    assert torch.allclose(total, manual, atol=1e-6) and set(values) == {"ce"}


def test_distill_kl_zero_for_identical_teacher_and_matches_manual(data_dir):
    torch.manual_seed(0)
    student, teacher = Decoder(micro_config()), Decoder(micro_config())
    batch = _batch(data_dir)
    same = default_objective(student, 0.5)(ForwardOutputs(student), student, batch)[1]
    assert abs(same["distill_kl"].item()) < 1e-6
    total, values = default_objective(teacher, 0.5, temperature=2.0)(ForwardOutputs(student), student, batch)
    s = torch.log_softmax(student(batch.inputs) / 2, -1)
    t = torch.log_softmax(teacher(batch.inputs) / 2, -1)
    manual = (t.exp() * (t - s)).sum(-1).mean() * 4
    assert values["distill_kl"].item() == pytest.approx(manual.item(), rel=1e-5)
    assert total.item() == pytest.approx(values["ce"].item() + 0.5 * manual.item(), rel=1e-5)


def test_custom_term_reads_hidden_states_and_is_weighted(data_dir):
    torch.manual_seed(0)
    model = Decoder(micro_config())
    batch = _batch(data_dir)
    seen = {}

    def mid_norm(m, b, out):
        seen["n"] = len(out["hidden"])
        return out["hidden"][1].pow(2).mean()

    obj = Objective([LossTerm("ce", 1.0, lambda m, b, o: F.cross_entropy(o["logits"].flatten(0, 1), b.targets.flatten())),
                     LossTerm("mid", 0.1, mid_norm, needs=frozenset({"hidden"}))])
    total, values = obj(ForwardOutputs(model), model, batch)
    assert seen["n"] == model.depth + 1
    assert total.item() == pytest.approx(values["ce"].item() + 0.1 * values["mid"].item(), rel=1e-6)
    with pytest.raises(ValueError):
        LossTerm("bad", 1.0, mid_norm, needs=frozenset({"attention_maps"}))
