"""Evaluation: validation perplexity and few-shot log-likelihood accuracy (`recursa eval`)."""
from recursa.eval.fewshot import Score, encode_pair, evaluate_task, score_ids, score_requests
from recursa.eval.perplexity import perplexity
from recursa.eval.tasks import Doc, Task, TaskSuite, default_cache_dir, fetch_wheel, parse_requests

__all__ = ["perplexity", "score_requests", "score_ids", "evaluate_task", "encode_pair", "Score", "TaskSuite", "Task", "Doc",
           "parse_requests", "fetch_wheel", "default_cache_dir"]
