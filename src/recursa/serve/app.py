"""The OpenAI-compatible HTTP app: routes, authentication, errors the way OpenAI clients expect.

    app = build_app(LLM("models/smollm2-135m"), model_name="smollm2-135m", api_key="secret")
    uvicorn.run(app, host="127.0.0.1", port=8000)      # what `recursa serve` does

Routes: POST /v1/completions, POST /v1/chat/completions (both stream with `"stream": true`:
server-sent events, one JSON chunk per engine output, `data: [DONE]` last), GET /v1/models,
GET /health, GET /metrics (Prometheus), GET /openapi.json. With an API key, /v1/* want
`Authorization: Bearer KEY` (compared in constant time, never logged); /health and /metrics
stay open, as in vLLM. Every error is OpenAI's body `{"error": {"message", "type", "param",
"code"}}`: 400 bad input (validation included), 401, 404 (route or model), 413 (body over
max_request_bytes), 429 (queue full, with Retry-After), 503 (shutting down), 504 (timeout).
CORS is off unless allowed_origins is given.
"""
from __future__ import annotations

import asyncio
import hmac
import logging
import time
import uuid
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from recursa.errors import RecursaError
from recursa.serve import protocol as P
from recursa.serve.chat import CHATML, ChatTemplate
from recursa.serve.engine_loop import Closed, EngineLoop, QueueFull
from recursa.serve.metrics import Metrics
from recursa.serve.streaming import BodyLimit, EventStream, RequestFailed, collect, stream_events

log = logging.getLogger("recursa.serve")
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                413: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable", 504: "timeout"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None, headers=None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


def error_response(status: int, message: str, param=None, code=None, headers=None) -> JSONResponse:
    body = {"error": {"message": message, "type": _ERROR_TYPES.get(status, "server_error"), "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def _documented(kind):
    """OpenAPI responses of a generation route: the JSON body or, when streaming, an event stream."""
    errors = {s: {"model": P.ErrorResponse} for s in (400, 401, 404, 413, 429, 503, 504)}
    event = {"type": "object", "required": ["data"],   # one server-sent event (OpenAPI < 3.2: `schema` is per event)
             "properties": {"data": {"type": "string", "description": "a JSON chunk; `[DONE]` last"}}}
    return {200: {"model": kind, "content": {"text/event-stream": {"schema": event}}}, **errors}


def build_app(engine, *, model_name: str, chat_template: ChatTemplate | None = None, api_key: str | None = None,
              max_queue_len: int = 256, request_timeout: float | None = None, allowed_origins=(),
              max_request_bytes: int = 2**20) -> FastAPI:
    """The app around an LLMEngine (or recursa.LLM); the engine thread starts and stops with the app."""
    metrics = Metrics(engine.model.depth)
    loop = EngineLoop(engine, max_queue_len=max_queue_len, request_timeout=request_timeout, metrics=metrics)
    template = chat_template or ChatTemplate(CHATML, fallback=True)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        loop.start(asyncio.get_running_loop())
        yield
        loop.close()

    app = FastAPI(title="recursa", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible completions and chat over recursa's depth-wise batching engine")
    app.state.engine_loop, app.state.metrics = loop, metrics
    if allowed_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(allowed_origins), allow_methods=["*"], allow_headers=["*"])
    app.add_middleware(BodyLimit, max_bytes=max_request_bytes,
                       reject=lambda: error_response(413, f"request body over {max_request_bytes} bytes"))

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return error_response(e.status, e.message, e.param, e.code, e.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        return error_response(400, f"{where or 'body'}: {first.get('msg', 'invalid request')}", param=where or None)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, e: StarletteHTTPException):
        return error_response(e.status_code, str(e.detail), headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def _bug(request, e: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return error_response(500, "internal server error")

    bearer = HTTPBearer(auto_error=False)

    async def authorize(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)):
        if api_key is None:
            return
        given = credentials.credentials if credentials is not None else ""
        if not hmac.compare_digest(given.encode(), api_key.encode()):
            raise APIError(401, "invalid or missing API key (Authorization: Bearer KEY)", code="invalid_api_key")

    def check(body: P._SamplingRequest) -> None:
        if body.model is not None and body.model != model_name:
            raise APIError(404, f"the model `{body.model}` does not exist; this server serves `{model_name}`",
                           param="model", code="model_not_found")
        reason = body.unsupported()
        if reason:
            raise APIError(400, reason)

    async def serve(request: Request, body, kind: str, prompts: list, default_max_tokens: int):
        try:
            params = body.sampling_params(default_max_tokens)
        except RecursaError as e:
            raise APIError(400, str(e)) from None
        ticket_id = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        try:
            ticket = loop.submit(ticket_id, prompts, params)
        except QueueFull as e:
            raise APIError(429, str(e), headers={"Retry-After": "1"}) from None
        except Closed as e:
            raise APIError(503, str(e)) from None
        streaming = False
        try:
            event = await ticket.events.get()
            if event[0] == "error":
                raise APIError(event[1], event[2])
            headers = {"X-Request-Id": request.headers.get("x-request-id") or ticket_id}
            head = dict(id=ticket_id, created=int(time.time()), model=model_name)
            if body.stream:
                usage = body.stream_options is not None and body.stream_options.include_usage
                streaming = True   # from here the response aborts the ticket when it ends
                return EventStream(stream_events(ticket, head, kind, usage), on_close=lambda: loop.abort(ticket),
                                   headers=headers)
            result = await collect(request, ticket, head, kind)
        except RequestFailed as e:
            raise APIError(e.status, e.message) from None
        finally:
            if not streaming:   # done, failed, cancelled or the client left: a no-op for a finished ticket
                loop.abort(ticket)
        if result is None:   # the client went away: nobody reads this
            return Response(status_code=499)
        return JSONResponse(result, headers=headers)

    @app.post("/v1/completions", responses=_documented(P.CompletionResponse), dependencies=[Depends(authorize)])
    async def completions(body: P.CompletionRequest, request: Request):
        check(body)
        try:
            prompts = body.prompts()
        except RecursaError as e:
            raise APIError(400, str(e), param="prompt") from None
        return await serve(request, body, "completion", prompts, 16)

    @app.post("/v1/chat/completions", responses=_documented(P.ChatCompletionResponse), dependencies=[Depends(authorize)])
    async def chat_completions(body: P.ChatCompletionRequest, request: Request):
        check(body)
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        try:
            prompt = template.render(messages, body.add_generation_prompt)
        except RecursaError as e:
            raise APIError(400, str(e), param="messages") from None
        if body.max_completion_tokens is not None:
            body.max_tokens = body.max_completion_tokens
        return await serve(request, body, "chat", [prompt], engine.max_model_len)

    @app.get("/v1/models", response_model=P.ModelList, dependencies=[Depends(authorize)])
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "recursa", "max_model_len": engine.max_model_len}]}

    @app.get("/health", response_class=Response, responses={200: {"description": "serving (empty body)"},
                                                            503: {"description": "the engine thread has stopped"}})
    async def health():
        return Response(status_code=200 if loop.alive else 503)

    @app.get("/metrics", response_class=PlainTextResponse, responses={200: {"description": "Prometheus text format"}})
    async def prometheus():
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    def openapi():
        """FastAPI's spec, with `model` restricted to the served name and no 422 (validation errors are 400)."""
        if app.openapi_schema is None:
            spec = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            for name in ("CompletionRequest", "ChatCompletionRequest"):
                spec["components"]["schemas"][name]["properties"]["model"]["anyOf"][0]["enum"] = [model_name]
            for path in spec["paths"].values():
                for op in path.values():
                    op["responses"].pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                spec["components"]["schemas"].pop(name, None)
            app.openapi_schema = spec
        return app.openapi_schema

    app.openapi = openapi
    return app
