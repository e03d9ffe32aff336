"""Writing files and folders so that a crash never leaves half of one, and the digests that tell a
folder's files apart: the one set of helpers training and serving use."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import hashlib
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

PARTIAL = ".partial-"  # a folder being written: .<name>.partial-<pid>, beside its target
RENAME_EXCHANGE = 2  # renameat2(2): swap two paths in one step
AT_FDCWD = -100


def atomic_write(path: Path | str, write: Callable[[Path], object]) -> Path:
    """`write(temporary)` beside `path`, then rename it over `path` (atomic on one file system)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".partial")
    try:
        write(temporary)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path


@contextlib.contextmanager
def staged_folder(target: Path | str) -> Iterator[Path]:
    """An empty sibling folder to write `target`'s new contents into; when the block ends without
    an error it takes `target`'s place in one step (the previous contents are removed), otherwise
    it is removed and `target` stays as it was. Folders left by writers that died are removed."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned(target)
    staging = target.with_name(f".{target.name}{PARTIAL}{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
        replace_folder(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def remove_abandoned(target: Path) -> list[Path]:
    """Staging folders of `target` whose writing process no longer runs (killed mid-way)."""
    removed = []
    for staging in target.parent.glob(f".{target.name}{PARTIAL}*"):
        pid = staging.name.rsplit(PARTIAL, 1)[1]
        if not pid.isdigit() or not _running(int(pid)):
            shutil.rmtree(staging, ignore_errors=True)
            removed.append(staging)
    return removed


def replace_folder(source: Path, target: Path) -> None:
    """Put folder `source` at `target`: swapped in one step where the kernel can (Linux's
    renameat2), else the old one moved aside first; the old contents end up at `source`."""
    if not target.exists():
        os.replace(source, target)
        return
    if _exchange(source, target):
        return
    aside = target.with_name(f".{target.name}.old-{os.getpid()}")
    os.replace(target, aside)
    os.replace(source, target)
    os.replace(aside, source)


def file_digest(path: Path | str) -> str:
    """The SHA-256 of a file, remembered while its size and modification time stay the same."""
    status = os.stat(path)
    return _digest(str(Path(path).resolve()), status.st_size, status.st_mtime_ns)


def folder_digests(folder: Path, leave_out: tuple[str, ...] = ()) -> dict[str, str]:
    """Every file under `folder` (but those named in `leave_out`), by its path relative to it."""
    return {path.relative_to(folder).as_posix(): file_digest(path)
            for path in sorted(folder.rglob("*")) if path.is_file() and path.name not in leave_out}


@functools.lru_cache(maxsize=256)
def _digest(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as opened:
        for block in iter(lambda: opened.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _exchange(first: Path, second: Path) -> bool:
    """Swap two paths atomically (renameat2 with RENAME_EXCHANGE); False where unsupported."""
    libc = _libc()
    if libc is None or not hasattr(libc, "renameat2"):
        return False
    result = libc.renameat2(AT_FDCWD, os.fsencode(first), AT_FDCWD, os.fsencode(second), RENAME_EXCHANGE)
    if result == 0:
        return True
    error = ctypes.get_errno()
    if error in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: this file system or kernel cannot swap
        return False
    raise OSError(error, os.strerror(error), str(second))


@functools.cache
def _libc():
    name = ctypes.util.find_library("c")
    return ctypes.CDLL(name, use_errno=True) if name else None
