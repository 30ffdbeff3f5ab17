"""The run directory: atomic writes, the manifest, metrics, and the rules for reusing a folder.

    <output_dir>/
      config.yaml      the composed, resolved config (what a worker or `resume` reads back)
      manifest.json    versions, git commit, data fingerprint, seed, device, model_path, status
      metrics.jsonl    one JSON object per logged step and per validation
      train.log        the log of the run
      checkpoints/step-000100/   complete checkpoints (checkpoint.json written last)
      adapter/         the final adapter in PEFT format, with the tokenizer (adapter methods)
      model/           the final model, with the tokenizer (peft.method=full)
      eval/            results of `ftctl eval`
      plots/           PNG plots of metrics.jsonl and eval/ (ftctl.report), report.html from `ftctl report`
      tensorboard/ mlflow.db mlruns/ wandb/ tracking.json   the trackers of logging.report_to (ftctl.tracking)
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import time
from datetime import datetime
from pathlib import Path

from ftctl.core.errors import RunDirError
from ftctl.core.errors import ConfigError
from ftctl.core.atomic import atomic_write_text

# everything ftctl writes at the top of a run directory; overwrite=true removes only these
RUN_FILES = ("config.yaml", "manifest.json", "metrics.jsonl", "train.log", "checkpoints", "adapter", "model", "eval",
             "plots", "report.html", "tensorboard", "mlflow.db", "mlruns", "wandb", "tracking.json")


def read_manifest(run_dir: Path) -> dict | None:
    f = Path(run_dir) / "manifest.json"
    if not f.is_file():
        return None
    try:
        return json.loads(f.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def load_finished_run(run_dir) -> tuple[dict, object]:
    """(manifest, config) of a finished run directory; RunDirError naming what is wrong otherwise."""
    from omegaconf import OmegaConf

    from ftctl.core.errors import RunDirError

    run = Path(run_dir)
    manifest = read_manifest(run)
    if manifest is None or not (run / "config.yaml").is_file():
        raise RunDirError(f"run={run}: not a run directory (no manifest.json/config.yaml)")
    if manifest.get("status") != "finished":
        raise RunDirError(f"run={run}: the run is {manifest.get('status')}, not finished")
    return manifest, OmegaConf.load(run / "config.yaml")


def default_output_dir(recipe: str | None) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path("outputs") / (recipe or "train") / stamp
    out, n = base, 1
    while out.exists():
        n += 1
        out = base.with_name(f"{stamp}-{n}")
    return out


def prepare_output_dir(out: Path, *, overwrite: bool, resume: bool, dry_run: bool = False) -> None:
    """Refuse to clobber a finished run; on overwrite=true remove only what ftctl wrote.
    ``dry_run`` only checks, so a refusal comes before any slow work."""
    manifest = read_manifest(out)
    if resume:
        if not dry_run:
            _mkdir(out)
        return
    if manifest is not None or (out / "checkpoints").is_dir():
        status = (manifest or {}).get("status", "unfinished")
        if not overwrite:
            what = "a finished run" if status == "finished" else f"a run ({status})"
            raise RunDirError(
                f"output_dir {out} already holds {what}",
                hint="pass overwrite=true to replace it, resume=true to continue it, or choose another output_dir",
            )
        if dry_run:
            return
        for name in RUN_FILES:
            p = out / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    if not dry_run:
        _mkdir(out)


def _mkdir(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".ftctl-write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise RunDirError(f"output_dir {out}: cannot write there ({e.strerror or e})") from e


def git_commit(cwd: Path | None = None) -> str | None:
    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5)
        return r.stdout.strip() or None if r.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def library_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("ftctl", "torch", "transformers", "peft", "accelerate", "bitsandbytes", "hydra-core", "gguf"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


class Metrics:
    """Append-only metrics.jsonl; on resume, lines after the resumed step are dropped first."""

    def __init__(self, path: Path, resume_step: int | None = None):
        self.path = Path(path)
        if resume_step is not None and self.path.is_file():
            keep = [json.dumps(row) for row in _parse_lines(self.path.read_text()) if row.get("step", 0) <= resume_step]
            atomic_write_text(self.path, "".join(k + "\n" for k in keep))
        self._f = open(self.path, "a")

    def log(self, **row) -> None:
        row.setdefault("time", round(time.time(), 3))
        self._f.write(json.dumps(row) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def _parse_lines(text: str) -> list[dict]:
    """JSON lines, without a torn last line that a killed process may have left."""
    rows = []
    for ln in text.splitlines():
        try:
            rows.append(json.loads(ln))
        except json.JSONDecodeError:
            continue
    return rows


def read_metrics(run_dir: Path) -> list[dict]:
    f = Path(run_dir) / "metrics.jsonl"
    return _parse_lines(f.read_text()) if f.is_file() else []


def adapter_folder(spec: str) -> Path:
    """model.adapter: an adapter folder, or a run folder holding adapter/."""
    p = Path(spec).expanduser()
    if (p / "adapter").is_dir():
        p = p / "adapter"
    if not (p / "adapter_config.json").is_file():
        what = "no such folder" if not p.exists() else "no adapter_config.json there"
        raise ConfigError(f"model.adapter={spec}: {what} (expected a run from `ftctl train` with an adapter method, "
                          "or its adapter/ folder)")
    return p
