"""Exit loss terms against values computed by hand from the model's hidden states, and loop-end
exits of recursive models (exit logits, their losses, uptraining converted models)."""
import json

import pytest
import torch
import torch.nn.functional as F

from recursa.presets import preset
from recursa.convert.recursive import to_recursive
from recursa.errors import RecursaError
from recursa.model import Decoder, load
from recursa.model.exits import ExitHeads, ExitSpec
from recursa.train import TrainConfig, train
from recursa.train.data import Batch
from recursa.train.exit_losses import (ExitCurriculum, curriculum_ce, exit_terms, hidden_distill, loop_exit_distill,
                                       loop_exit_logits, loop_exit_terms, matched_layers, multi_exit_ce)
from recursa.train.losses import ForwardOutputs, LossTerm, Objective, default_objective, next_token_ce
from train_helpers import micro_config


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = Decoder(preset("tiny", n_layers=4, vocab_size=64, dim=32, n_heads=4, n_kv_heads=2, ffn_dim=64))
    ids = torch.randint(0, 64, (2, 9))
    batch = Batch(ids[:, :-1], ids[:, 1:])
    return model, batch


def _outputs(model, batch):
    return ForwardOutputs(model)(batch.inputs, hidden=True)


def _ce_by_hand(h, model, targets):
    """Mean over tokens of logsumexp(z) - z[target], z = lm_head(norm(h)) written out."""
    x = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + model.cfg.norm_eps) * model.norm.weight
    z = x @ model.embed_tokens.weight.T
    return (torch.logsumexp(z, -1) - z.gather(-1, targets[..., None])[..., 0]).mean()


def test_multi_exit_ce_by_hand(setup):
    model, batch = setup
    out = _outputs(model, batch)
    got = multi_exit_ce(ExitSpec((1, 3)), weights=(0.25, 2.0))(model, batch, out)
    with torch.no_grad():
        hidden = model.forward_hidden(batch.inputs)
        ref = 0.25 * _ce_by_hand(hidden[1], model, batch.targets) + 2.0 * _ce_by_hand(hidden[3], model, batch.targets)
    assert float(got.detach()) == pytest.approx(float(ref), rel=1e-5)
    assert set(out["exit_logits"]) == {1, 3}
    with pytest.raises(RecursaError):
        multi_exit_ce(ExitSpec((1, 3)), weights=(1.0,))


def test_own_norm_heads_get_gradients(setup):
    model, batch = setup
    heads = ExitHeads(model, ExitSpec((2,), own_norm=True))
    loss = multi_exit_ce(ExitSpec((2,), own_norm=True), heads=heads)(model, batch, _outputs(model, batch))
    loss.backward()
    assert heads.norms["2"].weight.grad is not None and heads.norms["2"].weight.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)


def test_hidden_distill_by_hand(setup):
    model, batch = setup
    assert matched_layers(2, 4) == [(1, 2), (2, 4)]
    assert matched_layers(3, 8) == [(1, 2), (2, 5), (3, 8)]
    out = _outputs(model, batch)
    got = hidden_distill(ExitSpec((2,)))(model, batch, out)
    h = [t.detach() / t.detach().pow(2).mean(-1, keepdim=True).add(1e-6).sqrt() for t in out["hidden"]]  # RMS-normalised
    ref = (((h[1] - h[2]) ** 2).mean() + ((h[2] - h[4]) ** 2).mean()) / 2
    assert float(got.detach()) == pytest.approx(float(ref), rel=1e-5)
    got.backward()  # the deep side is detached: the last layer gets no gradient from this term
    last = model.layers[3].mlp.down_proj.weight
    assert last.grad is None or last.grad.abs().sum() == 0
    assert model.layers[0].mlp.down_proj.weight.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)


def test_curriculum_schedules_and_weights():
    spec = ExitSpec((1, 2, 3))
    rot = ExitCurriculum(spec, "rotational", period=2)
    rot.step = 0
    assert rot.active(4) == [1, 3]
    rot.step = 5
    assert rot.active(4) == [2]
    grad = ExitCurriculum(spec, "gradual", ramp_steps=100)
    for step, want in ((0, []), (25, [3]), (49, [3]), (50, [2, 3]), (75, [1, 2, 3]), (500, [1, 2, 3])):
        grad.step = step
        assert grad.active(4) == want, step
    assert [ExitCurriculum(spec, scale=2.0).weight(e, 4) for e in (1, 2, 3)] == pytest.approx([0.2, 0.6, 1.2])
    with pytest.raises(RecursaError):
        ExitCurriculum(spec, "random")


def test_curriculum_ce_by_hand_and_in_objective(setup):
    model, batch = setup
    cur = ExitCurriculum(ExitSpec((1, 2, 3)), "gradual", ramp_steps=100, step=50)  # exits 2, 3 active
    out = _outputs(model, batch)
    got = curriculum_ce(cur)(model, batch, out)
    with torch.no_grad():
        hidden = model.forward_hidden(batch.inputs)
        ref = 0.3 * _ce_by_hand(hidden[2], model, batch.targets) + 0.6 * _ce_by_hand(hidden[3], model, batch.targets)
    assert float(got.detach()) == pytest.approx(float(ref), rel=1e-5)
    cur.step = 0
    assert float(curriculum_ce(cur)(model, batch, _outputs(model, batch)).detach()) == 0.0

    cur.step = 100
    terms = [LossTerm("ce", 1.0, next_token_ce), *exit_terms(ExitSpec((1, 2, 3)), ce_weight=0.1, kd_weight=0.5,
                                                             curriculum=cur)]
    obj = Objective(terms)
    assert obj.names == ["ce", "exit_ce", "exit_hidden_kd", "exit_ce_curriculum"]
    total, values = obj(ForwardOutputs(model), model, batch)
    want = values["ce"] + 0.1 * values["exit_ce"] + 0.5 * values["exit_hidden_kd"] + values["exit_ce_curriculum"]
    assert float(total.detach()) == pytest.approx(float(want), rel=1e-6)
    assert exit_terms(ExitSpec((1,)), ce_weight=0.0) == []


# ---- loop-end exits of recursive models ----

def shared_model(sharing, n_loops, n_layers=6) -> Decoder:
    torch.manual_seed(0)
    return Decoder(micro_config(n_layers=n_layers, sharing=sharing, n_loops=n_loops))


def truncated(model: Decoder, depths: list[int]) -> Decoder:
    """Independent reference: a vanilla model running copies of the blocks at `depths`, in order."""
    plain = Decoder(model.cfg.replace(sharing="none", n_loops=1, n_layers=len(depths)))
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("layers.")}
    for i, d in enumerate(depths):
        state.update({f"layers.{i}.{k}": v for k, v in model.stage(d).state_dict().items()})
    plain.load_state_dict(state)
    return plain


@pytest.mark.parametrize("sharing, n, exit_depths", [
    ("cycle", 3, [[0, 1], [0, 1, 2, 3]]),
    ("middle_cycle", 2, [[0, 1, 2, 5]]),            # 1 + 2x2 + 1: loop 0 then the coda layer
])
def test_exit_logits_equal_truncated_models(sharing, n, exit_depths):
    m = shared_model(sharing, n).eval()
    ids = torch.randint(0, m.cfg.vocab_size, (2, 10))
    exits = loop_exit_logits(m, m.forward_hidden(ids))
    assert len(exits) == len(exit_depths) == n - 1
    for z, depths in zip(exits, exit_depths):
        torch.testing.assert_close(z, truncated(m, depths)(ids), atol=1e-5, rtol=0)


def test_loss_values_and_weights():
    m = shared_model("cycle", 3)
    ids = torch.randint(0, m.cfg.vocab_size, (2, 11))
    batch = Batch(ids[:, :-1], ids[:, 1:])
    objective = Objective(default_objective().terms + loop_exit_terms(m, 0.1, 0.5))
    total, values = objective(ForwardOutputs(m), m, batch)
    exits = loop_exit_logits(m, m.forward_hidden(batch.inputs))
    ce = [F.cross_entropy(z.flatten(0, 1), batch.targets.flatten()) for z in exits]
    final = F.log_softmax(m(batch.inputs), -1)
    kl = [(final.exp() * (final - F.log_softmax(z, -1))).sum(-1).mean() for z in exits]
    torch.testing.assert_close(values["loop_exit_ce"], sum(ce).detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(values["loop_exit_distill"], sum(kl).detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(total, values["ce"] + 0.1 * sum(ce) + 0.5 * sum(kl), atol=1e-5, rtol=0)


def test_distill_leaves_the_final_exit_alone():
    m = shared_model("middle_cycle", 2)
    ids = torch.randint(0, m.cfg.vocab_size, (1, 9))
    batch = Batch(ids[:, :-1], ids[:, 1:])
    outputs = ForwardOutputs(m)(batch.inputs, hidden=True)
    loss = loop_exit_distill(m, batch, outputs)
    # the final exit is the teacher: no gradient flows back through it, only through the exits
    (to_final, to_loop0) = torch.autograd.grad(loss, [outputs["logits"], outputs["hidden"][3]], allow_unused=True)
    assert to_final is None and to_loop0.abs().sum() > 0


def test_rejects_models_without_loop_ends():
    with pytest.raises(RecursaError, match="cycle"):
        loop_exit_terms(shared_model("sequence", 2), 0.1)
    with pytest.raises(RecursaError, match="cycle"):
        loop_exit_terms(Decoder(micro_config()), 0.1)
    assert loop_exit_terms(Decoder(micro_config()), 0.0) == []


def test_uptrain_converted_model_with_exits_and_teacher(data_dir, tmp_path):
    torch.manual_seed(0)
    original = Decoder(micro_config(n_layers=6))
    original.save(tmp_path / "orig")
    to_recursive(original, "cycle", 3, "stepwise", lora_rank_attn=2, lora_rank_mlp=2).save(tmp_path / "rec")

    def objective(model, teacher):
        return Objective(default_objective(teacher, 0.5).terms + loop_exit_terms(model, 0.1, 0.1), teacher)

    cfg = TrainConfig(data=str(data_dir), out=str(tmp_path / "run"), preset=None, init=str(tmp_path / "rec"),
                      distill_from=str(tmp_path / "orig"), distill_weight=0.5, seq_len=16, batch_size=4,
                      max_steps=4, eval_every=0, warmup_steps=1, progress=False)
    summary = train(cfg, make_objective=objective)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {"ce", "distill_kl", "loop_exit_ce", "loop_exit_distill"} <= records[0].keys()
    trained = load(summary["model_dir"])
    assert trained.cfg.sharing == "cycle" and trained.cfg.lora_rank_attn == 2 and len(trained.layers) == 2
    before = load(tmp_path / "rec")
    assert not torch.equal(trained.layers[0].attn.q_proj.weight, before.layers[0].attn.q_proj.weight)
    assert not torch.equal(trained.lora["3"]["q_proj"].B, before.lora["3"]["q_proj"].B)


def test_cli_train_init_converted_dir(data_dir, tmp_path, capsys):
    from recursa.cli import main

    torch.manual_seed(0)
    Decoder(micro_config(n_layers=4)).save(tmp_path / "orig")
    assert main(["convert", "--recursive", str(tmp_path / "orig"), "--out", str(tmp_path / "rec"),
                 "--sharing", "cycle", "--loops", "2", "--lora-rank", "2"]) == 0
    common = ["--data", str(data_dir), "--max-steps", "2", "--seq-len", "16", "--batch-size", "2",
              "--eval-every", "0", "--no-progress"]
    code = main(["train", "--out", str(tmp_path / "run"), "--init", str(tmp_path / "rec"),
                 "--distill-from", str(tmp_path / "orig"), "--distill-weight", "1",
                 "--loop-exit-weight", "0.1", "--loop-exit-distill", "0.5", *common])
    assert code == 0
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert {"ce", "distill_kl", "loop_exit_ce", "loop_exit_distill"} <= record.keys()
    assert load(tmp_path / "run" / "model").cfg.lora_rank_mlp == 2
    capsys.readouterr()
    code = main(["train", "--out", str(tmp_path / "bad"), "--init", str(tmp_path / "orig"),
                 "--loop-exit-weight", "0.1", *common])
    assert code == 2 and "cycle" in capsys.readouterr().err
