"""Turning logits into tokens: greedy, temperature, top-k and top-p (nucleus) sampling, in one batch.

Every row of logits [N, V] carries its own settings; all rows are filtered and drawn together on
the logits' device, with one host transfer for the whole batch. A draw is Gumbel-max: token =
argmax(logits / T + g) with g = -log(-log(u)), u ~ U(0, 1) — an exact sample of softmax(logits / T)
restricted to the kept tokens. A seeded request draws its u from its own CPU generator, so it gets
the same tokens whatever it is batched with, and on CPU and CUDA alike.

    tokens = sample_rows(logits, [p.temperature ...], [p.top_k ...], [p.top_p ...], generators)
    token = sample(logits[None], temperature=0.8, top_p=0.9, generator=g)[0]     # one setting for all rows
"""
from __future__ import annotations

import torch

from recursa import kernels


def _keep_top(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask to -inf what top-k (k [N], 0 = off) and then top-p (p [N], 1 = off) cut from logits [N, V]."""
    V = logits.shape[-1]
    use_k = (top_k > 0) & (top_k < V)
    if bool(use_k.any()):
        kmax = int(top_k[use_k].max())
        kth = logits.topk(kmax, dim=-1).values.gather(1, (top_k.clamp(1, kmax) - 1)[:, None])
        logits = logits.masked_fill(use_k[:, None] & (logits < kth), float("-inf"))   # ties at the k-th stay
    use_p = (top_p > 0) & (top_p < 1)
    if bool(use_p.any()):
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the mass before it already reaches top_p (the top token always stays)
        drop = ((probs.cumsum(dim=-1) - probs) >= top_p[:, None]) & use_p[:, None]
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return logits


def sample_rows(logits: torch.Tensor, temperatures, top_ks, top_ps, generators) -> list[int | None]:
    """One token per row of logits [N, V]; per row: temperature (0 = greedy), top_k (0 or -1 = off),
    top_p (1 = off) and a torch.Generator or None.

    A row whose logits hold NaN/inf cannot be sampled: it gets None (the row maximum tells, at no
    extra pass; max() propagates NaN) and the engine finishes that request alone with "error"."""
    best, greedy = kernels.row_max(logits) or logits.max(dim=-1)
    finite = torch.isfinite(best)
    if all(t <= 0 for t in temperatures):
        return [t if ok else None for t, ok in zip(greedy.tolist(), finite.tolist())]
    device, (N, V) = logits.device, logits.shape
    temp = torch.tensor([t if t > 0 else 1.0 for t in temperatures], device=device)
    scaled = _keep_top(logits.float() / temp[:, None], torch.tensor([max(k, 0) for k in top_ks], device=device),
                       torch.tensor(top_ps, dtype=torch.float32, device=device).clamp(min=1e-6))   # a top_p below
    # float32's range would round to 0 (off); 1e-6 keeps what any tiny nucleus keeps: the top token
    u = torch.empty(N, V, device=device)
    for i, (t, g) in enumerate(zip(temperatures, generators)):
        if t > 0:
            u[i] = torch.rand(V, generator=g).to(device) if g is not None else torch.rand(V, device=device)
    gumbel = -torch.log(-torch.log(u.clamp_(min=1e-20, max=1 - 1e-7)))
    drawn = (scaled + gumbel).argmax(dim=-1)
    tokens = torch.where(temp.new_tensor([t > 0 for t in temperatures], dtype=torch.bool), drawn, greedy)
    return [t if ok else None for t, ok in zip(tokens.tolist(), finite.tolist())]


def stack_rows(rows: list[torch.Tensor]) -> torch.Tensor:
    """rows of logits [V] as one [N, V] tensor: their common base when they are its rows 0..N-1 in
    order (one head call for the batch, the usual case: no copy), else a stacked copy."""
    base = rows[0]._base
    if base is not None and base.dim() == 2 and base.shape[0] == len(rows) and rows[0].shape == base.shape[1:]:
        start, step = base.data_ptr(), base.stride(0) * base.element_size()
        if all(r._base is base and r.data_ptr() == start + i * step and r.stride() == base.stride()[1:]
               for i, r in enumerate(rows)):
            return base
    return torch.stack(rows)


def sample_rows_isolated(logits: torch.Tensor, temperatures, top_ks, top_ps, generators) -> list[int | None]:
    """sample_rows, and if the batch fails (settings changed after validation, say), each row on
    its own: a row that still fails gets None, and the others their tokens."""
    try:
        return sample_rows(logits, temperatures, top_ks, top_ps, generators)
    except (RuntimeError, TypeError, ValueError):
        out = []
        for i, row in enumerate(zip(temperatures, top_ks, top_ps, generators)):
            try:
                out += sample_rows(logits[i:i + 1], *([x] for x in row))
            except (RuntimeError, TypeError, ValueError):
                out.append(None)
        return out


def sample(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [N, V] -> token ids [N], every row with the same settings (and one generator, drawn row by row)."""
    n = logits.shape[0]
    return torch.tensor(sample_rows(logits, [temperature] * n, [top_k or 0] * n, [1.0 if top_p is None else top_p] * n,
                                    [generator] * n))
