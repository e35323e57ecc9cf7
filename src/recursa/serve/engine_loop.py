"""The engine loop: one background thread owns the LLMEngine; HTTP handlers talk to it by queue.

    loop = EngineLoop(engine, max_queue_len=256, request_timeout=600)
    loop.start(asyncio.get_running_loop())
    ticket = loop.submit("cmpl-1", ["Once upon a time"], SamplingParams(max_tokens=32))  # QueueFull -> 429
    while True:
        event = await ticket.events.get()   # ("accepted",) | ("output", index, RequestOutput) | ("error", status, msg)

Only this thread calls the engine (add_request, abort_request, step), so the engine needs no
locks. Handlers put "add" and "abort" messages on a thread-safe inbox; the thread drains it
between steps, runs a step, and hands every output of the step to the event loop in one
`call_soon_threadsafe` call, which fills each request's asyncio queue. A ticket is one HTTP
request: one engine request per prompt, one queue.

- Admission: at most `max_num_seqs + max_queue_len` engine requests are in the server at once;
  a submit beyond that raises QueueFull (the handler answers 429 with Retry-After).
- A bad request (the engine's RecursaError from add_request) fails alone with a 400 event.
- Abort (client gone) and timeout drop the request from the engine at once, freeing its KV.
- A step that raises fails the requests in flight (a 500 event, the traceback goes to the log,
  not to clients); the loop and the engine go on serving new requests.
- close() ends every remaining request (503) and joins the thread; the server drains first
  (uvicorn waits for open responses on SIGTERM before the app shuts down).
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

from recursa.engine.sampling_params import SamplingParams
from recursa.errors import RecursaError

log = logging.getLogger("recursa.serve")
GAUGE_PERIOD = 0.1   # seconds between metric gauge updates and timeout checks


class QueueFull(Exception):
    """The server holds as many requests as it may; retry later."""


class Closed(Exception):
    """The server is shutting down."""


@dataclass(eq=False)
class Ticket:
    id: str
    prompts: list
    params: SamplingParams
    arrival: float
    deadline: float | None
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    live: set = field(default_factory=set)   # engine thread only: its engine requests still running


@dataclass(slots=True, eq=False)
class _Request:
    ticket: Ticket
    index: int
    last: float | None = None   # time of its latest token


def _put_all(batch: list) -> None:
    for q, event in batch:
        q.put_nowait(event)


class EngineLoop:
    def __init__(self, engine, *, max_queue_len: int = 256, request_timeout: float | None = None, metrics=None):
        self.engine, self.metrics, self.request_timeout = engine, metrics, request_timeout
        self.capacity = engine.config.max_num_seqs + max_queue_len
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._num_live = 0        # engine requests submitted and not yet ended (guarded by _lock)
        self._closed = False
        self._requests: dict[str, _Request] = {}   # engine thread only
        self._tickets: dict[str, Ticket] = {}      # engine thread only
        self._outbox: list = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._run, name="recursa-engine", daemon=True)
        self.num_aborted = self.num_timed_out = self.num_failed = 0

    # ---- called from the event loop ---------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._thread.start()

    @property
    def num_live(self) -> int:
        return self._num_live

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, ticket_id: str, prompts: list, params: SamplingParams) -> Ticket:
        with self._lock:
            if self._closed:
                raise Closed("the server is shutting down")
            if self._num_live + len(prompts) > self.capacity:
                raise QueueFull(f"the server holds {self._num_live} requests (limit {self.capacity}); retry later")
            self._num_live += len(prompts)
        now = time.monotonic()
        deadline = now + self.request_timeout if self.request_timeout else None
        ticket = Ticket(ticket_id, prompts, params, now, deadline)
        self._inbox.put(("add", ticket))
        return ticket

    def abort(self, ticket: Ticket) -> None:
        """Drop the ticket's requests (a no-op once they have finished)."""
        self._inbox.put(("abort", ticket))

    def close(self, timeout: float = 10.0) -> None:
        with self._lock:
            self._closed = True
        self._inbox.put(("stop", None))
        if self._thread.is_alive():
            self._thread.join(timeout)

    # ---- the engine thread ------------------------------------------------------------------
    def _run(self) -> None:
        engine, next_check = self.engine, 0.0
        while True:
            busy = engine.has_unfinished()
            messages = []
            try:
                if not busy:
                    messages.append(self._inbox.get(timeout=GAUGE_PERIOD))
                while True:
                    messages.append(self._inbox.get_nowait())
            except queue.Empty:
                pass   # the inbox is drained: go on with what arrived
            for kind, ticket in messages:
                if kind == "add":
                    self._add(ticket)
                elif kind == "abort":
                    if ticket.id in self._tickets:
                        self.num_aborted += 1
                        self._end(ticket, None, "abort")
                else:
                    for t in list(self._tickets.values()):
                        self._end(t, (503, "the server is shutting down"), "error")
                    self._flush()
                    return
            if engine.has_unfinished():
                try:
                    outputs = engine.step()
                except Exception:
                    log.exception("engine step failed; ending the requests in flight")
                    self.num_failed += len(self._tickets)
                    for t in list(self._tickets.values()):
                        self._end(t, (500, "the engine failed while running this request"), "error")
                    outputs = []
                self._deliver(outputs)
            now = time.monotonic()
            if now >= next_check:
                next_check = now + GAUGE_PERIOD
                self._expire(now)
                if self.metrics is not None:
                    self.metrics.update(engine, max(0, self._num_live - len(engine.scheduler.running)))
            self._flush()

    def _add(self, ticket: Ticket) -> None:
        added = []
        try:
            for i, prompt in enumerate(ticket.prompts):
                rid = f"{ticket.id}-{i}"
                self.engine.add_request(rid, prompt, ticket.params)
                added.append(rid)
        except RecursaError as e:
            self._reject(ticket, added, 400, str(e))
            return
        except Exception:   # the engine's own bug: log it, answer without the details
            log.exception("add_request failed")
            self._reject(ticket, added, 500, "the engine could not take this request")
            return
        self._tickets[ticket.id] = ticket
        for i, rid in enumerate(added):
            self._requests[rid] = _Request(ticket, i)
            ticket.live.add(rid)
        self._emit(ticket, ("accepted",))

    def _reject(self, ticket: Ticket, added: list[str], status: int, message: str) -> None:
        for rid in added:
            self.engine.abort_request(rid)
        self._release(len(ticket.prompts))
        self._emit(ticket, ("error", status, message))

    def _deliver(self, outputs) -> None:
        now, metrics = time.monotonic(), self.metrics
        for out in outputs:
            req = self._requests.get(out.request_id)
            if req is None:
                continue
            ticket, n = req.ticket, len(out.delta_token_ids)
            if metrics is not None and n:
                if req.last is None:
                    metrics.ttft.observe(now - ticket.arrival)
                else:
                    metrics.itl.observe((now - req.last) / n)
                metrics.count_tokens(len(out.prompt_token_ids) if req.last is None else 0, n)
                metrics.observe_depths(out.exit_depths[-n:])
            req.last = now
            self._emit(ticket, ("output", req.index, out))
            if out.finished:
                del self._requests[out.request_id]
                ticket.live.discard(out.request_id)
                self._release(1)
                if metrics is not None:
                    metrics.success.labels(out.finish_reason or "stop").inc()
                    metrics.e2e.observe(now - ticket.arrival)
                if not ticket.live:
                    del self._tickets[ticket.id]

    def _expire(self, now: float) -> None:
        for t in [t for t in self._tickets.values() if t.deadline is not None and now > t.deadline]:
            self.num_timed_out += 1
            self._end(t, (504, f"the request took longer than the server's timeout of {self.request_timeout:g}s"),
                      "timeout")

    def _end(self, ticket: Ticket, error: tuple[int, str] | None, kind: str) -> None:
        """Drop a ticket's running requests from the engine (freeing their KV); tell the client if error."""
        for rid in ticket.live:
            self.engine.abort_request(rid)
            del self._requests[rid]
        self._release(len(ticket.live))
        ticket.live.clear()
        self._tickets.pop(ticket.id, None)
        if self.metrics is not None:
            (self.metrics.success.labels("abort") if kind == "abort" else self.metrics.errors.labels(kind)).inc()
        if error is not None:
            self._emit(ticket, ("error", *error))

    def _release(self, n: int) -> None:
        with self._lock:
            self._num_live -= n

    def _emit(self, ticket: Ticket, event: tuple) -> None:
        self._outbox.append((ticket.events, event))

    def _flush(self) -> None:
        if self._outbox:
            batch, self._outbox = self._outbox, []
            try:
                self._loop.call_soon_threadsafe(_put_all, batch)
            except RuntimeError:   # the event loop is closed: nobody is listening any more
                pass
