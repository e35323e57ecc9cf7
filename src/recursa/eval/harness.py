"""recursa models inside EleutherAI's lm-evaluation-harness (`lm-eval` 0.4.x, the `harness` extra).

Importing this module registers the model class `RecursaLM` under the harness name `recursa`
(`@register_model`). The harness only knows the models it ships, so its own `lm_eval` command
cannot see this one; run it through this module instead, which registers the model and then hands
the command line to the harness unchanged, or through `recursa eval --harness` (offline tasks,
recursa/eval/harness_tasks.py):

    python -m recursa.eval.harness --model recursa --model_args pretrained=models/smollm2-135m \
        --batch_size 8 --tasks recursa_hellaswag_rc_0shot --include_path ~/.cache/recursa/eval/harness
    recursa eval models/smollm2-135m --harness hellaswag,piqa --limit 100

    import lm_eval, recursa.eval.harness
    lm_eval.simple_evaluate(model="recursa", model_args="pretrained=models/smollm2-135m,batch_size=8", ...)

model_args: `pretrained` (a recursa model directory), `batch_size` (documents per forward),
`max_length` (default the model's max_seq_len), `dtype` (float32 / bfloat16 / float16),
`exit_threshold` + `exit_measure` (early exit at the model's exits, fixed threshold; see below),
and any `recursa.LLM` keyword (EngineConfig fields such as max_num_seqs; `quantization` where the
engine takes it) for generation.

- `loglikelihood` goes through recursa's own scorer (recursa.eval.fewshot.score_requests): the
  requests the harness sends for one document share their context, so they are packed into one row
  with a tree mask, exactly as `recursa eval` scores them; same tokenization, same numbers.
- `loglikelihood_rolling` cuts each text into the harness's own disjoint rolling windows (a prefix
  token first, windows of `max_length`) and scores them with the same scorer.
- `generate_until` runs every request at once through `recursa.LLM` (continuous batching): greedy
  unless `do_sample`, `max_gen_toks` new tokens, stopping at any `until` string or EOS.
- Early exit (`exit_threshold=T`): scored positions take their prediction from the first exit whose
  confidence reaches T (synchronized parallel decoding under teacher forcing: exact KV); generation
  uses the same ExitPolicy in the engine. Mixture-of-Recursions models route themselves, causally.
  The mean depth behind the scored and the generated tokens is in `get_model_info()`, which the
  harness copies into `results["config"]` (`recursa_mean_depth_scored`, `..._generated`, and
  per task `recursa_mean_depth_scored_by_task`).
"""
from __future__ import annotations

import dataclasses
import inspect
import os

# recursa never reads a model or data set hub: the harness's `datasets` reads these at import
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from lm_eval.api.model import LM  # noqa: E402
from lm_eval.api.registry import register_model  # noqa: E402
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window  # noqa: E402

from recursa.errors import RecursaError  # noqa: E402

DTYPES = ("float32", "bfloat16", "float16")


def _exit_policy(model_dir, model, threshold: float, measure: str):
    from recursa.engine.exit_policy import ExitPolicy
    from recursa.model.exit_classifier import load_exit_classifier
    from recursa.engine.thresholds import Fixed
    from recursa.model.exits import ExitSpec

    spec = ExitSpec.from_config(model.cfg)
    if not spec.depths:
        raise RecursaError(f"{model_dir} has no exits (config exit_depths is empty): exit_threshold needs them")
    if model.cfg.is_mor:
        raise RecursaError("a Mixture-of-Recursions model chooses its own depth: no exit_threshold")
    measure = load_exit_classifier(model_dir, model) if measure == "classifier" else measure
    return ExitPolicy(spec, measure, Fixed(threshold))


def _engine_args(kwargs: dict) -> dict:
    """The model_args recursa.LLM takes (its EngineConfig fields, and its own keywords)."""
    from recursa.engine.config import EngineConfig
    from recursa.engine.llm import LLM

    known = {f.name for f in dataclasses.fields(EngineConfig)}
    known |= set(inspect.signature(LLM.__init__).parameters) - {"self", "model", "tokenizer", "exit_policy", "engine_args"}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise RecursaError(f"unknown model_args {', '.join(unknown)} for model 'recursa'")
    return kwargs


@register_model("recursa")
class RecursaLM(LM):
    def __init__(self, pretrained: str, batch_size: int | str | None = 8, max_length: int | None = None,
                 dtype: str | None = None, exit_threshold: float | None = None, exit_measure: str = "max_prob",
                 device: str | None = None, max_batch_size: int | None = None, **engine_args):
        super().__init__()
        import torch

        from recursa.data.tokenizer import load_tokenizer
        from recursa.model import load

        if dtype is not None and dtype not in DTYPES:
            raise RecursaError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        self.engine_args = _engine_args(engine_args)
        batch_size = 8 if batch_size is None or str(batch_size).startswith("auto") else batch_size
        if not (isinstance(batch_size, int) or str(batch_size).isdigit()):
            raise RecursaError(f"batch_size must be a positive integer or 'auto', got {batch_size!r}")
        self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise RecursaError(f"batch_size must be positive, got {batch_size}")
        if device is None or (device.startswith("cuda") and not torch.cuda.is_available()):
            device = "cpu"   # the harness CLI asks for cuda by default
        self.model = load(pretrained, device=device, dtype=getattr(torch, dtype) if dtype else None)
        self.tok = load_tokenizer(pretrained)
        self.max_length = int(max_length or self.model.cfg.max_seq_len)
        if not 2 <= self.max_length <= self.model.cfg.max_seq_len:
            raise RecursaError(f"max_length must be in 2..{self.model.cfg.max_seq_len}, got {max_length}")
        if exit_threshold is not None and not isinstance(exit_threshold, (int, float)):
            raise RecursaError(f"exit_threshold must be a number, got {exit_threshold!r}")
        self.exit_policy = (None if exit_threshold is None
                            else _exit_policy(pretrained, self.model, float(exit_threshold), exit_measure))
        self.pretrained = str(pretrained)
        self._llm = None
        self._depths: dict[tuple[str, str], list] = {}   # (scored|generated, task) -> [depth sum, tokens]

    @property
    def start_id(self) -> int:
        return self.tok.bos_id if self.tok.bos_id is not None else self.tok.eos_id

    def _score(self, pairs: list[tuple[list[int], list[int]]], tasks: list[str]):
        from recursa.eval.fewshot import score_ids

        return self._counted(score_ids(self.model, pairs, self.batch_size, self.exit_policy, self.max_length), tasks)

    def _counted(self, scores, tasks: list[str]):
        for s, task in zip(scores, tasks):
            self._count("scored", task, s.depth * s.n_tokens, s.n_tokens)
        return scores

    def _count(self, kind: str, task: str | None, depth_sum: float, n: int) -> None:
        entry = self._depths.setdefault((kind, task or ""), [0.0, 0])
        entry[0] += depth_sum
        entry[1] += n

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        from recursa.eval.fewshot import score_requests

        scores = score_requests(self.model, self.tok, [tuple(r.args) for r in requests], self.batch_size,
                                self.exit_policy, self.max_length)
        results = [(s.logprob, s.greedy) for s in self._counted(scores, [_task(r) for r in requests])]
        for req, res in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", req.args, res)
        return results

    def loglikelihood_rolling(self, requests) -> list[float]:
        pairs, owner = [], []
        for i, req in enumerate(requests):
            windows = get_rolling_token_windows(token_list=self.tok.encode(req.args[0]), prefix_token=self.start_id,
                                                max_seq_len=self.max_length, context_len=1)
            for window in map(make_disjoint_window, windows):
                pairs.append(window)
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, s in zip(owner, self._score(pairs, [_task(requests[i]) for i in owner]) if pairs else []):
            totals[i] += s.logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests) -> list[str]:
        from recursa.engine.llm import LLM

        if not requests:
            return []
        if self._llm is None:
            self._llm = LLM(self.model, self.tok, exit_policy=self.exit_policy, max_model_len=self.max_length,
                            **self.engine_args)
        prompts, params = [], []
        for req in requests:
            context, gen_kwargs = req.args
            p = self._sampling_params(dict(gen_kwargs))
            ids = self.tok.encode(context) if context else [self.start_id]
            prompts.append(ids[-(self.max_length - p.max_tokens):])   # room for the new tokens
            params.append(p)
        outs = self._llm.generate(prompts, params)
        texts = []
        for req, out in zip(requests, outs):
            self._count("generated", _task(req), sum(out.exit_depths), len(out.exit_depths))
            texts.append(out.text)
            self.cache_hook.add_partial("generate_until", req.args, out.text)
        return texts

    def _sampling_params(self, kw: dict):
        from recursa.engine.sampling_params import SamplingParams

        until = kw.pop("until", None) or []
        until = [until] if isinstance(until, str) else [s for s in until if s]
        max_tokens = int(kw.pop("max_gen_toks", 256))
        if max_tokens >= self.max_length:
            raise RecursaError(f"max_gen_toks {max_tokens} leaves no room for a prompt in max_length {self.max_length}")
        sample = kw.pop("do_sample", False)
        temperature = float(kw.pop("temperature", 1.0 if sample else 0.0)) if sample else 0.0
        p = SamplingParams(temperature=temperature, top_k=int(kw.pop("top_k", 0) or 0),
                           top_p=float(kw.pop("top_p", 1.0) or 1.0), seed=kw.pop("seed", None),
                           max_tokens=max_tokens, stop=until)
        kw.pop("temperature", None)
        if kw:
            raise RecursaError(f"unsupported generation arguments {sorted(kw)}")
        return p

    def get_model_info(self) -> dict:
        info = {"recursa_model": self.pretrained, "recursa_depth": self.model.depth,
                "recursa_exit_threshold": None if self.exit_policy is None else self.exit_policy.threshold(0)}
        for kind in ("scored", "generated"):
            rows = {task: v for (k, task), v in self._depths.items() if k == kind}
            total, n = sum(v[0] for v in rows.values()), sum(v[1] for v in rows.values())
            info[f"recursa_mean_depth_{kind}"] = total / n if n else None
            info[f"recursa_mean_depth_{kind}_by_task"] = {t: v[0] / v[1] for t, v in sorted(rows.items()) if v[1]}
        return info


def _task(request) -> str | None:
    return getattr(request, "task_name", None)


def evaluate(model_dir, task_names: list[str], tasks_dir, model_args: dict, limit: int | None = None) -> dict:
    """Run harness tasks found in `tasks_dir` (harness_tasks.write_tasks) on a recursa model.

    Returns the harness's results (per task: metric -> value) and its config (with the mean
    depths). The harness's own task index is not loaded: only `tasks_dir` is searched."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    lm = RecursaLM(pretrained=str(model_dir), **model_args)
    out = lm_eval.simple_evaluate(model=lm, tasks=task_names, limit=limit, log_samples=False,
                                  task_manager=TaskManager(include_path=str(tasks_dir), include_defaults=False))
    return {"results": out["results"], "config": {k: v for k, v in out["config"].items() if _plain(v)}}


def _plain(value) -> bool:
    return value is None or isinstance(value, (str, int, float, bool, list, dict))


def main() -> None:
    """The harness's own command line, with `recursa` registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
