"""DDP and FSDP2 on 2 CPU ranks (gloo, via torchrun) match a single process on the same global batch."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from recursa.train import distributed as D
from dist_worker import one_step_grads, train_with_resume


@pytest.fixture(scope="module", params=["vanilla", "relaxed"])
def model_kind(request):
    return request.param


@pytest.fixture(scope="module")
def model_dir(model_kind, micro_model_dir, relaxed_model_dir):
    return micro_model_dir if model_kind == "vanilla" else relaxed_model_dir


@pytest.fixture(scope="module")
def single(data_dir, model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    env = D.DistEnv()
    grads = one_step_grads(model_dir, data_dir, "none", env)
    train_with_resume(data_dir, model_dir, out / "run", "none", 1)
    return grads, out / "run"


def metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_ranks_match_single_process(mode, single, data_dir, model_dir, tmp_path):
    worker = os.path.join(os.path.dirname(__file__), "dist_worker.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           worker, mode, str(tmp_path), str(data_dir), str(model_dir)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.path.dirname(__file__)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref_grads, ref_run = single
    grads = torch.load(tmp_path / "grads.pt")
    assert set(grads) == set(ref_grads)
    for name, g in ref_grads.items():
        assert torch.allclose(grads[name], g, atol=1e-5, rtol=0), name
    assert max(g.abs().max() for g in ref_grads.values()) > 1e-3  # the comparison is not vacuous
    got, ref = metrics(tmp_path / "run"), metrics(ref_run)
    assert [r["step"] for r in got] == [r["step"] for r in ref] and len(got) >= 3
    for a, b in zip(got, ref):
        for key in ("loss", "val_loss"):
            assert (key in a) == (key in b) and abs(a.get(key, 0) - b.get(key, 0)) <= 1e-5, (key, a, b)
    wa = load_file(tmp_path / "run" / "model" / "model.safetensors")
    wb = load_file(ref_run / "model" / "model.safetensors")
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wb)
    assert "final val loss" in proc.stdout


def test_fsdp_shards_a_shared_block_as_one_unit(relaxed_model_dir, micro_model_dir):
    from recursa.model import load
    from recursa.train.losses import ForwardOutputs

    relaxed = load(relaxed_model_dir)
    units = D.fsdp_units(ForwardOutputs(relaxed))
    assert units == [([relaxed.layers[0], relaxed.layers[1], relaxed.lora], False)]
    vanilla = load(micro_model_dir)
    assert D.fsdp_units(vanilla) == [([layer], True) for layer in vanilla.layers]
