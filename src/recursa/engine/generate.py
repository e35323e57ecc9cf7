"""Single-request decoding with a preallocated per-depth KV cache.

The simplest correct path through the stage API: prefill the prompt through every depth,
then decode one token at a time, reading keys/values of earlier positions from the cache.
It is the reference the batching engine is checked against, and what `recursa generate` runs
until the engine takes over.

    from recursa.engine.generate import generate
    new_ids = generate(model, tok.encode("Once upon"), 32, temperature=0.8, seed=0)
"""
from __future__ import annotations

from typing import Iterator, Sequence

import torch

from recursa.engine.sampling import sample
from recursa.errors import RecursaError
from recursa.model.decoder import Decoder


@torch.inference_mode()
def stream(
    model: Decoder,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop_ids: Sequence[int] = (),
) -> Iterator[int]:
    """Yield new token ids one by one (a stop id is yielded, then decoding ends)."""
    if len(prompt_ids) == 0:
        raise RecursaError("the prompt is empty")
    if max_new_tokens <= 0:
        return
    cfg = model.cfg
    total = len(prompt_ids) + max_new_tokens
    if total > cfg.max_seq_len:
        raise RecursaError(
            f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
            f"max_seq_len {cfg.max_seq_len}"
        )
    if max(prompt_ids) >= cfg.vocab_size or min(prompt_ids) < 0:
        raise RecursaError(f"prompt holds token ids outside the vocabulary (0..{cfg.vocab_size - 1})")
    device, dtype = model.embed_tokens.weight.device, model.embed_tokens.weight.dtype
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    shape = (1, cfg.n_kv_heads, total, cfg.head_dim)
    cache = [(torch.empty(shape, device=device, dtype=dtype), torch.empty(shape, device=device, dtype=dtype))
             for _ in range(model.depth)]
    stop = set(stop_ids)

    ids = torch.tensor([list(prompt_ids)], device=device)
    pos = 0
    for _ in range(max_new_tokens):
        T = ids.shape[1]
        positions = torch.arange(pos, pos + T, device=device)
        h = model.embed(ids)
        cos, sin = model.rope(positions, dtype)
        for d in range(model.depth):
            k_cache, v_cache = cache[d]
            past = (k_cache[:, :, :pos], v_cache[:, :, :pos]) if pos else None
            h, (k, v) = model.forward_stage(d, h, cos, sin, past_kv=past)
            k_cache[:, :, pos:pos + T] = k
            v_cache[:, :, pos:pos + T] = v
        logits = model.head(h[:, -1])
        token = int(sample(logits, temperature, top_k, top_p, generator)[0])
        yield token
        if token in stop:
            return
        pos += T
        ids = torch.tensor([[token]], device=device)


def generate(model: Decoder, prompt_ids: Sequence[int], max_new_tokens: int, **kwargs) -> list[int]:
    """The new token ids (see `stream` for the keyword arguments)."""
    return list(stream(model, prompt_ids, max_new_tokens, **kwargs))
