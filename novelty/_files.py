"""Writing a file whole: under a temporary name beside it, fsync'd, then renamed into
place, so a reader sees the old file or the whole new one, never a part. A temporary
name says which process wrote it, so one that a killed writer left is removed by the
next write of the same file."""
from __future__ import annotations

import contextlib
import glob
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path


def temp_beside(path: Path, suffix: str = ".tmp") -> Path:
    """A temporary name beside `path` for writing it whole, '.NAME.~PID@HOST~RANDOM' +
    suffix. The temporary files of a process killed before it could remove them (kill -9,
    the OOM killer) are removed here first: those of `path` whose process, on this host,
    is gone."""
    path = Path(path)
    host = socket.gethostname()
    for old in path.parent.glob(f".{glob.escape(path.name)}.~*@*~*"):
        owner = old.name[len(path.name) + 3:].split("~", 1)[0]
        pid, _, at = owner.partition("@")
        if at == host and pid.isdigit() and not _alive(int(pid)):
            old.unlink(missing_ok=True)
    return path.with_name(f".{path.name}.~{os.getpid()}@{host}~{uuid.uuid4().hex[:8]}{suffix}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


@contextlib.contextmanager
def atomic_path(path: Path, sync: bool = True, suffix: str = ".tmp") -> Iterator[Path]:
    """A temporary name beside `path`, for a writer that takes a file name (faiss):
    fsync'd (with `sync`) and os.replace'd into place when the block ends, removed when
    it raises (disk full, Ctrl-C), so `path` is either the old file or the whole new one."""
    path = Path(path)
    tmp = temp_beside(path, suffix)
    try:
        yield tmp
        if sync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_file(path: Path, mode: str = "wb", **open_kw) -> Iterator:
    """A file object on atomic_path's temporary name, fsync'd through itself."""
    with atomic_path(path, sync=False) as tmp, open(tmp, mode, **open_kw) as f:
        yield f
        f.flush()
        os.fsync(f.fileno())


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_file(path) as f:
        f.write(data)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())
