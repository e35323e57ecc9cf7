"""What the engine hands back: per request, cumulative output plus the delta since last time."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    token_ids: list[int]                 # all output tokens so far
    text: str                            # their text (stop string and stop token left out)
    finished: bool = False
    finish_reason: str | None = None     # "stop" (eos, stop id or stop string), "length", or "error" (failed in the engine)
    delta_token_ids: list[int] = field(default_factory=list)   # new since the previous step's output
    delta_text: str = ""
    exit_depths: list[int] = field(default_factory=list)      # per output token: depth (stage passes) behind it
