"""The decoder's stage API and persistence agree with its own full-sequence forward."""
import json

import pytest
import torch

from recursa.config import ConfigError, ModelConfig

from recursa.presets import preset
from recursa.model import CheckpointError, Decoder, load
from recursa.model.layers import causal_mask


@pytest.fixture
def model():
    torch.manual_seed(0)
    return Decoder(preset("tiny")).eval()


def test_preset_param_counts():
    assert 0.8e6 < preset("tiny").num_params() < 1.2e6
    assert 10e6 < preset("small").num_params() < 20e6
    assert abs(preset("135m").num_params() - 134.5e6) < 0.1e6
    m = Decoder(preset("tiny"))
    assert m.num_params() == preset("tiny").num_params()


@pytest.mark.parametrize(
    "bad, field",
    [({"n_heads": 5}, "n_heads"), ({"n_kv_heads": 3}, "n_kv_heads"), ({"dim": 0}, "dim"), ({"colour": 1}, "colour")],
)
def test_config_rejects_impossible_shapes(bad, field):
    with pytest.raises(ConfigError, match=field):
        ModelConfig.from_dict({**preset("tiny").to_dict(), **bad})


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset"):
        preset("huge")


def test_stagewise_cache_matches_full_forward(model):
    torch.manual_seed(1)
    ids = torch.randint(0, model.cfg.vocab_size, (2, 12))
    full = model(ids)
    # prefill 7 tokens, then feed the rest in chunks of 3 and 2 with explicit KV in/out
    caches = [None] * model.depth
    outs, pos = [], 0
    for chunk in (7, 3, 2):
        x = ids[:, pos:pos + chunk]
        h = model.embed(x)
        cos, sin = model.rope(torch.arange(pos, pos + chunk))
        for d in range(model.depth):
            h, (k, v) = model.forward_stage(d, h, cos, sin, past_kv=caches[d])
            caches[d] = (k, v) if caches[d] is None else (torch.cat((caches[d][0], k), 2), torch.cat((caches[d][1], v), 2))
        outs.append(model.head(h))
        pos += chunk
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-5, rtol=0)


def test_explicit_mask_equals_default_causal(model):
    ids = torch.randint(0, model.cfg.vocab_size, (1, 9))
    h = model.embed(ids)
    cos, sin = model.rope(torch.arange(9))
    a, _ = model.forward_stage(0, h, cos, sin)
    b, _ = model.forward_stage(0, h, cos, sin, mask=causal_mask(9, 9)[None, None])
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_save_load_roundtrip(model, tmp_path):
    model.save(tmp_path / "m")
    loaded = load(tmp_path / "m")
    ids = torch.randint(0, model.cfg.vocab_size, (1, 8))
    assert torch.equal(loaded(ids), model(ids))
    assert not list((tmp_path / "m").glob("*.tmp"))


def test_load_errors(model, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load(tmp_path / "nope")
    model.save(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="safetensors"):
        load(tmp_path / "m")
    model.save(tmp_path / "m2")
    cfg = json.loads((tmp_path / "m2" / "config.json").read_text())
    cfg["n_layers"] = 5
    (tmp_path / "m2" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="does not match"):
        load(tmp_path / "m2")
