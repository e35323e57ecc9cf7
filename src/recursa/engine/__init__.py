"""Inference: the one engine every model family and front end decodes through. The engine owns all
inference state (KV memory, requests, routing state); models stay stateless.

The data path of a request, in reading order:

    llm.py              LLM: generate(prompts, SamplingParams) -> [RequestOutput] (vLLM's offline API)
    llm_engine.py       LLMEngine: add_request / abort_request / step / has_unfinished (streaming); spans
    sequence.py         one request: tokens, block table, the chunk in flight; check_prompt
    scheduler.py        waiting/running queues, token and KV budgets, chunked prefill, preemption
    policy.py           which span group runs next: depth-wise continuous, fullest, or synchronous
    model_runner.py     embeds chunks, runs a span of depths on a packed batch, runs LM heads
    fused_decode.py     a decode span (or short chunks) in one C call, where its layers allow
    attention.py        per-request attention over the paged cache: batch metadata once per span
    kv_cache.py         the KV memory manager: blocks, byte budget, writes and reads, KV bytes per token
    depth_router.py     per family, where tokens go at span boundaries (full depth, early exit)
    mor_router.py       ... for Mixture-of-Recursions (per-token recursion depth, parked tokens)
    sampling.py         logits -> tokens, batched, per-row settings and seeds
    output_processor.py stop checks, incremental detokenization, streaming deltas
    config.py, sampling_params.py, outputs.py   the data types (EngineConfig, SamplingParams, RequestOutput)

Early exit:
    exit_policy.py      ExitPolicy (exits, confidence measure, threshold), the labelling rule
    thresholds.py       fixed, CALM's decaying, FREE's online Beta-mixture thresholds
    depth_router.py     EarlyExit: synchronized parallel decoding (exact KV), exit_strategy "parallel"
    state_copy.py       StateCopy: CALM's state copying (approximate KV), exit_strategy "copy"
    speculative.py      SelfSpeculative: draft at the exits, verify in one deep pass (lossless, greedy)
"""
