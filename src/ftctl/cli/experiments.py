"""Looking at runs and planning them: ftctl report, sweep report, runs [compare], plan and data preview."""
from __future__ import annotations

from dataclasses import dataclass, field

from ftctl.cli.args import (
    Command,
    ShowUsage,
    UsageError,
    WithOverrides,
    compose_overrides,
    help_requested,
    options,
    parse_with_overrides,
    subcommand,
)
from ftctl.core.errors import ConfigError


# ----------------------------------------------------------------------------- report
def parse_report(args: list[str]):
    from ftctl.report import ReportConfig

    help_requested(args)
    args = [a if "=" in a else f"run={a}" for a in args]  # `ftctl report DIR` works too
    return options(ReportConfig, args, "report")


def run_report(rcfg, debug: bool) -> int:
    from ftctl.core.console import make_console
    from ftctl.report import report

    report(rcfg, make_console())
    return 0


# ----------------------------------------------------------------------------- sweep report
def parse_sweep(args: list[str]):
    from ftctl.experiments.sweep import SweepReportConfig

    rest = [a if "=" in a else f"dir={a}" for a in subcommand(args, "sweep", "report")]
    opts = options(SweepReportConfig, rest, "sweep report")
    if not opts.dir:
        raise ConfigError("sweep report needs the sweep folder: ftctl sweep report multirun/<recipe>/<time>")
    return opts


def run_sweep(opts, debug: bool) -> int:
    from ftctl.core.console import make_console
    from ftctl.experiments.sweep import sweep_report

    sweep_report(opts.dir, opts.metric, console=make_console())
    return 0


# ----------------------------------------------------------------------------- runs
@dataclass
class RunsArgs:
    compare: bool
    args: list[str]  # runs: folders and status=S; runs compare: the run directories


def parse_runs(args: list[str]) -> RunsArgs:
    if args and args[0] in ("-h", "--help"):
        raise ShowUsage(0)
    if args and args[0] == "compare":
        if len(args[1:]) < 2:
            raise ConfigError("runs compare needs two or more run directories: ftctl runs compare RUN RUN [...]")
        return RunsArgs(True, args[1:])
    for a in args:
        if "=" in a and not a.startswith("status="):
            raise ConfigError(f"runs: unknown argument {a!r}; give folders and optionally status=finished|failed|...")
    return RunsArgs(False, list(args))


def run_runs(r: RunsArgs, debug: bool) -> int:
    from ftctl.core.console import make_console
    from ftctl.experiments.runs import compare_runs, list_runs

    (compare_runs if r.compare else list_runs)(r.args, make_console())
    return 0


# ----------------------------------------------------------------------------- plan
def parse_plan(args: list[str]) -> WithOverrides:
    from ftctl.experiments.plan import PlanConfig

    return parse_with_overrides(PlanConfig, args, "plan")


def check_plan(p: WithOverrides) -> None:
    """The strategy's name, and the config the plan composes (run=: the run's own, which takes no overrides)."""
    from ftctl.config.choices import STRATEGIES

    if p.options.strategy and p.options.strategy not in STRATEGIES:
        raise ConfigError(f"strategy={p.options.strategy}: must be one of {', '.join(STRATEGIES)}")
    if p.options.run:
        if p.overrides:
            raise ConfigError(f"plan run={p.options.run}: plans the run's own config; drop {' '.join(p.overrides)}")
        return
    compose_overrides(p.overrides)


def run_plan(p: WithOverrides, debug: bool) -> int:
    from ftctl.core.console import make_console
    from ftctl.experiments.plan import plan

    plan(p.options, p.overrides, make_console())
    return 0


# ----------------------------------------------------------------------------- data preview
@dataclass
class PreviewArgs:
    n: int = 3
    split: str = "train"
    overrides: list[str] = field(default_factory=list)


def parse_data(args: list[str]) -> PreviewArgs:
    out = PreviewArgs()
    for a in subcommand(args, "data", "preview"):
        if a.startswith("n="):
            try:
                out.n = int(a[2:])
            except ValueError:
                raise ConfigError(f"{a}: n must be a whole number") from None
            if out.n < 0:
                raise ConfigError(f"{a}: n must be >= 0")
        elif a.startswith("split="):
            out.split = a[6:]
        elif a.startswith("-"):
            raise UsageError(f"data preview: unknown option {a}")
        else:
            out.overrides.append(a)
    return out


def check_data(p: PreviewArgs) -> None:
    compose_overrides(p.overrides)


def run_data(p: PreviewArgs, debug: bool) -> int:
    from ftctl.core.console import make_console
    from ftctl.experiments.preview import show

    cfg, _ = compose_overrides(p.overrides)
    show(cfg, make_console(), n=p.n, split=p.split)
    return 0


REPORT = Command(parse_report, run_report)
SWEEP = Command(parse_sweep, run_sweep)
RUNS = Command(parse_runs, run_runs)
PLAN = Command(parse_plan, run_plan, check_plan)
DATA = Command(parse_data, run_data, check_data)
