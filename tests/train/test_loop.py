"""The training loop end to end on a micro model: exact resume, outputs, learning, bad input."""
import argparse
import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import recursa
from recursa.cli import train as train_cli
from recursa.data.packed import read_tokens
from recursa.errors import RecursaError
from recursa.model import Decoder
from recursa.train import TrainConfig, train
from recursa.train.checkpoint import find_checkpoint, load_trainer_state, save_checkpoint
from recursa.train.data import val_windows
from train_helpers import micro_config


def make_cfg(data_dir, init, out, **kw):
    base = dict(data=str(data_dir), out=str(out), preset=None if init else "tiny", init=str(init) if init else None, seq_len=16, batch_size=4,
                grad_accum=2, lr=1e-2, warmup_steps=2, max_steps=6, eval_every=3, eval_batches=2,
                save_every=3, progress=False)
    return TrainConfig(**{**base, **kw})


def read_metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


class Killed(Exception):
    """Raised from on_step to stop training the way a kill would, right after a checkpoint."""


@pytest.fixture(scope="module")
def full_run(data_dir, micro_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    summary = train(make_cfg(data_dir, micro_model_dir, out))
    return out, summary


def test_resume_after_kill_repeats_the_uninterrupted_run_exactly(full_run, data_dir, micro_model_dir, tmp_path):
    full_out, _ = full_run
    out = tmp_path / "killed"

    def kill(step, record):
        if step == 4:  # one step past the checkpoint at 3: its metrics must be dropped on resume
            raise Killed

    with pytest.raises(Killed):
        train(make_cfg(data_dir, micro_model_dir, out), on_step=kill)
    assert load_trainer_state(find_checkpoint(out))["step"] == 3
    assert not (out / "model").exists()
    train(make_cfg(data_dir, micro_model_dir, out, resume=True))
    full = [(r["step"], r.get("loss"), r.get("val_loss")) for r in read_metrics(full_out)]
    resumed = [(r["step"], r.get("loss"), r.get("val_loss")) for r in read_metrics(out)]
    assert resumed == full  # bitwise: fp32 on CPU
    a, b = load_file(full_out / "model" / "model.safetensors"), load_file(out / "model" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_run_writes_metrics_checkpoint_model_and_summary(full_run, data_dir):
    out, summary = full_run
    records = read_metrics(out)
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 7))
    for key in ("loss", "ce", "lr", "tokens_per_s", "elapsed", "grad_norm", "tokens"):
        assert key in steps[0]
    assert [r["step"] for r in records if "val_loss" in r] == [3, 6]
    assert steps[0]["lr"] == pytest.approx(1e-2 / 2)  # warmup step 1 of 2
    assert steps[-1]["tokens"] == 6 * 4 * 2 * 16
    assert load_trainer_state(out / "checkpoint")["step"] == 6
    assert (out / "model" / "tokenizer.json").is_file()
    model = recursa.load(out / "model")
    # the summary's val loss, recomputed independently from the saved model
    w = torch.from_numpy(val_windows(read_tokens(data_dir, "val"), 16, 2 * 4).astype(np.int64))
    with torch.no_grad():
        logp = torch.log_softmax(model(w[:, :-1]), -1)
    val = -logp.gather(-1, w[:, 1:, None]).mean().item()
    saved = json.loads((out / "summary.json").read_text())
    assert saved == summary and saved["val_loss"] == pytest.approx(val, rel=1e-5)
    assert saved["unigram_loss"] > 0


def test_training_beats_the_unigram_baseline(data_dir, micro_model_dir, tmp_path, capsys):
    summary = train(make_cfg(data_dir, micro_model_dir, tmp_path / "learn", max_steps=60, seq_len=32,
                             grad_accum=1, batch_size=8, eval_every=0, save_every=0, schedule="wsd"))
    assert summary["val_loss"] < summary["unigram_loss"] - 0.3
    assert "unigram baseline" in capsys.readouterr().out


def test_preset_from_scratch_takes_vocab_from_data_and_distill_term_is_logged(data_dir, micro_model_dir, tmp_path):
    out = tmp_path / "scratch"
    cfg = make_cfg(data_dir, None, out, max_steps=1, grad_accum=1,
                   distill_from=str(micro_model_dir), distill_weight=0.5)
    train(cfg)
    rec = read_metrics(out)[0]
    assert rec["distill_kl"] > 0 and rec["loss"] == pytest.approx(rec["ce"] + 0.5 * rec["distill_kl"], rel=1e-5)
    assert recursa.load(out / "model").cfg.vocab_size == 64


def test_checkpoint_swap_is_atomic(tmp_path):
    torch.manual_seed(0)
    model = Decoder(micro_config())
    save_checkpoint(tmp_path, model, {"step": 1})
    (tmp_path / "checkpoint.tmp-killed").mkdir()  # a save that was killed half way
    save_checkpoint(tmp_path, model, {"step": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]
    # killed between the two renames: only checkpoint.old is complete, a half-written dir is ignored
    os.replace(tmp_path / "checkpoint", tmp_path / "checkpoint.old")
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "checkpoint" / "config.json").write_text("{}")
    assert find_checkpoint(tmp_path) == tmp_path / "checkpoint.old"
    assert load_trainer_state(find_checkpoint(tmp_path))["step"] == 2


def _cli(argv):
    parser = argparse.ArgumentParser()
    train_cli.register(parser.add_subparsers())
    args = parser.parse_args(["train", *argv])
    return args.func(args)


@pytest.mark.parametrize("extra, message", [
    (["--data", "{tmp}/nope"], "does not exist"),
    (["--preset", "huge"], "unknown preset"),
    (["--lr", "-1"], "lr must be positive"),
    (["--resume"], "holds no checkpoint"),
    (["--max-steps", "0"], "max_steps"),
    (["--init", "{micro}", "--seq-len", "128"], "exceeds the model's max_seq_len"),
    (["--init", "{tmp}"], "has no model.safetensors"),
    (["--distill-weight", "1"], "--distill-from"),
])
def test_bad_input_is_one_line_recursa_error(data_dir, micro_model_dir, tmp_path, extra, message):
    argv = ["--data", str(data_dir), "--out", str(tmp_path / "o"), "--max-steps", "1", "--no-progress"]
    argv += [a.replace("{tmp}", str(tmp_path)).replace("{micro}", str(micro_model_dir)) for a in extra]
    with pytest.raises(RecursaError, match=message) as e:
        _cli(argv)
    assert "\n" not in str(e.value)


def test_existing_checkpoint_without_resume_is_refused(full_run, data_dir):
    out, _ = full_run
    with pytest.raises(RecursaError, match="already holds a checkpoint"):
        _cli(["--data", str(data_dir), "--out", str(out), "--max-steps", "1"])
