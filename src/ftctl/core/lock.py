"""One writer per run directory: an OS lock (``flock``) on ``<folder>/.ftctl.lock``, held for the writer's life
and released by the kernel when its process ends, however it ends (kill -9 included).

A second writer gets ``RunDirError`` (exit 2) naming the pid and the command that hold the folder. The workers
of a multi-process run share their launcher's lock: it is held by ``ftctl train`` before torchrun starts, and the
workers find its path in ``$FTCTL_HELD_LOCKS``."""
from __future__ import annotations

import contextlib
import fcntl
import os
import sys
from pathlib import Path

from ftctl.core.errors import RunDirError

LOCK_FILE = ".ftctl.lock"
HELD_ENV = "FTCTL_HELD_LOCKS"  # lock files a parent process holds for this one (os.pathsep-separated)

_held: dict[str, int] = {}  # resolved folder -> open descriptor holding its lock


def _key(folder: Path) -> str:
    return str(Path(folder).expanduser().resolve())


def _inherited(key: str) -> bool:
    return key in os.environ.get(HELD_ENV, "").split(os.pathsep)


def inherited(folder: Path) -> bool:
    """Whether the process that started this one holds ``folder`` for it (a torchrun worker's run directory)."""
    return _inherited(_key(folder))


def holder(folder: Path) -> str | None:
    """'pid N (command)' of the process holding ``folder``'s lock, or None when nobody holds it."""
    f = Path(folder) / LOCK_FILE
    if not f.is_file() or _key(folder) in _held or _inherited(_key(folder)):
        return None
    try:
        fd = os.open(f, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return None
    except OSError:
        try:
            who = f.read_text().strip() or "unknown"
        except OSError:
            who = "unknown"
        return f"pid {who}"
    finally:
        os.close(fd)


def _in_use(folder: Path, who: str) -> RunDirError:
    return RunDirError(f"{folder} is in use by {who}: one writer per run directory",
                       hint="wait for it to finish, or stop it; its checkpoints are kept")


def check_free(folder: Path) -> None:
    """RunDirError naming the holder if another process holds ``folder`` (a check before slow work; ``acquire``
    when it is time to write)."""
    who = holder(folder) if Path(folder).is_dir() else None
    if who:
        raise _in_use(folder, who)


def acquire(folder: Path, command: str) -> None:
    """Take ``folder``'s lock for this process (the folder must exist); RunDirError if another process has it.
    Taking a lock this process (or its launcher) already holds is a no-op."""
    key = _key(folder)
    if key in _held or _inherited(key):
        return
    f = Path(folder) / LOCK_FILE
    try:
        fd = os.open(f, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise RunDirError(f"{folder}: cannot create its lock file {f.name} ({e.strerror or e})") from e
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise _in_use(folder, holder(folder) or "another process") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()} ({command})\n".encode())
    _held[key] = fd


def release(folder: Path) -> None:
    """Give back ``folder``'s lock if this process holds it (the file stays: deleting it would race)."""
    fd = _held.pop(_key(folder), None)
    if fd is not None:
        os.close(fd)


def held_env(folder: Path) -> dict:
    """Environment entries that tell child processes (torchrun's workers) this process holds ``folder``."""
    keys = [k for k in os.environ.get(HELD_ENV, "").split(os.pathsep) if k] + [_key(folder)]
    return {HELD_ENV: os.pathsep.join(dict.fromkeys(keys))}


@contextlib.contextmanager
def hold(folder: Path, command: str | None = None):
    """``acquire`` for the ``with`` block (released after it, unless it was held before)."""
    key = _key(folder)
    before = key in _held or _inherited(key)
    acquire(folder, command or " ".join(["ftctl", *sys.argv[1:2]]))
    try:
        yield
    finally:
        if not before:
            release(folder)
