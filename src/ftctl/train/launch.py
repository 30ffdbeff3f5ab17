"""One process, or N: ftctl re-launches itself under torchrun when a run needs more than one process.

``ftctl train distributed=ddp launcher.nproc_per_node=2 ...`` composes and validates the config here,
saves it (resolved) in the run directory as ``launch/config.yaml``, and runs

    python -m torch.distributed.run --nproc_per_node=2 --nnodes=1 --node_rank=0 \\
        --master_addr=127.0.0.1 --master_port=29500 -m ftctl.cli train config_file=<run>/launch/config.yaml

Every worker reads that file instead of composing again, so all processes train on exactly the same
config. ``--dry-run`` prints the command and exits. On several machines, the same ``ftctl train``
command runs on each with its own ``launcher.node_rank``.
"""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

from ftctl.config.checks import DEEPSPEED, SHARDED, world_size
from ftctl.config.compose import check_override_keys
from ftctl.config.schema import GROUPS, TrainConfig
from ftctl.config.validate import validate
from ftctl.core import lock
from ftctl.core.atomic import atomic_write_json, atomic_write_text
from ftctl.core.errors import ConfigError, FtctlError, Preempted
from ftctl.rundir import default_output_dir, prepare_output_dir, read_manifest
from ftctl.train.checkpoint import resume_arg
from ftctl.train.distributed import (
    deepspeed_config,
    deepspeed_installed,
    mixed_precision,
)


def is_worker() -> bool:
    """Started by torchrun (or accelerate launch): this process is one of the workers."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def needed(cfg) -> bool:
    return not is_worker() and (world_size(cfg) > 1 or cfg.distributed.strategy in SHARDED)


# ----------------------------------------------------------------------------- the command
def command(cfg, config_file: Path, debug: bool = False) -> list[str]:
    """torchrun (as ``python -m torch.distributed.run``, so it is this interpreter's) re-running ftctl."""
    la = cfg.launcher
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={la.nproc_per_node}",
            f"--nnodes={la.nnodes}", f"--node_rank={la.node_rank}", f"--master_addr={la.master_addr}",
            f"--master_port={la.master_port}", "-m", "ftctl.cli", *(["--debug"] if debug else []), "train",
            f"config_file={config_file}"]


def worker_env(cfg) -> dict:
    """The workers' environment: CPU threads shared out between the processes of a machine, and
    DeepSpeed's CPU accelerator where there is no CUDA."""
    env = dict(os.environ)
    n = int(cfg.launcher.nproc_per_node)
    env.setdefault("OMP_NUM_THREADS", str(cfg.trainer.num_threads or max(1, (os.cpu_count() or 1) // n)))
    if cfg.distributed.strategy in DEEPSPEED and not _cuda():
        env.setdefault("DS_ACCELERATOR", "cpu")
    src = str(Path(__file__).resolve().parents[2])  # src/: the workers import this same ftctl
    env["PYTHONPATH"] = os.pathsep.join(p for p in [src, env.get("PYTHONPATH", "")] if p)
    return env


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def launch(cfg, choices: dict, console, debug: bool = False, dry_run: bool = False) -> int:
    """Save the composed config in the run directory and run the workers under torchrun; with
    ``dry_run`` only print what would run."""
    from omegaconf import OmegaConf, open_dict

    if not needed(cfg):
        console.print("one process: `ftctl train` runs in this process (no launcher); set launcher.nproc_per_node "
                      "or launcher.nnodes, with a distributed= strategy, for more", highlight=False)
        return 0
    out = Path(cfg.output_dir) if cfg.output_dir else default_output_dir(choices.get("recipe"))
    first = cfg.launcher.node_rank == 0  # the first machine checks and takes the run directory they share
    if first:
        prepare_output_dir(out, overwrite=cfg.overwrite, resume=bool(resume_arg(cfg.resume)), dry_run=True)
    with open_dict(cfg):
        cfg.output_dir = str(out)  # every worker (and every machine) writes the same run directory
    if cfg.distributed.strategy in DEEPSPEED:  # a user's DeepSpeed JSON that disagrees stops here, not in N workers

        if not deepspeed_installed():
            raise ConfigError(f"distributed={cfg.distributed.strategy} needs DeepSpeed: pip install deepspeed "
                              "(or pip install -e '.[distributed]')")
        deepspeed_config(cfg, world_size(cfg), mixed_precision(cfg))
    # one file per machine (they differ in launcher.node_rank only), in the run directory they share
    node = "" if cfg.launcher.node_rank == 0 else f"-node{cfg.launcher.node_rank}"
    config_file = out / "launch" / f"config{node}.yaml"
    cmd = command(cfg, config_file, debug)
    if dry_run:
        print(shlex.join(cmd))
        return 0
    if first:
        prepare_output_dir(out, overwrite=cfg.overwrite, resume=bool(resume_arg(cfg.resume)))  # taken and locked
    config_file.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(config_file, OmegaConf.to_yaml(cfg, resolve=True))
    atomic_write_json(config_file.parent / "choices.json", choices)
    atomic_write_text(config_file.parent / f"command{node}.txt", shlex.join(cmd) + "\n")
    la = cfg.launcher
    console.print(f"ftctl: {la.nproc_per_node} process(es) on this machine, {world_size(cfg)} in all "
                  f"(distributed={cfg.distributed.strategy}): {shlex.join(cmd)}", highlight=False, markup=False)
    rc = _run(cmd, {**worker_env(cfg), **lock.held_env(out)})  # the workers write under this process's lock
    if rc:

        manifest = read_manifest(out) or {}
        if manifest.get("status") == "preempted":  # the workers saved a checkpoint; say how to go on
            raise Preempted(manifest.get("error", "").removeprefix("Preempted: "))
        raise FtctlError(f"a training process failed (torchrun exit status {rc}); its error is above, and torchrun "
                         "names the failing rank", hint=f"run directory: {out}")
    return 0


def _run(cmd: list[str], env: dict) -> int:
    """Run torchrun in its own session and hand it SIGINT/SIGTERM as one SIGTERM each, which it passes to
    the workers: they save a checkpoint at the end of the step and stop (a terminal's Ctrl-C would
    otherwise reach torchrun and every worker at once, and torchrun's own SIGTERM on top of it would
    stop the workers without a checkpoint)."""
    import signal

    proc = subprocess.Popen(cmd, env=env, start_new_session=True)

    def forward(signum, frame):
        print(f"\nftctl: got {signal.Signals(signum).name}; the workers save a checkpoint at the end of this step",
              file=sys.stderr, flush=True)
        proc.send_signal(signal.SIGTERM)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return proc.wait()
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


# ----------------------------------------------------------------------------- the workers' side
def config_file(overrides: list[str]) -> str | None:
    return next((o.split("=", 1)[1] for o in overrides if o.startswith("config_file=")), None)


def load_config(overrides: list[str]):
    """``config_file=<run>/launch/config.yaml`` (or any run's config.yaml) with key=value overrides on top:
    the config and group choices the run was composed with, validated again."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    path = Path(config_file(overrides)).expanduser()
    rest = [o for o in overrides if not o.startswith("config_file=")]
    if not path.is_file():
        raise ConfigError(f"config_file={path}: no such file")
    bad = [o for o in rest if "=" not in o or o.split("=", 1)[0] in ("recipe",) + GROUPS]
    if bad:
        raise ConfigError(f"{bad[0]}: with config_file= only key=value overrides apply (e.g. trainer.max_steps=10), "
                          "not group or recipe choices")
    check_override_keys(rest)
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(TrainConfig), OmegaConf.load(path), OmegaConf.from_dotlist(rest))
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or ""
        raise ConfigError(f"config_file={path}: {key + ': ' if key else ''}{str(e).splitlines()[0]}") from e
    validate(cfg, [path])
    choices_file = path.parent / "choices.json"
    choices = json.loads(choices_file.read_text()) if choices_file.is_file() else {}
    return cfg, choices
