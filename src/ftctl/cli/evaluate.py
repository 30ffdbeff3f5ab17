"""ftctl eval METRIC [METRIC ...] run=DIR|model=DIR [key=value ...]: generate on held-out rows and score."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ftctl.cli.args import Command, compose_overrides, help_requested, options, own_keys
from ftctl.core.errors import ConfigError


@dataclass
class EvalArgs:
    options: Any  # ftctl.evaluate.run.EvalConfig
    overrides: list[str] = field(default_factory=list)  # the training config's keys (data.path=, recipe=, ...)


def parse(args: list[str]) -> EvalArgs:
    from ftctl.evaluate.run import EvalConfig

    help_requested(args)
    metrics = [a for a in args if "=" not in a]
    kv, overrides = own_keys(EvalConfig, [a for a in args if "=" in a])
    ecfg = options(EvalConfig, kv, "eval")
    ecfg.metrics = list(ecfg.metrics) + metrics
    return EvalArgs(ecfg, overrides)


def check(e: EvalArgs) -> None:
    """The metric names, and the overrides as the run applies them: on a run's config (data.* and template.*
    keys only) or composed with the model folder."""
    from ftctl.config.compose import check_override_keys
    from ftctl.core.registry import METRICS
    from ftctl.evaluate.run import MODEL_METRICS

    names = METRICS.names() + list(MODEL_METRICS)
    for m in e.options.metrics:
        if m not in names:
            raise ConfigError(f"eval metric {m!r} is not known; choose one of: {', '.join(names)}")
    if e.options.run:
        for o in e.overrides:
            if "=" not in o or o.split("=", 1)[0].split(".")[0] not in ("data", "template"):
                raise ConfigError(f"{o}: with run=, only data.* and template.* keys can be changed")
        check_override_keys(e.overrides)
    elif e.options.model:
        folder = Path(e.options.model).expanduser().resolve()
        compose_overrides(list(e.overrides) + [f"model.path={folder}", "quant=none"])


def run(e: EvalArgs, debug: bool) -> int:
    from ftctl.core.console import make_console
    from ftctl.evaluate.run import run_eval

    run_eval(e.options, e.overrides, console=make_console())
    return 0


COMMAND = Command(parse, run, check)
