"""Model configuration: one dataclass for every recursa model family, saved as JSON beside the weights.

Named shapes (`tiny`, `small`, the SmolLM / MoR shapes) live in recursa.presets. Later families (recursive sharing, exits,
routers) add fields here; unknown keys and impossible shapes are rejected with the field named.

Recursive sharing: `n_layers` is always the depth L, the number of layer applications a token
passes through (as for the vanilla model). `sharing` says how depths map onto unique layers and
`n_loops` how often the shared block runs: `cycle`/`sequence` tie all L depths onto
K = L / n_loops layers; `middle_cycle`/`middle_sequence` keep the first and last layer unique
and tie the middle L - 2 depths onto K = (L - 2) / n_loops layers (see `recursa.model.sharing`).
`lora_rank_attn` / `lora_rank_mlp` > 0 make it a Relaxed Recursive Transformer: a LoRA per
shared depth on q/k/v/o and gate/up/down, scaled by lora_alpha / rank (1 when lora_alpha is None).

Early exits (`recursa.model.exits`): `exit_depths` lists the depths after which a token may stop
(the final depth is always an exit); `exit_own_norm` gives each its own RMSNorm (saved with the
weights), otherwise an exit uses the shared final norm + LM head.

Mixture-of-Recursions (`mor_router` "expert" | "token", see recursa.model.mor): a router decides
per token how many of the n_loops = Nr recursion steps of a cycle / middle_cycle block it runs.
`mor_kv` picks recursion-wise KV ("recursion") or recursive KV sharing ("share"); `mor_capacity`
is the expert-choice capacity per step (default (Nr - r) / Nr); `mor_alpha` / `mor_gate` scale
the residual branch of a step (None: 0.1·sigmoid for expert, 1.0·softmax for token choice);
`mor_threshold` is the causal inference rule (continue iff sigmoid(score) > threshold);
`mor_aux_router` adds a separate router (on detached hidden states) that makes that decision;
`mor_balance` is the token-choice balancing: "loss" or the loss-free "bias" update.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, asdict, field, fields
from pathlib import Path

from recursa.errors import RecursaError
from recursa.io import write_json_atomic
from recursa.param_count import lora_params, router_params

CONFIG_FILE = "config.json"
SHARING = ("none", "cycle", "sequence", "middle_cycle", "middle_sequence")
MOR_ROUTERS = ("none", "expert", "token")
MOR_KV = ("recursion", "share")
MOR_GATES = {"expert": ("sigmoid", "tanh"), "token": ("softmax", "sigmoid")}
MOR_ARCH = ("linear", "mlp")
MOR_BALANCE = ("loss", "bias")


class ConfigError(RecursaError, ValueError):
    """A configuration that cannot describe a model; the message names the field."""


@dataclass
class ModelConfig:
    vocab_size: int = 8192
    dim: int = 384
    n_layers: int = 6
    n_heads: int = 6
    n_kv_heads: int = 2
    ffn_dim: int = 1024
    max_seq_len: int = 512
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    init_std: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    sharing: str = "none"            # none | cycle | sequence | middle_cycle | middle_sequence
    n_loops: int = 1                 # passes through the shared block (1 for sharing="none")
    lora_rank_attn: int = 0          # relaxed recursion: LoRA rank on q/k/v/o of shared depths
    lora_rank_mlp: int = 0           # ... and on gate/up/down; 0 = strictly shared
    lora_alpha: float | None = None  # LoRA scale = lora_alpha / rank; None: scale 1
    exit_depths: list[int] = field(default_factory=list)  # early exits after these depths (ascending, < n_layers)
    exit_own_norm: bool = False      # each exit has its own RMSNorm before the shared LM head
    mor_router: str = "none"         # Mixture-of-Recursions: none | expert | token (recursa.model.mor)
    mor_kv: str = "recursion"        # recursion (step r attends to tokens that ran step r) | share (step-0 KV)
    mor_capacity: list[float] | None = None  # expert choice: fraction of the sequence per step; None: (Nr-r)/Nr
    mor_alpha: float | None = None   # gate scale; None: 0.1 (expert) / 1.0 (token)
    mor_gate: str | None = None      # expert: sigmoid | tanh; token: softmax | sigmoid; None: the first
    mor_router_arch: str = "linear"  # linear | mlp (two layers, hidden width dim, GELU; no biases)
    mor_threshold: float = 0.5       # inference: continue iff sigmoid(router score) > threshold
    mor_aux_router: bool = False     # expert: a separate router (detached input) makes the causal decision
    mor_balance: str = "loss"        # token choice: balancing loss | loss-free bias update

    def __post_init__(self) -> None:
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def n_unique_layers(self) -> int:
        """Blocks holding weights: L for vanilla, K (+ 2 for the middle variants) when shared."""
        if self.sharing == "none":
            return self.n_layers
        return self.n_shared_layers + (2 if self.sharing.startswith("middle_") else 0)

    @property
    def n_shared_layers(self) -> int:
        """K, the unique layers of the looped block (0 for vanilla)."""
        if self.sharing == "none":
            return 0
        return (self.n_layers - (2 if self.sharing.startswith("middle_") else 0)) // self.n_loops

    def _validate_types(self) -> None:
        """Field types as config.json must spell them: a wrong one (init_std "x", tie_embeddings "no",
        eos_token_id 3.5) names the field here instead of failing deep inside the model."""
        for name in ("rope_theta", "norm_eps", "init_std", "lora_alpha", "mor_alpha", "mor_threshold"):
            value = getattr(self, name)
            if value is None and name in ("lora_alpha", "mor_alpha"):
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"{name} must be a finite number, got {value!r}")
        for name in ("tie_embeddings", "exit_own_norm", "mor_aux_router"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        for name in ("bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise ConfigError(f"{name} must be an integer token id or null, got {value!r}")
        for name in ("sharing", "mor_router", "mor_kv", "mor_router_arch", "mor_balance"):
            if not isinstance(getattr(self, name), str):
                raise ConfigError(f"{name} must be a string, got {getattr(self, name)!r}")
        if self.mor_gate is not None and not isinstance(self.mor_gate, str):
            raise ConfigError(f"mor_gate must be a string or null, got {self.mor_gate!r}")

    def validate(self) -> None:
        self._validate_types()
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.dim % self.n_heads:
            raise ConfigError(f"n_heads={self.n_heads} must divide dim={self.dim}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"n_kv_heads={self.n_kv_heads} must divide n_heads={self.n_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim = dim/n_heads = {self.head_dim} must be even for RoPE")
        if not self.rope_theta > 0:
            raise ConfigError(f"rope_theta must be positive, got {self.rope_theta!r}")
        if not self.norm_eps > 0:
            raise ConfigError(f"norm_eps must be positive, got {self.norm_eps!r}")
        if not self.init_std >= 0:
            raise ConfigError(f"init_std must be >= 0, got {self.init_std!r}")
        for name in ("bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < self.vocab_size:
                raise ConfigError(f"{name}={value} is outside the vocabulary (vocab_size={self.vocab_size})")
        self._validate_sharing()
        self._validate_exits()
        self._validate_mor()

    def _validate_exits(self) -> None:
        depths = self.exit_depths
        if not isinstance(depths, (list, tuple)) or any(not isinstance(d, int) or isinstance(d, bool) for d in depths):
            raise ConfigError(f"exit_depths must be a list of integers, got {depths!r}")
        self.exit_depths = depths = list(depths)
        if any(not 0 < d < self.n_layers for d in depths):
            raise ConfigError(f"exit_depths must lie strictly between 0 and n_layers={self.n_layers} "
                              f"(the final depth is always an exit), got {depths}")
        if depths != sorted(set(depths)):
            raise ConfigError(f"exit_depths must be strictly ascending, got {depths}")
        if not isinstance(self.exit_own_norm, bool):
            raise ConfigError(f"exit_own_norm must be true or false, got {self.exit_own_norm!r}")
        if self.exit_own_norm and not depths:
            raise ConfigError("exit_own_norm needs exit_depths")

    def _validate_sharing(self) -> None:
        if self.sharing not in SHARING:
            raise ConfigError(f"unknown sharing {self.sharing!r}; choose from {', '.join(SHARING)}")
        if not isinstance(self.n_loops, int) or isinstance(self.n_loops, bool) or self.n_loops <= 0:
            raise ConfigError(f"n_loops must be a positive integer, got {self.n_loops!r}")
        for name in ("lora_rank_attn", "lora_rank_mlp"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"{name} must be an integer >= 0, got {value!r}")
        if self.lora_alpha is not None and (isinstance(self.lora_alpha, bool) or not self.lora_alpha > 0):
            raise ConfigError(f"lora_alpha must be positive or null, got {self.lora_alpha!r}")
        if self.sharing == "none":
            if self.n_loops != 1:
                raise ConfigError(f"n_loops={self.n_loops} needs a sharing strategy (sharing is 'none')")
            if self.lora_rank_attn or self.lora_rank_mlp:
                raise ConfigError("lora_rank_attn/lora_rank_mlp need a shared model (sharing is 'none')")
            return
        middle = 2 if self.sharing.startswith("middle_") else 0
        looped = self.n_layers - middle
        if looped < self.n_loops or looped % self.n_loops:
            raise ConfigError(f"n_loops={self.n_loops} must divide the {looped} shared depths of "
                              f"n_layers={self.n_layers} with sharing={self.sharing!r}")

    def _validate_mor(self) -> None:
        if self.mor_router not in MOR_ROUTERS:
            raise ConfigError(f"unknown mor_router {self.mor_router!r}; choose from {', '.join(MOR_ROUTERS)}")
        if self.mor_router == "none":
            return
        nr = self.n_loops
        if self.sharing not in ("cycle", "middle_cycle") or nr < 2:
            raise ConfigError(f"mor_router={self.mor_router!r} needs sharing cycle or middle_cycle and n_loops >= 2, "
                              f"got sharing={self.sharing!r}, n_loops={nr}")
        if self.exit_depths:
            raise ConfigError("a Mixture-of-Recursions model cannot also have exit_depths (its router picks the depth)")
        if self.mor_kv not in MOR_KV:
            raise ConfigError(f"unknown mor_kv {self.mor_kv!r}; choose from {', '.join(MOR_KV)}")
        gates = MOR_GATES[self.mor_router]
        if self.mor_gate is not None and self.mor_gate not in gates:
            raise ConfigError(f"mor_gate for mor_router={self.mor_router!r} must be one of {', '.join(gates)}, "
                              f"got {self.mor_gate!r}")
        if self.mor_router_arch not in MOR_ARCH:
            raise ConfigError(f"unknown mor_router_arch {self.mor_router_arch!r}; choose from {', '.join(MOR_ARCH)}")
        if self.mor_balance not in MOR_BALANCE:
            raise ConfigError(f"unknown mor_balance {self.mor_balance!r}; choose from {', '.join(MOR_BALANCE)}")
        if self.mor_alpha is not None and (isinstance(self.mor_alpha, bool) or not isinstance(self.mor_alpha, (int, float))
                                           or not self.mor_alpha > 0):
            raise ConfigError(f"mor_alpha must be positive or null, got {self.mor_alpha!r}")
        if isinstance(self.mor_threshold, bool) or not isinstance(self.mor_threshold, (int, float)) \
                or not 0 < self.mor_threshold < 1:
            raise ConfigError(f"mor_threshold must lie strictly between 0 and 1, got {self.mor_threshold!r}")
        if not isinstance(self.mor_aux_router, bool):
            raise ConfigError(f"mor_aux_router must be true or false, got {self.mor_aux_router!r}")
        if self.mor_aux_router and self.mor_router != "expert":
            raise ConfigError("mor_aux_router is for expert-choice routing (token choice is causal by construction)")
        cap = self.mor_capacity
        if cap is not None:
            if self.mor_router != "expert":
                raise ConfigError("mor_capacity is for expert-choice routing only")
            if not isinstance(cap, (list, tuple)) or any(isinstance(c, bool) or not isinstance(c, (int, float)) for c in cap):
                raise ConfigError(f"mor_capacity must be a list of numbers, got {cap!r}")
            self.mor_capacity = cap = [float(c) for c in cap]
            if len(cap) != nr:
                raise ConfigError(f"mor_capacity needs one fraction per recursion step (n_loops={nr}), got {cap}")
            if cap[0] != 1.0:
                raise ConfigError(f"mor_capacity[0] must be 1.0 (every token runs step 0), got {cap}")
            if any(not 0 < c <= 1 for c in cap) or any(b > a for a, b in zip(cap, cap[1:])):
                raise ConfigError(f"mor_capacity must be non-increasing fractions in (0, 1], got {cap}")

    @property
    def is_mor(self) -> bool:
        return self.mor_router != "none"

    @property
    def mor_capacities(self) -> list[float]:
        """Expert-choice capacity per recursion step: mor_capacity or (Nr - r) / Nr."""
        nr = self.n_loops
        return list(self.mor_capacity) if self.mor_capacity is not None else [(nr - r) / nr for r in range(nr)]

    # ---- (de)serialisation -------------------------------------------------
    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown config field(s): {', '.join(unknown)}")
        try:
            return cls(**data)
        except TypeError as e:  # wrong types that reach comparisons
            raise ConfigError(str(e)) from None

    def replace(self, **changes) -> "ModelConfig":
        return ModelConfig.from_dict({**self.to_dict(), **changes})

    def save(self, directory: str | os.PathLike) -> Path:
        path = Path(directory) / CONFIG_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        return write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "ModelConfig":
        path = Path(directory)
        if path.is_dir():
            path = path / CONFIG_FILE
        if not path.is_file():
            raise ConfigError(f"no model config at {path}")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        except OSError as e:
            raise ConfigError(f"cannot read {path}: {e.strerror or e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a JSON object")
        return cls.from_dict(data)

    def num_params(self) -> int:
        """Parameter count implied by the shape (embeddings counted once when tied)."""
        hd = self.head_dim
        attn = self.dim * hd * (self.n_heads * 2 + self.n_kv_heads * 2)
        mlp = 3 * self.dim * self.ffn_dim
        per_layer = attn + mlp + 2 * self.dim
        emb = self.vocab_size * self.dim * (1 if self.tie_embeddings else 2)
        exit_norms = len(self.exit_depths) * self.dim if self.exit_own_norm else 0
        return (self.n_unique_layers * per_layer + emb + self.dim + lora_params(self) + exit_norms
                + router_params(self))
