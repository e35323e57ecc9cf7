"""Loading refuses broken model directories by name, and saving gives ordinary file modes
(issue 15, defects 4-6): non-finite weights, config.json fields of the wrong type, an unreadable
config.json, weights written 0600 that another user cannot read."""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from recursa import load
from recursa.config import ConfigError, ModelConfig
from recursa.io import default_mode, json_dumps, write_json_atomic
from recursa.model import Decoder
from recursa.model.decoder import CheckpointError
from recursa.train.checkpoint import save_checkpoint

MICRO = dict(vocab_size=64, dim=32, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=64, max_seq_len=64)


@pytest.fixture
def saved(tmp_path) -> Path:
    torch.manual_seed(0)
    Decoder(ModelConfig(**MICRO)).save(tmp_path / "m")
    return tmp_path / "m"


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_are_refused_naming_the_tensor(saved, value):
    state = load_file(saved / "model.safetensors")
    state["layers.0.attn.q_proj.weight"][0, 0] = value
    save_file(state, str(saved / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"tensor layers\.0\.attn\.q_proj\.weight holds non-finite") as e:
        load(saved)
    assert "\n" not in str(e.value)
    model = load(saved, check_finite=False)          # the opt-out, to inspect a diverged run
    assert not torch.isfinite(model.layers[0].attn.q_proj.weight).all()


@pytest.mark.parametrize("field, value, needle", [
    ("init_std", "x", "init_std must be a finite number"), ("rope_theta", float("nan"), "rope_theta"),
    ("norm_eps", True, "norm_eps"), ("tie_embeddings", "no", "tie_embeddings must be true or false"),
    ("tie_embeddings", 0, "tie_embeddings"), ("eos_token_id", 3.5, "eos_token_id must be an integer"),
    ("bos_token_id", True, "bos_token_id"), ("sharing", 3, "sharing must be a string"),
    ("mor_aux_router", "yes", "mor_aux_router"), ("lora_alpha", "2", "lora_alpha"),
])
def test_config_fields_of_the_wrong_type_are_named(field, value, needle):
    with pytest.raises(ConfigError, match=needle):
        ModelConfig.from_dict({**MICRO, field: value})


def test_nan_in_config_json_is_refused(saved):
    cfg = json.loads((saved / "config.json").read_text())
    (saved / "config.json").write_text(json.dumps({**cfg, "init_std": float("nan")}))   # json writes NaN
    with pytest.raises(CheckpointError, match="init_std must be a finite number"):
        load(saved)


def test_unreadable_config_is_one_line(saved, monkeypatch):
    real = Path.read_text

    def refuse(self, *a, **k):
        if self.name == "config.json":
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, *a, **k)

    monkeypatch.setattr(Path, "read_text", refuse)
    with pytest.raises(CheckpointError, match="cannot read .*config.json: Permission denied"):
        load(saved)


def test_saved_files_get_the_default_modes(saved, tmp_path):
    """safetensors and mkdtemp create private files (0600/0700): another user could not load them."""
    file_mode, dir_mode = default_mode(), default_mode(directory=True)
    for name in ("model.safetensors", "config.json"):
        assert stat.S_IMODE(os.stat(saved / name).st_mode) == file_mode
    ckpt = save_checkpoint(tmp_path / "run", load(saved), {"step": 0})
    assert stat.S_IMODE(os.stat(ckpt).st_mode) == dir_mode
    for name in ("model.safetensors", "config.json", "trainer.pt"):
        assert stat.S_IMODE(os.stat(ckpt / name).st_mode) == file_mode
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoint"]


def test_json_output_is_strict():
    """summary.json / metrics.jsonl / eval --json: NaN and inf become null, never the non-JSON NaN."""
    text = json_dumps({"val_loss": float("nan"), "xs": [1.0, float("inf")], "ok": 2.5})
    assert json.loads(text, parse_constant=lambda c: pytest.fail(c)) == {"val_loss": None, "xs": [1.0, None], "ok": 2.5}


def test_atomic_json_write_leaves_nothing_on_failure(tmp_path):
    with pytest.raises(TypeError):
        write_json_atomic(tmp_path / "x.json", {"bad": object()})
    assert list(tmp_path.iterdir()) == []
