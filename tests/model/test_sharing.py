"""Depth-wise weight sharing: the depth -> layer maps, truly tied weights, and the stage API."""
import pytest
import torch

from recursa.config import ConfigError, ModelConfig

from recursa.presets import preset
from recursa.model import Decoder, load


def tiny(**kw) -> ModelConfig:
    return preset("tiny", **{"n_layers": 6, **kw})


# Hand-written expectations (independent of recursa.model.sharing): depth -> unique layer, loop.
EXPECTED = {
    ("cycle", 3): ([0, 1, 0, 1, 0, 1], [0, 0, 1, 1, 2, 2]),
    ("cycle", 2): ([0, 1, 2, 0, 1, 2], [0, 0, 0, 1, 1, 1]),
    ("sequence", 2): ([0, 0, 1, 1, 2, 2], [0, 1, 0, 1, 0, 1]),
    ("middle_cycle", 2): ([0, 1, 2, 1, 2, 3], [None, 0, 0, 1, 1, None]),
    ("middle_sequence", 2): ([0, 1, 1, 2, 2, 3], [None, 0, 1, 0, 1, None]),
    ("middle_cycle", 4): ([0, 1, 1, 1, 1, 2], [None, 0, 1, 2, 3, None]),
}


@pytest.mark.parametrize("sharing, n", list(EXPECTED))
def test_depth_to_layer_and_structure(sharing, n):
    layers, loops = EXPECTED[(sharing, n)]
    m = Decoder(tiny(sharing=sharing, n_loops=n))
    s = m.structure()
    assert m.depth_to_layer == layers and list(s.loop_of) == loops
    assert m.depth == 6 and len(m.layers) == max(layers) + 1 == m.cfg.n_unique_layers
    middle = sharing.startswith("middle")
    assert s.prelude == ((0,) if middle else ()) and s.coda == ((5,) if middle else ())
    assert s.n_loops == n and len(s.shared_layers) == m.cfg.n_shared_layers
    assert list(s.shared) == [d for d in range(6) if loops[d] is not None]
    if sharing.endswith("cycle"):
        k = len(s.shared_layers)
        assert s.loop_ends == tuple((1 if middle else 0) + (r + 1) * k - 1 for r in range(n))
    else:
        with pytest.raises(ValueError, match="cycle"):
            s.loop_ends


def test_vanilla_structure():
    s = Decoder(tiny()).structure()
    assert s.prelude == tuple(range(6)) and s.shared == () and s.coda == () and s.depth == 6


@pytest.mark.parametrize("bad, field", [
    ({"sharing": "loop"}, "sharing"),
    ({"sharing": "cycle", "n_loops": 4}, "n_loops"),      # 4 does not divide 6
    ({"sharing": "middle_cycle", "n_loops": 3}, "n_loops"),  # 3 does not divide 6 - 2
    ({"n_loops": 2}, "n_loops"),                          # loops without sharing
    ({"sharing": "cycle", "n_loops": 0}, "n_loops"),
    ({"lora_rank_attn": 4}, "lora_rank"),                 # adapters without sharing
    ({"sharing": "cycle", "n_loops": 2, "lora_rank_mlp": -1}, "lora_rank_mlp"),
    ({"sharing": "cycle", "n_loops": 2, "lora_alpha": 0}, "lora_alpha"),
])
def test_config_rejects_bad_sharing(bad, field):
    with pytest.raises(ConfigError, match=field):
        ModelConfig.from_dict({**tiny().to_dict(), **bad})


@pytest.mark.parametrize("sharing, n", [("cycle", 3), ("middle_sequence", 2)])
def test_one_parameter_object_per_unique_layer(sharing, n, tmp_path):
    torch.manual_seed(0)
    m = Decoder(tiny(sharing=sharing, n_loops=n))
    k = m.cfg.n_unique_layers
    for d, u in enumerate(m.depth_to_layer):
        assert m.stage(d) is m.layers[u]
    # what the optimizer and a checkpoint see: K blocks, not L
    per_block = len(list(m.layers[0].parameters()))
    assert len(list(m.parameters())) == k * per_block + 2  # + embedding + final norm (tied head)
    opt = torch.optim.AdamW(m.parameters())
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == m.num_params() == m.cfg.num_params()
    assert m.num_params() < Decoder(tiny()).num_params()
    assert {int(name.split(".")[1]) for name in m.state_dict() if name.startswith("layers.")} == set(range(k))
    m.save(tmp_path / "m")
    loaded = load(tmp_path / "m")
    assert loaded.depth_to_layer == m.depth_to_layer
    ids = torch.randint(0, m.cfg.vocab_size, (1, 10))
    assert torch.equal(loaded(ids), m.eval()(ids))


def unrolled(shared: Decoder) -> Decoder:
    """Independent reference: a vanilla model holding a separate copy of the block at every depth."""
    plain = Decoder(shared.cfg.replace(sharing="none", n_loops=1))
    state = {k: v for k, v in shared.state_dict().items() if not k.startswith("layers.")}
    for d in range(shared.depth):
        for k, v in shared.stage(d).state_dict().items():
            state[f"layers.{d}.{k}"] = v.clone()
    plain.load_state_dict(state)
    return plain


@pytest.mark.parametrize("sharing, n", [("cycle", 3), ("sequence", 2), ("middle_cycle", 2)])
def test_forward_and_gradients_match_unrolled_copies(sharing, n):
    torch.manual_seed(0)
    m = Decoder(tiny(sharing=sharing, n_loops=n))
    ref = unrolled(m)
    ids = torch.randint(0, m.cfg.vocab_size, (2, 12))
    out, ref_out = m(ids), ref(ids)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=0)
    out.logsumexp(-1).mean().backward()
    ref_out.logsumexp(-1).mean().backward()
    # gradient of a tied weight = sum of the gradients of its copies at every depth using it
    for u, block in enumerate(m.layers):
        depths = [d for d, l in enumerate(m.depth_to_layer) if l == u]
        for name, p in block.named_parameters():
            expected = sum(ref.layers[d].get_parameter(name).grad for d in depths)
            torch.testing.assert_close(p.grad, expected, atol=1e-6, rtol=1e-4)
    assert len(set(m.depth_to_layer)) < m.depth  # some layer really is used more than once


def test_stage_api_cache_on_shared_model():
    torch.manual_seed(0)
    m = Decoder(tiny(sharing="middle_cycle", n_loops=2)).eval()
    ids = torch.randint(0, m.cfg.vocab_size, (1, 9))
    full = m(ids)
    caches, outs, pos = [None] * m.depth, [], 0
    for chunk in (5, 4):
        h = m.embed(ids[:, pos:pos + chunk])
        cos, sin = m.rope(torch.arange(pos, pos + chunk))
        for d in range(m.depth):
            h, kv = m.forward_stage(d, h, cos, sin, past_kv=caches[d])
            caches[d] = kv if caches[d] is None else tuple(torch.cat(p, 2) for p in zip(caches[d], kv))
        outs.append(m.head(h))
        pos += chunk
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-5, rtol=0)
