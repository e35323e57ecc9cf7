"""Engine outputs -> OpenAI bodies: SSE chunks while streaming, one JSON answer otherwise.

Also the two ASGI pieces the app needs: `EventStream`, a streaming response that calls
`on_close` however it ends (done, client gone, server stopping) so the request leaves the
engine at once, and `BodyLimit`, which answers 413 before a large body reaches FastAPI.
"""
from __future__ import annotations

import asyncio
import json

import anyio
from starlette.responses import StreamingResponse

DONE = "data: [DONE]\n\n"


class RequestFailed(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


async def stream_events(ticket, head: dict, kind: str, include_usage: bool):
    """SSE lines for one ticket: a chunk per engine output, usage last if asked, then [DONE].

    Outputs that queued up while the client was being served go out in one write (under load,
    fewer and larger sends); each is still its own `data:` event.
    """
    n = len(ticket.prompts)
    prompt_tokens, completion_tokens, started = [0] * n, [0] * n, [False] * n
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
    prefix = (f'data: {{"id":"{head["id"]}","object":"{obj}","created":{head["created"]},'
              f'"model":{json.dumps(head["model"])},')
    suffix = ',"usage":null}\n\n' if include_usage else "}\n\n"
    remaining, events = n, ticket.events
    while remaining:
        pending = [await events.get()]
        while not events.empty():
            pending.append(events.get_nowait())
        lines = []
        for event in pending:
            if event[0] == "error":
                lines.append(_sse({"error": {"message": event[2], "type": "server_error", "param": None,
                                             "code": event[1]}}) + DONE)
                yield "".join(lines)
                return
            _, i, out = event
            k = len(out.delta_token_ids)
            prompt_tokens[i], completion_tokens[i] = len(out.prompt_token_ids), len(out.token_ids)
            remaining -= out.finished
            depths = out.exit_depths[-k:] if k else []
            if kind == "chat":
                delta = {"content": out.delta_text} if started[i] else {"role": "assistant", "content": out.delta_text}
                started[i] = True
                choice = {"index": i, "delta": delta, "logprobs": None, "finish_reason": out.finish_reason,
                          "exit_depths": depths}
            else:
                choice = {"index": i, "text": out.delta_text, "logprobs": None, "finish_reason": out.finish_reason,
                          "exit_depths": depths}
            lines.append(f'{prefix}"choices":[{json.dumps(choice, separators=(",", ":"))}]{suffix}')
        yield "".join(lines)
    if include_usage:
        yield _sse({"id": head["id"], "object": obj, "created": head["created"], "model": head["model"],
                    "choices": [], "usage": _usage(sum(prompt_tokens), sum(completion_tokens))})
    yield DONE


async def _finals(ticket) -> list:
    finals, remaining = [None] * len(ticket.prompts), len(ticket.prompts)
    while remaining:
        event = await ticket.events.get()
        if event[0] == "error":
            raise RequestFailed(event[1], event[2])
        _, i, out = event
        if out.finished:
            finals[i], remaining = out, remaining - 1
    return finals


async def _disconnect(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass   # other ASGI messages (request body chunks) are not ours to handle


async def collect(request, ticket, head: dict, kind: str) -> dict | None:
    """The whole answer of a non-streaming request; None if the client went away first."""
    finals = asyncio.ensure_future(_finals(ticket))
    gone = asyncio.ensure_future(_disconnect(request.receive))
    try:
        await asyncio.wait({finals, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        left = not finals.done()   # the client went first (or this handler was cancelled)
        if left:
            finals.cancel()
    if left:
        return None
    outs = finals.result()
    if kind == "chat":
        choices = [{"index": i, "message": {"role": "assistant", "content": o.text}, "logprobs": None,
                    "finish_reason": o.finish_reason, "exit_depths": o.exit_depths} for i, o in enumerate(outs)]
    else:
        choices = [{"index": i, "text": o.text, "logprobs": None, "finish_reason": o.finish_reason,
                    "exit_depths": o.exit_depths} for i, o in enumerate(outs)]
    return {"id": head["id"], "object": "chat.completion" if kind == "chat" else "text_completion",
            "created": head["created"], "model": head["model"], "choices": choices,
            "usage": _usage(sum(len(o.prompt_token_ids) for o in outs), sum(len(o.token_ids) for o in outs))}


class EventStream(StreamingResponse):
    """text/event-stream that watches for the client leaving and always calls on_close at the end."""

    def __init__(self, content, on_close, headers=None):
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache", **(headers or {})})
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            async with anyio.create_task_group() as tg:
                async def respond():
                    try:
                        await self.stream_response(send)
                    except OSError:   # the connection broke while sending
                        pass
                    tg.cancel_scope.cancel()

                tg.start_soon(respond)
                await _disconnect(receive)
                tg.cancel_scope.cancel()
        finally:
            self.on_close()


class BodyLimit:
    """ASGI middleware: a request body over max_bytes gets reject() (a 413 response) unread."""

    def __init__(self, app, max_bytes: int, reject):
        self.app, self.max_bytes, self.reject = app, max_bytes, reject

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            return await self.reject()(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return   # the client left before sending its body
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await self.reject()(scope, receive, send)
            more = message.get("more_body", False)
        replay = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replayed():
            return replay.pop() if replay else await receive()

        await self.app(scope, replayed, send)
