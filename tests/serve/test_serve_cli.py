"""`recursa serve` as users run it: a subprocess on a loopback port that drains on SIGTERM
(the running stream finishes, the process exits 0) and never prints its API key."""
import json
import signal
import socket
import subprocess
import sys

import httpx
import pytest

from recursa.cli import main


def test_bad_arguments_are_one_line_errors(tmp_path, capsys):
    assert main(["serve", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "recursa serve: error" in err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_subprocess_drains_on_sigterm(model_dir):
    port, key = _free_port(), "k3y-never-logged"
    proc = subprocess.Popen([sys.executable, "-m", "recursa.cli", "serve", str(model_dir), "--port", str(port),
                             "--api-key", key, "--threads", "1", "--max-num-seqs", "4", "--served-model-name", "tiny"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url, out = f"http://127.0.0.1:{port}", []
    try:
        for line in proc.stdout:   # up once uvicorn says so; a server that dies ends the loop
            out.append(line)
            if "Uvicorn running on" in line:
                break
        assert proc.poll() is None, "".join(out)
        body = {"model": "tiny", "prompt": "the cat", "max_tokens": 30, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}
        events = []
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60,
                          headers={"Authorization": f"Bearer {key}"}) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                events.append(line[6:])
                if len(events) == 2:
                    proc.send_signal(signal.SIGTERM)   # mid-stream: the server drains this request
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["usage"]["completion_tokens"] == 30
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        out = "".join(out) + proc.communicate()[0]
    assert key not in out and "Traceback" not in out
