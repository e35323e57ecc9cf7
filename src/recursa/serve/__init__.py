"""recursa's OpenAI-compatible server: `recursa serve MODEL_DIR` (cli/serve.py) or build_app().

    protocol.py     request/response bodies (pydantic; they write /openapi.json)
    chat.py         chat messages -> prompt with the model's Jinja chat template
    engine_loop.py  the one thread that owns the engine; queues to and from the handlers
    streaming.py    engine outputs -> SSE chunks / JSON answers; disconnect and body-size guards
    metrics.py      Prometheus figures (vLLM's names, recursa's depth figures)
    app.py          the FastAPI routes, API key, OpenAI error bodies
"""
from recursa.serve.app import build_app

__all__ = ["build_app"]
