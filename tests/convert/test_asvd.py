"""Activation-aware LoRA init of a relaxed conversion: exact at full rank, better outputs when truncated."""
import pytest
import torch

from recursa.cli import main
from recursa.convert import calibrate
from recursa.convert.recursive import _lora_target, to_recursive
from recursa.data.packed import write_tokens
from recursa.errors import RecursaError
from recursa.model import Decoder, load
from recursa.model.lora import LoRA
from recursa.presets import preset


@pytest.fixture(scope="module")
def original():
    """A 4-layer vanilla model with per-layer norm gains and one massive residual channel (as SmolLM2 has)."""
    torch.manual_seed(0)
    m = Decoder(preset("tiny", n_layers=4)).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.dim() == 1:
                p.mul_(1 + 0.3 * torch.rand_like(p))
        m.embed_tokens.weight[:, 3] += 40.0
        m.layers[0].mlp.down_proj.weight[5] *= 30.0   # a second outlier channel from the first MLP on
    return m


@pytest.fixture(scope="module")
def calib(original):
    return torch.randint(0, original.cfg.vocab_size, (4, 32), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("lora_init", ["svd", "asvd"])
def test_full_rank_reproduces_original(original, calib, lora_init):
    ids = torch.randint(0, original.cfg.vocab_size, (2, 16))
    r = to_recursive(original, "cycle", 2, "stepwise", 10_000, 10_000, lora_alpha=8.0, lora_init=lora_init, calib=calib)
    torch.testing.assert_close(r(ids), original(ids), atol=1e-4, rtol=1e-5)


def _output_error(model, relaxed, moments) -> dict[tuple[int, str], float]:
    """E||(W_d - W_eff) x||^2 on the calibration inputs, per (depth, projection)."""
    errors = {}
    shared = [{n: t for n, t in b.state_dict().items()} for b in relaxed.layers]
    orig = [{n: t for n, t in b.state_dict().items()} for b in model.layers]
    for d in relaxed.structure().shared:
        for proj, adapter in relaxed.adapters(d).items():
            delta, g = _lora_target(orig[d], shared[relaxed.depth_to_layer[d]], proj)
            approx = adapter.delta_weight().detach().double() * (1 if g is None else g[None, :])
            e = delta - approx
            errors[d, proj] = float(torch.trace(e @ moments[d][calibrate.PROJ_INPUT[proj]] @ e.t()))
    return errors


def test_truncated_asvd_has_lower_output_error(original, calib):
    """The activation-aware init is the best rank-r fit of each projection's output on the calibration
    inputs: lower than plain SVD everywhere (and a scaling not undone, or applied to the output side,
    would lose that)."""
    moments = calibrate.input_moments(original, calib, range(original.depth))
    plain = _output_error(original, to_recursive(original, "cycle", 2, "stepwise", 8, 8), moments)
    aware = _output_error(original, to_recursive(original, "cycle", 2, "stepwise", 8, 8, lora_init="asvd",
                                                 calib=calib), moments)
    nonzero = [k for k in plain if plain[k] > 1e-12]
    assert len(nonzero) >= 7 and all(aware[k] <= plain[k] * (1 + 1e-6) + 1e-12 for k in plain)
    assert sum(aware.values()) < 0.7 * sum(plain.values())


def test_truncated_asvd_logits_closer(original, calib):
    ref = original(calib)
    err = {init: (to_recursive(original, "cycle", 2, "stepwise", 8, 8, lora_init=init, calib=calib)(calib) - ref)
           .pow(2).mean() for init in ("svd", "asvd")}
    assert err["asvd"] < err["svd"]


def test_in_weight_diagonal_equals_column_scaled_svd():
    """A diagonal in_weight is ASVD's per-channel scaling: SVD of delta diag(s), then undone."""
    torch.manual_seed(0)
    delta, s = torch.randn(12, 20).double(), torch.rand(20).double() + 0.1
    a = LoRA(20, 12, 3, 0.5)
    a.svd_init_(delta, in_weight=torch.diag(s))
    U, S, Vh = torch.linalg.svd(delta * s[None, :], full_matrices=False)
    expected = (U[:, :3] * S[:3]) @ Vh[:3] / s[None, :]
    torch.testing.assert_close(a.delta_weight().double(), expected, atol=1e-5, rtol=1e-5)


def test_calibration_from_a_prepared_corpus(original, tmp_path):
    v = original.cfg.vocab_size
    write_tokens(tmp_path / "c", "train", [list(range(i, i + 50)) for i in range(0, 200, 50)], v)
    ids = calibrate.calib_ids(tmp_path / "c", original, n_tokens=150, seq_len=64)
    assert ids.shape == (2, 64) and ids[0, 0] == 0
    r = to_recursive(original, "cycle", 2, "stepwise", 4, 4, lora_init="asvd", calib=str(tmp_path / "c"))
    assert r.lora is not None


def test_asvd_errors(original, tmp_path):
    with pytest.raises(RecursaError, match="lora_init"):
        to_recursive(original, "cycle", 2, lora_init="pca")
    with pytest.raises(RecursaError, match="needs calibration"):
        to_recursive(original, "cycle", 2, lora_rank_attn=4, lora_init="asvd")
    with pytest.raises(RecursaError, match=r"in \[0, "):
        to_recursive(original, "cycle", 2, lora_rank_attn=4, lora_init="asvd", calib=torch.tensor([1, 10**6]))
    with pytest.raises(RecursaError, match="id tensor"):
        to_recursive(original, "cycle", 2, lora_rank_attn=4, lora_init="asvd", calib=torch.rand(8))
    with pytest.raises(RecursaError, match="empty"):
        calibrate.calib_ids(torch.zeros(0, dtype=torch.long), original)
    with pytest.raises(RecursaError, match="no prepared"):
        calibrate.calib_ids(tmp_path / "missing", original)
    write_tokens(tmp_path / "big", "train", [[1, 2, 3]], original.cfg.vocab_size * 2)
    with pytest.raises(RecursaError, match="vocab"):
        calibrate.calib_ids(tmp_path / "big", original)


def test_cli_lora_init(original, tmp_path, capsys):
    original.save(tmp_path / "orig")
    write_tokens(tmp_path / "c", "train", [list(range(100))], original.cfg.vocab_size)
    out = tmp_path / "rec"
    code = main(["convert", "--recursive", str(tmp_path / "orig"), "--out", str(out), "--loops", "2",
                 "--lora-rank", "4", "--lora-init", "asvd", "--calib", str(tmp_path / "c"), "--calib-tokens", "64"])
    assert code == 0 and "asvd" in capsys.readouterr().out
    assert load(out).cfg.lora_rank_attn == 4
    code = main(["convert", "--recursive", str(tmp_path / "orig"), "--out", str(tmp_path / "bad"), "--loops", "2",
                 "--lora-rank", "4", "--lora-init", "asvd", "--calib", str(tmp_path / "nowhere")])
    err = capsys.readouterr().err
    assert code != 0 and "no prepared" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "bad").exists()
