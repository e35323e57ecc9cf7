"""`recursa train` with exit losses: --exit-depths on fresh and --init models, curricula, frozen backbone."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from recursa.cli import main
from recursa.model import Decoder, load
from recursa.train.config import TrainConfig, TrainConfigError
from recursa.train.data import Batch
from recursa.train import train
from recursa.train.build import build_objective
from train_helpers import micro_config

COMMON = dict(seq_len=16, batch_size=2, eval_every=0, warmup_steps=1, progress=False)


def _records(run):
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "loss" in r]  # step records (the final line holds only val_loss)


def test_objective_adds_weighted_exit_ce(tmp_path):
    torch.manual_seed(0)
    model = Decoder(micro_config(n_layers=4, exit_depths=[1, 3]))
    cfg = TrainConfig(data="d", out="o", max_steps=1, exit_weight=0.3, exit_kd_weight=0.2)
    objective = build_objective(cfg, model, None)
    assert objective.names == ["ce", "exit_ce", "exit_hidden_kd"]
    ids = torch.randint(0, 64, (2, 9))
    batch = Batch(ids[:, :-1], ids[:, 1:])
    from recursa.train.losses import ForwardOutputs
    forward = ForwardOutputs(model)
    total, values = objective(forward, model, batch)
    with torch.no_grad():  # reference: exits through the shared final norm + tied head, written out
        hidden = model.forward_hidden(batch.inputs)
        ce = [F.cross_entropy(model.head(hidden[d]).flatten(0, 1), batch.targets.flatten()) for d in (1, 3, 4)]
    torch.testing.assert_close(values["ce"], ce[2])
    torch.testing.assert_close(values["exit_ce"], ce[0] + ce[1])
    torch.testing.assert_close(total.detach(), ce[2] + 0.3 * (ce[0] + ce[1]) + 0.2 * values["exit_hidden_kd"])


def test_fresh_preset_with_exits_and_rotational_curriculum(data_dir, tmp_path):
    cfg = TrainConfig(data=str(data_dir), out=str(tmp_path / "run"), preset="tiny", max_steps=4,
                      exit_depths=[1, 3], exit_own_norm=True, exit_weight=0.3, exit_curriculum="rotational", **COMMON)
    summary = train(cfg)
    records = _records(tmp_path / "run")
    assert "exit_ce_curriculum" in records[0] and "exit_ce" not in records[0]
    # rotational over 2 exits: step 0 trains exit 1, step 1 exit 3 -> both losses positive, and different weights
    assert all(r["exit_ce_curriculum"] > 0 for r in records)
    model = load(summary["model_dir"])
    assert model.cfg.exit_depths == [1, 3] and model.exit_heads is not None
    assert not torch.equal(model.exit_heads.norms["1"].weight, torch.ones_like(model.exit_heads.norms["1"].weight))


def test_gradual_curriculum_switches_exits_on(data_dir, tmp_path):
    seen = []
    cfg = TrainConfig(data=str(data_dir), out=str(tmp_path / "run"), preset="tiny", max_steps=4,
                      exit_depths=[1], exit_weight=1.0, exit_curriculum="gradual", **COMMON)
    train(cfg, on_step=lambda step, rec: seen.append(rec["exit_ce_curriculum"]))
    # L=4, exit 1, ramp over 2 steps: active once step*4 >= 2*3, i.e. from step 2 (0-based) on
    assert seen[0] == 0 and seen[1] == 0 and seen[2] > 0 and seen[3] > 0


def test_freeze_backbone_trains_only_exit_norms(micro_model_dir, data_dir, tmp_path):
    code = main(["train", "--data", str(data_dir), "--out", str(tmp_path / "run"), "--init", str(micro_model_dir),
                 "--exit-depths", "1", "--exit-own-norm", "--freeze-backbone", "--exit-weight", "1",
                 "--max-steps", "3", "--seq-len", "16", "--batch-size", "2", "--eval-every", "0", "--no-progress",
                 "--lr", "1e-2"])
    assert code == 0
    before, after = load(micro_model_dir), load(tmp_path / "run" / "model")
    assert after.cfg.exit_depths == [1] and after.cfg.exit_own_norm
    for (name, p), q in zip(before.named_parameters(), [p for n, p in after.named_parameters() if "exit" not in n]):
        assert torch.equal(p, q), name
    torch.testing.assert_close(before.norm.weight, after.norm.weight)
    assert not torch.allclose(after.exit_heads.norms["1"].weight, before.norm.weight)


def test_exit_flag_errors(micro_model_dir, data_dir, tmp_path, capsys):
    base = ["train", "--data", str(data_dir), "--max-steps", "1", "--seq-len", "16", "--batch-size", "2",
            "--no-progress"]
    cases = [
        (["--init", str(micro_model_dir), "--exit-depths", "1", "--freeze-backbone", "--exit-weight", "1"],
         "exit-own-norm"),
        (["--init", str(micro_model_dir), "--exit-depths", "2", "--exit-weight", "1"], "exit_depths"),
        (["--preset", "tiny", "--exit-weight", "1"], "--exit-depths"),
        (["--preset", "tiny", "--exit-depths", "1", "--exit-curriculum", "all"], "--exit-weight"),
    ]
    for i, (extra, needle) in enumerate(cases):
        assert main([*base, "--out", str(tmp_path / f"r{i}"), *extra]) == 2
        err = capsys.readouterr().err
        assert needle in err and len(err.strip().splitlines()) == 1, err
    with pytest.raises(SystemExit):
        main([*base, "--out", str(tmp_path / "x"), "--exit-depths", "a,b"])
    with pytest.raises(TrainConfigError, match="freeze"):
        TrainConfig(data="d", out="o", max_steps=1, freeze_backbone=True)
