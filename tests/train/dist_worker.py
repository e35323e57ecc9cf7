"""Run by test_distributed.py under `torchrun --nproc-per-node 2`: one step's gradients, then a
short train() with a resume in the middle, all under --parallel MODE (ddp or fsdp) on gloo.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/train/dist_worker.py MODE OUT DATA MODEL
"""
import sys

import torch

from recursa.data.packed import read_tokens
from recursa.model import load
from recursa.train import TrainConfig, train
from recursa.train import distributed as D
from recursa.train.data import Batches
from recursa.train.losses import ForwardOutputs, default_objective

SEQ, PER_RANK = 16, 2


def one_step_grads(model_dir, data_dir, parallel, env) -> dict:
    """Gradients of the mean CE on draw 0 of the global batch (gathered to full tensors)."""
    model = load(model_dir).train()
    forward = ForwardOutputs(model)
    wrapped = D.wrap_model(forward, parallel, env)
    batches = Batches(read_tokens(data_dir, "train"), SEQ, PER_RANK * 2 // env.world_size, seed=5,
                      rank=env.rank, world_size=env.world_size)
    total, _ = default_objective()(wrapped, model, batches.next())
    total.backward()
    grads = {}
    for name, p in forward.named_parameters():
        g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        grads[name.removeprefix("model.")] = g.detach().clone()
    return grads


def run_config(data_dir, model_dir, out, parallel, world_size, **kw):
    return TrainConfig(data=str(data_dir), out=str(out), preset=None, init=str(model_dir), seq_len=SEQ,
                       batch_size=PER_RANK * 2 // world_size, lr=1e-2, warmup_steps=1, eval_every=2,
                       eval_batches=2, parallel=parallel, progress=False, **kw)


def train_with_resume(data_dir, model_dir, out, parallel, world_size):
    """2 steps, then resume from that checkpoint to 3: exercises gathered saves and sharded loads."""
    train(run_config(data_dir, model_dir, out, parallel, world_size, max_steps=2))
    train(run_config(data_dir, model_dir, out, parallel, world_size, max_steps=3, resume=True))


if __name__ == "__main__":
    mode, out, data_dir, model_dir = sys.argv[1:]
    env = D.init_distributed("cpu")
    grads = one_step_grads(model_dir, data_dir, mode, env)
    if env.is_main:
        torch.save(grads, f"{out}/grads.pt")
    train_with_resume(data_dir, model_dir, f"{out}/run", mode, env.world_size)
    D.shutdown()
