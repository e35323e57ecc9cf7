"""LLMEngine: requests in, one stage run per `step()`, streamed outputs out.

    engine = LLMEngine(model, tokenizer, EngineConfig(max_num_batched_tokens=256))
    engine.add_request("a", "Once upon a time", SamplingParams(temperature=0, max_tokens=32))
    while engine.has_unfinished():
        for out in engine.step():
            print(out.request_id, out.delta_text, out.finish_reason)

A step: the scheduler lets new chunks into depth 0 (scheduler.py), the policy picks a stage
group (policy.py), the runner runs that stage on all of its tokens (model_runner.py), and the
depth router (depth_router.py) moves tokens on for the model's family — full depth, Mixture-of-
Recursions routing, or early exit with an `exit_policy` — and returns the chunks that are done.
Those whose newest token is due are sampled (one token per request, stop checks, detokenization);
their outputs are what `step()` returns.
"""
from __future__ import annotations

import logging

import torch

from recursa.engine.config import EngineConfig
from recursa.engine.depth_router import make_router
from recursa.engine.kv_cache import KVCacheManager
from recursa.engine.model_runner import ModelRunner
from recursa.engine.outputs import RequestOutput
from recursa.engine.policy import make_policy
from recursa.engine.sampling import sample_rows
from recursa.engine.sampling_params import SamplingParams
from recursa.engine.scheduler import Scheduler
from recursa.engine.sequence import Sequence
from recursa.errors import RecursaError
from recursa.model.decoder import Decoder

DEFAULT_KV_MEMORY = 512 * 2**20
logger = logging.getLogger(__name__)


class LLMEngine:
    def __init__(self, model: Decoder, tokenizer=None, config: EngineConfig | None = None, exit_policy=None):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.config = config = config or EngineConfig()
        cfg = model.cfg
        self.max_model_len = config.max_model_len or cfg.max_seq_len
        if self.max_model_len > cfg.max_seq_len:
            raise RecursaError(f"max_model_len {self.max_model_len} exceeds the model's max_seq_len {cfg.max_seq_len}")
        self.eos_id = tokenizer.eos_id if tokenizer is not None else cfg.eos_token_id
        weight = model.embed_tokens.weight
        # KV strategy: a depth reads its own cache, or (recursive KV sharing) loop 0's; recursion-wise
        # caching leaves the entries of tokens that skipped a step empty
        kv_source = [model.kv_source(d) for d in range(model.depth)]
        recursion_wise = cfg.is_mor and cfg.mor_kv == "recursion"
        per_token = 2 * cfg.n_kv_heads * cfg.head_dim * weight.element_size() * len(set(kv_source))
        memory = config.kv_cache_memory or min(DEFAULT_KV_MEMORY, config.max_num_seqs * self.max_model_len * per_token)
        self.kv = KVCacheManager(model.depth, cfg.n_kv_heads, cfg.head_dim, block_size=config.block_size,
                                 memory_bytes=memory, dtype=weight.dtype, device=weight.device,
                                 cache_layer_of=kv_source, track_filled=recursion_wise)
        # tokens at depths that run the same unique layer batch together; per-depth adapters
        # (relaxed recursion) make a depth its own group, and depths that read a shared KV cache
        # (and compute no keys/values) group apart from the depths that write it
        keys = [-1 - d if model.adapters(d) is not None
                else layer if kv_source[d] == d else model.depth + layer
                for d, layer in enumerate(model.depth_to_layer)]
        self.scheduler = Scheduler(config, self.kv, make_policy(config.policy, keys, config.max_num_batched_tokens), keys)
        self.runner = ModelRunner(model, self.kv)
        self.router = make_router(model, self.runner, exit_policy)
        self.num_output_tokens = 0
        self.sum_exit_depth = 0
        self.seqs: dict[str, Sequence] = {}

    # ---- requests ------------------------------------------------------------------------------
    def _prompt_ids(self, prompt) -> tuple[list[int], str | None]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RecursaError("a text prompt needs a tokenizer; pass token ids or load a model directory with tokenizer.json")
            ids, text = self.tokenizer.encode(prompt), prompt
        else:
            try:
                ids, text = [int(t) for t in prompt], None
            except (TypeError, ValueError):
                raise RecursaError("a prompt is a string or a list of token ids") from None
        if not ids:
            raise RecursaError("the prompt is empty")
        vocab = self.model.cfg.vocab_size
        if min(ids) < 0 or max(ids) >= vocab:
            raise RecursaError(f"prompt holds token ids outside the vocabulary (0..{vocab - 1})")
        if len(ids) >= self.max_model_len:
            raise RecursaError(f"prompt of {len(ids)} tokens leaves no room to generate within max_model_len {self.max_model_len}")
        return ids, text

    def add_request(self, request_id: str, prompt, params: SamplingParams | None = None) -> None:
        """Queue a request (prompt: text or token ids); its tokens enter at the next steps."""
        params = params or SamplingParams()
        if request_id in self.seqs:
            raise RecursaError(f"request id {request_id!r} is already running")
        if params.stop and self.tokenizer is None:
            raise RecursaError("stop strings need a tokenizer")
        vocab = self.model.cfg.vocab_size
        if any(not 0 <= t < vocab for t in params.stop_token_ids):
            raise RecursaError(f"stop_token_ids {params.stop_token_ids} hold ids outside the vocabulary (0..{vocab - 1})")
        ids, text = self._prompt_ids(prompt)
        longest = min(len(ids) + params.max_tokens, self.max_model_len)
        if self.kv.blocks_for(longest) > self.kv.num_blocks:
            raise RecursaError(f"a request of up to {longest} tokens needs {self.kv.blocks_for(longest)} KV blocks; "
                               f"the cache has {self.kv.num_blocks} (raise kv_cache_memory)")
        seq = Sequence(request_id, ids, params, text)
        self.seqs[request_id] = seq
        self.scheduler.add(seq)

    def abort_request(self, request_id: str) -> bool:
        """Drop a request and free its memory; False if it is not running (unknown or finished)."""
        seq = self.seqs.pop(request_id, None)
        if seq is None:
            return False
        self.scheduler.remove(seq)
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---- the step ------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one stage on its waiting tokens; outputs of the requests that got a token.

        Fault isolation: an exception inside the step (the model, a router, a policy) finishes the
        requests of the group being run with finish_reason "error" and frees their KV; the other
        requests go on and later steps work. (A request whose own logits are NaN/inf finishes alone
        the same way: sample_rows gives it None.)"""
        group: list[Sequence] = []
        try:
            return self._step(group)
        except Exception as e:
            if not group:   # before any request was touched (admission): an engine bug, not a request's
                raise
            logger.error("engine step failed (%s: %s); finishing its %d request(s) with finish_reason 'error'",
                         type(e).__name__, e, len(group))
            outputs = []
            for s in group:
                if s.request_id in self.seqs:
                    s.finish_reason = "error"
                    outputs.append(self._output(s))
                    self.scheduler.remove(s)
                    del self.seqs[s.request_id]
            return outputs

    def _step(self, group: list[Sequence]) -> list[RequestOutput]:
        """The step proper; fills `group` with the requests it runs, for step()'s fault handling."""
        self.scheduler.admit()
        group.extend(self.scheduler.next_group())
        if not group:
            if self.has_unfinished():
                raise RuntimeError("engine made no progress with unfinished requests (scheduler bug)")
            return []
        fresh = [s for s in group if s.hidden is None]
        if fresh:   # chunks entering depth 0
            self.runner.embed(fresh)
            self.router.arrive(fresh)
        self.runner.run_stage(group)
        done = self.router.arrive(group)
        ready = [(s, row) for s, row in done if row is not None]
        tokens = sample_rows(torch.stack([row for _, row in ready]), [s.params for s, _ in ready],
                             [s.generator for s, _ in ready]) if ready else []
        for s, _ in done:
            s.num_cached = s.chunk_end
            s.end_chunk()
        outputs = []
        for (s, _), token in zip(ready, tokens):
            if token is None:   # NaN/inf logits or a failing sampler: this request ends, the batch goes on
                s.finish_reason = "error"
            else:
                s.exit_depths.append(s.exit_depth)
                self.num_output_tokens += 1
                self.sum_exit_depth += s.exit_depth
                self._append(s, token)
            outputs.append(self._output(s))
            if s.finish_reason is not None:
                self.scheduler.remove(s)
                del self.seqs[s.request_id]
        return outputs

    def _append(self, s: Sequence, token: int) -> None:
        s.token_ids.append(token)
        p = s.params
        reason, text_ids = None, s.output_token_ids
        if (token == self.eos_id and not p.ignore_eos) or token in p.stop_token_ids:
            reason, text_ids = "stop", text_ids[:-1]
        elif len(text_ids) >= p.max_tokens or s.num_tokens >= self.max_model_len:
            reason = "length"
        if self.tokenizer is not None:
            text = self.tokenizer.decode(text_ids)
            hits = [i for i in (text.find(stop) for stop in p.stop) if i >= 0]
            if hits and reason != "stop":
                text, reason = text[:min(hits)], "stop"
            s.text = text
        s.finish_reason = reason

    def _output(self, s: Sequence) -> RequestOutput:
        finished = s.finish_reason is not None
        end = len(s.text)
        if not finished:  # hold back what a stop string or an unfinished UTF-8 character may still change
            end -= max((len(x) for x in s.params.stop), default=1) - 1
            while end > 0 and s.text[end - 1] == "\ufffd":
                end -= 1
        end = max(end, s.num_sent_chars)
        out_ids = s.output_token_ids
        out = RequestOutput(s.request_id, s.prompt, s.prompt_token_ids, out_ids, s.text, finished, s.finish_reason,
                            out_ids[s.num_sent_tokens:], s.text[s.num_sent_chars:end], list(s.exit_depths))
        s.num_sent_tokens, s.num_sent_chars = len(out_ids), end
        return out

    def stats(self) -> dict:
        runs = self.runner.num_stage_runs
        return {
            "stage_runs": runs,
            "stage_tokens": self.runner.num_stage_tokens,
            "tokens_per_stage_run": self.runner.num_stage_tokens / runs if runs else 0.0,
            "head_tokens": self.runner.num_head_tokens,
            "output_tokens": self.num_output_tokens,
            "mean_exit_depth": self.sum_exit_depth / self.num_output_tokens if self.num_output_tokens else 0.0,
            "model_depth": self.model.depth,
            "kv_entries_written": self.kv.entries_written,
            "preemptions": self.scheduler.num_preemptions,
            "kv_bytes_per_token": self.kv.kv_bytes_per_token,
            "kv_blocks": self.kv.num_blocks,
            "kv_free_blocks": self.kv.num_free_blocks,
        }
