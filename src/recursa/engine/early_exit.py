"""Single-request early-exit decoding with three ways to give skipped layers their keys/values.

A token runs layers bottom-up; at each exit depth (ExitSpec.depths) the exit's logits give a
confidence (recursa.model.confidence) compared with a threshold (recursa.engine.thresholds);
if it is high enough the token is emitted from there. Later tokens attend to the exited token
in the layers it skipped, so those layers need its K/V. The strategies:

- "copy" (CALM, approximate): the exit hidden state is copied upward and every skipped layer
  computes K/V from it (its attention norm + k/v projections), right away.
- "parallel" (FREE, exact): the exited token's hidden state at its exit depth is kept on a
  stack. The next token that goes deeper runs each deeper layer over [stacked tokens, itself]
  in one forward with a causal mask, which writes the stacked tokens' K/V exactly. Their
  emitted tokens stand. With several exits the stack keeps, per token, the depth its K/V
  reaches; these depths never increase along the stack, so at every layer the filled K/V is a
  prefix of the positions and the rows to run are one contiguous causal block.
- "speculative" (LayerSkip, lossless, greedy only): exited tokens are drafts (at most
  `max_draft` pending). A token that does not exit, or the end of generation, triggers the same
  deep pass, which now also verifies: the deep prediction at each stacked position must equal
  the draft emitted from it; the first mismatch is replaced by the deep token and everything
  after it is rolled back (its K/V is simply overwritten later). The output equals full-depth
  greedy decoding token for token.

The prompt's last position always runs full depth (prefill fills every layer anyway), so the
first new token is a full-depth prediction. Every exit a token passes (or exits at) yields a
(confidence, exit argmax == deep argmax) pair for the threshold's `observe(c, agreed, depth)`
once that token's full-depth prediction is computed: when it goes deep itself, or, for
"parallel" and "speculative", when a later deep pass carries it up from the stack (speculative:
only up to the first rejected draft). FREE's estimator (thresholds.PerExit) keeps one Beta
mixture per exit depth from them. Exited tokens under "copy" never reach full depth: no pairs.

Cost accounting (`EarlyExitResult`): `layer_tokens` counts full layer forwards (attention + MLP)
of one token after prefill, catch-up and re-verification included; `kv_layer_tokens` counts the
K/V-only projections "copy" runs for an exited token's skipped layers (norm + k/v projections,
a small fraction of a layer), kept apart so mean cost is not overstated.

    policy = ExitPolicy(ExitSpec((2,)), "max_prob", Fixed(0.8))
    result = early_exit_generate(model, prompt_ids, 64, policy, strategy="parallel")
    result.tokens, result.exit_depths, result.mean_depth, result.exit_shares
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from recursa.engine.exit_policy import ExitPolicy
from recursa.engine.sampling import sample
from recursa.engine.sequence import check_prompt
from recursa.errors import RecursaError
from recursa.model.decoder import Decoder
from recursa.model.exits import exit_logits, saturation_reference

STRATEGIES = ("copy", "parallel", "speculative")


@dataclass
class EarlyExitResult:
    tokens: list[int]
    exit_depths: list[int]           # per emitted token: layers run for the prediction it was emitted from
    n_layers: int
    layer_tokens: int = 0            # full token-layer forwards executed after prefill, catch-up included
    kv_layer_tokens: int = 0         # copy: K/V-only projections for exited tokens' skipped layers
    drafted: int = 0                 # speculative: drafts produced / accepted
    accepted: int = 0

    @property
    def mean_depth(self) -> float:
        return sum(self.exit_depths) / len(self.exit_depths) if self.exit_depths else 0.0

    @property
    def exit_shares(self) -> dict[int, float]:
        n = len(self.exit_depths)
        return {d: self.exit_depths.count(d) / n for d in sorted(set(self.exit_depths))} if n else {}


@dataclass
class _Pending:
    pos: int              # position of the token fed there
    depth: int            # its K/V exists for layers < depth
    h: torch.Tensor       # [D] hidden state after `depth` layers
    pred: int             # the token emitted from it (its prediction at its exit)
    obs: list             # (exit depth, confidence, exit argmax) at every exit it passed, its own last


class EarlyExitDecoder:
    """State of one request: per-depth KV, the stack of tokens whose deep K/V is missing, output."""

    def __init__(self, model: Decoder, prompt_ids: Sequence[int], max_new_tokens: int, policy: ExitPolicy,
                 strategy: str = "parallel", *, max_draft: int = 4, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                 stop_ids: Sequence[int] = ()):
        cfg = model.cfg
        if strategy not in STRATEGIES:
            raise RecursaError(f"unknown KV strategy {strategy!r}; choose from {', '.join(STRATEGIES)}")
        if strategy == "speculative" and temperature > 0:
            raise RecursaError("self-speculative decoding is greedy only (temperature 0)")
        if max_draft < 1:
            raise RecursaError(f"max_draft must be >= 1, got {max_draft}")
        prompt_ids = check_prompt(prompt_ids, cfg.vocab_size, cfg.max_seq_len)
        if max_new_tokens <= 0:
            raise RecursaError(f"max_new_tokens must be positive, got {max_new_tokens}")
        if len(prompt_ids) + max_new_tokens > cfg.max_seq_len:
            raise RecursaError(f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({max_new_tokens}) exceeds "
                               f"the model's max_seq_len {cfg.max_seq_len}")
        policy.spec.check(model.depth)
        self.model, self.policy, self.strategy = model, policy, strategy
        self.max_new, self.max_draft, self.stop = max_new_tokens, max_draft, set(stop_ids)
        self.sampling = (temperature, top_k, top_p)
        self.device, self.dtype = model.embed_tokens.weight.device, model.embed_tokens.weight.dtype
        self.generator = torch.Generator(device=self.device).manual_seed(seed) if seed is not None else None
        shape = (1, cfg.n_kv_heads, len(prompt_ids) + max_new_tokens, cfg.head_dim)
        self.cache = [(torch.empty(shape, device=self.device, dtype=self.dtype),
                       torch.empty(shape, device=self.device, dtype=self.dtype)) for _ in range(model.depth)]
        self.filled = [0] * model.depth     # positions with K/V at each depth (always a prefix)
        self.pending: list[_Pending] = []  # tokens whose K/V stops below the top, position order
        self.tokens: list[int] = []
        self.depths: list[int] = []
        self.prompt_len = len(prompt_ids)
        self.stats = {"layer_tokens": 0, "kv_layer_tokens": 0, "drafted": 0, "accepted": 0}
        self._prefill(list(prompt_ids))

    # ---- helpers -------------------------------------------------------------------------------
    @property
    def n_fed(self) -> int:
        """Positions fed so far: the prompt and every emitted token but the last."""
        return self.prompt_len + len(self.tokens) - 1

    def _choose(self, logits: torch.Tensor) -> int:
        return int(sample(logits.reshape(1, -1), *self.sampling, self.generator)[0])

    def _write(self, d: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        end = start + k.shape[2]
        self.cache[d][0][:, :, start:end] = k
        self.cache[d][1][:, :, start:end] = v
        self.filled[d] = end

    def _past(self, d: int, upto: int):
        return (self.cache[d][0][:, :, :upto], self.cache[d][1][:, :, :upto]) if upto else None

    def _emit(self, token: int, depth: int) -> None:
        self.tokens.append(token)
        self.depths.append(depth)

    @torch.inference_mode()
    def _prefill(self, prompt: list[int]) -> None:
        m = self.model
        h = m.embed(torch.tensor([prompt], device=self.device))
        cos, sin = m.rope(torch.arange(len(prompt), device=self.device), self.dtype)
        for d in range(m.depth):
            h, (k, v) = m.forward_stage(d, h, cos, sin)
            self._write(d, 0, k, v)
        self._emit(self._choose(m.head(h[0, -1])), m.depth)

    def _may_exit(self) -> bool:
        return self.strategy != "speculative" or len(self.pending) < self.max_draft

    # ---- one pass ------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self, feed: bool = True) -> None:
        """Feed the last emitted token (feed=True) or only bring the stack to full depth (feed=False)."""
        m, policy = self.model, self.policy
        p = self.n_fed
        end = p + 1 if feed else p
        if feed:
            group = m.embed(torch.tensor([[self.tokens[-1]]], device=self.device))
        else:
            group = torch.empty(1, 0, m.cfg.dim, device=self.device, dtype=self.dtype)
        start, j = p, len(self.pending)
        exits, step_t = set(policy.spec.depths), len(self.tokens)
        seen, obs = {}, []  # the fed token's hidden state by depth; (depth, confidence, argmax) per exit passed
        for d in range(m.depth):
            joining = []
            while j > 0 and self.pending[j - 1].depth == d:
                j -= 1
                joining.insert(0, self.pending[j])
            if joining:
                group = torch.cat((torch.stack([r.h for r in joining])[None], group), dim=1)
                start = joining[0].pos
            if group.shape[1] == 0:
                continue
            assert self.filled[d] == start, (d, self.filled[d], start)
            cos, sin = m.rope(torch.arange(start, end, device=self.device), self.dtype)
            seen[d] = group[0, -1]
            group, (k, v) = m.forward_stage(d, group, cos, sin, past_kv=self._past(d, start))
            self._write(d, start, k, v)
            self.stats["layer_tokens"] += group.shape[1]
            if feed and d + 1 in exits:
                h = seen[d + 1] = group[0, -1]
                logits = exit_logits(m, h, d + 1, policy.heads)
                conf = policy.measure(logits, h, seen[saturation_reference(policy.spec.depths, d + 1)], d + 1)
                obs.append((d + 1, conf, int(logits.argmax())))
                if conf >= policy.threshold(step_t, d + 1) and self._may_exit():
                    self._exit(d + 1, group, j, self._choose(logits), p, obs)
                    return
        self._deep(group, j, feed, obs)

    def _exit(self, depth: int, group: torch.Tensor, j: int, token: int, p: int, obs: list) -> None:
        """The fed token exits at `depth`; `group` holds the joined stack rows pending[j:] and it."""
        m = self.model
        if self.strategy == "copy":
            h = group[:, -1:]
            cos, sin = m.rope(torch.tensor([p], device=self.device), self.dtype)
            for d in range(depth, m.depth):
                block = m.stage(d)
                _, k, v = block.attn.qkv(block.attn_norm(h), cos, sin, m.adapters(d))
                self._write(d, p, k, v)
                self.stats["kv_layer_tokens"] += 1
        else:
            for i, row in enumerate(self.pending[j:]):
                row.depth, row.h = depth, group[0, i]
            self.pending.append(_Pending(p, depth, group[0, -1], token, obs))
            if self.strategy == "speculative":
                self.stats["drafted"] += 1
        self._emit(token, depth)

    def _deep(self, group: torch.Tensor, j: int, feed: bool, obs: list) -> None:
        """Everything in `group` reached full depth: label the exits passed, verify drafts, emit."""
        m = self.model
        assert j == 0 and group.shape[1] == len(self.pending) + int(feed)
        logits = m.head(group[0])
        deep = logits.argmax(-1).tolist()
        rows, self.pending = self.pending, []
        labelled = [r.obs for r in rows] + ([obs] if feed else [])
        reject = None  # speculative: the first draft the deep pass disagrees with
        if self.strategy == "speculative":
            reject = next((i for i, row in enumerate(rows) if deep[i] != row.pred), None)
            self.stats["accepted"] += len(rows) if reject is None else reject
            if reject is not None:  # rows after it were fed a rejected draft: their deep output is void
                labelled = labelled[:reject + 1]
        for row_obs, target in zip(labelled, deep):
            self.policy.observe(row_obs, target)
        if reject is not None:  # roll back everything emitted from the rejected row on
            row = rows[reject]
            keep = row.pos - self.prompt_len + 1
            del self.tokens[keep:], self.depths[keep:]
            self._emit(deep[reject], m.depth)
            self.filled = [min(f, row.pos + 1) for f in self.filled]
            return
        if feed:
            self._emit(self._choose(logits[-1]), m.depth)

    # ---- driver --------------------------------------------------------------------------------
    def _unverified(self) -> int:
        return len(self.pending) if self.strategy == "speculative" else 0

    def _finished(self) -> bool:
        final = self.tokens[:len(self.tokens) - self._unverified()]
        return len(final) >= self.max_new or any(t in self.stop for t in final)

    def complete_kv(self) -> None:
        """Bring every stacked token's K/V to full depth (verifying drafts when speculative)."""
        if self.pending:
            self.step(feed=False)

    def run(self) -> EarlyExitResult:
        while not self._finished():
            tentative = self.tokens[len(self.tokens) - self._unverified():]
            if self._unverified() and (len(self.tokens) >= self.max_new or any(t in self.stop for t in tentative)):
                self.step(feed=False)
            else:
                self.step(feed=True)
        n = self.max_new
        for i, t in enumerate(self.tokens[:n]):
            if t in self.stop:
                n = i + 1
                break
        return EarlyExitResult(self.tokens[:n], self.depths[:n], self.model.depth, self.stats["layer_tokens"],
                               self.stats["kv_layer_tokens"], self.stats["drafted"], self.stats["accepted"])


def early_exit_generate(model: Decoder, prompt_ids: Sequence[int], max_new_tokens: int, policy: ExitPolicy,
                        strategy: str = "parallel", **kwargs) -> EarlyExitResult:
    """Decode one request with early exits (keyword arguments: see EarlyExitDecoder)."""
    return EarlyExitDecoder(model, prompt_ids, max_new_tokens, policy, strategy, **kwargs).run()


__all__ = ["STRATEGIES", "EarlyExitResult", "EarlyExitDecoder", "early_exit_generate"]
