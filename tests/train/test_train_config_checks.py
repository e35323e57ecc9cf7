"""TrainConfig refuses what cannot train (issue 15): non-finite numbers (NaN passes every `< 0`
check, inf trains a NaN model), unknown devices, a --seq-len the preset cannot hold; and the
run-directory helpers tolerate a torn metrics line and name a field that differs on resume."""
from __future__ import annotations

from pathlib import Path

import pytest

from recursa.errors import RecursaError
from recursa.train import TrainConfig, TrainConfigError
from recursa.train.run_files import check_resume, truncate_metrics

BASE = dict(data="d", out="o", max_steps=1)


@pytest.mark.parametrize("field", ["lr", "weight_decay", "grad_clip", "min_lr_ratio", "beta1", "distill_temperature",
                                   "exit_weight", "layer_drop", "router_z_weight", "max_minutes"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_numbers_are_refused(field, value):
    with pytest.raises(TrainConfigError, match=f"{field} must be a finite number"):
        TrainConfig(**{**BASE, field: value})


@pytest.mark.parametrize("device", ["tpu", "gpu", "cuda:x", ""])
def test_unknown_devices_are_refused(device):
    with pytest.raises(TrainConfigError, match="unknown device"):
        TrainConfig(**BASE, device=device)


def test_seq_len_beyond_the_preset_is_refused_and_a_resume_may_name_no_model():
    with pytest.raises(TrainConfigError, match="exceeds the tiny preset's max_seq_len 256"):
        TrainConfig(**BASE, seq_len=257)
    TrainConfig(**BASE, device="cuda:1", seq_len=256)
    TrainConfig(**BASE, preset=None, resume=True)      # the checkpoint says which model
    with pytest.raises(TrainConfigError, match="exactly one"):
        TrainConfig(**BASE, preset=None)


def test_torn_metrics_lines_are_dropped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 3}\n{"step": 2, "loss": 2}\n{"step": 3, "lo')
    truncate_metrics(path, 2)
    assert path.read_text() == '{"step": 1, "loss": 3}\n{"step": 2, "loss": 2}\n'


def test_resume_names_the_differing_field(tmp_path):
    saved = TrainConfig(**BASE, seq_len=16, batch_size=4).to_dict()
    check_resume(TrainConfig(**BASE, seq_len=16, batch_size=4, resume=True, preset=None), saved, Path(tmp_path))
    for change, flag in ((dict(batch_size=8), "--batch-size 4, not 8"), (dict(preset="small"), "--preset tiny"),
                         (dict(seed=1), "--seed 1337, not 1")):
        with pytest.raises(RecursaError, match=flag):
            check_resume(TrainConfig(**{**BASE, "seq_len": 16, "batch_size": 4, **change}), saved, Path(tmp_path))
