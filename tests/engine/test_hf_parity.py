"""On a tiny random HuggingFace Llama built here, engine greedy output equals transformers'
`generate`, with several prompts of different lengths batched together under both policies."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from recursa import LLM, SamplingParams, from_hf  # noqa: E402

VOCAB = 256


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, initializer_range=0.1,
        tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 5000.0},
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    torch.manual_seed(11)
    model = transformers.LlamaForCausalLM(cfg).float().eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.3 * torch.randn_like(p))   # norm gains away from 1
    path = tmp_path_factory.mktemp("hf")
    model.save_pretrained(path)
    return model, path


@pytest.mark.parametrize("policy", ["depthwise", "synchronous"])
def test_engine_greedy_equals_transformers_generate(hf, policy):
    model, path = hf
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (3, 19, 8, 30)]
    expected = []
    for p in prompts:
        ids = torch.tensor([p])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=24,
                             min_new_tokens=24, eos_token_id=None, pad_token_id=0)
        expected.append(out[0, len(p):].tolist())
    llm = LLM(from_hf(path), policy=policy, max_num_batched_tokens=16)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
    assert [o.token_ids for o in outs] == expected
    assert all(len(set(e)) > 1 for e in expected)
