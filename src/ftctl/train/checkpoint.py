"""Complete-or-absent checkpoints: written into a temporary folder, fsynced, described by a
``checkpoint.json`` (file sizes and sha256) written last, then renamed into place.

A checkpoint holds the trainable weights, optimizer, scheduler, RNG states and the step; the data
position follows from the step (see runner.batch_indices), so resume neither skips nor repeats rows.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
import sys
from pathlib import Path

from ftctl.core.atomic import fsync_dir, json_safe, writing
from ftctl.core.errors import NonFiniteError, RunDirError

log = logging.getLogger("ftctl")
STEP_DIR = re.compile(r"^step-(\d+)$")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def trainable_state(model) -> dict:
    return {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}


def rng_state() -> dict:
    """Every RNG's state as tensors, lists and numbers only, so it loads with ``weights_only=True``."""
    import numpy as np
    import torch

    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    st = {"python": [version, list(mt), gauss],
          "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
          "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    import numpy as np
    import torch

    version, mt, gauss = st["python"]
    random.setstate((version, tuple(mt), gauss))
    kind, keys, pos, has_gauss, cached = st["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def assert_finite(weights: dict, what: str) -> None:
    """Weights with NaN/Inf are never saved; the last good checkpoint stays the newest."""
    import torch

    bad = [n for n, t in weights.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise NonFiniteError(f"not saving {what}: {len(bad)} trainable tensors hold NaN/Inf (e.g. {bad[0]})")


def save(root: Path, step: int, model, optimizer, scheduler, state: dict, keep: int) -> Path:
    weights = trainable_state(model)
    assert_finite(weights, f"step {step}")
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with writing(final, hint=lambda: kept(root)):
            tmp.mkdir()
        _write(tmp, final, weights, optimizer, scheduler, state)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():  # a checkpoint of the same step from an earlier, resumed attempt
        shutil.rmtree(final)
    os.rename(tmp, final)
    fsync_dir(root)
    prune_checkpoints(root, keep)
    return final


def kept(root: Path) -> str:
    """What a failed save leaves to resume from, for its message."""
    done = complete_checkpoints(root, verify=False, quiet=True)
    return f"the last complete checkpoint {done[-1]} is kept" if done else "no checkpoint was complete yet"


def _torch_save(obj):
    import torch

    def write(path: Path) -> None:
        with open(path, "wb") as f:  # through a Python file: a full disk is OSError ENOSPC, not "unexpected pos"
            torch.save(obj, f)

    return write


def _write(tmp: Path, final: Path, weights, optimizer, scheduler, state: dict) -> None:
    """The checkpoint's files into ``tmp``, each synced, then checkpoint.json (sizes and sha256) last; a full
    disk names the file (as ``final``, the folder's name once complete) and the checkpoint that is kept."""
    from safetensors.torch import save_file

    writers = {"trainable.safetensors": lambda p: save_file(weights, str(p)),
               "optimizer.pt": _torch_save(optimizer.state_dict()), "scheduler.pt": _torch_save(scheduler.state_dict()),
               "rng.pt": _torch_save(rng_state()),
               "state.json": lambda p: p.write_text(json.dumps(json_safe(state), allow_nan=False))}
    files = {}
    for name, write in writers.items():
        with writing(final / name, hint=lambda: kept(final.parent)):
            write(tmp / name)
            _fsync(tmp / name)
        files[name] = {"bytes": (tmp / name).stat().st_size, "sha256": sha256_file(tmp / name)}
    with writing(final / "checkpoint.json", hint=lambda: kept(final.parent)):
        meta = {"step": state["step"], "files": dict(sorted(files.items()))}
        (tmp / "checkpoint.json").write_text(json.dumps(meta, indent=2) + "\n")
        _fsync(tmp / "checkpoint.json")
    fsync_dir(tmp)


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def prune_checkpoints(root: Path, keep: int) -> None:
    """Keep the newest ``keep`` complete checkpoints; remove older ones, and the debris that a killed
    save or prune left (ftctl's own step-*/.tmp-step-* folders only)."""
    done = complete_checkpoints(root, verify=False, quiet=True)
    for old in done[:-keep] if keep > 0 else []:
        shutil.rmtree(old)
    newest = done[-1] if done else None
    for p in root.iterdir():
        m = STEP_DIR.match(p.name)
        if p.name.startswith(".tmp-step-") or (m and newest and p not in done and p.name < newest.name):
            shutil.rmtree(p, ignore_errors=True)


def is_complete(ckpt: Path, verify: bool = True) -> bool:
    meta = ckpt / "checkpoint.json"
    if not meta.is_file():
        return False
    try:
        files = json.loads(meta.read_text())["files"]
    except (OSError, ValueError, KeyError):
        return False
    for name, info in files.items():
        f = ckpt / name
        if not f.is_file() or f.stat().st_size != info["bytes"]:
            return False
        if verify and sha256_file(f) != info["sha256"]:
            return False
    return True


def complete_checkpoints(root: Path, verify: bool = True, quiet: bool = False) -> list[Path]:
    if not root.is_dir():
        return []
    steps = sorted((int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir())
    out = []
    for _, p in steps:
        if is_complete(p, verify):
            out.append(p)
        elif not quiet:
            log.warning("skipping incomplete checkpoint %s", p)
            print(f"ftctl: skipping incomplete checkpoint {p}", file=sys.stderr)
    return out


def find_resume(output_dir: Path, resume) -> Path | None:
    """The checkpoint that ``resume`` names: true -> the newest complete one in output_dir/checkpoints,
    or None when there is none yet (the run starts from step 0; the same command can be re-run after
    every preemption)."""
    if resume is True or str(resume).lower() == "true":
        found = complete_checkpoints(output_dir / "checkpoints")
        return found[-1] if found else None
    p = Path(str(resume)).expanduser()
    if not p.is_dir():
        raise RunDirError(f"resume={resume}: no such checkpoint folder")
    if not is_complete(p):
        raise RunDirError(f"resume={resume}: checkpoint is incomplete (no valid checkpoint.json)")
    return p


def load(ckpt: Path, model, optimizer, scheduler) -> dict:
    import torch
    from safetensors.torch import load_file

    weights = load_file(str(ckpt / "trainable.safetensors"))
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in weights]
    unknown = [n for n in weights if n not in params]
    shape = [n for n, t in weights.items() if n in params and tuple(t.shape) != tuple(params[n].shape)]
    if missing or unknown or shape:
        raise RunDirError(f"checkpoint {ckpt} does not match this model/method ({len(missing)} trainable tensors "
                          f"missing, {len(unknown)} unknown, {len(shape)} of another shape"
                          + (f", e.g. {shape[0]}" if shape else "") + ")")
    import pickle
    import re
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes on pickle protocols
            opt_state = torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=True)
            sched_state = torch.load(ckpt / "scheduler.pt", map_location="cpu", weights_only=True)
            rng = torch.load(ckpt / "rng.pt", map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        named = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) (\S+)", str(e))
        other = re.search(r"(Unsupported [^\n]*)", str(e))
        why = f"it names {named.group(1)}" if named else other.group(1) if other else "not a weights-only file"
        raise RunDirError(f"checkpoint {ckpt}: refusing to load pickled objects other than tensors and plain "
                          f"data ({why})") from e
    with torch.no_grad():
        for n, t in weights.items():
            params[n].copy_(t.to(params[n].device, params[n].dtype))
    optimizer.load_state_dict(opt_state)
    scheduler.load_state_dict(sched_state)
    set_rng_state(rng)
    return json.loads((ckpt / "state.json").read_text())


def resume_arg(value) -> bool | str:
    """resume=true|false, or a checkpoint path."""
    if isinstance(value, bool):
        return value
    text = str(value).strip()
    if text.lower() in ("true", "yes", "1"):
        return True
    if text.lower() in ("false", "no", "0", ""):
        return False
    return text
