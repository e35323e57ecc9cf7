"""Mixture-of-Recursions: the full-sequence forward, and the contract the engine relies on.

A MoR model (`cfg.mor_router` "expert" or "token") is a cycle / middle_cycle recursive model
whose K shared layers run up to Nr = n_loops times; a router decides per token how many.

Semantics (what `forward_mor` computes and the engine must reproduce):
- Prelude depths run on every token; h_entry = the hidden state entering the shared block.
- Recursion step r (r = 0..Nr-1) = one pass of the K shared layers (depths
  structure.shared[r*K:(r+1)*K], each with its own LoRA if relaxed). A token that runs it goes
  h_start -> h_end through the K layers and leaves with `mor_update(h_start, h_end, gate) =
  h_start + gate * (h_end - h_start)`: the gate scales the residual branch only.
  A token that does not run step r keeps h and runs no later step.
- **Step 0 runs for every token** (expert capacity 1.0 at step 0; token depths are 1..Nr).
- Then every token runs the coda depths and the head.
- Who runs step r >= 1:
  * mode="causal" (inference; `model(ids)` and the engine): a token alive at step r continues iff
    `model.mor_route(r, h, h_entry)` says go. Expert choice: sigmoid(router_r(h)) > mor_threshold
    (or the auxiliary router's score); token choice: depth (argmax of the router on h_entry) > r.
    Each decision reads only that token's own state: causal by construction.
  * mode="topk" (expert-choice training): per batch row, the ceil(capacity_r * T) tokens with the
    highest router_r score among step r-1's survivors; they keep causal order. Not causal (a
    token's selection depends on later tokens' scores), which is why BCE trains the threshold rule.
  * token choice ignores the mode.
- Gates: expert alpha * act(router_r(h)); token alpha * p[depth - 1], the same at every step.
- Attention at step r:
  * mor_kv="recursion": a token attends over the tokens that ran step r at positions <= its own
    (their K/V from step r). RoPE uses original positions.
  * mor_kv="share": at r >= 1 layer k computes no K/V of its own; its queries attend the K/V that
    the same unique layer computed at step 0, over every position <= its own (all tokens ran
    step 0). `model.kv_source(depth)` names that step-0 depth; `forward_stage` skips k/v_proj
    there and calls `attend(q, None, None)`.

Implementation: for each step the selected tokens of every row are gathered (selected first, in
causal order, rows padded to the longest), run through the K layers with a causal + validity mask
(or plain causal attention when every row has the same count, as in top-k training), and
scattered back: FLOPs scale with the tokens that run, and there is no per-token Python loop.

    logits, info = model.forward_mor(ids, mode="topk")
    info["selected"][r]   # bool [B, T]: who ran step r   (info["alive"][r]: who could)
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

MODES = ("causal", "topk")


def step_depths(model, step: int) -> tuple[int, ...]:
    """The K depths of recursion step `step`."""
    s = model.structure()
    k = len(s.shared_layers)
    return s.shared[step * k:(step + 1) * k]


def capacity_tokens(capacity: float, T: int) -> int:
    """Tokens per row that run a step of capacity `capacity` in a sequence of T (at least 1)."""
    return max(1, min(T, math.ceil(capacity * T - 1e-9)))


def topk_select(score: torch.Tensor, alive: torch.Tensor, k: int) -> torch.Tensor:
    """Bool [B, T]: the k highest-scoring alive tokens of each row (alive must hold >= k per row)."""
    masked = score.detach().masked_fill(~alive, float("-inf"))
    idx = masked.topk(k, dim=1).indices
    return torch.zeros_like(alive).scatter(1, idx, True)


def _share_attend(model, kv, q_pos, k_pos):
    """attend(q, None, None) over step-0 K/V `kv` at keys k_pos [B, S] for queries at q_pos [B, m]."""
    mask = (k_pos[:, None, :] <= q_pos[:, :, None])[:, None]   # [B, 1, m, S]
    gqa = model.cfg.n_kv_heads != model.cfg.n_heads

    def attend(q, k, v):
        return F.scaled_dot_product_attention(q, kv[0], kv[1], attn_mask=mask, enable_gqa=gqa)

    return attend


def run_step(model, step: int, h, sel, pos, gate, kv0: list | None):
    """Apply recursion step `step` to the tokens `sel` [B, T] of h [B, T, D]; returns the new h.

    pos [B, T]: original positions; gate [B, T, 1]; kv0: per shared layer, step-0 (k, v) over all
    T tokens (filled at step 0, read at later steps) when KV is shared, else None."""
    B, T, D = h.shape
    depths = step_depths(model, step)
    share = kv0 is not None and step > 0
    if step == 0:  # every token runs step 0: no gather
        idx, hs, p, g, valid, mask = None, h, pos, gate, None, None
    else:
        n = sel.sum(1)
        m = int(n.max())
        if m == 0:
            return h
        order = torch.argsort((~sel).to(torch.int8), dim=1, stable=True)  # selected first, causal order
        idx = order[:, :m]
        valid = torch.arange(m, device=h.device)[None] < n[:, None]
        hs = h.gather(1, idx[..., None].expand(B, m, D))
        p, g = pos.gather(1, idx), gate.gather(1, idx[..., None])
        mask = None
        if not share and bool((n < m).any()):  # ragged rows: causal among valid keys (+ self for padding)
            causal = torch.ones(m, m, dtype=torch.bool, device=h.device).tril()
            mask = ((causal[None] & valid[:, None, :]) | torch.eye(m, dtype=torch.bool, device=h.device))[:, None]
    cos, sin = model.rope(p, h.dtype)
    x = hs
    for i, d in enumerate(depths):
        if share:
            x, _ = model.forward_stage(d, x, cos, sin, attend=_share_attend(model, kv0[i], p, pos))
        else:
            x, kv = model.forward_stage(d, x, cos, sin, mask=mask)
            if kv0 is not None:
                kv0[i] = kv
    out = model.mor_update(hs, x, g)
    if idx is None:
        return torch.where(sel[..., None], out, h)
    out = torch.where(valid[..., None], out, hs)  # padding writes its own value back
    return h.scatter(1, idx[..., None].expand(B, idx.shape[1], D), out)


def forward_mor(model, input_ids: torch.Tensor, mode: str = "causal", positions: torch.Tensor | None = None):
    """(logits [B, T, V], info) of a MoR model; see the module docstring for the semantics.

    info: "selected" / "alive": lists over steps of bool [B, T] (ran step r / ran step r-1);
    expert: "scores" (router score per step, [B, T], with grad) and "aux_scores" (or None);
    token: "depth" [B, T] in 1..Nr, "probs" / "logits" [B, T, Nr].
    """
    if mode not in MODES:
        raise ValueError(f"unknown MoR mode {mode!r}; choose from {', '.join(MODES)}")
    cfg, router, s = model.cfg, model.router, model.structure()
    if router is None:
        raise ValueError("forward_mor needs a Mixture-of-Recursions model (cfg.mor_router is 'none')")
    B, T = input_ids.shape
    if positions is None:
        positions = torch.arange(T, device=input_ids.device)
    pos = positions.expand(B, T) if positions.dim() == 1 else positions
    h = model.embed(input_ids)
    cos, sin = model.rope(positions, h.dtype)
    for d in s.prelude:
        h, _ = model.forward_stage(d, h, cos, sin)
    h_entry = h
    info = {"selected": [], "alive": [], "scores": [], "aux_scores": [] if cfg.mor_aux_router else None}
    if router.kind == "token":
        depth, tok_gate, probs, logits = router.token_choice(h_entry)
        info.update(depth=depth, probs=probs, logits=logits, scores=None)
    kv0 = [None] * len(s.shared_layers) if cfg.mor_kv == "share" else None
    capacities = cfg.mor_capacities
    alive = torch.ones(B, T, dtype=torch.bool, device=h.device)
    for r in range(s.n_loops):
        if router.kind == "token":
            sel, gate = alive & (depth > r), tok_gate
        else:
            score = router.score(r, h)
            info["scores"].append(score)
            if info["aux_scores"] is not None:
                info["aux_scores"].append(router.aux_score(r, h))
            gate = router.gate(score)[..., None]
            if r == 0:
                sel = alive
            elif mode == "topk":
                sel = topk_select(score, alive, capacity_tokens(capacities[r], T))
            else:
                go, gate = model.mor_route(r, h, h_entry)
                sel = alive & go
        info["alive"].append(alive)
        info["selected"].append(sel)
        h = run_step(model, r, h, sel, pos, gate, kv0)
        alive = sel
    for d in s.coda:
        h, _ = model.forward_stage(d, h, cos, sin)
    return model.head(h), info


__all__ = ["forward_mor", "run_step", "topk_select", "capacity_tokens", "step_depths", "MODES"]
