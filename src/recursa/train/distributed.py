"""Process groups and model wrapping: PyTorch's own DDP and FSDP2, nothing home-made.

`init_distributed()` reads the torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK): NCCL on CUDA,
gloo otherwise, a single process when the variables are absent. `wrap_model()` wraps a plain
nn.Module in DDP (find_unused_parameters=True: early exit leaves parameters unused) or FSDP2
(`fully_shard` per unique layer, a shared block and its LoRA as one unit, then the root). The state-dict helpers gather full,
CPU-resident model and optimizer states so checkpoints look the same whatever the parallelism.

Run on 2 CPU processes:  torchrun --standalone --nproc-per-node 2 -m recursa.cli train ... --parallel ddp
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from recursa.errors import RecursaError


@dataclass
class DistEnv:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()


def pick_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    if name == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RecursaError("--device cuda was given but CUDA is not available")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


def init_distributed(device: str = "auto") -> DistEnv:
    """Join the torchrun process group if there is one; otherwise a single-process DistEnv."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank)
    if world_size > 1 or "TORCHELASTIC_RUN_ID" in os.environ:
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo",
                                    **({"device_id": dev} if dev.type == "cuda" else {}))
    return DistEnv(rank=rank, local_rank=local_rank, world_size=world_size, device=dev)


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def resolve_parallel(parallel: str, env: DistEnv) -> str:
    if parallel == "auto":
        return "ddp" if env.world_size > 1 else "none"
    if parallel == "none" and env.world_size > 1:
        raise RecursaError(f"--parallel none cannot run on {env.world_size} ranks: use ddp or fsdp")
    if parallel != "none" and not env.distributed:
        raise RecursaError(f"--parallel {parallel} needs a process group: launch with torchrun")
    return parallel


def fsdp_units(module: nn.Module) -> list[tuple[list[nn.Module], bool]]:
    """FSDP2 units of every Decoder inside `module`: (modules sharded together, reshard after forward).

    A unique (prelude/coda) layer is its own unit. The layers of a shared block, with their
    per-loop LoRA adapters, form ONE unit kept gathered for the whole forward, so a block looped
    N times gathers its weights once per step rather than once per loop.
    """
    from recursa.model.decoder import Decoder

    units = []
    for dec in (m for m in module.modules() if isinstance(m, Decoder)):
        shared = set(dec.structure().shared_layers)
        units += [([layer], True) for u, layer in enumerate(dec.layers) if u not in shared]
        if shared:
            group = [dec.layers[u] for u in sorted(shared)]
            if dec.lora is not None:
                group.append(dec.lora)
            units.append((group, False))
    return units


def wrap_model(module: nn.Module, parallel: str, env: DistEnv) -> nn.Module:
    """DDP or FSDP2 around `module` (already on env.device); `none` returns it unchanged."""
    if parallel == "none":
        return module
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [env.device.index] if env.device.type == "cuda" else None
        return DDP(module, device_ids=ids, find_unused_parameters=True)
    if parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        # Blocks return their new (k, v) views for the engine's cache; training never edits them in place.
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
        for group, reshard in fsdp_units(module):
            fully_shard(group, reshard_after_forward=reshard)
        fully_shard(module)
        return module
    raise RecursaError(f"unknown parallel mode {parallel!r}")


def _options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_model_state(module: nn.Module, parallel: str) -> dict:
    """Full, unsharded CPU state dict of the wrapped module's inner module (collective for FSDP)."""
    if parallel == "fsdp":
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(module, options=_options())
    inner = module.module if parallel == "ddp" else module
    return {k: v.detach().cpu() for k, v in inner.state_dict().items()}


def full_optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer, parallel: str) -> dict:
    if parallel == "fsdp":
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(module, optimizer, options=_options())
    return optimizer.state_dict()


def load_optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer, state: dict, parallel: str) -> None:
    if parallel == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(module, optimizer, state, options=StateDictOptions(full_state_dict=True))
        return
    optimizer.load_state_dict(state)


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce when distributed (sum, mean or max); identity otherwise."""
    if dist.is_available() and dist.is_initialized():
        if op == "mean":
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            t /= dist.get_world_size()
        else:
            dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
