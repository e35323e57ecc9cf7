"""Model modules: stateless nn.Modules with explicit tensors in and out."""
from recursa.model.decoder import CheckpointError, Decoder, load

__all__ = ["Decoder", "load", "CheckpointError"]
