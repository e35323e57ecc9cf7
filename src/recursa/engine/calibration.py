"""Calibrated early exit: the exit threshold that keeps agreement with full depth above a target.

`calibrate(model, data, target=0.95, delta=0.05)` picks one confidence threshold, shared by all
of the model's exits, such that, with probability at least 1 - delta over the calibration sample,
the exit rule's tokens agree with the full model's on at least `target` of the tokens (CALM's
"Learn then Test" calibration, reduced to per-token agreement):

- Replay, not decoding. A calibration sequence is a prompt from the corpus plus the model's own
  full-depth greedy continuation (`source="greedy"`, the default) or the corpus tokens that follow
  (`source="corpus"`, teacher-forced). One full forward of it gives, at every position that the
  engine decides by the exit rule (every new token but the first, which comes from the prefill at
  full depth), each exit's confidence (`ExitPolicy.confidences`, the engine's own measure code,
  with the same saturation reference) and whether that exit's argmax equals the final layer's.
  Greedy continuations are the default because they are the contexts the engine meets when it
  decodes greedily: with exact KV (parallel decoding, self-speculation) the engine's hidden states on
  a prefix equal the full forward's, so the replay is the engine's decision token for token until
  the first disagreement. Corpus text is cheaper (no decoding) but is text the model would not
  write, so its confidences and agreements are of other contexts (RESULTS.md compares the two).
- The rule, not each exit alone: under threshold t a token leaves at the FIRST exit whose
  confidence is >= t, else at full depth, so agreement is counted for the whole rule.
- Fixed-sequence testing: candidate thresholds (quantiles of the observed confidences) are tested
  from the most conservative (high) down; each must have a one-sided Clopper-Pearson lower bound at
  confidence 1 - delta on its agreement >= target; the first failure ends the sequence, and the
  last one that passed is chosen. Testing in a fixed order spends the whole delta on each test
  without a multiplicity correction. When none passes, the result is full depth (no exit policy).
- Then the chosen rule is replayed on a separate split of the same corpus (disjoint text), whose
  agreement and mean depth are reported next to the calibration figures.
The replay and the test are recursa.engine.exit_replay; this module makes the sequences and the
saved result (`Calibration`, JSON written atomically, read back checked).

Tokens of one sequence are correlated (a greedy continuation repeats itself), so counting them as
independent trials (`unit="token"`) overstates the evidence; the default `unit="sequence"` bounds on
the effective sample size instead (exit_replay.effective_counts: n over the design effect of
sequences as clusters), which is approximate, not exact. Caveats: the target is a per-token agreement given
the same prefix (a benchmark that compares whole greedy sequences index by index counts every token
after a first divergence as well), and for state copying (approximate KV) the replay is of exact
hidden states, not of the copied ones.

    cal = calibrate(model, "data/corpus", target=0.95, measure="saturation")
    cal.save("runs/demo-exits/model/exit_calibration.json")
    llm = LLM(model, exit_policy=cal.exit_policy(model), exit_strategy="parallel")
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from recursa.engine.exit_policy import ExitPolicy
from recursa.engine.exit_replay import check_target, choose_threshold, replay
from recursa.engine.thresholds import Fixed
from recursa.errors import RecursaError
from recursa.model.exits import ExitSpec

CALIBRATION_FILE = "exit_calibration.json"
SOURCES = ("greedy", "corpus")


@dataclass
class Calibration:
    """A calibrated exit rule: `threshold` (None: full depth) on `measure` at `exit_depths`, and the
    figures behind it (calibration split: its bound; test split: what it achieved)."""
    target: float
    delta: float
    measure: str
    exit_depths: list[int]
    threshold: float | None
    bound: float | None
    source: str
    calibration: dict = field(default_factory=dict)   # agree, tokens, mean_depth, tested, sequences
    test: dict = field(default_factory=dict)          # agree, tokens, mean_depth, sequences
    unit: str = "token"                               # the bound's trials: tokens, or sequences' effective size
                                                      # ("token" when a file predates the field)

    def exit_policy(self, model, classifier=None) -> ExitPolicy | None:
        """The engine's policy for this rule on `model` (None when the rule is full depth); the
        classifier measure needs the model's loaded ExitClassifier (`load_exit_classifier`)."""
        spec = ExitSpec.from_config(model.cfg)
        if list(spec.depths) != list(self.exit_depths):
            raise RecursaError(f"the calibration is for exits {self.exit_depths}, the model has {list(spec.depths)}")
        if self.threshold is None:
            return None
        if self.measure == "classifier" and classifier is None:
            raise RecursaError("this calibration is of the classifier measure: pass the model's exit classifier")
        return make_policy(spec, classifier if self.measure == "classifier" else self.measure, self.threshold)

    def save(self, path: str | os.PathLike) -> Path:
        """Write as JSON, atomically (a temp file in the same folder, then a rename)."""
        path = Path(path)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(asdict(self), f, indent=2)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Calibration":
        try:
            data = json.loads(Path(path).read_text())
            cal = cls(**data)
        except FileNotFoundError:
            raise RecursaError(f"no exit calibration at {path}") from None
        except (OSError, ValueError, TypeError) as e:
            raise RecursaError(f"{path} is not an exit calibration file: {e}") from None
        check_target(cal.target, cal.delta)
        if cal.threshold is not None and not isinstance(cal.threshold, (int, float)):
            raise RecursaError(f"{path}: threshold must be a number or null, got {cal.threshold!r}")
        return cal


def make_policy(spec: ExitSpec, measure, threshold: float) -> ExitPolicy:
    """An ExitPolicy on `measure` (a name, or a loaded ExitClassifier) at a fixed `threshold`."""
    return ExitPolicy(spec, measure, Fixed(threshold))


def corpus_windows(data_dir: str | os.PathLike, split: str, count: int, length: int, vocab_size: int,
                   seed: int = 0) -> list[list[int]]:
    """`count` disjoint windows of `length` tokens from a prepared corpus split, in a seeded order."""
    from recursa.data.packed import read_header, read_tokens

    vocab = read_header(data_dir, split)["vocab_size"]
    if vocab > vocab_size:
        raise RecursaError(f"{data_dir} was tokenised with a {vocab}-token vocabulary, the model has {vocab_size}: "
                           f"prepare it with the model's tokenizer (recursa data prepare --tokenizer MODEL_DIR)")
    tokens = read_tokens(data_dir, split)
    slots = len(tokens) // length
    if slots < count:
        raise RecursaError(f"{data_dir} split {split!r} holds {len(tokens)} tokens: fewer than {count} windows "
                           f"of {length}; use fewer sequences or shorter ones")
    order = torch.randperm(slots, generator=torch.Generator().manual_seed(seed))[:count].tolist()
    return [tokens[i * length:(i + 1) * length].astype("int64").tolist() for i in order]


def greedy_sequences(model, prompts: list[list[int]], new_tokens: int, batch: int = 16) -> list[list[int]]:
    """Each prompt followed by the model's full-depth greedy continuation (the engine, batched)."""
    from recursa.engine.llm import LLM
    from recursa.engine.sampling_params import SamplingParams

    llm = LLM(model, max_num_seqs=batch)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True))
    return [p + list(o.token_ids) for p, o in zip(prompts, outs)]


def calibrate(model, data_dir, target: float = 0.95, delta: float = 0.05, measure="max_prob", **kw) -> Calibration:
    """Choose the threshold for one target (see calibrate_many)."""
    return calibrate_many(model, data_dir, [target], delta, measure, **kw)[0]


def calibrate_many(model, data_dir, targets: list[float], delta: float = 0.05, measure="max_prob", *,
                   source: str = "greedy", sequences: int = 64, prompt_len: int = 32, new_tokens: int = 64,
                   split: str = "val", seed: int = 0, unit: str = "sequence", log=None) -> list[Calibration]:
    """Per target, choose the threshold on `sequences` calibration sequences and report it on as many
    others (the sequences and their replays are made once for all targets).

    Both sets are windows of the corpus split `split` (disjoint), prompts of `prompt_len` tokens
    followed by `new_tokens` of continuation (greedy full-depth decoding, or the corpus' own).
    `measure`: a name in model.confidence.CHOICES, or a loaded ExitClassifier."""
    for target in targets:
        check_target(target, delta)
    if source not in SOURCES:
        raise RecursaError(f"unknown calibration source {source!r}; choose from {', '.join(SOURCES)}")
    if sequences < 1 or prompt_len < 1 or new_tokens < 2:
        raise RecursaError("calibration needs sequences >= 1, prompt_len >= 1 and new_tokens >= 2")
    spec = ExitSpec.from_config(model.cfg)
    if not spec.depths:
        raise RecursaError("the model has no exits (config exit_depths is empty): nothing to calibrate")
    length = prompt_len + new_tokens
    if length > model.cfg.max_seq_len:
        raise RecursaError(f"prompt_len + new_tokens = {length} exceeds the model's max_seq_len {model.cfg.max_seq_len}")
    policy = make_policy(spec, measure, 1.0)
    name = measure if isinstance(measure, str) else "classifier"
    windows = corpus_windows(data_dir, split, 2 * sequences, length if source == "corpus" else prompt_len,
                             model.cfg.vocab_size, seed)
    if source == "greedy":
        windows = greedy_sequences(model, windows, new_tokens)
    cal_replay = replay(model, policy, windows[:sequences], prompt_len)
    test_replay = replay(model, policy, windows[sequences:], prompt_len)
    results = []
    for target in targets:
        chosen = choose_threshold(cal_replay, target, delta, unit=unit)
        k, n, depth = test_replay.outcome(chosen["threshold"])
        result = Calibration(target=target, delta=delta, measure=name, exit_depths=list(spec.depths),
                             threshold=chosen["threshold"], bound=chosen["bound"], source=source, unit=unit,
                             calibration=dict(agree=chosen["agree"], tokens=cal_replay.confidence.shape[0],
                                              effective_tokens=chosen["effective_tokens"],
                                              mean_depth=chosen["mean_depth"], tested=chosen["tested"],
                                              sequences=sequences),
                             test=dict(agree=k / max(n, 1), tokens=n, mean_depth=depth, sequences=sequences))
        if log is not None:
            log(describe(result))
        results.append(result)
    return results


def describe(cal: Calibration) -> str:
    """One line: the chosen rule, its bound, and the held-out agreement."""
    c, t = cal.calibration, cal.test
    if cal.threshold is None:
        head = (f"no threshold on {cal.measure} keeps agreement >= {cal.target:g} at confidence {1 - cal.delta:g} "
                f"on {c['tokens']} calibration tokens: full depth")
    else:
        head = (f"threshold {cal.threshold:.4f} on {cal.measure} at exits {cal.exit_depths}: agreement "
                f"{c['agree']:.4f} on {c['tokens']} calibration tokens, lower bound {cal.bound:.4f} >= {cal.target:g} "
                f"at confidence {1 - cal.delta:g}"
                + (f" (bound over sequences: {c['effective_tokens']} effective tokens)" if cal.unit == "sequence" else ""))
    return (f"{head}; held out ({t['tokens']} tokens, {cal.source}): agreement {t['agree']:.4f}, "
            f"mean depth {t['mean_depth']:.2f}")


__all__ = ["Calibration", "calibrate", "calibrate_many", "corpus_windows", "greedy_sequences", "describe",
           "CALIBRATION_FILE", "SOURCES"]
