"""Atomic file writes shared by every part of recursa that saves something.

A reader (or a run killed half way) never sees a half-written file: each writer goes to a temp
file beside the target and renames it into place. The result gets the mode an ordinary `open`
would give it (0666 minus the umask): `safetensors` and `tempfile` create private files (0600),
which another user then cannot read.

Full disks: safetensors and torch.save report them as their own errors (a Rust IoError text, a
C++ `enforce fail at inline_container.cc`); both become a plain OSError naming the file, which
the CLI prints as one line.

    write_text_atomic(path, text); write_json_atomic(path, obj)
    save_safetensors(tensors, path, metadata); torch_save_atomic(obj, path)
"""
from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Callable

from recursa.errors import RecursaError


def default_mode(directory: bool = False) -> int:
    """What open()/mkdir() would give a new file or directory under the current umask."""
    mask = None
    try:  # Linux >= 4.7 reports it without changing it
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                mask = int(line.split()[1], 8)
    except (OSError, ValueError):
        pass   # no /proc (not Linux): fall back below
    if mask is None:
        mask = os.umask(0o022)
        os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


def _as_os_error(e: Exception, path: Path) -> OSError:
    """A library's write error as an OSError: the errno its text names ("os error 28"), else ENOSPC
    when the file system has no room left, else EIO with the library's first line."""
    text = str(e).strip()
    code = re.search(r"os error (\d+)", text)
    if code is not None:
        number = int(code.group(1))
        return OSError(number, os.strerror(number), str(path))
    try:
        if os.statvfs(path.parent).f_bavail == 0:
            return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    except OSError:
        pass   # cannot tell whether the disk is full: report the original error
    first = text.splitlines()[0] if text else type(e).__name__
    return OSError(errno.EIO, f"write failed, is the disk full? ({first})", str(path))


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call write(tmp) for a temp path beside `path`, then give it the default mode and rename it
    into place; on any error the temp file is removed and `path` is left as it was."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    from safetensors import SafetensorError

    try:
        try:
            write(tmp)
        except (SafetensorError, RuntimeError) as e:  # their write errors (full disk, size limit) -> OSError
            raise _as_os_error(e, path) from None
        except OSError as e:
            if e.filename is None:   # a failing write() does not say which file: name it
                raise OSError(e.errno, e.strerror, str(path)) from None
            raise
        os.chmod(tmp, default_mode())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _no_nan(value):
    """JSON has no NaN/inf: non-finite floats become null (strict JSON readers reject NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _no_nan(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_no_nan(v) for v in value]
    return value


def json_dumps(data, indent: int | None = None) -> str:
    """Strict JSON (allow_nan=False) with non-finite floats written as null."""
    return json.dumps(_no_nan(data), indent=indent, allow_nan=False)


def write_json_atomic(path: str | os.PathLike, data) -> Path:
    return write_text_atomic(path, json_dumps(data, indent=2) + "\n")


def save_safetensors(tensors: dict, path: str | os.PathLike, metadata: dict | None = None) -> Path:
    from safetensors.torch import save_file

    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def torch_save_atomic(obj, path: str | os.PathLike) -> Path:
    import torch

    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def check_output_dir(path: str | os.PathLike, flag: str = "--out") -> Path:
    """Refuse, before any work, an output directory that cannot be made: a file at the path or at
    one of its parents, or a nearest existing directory that is not writable."""
    path = Path(path).expanduser()
    for p in (path, *path.parents):
        if not os.path.lexists(p):
            continue
        if not p.is_dir():
            where = "" if p == path else f": {p} is a file"
            raise RecursaError(f"{flag} {path} is not a directory{where}")
        _probe(p, flag, path)
        break
    return path


def _probe(directory: Path, flag: str, path: Path) -> None:
    """Create and remove an entry in `directory`: the one check of writability that also holds for
    root (to whom os.access says yes everywhere) and read-only mounts."""
    probe = directory / f".recursa-probe-{uuid.uuid4().hex[:8]}"
    try:
        probe.mkdir()
        probe.rmdir()
    except OSError as e:
        raise RecursaError(f"{flag} {path}: cannot write in {directory} ({e.strerror or e})") from None


def check_output_file(path: str | os.PathLike, flag: str) -> Path:
    """Refuse, before any work, an output file that would replace something else: a directory, a
    symlink, a device, FIFO or socket (an atomic write would swap it for a regular file), or a
    directory that cannot be made or written."""
    path = Path(path).expanduser()
    if path.is_symlink():
        raise RecursaError(f"{flag} {path} is a symlink: give the file it points to")
    if path.is_dir():
        raise RecursaError(f"{flag} {path} is a directory")
    if path.exists() and not path.is_file():
        raise RecursaError(f"{flag} {path} is not a regular file (a device, FIFO or socket)")
    check_output_dir(path.parent, flag)
    return path


@contextlib.contextmanager
def staged_dir(out_dir: str | os.PathLike, force: bool = False):
    """Yield a temp dir next to `out_dir`; on success it replaces `out_dir`, on error it is removed.

    Readers never see a half-written directory. An existing `out_dir` is an error unless `force`.
    """
    out = Path(out_dir)
    if out.exists() and not force:
        raise RecursaError(f"{out} already exists (pass --force to overwrite)")
    if out.exists() and not out.is_dir():
        raise RecursaError(f"{out} exists and is not a directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.{uuid.uuid4().hex[:12]}.tmp"
    tmp.mkdir()  # not mkdtemp: that makes it private, and the result should look like any mkdir
    try:
        yield tmp
        if out.exists():
            old = tmp.with_suffix(".old")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
