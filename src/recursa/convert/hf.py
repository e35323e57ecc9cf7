"""HuggingFace Llama checkpoints <-> recursa decoders, without importing `transformers`.

recursa's vanilla decoder computes exactly what `LlamaForCausalLM` computes, so conversion is a
config translation plus a renaming of tensors. This module is the only place that knows
HuggingFace's names: `hf_to_recursa` / `recursa_to_hf` hold the mapping, `config_from_hf` /
`config_to_hf` the config translation, and whatever recursa cannot reproduce (biases, scaled
RoPE, other activations, quantized weights, other architectures) is rejected with the field named.

    model = from_hf("path/to/llama-dir")          # config.json + *.safetensors or pytorch_model.bin
    to_hf(model, "out/hf", tokenizer_dir="path/to/llama-dir")
    # transformers.AutoModelForCausalLM.from_pretrained("out/hf") now loads the same model

CLI: `recursa convert --from-hf DIR --out DIR` and `recursa convert --to-hf MODEL_DIR --out DIR`.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from recursa.config import ModelConfig
from recursa.errors import RecursaError
from recursa.io import save_safetensors, staged_dir
from recursa.model.decoder import Decoder, from_state

HF_CONFIG = "config.json"
HF_SAFETENSORS = "model.safetensors"
HF_SAFETENSORS_INDEX = "model.safetensors.index.json"
HF_BIN = "pytorch_model.bin"
HF_BIN_INDEX = "pytorch_model.bin.index.json"
# Tokenizer files carried between model directories (HF's and recursa's formats share them).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")

# ---- names ------------------------------------------------------------------------------------
# recursa name -> HF name, for tensors outside the layers and for the suffix inside layer i.
_TOP = {"embed_tokens.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
        "lm_head.weight": "lm_head.weight"}
_LAYER = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn.q_proj.weight": "self_attn.q_proj.weight",
    "attn.k_proj.weight": "self_attn.k_proj.weight",
    "attn.v_proj.weight": "self_attn.v_proj.weight",
    "attn.o_proj.weight": "self_attn.o_proj.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    "mlp.gate_proj.weight": "mlp.gate_proj.weight",
    "mlp.up_proj.weight": "mlp.up_proj.weight",
    "mlp.down_proj.weight": "mlp.down_proj.weight",
}
_TOP_INV = {v: k for k, v in _TOP.items()}
_LAYER_INV = {v: k for k, v in _LAYER.items()}
_RECURSA_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
# HF tensors that carry no weights recursa needs (old checkpoints saved the RoPE table).
_HF_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


def _rename(name: str, top: dict, layer: dict, pattern: re.Pattern, layer_prefix: str) -> str | None:
    if name in top:
        return top[name]
    m = pattern.match(name)
    if m and m.group(2) in layer:
        return f"{layer_prefix}{m.group(1)}.{layer[m.group(2)]}"
    return None


def hf_to_recursa(state: dict[str, torch.Tensor], tie_embeddings: bool) -> dict[str, torch.Tensor]:
    """Rename a LlamaForCausalLM state dict to recursa's names (tied: `lm_head.weight` is dropped)."""
    out, unknown = {}, []
    for name, tensor in state.items():
        if _HF_IGNORED.search(name) or (tie_embeddings and name == "lm_head.weight"):
            continue
        new = _rename(name, _TOP_INV, _LAYER_INV, _HF_LAYER, "layers.")
        if new is None:
            unknown.append(name)
        else:
            out[new] = tensor
    if unknown:
        raise RecursaError(f"tensor(s) with no recursa equivalent: {', '.join(sorted(unknown)[:4])}"
                           + (f" and {len(unknown) - 4} more" if len(unknown) > 4 else ""))
    return out


def recursa_to_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a vanilla recursa state dict to LlamaForCausalLM's names."""
    out = {}
    for name, tensor in state.items():
        new = _rename(name, _TOP, _LAYER, _RECURSA_LAYER, "model.layers.")
        if new is None:
            raise RecursaError(f"parameter {name!r} has no HuggingFace Llama equivalent; "
                               "only the vanilla decoder can be exported")
        out[new] = tensor
    return out


# ---- config -----------------------------------------------------------------------------------
def _rope_theta(hf: dict) -> float:
    """RoPE base, from `rope_parameters` (transformers 5) or `rope_theta`/`rope_scaling` (4.x)."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    for source, d in (("rope_parameters", params), ("rope_scaling", scaling)):
        if not isinstance(d, dict):
            raise RecursaError(f"{source} must be an object, got {d!r}")
        kind = d.get("rope_type", d.get("type", "default"))
        if kind != "default":
            raise RecursaError(f"{source}.rope_type={kind!r}: recursa implements only default (unscaled) RoPE")
    theta = params.get("rope_theta", scaling.get("rope_theta", hf.get("rope_theta", 10000.0)))
    if isinstance(theta, bool) or not isinstance(theta, (int, float)):
        raise RecursaError(f"rope_theta must be a number, got {theta!r}")
    return float(theta)


def _token_id(hf: dict, name: str) -> int | None:
    value = hf.get(name)
    if isinstance(value, list):  # several stop ids (Llama 3): recursa keeps the first
        value = value[0] if value else None
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise RecursaError(f"{name} must be an integer, got {value!r}")
    return value


def config_from_hf(hf: dict) -> ModelConfig:
    """Translate a LlamaForCausalLM config.json dict; reject what recursa's decoder cannot reproduce."""
    if not isinstance(hf, dict):
        raise RecursaError("a HuggingFace config must be a JSON object")
    if "model_type" not in hf and {"dim", "n_layers"} <= hf.keys():
        raise RecursaError("this is a recursa model config, not a HuggingFace one: load it with recursa.load")
    archs = hf.get("architectures") or []
    if hf.get("model_type") != "llama" or any(a != "LlamaForCausalLM" for a in archs):
        raise RecursaError(f"model_type={hf.get('model_type')!r}, architectures={archs}: "
                           "only LlamaForCausalLM checkpoints can be converted")
    if hf.get("quantization_config"):
        raise RecursaError("quantization_config is set: quantized checkpoints cannot be converted")
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag):
            raise RecursaError(f"{flag}=true: recursa's Llama layers have no biases")
    if hf.get("hidden_act", "silu") != "silu":
        raise RecursaError(f"hidden_act={hf['hidden_act']!r}: recursa's MLP is SwiGLU (silu)")
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if name not in hf:
            raise RecursaError(f"config has no {name}")
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim")
    if head_dim is not None and heads and head_dim * heads != hf["hidden_size"]:
        raise RecursaError(f"head_dim={head_dim} != hidden_size/num_attention_heads "
                           f"= {hf['hidden_size']}/{heads}: recursa derives head_dim from the width")
    try:
        return ModelConfig(
            vocab_size=hf["vocab_size"],
            dim=hf["hidden_size"],
            n_layers=hf["num_hidden_layers"],
            n_heads=heads,
            n_kv_heads=hf.get("num_key_value_heads") or heads,
            ffn_dim=hf["intermediate_size"],
            max_seq_len=hf.get("max_position_embeddings", 2048),
            rope_theta=_rope_theta(hf),
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            init_std=float(hf.get("initializer_range", 0.02)),
            bos_token_id=_token_id(hf, "bos_token_id"),
            eos_token_id=_token_id(hf, "eos_token_id"),
        )
    except (TypeError, ValueError) as e:  # ConfigError is a ValueError and names the recursa field
        raise RecursaError(f"config cannot describe a recursa model: {e}") from None


def config_to_hf(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> dict:
    """A LlamaForCausalLM config.json dict for a vanilla recursa model."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "rope_theta": cfg.rope_theta,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "dtype": str(dtype).removeprefix("torch."),
    }


# ---- reading a HuggingFace directory ----------------------------------------------------------
def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RecursaError(f"cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise RecursaError(f"{path} must hold a JSON object")
    return data


def _load_shard(path: Path, device: str) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise RecursaError(f"weight file {path} is missing")
    try:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt", device=str(device)) as f:
                return {k: f.get_tensor(k) for k in f.keys()}
        return torch.load(path, map_location=device, weights_only=True)
    except (SafetensorError, OSError, RuntimeError, ValueError, EOFError) as e:
        raise RecursaError(f"cannot read weights from {path}: {e}") from None


def read_hf_state(directory: Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    """All tensors of a HF directory: single or sharded safetensors, else pytorch_model.bin."""
    for single, index in ((HF_SAFETENSORS, HF_SAFETENSORS_INDEX), (HF_BIN, HF_BIN_INDEX)):
        if (directory / single).is_file():
            return _load_shard(directory / single, device)
        if (directory / index).is_file():
            weight_map = _read_json(directory / index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise RecursaError(f"{directory / index} has no weight_map")
            state = {}
            for shard in sorted(set(weight_map.values())):
                state.update(_load_shard(directory / shard, device))
            return state
    raise RecursaError(f"{directory} has no {HF_SAFETENSORS}, {HF_SAFETENSORS_INDEX} or {HF_BIN}")


def from_hf(path: str | os.PathLike, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> Decoder:
    """Load a local LlamaForCausalLM directory as a recursa Decoder (dtype None keeps the stored one)."""
    directory = Path(path)
    if not directory.is_dir():
        raise RecursaError(f"HuggingFace model directory {directory} does not exist")
    if not (directory / HF_CONFIG).is_file():
        raise RecursaError(f"{directory} has no {HF_CONFIG}")
    cfg = config_from_hf(_read_json(directory / HF_CONFIG))
    state = hf_to_recursa(read_hf_state(directory, str(device)), cfg.tie_embeddings)
    return from_state(cfg, state, device, dtype)


# ---- writing ----------------------------------------------------------------------------------
def copy_tokenizer(src: str | os.PathLike, dst: str | os.PathLike) -> list[str]:
    """Copy the tokenizer files of `src` (if it has a tokenizer.json) into `dst`; returns their names."""
    src, dst = Path(src), Path(dst)
    if not (src / "tokenizer.json").is_file():
        return []
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
            copied.append(name)
    return copied


def to_hf(model: Decoder, out_dir: str | os.PathLike, tokenizer_dir: str | os.PathLike | None = None,
          force: bool = False) -> Path:
    """Write `model` as a LlamaForCausalLM directory (config.json + model.safetensors [+ tokenizer])."""
    if list(model.depth_to_layer) != list(range(model.cfg.n_layers)):
        raise RecursaError("only the vanilla decoder can be exported: this model reuses layers across depth")
    state = recursa_to_hf({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()})
    dtype = model.embed_tokens.weight.dtype
    with staged_dir(out_dir, force) as tmp:
        save_safetensors(state, tmp / HF_SAFETENSORS, metadata={"format": "pt"})
        (tmp / HF_CONFIG).write_text(json.dumps(config_to_hf(model.cfg, dtype), indent=2) + "\n")
        if tokenizer_dir is not None and copy_tokenizer(tokenizer_dir, tmp):
            if not (tmp / "tokenizer_config.json").is_file():
                # Without it AutoTokenizer picks LlamaTokenizer, which rebuilds the pipeline its own way.
                (tmp / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}) + "\n")
    return Path(out_dir)


__all__ = ["config_from_hf", "config_to_hf", "hf_to_recursa", "recursa_to_hf", "read_hf_state",
           "from_hf", "to_hf", "copy_tokenizer", "TOKENIZER_FILES"]
