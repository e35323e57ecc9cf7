"""The files of a run directory besides the checkpoint: metrics.jsonl, summary.json, and the
checks that a resumed run continues the run that wrote them.

metrics.jsonl is appended line by line, so a kill can leave its last line torn; on resume (or a
fresh run into the same directory) lines that do not parse are dropped with the records written
after the checkpoint. Records and the summary are strict JSON: a non-finite number is written as
null, never as NaN.
"""
from __future__ import annotations

import json
from pathlib import Path

from recursa.errors import RecursaError
from recursa.io import json_dumps, write_json_atomic, write_text_atomic
from recursa.train.config import TrainConfig

# fields a resumed run must share with the run that wrote the checkpoint (the data stream and
# the model depend on them); the others (max steps, lr, eval cadence ...) may change
RESUME_FIELDS = ("preset", "init", "seq_len", "batch_size", "seed")


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the records up to `step` (the checkpoint's); drop later and unparseable (torn) lines."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
            keep.append(line)
    write_text_atomic(path, "".join(line + "\n" for line in keep))


def append_record(log, record: dict) -> None:
    log.write(json_dumps(record) + "\n")
    log.flush()


def write_summary(path: Path, summary: dict) -> None:
    write_json_atomic(path, summary)


def check_resume(cfg: TrainConfig, saved: dict | None, ckpt: Path) -> None:
    """Refuse to resume with a different preset / init / seq_len / batch_size / seed than the
    checkpoint's run, naming the field (preset and init are compared only when given)."""
    if not saved:
        return
    for name in RESUME_FIELDS:
        mine, theirs = getattr(cfg, name), saved.get(name)
        if name in ("preset", "init") and mine is None:
            continue
        if name == "init" and mine is not None and theirs is not None:
            mine, theirs = str(Path(mine).resolve()), str(Path(theirs).resolve())
        if mine != theirs:
            flag = "--" + name.replace("_", "-")
            raise RecursaError(f"the checkpoint in {ckpt.parent} was trained with {flag} {theirs}, not {mine}: "
                               f"resume with the same {flag} (or train into another --out)")
