"""Training: one loop for every model family (`recursa train`, or `train(TrainConfig(...))`)."""
from recursa.train.config import TrainConfig, TrainConfigError
from recursa.train.losses import LossTerm, Objective, default_objective
from recursa.train.loop import train

__all__ = ["TrainConfig", "TrainConfigError", "LossTerm", "Objective", "default_objective", "train"]
