"""From sampled tokens to what a user sees: stop checks, incremental detokenization, streaming deltas.

Detokenization is incremental: each new token decodes only a short window (the tokens since the
last committed text, plus one before them for context), so a request's text costs O(tokens), not
O(tokens²) as re-decoding the whole output every step would. Characters that are not final yet
are held back: a trailing partial UTF-8 sequence ("\\ufffd") until its next byte arrives, and the
last len(stop) - 1 characters while a stop string could still complete. Text ends before the
first stop string; an EOS or stop token ends it and is not part of it.

    out = processor.append(seq, [token], [depth])   # -> RequestOutput with the delta since the previous one
"""
from __future__ import annotations

from dataclasses import dataclass

from recursa.engine.outputs import RequestOutput
from recursa.engine.sequence import Sequence


@dataclass(slots=True)
class _Text:
    text: str = ""          # committed text (stop strings cut off)
    prefix: int = 0         # output index where the decoding window starts
    read: int = 0           # output tokens whose text is committed
    sent_tokens: int = 0    # streaming cursors: what earlier deltas carried
    sent_chars: int = 0


class OutputProcessor:
    def __init__(self, tokenizer, eos_id: int | None, max_model_len: int):
        self.tokenizer, self.eos_id, self.max_model_len = tokenizer, eos_id, max_model_len
        self._text: dict[str, _Text] = {}

    def forget(self, request_id: str) -> None:
        self._text.pop(request_id, None)

    def append(self, seq: Sequence, tokens: list[int], depths: list[int]) -> RequestOutput:
        """Add sampled `tokens` to seq in order (with the depth behind each), deciding after each whether
        it finished (the rest are dropped then), and return its output."""
        st = self._text.setdefault(seq.request_id, _Text())
        for token, depth in zip(tokens, depths):
            seq.token_ids.append(token)
            seq.depths.append(depth)
            out_ids = seq.output_token_ids
            reason = self.reason(seq, token)
            text_end = len(out_ids) - (reason == "stop")
            if self._commit(st, out_ids[:text_end], reason is not None, seq.params.stop):
                reason = "stop"
            seq.finish_reason = reason
            if reason is not None:
                break
        return self._output(seq, st)

    def reason(self, seq: Sequence, token: int) -> str | None:
        """Why seq ends with `token` as its newest token ("stop", "length"), stop strings aside; None if it goes on."""
        p = seq.params
        if (token == self.eos_id and not p.ignore_eos) or token in p.stop_token_ids:
            return "stop"
        if len(seq.output_token_ids) >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            return "length"
        return None

    def fail(self, seq: Sequence) -> RequestOutput:
        """seq ends with finish_reason "error" (its logits could not be sampled, or its step raised)."""
        seq.finish_reason = "error"
        return self._output(seq, self._text.setdefault(seq.request_id, _Text()))

    def _commit(self, st: _Text, ids: list[int], final: bool, stops: list[str]) -> bool:
        """Commit the text of ids[st.read:]; True when a stop string ends it."""
        if self.tokenizer is None or len(ids) <= st.read:
            return False
        before = self.tokenizer.decode(ids[st.prefix:st.read])
        after = self.tokenizer.decode(ids[st.prefix:])
        if after.endswith("\ufffd") and not final:
            return False                   # a character is still incomplete: wait for its next byte
        start = len(st.text)
        st.text += after[len(before):]
        st.prefix, st.read = max(st.read - 1, 0), len(ids)
        return bool(stops) and self._cut_at_stop(st, start, stops)

    @staticmethod
    def _cut_at_stop(st: _Text, start: int, stops: list[str]) -> bool:
        longest = max(map(len, stops))
        lo = max(0, start - longest + 1)
        hits = [i for i in (st.text.find(s, lo) for s in stops) if i >= 0]
        if hits:
            st.text = st.text[:min(hits)]
            return True
        return False

    def _output(self, seq: Sequence, st: _Text) -> RequestOutput:
        finished = seq.finish_reason is not None
        end = len(st.text)
        if not finished:  # hold back what a stop string may still change
            end -= max((len(x) for x in seq.params.stop), default=1) - 1
        end = max(end, st.sent_chars)
        out_ids = seq.output_token_ids
        out = RequestOutput(seq.request_id, seq.prompt, seq.prompt_token_ids, out_ids, st.text, finished,
                            seq.finish_reason, out_ids[st.sent_tokens:], st.text[st.sent_chars:end], list(seq.depths))
        st.sent_tokens, st.sent_chars = len(out_ids), end
        if finished:
            self.forget(seq.request_id)
        return out
