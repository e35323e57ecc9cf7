"""Relaxed recursion: LoRA adapters per shared depth, SVD init with scaling, merged == unmerged."""
import pytest
import torch

from recursa.presets import preset
from recursa.model import Decoder, load
from recursa.convert.recursive import merge
from recursa.model.lora import LoRA


def relaxed(**kw) -> Decoder:
    torch.manual_seed(0)
    cfg = preset("tiny", **{"n_layers": 6, "sharing": "cycle", "n_loops": 3, "lora_rank_attn": 4,
                            "lora_rank_mlp": 2, **kw})
    return Decoder(cfg)


def randomize_adapters(m: Decoder) -> None:
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.startswith("lora."):
                p.normal_(std=0.05)


@pytest.mark.parametrize("alpha", [None, 16.0])
def test_svd_init_full_rank_and_scaling(alpha):
    torch.manual_seed(0)
    delta = torch.randn(12, 20)
    rank = 12
    a = LoRA(20, 12, rank, 1.0 if alpha is None else alpha / rank)
    a.svd_init_(delta)
    torch.testing.assert_close(a.delta_weight(), delta, atol=1e-5, rtol=0)
    x = torch.randn(3, 20)
    torch.testing.assert_close(a(x), x @ delta.t(), atol=1e-5, rtol=0)


def test_svd_init_truncated_is_best_low_rank():
    torch.manual_seed(0)
    delta = torch.randn(16, 10)
    a = LoRA(10, 16, 3, 2.5)
    a.svd_init_(delta)
    # Eckart-Young: the residual's Frobenius norm is the norm of the dropped singular values
    s = torch.linalg.svdvals(delta)
    err = torch.linalg.matrix_norm(delta - a.delta_weight())
    torch.testing.assert_close(err, s[3:].norm(), atol=1e-4, rtol=0)
    assert torch.linalg.matrix_rank(a.delta_weight()) == 3


def test_fresh_adapters_leave_the_shared_model_unchanged():
    m = relaxed()
    strict = Decoder(m.cfg.replace(lora_rank_attn=0, lora_rank_mlp=0))
    strict.load_state_dict({k: v for k, v in m.state_dict().items() if not k.startswith("lora.")})
    ids = torch.randint(0, m.cfg.vocab_size, (2, 8))
    torch.testing.assert_close(m(ids), strict(ids), atol=0, rtol=0)


def test_adapters_per_shared_depth_and_param_count():
    m = relaxed(sharing="middle_cycle", n_loops=2)
    assert sorted(int(d) for d in m.lora) == list(m.structure().shared) == [1, 2, 3, 4]
    assert m.adapters(0) is None and m.adapters(5) is None
    assert set(m.adapters(1)) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert m.adapters(1)["q_proj"].A.shape == (4, 128) and m.adapters(1)["down_proj"].A.shape == (2, 320)
    assert m.num_params() == m.cfg.num_params()
    attn_only = relaxed(lora_rank_mlp=0)
    assert set(attn_only.adapters(0)) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    clipped = relaxed(lora_rank_attn=10_000, lora_rank_mlp=10_000)  # clipped to full rank
    assert clipped.adapters(0)["k_proj"].A.shape[0] == 64 and clipped.adapters(0)["up_proj"].A.shape[0] == 128
    assert clipped.num_params() == clipped.cfg.num_params()


@pytest.mark.parametrize("sharing, n", [("cycle", 3), ("middle_sequence", 2)])
def test_merged_equals_unmerged(sharing, n):
    m = relaxed(sharing=sharing, n_loops=n, lora_alpha=8.0).eval()
    randomize_adapters(m)
    ids = torch.randint(0, m.cfg.vocab_size, (2, 10))
    merged = merge(m)
    assert merged.cfg.sharing == "none" and len(merged.layers) == m.depth and merged.lora is None
    torch.testing.assert_close(merged(ids), m(ids), atol=1e-5, rtol=0)
    # and the adapters really matter
    assert (m(ids) - relaxed(sharing=sharing, n_loops=n, lora_alpha=8.0).eval()(ids)).abs().max() > 1e-3


def test_adapter_gradients_are_per_depth_shared_weights_accumulate():
    m = relaxed()
    randomize_adapters(m)
    ids = torch.randint(0, m.cfg.vocab_size, (2, 8))
    m(ids).logsumexp(-1).mean().backward()
    grads = [m.adapters(d)["q_proj"].B.grad for d in range(m.depth)]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    assert not torch.equal(grads[0], grads[2])  # depths 0 and 2 share layer 0 but not adapters
    assert m.layers[0].attn.q_proj.weight.grad.abs().sum() > 0


def test_relaxed_save_load_roundtrip(tmp_path):
    m = relaxed(lora_alpha=4.0).eval()
    randomize_adapters(m)
    m.save(tmp_path / "r")
    loaded = load(tmp_path / "r")
    ids = torch.randint(0, m.cfg.vocab_size, (1, 8))
    assert torch.equal(loaded(ids), m(ids))
    assert loaded.cfg.lora_alpha == 4.0
