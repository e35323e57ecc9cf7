"""Turning logits into tokens: greedy, temperature, top-k and top-p (nucleus) sampling.

Works on a batch of rows [N, V] so the batching engine and the single-request decoder share it.
"""
from __future__ import annotations

import torch


def sample(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """logits [N, V] -> token ids [N]. temperature 0 means greedy (argmax)."""
    if temperature <= 0.0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0.0 < top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # drop a token when the mass before it already reaches top_p (the top token always stays)
        drop = (cum - sorted_logits.softmax(dim=-1)) >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def sample_rows(logits: torch.Tensor, params: list, generators: list) -> list[int | None]:
    """One token per row, each row with its own settings (objects with temperature/top_k/top_p).

    Greedy rows share one argmax. A sampling row draws with its own generator, so a seeded
    request gets the same tokens whatever it is batched with (and the same as `generate`).

    A row that cannot be sampled gets None instead of a token, and the other rows are unaffected:
    its logits hold NaN/inf (max() propagates NaN, so the row maximum tells, at no extra pass), or
    its sampler raised. The engine finishes that request alone with finish_reason "error".
    """
    best, idx = logits.max(dim=-1)
    finite, tokens = torch.isfinite(best).tolist(), idx.tolist()
    for i, (p, g) in enumerate(zip(params, generators)):
        if not finite[i]:
            tokens[i] = None
        elif p.temperature > 0:
            top_k = p.top_k if p.top_k > 0 else None
            row = logits[i:i + 1] if g is None else logits[i:i + 1].to(g.device)
            try:
                tokens[i] = int(sample(row, p.temperature, top_k, p.top_p, g)[0])
            except (RuntimeError, TypeError, ValueError):  # e.g. settings changed after validation
                tokens[i] = None
    return tokens
