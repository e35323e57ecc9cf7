"""ExitPolicy: what the engine needs to let a token stop early, and the rules every path shares.

An exit policy is the engine's input for a model with exits (`LLM(model, exit_policy=...)`):
the exits to check (an ExitSpec), the confidence measure (a name in model.confidence.MEASURES
or a trained model.exit_classifier.ExitClassifier), the threshold (engine/thresholds.py) and
optionally other exit norms than the model's own. The rules are written once here:

- `confidence(measure)`: a name or a classifier -> callable (logits [V], h [D], h_ref [D], depth) -> float;
  h_ref is the hidden state at `model.exits.saturation_reference(depths, depth)`.
- `ExitPolicy.confidences(logits, h, h_ref, depth)`: the measure over a batch of tokens at one exit,
  one host transfer. Hidden-state measures (saturation) need no logits: with a threshold that
  learns nothing (fixed, CALM's decay) the engine then runs the LM head only for tokens that
  exit (`needs_logits` False), so an exit check costs a cosine, not a 49k-row matmul.
- `ExitPolicy.observe(obs, final)`: the labelling rule. Every exit a token passed yields
  (exit depth, confidence, exit argmax); once its full-depth argmax `final` is known, each is fed
  to the threshold as (confidence, argmax == final, depth) — FREE's online calibration.

    policy = ExitPolicy(ExitSpec.from_config(model.cfg), "max_prob", Fixed(0.9))
"""
from __future__ import annotations

from dataclasses import dataclass

from recursa.errors import RecursaError
import torch

from recursa.engine.thresholds import CALMDecay, Fixed
from recursa.model.confidence import CHOICES, MEASURES, Confidence, features, margin, max_prob, saturation
from recursa.model.exit_classifier import ExitClassifier
from recursa.model.exits import ExitHeads, ExitSpec

# the named measures over a batch: (logits [n, V] or None, hidden [n, D], reference [n, D] or None) -> [n]
BATCHED = {"max_prob": lambda logits, h, ref: max_prob(logits),
           "margin": lambda logits, h, ref: margin(logits),
           "saturation": lambda logits, h, ref: saturation(h, ref)}
HEAD_FREE = ("saturation",)   # measures that read hidden states only


def confidence(measure: str | ExitClassifier) -> Confidence:
    """The measure as a callable (logits [V], hidden [D], reference hidden [D], depth) -> float."""
    if isinstance(measure, ExitClassifier):
        return measure.score
    if measure == "classifier":
        raise RecursaError("the classifier measure needs a trained exit classifier: pass "
                           "load_exit_classifier(MODEL_DIR) instead of the name")
    if measure not in MEASURES:
        raise RecursaError(f"unknown confidence measure {measure!r}; choose from {', '.join(CHOICES)}")
    return MEASURES[measure]


@dataclass
class ExitPolicy:
    spec: ExitSpec
    measure: str | ExitClassifier | Confidence = "max_prob"
    threshold: object = None  # thresholds.Fixed / CALMDecay / PerExit: __call__(step, depth), observe(c, agreed, depth)
    heads: ExitHeads | None = None

    def __post_init__(self):
        if self.threshold is None:
            raise RecursaError("an exit policy needs a threshold")
        # the reference hidden state is only read by measures that compare hidden states
        named = self.measure if isinstance(self.measure, str) else None
        self.uses_reference = named not in ("max_prob", "margin")
        adaptive = not isinstance(self.threshold, (Fixed, CALMDecay))   # it learns from labels (exit argmax)
        self.needs_logits = named not in HEAD_FREE or adaptive
        if isinstance(self.measure, ExitClassifier):
            clf = self.measure
            self._batched = lambda logits, h, ref, d: torch.sigmoid(clf(h, features(logits, h, ref), d))
        elif named is not None:
            self._batched = lambda logits, h, ref, d, f=BATCHED.get(named): f(logits, h, ref)
        else:
            self._batched = None     # a caller's own callable: one row at a time
        if isinstance(self.measure, (str, ExitClassifier)):
            self.measure = confidence(self.measure)

    @torch.no_grad()
    def confidences(self, logits, hidden, reference, depth: int) -> list[float]:
        """Confidence of each of n tokens at the exit after `depth` layers (logits [n, V] or None when
        not `needs_logits`, hidden [n, D], reference [n, D] or None)."""
        if self._batched is not None:
            return self._batched(logits, hidden, reference, depth).float().tolist()
        refs = reference if reference is not None else [None] * len(hidden)
        return [float(self.measure(z, h, r, depth)) for z, h, r in zip(logits, hidden, refs)]

    def observe(self, obs: list[tuple[int, float, int]], final: int) -> None:
        """Label each (exit depth, confidence, exit argmax) a token passed by agreement with `final`."""
        for depth, conf, argmax in obs:
            if argmax is not None:      # None: a head-free check, no exit prediction to label
                self.threshold.observe(conf, argmax == final, depth)


__all__ = ["ExitPolicy", "confidence", "BATCHED", "HEAD_FREE"]
