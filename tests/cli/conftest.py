"""Fixtures for the CLI tests (helpers in cli_helpers.py)."""
from __future__ import annotations

from pathlib import Path

import pytest

from cli_helpers import corpus, model_dir


@pytest.fixture(scope="session")
def cli_inputs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli_inputs")
    paths = {"root": root, "data": corpus(root / "data"), "model": model_dir(root / "model")}
    return paths
