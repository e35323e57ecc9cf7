"""Weight-shared (recursive) models through the engine: tokens at depths that run the same unique
layer batch together, each depth keeping its own KV; outputs equal the full forward's argmax."""
import pytest
import torch

from recursa import LLM, SamplingParams
from recursa.config import ModelConfig
from recursa.presets import preset
from recursa.model import Decoder

if "sharing" not in ModelConfig.__dataclass_fields__:
    pytest.skip("this tree has no recursive sharing yet", allow_module_level=True)

PROMPTS = [[5, 17, 99, 3, 250], list(range(1, 30)), [7] * 9]
ARRIVAL = [0, 4, 9]


def _model(**sharing) -> Decoder:
    torch.manual_seed(4)
    model = Decoder(preset("tiny", n_layers=6, **sharing)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("lora."):
                p.normal_(std=0.05)   # adapters start at B = 0: make them matter
    return model


def _reference(model, prompt, n):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("sharing", [
    dict(sharing="cycle", n_loops=3),
    dict(sharing="middle_sequence", n_loops=2),
    dict(sharing="cycle", n_loops=2, lora_rank_attn=4, lora_rank_mlp=4),
], ids=["cycle", "middle_sequence", "relaxed"])
def test_recursive_greedy_equals_full_forward(sharing):
    model = _model(**sharing)
    expected = [_reference(model, p, 12) for p in PROMPTS]
    for policy in ("depthwise", "synchronous"):
        llm = LLM(model, policy=policy, max_num_batched_tokens=16, kv_cache_memory=2**20)
        mixed = 0
        real = llm.runner.run_span

        def run_span(seqs):
            nonlocal mixed
            mixed = max(mixed, len({s.depth for s in seqs}))
            real(seqs)

        llm.runner.run_span = run_span
        done, step, added = {}, 0, 0
        while added < len(PROMPTS) or llm.has_unfinished():
            while added < len(PROMPTS) and ARRIVAL[added] <= step:
                llm.add_request(str(added), PROMPTS[added], SamplingParams(temperature=0, max_tokens=12))
                added += 1
            done.update({o.request_id: o.token_ids for o in llm.step() if o.finished})
            step += 1
        assert [done[str(i)] for i in range(len(PROMPTS))] == expected, policy
        if policy == "depthwise" and sharing == dict(sharing="cycle", n_loops=3):
            assert mixed > 1   # one stage run served tokens at different depths of a shared layer
