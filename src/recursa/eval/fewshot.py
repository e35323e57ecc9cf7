"""Few-shot evaluation by log-likelihood: score each choice's continuation given its context.

A request is (context, continuation). Its score is the model's summed log-probability of the
continuation tokens given the context tokens; a multiple-choice document picks the argmax, raw
(`acc`), per character (`acc_per_char`, OLMo's acc_norm) or per token (`acc_per_token`). A
single-continuation document (LAMBADA) is right when greedy decoding reproduces the continuation
exactly (`acc`); its bits per UTF-8 byte are reported too.

Tokenization: trailing whitespace of the context moves to the front of the continuation, then
`context` and `context + continuation` are encoded and the continuation's ids are the tail past
the context's ids, so the boundary tokenizes as it would in running text (byte-level BPE glues a
space to the word after it). Contexts are truncated from the left to fit `max_seq_len`.

Speed: choices of one document share their context, so each document is packed into one row,
context once, then every choice's continuation, with a tree attention mask (a choice sees the
context and itself, never another choice) and per-token RoPE positions. Rows are sorted by length
and right-padded into batches, and the LM head runs only on the positions that are scored.

Adaptive depth (`score_ids`): with an early-exit `ExitPolicy`, each scored position takes its
prediction from the first exit whose confidence reaches the threshold (else the final layer), as
synchronized parallel decoding would under teacher forcing: every layer still runs, so the keys and
values later tokens read are exact. A Mixture-of-Recursions model is scored one causal sequence at
a time (`model.forward_mor`), its router choosing each token's depth. `Score.depth` is the mean
depth behind the continuation's predictions (the model's depth for a plain model).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from recursa.errors import RecursaError
from recursa.eval.tasks import Task
from recursa.model.exits import exit_logits, saturation_reference


@dataclass
class Score:
    logprob: float  # summed log-probability of the continuation
    n_tokens: int
    greedy: bool  # every continuation token is the argmax of its prediction
    depth: float = 0.0  # mean layers run for the continuation's predictions


def encode_pair(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context and continuation ids, split where the context's own encoding ends."""
    stripped = context.rstrip()
    continuation = context[len(stripped):] + continuation
    ctx = tok.encode(stripped) if stripped else []
    whole = tok.encode(stripped + continuation)
    if whole[: len(ctx)] == ctx:
        return ctx, whole[len(ctx):]
    return ctx, tok.encode(continuation)  # a merge crossed the boundary: encode the parts apart


@dataclass
class _Unit:
    """One packed row: a context shared by the requests (indices into the request list) after it."""

    context: list[int]
    conts: list[list[int]]
    requests: list[int]

    @property
    def length(self) -> int:
        return len(self.context) + sum(len(c) - 1 for c in self.conts)


def _build_units(model, pairs: list[tuple[list[int], list[int]]], max_len: int | None = None) -> list[_Unit]:
    max_len = max_len or model.cfg.max_seq_len
    groups: dict[tuple[int, ...], _Unit] = {}
    for i, (ctx, cont) in enumerate(pairs):
        if not cont:
            raise RecursaError(f"request {i} has an empty continuation")
        if not ctx:
            raise RecursaError(f"request {i} has an empty context")
        unit = groups.setdefault(tuple(ctx), _Unit(list(ctx), [], []))
        unit.conts.append(list(cont))
        unit.requests.append(i)
    for unit in groups.values():
        # every choice's own sequence (context + continuation[:-1]) must fit in max_seq_len
        longest = max(len(c) for c in unit.conts)
        keep = max_len + 1 - longest
        if keep < 1:
            raise RecursaError(f"a continuation of {longest} tokens does not fit max_seq_len={max_len}")
        unit.context = unit.context[-keep:]
    return list(groups.values())


def _pack(units: list[_Unit], device) -> tuple:
    """Batch tensors for packed rows: ids, positions, tree mask, and where each score is read."""
    T = max(u.length for u in units)
    B = len(units)
    ids = torch.zeros(B, T, dtype=torch.long)
    pos = torch.zeros(B, T, dtype=torch.long)
    seg = torch.full((B, T), -2, dtype=torch.long)  # -1 = context, k = choice k, -2 = padding
    rows, cols, targets, owner = [], [], [], []  # owner: (unit index in batch, choice index, n)
    for b, u in enumerate(units):
        c = len(u.context)
        ids[b, :c] = torch.tensor(u.context)
        pos[b, :c] = torch.arange(c)
        seg[b, :c] = -1
        at = c
        for k, cont in enumerate(u.conts):
            n = len(cont) - 1  # inputs of this choice: all but its last token
            ids[b, at:at + n] = torch.tensor(cont[:-1], dtype=torch.long)
            pos[b, at:at + n] = torch.arange(c, c + n)
            seg[b, at:at + n] = k
            src = [c - 1] + list(range(at, at + n))
            rows += [b] * len(src)
            cols += src
            targets += cont
            owner.append((b, k, len(cont)))
            at += n
    same = seg[:, :, None] == seg[:, None, :]
    to_ctx = seg[:, None, :] == -1
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    mask = ((same | to_ctx) & causal) | torch.eye(T, dtype=torch.bool)  # padding sees itself only
    to = lambda t: t.to(device)
    return to(ids), to(pos), to(mask[:, None]), to(torch.tensor(rows)), to(torch.tensor(cols)), to(torch.tensor(targets)), owner


def score_requests(model, tok, requests: list[tuple[str, str]], batch_size: int = 8, exit_policy=None,
                   max_len: int | None = None) -> list[Score]:
    """Score every (context, continuation); `batch_size` packed rows (documents) per forward.

    Contexts are cut from the left so each sequence fits `max_len` (default the model's max_seq_len)."""
    start_id = tok.bos_id if tok.bos_id is not None else tok.eos_id
    pairs = []
    for i, (context, continuation) in enumerate(requests):
        ctx, cont = encode_pair(tok, context, continuation)
        if not cont:
            raise RecursaError(f"request {i} has an empty continuation")
        pairs.append((ctx or [start_id], cont))  # nothing to condition on: start from the start token
    return score_ids(model, pairs, batch_size, exit_policy, max_len)


@torch.inference_mode()
def score_ids(model, pairs: list[tuple[list[int], list[int]]], batch_size: int = 8, exit_policy=None,
              max_len: int | None = None) -> list[Score]:
    """Score token-id pairs (context, continuation), both non-empty; see the module docstring."""
    if batch_size < 1:
        raise RecursaError(f"batch size must be positive, got {batch_size}")
    device = model.embed_tokens.weight.device
    units = sorted(_build_units(model, pairs, max_len), key=lambda u: -u.length)
    scores: list[Score | None] = [None] * len(pairs)
    if model.router is not None:   # Mixture-of-Recursions: routing needs plain sequences
        if exit_policy is not None:
            raise RecursaError("a Mixture-of-Recursions model chooses its own depth: no exit policy")
        return _score_sequences(model, units, len(pairs), device)
    exits = tuple(exit_policy.spec.depths) if exit_policy is not None else ()
    keep = set(exits) | {saturation_reference(exits, e) for e in exits}
    for start in range(0, len(units), batch_size):
        batch = units[start:start + batch_size]
        ids, pos, mask, rows, cols, targets, owner = _pack(batch, device)
        states = model.forward_hidden(ids, pos, mask)
        hidden = {d: states[d][rows, cols] for d in keep}
        steps = torch.tensor([k for _, _, n in owner for k in range(n)])
        logits, depth = _predict(model, states[-1][rows, cols], hidden, exit_policy, steps)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        logp = torch.log_softmax(logits, dim=-1).gather(-1, targets[:, None])[:, 0]
        hit = logits.argmax(-1) == targets
        at = 0
        for b, k, n in owner:
            req = batch[b].requests[k]
            scores[req] = Score(logp[at:at + n].sum().item(), n, bool(hit[at:at + n].all()),
                                depth[at:at + n].float().mean().item())
            at += n
    return scores  # type: ignore[return-value]


def _predict(model, final: torch.Tensor, hidden: dict, exit_policy, steps: torch.Tensor):
    """Logits [N, V] and depth [N] of each scored position: the first exit that is confident enough
    (the engine's rule: ExitPolicy.confidences with the shared saturation reference).

    `hidden[e]` holds the scored positions' states after e layers; `steps[j]` is position j's index
    in its continuation (the generation step a step-dependent threshold reads)."""
    logits = model.head(final)
    depth = torch.full((len(final),), model.depth, dtype=torch.long)
    if exit_policy is None:
        return logits, depth
    exits = exit_policy.spec.depths
    done = torch.zeros(len(final), dtype=torch.bool)
    for e in exits:
        h = hidden[e]
        shallow = exit_logits(model, h, e, exit_policy.heads)
        ref = hidden[saturation_reference(exits, e)] if exit_policy.uses_reference else None
        conf = torch.tensor(exit_policy.confidences(shallow, h, ref, e))
        threshold = torch.tensor([exit_policy.threshold(int(t), e) for t in steps])
        take = (~done & (conf >= threshold)).to(logits.device)
        logits[take], depth[take.cpu()] = shallow[take].to(logits.dtype), e
        done |= take.cpu()
    return logits, depth


def _score_sequences(model, units: list[_Unit], n: int, device) -> list[Score]:
    """One causal forward per (context, continuation): for models whose tokens' depths depend on
    the routing of the sequence they are in (MoR), where the packed tree layout does not apply."""
    from recursa.model.mor import step_depths

    per_step = [len(step_depths(model, r)) for r in range(model.structure().n_loops)]
    fixed = model.depth - sum(per_step)   # prelude + coda: every token runs them
    scores: list[Score | None] = [None] * n
    for u in units:
        c = len(u.context)
        for k, cont in zip(u.requests, u.conts):
            ids = torch.tensor([u.context + cont[:-1]], device=device)
            logits, info = model.forward_mor(ids)
            logits = logits[0, c - 1:]
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
            depth = fixed + sum(sel[0, c - 1:].float() * m for sel, m in zip(info["selected"], per_step))
            target = torch.tensor(cont, device=device)
            logp = torch.log_softmax(logits, -1).gather(-1, target[:, None])[:, 0]
            scores[k] = Score(logp.sum().item(), len(cont), bool((logits.argmax(-1) == target).all()),
                              float(depth.mean()))
    return scores  # type: ignore[return-value]


def evaluate_task(model, tok, task: Task, batch_size: int = 8) -> dict:
    """Accuracy metrics of one task; keys depend on the task kind (see the module docstring)."""
    if not task.docs:
        raise RecursaError(f"task {task.name}:{task.variant} has no documents to score")
    start = time.perf_counter()
    flat = [r for d in task.docs for r in d.requests]
    scores = score_requests(model, tok, flat, batch_size)
    result = {"task": task.name, "variant": task.variant, "kind": task.kind, "n_docs": len(task.docs)}
    if task.kind == "greedy":
        n_bytes = sum(len(d.requests[0][1].encode("utf-8")) for d in task.docs)
        result["acc"] = sum(s.greedy for s in scores) / len(scores)
        result["bits_per_byte"] = -sum(s.logprob for s in scores) / math.log(2) / max(n_bytes, 1)
    else:
        correct = {"acc": 0, "acc_per_char": 0, "acc_per_token": 0}
        at = 0
        for doc in task.docs:
            doc_scores = scores[at:at + len(doc.requests)]
            at += len(doc.requests)
            per = {
                "acc": [s.logprob for s in doc_scores],
                "acc_per_char": [s.logprob / max(len(cont), 1) for (_, cont), s in zip(doc.requests, doc_scores)],
                "acc_per_token": [s.logprob / s.n_tokens for s in doc_scores],
            }
            for name, values in per.items():
                correct[name] += max(range(len(values)), key=values.__getitem__) == doc.label
        result.update({k: v / len(task.docs) for k, v in correct.items()})
    result["primary_metric"] = {"acc_raw": "acc", "logits_per_byte": "bits_per_byte"}.get(task.primary_metric, task.primary_metric)
    if result["primary_metric"] not in result:
        result["primary_metric"] = "acc"
    result["seconds"] = time.perf_counter() - start
    return result
