"""Atomic writes: a file or a folder is written to a temporary sibling and renamed into place, so a crash
never leaves a half-written file that a later command would trust."""
from __future__ import annotations

import errno
import json
import math
import numbers
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from ftctl.core.errors import FtctlError, ModelNotFoundError, RunDirError

NONFINITE_KEY = "nonfinite"  # where json_safe lists the (dotted) keys whose NaN/Inf it wrote as null


def json_safe(obj):
    """``obj`` with every NaN/Inf float written as None (JSON null), since strict JSON readers reject the bare
    NaN/Infinity that json.dumps writes; a dict that held any gets ``"nonfinite": [its dotted keys]``
    (e.g. ``{"loss": null, "nonfinite": ["loss"]}``). A list is cleaned item by item (each dict flagged)."""
    if isinstance(obj, (list, tuple)):
        return [json_safe(x) for x in obj]
    bad: list[str] = []
    clean = _finite(obj, "", bad)
    if bad and isinstance(clean, dict):
        clean[NONFINITE_KEY] = list(dict.fromkeys([*(clean.get(NONFINITE_KEY) or []), *bad]))
    return clean


def _finite(x, where: str, bad: list[str]):
    if isinstance(x, dict):
        return {k: _finite(v, f"{where}.{k}" if where else str(k), bad) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v, f"{where}.{i}" if where else str(i), bad) for i, v in enumerate(x)]
    if isinstance(x, numbers.Real) and not isinstance(x, numbers.Integral) and not math.isfinite(float(x)):
        bad.append(where)
        return None
    return x


def disk_full(err: BaseException) -> bool:
    """Whether ``err``, or an error it was raised from, is a full disk or quota: OSError ENOSPC/EDQUOT, or a
    library's own error that carries the OS message (safetensors: "No space left on device (os error 28)")."""
    for _ in range(5):
        if err is None:
            return False
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(m in str(err) for m in ("No space left on device", "os error 28", "Disk quota exceeded")):
            return True
        err = err.__cause__ or err.__context__
    return False


@contextmanager
def writing(path, hint=None):
    """A full disk while the block writes ``path`` becomes one line that names it: RunDirError (exit status 2),
    with ``hint`` (a string, or a function called then) in brackets. Other errors pass through unchanged."""
    try:
        yield
    except FtctlError:
        raise
    except Exception as e:
        if not disk_full(e):
            raise
        raise RunDirError(f"No space left on device writing {path}", hint=hint() if callable(hint) else hint) from e


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_file(path: Path, write) -> Path:
    """``write(tmp)`` writes a temporary sibling of ``path`` (any writer: text, torch.save, savefig), which is
    then synced and renamed over ``path``; a failure leaves ``path`` as it was and no temporary file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with writing(path):
            write(tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_dir(path.parent)
    return path


def atomic_write_text(path: Path, text: str) -> None:
    atomic_file(path, lambda tmp: Path(tmp).write_text(text))


def atomic_write_json(path: Path, obj) -> None:
    """``obj`` as JSON; NaN/Inf are written as null and flagged (json_safe)."""
    atomic_write_text(path, json.dumps(json_safe(obj), indent=2, sort_keys=False, default=str, allow_nan=False) + "\n")


# ----------------------------------------------------------------------------- helpers
def atomic_folder(target: Path, build) -> Path:
    """Build a folder into a temporary sibling, then rename it into place (a crash leaves no half folder)."""
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        build(tmp)
        if target.exists():  # an unfinished or foreign folder without config.json: keep it aside
            shutil.rmtree(tmp)
            raise ModelNotFoundError(f"{target} exists but holds no config.json; remove it and retry")
        os.rename(tmp, target)
    except FileExistsError:
        shutil.rmtree(tmp, ignore_errors=True)  # another process finished first
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def replace_folder(target: Path, build) -> Path:
    """Write a folder that replaces ``target``: ``build(tmp)`` fills a temporary sibling (stale ones, left by a
    killed writer, are removed first), then it takes ``target``'s place; a failure leaves ``target`` as it was."""
    target = Path(target)
    for stale in target.parent.glob(f".{target.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    try:
        build(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if target.exists():
        shutil.rmtree(target)
    os.rename(tmp, target)
    fsync_dir(target.parent)
    return target


def output_file(output: str | None, overwrite: bool, example: str) -> Path | None:
    """A command's ``output=FILE``, checked before any work: not a folder (``example`` names a file to suggest),
    not an existing file unless overwrite=true (ConfigError, one line). None when no output= was given."""
    from ftctl.core.errors import ConfigError

    if not output:
        return None
    out = Path(output).expanduser()
    if out.is_dir():
        raise ConfigError(f"output={out} is a folder; give the file to write, e.g. output={out / example}")
    if out.exists() and not overwrite:
        raise ConfigError(f"output={out} already exists", hint="pass overwrite=true to replace it, or another output=")
    return out
