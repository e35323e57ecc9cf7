"""LayerSkip layer dropout: schedules, eval/no-grad behaviour, per-sample skipping against truncated models."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from recursa.errors import RecursaError
from recursa.model import Decoder
from recursa.train import TrainConfig, TrainConfigError, train
from recursa.train.layer_dropout import LayerDropForward, layer_drop_rates, make_forward
from recursa.train.losses import ForwardOutputs
from train_helpers import micro_config


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Decoder(micro_config(n_layers=4)).train()


def truncated(model: Decoder, depths: list[int]) -> Decoder:
    """Independent reference: a plain model running copies of the layers at `depths`, in order."""
    plain = Decoder(model.cfg.replace(n_layers=len(depths)))
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("layers.")}
    for i, d in enumerate(depths):
        state.update({f"layers.{i}.{k}": v for k, v in model.stage(d).state_dict().items()})
    plain.load_state_dict(state)
    return plain


def test_rates_rise_with_depth_from_zero():
    exp = layer_drop_rates(4, 0.3, "exp")
    assert exp == pytest.approx([0.0, 0.3 * (2 ** (1 / 3) - 1), 0.3 * (2 ** (2 / 3) - 1), 0.3])
    assert layer_drop_rates(5, 0.2, "linear") == pytest.approx([0.0, 0.05, 0.1, 0.15, 0.2])
    assert layer_drop_rates(1, 0.5) == [0.0]
    with pytest.raises(RecursaError):
        layer_drop_rates(4, 0.2, "cubic")
    with pytest.raises(RecursaError):
        layer_drop_rates(4, 1.5)
    with pytest.raises(RecursaError):
        LayerDropForward(Decoder(micro_config(n_layers=4)), rates=[0.0, 0.5])


def test_rate_zero_is_the_plain_forward(model):
    ids = torch.randint(0, model.cfg.vocab_size, (3, 12))
    plain = ForwardOutputs(model)(ids, hidden=True)
    assert type(make_forward(model, 0.0)) is ForwardOutputs
    # the dropout path itself with nothing dropped (rate 1e-12) gives the same outputs
    out = LayerDropForward(model, 1e-12).train()(ids, hidden=True)
    torch.testing.assert_close(out["logits"], plain["logits"], atol=1e-6, rtol=0)
    for a, b in zip(out["hidden"], plain["hidden"]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_no_dropout_in_eval_mode_or_without_grad(model):
    ids = torch.randint(0, model.cfg.vocab_size, (2, 10))
    ref = model(ids)
    fwd = LayerDropForward(model, rates=[0.0, 0.0, 1.0, 1.0])
    with torch.no_grad():  # train mode, but the loop's evaluate runs under no_grad
        torch.testing.assert_close(fwd.train()(ids)["logits"], ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(fwd.eval()(ids)["logits"], ref, atol=1e-6, rtol=0)
    fwd.train()


def test_rate_one_skips_the_deep_layers_like_a_truncated_model(model):
    ids = torch.randint(0, model.cfg.vocab_size, (3, 12))
    out = LayerDropForward(model, rates=[0.0, 0.0, 1.0, 1.0]).train()(ids, hidden=True)
    torch.testing.assert_close(out["logits"], truncated(model, [0, 1])(ids), atol=1e-5, rtol=0)
    assert torch.equal(out["hidden"][4], out["hidden"][2])  # skipped layers pass h through
    # p_max = 1: the last layer is always dropped (its rate is exactly p_max under both schedules)
    for schedule in ("exp", "linear"):
        fwd = LayerDropForward(model, 1.0, schedule).train()
        torch.manual_seed(1)
        hidden = fwd(ids, hidden=True)["hidden"]
        assert torch.equal(hidden[4], hidden[3])


def test_skipping_is_per_sample(model):
    torch.manual_seed(0)
    ids = torch.randint(0, model.cfg.vocab_size, (64, 8))
    full, short = model(ids), truncated(model, [0, 1, 2])(ids)
    out = LayerDropForward(model, rates=[0.0, 0.0, 0.0, 0.5]).train()(ids)["logits"]
    dropped = [bool(torch.allclose(out[i], short[i], atol=1e-5)) for i in range(64)]
    kept = [bool(torch.allclose(out[i], full[i], atol=1e-5)) for i in range(64)]
    assert all(a != b for a, b in zip(dropped, kept))  # every sample is exactly one of the two
    assert 16 < sum(dropped) < 48


def test_gradients_equal_the_truncated_models(model):
    ids = torch.randint(0, model.cfg.vocab_size, (2, 9))
    targets = torch.randint(0, model.cfg.vocab_size, (2, 9))
    model.zero_grad(set_to_none=True)
    logits = LayerDropForward(model, rates=[0.0, 0.0, 1.0, 1.0]).train()(ids)["logits"]
    F.cross_entropy(logits.flatten(0, 1), targets.flatten()).backward()
    ref = truncated(model, [0, 1])
    F.cross_entropy(ref(ids).flatten(0, 1), targets.flatten()).backward()
    for d in (0, 1):
        got, want = model.layers[d].mlp.down_proj.weight.grad, ref.layers[d].mlp.down_proj.weight.grad
        assert want.abs().sum() > 0
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    for d in (2, 3):  # called with an empty batch: in the graph, zero gradient
        assert float(model.layers[d].mlp.down_proj.weight.grad.abs().sum()) == 0.0
    torch.testing.assert_close(model.embed_tokens.weight.grad, ref.embed_tokens.weight.grad, atol=1e-6, rtol=1e-5)
    model.zero_grad(set_to_none=True)


def test_training_with_layer_drop_and_exits(data_dir, tmp_path):
    cfg = TrainConfig(data=str(data_dir), out=str(tmp_path / "run"), preset="tiny", seq_len=16, batch_size=4,
                      max_steps=3, eval_every=0, warmup_steps=1, progress=False, exit_depths=[1], exit_weight=0.3,
                      layer_drop=0.5, layer_drop_schedule="linear")
    summary = train(cfg)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) for r in records if "loss" in r) and "exit_ce" in records[0]
    assert math.isfinite(summary["val_loss"])
    with pytest.raises(TrainConfigError, match="layer_drop"):
        TrainConfig(data="d", out="o", max_steps=1, layer_drop=1.0)
    with pytest.raises(TrainConfigError, match="layer_drop_schedule"):
        TrainConfig(data="d", out="o", max_steps=1, layer_drop=0.1, layer_drop_schedule="cubic")


def test_cli_flag(data_dir, tmp_path):
    from recursa.cli import main

    code = main(["train", "--data", str(data_dir), "--out", str(tmp_path / "cli"), "--max-steps", "1",
                 "--seq-len", "16", "--batch-size", "2", "--eval-every", "0", "--no-progress",
                 "--layer-drop", "0.3", "--layer-drop-schedule", "exp"])
    assert code == 0 and (tmp_path / "cli" / "model" / "model.safetensors").is_file()
