"""A tiny random model with a small BPE tokenizer and a chat template, and a real uvicorn server
on an ephemeral loopback port (a thread of the test process, so tests can look at its engine)."""
import contextlib
import socket
import threading
import time

import pytest

pytest.importorskip("fastapi")
import uvicorn  # noqa: E402

from recursa import LLM  # noqa: E402
from recursa.serve import build_app  # noqa: E402
from recursa.serve.chat import ChatTemplate  # noqa: E402
from tiny_models import save_tiny_text_model  # noqa: E402

# differs from the ChatML fallback, so the tests see that the model's own template is used
TEMPLATE = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}[assistant] {% endif %}")
ENGINE = dict(kv_cache_memory=2**22, max_num_batched_tokens=256)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    path = save_tiny_text_model(tmp_path_factory.mktemp("serve-model"))
    (path / "chat_template.jinja").write_text(TEMPLATE)
    return path


@pytest.fixture(scope="session")
def reference(model_dir):
    """An offline LLM on the same model: what the server must reproduce."""
    return LLM(model_dir, **ENGINE)


class Server:
    """uvicorn serving `app` on 127.0.0.1:<free port> in a thread; `.url`, `.loop` (EngineLoop), `.engine`."""

    def __init__(self, app):
        self.app = app
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.loop = app.state.engine_loop
        self.engine = self.loop.engine

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(30)

    def idle(self, timeout: float = 30.0) -> bool:
        """Wait until no request is left in the server (the engine holds no KV)."""
        deadline = time.monotonic() + timeout
        while self.loop.num_live or self.engine.has_unfinished():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True


@contextlib.contextmanager
def serving(model_dir, *, step_delay: float = 0.0, engine_args=None, **app_args):
    engine = LLM(model_dir, **{**ENGINE, **(engine_args or {})})
    if step_delay:   # a slow engine, so that requests are surely in flight when the test acts
        step = engine.step
        engine.step = lambda: (time.sleep(step_delay), step())[1]
    app = build_app(engine, model_name="tiny", chat_template=ChatTemplate.from_dir(model_dir), **app_args)
    with Server(app) as server:
        yield server


@pytest.fixture(scope="module")
def server(model_dir):
    with serving(model_dir) as s:
        yield s
