"""Run several `recursa` command lines in one child process, through the real entry point.

    python tests/cli/run_many.py CASES.json     # [{"argv": [...], "fsize": ..., "signal": ...}, ...]

Each case calls `recursa.cli.main(argv)` (what the `recursa` script runs) with its own captured
stdout and stderr, and optionally
- "fsize": a lowered RLIMIT_FSIZE (files past that size fail to write with EFBIG, a real write
  error from safetensors / torch.save / open, standing in for a full disk);
- "signal": [signum, n, path]: a real signal sent to this process once `path` has n lines (a
  watcher thread polls it; Python runs the handler in the main thread, as for a Ctrl-C).
An exception that escapes main() is printed as the interpreter would (a traceback) with exit 1.
One Python + torch import serves every case: on a busy 2-core machine the import alone costs
seconds. Prints one JSON list of {"rc", "out", "err", "seconds"}.
"""
import contextlib
import io
import json
import os
import resource
import signal
import sys
import threading
import time
import traceback

from recursa.cli import main


def _signal_when(signum: int, n_lines: int, path: str, done: threading.Event) -> None:
    while not done.is_set():
        try:
            with open(path) as f:
                if len(f.read().splitlines()) >= n_lines:
                    os.kill(os.getpid(), signum)
                    return
        except OSError:
            pass   # the metrics file is not there yet: poll again
        time.sleep(0.02)


def run(case: dict) -> dict:
    out, err = io.StringIO(), io.StringIO()
    done, start = threading.Event(), time.perf_counter()
    if case.get("signal"):
        threading.Thread(target=_signal_when, args=(*case["signal"], done), daemon=True).start()
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    if case.get("fsize") is not None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (case["fsize"], hard))
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = main(case["argv"])
            except SystemExit as e:
                rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except BaseException:
                traceback.print_exc()
                rc = 1
    finally:
        done.set()
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    return {"rc": rc, "out": out.getvalue(), "err": err.getvalue(), "seconds": time.perf_counter() - start}


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        cases = json.load(f)
    print(json.dumps([run(c) for c in cases]))
