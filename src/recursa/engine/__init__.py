"""Inference: sampling and decoding. The engine owns all inference state; models stay stateless.

    llm.py             LLM: generate(prompts, SamplingParams) -> [RequestOutput]
    llm_engine.py      LLMEngine: add_request / abort_request / step / has_unfinished (streaming)
    scheduler.py       waiting/running queues, token and KV budgets, chunked prefill, preemption
    policy.py          which stage runs next: depth-wise continuous or synchronous
    model_runner.py    one stage on a packed batch of chunks, attention over the paged KV cache
    kv_cache.py        the KV memory manager (blocks, byte budget, KV bytes per token)
    sequence.py        one request's state; sampling_params.py, outputs.py, config.py: the data types
    generate.py        the single-request reference decoder; sampling.py: logits -> tokens
"""
