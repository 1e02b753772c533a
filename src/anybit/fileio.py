"""Atomic output: write under a temporary name, fsync, then rename into place.

A reader -- ``from_pretrained``, ``anybit eval``, a resumed run -- sees a file or directory
either complete or not at all. Temporary names start with a dot and carry the writer's pid, so
a later run can tell the leftovers of a killed writer (removed) from a live one's (kept).
Published files get the modes a plain write would give them under the umask: ``mkdtemp`` and
``mkstemp`` (and transformers' own temporaries) make them private. Write failures (disk full,
read-only, permissions) become one ``AnybitError`` naming the path.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from safetensors import SafetensorError

from anybit.errors import AnybitError


def _umask() -> int:
    mask = os.umask(0)  # the only portable way to read the umask is to set it
    os.umask(mask)
    return mask


def _fsync(path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _reason(exc: BaseException) -> str:
    """The cause in a few words: safetensors reports I/O errors as text inside its own error
    ("Error while serializing: I/O error: No space left on device (os error 28)")."""
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    text = str(exc).split("I/O error: ", 1)[-1]
    return re.sub(r" \(os error \d+\)$", "", text)


@contextmanager
def write_errors(target: Path):
    """Turn a failed write (ENOSPC, EROFS, EACCES, ...) into one line naming ``target``."""
    try:
        yield
    except (OSError, SafetensorError) as exc:
        raise AnybitError(f"cannot write {target}: {_reason(exc)}") from exc


def finish_tree(path: Path) -> None:
    """Give everything under ``path`` the umask's modes, then fsync it, files before their
    folders: the rename that publishes ``path`` must not reach the disk before its contents."""
    mask = _umask()
    for root, dirs, files in os.walk(path, topdown=False):
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~mask)
            _fsync(os.path.join(root, name))
        os.chmod(root, 0o777 & ~mask)
        _fsync(root, directory=True)


def _temp_prefix(target: Path, kind: str) -> str:
    return f".{target.name}.{kind}-{os.getpid()}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale(target: Path) -> None:
    """Delete the temporaries of ``target`` whose writer has died (kill -9, power loss)."""
    prefix = f".{target.name}."
    if not target.parent.is_dir():
        return
    for entry in target.parent.iterdir():
        kind_pid = entry.name[len(prefix):].split("-")
        if not (entry.name.startswith(prefix) and len(kind_pid) >= 2 and kind_pid[0] in ("tmp", "old")
                and kind_pid[1].isdigit()):
            continue
        if int(kind_pid[1]) != os.getpid() and not _alive(int(kind_pid[1])):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)


def check_output_dir(out: Path, overwrite: bool) -> None:
    """Fail before any work if ``out`` cannot become the output directory."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise AnybitError(f"output path {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise AnybitError(f"output directory {out} is not empty (use --overwrite to replace it)")
    existing = next((p for p in out.parents if p.exists()), Path("."))
    if not existing.is_dir():
        raise AnybitError(f"cannot create output directory {out}: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise AnybitError(f"cannot create output directory {out}: no permission to write in {existing}")


@contextmanager
def atomic_directory(out: Path, overwrite: bool = False):
    """Yield a temporary directory that replaces ``out`` only if the block completes."""
    out = Path(out)
    check_output_dir(out, overwrite)
    with write_errors(out):
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale(out)
        tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(out, "tmp"), dir=out.parent))
    try:
        with write_errors(out):
            yield tmp
            finish_tree(tmp)
            if out.exists():
                old = out.parent / f"{_temp_prefix(out, 'old')}0"
                os.replace(out, old)
                os.replace(tmp, out)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, out)
            _fsync(out.parent, directory=True)  # the rename itself survives a crash
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_file_atomic(path: Path, write) -> None:
    """Create ``path`` through ``write(temporary_path)``, then rename it into place."""
    path = Path(path)
    with write_errors(path):
        fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path, "tmp"), dir=path.parent)
        os.close(fd)
        try:
            write(Path(tmp))
            os.chmod(tmp, 0o666 & ~_umask())
            _fsync(tmp)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _fsync(path.parent, directory=True)


def write_json_atomic(path: Path, data) -> None:
    write_file_atomic(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n"))
