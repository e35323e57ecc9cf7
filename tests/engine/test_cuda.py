"""The engine on CUDA (SDPA's fused kernels with boolean masks, device-side caches) against the
plain full-sequence forward on the CPU. Runs only where a GPU exists; nothing else needs one."""
import pytest
import torch

import recursa
from recursa import SamplingParams
from recursa.presets import preset
from recursa.model import Decoder

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

PROMPTS = [[5, 17, 99, 3, 250], list(range(1, 30)), [7] * 9]


@pytest.mark.parametrize("shape", [dict(), dict(n_layers=8, sharing="middle_cycle", n_loops=3, mor_router="expert")],
                         ids=["vanilla", "mor"])
def test_cuda_engine_equals_cpu_full_forward(shape):
    torch.manual_seed(0)
    model = Decoder(preset("tiny", init_std=0.2, **shape)).eval()
    expected = []
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = list(prompt)
            for _ in range(8):
                ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
            expected.append(ids[len(prompt):])
    llm = recursa.LLM(model.to("cuda"), max_num_batched_tokens=16, kv_cache_memory=2**22)
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    assert [o.token_ids for o in outs] == expected
