"""Exit loss terms against values computed by hand from the model's hidden states."""
import pytest
import torch

from recursa.config import preset
from recursa.errors import RecursaError
from recursa.model import Decoder
from recursa.model.exits import ExitHeads, ExitSpec
from recursa.train.data import Batch
from recursa.train.exit_losses import (ExitCurriculum, curriculum_ce, exit_terms, hidden_distill, matched_layers,
                                       multi_exit_ce)
from recursa.train.losses import ForwardOutputs, LossTerm, Objective, next_token_ce


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
    h = [t.detach() for t in out["hidden"]]
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
