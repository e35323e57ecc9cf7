"""LLMEngine: requests in, one span run per `step()`, streamed outputs out.

    engine = LLMEngine(model, tokenizer, EngineConfig(max_num_batched_tokens=256))
    engine.add_request("a", "Once upon a time", SamplingParams(temperature=0, max_tokens=32))
    while engine.has_unfinished():
        for out in engine.step():
            print(out.request_id, out.delta_text, out.finish_reason)

The data path of a step: the scheduler lets new chunks into depth 0 (scheduler.py) and the
policy picks a span group (policy.py); the runner embeds new chunks and runs the span on all of
its tokens (model_runner.py, attention.py over the KV manager, kv_cache.py); the family's router
(depth_router.py) moves tokens on and returns the chunks that are done; those whose newest token
is due are sampled in one batch (sampling.py); the router says what is output now (`commit`: a
speculative draft waits for its verification, which may output several tokens at once) and the
output processor appends the tokens, checks stops and detokenizes (output_processor.py). Its
outputs are what `step()` returns.

Spans: the depths are cut at *boundaries* — depth 0, the model's end, the router's decision
depths (exits, recursion-step ends) and the entries of a shared block's loops (where tokens of
other loops join: continuous depth-wise batching; a MoR router keeps only its steps' ends, so the
prelude's span runs on through step 0, which every token runs) — and one step runs a whole span.
A vanilla model is one span: one Python step per token round, as in nano-vllm.
"""
from __future__ import annotations

import logging
from functools import partial

import torch

from recursa import kernels
from recursa.engine.config import EngineConfig
from recursa.engine.depth_router import EarlyExit, Router
from recursa.engine.exit_policy import ExitPolicy
from recursa.engine.mor_router import MoRRouting
from recursa.engine.kv_cache import KVCacheManager
from recursa.engine.model_runner import ModelRunner
from recursa.engine.output_processor import OutputProcessor
from recursa.engine.outputs import RequestOutput
from recursa.engine.policy import make_policy
from recursa.engine.recursion_kv import RecursionKVCache
from recursa.engine.sampling import sample_rows_isolated, stack_rows
from recursa.engine.sampling_params import SamplingParams
from recursa.engine.scheduler import Scheduler
from recursa.engine.sequence import Sequence, check_prompt
from recursa.engine.speculative import SelfSpeculative
from recursa.engine.state_copy import StateCopy
from recursa.errors import RecursaError
from recursa.model.decoder import Decoder

DEFAULT_KV_MEMORY = 512 * 2**20
logger = logging.getLogger(__name__)


def span_boundaries(model: Decoder, router: Router) -> list[int]:
    """Sorted depths where spans start or end: 0, the router's, each loop entry of a shared block
    (unless the router places its own there), the end."""
    st = model.structure()
    loops = set()
    if st.n_loops > 1 and router.loop_boundaries:
        k = len(st.shared_layers)
        loops = {st.shared[0] + r * k for r in range(st.n_loops + 1)}
    return sorted({0, model.depth} | router.boundaries() | loops)


def make_router(model, runner: ModelRunner, exit_policy: ExitPolicy | None = None, exit_router=None) -> Router:
    """The router for `model`'s family (an exit policy turns on early exit; `exit_router(model, runner,
    policy)` builds its strategy's router, default EarlyExit: parallel decoding)."""
    if model.cfg.is_mor and exit_policy is not None:
        raise RecursaError("a Mixture-of-Recursions model chooses depth with its router; it takes no exit policy")
    if model.cfg.is_mor:
        return MoRRouting(model, runner)
    if exit_policy is not None:
        return (exit_router or EarlyExit)(model, runner, exit_policy)
    return Router(model, runner)


class LLMEngine:
    def __init__(self, model: Decoder, tokenizer=None, config: EngineConfig | None = None, exit_policy=None):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.config = config = config or EngineConfig()
        cfg = model.cfg
        self.max_model_len = config.max_model_len or cfg.max_seq_len
        if self.max_model_len > cfg.max_seq_len:
            raise RecursaError(f"max_model_len {self.max_model_len} exceeds the model's max_seq_len {cfg.max_seq_len}")
        weight = model.embed_tokens.weight
        # KV strategy: a depth reads its own cache, or (recursive KV sharing) loop 0's; recursion-wise
        # caching keeps entries only for the tokens that ran a step (recursion_kv.py)
        kv_source = [model.kv_source(d) for d in range(model.depth)]
        per_token = 2 * cfg.n_kv_heads * cfg.head_dim * weight.element_size() * len(set(kv_source))
        memory = config.kv_cache_memory or min(DEFAULT_KV_MEMORY, config.max_num_seqs * self.max_model_len * per_token)
        if cfg.is_mor and cfg.mor_kv == "recursion":   # compact per-step tables: reserve only what is written
            self.kv = RecursionKVCache.for_model(model, block_size=config.block_size, memory_bytes=memory)
        else:
            self.kv = KVCacheManager(model.depth, cfg.n_kv_heads, cfg.head_dim, block_size=config.block_size,
                                     memory_bytes=memory, dtype=weight.dtype, device=weight.device,
                                     cache_layer_of=kv_source)
        self.runner = ModelRunner(model, self.kv, config.compile)
        eos_id = tokenizer.eos_id if tokenizer is not None else cfg.eos_token_id
        self.output_processor = OutputProcessor(tokenizer, eos_id, self.max_model_len)
        if config.exit_strategy != "parallel" and exit_policy is None:
            raise RecursaError(f"exit_strategy {config.exit_strategy!r} needs an exit_policy")
        exit_router = {"parallel": EarlyExit, "copy": StateCopy,
                       "speculative": partial(SelfSpeculative, max_draft=config.max_draft,
                                              ends=self.output_processor.reason)}[config.exit_strategy]
        self.router = make_router(model, self.runner, exit_policy, exit_router)
        # spans and their keys: spans that run the same stages in the same order batch together
        self.boundaries = bounds = span_boundaries(model, self.router)
        self.runner.capture_depth = self.router.capture_depth
        stage_keys = model.stage_keys()
        ids: dict[tuple, int] = {}
        span_key = {b: ids.setdefault(tuple(stage_keys[b:e]), len(ids)) for b, e in zip(bounds, bounds[1:])}
        self.runner.span_len = {b: e - b for b, e in zip(bounds, bounds[1:])}
        policy = make_policy(config.policy, [span_key[b] for b in bounds[:-1]], config.max_num_batched_tokens)
        self.scheduler = Scheduler(config, self.kv, policy, span_key, self.router.forget)
        self.num_output_tokens = 0
        self.sum_exit_depth = 0
        self.seqs: dict[str, Sequence] = {}

    # ---- requests ------------------------------------------------------------------------------
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
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RecursaError("a text prompt needs a tokenizer; pass token ids or load a model directory with tokenizer.json")
            ids, text = self.tokenizer.encode(prompt), prompt
        else:
            ids, text = prompt, None
        self.router.check(params)
        ids = check_prompt(ids, self.model.cfg.vocab_size, self.max_model_len)
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
        self.output_processor.forget(request_id)
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---- the step ------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one span on its waiting tokens; outputs of the requests that got a token.

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
                    self.scheduler.remove(s)      # first: unverified drafts leave its tokens
                    outputs.append(self.output_processor.fail(s))
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
            self.router.enter(fresh)
        self.runner.run_span(group)
        done = self.router.arrive(group)
        ready = [(s, row) for s, row in done if row is not None]
        tokens = sample_rows_isolated(stack_rows([row for _, row in ready]), [s.params.temperature for s, _ in ready],
                             [s.params.top_k for s, _ in ready], [s.params.top_p for s, _ in ready],
                             [s.generator for s, _ in ready]) if ready else []
        for s, _ in done:
            s.num_cached = s.chunk_end
            s.end_chunk()
        sampled = {id(s): token for (s, _), token in zip(ready, tokens)}
        outputs = []
        for s, row in done:
            if row is not None and sampled[id(s)] is None:   # NaN/inf logits: this request ends, the batch goes on
                self.router.forget(s)                         # (unverified drafts are no output)
                outputs.append(self.output_processor.fail(s))
            else:   # the router says what is output now (a speculative draft waits for its verification)
                new = self.router.commit(s, sampled.get(id(s)))
                if not new:
                    continue
                self.num_output_tokens += len(new)
                self.sum_exit_depth += sum(d for _, d in new)
                outputs.append(self.output_processor.append(s, [t for t, _ in new], [d for _, d in new]))
            if s.finish_reason is not None:
                self.scheduler.remove(s)
                del self.seqs[s.request_id]
        return outputs

    def stats(self) -> dict:
        r = self.runner
        return {
            "span_runs": r.num_span_runs,
            "stage_runs": r.num_stage_runs,
            "stage_tokens": r.num_stage_tokens,
            "tokens_per_stage_run": r.num_stage_tokens / r.num_stage_runs if r.num_stage_runs else 0.0,
            "head_tokens": r.num_head_tokens,
            "output_tokens": self.num_output_tokens,
            "head_evals_per_token": r.num_head_tokens / self.num_output_tokens if self.num_output_tokens else 0.0,
            "mean_exit_depth": self.sum_exit_depth / self.num_output_tokens if self.num_output_tokens else 0.0,
            "model_depth": self.model.depth,
            "kv_entries_written": self.kv.entries_written,
            "preemptions": self.scheduler.num_preemptions,
            "kv_bytes_per_token": self.kv.kv_bytes_per_token,
            "kv_reserved_bytes_per_token": self.kv.reserved_bytes_per_token,
            "kv_written_bytes_per_token": self.kv.written_bytes_per_token,
            "kv_blocks": self.kv.num_blocks,
            "kv_free_blocks": self.kv.num_free_blocks,
            "kv_usage": self.kv.usage,
            "threads": torch.get_num_threads(),
            # recursa's C kernels (fused decode spans, AMX/GEMV matmuls): "on", or why the eager path runs instead
            "cpu_kernels": kernels.status(),
            **self.router.stats(),
        }
