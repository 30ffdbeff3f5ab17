"""Checks of the launcher/distributed and logging keys at composition (no hardware or network is looked at),
and the facts they share with the launcher and the trackers (process count, strategy families, tracker packages)."""
from __future__ import annotations

import os
from pathlib import Path

from ftctl.config.choices import DEEPSPEED, SHARDED, TRACKERS, allowed
from ftctl.core.errors import ConfigError
from ftctl.core.registry import OBJECTIVES

__all__ = ["DEEPSPEED", "PACKAGES", "SHARDED", "check_distributed", "check_logging", "mlflow_uri", "names",
           "world_size"]


def world_size(cfg) -> int:
    return int(cfg.launcher.nproc_per_node) * int(cfg.launcher.nnodes)


def check_distributed(cfg, where=lambda key: "") -> None:
    """The launcher and distributed keys, checked at composition (no hardware is looked at here)."""
    la, dist, tc = cfg.launcher, cfg.distributed, cfg.trainer
    for key in ("nproc_per_node", "nnodes"):
        if la[key] < 1:
            raise ConfigError(f"{where(key)}launcher.{key}={la[key]} must be >= 1")
    if not 0 <= la.node_rank < la.nnodes:
        raise ConfigError(f"{where('node_rank')}launcher.node_rank={la.node_rank} must be in [0, launcher.nnodes="
                          f"{la.nnodes})")
    if not 0 < la.master_port < 65536:
        raise ConfigError(f"{where('master_port')}launcher.master_port={la.master_port} must be in 1..65535")
    world = world_size(cfg)
    if world > 1 and dist.strategy == "single":
        many = [s for s in allowed("distributed.strategy") if s != "single"]
        raise ConfigError(f"launcher: {world} processes need a multi-process strategy; choose distributed="
                          f"{', '.join(many[:-1])} or {many[-1]}")
    if world > 1 and tc.batch_size % world:
        raise ConfigError(f"{where('batch_size')}trainer.batch_size={tc.batch_size} must be divisible by the "
                          f"{world} processes (it is the global micro-batch, split evenly across them)")
    if la.nnodes > 1 and not cfg.output_dir:
        raise ConfigError("launcher.nnodes > 1: set output_dir= to a folder every machine sees (the run directory "
                          "must be the same on all of them)")
    if dist.deepspeed_config and dist.strategy not in DEEPSPEED:
        raise ConfigError(f"distributed.deepspeed_config needs a DeepSpeed strategy (distributed="
                          f"{', '.join(DEEPSPEED[:-1])} or {DEEPSPEED[-1]}), not distributed={dist.strategy}")
    if dist.deepspeed_config and not Path(dist.deepspeed_config).expanduser().is_file():
        raise ConfigError(f"distributed.deepspeed_config={dist.deepspeed_config}: no such file")
    if dist.strategy in SHARDED and tc.on_nan == "skip":
        raise ConfigError(f"trainer.on_nan=skip is not supported with distributed={dist.strategy} (the sharded "
                          "optimizer steps inside the engine); use trainer.on_nan=stop")
    if dist.strategy in SHARDED and cfg.precision.name == "fp8":
        raise ConfigError(f"precision=fp8 works with distributed=single or ddp (Accelerate's FP8 recipe), not "
                          f"distributed={dist.strategy}")
    if dist.strategy in SHARDED and not OBJECTIVES.get(cfg.objective).sharded:
        raise ConfigError(f"objective={cfg.objective} works with distributed=single or ddp, not "
                          f"distributed={dist.strategy} (its reference model is not sharded)")
    if dist.strategy in SHARDED and cfg.quant.method != "none":
        raise ConfigError(f"quant={cfg.quant.method} (a quantized base) works with distributed=single or ddp, not "
                          f"distributed={dist.strategy}")


# tracker (logging.report_to, ftctl.config.choices.TRACKERS) -> the packages it imports, and what to install
PACKAGES = {
    "tensorboard": (("tensorboard",), "pip install tensorboard"),
    "mlflow": (("mlflow",), "pip install mlflow"),
    "wandb": (("wandb",), "pip install wandb"),
}


def names(cfg) -> list[str]:
    """``logging.report_to`` as a list: [], a bare name, 'none' or a list of names."""
    value = cfg.logging.report_to if "logging" in cfg else []
    if value is None:
        return []
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    out = [str(v) for v in value]
    return [] if out == ["none"] else out


def mlflow_uri(cfg, out: Path | None) -> str:
    uri = cfg.logging.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{Path(out).resolve() / 'mlflow.db'}" if out is not None else "sqlite:///<run>/mlflow.db"


def check_logging(cfg, locate=lambda key: "") -> None:
    """Allowed names and installed packages; one ConfigError line (called from config.validate)."""
    from importlib.util import find_spec

    value = cfg.logging.report_to
    if not (value is None or isinstance(value, str) or
            (hasattr(value, "__iter__") and all(isinstance(v, str) for v in value))):
        raise ConfigError(f"{locate('report_to')}logging.report_to={value!r} must be a list of tracker names, "
                          "e.g. [tensorboard,mlflow]")
    chosen = names(cfg)
    for n in chosen:
        if n not in TRACKERS:
            raise ConfigError(f"{locate('report_to')}logging.report_to: {n!r} is not a tracker; choose from: "
                              f"{', '.join(allowed('logging.report_to'))} (several at once: "
                              "logging.report_to=[tensorboard,mlflow])")
    if len(set(chosen)) != len(chosen):
        raise ConfigError(f"{locate('report_to')}logging.report_to={chosen}: a tracker is named twice")
    modes = allowed("logging.wandb_mode")
    if cfg.logging.wandb_mode not in modes:
        raise ConfigError(f"{locate('wandb_mode')}logging.wandb_mode={cfg.logging.wandb_mode!r} is not allowed; "
                          f"choose one of: {', '.join(modes)}")
    for n in chosen:
        pkgs, how = PACKAGES[n]
        for pkg in pkgs:
            if find_spec(pkg) is None:
                raise ConfigError(f"logging.report_to={n} needs the {pkg} package: {how}")
    if "mlflow" in chosen and mlflow_uri(cfg, None).startswith("sqlite:"):
        for pkg in ("sqlalchemy", "alembic"):
            if find_spec(pkg) is None:
                raise ConfigError(f"logging.report_to=mlflow keeps its runs in SQLite under the run directory, which "
                                  f"needs the {pkg} package: pip install mlflow (or set logging.mlflow_tracking_uri "
                                  "to a server)")
