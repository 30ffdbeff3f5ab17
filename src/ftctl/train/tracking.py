"""Experiment trackers (``logging.report_to``): TensorBoard, MLflow and Weights & Biases through
Accelerate's tracker classes. Every tracker keeps its data under the run directory by default and
needs no server:

    <run>/tensorboard/        TensorBoard event files (tensorboard --logdir <run>/tensorboard)
    <run>/mlflow.db           MLflow's SQLite store, artifacts in <run>/mlruns
                              (mlflow ui --backend-store-uri sqlite:///<run>/mlflow.db)
    <run>/wandb/              the W&B run (offline unless an API key is configured; wandb sync uploads it)
    <run>/tracking.json       the trackers' run ids, so that resume=true continues the same runs

Metric names: ``train/<key>`` for a metrics.jsonl step row (train/loss, train/lr, ...), ``val/<key>``
for a validation row (val/loss, val/accuracy, ...), ``eval/<metric>`` for eval.after_train scores.

A tracker never stops training: one that fails to start or to log is reported in one warning line
and dropped. A tracker whose package is missing is a config error before anything loads.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
from pathlib import Path

from ftctl.config.checks import mlflow_uri, names
from ftctl.core.atomic import atomic_write_json

log = logging.getLogger("ftctl")


def _wandb_mode(cfg) -> str:
    """auto: W&B's own WANDB_MODE if set; online when an API key is configured and the server answers;
    offline otherwise (the run is kept under <run>/wandb for `wandb sync`)."""
    mode = cfg.logging.wandb_mode
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    base = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
    host = re.sub(r"^\w+://", "", base).split("/")[0].split(":")[0]
    has_key = bool(os.environ.get("WANDB_API_KEY"))
    if not has_key:
        try:
            import netrc

            has_key = netrc.netrc().authenticators(host) is not None
        except (OSError, netrc.NetrcParseError):
            has_key = False
    if not has_key:
        return "offline"
    import socket

    try:
        socket.create_connection((host, 443), timeout=3).close()
        return "online"
    except OSError:
        return "offline"


def _run_name(cfg, out: Path) -> str:
    if cfg.logging.run_name:
        return str(cfg.logging.run_name)
    parts = Path(out).resolve().parts
    return "/".join(parts[-2:])


def _state(out: Path) -> dict:
    try:
        return json.loads((Path(out) / "tracking.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def log_with(cfg, out: Path, resume: bool = False) -> list | None:
    """The tracker objects for ``Accelerator(log_with=...)``; None when logging.report_to is empty.
    Nothing is written until :class:`Trackers` starts them."""
    from ftctl.train.trackers import MLflow, TensorBoard, WandB

    chosen = names(cfg)
    if not chosen:
        return None
    out = Path(out)
    state = _state(out) if resume else {}
    project, run_name = str(cfg.logging.project), _run_name(cfg, out)
    made = []
    for n in chosen:
        if n == "tensorboard":
            made.append(TensorBoard(out))
        elif n == "mlflow":
            made.append(MLflow(out, mlflow_uri(cfg, out), project, run_name, state.get("mlflow_run_id")))
        elif n == "wandb":
            made.append(WandB(out, project, run_name, _wandb_mode(cfg), state.get("wandb_run_id")))
    return made


def flat_config(cfg) -> dict:
    """The composed config as flat ``a.b.c: value`` pairs of str/int/float/bool, as trackers take them."""
    from omegaconf import OmegaConf

    flat: dict = {}

    def walk(node, prefix):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        elif isinstance(node, (bool, int, float, str)):
            flat[prefix[:-1]] = node
        else:  # lists, None
            flat[prefix[:-1]] = json.dumps(node, default=str)

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return flat


def tracked(row: dict) -> dict:
    """A metrics.jsonl row as tracker metrics: train/<key>, or val/<key> for validation keys."""
    out = {}
    for k, v in row.items():
        if k in ("step", "time") or isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        out[f"val/{k[4:]}" if k.startswith("val_") else f"train/{k}"] = v
    return out


class Trackers:
    """The run's trackers, started through ``accelerator.init_trackers`` once the run directory exists."""

    def __init__(self, cfg, out: Path, accelerator, console=None, start_step: int = 0):
        from ftctl.train.trackers import Guarded, TensorBoard

        self.out, self.accelerator, self.console = Path(out), accelerator, console
        self.cfg = cfg
        self.active = [t for t in (accelerator.log_with or []) if isinstance(t, Guarded)]
        self.last_step = start_step
        self._done = False
        if not self.active:
            return
        for t in self.active:
            t.warn = self._warn
            if isinstance(t, TensorBoard) and start_step:
                t.init_kwargs["purge_step"] = start_step + 1  # drop events a killed run logged past the checkpoint
        accelerator.init_trackers(str(cfg.logging.project), config=flat_config(cfg))
        ids = {f"{t.name}_run_id": getattr(t, "run_id", None) for t in self.active if getattr(t, "run_id", None)}
        if ids:

            atomic_write_json(self.out / "tracking.json", {**_state(self.out), **ids})
        live = [t.where() for t in self.active if t.broken is None]
        if live and console is not None:
            console.print("logging to " + ", ".join(live), highlight=False)
        log.info("trackers: %s", ", ".join(live) or "none")

    def _warn(self, msg: str) -> None:
        log.warning("%s", msg)
        if self.console is not None:
            self.console.print(f"[yellow]{msg}[/]", highlight=False, markup=True)

    def log(self, row: dict, step: int) -> None:
        """One metrics.jsonl row (a step or a validation)."""
        if not self.active:
            return
        values = tracked(row)
        self.last_step = max(self.last_step, step)
        if values:
            self.accelerator.log(values, step=step)

    def finish(self, final: Path | None = None, eval_scores: dict | None = None, status: str = "finished") -> None:
        """Eval scores at the last step, the final adapter/model, plots/ and eval/ as artifacts (mlflow, wandb),
        then end every tracker's run (failed/interrupted runs are marked so)."""
        if not self.active or self._done:
            return
        self._done = True
        scores = {f"eval/{k}": v for k, v in (eval_scores or {}).items()
                  if k != "seconds" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        if scores:
            self.accelerator.log(scores, step=self.last_step)
        for t in self.active:
            t.status = status
            if status == "finished" and self.cfg.logging.log_artifacts:
                t._safe("logging artifacts", t.log_final, final, self.out)
        self.accelerator.end_training()
