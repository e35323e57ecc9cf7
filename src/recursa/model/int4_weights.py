"""int4 blocks kept as they are beside a model: `int4.safetensors` (written by `recursa models fetch
--keep-int4` from SmolLM2's GGUF Q4_1 blocks, read by `quant.prepare(..., int4_weights=DIR)`).

Per weight: q uint8 [N, K] (two per byte on disk, low nibble first), scale and minimum [N, K/group],
w = scale * q + minimum.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from recursa.io import save_safetensors

INT4_FILE = "int4.safetensors"  # beside model.safetensors: int4 blocks kept from a GGUF (recursa models fetch)


def save_int4_weights(weights: dict, directory) -> Path:
    """Write {weight name: (q uint8 [N, K], scale, minimum [N, K/g])} as `directory/int4.safetensors`."""
    path = Path(directory) / INT4_FILE
    tensors = {}
    for name, (q, scale, minimum) in weights.items():
        q = q.to(torch.uint8)
        tensors[f"{name}.qweight"] = (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()  # two per byte, low first
        tensors[f"{name}.scale"], tensors[f"{name}.minimum"] = scale.contiguous(), minimum.contiguous()
    save_safetensors(tensors, path, metadata={"format": "pt", "library": "recursa", "int4": "w = scale * q + minimum"})
    return path


def load_int4_weights(directory) -> dict | None:
    """The int4 blocks saved beside a model (see save_int4_weights), or None when there are none."""
    path = Path(directory) / INT4_FILE
    if not path.is_file():
        return None
    tensors = load_file(str(path))
    weights = {}
    for key in tensors:
        if key.endswith(".qweight"):
            name, packed = key[:-len(".qweight")], tensors[key]
            q = torch.stack((packed & 15, packed >> 4), dim=-1).reshape(packed.shape[0], -1)
            weights[name] = (q, tensors[f"{name}.scale"], tensors[f"{name}.minimum"])
    return weights


__all__ = ["INT4_FILE", "save_int4_weights", "load_int4_weights"]
