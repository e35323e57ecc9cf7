"""Router losses of Mixture-of-Recursions models and MoR training through the one loop."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from recursa.model import Decoder, load
from recursa.train import TrainConfig, train
from recursa.train.data import Batch
from recursa.train.build import build_objective
from recursa.train.losses import ForwardOutputs
from recursa.train.mor_losses import expert_bce, mor_terms, router_z, token_balance, token_bias
from train_helpers import VOCAB, micro_config


def mor_model(seed=0, **changes) -> Decoder:
    torch.manual_seed(seed)
    base = dict(n_layers=8, sharing="middle_cycle", n_loops=3, mor_router="expert")
    return Decoder(micro_config(**{**base, **changes}))


def outputs_of(model, B=2, T=12, seed=0):
    torch.manual_seed(seed)
    ids = torch.randint(0, VOCAB, (B, T + 1))
    batch = Batch(ids[:, :-1], ids[:, 1:])
    return batch, ForwardOutputs(model)(batch.inputs, mor=True)


def test_expert_bce_matches_hand_computation_and_reaches_the_routers():
    m = mor_model()
    batch, out = outputs_of(m)
    info = out["mor"]
    want = []
    for r in (1, 2):
        a = info["alive"][r]
        s, t = info["scores"][r][a], info["selected"][r][a].float()
        want.append((-(t * F.logsigmoid(s) + (1 - t) * F.logsigmoid(-s))).mean())
    loss = expert_bce(m, batch, out)
    torch.testing.assert_close(loss, torch.stack(want).mean())
    loss.backward()
    for r in (1, 2):
        assert m.router.scorers[r].weight.grad.abs().sum() > 0


def test_aux_router_bce_trains_only_the_aux_router():
    m = mor_model(mor_aux_router=True)
    batch, out = outputs_of(m)
    expert_bce(m, batch, out).backward()
    assert m.router.aux[1].weight.grad.abs().sum() > 0
    assert m.router.scorers[1].weight.grad is None
    assert all(p.grad is None for p in m.layers.parameters())  # detached input


def test_topk_training_forward_selects_by_capacity():
    m = mor_model()
    _, out = outputs_of(m, B=3, T=12)
    assert [int(s.sum()) for s in out["mor"]["selected"]] == [36, 24, 12]


def test_token_balance_loss_and_gradients():
    m = mor_model(mor_router="token")
    batch, out = outputs_of(m)
    info = out["mor"]
    load = torch.stack([(info["depth"] == d).float().mean() for d in (1, 2, 3)])
    want = 3 * (load * info["probs"].reshape(-1, 3).mean(0)).sum()
    loss = token_balance(m, batch, out)
    torch.testing.assert_close(loss, want)
    (loss + router_z(m, batch, out)).backward()
    assert m.router.scorer.weight.grad.abs().sum() > 0


def test_loss_free_bias_moves_towards_balance():
    m = mor_model(mor_router="token", mor_balance="bias")
    m.train()
    batch, out = outputs_of(m)
    load = torch.stack([(out["mor"]["depth"] == d).float().mean() for d in (1, 2, 3)])
    token_bias(0.01)(m, batch, out)
    expected = 0.01 * torch.sign(load.mean() - load)
    torch.testing.assert_close(m.router.bias, expected)
    terms = {t.name: t for t in mor_terms(m)}
    assert set(terms) == {"mor_steps", "mor_z", "mor_bias"} and terms["mor_bias"].weight == 0


def test_build_objective_adds_router_terms(tmp_path):
    cfg = TrainConfig(data=str(tmp_path), out=str(tmp_path / "o"), max_steps=1)
    assert build_objective(cfg, mor_model(), None).names == ["ce", "mor_steps", "mor_bce", "mor_z"]
    assert build_objective(cfg, mor_model(mor_router="token"), None).names == ["ce", "mor_steps", "mor_z",
                                                                               "mor_balance"]
    assert build_objective(cfg, Decoder(micro_config()), None).names == ["ce"]


@pytest.mark.parametrize("router", ["expert", "token"])
def test_short_mor_training_run_learns(router, data_dir, tmp_path):
    init = tmp_path / "init"
    mor_model(mor_router=router, mor_kv="share" if router == "expert" else "recursion").save(init)
    out = tmp_path / "run"
    summary = train(TrainConfig(data=str(data_dir), out=str(out), preset=None, init=str(init), seq_len=16,
                                batch_size=8, lr=1e-2, warmup_steps=2, max_steps=30, eval_every=0,
                                progress=False))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["ce"] for r in records if "ce" in r]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3
    assert summary["beats_unigram"]
    assert 1.0 <= records[-2]["mor_steps"] <= 3.0
    back = load(out / "model")
    assert back.cfg.mor_router == router and back.router is not None


def test_cli_trains_a_mor_preset_with_router_flags(data_dir, tmp_path):
    import argparse

    from recursa.cli import train as train_cli

    parser = argparse.ArgumentParser()
    train_cli.register(parser.add_subparsers())
    args = parser.parse_args(["train", "--data", str(data_dir), "--out", str(tmp_path / "o"), "--preset", "mor-tiny",
                              "--max-steps", "2", "--seq-len", "16", "--batch-size", "2", "--no-progress",
                              "--router-bce-weight", "0.01", "--router-z-weight", "0"])
    assert args.router_bce_weight == 0.01 and args.router_balance_weight == 0.1
    assert args.func(args) == 0
    record = json.loads((tmp_path / "o" / "metrics.jsonl").read_text().splitlines()[0])
    assert "mor_bce" in record and "mor_z" not in record
    assert load(tmp_path / "o" / "model").cfg.mor_router == "expert"
