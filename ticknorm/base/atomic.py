"""Write files and folders so that a reader never sees half of one, and check before any work
that an output can be written at all.

A file is written to a temporary file in the same folder and renamed into place. A folder that
is one unit (a golden bundle) is written whole into a staging folder beside it and swapped in by
one atomic exchange (`renameat2(RENAME_EXCHANGE)` on Linux); where the exchange is unavailable,
two renames with the previous folder parked under a name `load` paths recognize, so a kill
between them leaves both units complete on disk, never a mix."""

import contextlib
import ctypes
import errno
import os
import shutil
import tempfile
from pathlib import Path

from ticknorm.base.errors import OutputPathError

PARKED_SUFFIX = ".previous"  # a unit parked by a swap that did not finish (no atomic exchange here)


def check_writable(path, what: str = "output") -> Path:
    """Refuse now, before hours of work, an output that could not be written later: a path that
    is a folder, a parent that is a file, a folder this user cannot write to."""
    path = Path(path)
    if path.is_dir():
        raise OutputPathError(f"{what} {path} is a folder; give a file name")
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise OutputPathError(f"cannot write {what} {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputPathError(f"cannot write {what} {path}: no permission to write in {parent}")
    if path.exists() and not os.access(path, os.W_OK) and not os.access(path.parent, os.W_OK):
        raise OutputPathError(f"cannot write {what} {path}: it is read-only")
    return path


def check_writable_folder(path, what: str = "folder") -> Path:
    """Like `check_writable`, for an output that is a folder (it may exist, and must then be one)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputPathError(f"{what} {path} is a file, not a folder")
    if path.is_dir():
        if not os.access(path, os.W_OK | os.X_OK):
            raise OutputPathError(f"cannot write {what} {path}: no permission to write in it")
        return path
    check_writable(path, what)
    return path


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; on success rename it into place, on failure remove it."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise OutputPathError(f"cannot write {path}: {exc.strerror or exc}") from exc
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a written file gets the usual permissions
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text(path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


@contextlib.contextmanager
def staging_folder(target):
    """Yield an empty folder beside `target` (same filesystem, so `swap_folder` can rename it into
    place); whatever is left at its path when the block ends (the previous unit after a swap, or
    an unfinished new one) is removed."""
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".staging", dir=target.parent))
    except OSError as exc:
        raise OutputPathError(f"cannot write {target}: {exc.strerror or exc}") from exc
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def swap_folder(staging: Path, target: Path) -> None:
    """Put `staging` at `target`; the previous `target`, if any, ends up at `staging`."""
    if not target.exists():
        os.rename(staging, target)
        return
    if _exchange(staging, target):
        return
    parked = target.with_name(target.name + PARKED_SUFFIX)
    shutil.rmtree(parked, ignore_errors=True)
    os.rename(target, parked)
    os.rename(staging, target)
    os.rename(parked, staging)


def _exchange(first: Path, second: Path) -> bool:
    """Swap two paths in one step where the kernel and filesystem can (Linux renameat2)."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    at_cwd, exchange = -100, 2
    if renameat2(at_cwd, os.fsencode(first), at_cwd, os.fsencode(second), exchange) == 0:
        return True
    if ctypes.get_errno() in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    code = ctypes.get_errno()
    raise OutputPathError(f"cannot replace {second}: {os.strerror(code)}")


@contextlib.contextmanager
def locked_folder(path):
    """Hold an exclusive lock on the folder at `path` for the block: appends into it from several
    processes take turns, and a swap (`staged_folder`) waits for them. The lock is on the folder
    itself, so it works in a read-only parent; if a swap replaced the folder while we waited,
    the lock is taken again on the one now at `path`."""
    import fcntl

    path = Path(path)
    while True:
        try:
            handle = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as exc:
            raise OutputPathError(f"cannot lock {path}: {exc.strerror or exc}") from exc
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            current = os.stat(path).st_ino
        except FileNotFoundError:
            current = None
        if current == os.fstat(handle).st_ino:
            break
        os.close(handle)  # swapped away while we waited: lock the folder now at `path`
    try:
        yield path
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        os.close(handle)
