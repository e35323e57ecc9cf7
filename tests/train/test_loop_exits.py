"""Loop-end exits of recursive models: exit logits, their losses, and uptraining converted models."""
import json

import pytest
import torch
import torch.nn.functional as F

from recursa.convert.recursive import to_recursive
from recursa.errors import RecursaError
from recursa.model import Decoder, load
from recursa.train import TrainConfig, train
from recursa.train.data import Batch
from recursa.train.losses import ForwardOutputs, Objective, default_objective
from recursa.train.loop_exits import loop_exit_distill, loop_exit_logits, loop_exit_terms
from train_helpers import micro_config


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
