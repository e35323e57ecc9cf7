"""`recursa.LLM`: the offline front end of the engine, with vLLM's names.

    from recursa import LLM, SamplingParams
    llm = LLM("models/smollm2-135m")                       # a model directory, or a Decoder
    for out in llm.generate(["Once upon a time", "The sea"], SamplingParams(temperature=0, max_tokens=32)):
        print(out.text, out.finish_reason)

`dtype` ("bfloat16" | "float32") and `quantization` (None | "int8" | "int4", weight-only) prepare
the model for inference first (recursa.model.quant.prepare: fused q/k/v and gate/up, the compute
dtype, quantized projections and LM head; the KV cache takes the compute dtype); a Decoder passed
in is converted in place. With "int4", a model directory holding int4.safetensors (`recursa models
fetch --keep-int4`) uses those blocks as they are (SmolLM2's own Q4_1) instead of re-quantizing.
`head_quantization` ("int8" | "int4") quantizes the LM head too (it keeps the compute dtype by
default); "int8" is what SmolLM2's GGUF holds for its head (Q8_0), at +0.1% perplexity.

Keyword arguments are EngineConfig's (max_num_seqs, max_num_batched_tokens, max_model_len,
block_size, kv_cache_memory, policy, exit_strategy, max_draft); `exit_policy` (an
exit_policy.ExitPolicy) turns on early exit for a model with exits, decoded at any batch size;
`exit_strategy` picks how exited tokens' deeper K/V come about: "parallel" (exact, default),
"copy" (approximate) or "speculative" (draft-and-verify, lossless, greedy). The streaming
interface (add_request, abort_request, step, has_unfinished) is LLMEngine's, for servers.
"""
from __future__ import annotations

import itertools
import os
from pathlib import Path

from recursa.engine.config import EngineConfig
from recursa.engine.llm_engine import LLMEngine
from recursa.engine.outputs import RequestOutput
from recursa.engine.sampling_params import SamplingParams
from recursa.errors import RecursaError
from recursa.model import quant
from recursa.model.decoder import Decoder, load


class LLM(LLMEngine):
    def __init__(self, model: Decoder | str | os.PathLike, tokenizer=None, exit_policy=None, dtype=None,
                 quantization: str | None = None, head_quantization: str | None = None, **engine_args):
        directory = None
        if isinstance(model, (str, os.PathLike)):
            directory = Path(model)
            model = load(directory)
            if tokenizer is None and (directory / "tokenizer.json").is_file():
                from recursa.data.tokenizer import load_tokenizer

                tokenizer = load_tokenizer(directory)
        elif not isinstance(model, Decoder):
            raise RecursaError(f"LLM takes a model directory or a recursa Decoder, not {type(model).__name__}")
        # a model the engine loaded itself is its own: fuse its projections even in full precision; a
        # Decoder passed in is only changed (in place) when a dtype or quantization asks for it
        if directory is not None or dtype is not None or quantization is not None or head_quantization is not None:
            model = quant.prepare(model, dtype, quantization, int4_weights=directory, head=head_quantization or False)
        super().__init__(model, tokenizer, EngineConfig(**engine_args), exit_policy)
        self._ids = itertools.count()

    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None) -> list[RequestOutput]:
        """Run prompts (a string, a token-id list, or a list of either) to completion, all at once.

        Returns one finished RequestOutput per prompt, in prompt order.
        """
        if isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        params = sampling_params if isinstance(sampling_params, (list, tuple)) else [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise RecursaError(f"{len(params)} sampling params for {len(prompts)} prompts")
        ids = [f"generate-{next(self._ids)}" for _ in prompts]
        for request_id, prompt, p in zip(ids, prompts, params):
            try:
                self.add_request(request_id, prompt, p)
            except RecursaError:
                for added in ids:
                    self.abort_request(added)
                raise
        results: dict[str, RequestOutput] = {}
        while self.has_unfinished() and len(results) < len(ids):
            for out in self.step():
                if out.finished:
                    results[out.request_id] = out
        return [results[i] for i in ids]

    def warm_up(self, new_tokens: int = 4) -> None:
        """Run every kind of step once, so that a compiled engine (compile=True) compiles now, not
        inside its first requests: one request alone with a short prompt (a chunk that attends in
        place), one past `attention.IN_PLACE_WORK` (the padded attention) and
        one past `kernels.AMX_MAX_ROWS` tokens (the projections pick their kernel by token count, and
        each choice is its own graph), then a small batch and a full one (up to max_num_seqs, past
        AMX_MAX_ROWS decode rows where it allows). Eager engines gain little from it. Synthetic
        token ids; nothing stays in flight (the KV blocks are freed)."""
        from math import isqrt

        from recursa.engine.attention import IN_PLACE_WORK
        from recursa.kernels import AMX_MAX_ROWS

        vocab, room = self.model.cfg.vocab_size, self.max_model_len - new_tokens
        params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)

        def prompt(i: int, n: int) -> list[int]:
            return [1 + (i * 7919 + j * 104729) % (vocab - 1) for j in range(max(1, min(n, room)))]

        many = min(self.config.max_num_seqs, AMX_MAX_ROWS + 8)
        for batch in ([prompt(0, 12)], [prompt(2, isqrt(IN_PLACE_WORK) + 8)], [prompt(1, AMX_MAX_ROWS + 8)],
                      [prompt(i, 8 + i) for i in range(3)],
                      [prompt(i, 4 + i % 8) for i in range(many)]):   # short: all admitted in one step
            self.generate(batch, params)
