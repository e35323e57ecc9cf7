"""The recursa decoder: a Llama-style language model you can read top to bottom.

Two ways in:
- `model(input_ids) -> logits [B, T, V]`: the full-sequence forward used for training and as
  the exactness reference for every cached or batched path.
- the stage API for inference: `embed`, `rope`, `forward_stage(i, h, cos, sin, past_kv, mask)`
  and `head`. A *stage* is one set of weights tokens pass through (DESIGN.md); `depth_to_layer`
  maps each depth to the unique layer that runs it, so weight-shared (recursive) models reuse
  the same stage API. The module holds no inference state: KV tensors go in and come out.

Recursive models (`cfg.sharing`, see recursa.model.sharing): `layers` holds one Block per unique
layer, so a depth-L model that loops K layers N times has K Blocks' parameters, the optimizer and
checkpoints see each once, and gradients from every loop accumulate into them. `structure()`
gives the prelude / shared block (unique layers, loops) / coda. Relaxed models add per-depth LoRA
adapters in `lora` (recursa.model.lora); `forward_stage(depth, ...)` applies that depth's.

Early exits (`cfg.exit_depths`, recursa.model.exits): with `cfg.exit_own_norm` the model owns one
RMSNorm per exit in `exit_heads` (saved and trained with everything else), else `exit_heads` is None.

Mixture-of-Recursions (`cfg.mor_router`, recursa.model.mor): `router` holds the routers (None
otherwise); `model(ids)` runs the causal routing rule, `forward_mor(ids, mode)` returns the routing
too; the engine uses `mor_route`, `mor_update` and `kv_source` (semantics in recursa.model.mor).
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from recursa.config import ConfigError, ModelConfig
from recursa.errors import RecursaError
from recursa.model import lora as lora_lib
from recursa.model import mor as mor_lib
from recursa.model import routers as routers_lib
from recursa.model.exits import ExitHeads, ExitSpec
from recursa.model.layers import Block, RMSNorm, rope_cos_sin, rope_frequencies
from recursa.model.sharing import Structure, structure

WEIGHTS_FILE = "model.safetensors"


class CheckpointError(RecursaError, ValueError):
    """A model directory that cannot be loaded; the message says why."""


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_unique_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_frequencies(cfg.head_dim, cfg.rope_theta), persistent=False)
        # depth d runs unique layer depth_to_layer[d]; identity for the vanilla model.
        self._structure = structure(cfg)
        self.depth_to_layer: list[int] = list(self._structure.depth_to_layer)
        # relaxed recursion: {str(depth): {projection: LoRA}} for shared depths, or None
        self.lora = lora_lib.build(cfg, self._structure.shared)
        self.exit_heads = ExitHeads(self, ExitSpec.from_config(cfg)) if cfg.exit_own_norm else None
        self.router = routers_lib.build(cfg)  # Mixture-of-Recursions routers, or None
        self._kv_source = self._kv_sources()
        self.reset_parameters()

    # ---- structure -------------------------------------------------------------------------
    @property
    def depth(self) -> int:
        return len(self.depth_to_layer)

    def stage(self, depth: int) -> Block:
        return self.layers[self.depth_to_layer[depth]]

    def structure(self) -> Structure:
        """Prelude depths, the shared block (unique layers, n_loops, depths), coda depths."""
        return self._structure

    def adapters(self, depth: int) -> nn.ModuleDict | None:
        """The LoRA adapters applied at `depth` (relaxed models, shared depths), else None."""
        if self.lora is None:
            return None
        return self.lora[str(depth)] if str(depth) in self.lora else None

    def reset_parameters(self) -> None:
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.depth)
        for name, p in self.named_parameters():
            if name.startswith(("lora.", "router.")):
                continue  # adapters and routers initialise themselves (LoRA B = 0: no change to the shared layer)
            if p.dim() == 1:
                nn.init.ones_(p)  # norm gains
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, std=out_std)
            else:
                nn.init.normal_(p, std=std)
        for module in self.lora.modules() if self.lora is not None else ():
            if isinstance(module, lora_lib.LoRA):
                module.reset_parameters()
        if self.router is not None:
            self.router.reset_parameters()
        # inv_freq is a derived buffer; recompute it in case the module was built on `meta`.
        self.inv_freq = rope_frequencies(self.cfg.head_dim, self.cfg.rope_theta).to(self.embed_tokens.weight.device)

    def num_params(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.embed_tokens.weight.numel() if exclude_embeddings else n

    # ---- stage API -------------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def rope(self, positions: torch.Tensor, dtype: torch.dtype | None = None):
        """cos, sin for positions [T] or [B, T]."""
        return rope_cos_sin(self.inv_freq, positions, dtype or self.embed_tokens.weight.dtype)

    def forward_stage(self, depth, h, cos, sin, past_kv=None, mask=None, attend=None):
        """Run the stage at `depth` on h [B,T,D]; returns (h, (k, v) of the new tokens).

        `attend(q, k, v)` lets a caller that owns a paged cache supply the attention (the engine).
        Where `kv_source(depth) != depth` (MoR KV sharing) the stage computes no K/V: it calls
        `attend(q, None, None)` (required) and returns (h, None)."""
        skip_kv = self._kv_source[depth] != depth
        if skip_kv and attend is None:
            raise ValueError(f"depth {depth} reads the K/V of depth {self._kv_source[depth]} (shared KV): "
                             f"pass attend=")
        return self.stage(depth)(h, cos, sin, past_kv=past_kv, mask=mask, lora=self.adapters(depth), attend=attend,
                                 skip_kv=skip_kv)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm + LM head: hidden states -> logits."""
        return self.lm_logits(self.norm(h))

    def lm_logits(self, h: torch.Tensor) -> torch.Tensor:
        """The LM head's matmul on normed hidden states (the tied embedding, or `lm_head`: an
        nn.Linear, or a quantized module once prepared for inference, recursa.model.quant)."""
        return F.linear(h, self.embed_tokens.weight) if self.lm_head is None else self.lm_head(h)

    # ---- Mixture-of-Recursions (semantics: recursa.model.mor) ---------------------------------
    def _kv_sources(self) -> tuple[int, ...]:
        s, sources = self._structure, list(range(self.depth))
        if self.cfg.mor_router != "none" and self.cfg.mor_kv == "share":
            k, first = len(s.shared_layers), s.shared[0]
            for d in s.shared:
                sources[d] = first + (d - first) % k
        return tuple(sources)

    def kv_source(self, depth: int) -> int:
        """The depth whose KV this depth's attention reads: itself, except under MoR KV sharing
        where a depth in loop r >= 1 reads the loop-0 depth of the same unique layer."""
        return self._kv_source[depth]

    def mor_route(self, step: int, h: torch.Tensor, h_entry: torch.Tensor):
        """Causal routing of tokens alive at the start of `step`: (go bool [N], gate [N, 1]) from
        h [N, D] (hidden at the start of the step) and h_entry [N, D] (at the shared block's entry).
        Per token; go is all True at step 0."""
        if self.router is None:
            raise ValueError("mor_route needs a Mixture-of-Recursions model (cfg.mor_router is 'none')")
        return self.router.route(step, h, h_entry)

    @staticmethod
    def mor_update(h_start: torch.Tensor, h_end: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """h_start + gate * (h_end - h_start): the gated residual update of one recursion step."""
        return routers_lib.mor_update(h_start, h_end, gate)

    def forward_mor(self, input_ids: torch.Tensor, mode: str = "causal", positions: torch.Tensor | None = None):
        """(logits, routing info) of a MoR model; mode "causal" (inference rule) or "topk" (training)."""
        return mor_lib.forward_mor(self, input_ids, mode, positions)

    # ---- full-sequence forward ---------------------------------------------------------------
    def forward_hidden(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Hidden states after the embedding and after every depth: depth + 1 tensors [B,T,D]."""
        if self.router is not None:
            raise RecursaError("a Mixture-of-Recursions model has no fixed per-depth hidden states "
                               "(its tokens run different depths): use forward_mor")
        T = input_ids.shape[1]
        if positions is None:
            positions = torch.arange(T, device=input_ids.device)
        h = self.embed(input_ids)
        cos, sin = self.rope(positions, h.dtype)
        hidden = [h]
        for d in range(self.depth):
            h, _ = self.forward_stage(d, h, cos, sin)
            hidden.append(h)
        return hidden

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        if self.router is not None:
            return self.forward_mor(input_ids, "causal", positions)[0]
        return self.head(self.forward_hidden(input_ids, positions)[-1])

    # ---- persistence ---------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike) -> Path:
        """Write model.safetensors + config.json into `directory` (each file atomically)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        tmp = directory / (WEIGHTS_FILE + ".tmp")
        save_file(tensors, str(tmp), metadata={"format": "pt", "library": "recursa"})
        os.replace(tmp, directory / WEIGHTS_FILE)
        self.cfg.save(directory)
        return directory


def load(directory: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> Decoder:
    """Load a model saved by `Decoder.save` (or written by `recursa models fetch` / training)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"model directory {directory} does not exist")
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{directory} has no {WEIGHTS_FILE}")
    try:
        cfg = ModelConfig.load(directory)
    except ConfigError as e:
        raise CheckpointError(f"bad config in {directory}: {e}") from None
    with torch.device("meta"):
        model = Decoder(cfg)
    try:
        state = load_file(str(weights), device=str(device))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{weights} is not a readable safetensors file: {e}") from None
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise CheckpointError(f"{weights} does not match its config: {' '.join(first[:3])}") from None
    model.inv_freq = rope_frequencies(cfg.head_dim, cfg.rope_theta).to(device)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()
