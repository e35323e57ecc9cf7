"""Load on `recursa serve`: N concurrent streaming clients on loopback vs LLM.generate on the same load.

The server runs as its own process (`recursa serve`, on 127.0.0.1 only); --concurrency asyncio
clients (httpx) each stream greedy completions of --max-tokens tokens (ignore_eos) one after
another until --requests are done or --max-seconds have passed. Reported: requests/s, output
tokens/s, TTFT and inter-token latency (ITL) p50/p99, errors, the server's peak RSS (VmHWM),
how many answers differ from LLM.generate's (lost or mixed-up requests show up there), the CPU
share each side got (process CPU time / wall time) and tokens per CPU second, then a
burst of --max-num-seqs + --max-queue-len + --burst-extra simultaneous requests (how many got
429, how many anything else but 200/429). Then, with the server stopped, the same prompts go
through LLM.generate in this process (same engine settings, all submitted at once): the
server's output tok/s over generate's is the serving overhead; on a machine shared with other
work, compare tokens per CPU second (wall-clock rates follow the other tenants' load). Prints a
table, then one JSON line.

    .venv/bin/python benchmarks/serve_load.py --make-tiny runs/serve-tiny --concurrency 256 --requests 512
    .venv/bin/python benchmarks/serve_load.py --model models/smollm2-135m --concurrency 32 --requests 64 \
        --max-tokens 32 --threads 2

The clients share the machine with the server: on 2 cores their HTTP parsing competes with the
engine for CPU, as any loopback load test's does.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import prompts  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def make_tiny(directory: Path) -> None:
    """A random `tiny` model with a small BPE tokenizer trained on the benchmark prompts."""
    import torch

    from recursa.presets import preset
    from recursa.data.tokenizer import train_tokenizer
    from recursa.model import Decoder

    if (directory / "config.json").is_file():
        return
    tok = train_tokenizer([" ".join(prompts(64))] * 20, vocab_size=512)
    torch.manual_seed(0)
    model = Decoder(preset("tiny", vocab_size=tok.vocab_size)).eval()
    model.save(directory)
    tok.save(directory)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def _stream(client, url: str, body: dict, record: dict) -> None:
    start, times, text, status = time.perf_counter(), [], [], None
    try:
        async with client.stream("POST", url, json=body) as r:
            status = r.status_code
            if status == 200:
                async for line in r.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    choice = json.loads(line[6:])["choices"][0]
                    n = len(choice["exit_depths"])   # recursa's extra field: one depth per new token
                    times += [time.perf_counter()] * n
                    text.append(choice["text"])
    except Exception as e:   # a broken connection is an error of the run, counted, not raised
        status = type(e).__name__
    record.update(start=start, times=times, text="".join(text), status=status)


async def clients(url: str, texts: list[str], args) -> tuple[list[dict], float, float]:
    import httpx

    records = [dict() for _ in texts]
    todo = iter(range(len(texts)))
    stop_at = time.perf_counter() + args.max_seconds

    async def worker(client):
        for i in todo:
            if time.perf_counter() > stop_at:
                return
            body = {"prompt": texts[i], "max_tokens": args.max_tokens, "temperature": 0, "ignore_eos": True,
                    "stream": True}
            await _stream(client, url + "/v1/completions", body, records[i])

    limits = httpx.Limits(max_connections=args.concurrency + 8, max_keepalive_connections=args.concurrency + 8)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(600.0)) as client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(args.concurrency)))
        end = time.perf_counter()
    return [r for r in records if r], start, end


async def burst(url: str, n: int) -> dict:
    """n requests at once (short, non-streaming): the answers' status counts."""
    import httpx

    limits = httpx.Limits(max_connections=n + 8)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(600.0)) as client:
        async def one(i):
            try:
                r = await client.post(url + "/v1/completions", json={"prompt": f"burst {i}", "max_tokens": 4})
                return r.status_code, r.headers.get("retry-after")
            except Exception as e:
                return type(e).__name__, None
        answers = await asyncio.gather(*(one(i) for i in range(n)))
    statuses = [s for s, _ in answers]
    return {"burst_requests": n, "burst_200": statuses.count(200), "burst_429": statuses.count(429),
            "burst_other": n - statuses.count(200) - statuses.count(429),
            "burst_429_with_retry_after": sum(1 for s, h in answers if s == 429 and h)}


def _cpu_seconds(pid: int) -> float:
    """user + system CPU time of a process (its threads included)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _metric(text: str, name: str) -> float:
    return next(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))


def _pct(values, q) -> float:
    return 1e3 * float(np.percentile(values, q)) if len(values) else float("nan")


def summarize(records: list[dict], start: float, end: float) -> dict:
    ok = [r for r in records if r["status"] == 200 and r["times"]]
    ttft = [r["times"][0] - r["start"] for r in ok]
    itl = [b - a for r in ok for a, b in zip(r["times"], r["times"][1:])]
    n_out = sum(len(r["times"]) for r in ok)
    return {"requests": len(records), "ok": len(ok), "errors": len(records) - len(ok), "seconds": round(end - start, 3),
            "requests_s": len(ok) / (end - start), "output_tok_s": n_out / (end - start), "output_tokens": n_out,
            "ttft_p50_ms": _pct(ttft, 50), "ttft_p99_ms": _pct(ttft, 99),
            "itl_p50_ms": _pct(itl, 50), "itl_p99_ms": _pct(itl, 99)}


def offline(model: str, texts: list[str], args) -> tuple[dict, list[str]]:
    """The same prompts through LLM.generate (all at once, max_num_seqs = concurrency): tok/s and texts."""
    import torch

    from recursa import LLM, SamplingParams

    torch.set_num_threads(args.threads)
    llm = LLM(model, **engine_args(args))
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    llm.generate(texts[:1], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))   # warm-up
    start, cpu = time.perf_counter(), time.process_time()
    outs = llm.generate(texts, params)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    n_out = sum(len(o.token_ids) for o in outs)
    return {"generate_seconds": round(seconds, 3), "generate_tok_s": n_out / seconds, "generate_cpu_share": cpu / seconds,
            "generate_tok_per_cpu_s": n_out / cpu,
            "generate_tokens_per_stage_run": llm.stats()["tokens_per_stage_run"]}, [o.text for o in outs]


def engine_args(args) -> dict:
    return dict(max_num_seqs=args.concurrency, max_num_batched_tokens=args.max_num_batched_tokens)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="model directory with tokenizer.json")
    p.add_argument("--make-tiny", metavar="DIR", help="build a random tiny model there (if absent) and serve it")
    p.add_argument("--concurrency", type=int, default=64, help="concurrent streaming clients (= --max-num-seqs)")
    p.add_argument("--requests", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-seconds", type=float, default=600.0, help="no new requests after this")
    p.add_argument("--max-num-batched-tokens", type=int, default=1024)
    p.add_argument("--max-queue-len", type=int, default=64)
    p.add_argument("--burst-extra", type=int, default=64, help="burst requests beyond the server's capacity")
    p.add_argument("--threads", type=int, default=1, help="the server's (and generate's) torch threads")
    args = p.parse_args()
    if args.make_tiny:
        make_tiny(Path(args.make_tiny))
        args.model = args.make_tiny
    if not args.model:
        p.error("give --model DIR or --make-tiny DIR")
    texts = [f"{t} ({i})" for i, t in enumerate(prompts(args.requests))]   # distinct prompts: a mix-up shows

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "recursa.cli", "serve", args.model, "--port", str(port), "--log-level", "warning",
           "--threads", str(args.threads), "--max-num-seqs", str(args.concurrency),
           "--max-num-batched-tokens", str(args.max_num_batched_tokens), "--max-queue-len", str(args.max_queue_len)]
    server = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    try:
        import httpx

        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass   # the server is not listening yet: retry until the deadline
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the server did not come up")
            time.sleep(0.5)
        asyncio.run(clients(url, texts[:2], argparse.Namespace(**{**vars(args), "concurrency": 2})))   # warm-up
        cpu0, client0 = _cpu_seconds(server.pid), time.process_time()
        records, start, end = asyncio.run(clients(url, texts, args))
        row = summarize(records, start, end)
        row["server_cpu_share"] = (_cpu_seconds(server.pid) - cpu0) / (end - start)
        row["server_tok_per_cpu_s"] = row["output_tok_s"] / row["server_cpu_share"]
        row["client_cpu_share"] = (time.process_time() - client0) / (end - start)
        row["server_tokens_per_stage_run"] = _metric(httpx.get(url + "/metrics").text, "recursa:tokens_per_stage_run")
        row.update(asyncio.run(burst(url, args.concurrency + args.max_queue_len + args.burst_extra)))
        row["server_peak_rss_mib"] = round(_peak_rss_mib(server.pid), 1)
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(120)
        except subprocess.TimeoutExpired:
            server.kill()
    row["server_exit_code"] = server.returncode
    base, want = offline(args.model, texts[:len(records)], args)
    row.update(base)
    row["mismatched_answers"] = sum(1 for r, w in zip(records, want) if r["status"] == 200 and r["text"] != w)
    row["server_over_generate"] = row["output_tok_s"] / row["generate_tok_s"]
    # on a shared machine wall-clock rates follow the other tenants' load; tokens per CPU second do not
    row["server_over_generate_per_cpu_s"] = row["server_tok_per_cpu_s"] / row["generate_tok_per_cpu_s"]
    load = os.getloadavg()
    row["loadavg_1m"] = round(load[0], 2)

    print(f"{'concurrency':>11} {'req/s':>7} {'out tok/s':>9} {'generate':>9} {'ratio':>6} {'per CPU-s':>9} "
          f"{'TTFT p50/p99 ms':>17} {'ITL p50/p99 ms':>16} {'errors':>6} {'mixed':>5} {'429s':>5} {'peak RSS':>9}")
    print(f"{args.concurrency:>11} {row['requests_s']:>7.2f} {row['output_tok_s']:>9.1f} {row['generate_tok_s']:>9.1f} "
          f"{row['server_over_generate']:>6.2f} {row['server_over_generate_per_cpu_s']:>9.2f} "
          f"{row['ttft_p50_ms']:>8.0f}/{row['ttft_p99_ms']:<8.0f} "
          f"{row['itl_p50_ms']:>7.1f}/{row['itl_p99_ms']:<8.1f} {row['errors']:>6} {row['mismatched_answers']:>5} "
          f"{row['burst_429']:>5} {row['server_peak_rss_mib']:>7.0f}MB")
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    print(json.dumps({"benchmark": "serve_load", "config": vars(args), "result": row, "commit": commit}))


if __name__ == "__main__":
    main()
