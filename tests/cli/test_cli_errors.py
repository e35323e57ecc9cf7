"""Every bad input to the CLI is one line and a non-zero exit, and leaves nothing half-written
(issue 15, defects 3-7). All cases run through `recursa.cli.main` in ONE child process
(run_many.py), so the suite pays the torch import once; each case then asserts its exit code,
its one-line message, and what is (not) left on disk.

Exit codes: 2 for input the user can fix (RecursaError, argparse), 1 for the system refusing a
write (a full disk, simulated with RLIMIT_FSIZE: the libraries' real write errors).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import stat
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from cli_helpers import corpus, run_cases, unwritable_dir
from recursa import load
from recursa.train import TrainConfig, train
from recursa.train.checkpoint import find_checkpoint, load_trainer_state

TRAIN = ["--seq-len", "16", "--batch-size", "2", "--max-steps", "2", "--eval-batches", "1", "--threads", "1",
         "--no-progress"]

# name -> (exit code, text the one-line message must hold)
EXPECT = {
    "argparse_missing": (2, "the following arguments are required: --out (see recursa train --help)"),
    "argparse_type": (2, "see recursa generate --help"),
    "train_out_file": (2, "is not a directory"),
    "train_out_under_file": (2, "is a file"),
    "train_out_unwritable": (2, "cannot write in"),
    "train_device_tpu": (2, "unknown device 'tpu'"),
    "train_device_gpu": (2, "unknown device 'gpu'"),
    "train_lr_inf": (2, "lr must be a finite number"),
    "train_wd_inf": (2, "weight_decay must be a finite number"),
    "train_clip_nan": (2, "grad_clip must be a finite number"),
    "train_seq_len_huge": (2, "--seq-len 100000 exceeds the tiny preset's max_seq_len 256"),
    "train_disk_full": (1, "File too large"),
    "train_diverges": (2, "became nan"),
    "train_resume_preset": (2, "--preset"),
    "train_resume_seq_len": (2, "--seq-len 16, not 8"),
    "train_resume_batch": (2, "--batch-size 2, not 3"),
    "train_resume_torn_metrics": (0, ""),
    "train_fresh_torn_metrics": (0, ""),
    "data_garbled_header": (2, "train.json"),
    "data_odd_bytes": (2, "bytes, not the"),
    "data_empty_split": (2, "holds no tokens"),
    "data_ids_outside_vocab": (2, "outside its vocabulary"),
    "eval_json_dir": (2, "is a directory"),
    "eval_json_char_device": (2, "not a regular file"),
    "eval_json_symlink": (2, "is a symlink"),
    "eval_json_fifo": (2, "not a regular file"),
    "eval_json_unwritable": (2, "cannot write in"),
    "eval_json_write_fails": (1, "File too large"),
    "eval_nan_weights": (2, "non-finite"),
    "generate_nan_weights": (2, "non-finite"),
    "generate_not_utf8": (2, "is not valid UTF-8"),
    "generate_threshold_above_1": (2, "never exit"),
    "generate_threshold_below_0": (2, "always exit"),
    "generate_threshold_without_strategy": (2, "--exit-threshold needs --exit-strategy"),
    "generate_max_tokens_engine": (2, "exceeds the model's max_seq_len 64"),
    "generate_max_tokens_copy": (2, "exceeds the model's max_seq_len 64"),
    "config_init_std": (2, "init_std must be a finite number, got 'x'"),
    "config_tie_embeddings": (2, "tie_embeddings must be true or false, got 'no'"),
    "config_eos_token_id": (2, "eos_token_id must be an integer token id or null, got 3.5"),
    "convert_out_file": (2, "is not a directory"),
    "convert_out_under_file": (2, "is a file"),
    "convert_out_unwritable": (2, "cannot write in"),
    "convert_disk_full": (1, "File too large"),
    "prepare_out_file": (2, "is not a directory"),
    "prepare_out_under_file": (2, "is a file"),
    "prepare_out_unwritable": (2, "cannot write in"),
}


def _edit_config(src: Path, dst: Path, **changes) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**cfg, **changes}))
    return dst


def _damaged_corpora(root: Path, good: Path) -> dict[str, Path]:
    d = {name: root / name for name in ("garbled", "odd", "empty", "big_ids")}
    shutil.copytree(good, d["garbled"])
    (d["garbled"] / "train.json").write_text('{"dtype": "uint16", "n_tok')
    shutil.copytree(good, d["odd"])
    with open(d["odd"] / "train.bin", "ab") as f:
        f.write(b"\0")
    shutil.copytree(good, d["empty"])
    (d["empty"] / "val.bin").write_bytes(b"")
    header = json.loads((d["empty"] / "val.json").read_text())
    (d["empty"] / "val.json").write_text(json.dumps({**header, "n_tokens": 0}))
    corpus(d["big_ids"], top=200)   # header says vocab 64, ids reach 199
    return d


def _checkpointed_run(root: Path, data: Path, name: str) -> Path:
    out = root / name
    train(TrainConfig(data=str(data), out=str(out), preset="tiny", seq_len=16, batch_size=2, max_steps=2,
                      eval_batches=1, save_every=1, progress=False))
    return out


@pytest.fixture(scope="module")
def runs(cli_inputs, tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_cases")
    data, model = cli_inputs["data"], cli_inputs["model"]
    afile = root / "afile"
    afile.write_text("keep me\n")
    locked = unwritable_dir(root)
    (root / "adir").mkdir()
    os.symlink(afile, root / "link.json")
    os.mkfifo(root / "fifo.json")
    # never a system device: a broken build run as root would replace it with a regular file
    chardev = root / "null.json"
    try:
        os.mknod(chardev, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    except OSError:   # not root: no device nodes; the FIFO case still covers special files
        chardev = None
    nan_model = shutil.copytree(model, root / "nan_model")
    state = load_file(nan_model / "model.safetensors")
    state["layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(state, str(nan_model / "model.safetensors"))
    bad = _damaged_corpora(root, data)
    resume = _checkpointed_run(root, data, "resume")
    torn = _checkpointed_run(root, data, "torn")
    with open(torn / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 4.1')            # a kill in the middle of a line
    fresh_torn = root / "fresh_torn"
    fresh_torn.mkdir()
    (fresh_torn / "metrics.jsonl").write_text('{"step": 1, "loss": 4.0}\n{"step": 2, "lo')

    t = lambda out, *extra, data=data: ["train", "--data", str(data), "--out", str(out), *TRAIN, *extra]
    ev = lambda js: ["eval", str(model), "--data", str(data), "--tasks", "none", "--json", str(js), "--threads", "1"]
    gen = lambda m, *extra: ["generate", str(m), "--prompt", "a b", "--max-tokens", "3", "--threads", "1", *extra]
    conv = lambda out: ["convert", "--recursive", str(model), "--loops", "2", "--out", str(out)]
    prep = lambda out: ["data", "prepare", "--out", str(out), "--cache", str(root / "no-cache")]
    argv = {
        "argparse_missing": ["train", "--data", str(data)],
        "argparse_type": ["generate", str(model), "--prompt", "x", "--max-tokens", "abc"],
        "train_out_file": t(afile), "train_out_under_file": t(afile / "run"),
        "train_out_unwritable": t(locked / "run"),
        "train_device_tpu": t(root / "o1", "--device", "tpu"), "train_device_gpu": t(root / "o2", "--device", "gpu"),
        "train_lr_inf": t(root / "o3", "--lr", "inf"), "train_wd_inf": t(root / "o4", "--weight-decay", "inf"),
        "train_clip_nan": t(root / "o5", "--grad-clip", "nan"),
        "train_seq_len_huge": t(root / "o6", "--seq-len", "100000"),
        "train_disk_full": t(root / "full"),
        "train_diverges": t(root / "diverges", "--lr", "1e30", "--warmup-steps", "0", "--max-steps", "4"),
        "train_resume_preset": t(resume, "--resume", "--preset", "mor-tiny"),
        "train_resume_seq_len": t(resume, "--resume", "--seq-len", "8"),
        "train_resume_batch": t(resume, "--resume", "--batch-size", "3"),
        "train_resume_torn_metrics": t(torn, "--resume", "--max-steps", "3"),
        "train_fresh_torn_metrics": t(fresh_torn, "--max-steps", "1"),
        "data_garbled_header": t(root / "o7", data=bad["garbled"]), "data_odd_bytes": t(root / "o8", data=bad["odd"]),
        "data_empty_split": t(root / "o9", data=bad["empty"]),
        "data_ids_outside_vocab": t(root / "o10", data=bad["big_ids"]),
        "eval_json_dir": ev(root / "adir"), "eval_json_char_device": ev(chardev) if chardev else None,
        "eval_json_symlink": ev(root / "link.json"), "eval_json_fifo": ev(root / "fifo.json"),
        "eval_json_unwritable": ev(locked / "x.json"), "eval_json_write_fails": ev(root / "results.json"),
        "eval_nan_weights": ["eval", str(nan_model), "--data", str(data), "--tasks", "none"],
        "generate_nan_weights": gen(nan_model),
        "generate_not_utf8": ["generate", str(model), "--prompt", "caf\udcc3\udca9 \udcff"],  # as Python decodes bad argv bytes
        "generate_threshold_above_1": gen(model, "--exit-strategy", "copy", "--exit-threshold", "2.0"),
        "generate_threshold_below_0": gen(model, "--exit-strategy", "parallel", "--exit-threshold", "-1"),
        "generate_threshold_without_strategy": gen(model, "--exit-threshold", "0.5"),
        "generate_max_tokens_engine": gen(model, "--max-tokens", "1000"),
        "generate_max_tokens_copy": gen(model, "--max-tokens", "1000", "--exit-strategy", "copy"),
        "config_init_std": gen(_edit_config(model, root / "c1", init_std="x")),
        "config_tie_embeddings": gen(_edit_config(model, root / "c2", tie_embeddings="no")),
        "config_eos_token_id": gen(_edit_config(model, root / "c3", eos_token_id=3.5)),
        "convert_out_file": conv(afile), "convert_out_under_file": conv(afile / "x"),
        "convert_out_unwritable": conv(locked / "x"), "convert_disk_full": conv(root / "conv_full"),
        "prepare_out_file": prep(afile), "prepare_out_under_file": prep(afile / "x"),
        "prepare_out_unwritable": prep(locked / "x"),
    }
    fsize = {"train_disk_full": 300_000, "convert_disk_full": 10_000, "eval_json_write_fails": 10}
    assert set(argv) == set(EXPECT)
    cases = {k: {"argv": v, "fsize": fsize.get(k)} for k, v in argv.items() if v is not None}
    for signum, out in SIGNALLED.items():   # Ctrl-C / SIGTERM a few steps into a long run
        flags = [f"--{k.replace('_', '-')}={v}" for k, v in SIGNAL_RUN.items()]
        cases[out] = {"argv": ["train", "--data", str(data), "--out", str(root / out), *flags, "--max-steps", "1000000",
                               "--threads", "1", "--no-progress"], "signal": [signum, 3, str(root / out / "metrics.jsonl")]}
    results = run_cases(cases, root)
    return root, results


SIGNALLED = {signal.SIGINT: "sigint", signal.SIGTERM: "sigterm"}
SIGNAL_RUN = dict(preset="tiny", seq_len=16, batch_size=2, eval_batches=1, warmup_steps=10_000, eval_every=0)


@pytest.mark.parametrize("name", sorted(EXPECT))
def test_one_line_and_exit_code(runs, name):
    _, results = runs
    if name not in results:
        pytest.skip("making a device node needs root")
    res, (rc, needle) = results[name], EXPECT[name]
    err = res["err"].strip()
    assert "Traceback" not in err, err
    assert res["rc"] == rc, (res["rc"], err)
    if rc:
        assert len(err.splitlines()) == 1 and needle in err, err
        assert "usage:" not in err


def _leftovers(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*")
                  if ".tmp" in p.name or ".probe" in p.name or ".old" in p.name or p.name.startswith(".recursa-probe"))


def test_nothing_half_written_or_replaced(runs):
    root, results = runs
    assert _leftovers(root) == []
    assert (root / "afile").read_text() == "keep me\n"
    assert (root / "link.json").is_symlink() and stat.S_ISFIFO(os.stat(root / "fifo.json").st_mode)
    if (root / "null.json").exists():
        assert stat.S_ISCHR(os.stat(root / "null.json").st_mode)
    assert not (root / "conv_full").exists() and not (root / "results.json").exists()
    assert not (root / "full" / "checkpoint").exists() and not (root / "full" / "model").exists()
    for name in ("o1", "o3", "o6", "o7", "o10"):   # refused before any work: no run directory made
        assert not (root / name).exists()
    assert "val perplexity" in results["eval_json_write_fails"]["out"]   # printed before the write failed


def test_divergence_keeps_the_last_good_state(runs):
    root, _ = runs
    out = root / "diverges"
    assert not (out / "model").exists() and not (out / "summary.json").exists()
    model = load(out / "checkpoint")                       # finite weights (the loader checks)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    for line in (out / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in metrics.jsonl"))


def test_messages_name_the_offending_thing(runs):
    _, results = runs
    assert "layers.1.mlp.up_proj.weight" in results["generate_nan_weights"]["err"]
    engine, copy = (results[f"generate_max_tokens_{k}"]["err"].split("error: ")[1] for k in ("engine", "copy"))
    assert engine == copy                                  # both paths say the same thing


def test_torn_metrics_line_does_not_stop_a_run(runs):
    root, _ = runs
    for name, last in (("torn", 3), ("fresh_torn", 1)):
        records = [json.loads(line) for line in (root / name / "metrics.jsonl").read_text().splitlines()]
        assert records[-1]["step"] == last and all(isinstance(r["step"], int) for r in records)
        summary = json.loads((root / name / "summary.json").read_text(), parse_constant=lambda c: pytest.fail(c))
        assert summary["step"] == last and math.isfinite(summary["val_loss"])


def _records(out):
    return [(r["step"], r.get("loss"), r.get("val_loss")) for r in
            map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]


def test_sigint_and_sigterm_save_a_checkpoint_and_resume_continues_exactly(runs, cli_inputs):
    """Defect 2: each signal ends the step, writes a checkpoint, exits 128 + signum with one line; a
    --resume of the SIGINT run repeats the uninterrupted run bit for bit (fp32, CPU; the lr is still
    in its warmup, so it does not depend on --max-steps)."""
    root, results = runs
    for signum, name in SIGNALLED.items():
        res, out = results[name], root / name
        assert res["rc"] == 128 + signum and "Traceback" not in res["err"], res["err"]
        last = res["err"].strip().splitlines()[-1]
        assert last.startswith("recursa train: interrupted: checkpoint saved at step") and "--resume" in last
        step = load_trainer_state(find_checkpoint(out))["step"]
        assert step >= 3 and step == _records(out)[-1][0]
        assert sorted(p.name for p in out.iterdir()) == ["checkpoint", "metrics.jsonl"]   # no temp dirs, no model/
    data, out = cli_inputs["data"], root / "sigint"
    k = load_trainer_state(find_checkpoint(out))["step"]
    shape = {n: v for n, v in SIGNAL_RUN.items() if n != "preset"}
    train(TrainConfig(data=str(data), out=str(out), resume=True, preset=None, max_steps=k + 2, progress=False, **shape))
    train(TrainConfig(data=str(data), out=str(root / "whole"), max_steps=k + 2, progress=False, **SIGNAL_RUN))
    assert _records(out) == _records(root / "whole")


def test_a_second_signal_quits_at_once():
    from recursa.train.signals import StopOnSignal

    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)   # SIG_IGN under `cmd &`
    with StopOnSignal(announce=False) as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and stop.signum == signal.SIGTERM    # first: noted, the step goes on
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)                     # second: now (checkpoints are atomic)
            time.sleep(1)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before   # handlers restored
