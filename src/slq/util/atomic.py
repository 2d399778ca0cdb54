"""Atomic, durable writes: build in a hidden temporary sibling, fsync, rename into place at the end.

Invariants (what a reader of ``dest`` can rely on, whatever happens to the writer):

- ``dest`` is either absent, the complete old version, or the complete new version; never a mix.
  The new version is built in ``.NAME.tmp-PID-XXXX`` beside ``dest`` and becomes ``dest`` by one
  rename. Replacing an existing ``dest`` is one atomic exchange where the kernel offers it
  (Linux ``renameat2(RENAME_EXCHANGE)``); elsewhere the old version is renamed aside to
  ``.NAME.old-PID-XXXX`` only once the new one is complete, then the new one is renamed in.
- Durable before visible: every file and directory of the new version is fsync'ed before the
  rename, and the parent directory after it, so a power loss cannot leave a renamed but empty file.
- Crash leftovers are cleaned up by the next write of the same ``dest`` (and said so on stderr):
  a ``.NAME.tmp-*`` whose writing process is gone is deleted; a ``.NAME.old-*`` is put back as
  ``dest`` when ``dest`` is missing (a crash between the two renames of the fallback), deleted
  otherwise. Leftovers of a process that is still running are left alone (concurrent writers).
"""

from __future__ import annotations

import ctypes
import glob
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def note(msg: str) -> None:
    """What cleanup did, on stderr (the library's only chatter; the CLI shows it as is)."""
    print(f"slq: {msg}", file=sys.stderr)


def fsync_file(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a directory (its entries: renames and new files in it); a no-op where unsupported."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for d, _, files in os.walk(root):
        for f in files:
            fsync_file(os.path.join(d, f))
        fsync_dir(d)


def replace_file(tmp: str | os.PathLike, dest: str | os.PathLike) -> None:
    """Durably move a finished file ``tmp`` onto ``dest`` with the umask's mode (0644 usually; safetensors'
    writer leaves 0600): chmod and fsync it, rename, fsync the directory."""
    os.chmod(tmp, _mode(True))
    fsync_file(tmp)
    os.replace(tmp, dest)
    fsync_dir(Path(dest).parent)


def _mode(file: bool) -> int:
    umask = os.umask(0)
    os.umask(umask)
    return (0o666 if file else 0o777) & ~umask


@contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w") -> Iterator:
    """An open temporary file that becomes ``path`` (umask modes, usually 0644) when the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _mode(True))
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2); False where the platform or filesystem can't."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0


def _leftover_pid(p: Path, kind: str, name: str) -> int | None | bool:
    """The writer's pid of ``.NAME.{kind}-PID-XXXX``; None for the older ``.NAME.{kind}-XXXXXXXX`` (no pid);
    False when ``p`` is not a leftover of ``name`` at all (e.g. of another directory whose name has ours
    as a prefix)."""
    m = re.fullmatch(rf"\.{re.escape(name)}\.{kind}-(?:(\d+)-[a-z0-9_]+|[a-z0-9_]{{8}})", p.name)
    if m is None:
        return False
    return int(m.group(1)) if m.group(1) else None


def _writer_alive(pid: int | None) -> bool:
    """Whether the process that made a leftover still runs (this one counts as alive)."""
    if pid is None:
        return False  # the older naming: written before this version, nothing can still be writing it
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def clean_stale(dest: str | os.PathLike, log: Callable[[str], None] = note) -> list[Path]:
    """Remove (or restore) what interrupted writes of ``dest`` left beside it; returns what it handled."""
    dest = Path(dest)
    if not dest.parent.is_dir():
        return []
    handled = []
    for kind in ("old", "tmp"):  # old first: a missing dest is restored before anything else happens
        for p in sorted(dest.parent.glob(f".{glob.escape(dest.name)}.{kind}-*")):
            pid = _leftover_pid(p, kind, dest.name)
            if pid is False or _writer_alive(pid):
                continue
            handled.append(p)
            if kind == "old" and not dest.exists():
                src = p / "old" if (p / "old").is_dir() else p  # the older layout kept it one level down
                os.replace(src, dest)
                fsync_dir(dest.parent)
                if src != p:
                    shutil.rmtree(p, ignore_errors=True)
                log(f"restored {dest} from {p.name}, left by an interrupted replace")
            else:
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
                log(f"removed {p}, left by an interrupted write of {dest.name}")
    return handled


@contextmanager
def atomic_directory(dest: Path, *, replace: bool = False, log: Callable[[str], None] = note) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``dest`` when the block succeeds.

    With ``replace`` an existing ``dest`` is swapped out; without it, a ``dest`` that appeared
    meanwhile (another process finished first) wins and this result is dropped.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(dest, log)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-{os.getpid()}-", dir=dest.parent))
    try:
        yield tmp
        _publishable(tmp)
        _fsync_tree(tmp)
        if dest.exists() and replace:
            if _exchange(tmp, dest):  # one rename: dest is the new version, tmp now holds the old one
                fsync_dir(dest.parent)
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                old = Path(tempfile.mktemp(prefix=f".{dest.name}.old-{os.getpid()}-", dir=dest.parent))
                os.replace(dest, old)
                os.replace(tmp, dest)
                fsync_dir(dest.parent)
                shutil.rmtree(old, ignore_errors=True)
        elif dest.exists():
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, dest)
            fsync_dir(dest.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _publishable(d: Path) -> None:
    """mkdtemp makes 0700 directories; give the result the usual umask-based modes (0755/0644)."""
    os.chmod(d, _mode(False))
    for root, dirs, files in os.walk(d):
        for x in dirs:
            os.chmod(os.path.join(root, x), _mode(False))
        for x in files:
            os.chmod(os.path.join(root, x), _mode(True))
