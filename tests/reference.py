"""The independent reference every decoding path is checked against: the plain full-sequence forward.

`full_forward_generate` re-runs `model(ids)` over the whole sequence for every new token (no KV
cache, no stages, no engine), so a cached, batched or paged path that agrees with it is exact.
Sampling draws with a generator seeded like the engine's per-request one, through the same
`recursa.engine.sampling.sample`.
"""
import torch

from recursa.engine.sampling import sample


@torch.inference_mode()
def full_forward_generate(model, prompt_ids, max_new_tokens, *, temperature=0.0, top_k=None, top_p=None,
                          seed=None, stop_ids=()):
    """New token ids of decoding `prompt_ids` by repeated full forwards (a stop id ends it, included)."""
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    ids, out = list(prompt_ids), []
    for _ in range(max_new_tokens):
        logits = model(torch.tensor([ids]))[0, -1:].float()
        token = int(sample(logits, temperature, top_k, top_p, generator)[0])
        out.append(token)
        ids.append(token)
        if token in stop_ids:
            break
    return out
