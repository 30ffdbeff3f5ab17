"""ftctl train [-m] [--cfg job] [--dry-run] [overrides]: compose, then train here, under torchrun, or as a sweep."""
from __future__ import annotations

from dataclasses import dataclass, field

from ftctl.cli.args import Command, ShowUsage, UsageError
from ftctl.core.errors import ConfigError


@dataclass
class TrainArgs:
    overrides: list[str] = field(default_factory=list)
    multirun: bool = False  # -m: a sweep over the comma-separated values
    dry_run: bool = False  # print the torchrun command of a multi-process run
    print_cfg: str | None = None  # "job": print the composed config


def parse(args: list[str]) -> TrainArgs:
    out = TrainArgs()
    it = iter(args)
    for a in it:
        if a in ("-m", "--multirun"):
            out.multirun = True
        elif a in ("-c", "--cfg"):
            out.print_cfg = next(it, "job")
        elif a.startswith("--cfg="):
            out.print_cfg = a.split("=", 1)[1]
        elif a == "--dry-run":
            out.dry_run = True
        elif a in ("-h", "--help"):
            raise ShowUsage(0)
        elif a.startswith("-"):
            raise UsageError(f"train: unknown option {a}")
        else:
            out.overrides.append(a)
    if out.print_cfg is not None and out.print_cfg != "job":
        raise UsageError(f"--cfg {out.print_cfg}: only --cfg job is supported")
    return out


def check_sweep(overrides: list[str]) -> None:
    """A sweep's first trial composes: one clear line for a bad key, before any trial starts."""
    from hydra.errors import HydraException

    from ftctl.config.compose import compose, first_trial

    try:
        compose("train", first_trial(overrides))
    except HydraException as e:
        raise ConfigError(str(e).splitlines()[0]) from e


def check_config_file_overrides(overrides: list[str]) -> None:
    """``config_file=FILE key=value ...``: the keys on top of the saved config (the file itself is read by the
    run, ftctl.train.launch.load_config, with the same checks)."""
    from ftctl.config.compose import check_override_keys
    from ftctl.config.schema import GROUPS

    rest = [o for o in overrides if not o.startswith("config_file=")]
    bad = [o for o in rest if "=" not in o or o.split("=", 1)[0] in ("recipe",) + GROUPS]
    if bad:
        raise ConfigError(f"{bad[0]}: with config_file= only key=value overrides apply (e.g. trainer.max_steps=10), "
                          "not group or recipe choices")
    check_override_keys(rest)


def check(t: TrainArgs) -> None:
    from ftctl.config.compose import compose
    from ftctl.train.launch import config_file

    if config_file(t.overrides):
        check_config_file_overrides(t.overrides)
    elif t.multirun:
        check_sweep(t.overrides)
    else:
        compose("train", t.overrides)


def warn_destinations(overrides: list[str], console) -> None:
    """Network addresses that come from a recipe file (not the command line or the environment), said before
    anything is sent there."""
    from ftctl.config.compose import recipe_destinations

    for d in recipe_destinations(overrides):  # recipe=NAME or recipe=FILE.yaml, already checked by the compose
        console.print(f"ftctl: note: a network address comes from a recipe file, not from you: {d}; the run "
                      "sends data there if it uses that key; give it on the command line to make it yours",
                      style="yellow", markup=False,
                      highlight=False)


def run(t: TrainArgs, debug: bool) -> int:
    from ftctl.core.console import make_console

    if t.multirun:
        check_sweep(t.overrides)
        warn_destinations(t.overrides, make_console())
        from ftctl.experiments.sweep import multirun as run_sweep

        return run_sweep(t.overrides, debug=debug)

    from ftctl.config.compose import compose
    from ftctl.train import launch

    cfg, choices = launch.load_config(t.overrides) if launch.config_file(t.overrides) else compose("train", t.overrides)
    if t.print_cfg == "job":
        from omegaconf import OmegaConf

        print(OmegaConf.to_yaml(cfg), end="")
        return 0
    if not launch.config_file(t.overrides):
        warn_destinations(t.overrides, make_console())
    if t.dry_run or launch.needed(cfg):  # N processes: re-run under torchrun, each worker reading the saved config
        return launch.launch(cfg, choices, make_console(), debug=debug, dry_run=t.dry_run)
    from ftctl.train.loop import train

    train(cfg, choices, console=make_console(), debug=debug)
    return 0


COMMAND = Command(parse, run, check)
