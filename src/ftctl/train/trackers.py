"""Accelerate's tracker classes, each wrapped so that a failure is one warning line, never a stopped run.
Imported only when logging.report_to names a tracker (Accelerate, and through it torch, load here)."""
from __future__ import annotations

import contextlib
import io
import logging
import os
import re
from pathlib import Path

from accelerate.tracking import MLflowTracker, TensorBoardTracker, WandBTracker

log = logging.getLogger("ftctl")


class Guarded:
    """A tracker that fails is reported once and dropped; training goes on without it."""

    broken: str | None = None
    status: str = "finished"
    warn = staticmethod(lambda msg: log.warning("%s", msg))

    def _safe(self, what: str, fn, *args, **kwargs):
        if self.broken is not None:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - a tracker must never stop a run
            first = (str(e).strip().splitlines() or [""])[0][:200]
            self.broken = f"{what}: {type(e).__name__}: {first}"
            self.warn(f"logging: {self.name} {what} failed ({type(e).__name__}: {first}); "
                      f"the run goes on without {self.name}")
            return None

    def start(self):
        self._safe("start", super().start)

    def store_init_configuration(self, values: dict):
        self._safe("logging the config", super().store_init_configuration, values)

    def log(self, values: dict, step: int | None = None, **kwargs):
        self._safe("logging", super().log, values, step, **kwargs)

    def finish(self):
        self._safe("finish", self._finish)

    def _finish(self):
        super().finish()

    def log_final(self, final: Path | None, out: Path) -> None:
        """Artifacts at the end of the run (trackers that have them)."""


class TensorBoard(Guarded, TensorBoardTracker):
    def __init__(self, out: Path):
        TensorBoardTracker.__init__(self, "tensorboard", str(out))

    def where(self) -> str:
        return f"tensorboard ({Path(self.logging_dir_param) / 'tensorboard'})"


class MLflow(Guarded, MLflowTracker):
    def __init__(self, out: Path, uri: str, project: str, run_name: str, run_id: str | None):
        local = uri.startswith(("sqlite:", "file:")) or "://" not in uri
        MLflowTracker.__init__(self, experiment_name=project, run_name=run_name, run_id=run_id,
                               logging_dir=str(Path(out).resolve() / "mlruns") if local else None,
                               tags={"ftctl.run_dir": str(Path(out).resolve())})
        self.uri, self.resumed = uri, run_id is not None

    def start(self):
        def go():
            import mlflow

            for name in ("mlflow", "alembic"):  # table creation and migration notices on the console
                logging.getLogger(name).setLevel(logging.WARNING)
            from mlflow.tracking._tracking_service import utils

            # mlflow.set_tracking_uri also exports MLFLOW_TRACKING_URI: put both back when the run ends, or the
            # next run in this process (a sweep's next trial) would log into this run's store
            self._before = (getattr(utils, "_tracking_uri", None), os.environ.get("MLFLOW_TRACKING_URI"))
            mlflow.set_tracking_uri(self.uri)
            MLflowTracker.start(self)
            self.run_id = self.active_run.info.run_id
        self._safe("start", go)

    def where(self) -> str:
        return f"mlflow ({self.uri})"

    def store_init_configuration(self, values: dict):
        """MLflow refuses to change a logged param: a resumed run logs only new keys, and the changed ones
        (trainer.max_steps=..., resume=true) as resumed.<key> tags."""
        def go():
            import mlflow

            have = mlflow.get_run(self.run_id).data.params if self.resumed else {}
            changed = {f"resumed.{k}": str(v)[:5000] for k, v in values.items() if k in have and have[k] != str(v)}
            if changed:
                mlflow.set_tags(changed)
            new = {k: v for k, v in values.items() if k not in have}
            if new:
                MLflowTracker.store_init_configuration(self, new)
        self._safe("logging the config", go)

    def log_final(self, final, out):
        import mlflow

        if final is not None:
            mlflow.log_artifacts(str(final), artifact_path=final.name)
        for sub in ("plots", "eval"):
            if (out / sub).is_dir() and any((out / sub).iterdir()):
                mlflow.log_artifacts(str(out / sub), artifact_path=sub)

    def _finish(self):
        import mlflow

        mlflow.end_run(status={"finished": "FINISHED", "interrupted": "KILLED", "preempted": "KILLED"}.get(
            self.status, "FAILED"))

    def finish(self):
        super().finish()
        before = getattr(self, "_before", None)
        if before is not None:
            import mlflow

            self._before = None
            mlflow.set_tracking_uri(before[0])
            if before[1] is None:
                os.environ.pop("MLFLOW_TRACKING_URI", None)
            else:
                os.environ["MLFLOW_TRACKING_URI"] = before[1]


class WandB(Guarded, WandBTracker):
    def __init__(self, out: Path, project: str, run_name: str, mode: str, run_id: str | None):
        WandBTracker.__init__(self, project)
        self.out, self.mode, self.run_name_ = Path(out), mode, run_name
        self.init_kwargs = {"dir": str(Path(out).resolve()), "name": run_name, "mode": mode}
        if run_id:
            self.init_kwargs.update(id=run_id, resume="allow")

    def start(self):
        def go():
            import wandb

            # no capture of the terminal (ftctl's progress line), no banner
            self.init_kwargs["settings"] = wandb.Settings(console="off", silent=True)
            WandBTracker.start(self)
            self.run_id = self.run.id
        self._safe("start", go)

    def where(self) -> str:
        return f"wandb ({self.mode}, {self.out / 'wandb'})"

    def log_final(self, final, out):
        import wandb

        if final is not None:
            name = re.sub(r"[^A-Za-z0-9._-]+", "-", f"{self.run_name_}-{final.name}").strip("-")
            art = wandb.Artifact(name=name, type="model", metadata={"run_dir": str(out.resolve())})
            with contextlib.redirect_stderr(io.StringIO()):  # wandb's "Adding directory..." line
                art.add_dir(str(final), policy="immutable")  # the folder is final: not copied to a staging area
            self.run.log_artifact(art)
        plots = sorted((out / "plots").glob("*.png")) if (out / "plots").is_dir() else []
        if plots:
            self.run.log({f"plots/{p.stem}": wandb.Image(str(p)) for p in plots}, commit=False)

    def _finish(self):
        self.run.finish(exit_code=0 if self.status == "finished" else 1)
