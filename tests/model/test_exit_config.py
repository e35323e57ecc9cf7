"""Exits as part of the model config: validation, ExitSpec from the config, own norms saved with the model."""
import pytest
import torch

from recursa.config import ConfigError, ModelConfig

from recursa.presets import preset
from recursa.model import Decoder, load
from recursa.model.exits import ExitSpec, exit_logits, with_exits


def test_config_validates_exit_fields_naming_them():
    for bad in ([0], [4], [2, 1], [1, 1], ["1"], [True]):
        with pytest.raises(ConfigError, match="exit_depths"):
            preset("tiny", exit_depths=bad)
    with pytest.raises(ConfigError, match="exit_own_norm"):
        preset("tiny", exit_own_norm=True)
    cfg = preset("tiny", exit_depths=[1, 3], exit_own_norm=True)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert ExitSpec.from_config(cfg) == ExitSpec((1, 3), own_norm=True)
    assert ExitSpec.from_config(preset("tiny")).depths == ()


def test_own_norms_are_model_parameters_and_counted():
    m = Decoder(preset("tiny", exit_depths=[2], exit_own_norm=True))
    names = [n for n, _ in m.named_parameters()]
    assert "exit_heads.norms.2.weight" in names
    assert m.num_params() == m.cfg.num_params() == Decoder(preset("tiny")).num_params() + m.cfg.dim
    assert Decoder(preset("tiny", exit_depths=[2])).exit_heads is None


def test_save_load_round_trip_with_exits(tmp_path):
    torch.manual_seed(0)
    m = Decoder(preset("tiny", exit_depths=[1, 2], exit_own_norm=True)).eval()
    with torch.no_grad():
        m.exit_heads.norms["1"].weight.uniform_(0.5, 1.5)
    m.save(tmp_path)
    m2 = load(tmp_path)
    assert m2.cfg.exit_depths == [1, 2] and m2.cfg.exit_own_norm
    torch.testing.assert_close(m2.exit_heads.norms["1"].weight, m.exit_heads.norms["1"].weight, rtol=0, atol=0)
    ids = torch.tensor([[3, 9, 27, 81]])
    with torch.no_grad():
        h = m.forward_hidden(ids)[1]
        got = exit_logits(m2, h, 1)  # the loaded model's own norm is used by default
        # reference: the own norm written out by hand, then the tied LM head
        x = h.float()
        ref = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + m.cfg.norm_eps)) * m.exit_heads.norms["1"].weight
        ref = ref @ m.embed_tokens.weight.T
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, m.head(h))  # differs from the shared final norm


def test_with_exits_adds_heads_initialised_from_final_norm(tmp_path):
    torch.manual_seed(0)
    m = Decoder(preset("tiny"))
    with torch.no_grad():
        m.norm.weight.uniform_(0.5, 1.5)
    with_exits(m, [1, 3], own_norm=True)
    assert m.cfg.exit_depths == [1, 3]
    torch.testing.assert_close(m.exit_heads.norms["3"].weight, m.norm.weight)
    m.save(tmp_path)
    assert load(tmp_path).exit_heads is not None
    with_exits(m, [2])
    assert m.exit_heads is None and not any("exit" in n for n, _ in m.named_parameters())
