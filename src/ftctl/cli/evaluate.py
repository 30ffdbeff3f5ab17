"""ftctl eval METRIC [METRIC ...] run=DIR|model=DIR [key=value ...]: generate on held-out rows and score."""
from __future__ import annotations

from pathlib import Path

from ftctl.cli.args import (
    Command,
    WithOverrides,
    compose_overrides,
    parse_with_overrides,
)
from ftctl.core.errors import ConfigError


def parse(args: list[str]) -> WithOverrides:
    """The metric names (the words), then EvalConfig's keys and the training config's overrides."""
    from ftctl.evaluate.run import EvalConfig

    e = parse_with_overrides(EvalConfig, [a for a in args if "=" in a or a in ("-h", "--help")], "eval")
    e.options.metrics = list(e.options.metrics) + [a for a in args if "=" not in a]
    return e


def check(e: WithOverrides) -> None:
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


def run(e: WithOverrides, debug: bool) -> int:
    from ftctl.core.console import make_console
    from ftctl.evaluate.run import run_eval

    run_eval(e.options, e.overrides, console=make_console())
    return 0


COMMAND = Command(parse, run, check)
