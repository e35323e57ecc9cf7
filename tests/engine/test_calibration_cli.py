"""`recursa generate --target-agreement / --exit-policy-file`: calibrate, save, reuse, refuse mismatches."""
import json

import pytest
import torch

from recursa.cli import main
from recursa.data.packed import write_tokens
from recursa.data.tokenizer import train_tokenizer
from recursa.model import Decoder
from recursa.presets import preset


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    tok = train_tokenizer(["the cat sat on the mat. " * 40, "once upon a time there was a sea"], vocab_size=300)
    torch.manual_seed(3)
    model = Decoder(preset("tiny", vocab_size=tok.vocab_size, exit_depths=[1, 2])).eval()
    path = tmp_path_factory.mktemp("exit-model")
    model.save(path)
    tok.save(path)
    data = tmp_path_factory.mktemp("corpus")
    g = torch.Generator().manual_seed(0)
    write_tokens(data, "val", [torch.randint(0, tok.vocab_size, (4000,), generator=g).tolist()], tok.vocab_size)
    return path, data


def _generate(model, *flags):
    return main(["generate", str(model), "--prompt", "the cat", "--max-tokens", "5", "--exit-strategy", "parallel",
                 *flags])


@pytest.mark.parametrize("target", ["0.3", "0.9999"])
def test_calibrate_save_and_reuse(dirs, target, capsys):
    model, data = dirs
    assert _generate(model, "--target-agreement", target, "--calibration-data", str(data),
                     "--calibration-sequences", "4") == 0
    err = capsys.readouterr().err
    saved = json.loads((model / "exit_calibration.json").read_text())
    assert saved["target"] == float(target) and saved["exit_depths"] == [1, 2] and "held out" in err
    if saved["threshold"] is None:
        assert "full depth" in err
    else:
        assert saved["bound"] >= float(target)
    assert _generate(model, "--target-agreement", target) == 0            # reuses the saved rule
    assert _generate(model, "--exit-policy-file", str(model / "exit_calibration.json")) == 0
    assert _generate(model, "--target-agreement", "0.5") == 2              # calibrated for another target
    assert "is calibrated for target agreement" in capsys.readouterr().err


@pytest.mark.parametrize("flags,message", [
    (["--target-agreement", "1.2"], "must lie in (0, 1)"),
    (["--target-agreement", "0.9", "--calibration-delta", "0"], "must lie in (0, 1)"),
    (["--target-agreement", "0.9", "--exit-threshold", "0.5"], "drop --exit-threshold"),
    (["--calibration-data", "x"], "needs --target-agreement"),
    (["--exit-policy-file", "nowhere.json"], "no exit calibration"),
])
def test_bad_calibration_flags_are_one_line_errors(dirs, flags, message, capsys):
    assert _generate(dirs[0], *flags) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
