"""Engine settings: one dataclass whose field names are vLLM's engine arguments where they exist.

`policy` picks which stage runs next (engine/policy.py): "depthwise" (continuous depth-wise
batching: stages run in a sweep, new tokens enter every step), "fullest" (run the stage with the
most waiting tokens) or "synchronous" (a batch steps through all depths together; new tokens
wait until it has exited). `compile` runs each span through torch.compile (inductor; on CPU it
fuses the norms, rotary and activation ops between the matmuls, one graph per span): it costs minutes of compile
time at the first steps, so it is off unless asked for (benchmarks/RESULTS.md has the figures).

`exit_strategy` says how tokens that exit early (with an exit policy) leave the deeper layers' K/V:
"parallel" (synchronized parallel decoding, exact: depth_router.EarlyExit), "copy" (CALM's state
copying, approximate: state_copy.py) or "speculative" (self-speculative draft-and-verify, lossless,
greedy only: speculative.py, at most `max_draft` drafts per verification).
"""
from __future__ import annotations

from dataclasses import dataclass

from recursa.errors import RecursaError

POLICIES = ("depthwise", "fullest", "synchronous")
EXIT_STRATEGIES = ("parallel", "copy", "speculative")


@dataclass(slots=True)
class EngineConfig:
    max_num_seqs: int = 256               # requests holding KV at once
    max_num_batched_tokens: int = 1024    # tokens per stage run (prefill chunks + decode tokens)
    max_model_len: int | None = None      # default: the model's max_seq_len
    block_size: int = 16                  # tokens per KV block
    kv_cache_memory: int | None = None    # bytes for all KV blocks; default min(needed, 512 MiB)
    policy: str = "depthwise"
    compile: bool = False                 # torch.compile each span's forward (dynamic token counts); minutes to compile
    exit_strategy: str = "parallel"       # with an exit policy: parallel, copy or speculative
    max_draft: int = 4                    # speculative: drafts per verification pass

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size", "max_draft"):
            if getattr(self, name) < 1:
                raise RecursaError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise RecursaError(f"max_model_len must be >= 2, got {self.max_model_len}")
        if self.kv_cache_memory is not None and self.kv_cache_memory < 1:
            raise RecursaError(f"kv_cache_memory must be a positive number of bytes, got {self.kv_cache_memory}")
        if self.policy not in POLICIES:
            raise RecursaError(f"unknown policy {self.policy!r}; choose one of {', '.join(POLICIES)}")
        if self.exit_strategy not in EXIT_STRATEGIES:
            raise RecursaError(f"unknown exit strategy {self.exit_strategy!r}; choose one of {', '.join(EXIT_STRATEGIES)}")
