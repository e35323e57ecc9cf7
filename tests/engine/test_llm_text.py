"""Text in, text out: LLM from a model directory with a tokenizer, stop strings, the CLI.

The tokenizer is a small byte-level BPE trained here; the model is random, so the text is
noise — what matters is that text and token ids stay consistent with each other.
"""
import pytest

from recursa import LLM, SamplingParams
from recursa.cli import main
from reference import full_forward_generate
from tiny_models import save_tiny_text_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_text_model(tmp_path_factory.mktemp("m"))


@pytest.fixture(scope="module")
def llm(model_dir):
    return LLM(model_dir, kv_cache_memory=2**22)


def test_text_prompt_and_text_output(llm):
    tok, model = llm.tokenizer, llm.model
    out = llm.generate("once upon a time", SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0]
    ids = tok.encode("once upon a time")
    assert out.prompt == "once upon a time" and out.prompt_token_ids == ids
    assert out.token_ids == full_forward_generate(model, ids, 12)
    assert out.text == tok.decode(out.token_ids)


def test_stop_string_cuts_text(llm):
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    full = llm.generate("the cat", params)[0]
    # a stop string taken from the middle of the generated text: two printable ASCII characters
    text = full.text
    cut = next(i for i in range(len(text) // 3, len(text) - 1)
               if all(c.isascii() and c.isprintable() for c in text[i:i + 2]))
    stop = text[cut:cut + 2]
    first = text.find(stop)
    out = llm.generate("the cat", SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop=[stop]))[0]
    assert out.finish_reason == "stop"
    assert out.text == text[:first]
    assert out.token_ids == full.token_ids[:len(out.token_ids)] and len(out.token_ids) < len(full.token_ids)
    assert stop in llm.tokenizer.decode(out.token_ids)


def test_streamed_text_adds_up_without_stop_string(llm):
    full = llm.generate("the cat", SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))[0].text
    stop = full[len(full) // 2:len(full) // 2 + 3]
    llm.add_request("s", "the cat", SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop=[stop]))
    streamed, final = "", None
    while llm.has_unfinished():
        for out in llm.step():
            streamed += out.delta_text
            final = out
    assert streamed == final.text == full[:full.find(stop)]


def test_cli_generate_runs_prompts_concurrently(model_dir, capsys):
    assert main(["generate", str(model_dir), "--prompt", "the cat", "--prompt", "once", "--max-tokens", "5"]) == 0
    out = capsys.readouterr()
    assert "the cat" in out.out and "once" in out.out
    assert "2 requests" in out.err


def test_cli_generate_bad_model_dir_is_one_line(tmp_path, capsys):
    assert main(["generate", str(tmp_path / "missing"), "--prompt", "x"]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.slow
def test_smollm2_engine_equals_single_request_decoder():
    """The real SmolLM2-135M (fetched by `recursa models fetch smollm2-135m`): several prompts
    batched with chunked prefill give the single-request decoder's greedy tokens."""
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "models" / "smollm2-135m"
    if not (path / "model.safetensors").is_file():
        pytest.skip("models/smollm2-135m is not fetched")
    llm = LLM(path, max_num_batched_tokens=16, kv_cache_memory=2**27)
    prompts = ["The capital of France is", "Once upon a time, in a small village,", "def fibonacci(n):"]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == full_forward_generate(llm.model, llm.tokenizer.encode(prompt), 16)
    assert "Paris" in outs[0].text
