"""Mixture-of-Recursions routers: which tokens run the next recursion step, and with which gate.

Expert choice (`cfg.mor_router == "expert"`): one scorer per recursion step r = 0..Nr-1 maps the
hidden state at the start of step r to a score s_r; the step's gate is alpha * act(s_r) (act =
sigmoid or tanh, alpha = 0.1 by default). In training, the top-k tokens of the sequence by s_r
among step r-1's survivors run step r (recursa.model.mor); at inference a token continues iff
sigmoid(s_r) > mor_threshold, which the BCE loss (recursa.train.mor_losses) teaches to agree with
top-k membership. With `mor_aux_router` a second set of scorers, reading the detached hidden
state, makes that decision instead and is the only thing the BCE trains.

Token choice (`"token"`): one scorer on the hidden state at the shared block's entry gives Nr
logits; p = softmax (or sigmoid) of them, the token's depth is argmax(p + bias) + 1 in 1..Nr and
every step it runs is gated by alpha * p[depth - 1] (alpha = 1 by default). `bias` is a buffer:
zero unless the loss-free balancing update (`mor_balance = "bias"`) moves it; it only shifts the
choice, never the gate.

Scorers are a bias-free Linear, or (`mor_router_arch = "mlp"`) Linear(D, D) -> GELU -> Linear.
Every decision is per token (nothing mixes tokens), so the engine can route any set of tokens.
"""
from __future__ import annotations

import torch
from torch import nn

from recursa.config import MOR_GATES, ModelConfig


def _scorer(cfg: ModelConfig, out: int) -> nn.Module:
    if cfg.mor_router_arch == "linear":
        return nn.Linear(cfg.dim, out, bias=False)
    return nn.Sequential(nn.Linear(cfg.dim, cfg.dim, bias=False), nn.GELU(), nn.Linear(cfg.dim, out, bias=False))


class Routers(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.kind, self.n_steps, self.threshold = cfg.mor_router, cfg.n_loops, float(cfg.mor_threshold)
        self.alpha = float(cfg.mor_alpha) if cfg.mor_alpha is not None else (0.1 if self.kind == "expert" else 1.0)
        self.gate_fn = cfg.mor_gate or MOR_GATES[self.kind][0]
        self.init_std = cfg.init_std
        if self.kind == "expert":
            self.scorers = nn.ModuleList(_scorer(cfg, 1) for _ in range(cfg.n_loops))
            self.aux = nn.ModuleList(_scorer(cfg, 1) for _ in range(cfg.n_loops)) if cfg.mor_aux_router else None
        else:
            self.scorer = _scorer(cfg, cfg.n_loops)
            self.register_buffer("bias", torch.zeros(cfg.n_loops))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for p in self.parameters():
            nn.init.normal_(p, std=self.init_std)
        if self.kind == "token":
            self.bias.zero_()

    # ---- expert choice -------------------------------------------------------------------
    def score(self, step: int, h: torch.Tensor) -> torch.Tensor:
        """Router score s_step [...] of hidden states h [..., D] at the start of `step`."""
        return self.scorers[step](h).squeeze(-1)

    def aux_score(self, step: int, h: torch.Tensor) -> torch.Tensor:
        """The auxiliary router's score [...] (reads h detached: it never moves the model)."""
        return self.aux[step](h.detach()).squeeze(-1)

    def gate(self, score: torch.Tensor) -> torch.Tensor:
        """alpha * act(score) for expert choice (act = the configured sigmoid / tanh)."""
        return self.alpha * (torch.sigmoid(score) if self.gate_fn == "sigmoid" else torch.tanh(score))

    # ---- token choice --------------------------------------------------------------------
    def token_logits(self, h_entry: torch.Tensor) -> torch.Tensor:
        return self.scorer(h_entry)

    def token_probs(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits.float(), -1).to(logits.dtype) if self.gate_fn == "softmax" else torch.sigmoid(logits)

    def token_choice(self, h_entry: torch.Tensor):
        """(depth [...] in 1..Nr, gate [..., 1], probs [..., Nr], logits [..., Nr]) from h_entry [..., D]."""
        logits = self.token_logits(h_entry)
        probs = self.token_probs(logits)
        choice = (probs.detach() + self.bias.to(probs.dtype)).argmax(-1)
        gate = self.alpha * probs.gather(-1, choice[..., None])
        return choice + 1, gate, probs, logits

    # ---- the causal rule (engine and reference forward) ----------------------------------
    def route(self, step: int, h: torch.Tensor, h_entry: torch.Tensor):
        """(go [...] bool, gate [..., 1]) for tokens alive at the start of `step`; go is all True at step 0."""
        if not 0 <= step < self.n_steps:
            raise IndexError(f"recursion step {step} is outside 0..{self.n_steps - 1}")
        if self.kind == "token":
            depth, gate, _, _ = self.token_choice(h_entry)
            return depth > step, gate
        score = self.score(step, h)
        gate = self.gate(score)[..., None]
        if step == 0:
            return torch.ones(h.shape[:-1], dtype=torch.bool, device=h.device), gate
        decision = self.aux_score(step, h) if self.aux is not None else score   # its sigmoid meets the threshold
        return torch.sigmoid(decision) > self.threshold, gate

    @torch.no_grad()
    def update_bias(self, load: torch.Tensor, rate: float) -> None:
        """Loss-free balancing: raise the bias of under-loaded depths, lower over-loaded ones."""
        self.bias += rate * torch.sign(load.float().mean() - load.float()).to(self.bias.dtype)


def build(cfg: ModelConfig) -> Routers | None:
    return Routers(cfg) if cfg.is_mor else None


def mor_update(h_start: torch.Tensor, h_end: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """One gated recursion step: only the residual branch (h_end - h_start) is scaled by the gate."""
    return h_start + gate * (h_end - h_start)


__all__ = ["Routers", "build", "mor_update"]
