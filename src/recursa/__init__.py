"""recursa: adaptive-depth language models and an engine that batches them depth-wise."""
from recursa.config import ModelConfig
from recursa.presets import preset
from recursa.engine.llm import LLM
from recursa.engine.sampling_params import SamplingParams
from recursa.errors import RecursaError
from recursa.model import Decoder, load


def from_hf(path, **kwargs):
    """Import a local LlamaForCausalLM-architecture directory (needs the `hf` extra)."""
    from recursa.convert.hf import from_hf as _from_hf

    return _from_hf(path, **kwargs)


__all__ = ["ModelConfig", "preset", "Decoder", "load", "from_hf", "RecursaError", "LLM", "SamplingParams"]
__version__ = "0.1.0"
