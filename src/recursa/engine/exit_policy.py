"""ExitPolicy: what the engine needs to let a token stop early, and the rules every path shares.

An exit policy is the engine's input for a model with exits (`LLM(model, exit_policy=...)`):
the exits to check (an ExitSpec), the confidence measure (a name in model.confidence.MEASURES
or a trained model.exit_classifier.ExitClassifier), the threshold (engine/thresholds.py) and
optionally other exit norms than the model's own. The rules are written once here:

- `confidence(measure)`: a name or a classifier -> callable (logits [V], h [D], h_ref [D], depth) -> float;
  h_ref is the hidden state at `model.exits.saturation_reference(depths, depth)`.
- `ExitPolicy.observe(obs, final)`: the labelling rule. Every exit a token passed yields
  (exit depth, confidence, exit argmax); once its full-depth argmax `final` is known, each is fed
  to the threshold as (confidence, argmax == final, depth) — FREE's online calibration.

    policy = ExitPolicy(ExitSpec.from_config(model.cfg), "max_prob", Fixed(0.9))
"""
from __future__ import annotations

from dataclasses import dataclass

from recursa.errors import RecursaError
from recursa.model.confidence import CHOICES, MEASURES, Confidence
from recursa.model.exit_classifier import ExitClassifier
from recursa.model.exits import ExitHeads, ExitSpec


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
        self.uses_reference = not (isinstance(self.measure, str) and self.measure in ("max_prob", "margin"))
        if isinstance(self.measure, (str, ExitClassifier)):
            self.measure = confidence(self.measure)

    def observe(self, obs: list[tuple[int, float, int]], final: int) -> None:
        """Label each (exit depth, confidence, exit argmax) a token passed by agreement with `final`."""
        for depth, conf, argmax in obs:
            self.threshold.observe(conf, argmax == final, depth)


__all__ = ["ExitPolicy", "confidence"]
