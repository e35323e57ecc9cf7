"""HuggingFace Llama <-> recursa: a tiny random LlamaForCausalLM built here is the reference.

Logits and 32 greedy tokens must match transformers for imported models, and transformers must
load exported ones to the same logits; bad inputs fail with one RecursaError and leave nothing.
"""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

import recursa  # noqa: E402
from recursa.cli import main  # noqa: E402
from recursa.config import ModelConfig  # noqa: E402
from recursa.convert.hf import config_from_hf, from_hf, to_hf  # noqa: E402
from reference import full_forward_generate  # noqa: E402
from recursa.model import Decoder, load  # noqa: E402

VOCAB = 256


def _randomize_norms(module: torch.nn.Module) -> None:
    """Norm gains start at 1; random ones catch a swapped attention/MLP norm."""
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.3 * torch.randn_like(p))


def _hf_model(tie: bool) -> "transformers.LlamaForCausalLM":
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, initializer_range=0.1,
        tie_word_embeddings=tie, rope_parameters={"rope_type": "default", "rope_theta": 5000.0},
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    torch.manual_seed(1 if tie else 2)
    model = transformers.LlamaForCausalLM(cfg).float().eval()
    _randomize_norms(model)
    return model


@pytest.fixture(params=[True, False], ids=["tied", "untied"])
def hf_dir(request, tmp_path):
    model = _hf_model(request.param)
    model.save_pretrained(tmp_path / "hf")
    return tmp_path / "hf", model


def _ids(n: int = 20, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, n), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_logits_match_hf(hf_dir):
    path, hf = hf_dir
    model = recursa.from_hf(path)
    assert model.cfg.tie_embeddings == hf.config.tie_word_embeddings
    assert (model.cfg.dim, model.cfg.n_layers, model.cfg.n_kv_heads, model.cfg.rope_theta) == (64, 3, 2, 5000.0)
    ids = _ids()
    diff = (model(ids) - hf(ids).logits).abs().max().item()
    assert diff <= 1e-4


def test_greedy_tokens_match_hf(hf_dir):
    path, hf = hf_dir
    model = from_hf(path)
    prompt = _ids(7, seed=3)[0].tolist()
    ids = torch.tensor([prompt])
    expected = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=32,
                           min_new_tokens=32, eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    assert len(expected) == 32 and len(set(expected)) > 1
    assert full_forward_generate(model, prompt, 32) == expected


@torch.no_grad()
def test_sharded_and_bin_checkpoints(tmp_path):
    hf = _hf_model(tie=False)
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "config.json").write_text((tmp_path / "sharded" / "config.json").read_text())
    torch.save(hf.state_dict(), bin_dir / "pytorch_model.bin")
    ids = _ids()
    for path in (tmp_path / "sharded", bin_dir):
        assert (from_hf(path)(ids) - hf(ids).logits).abs().max().item() <= 1e-4


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@torch.no_grad()
def test_to_hf_round_trip(tmp_path, tie):
    torch.manual_seed(4)
    cfg = ModelConfig(vocab_size=VOCAB, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=64,
                      rope_theta=500.0, tie_embeddings=tie, init_std=0.1, bos_token_id=1, eos_token_id=2)
    model = Decoder(cfg).eval()
    _randomize_norms(model)
    to_hf(model, tmp_path / "out")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert hf.config.tie_word_embeddings == tie
    ids = _ids(16)
    assert (model(ids) - hf(ids).logits).abs().max().item() <= 1e-4
    back = from_hf(tmp_path / "out")
    assert back.cfg == cfg
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in model.state_dict().items())


def _write_tokenizer(directory):
    """A word-level tokenizer.json (no transformers involved) that AutoTokenizer must reproduce."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate("the cat sat on a mat".split())}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    directory.mkdir()
    tok.save(str(directory / "tokenizer.json"))
    return tok


def test_to_hf_writes_tokenizer(tmp_path):
    tok = _write_tokenizer(tmp_path / "tok")
    model = Decoder(ModelConfig(vocab_size=VOCAB, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=64))
    to_hf(model, tmp_path / "out", tokenizer_dir=tmp_path / "tok")
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    text = "the cat sat on a dog"
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == tok.encode(text).ids == [3, 4, 5, 6, 7, 0]


def test_cli_round_trip(hf_dir, tmp_path, capsys):
    path, hf = hf_dir
    _write_tokenizer(tmp_path / "tok")
    (path / "tokenizer.json").write_bytes((tmp_path / "tok" / "tokenizer.json").read_bytes())
    assert main(["convert", "--from-hf", str(path), "--out", str(tmp_path / "rec")]) == 0
    assert sorted(p.name for p in (tmp_path / "rec").iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert main(["convert", "--to-hf", str(tmp_path / "rec"), "--out", str(tmp_path / "hf2"), "--dtype", "bf16"]) == 0
    assert json.loads((tmp_path / "hf2" / "config.json").read_text())["dtype"] == "bfloat16"
    ids = _ids()
    with torch.no_grad():
        assert (load(tmp_path / "rec")(ids) - hf(ids).logits).abs().max().item() <= 1e-4
    # an existing --out is kept unless --force
    capsys.readouterr()
    assert main(["convert", "--from-hf", str(path), "--out", str(tmp_path / "rec")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["convert", "--from-hf", str(path), "--out", str(tmp_path / "rec"), "--force"]) == 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging dirs left


def test_cli_missing_dir_exits_2_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "x"
    assert main(["convert", "--from-hf", str(tmp_path / "nonexistent"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not exist" in err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_missing_inputs(tmp_path):
    with pytest.raises(recursa.RecursaError, match="does not exist"):
        from_hf(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(recursa.RecursaError, match="config.json"):
        from_hf(tmp_path / "empty")
    _hf_model(tie=True).config.save_pretrained(tmp_path / "noweights")
    with pytest.raises(recursa.RecursaError, match="model.safetensors"):
        from_hf(tmp_path / "noweights")


def test_recursa_dir_is_not_an_hf_dir(tmp_path):
    Decoder(ModelConfig(vocab_size=VOCAB, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=64)).save(tmp_path)
    with pytest.raises(recursa.RecursaError, match="recursa model"):
        from_hf(tmp_path)


@pytest.mark.parametrize(
    "change, field",
    [
        ({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, "LlamaForCausalLM"),
        ({"architectures": ["MistralForCausalLM"]}, "LlamaForCausalLM"),
        ({"attention_bias": True}, "attention_bias"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"head_dim": 32}, "head_dim"),
        ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}, "rope_type"),
        ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_type"),
        ({"quantization_config": {"quant_method": "gptq"}}, "quantization_config"),
        ({"vocab_size": None}, "vocab_size"),
        ({"num_key_value_heads": 3}, "n_kv_heads"),
        ({"eos_token_id": 999}, "eos_token_id"),
    ],
)
def test_config_rejects_what_recursa_cannot_reproduce(change, field):
    hf = _hf_model(tie=True).config.to_dict()
    hf.update(architectures=["LlamaForCausalLM"])
    config_from_hf(hf)  # the unchanged config is fine
    hf = {k: v for k, v in {**hf, **change}.items() if v is not None}
    with pytest.raises(recursa.RecursaError, match=field):
        config_from_hf(hf)


def test_config_from_hf_legacy_fields():
    cfg = config_from_hf({"model_type": "llama", "vocab_size": 100, "hidden_size": 32, "intermediate_size": 64,
                          "num_hidden_layers": 2, "num_attention_heads": 4, "rope_theta": 123.0,
                          "rope_scaling": None, "eos_token_id": [7, 8]})
    assert (cfg.rope_theta, cfg.n_kv_heads, cfg.tie_embeddings, cfg.eos_token_id, cfg.norm_eps) == (123.0, 4, False, 7, 1e-6)
