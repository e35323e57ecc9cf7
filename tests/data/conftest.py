"""Fixtures for the data tests: an offline download cache and a guard against real downloads."""
from __future__ import annotations

from pathlib import Path

import pytest

from corpus_fixtures import MAKERS
from recursa.data import sources
from recursa.data.sources import SOURCES, package_dir


@pytest.fixture
def no_downloads(monkeypatch):
    """Any attempt to run a download command fails the test."""
    def refuse(cmd, cwd, what):
        raise AssertionError(f"tried to download {what}: {cmd}")
    monkeypatch.setattr(sources, "_run", refuse)


@pytest.fixture
def fixture_cache(tmp_path, no_downloads) -> Path:
    """A download cache already holding all four fixture packages, so prepare runs offline."""
    cache = tmp_path / "cache"
    for source in SOURCES:
        MAKERS[source.name](package_dir(source, cache))
    return cache
