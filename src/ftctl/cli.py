"""ftctl's command line: parse argv, compose the config, dispatch. Imports little at start-up;
torch and transformers load only inside the command that needs them."""
from __future__ import annotations

import os
import sys

USAGE = """\
usage: ftctl [--debug] <command> [args]

commands:
  train [-m] [--cfg job] [recipe=NAME] [group=option ...] [key=value ...]
        fine-tune; -m runs a sweep (e.g. peft.r=4,8,16); --cfg job prints the composed config
  eval METRIC [METRIC ...] run=DIR [compare=base] [limit=N] [max_new_tokens=N] [batch_size=N] [name=NAME]
        generate on the run's held-out rows and score (metrics: exact_match, rougeL)
  data preview [recipe=NAME] [n=3] [split=train|validation|test] [key=value ...]
        show rendered examples (trained tokens marked) and token statistics, without training
  recipes
        list the recipes with a one-line description each

config groups: model data template peft quant precision trainer distributed
examples:
  ftctl train recipe=qlora_llama
  ftctl train recipe=lora_smollm2 trainer.max_steps=50 output_dir=outputs/try
  ftctl train -m recipe=lora_smollm2 peft.r=4,8,16,32
  ftctl eval exact_match rougeL run=outputs/try compare=base
options:
  --debug   show Python tracebacks (also FTCTL_DEBUG=1)
"""


def _console():
    from rich.console import Console

    # soft_wrap: long lines are not broken at 80 columns when stdout is a file or a CI log
    return Console(soft_wrap=True)


def _err(msg: str) -> None:
    print(f"ftctl: error: {msg}", file=sys.stderr)


def cmd_recipes(args: list[str]) -> int:
    from .config import list_recipes

    from rich.table import Table

    table = Table(show_header=True, header_style="bold")
    table.add_column("recipe")
    table.add_column("description")
    for name, desc, _ in list_recipes():
        table.add_row(name, desc)
    _console().print(table)
    return 0


def _first_of_sweeps(overrides: list[str]) -> list[str]:
    """The first trial of a sweep, for validating it before any trial starts."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    out = []
    for o, parsed in zip(overrides, OverridesParser.create().parse_overrides(overrides)):
        if parsed.is_sweep_override():
            first = next(iter(parsed.sweep_string_iterator()))
            out.append(f"{parsed.get_key_element()}={first}")
        else:
            out.append(o)
    return out


def cmd_train(args: list[str], debug: bool) -> int:
    from omegaconf import OmegaConf

    from .config import compose

    multirun = False
    print_cfg = None
    overrides = []
    it = iter(args)
    for a in it:
        if a in ("-m", "--multirun"):
            multirun = True
        elif a in ("-c", "--cfg"):
            print_cfg = next(it, "job")
        elif a.startswith("--cfg="):
            print_cfg = a.split("=", 1)[1]
        elif a in ("-h", "--help"):
            print(USAGE)
            return 0
        elif a.startswith("-"):
            _err(f"train: unknown option {a}")
            return 2
        else:
            overrides.append(a)
    if print_cfg is not None and print_cfg != "job":
        _err(f"--cfg {print_cfg}: only --cfg job is supported")
        return 2

    if multirun:
        from hydra.errors import HydraException

        try:
            compose("train", _first_of_sweeps(overrides))  # one clear line for a bad key, before any trial
        except HydraException as e:
            from .errors import ConfigError

            raise ConfigError(str(e).splitlines()[0]) from e
        from .sweep import multirun as run_sweep

        return run_sweep(overrides, debug=debug)

    cfg, choices = compose("train", overrides)
    if print_cfg == "job":
        print(OmegaConf.to_yaml(cfg), end="")
        return 0
    from .train.runner import train

    train(cfg, choices, console=_console(), debug=debug)
    return 0


def cmd_eval(args: list[str]) -> int:
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from .errors import ConfigError
    from .evaluate.run import EvalConfig, run_eval

    if any(a in ("-h", "--help") for a in args):
        print(USAGE)
        return 0
    metrics = [a for a in args if "=" not in a]
    kv = [a for a in args if "=" in a]
    try:
        ecfg = OmegaConf.merge(OmegaConf.structured(EvalConfig), OmegaConf.from_dotlist(kv))
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or ""
        raise ConfigError(f"eval: {key + ': ' if key else ''}{str(e).splitlines()[0]}") from e
    ecfg.metrics = list(ecfg.metrics) + metrics
    run_eval(OmegaConf.to_object(ecfg), console=_console())
    return 0


def cmd_data(args: list[str]) -> int:
    from .config import compose
    from .data.preview import show
    from .errors import ConfigError

    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if args else 2
    if args[0] != "preview":
        _err(f"data: unknown subcommand '{args[0]}' (available: preview)")
        return 2
    n, split, overrides = 3, "train", []
    for a in args[1:]:
        if a.startswith("n="):
            try:
                n = int(a[2:])
            except ValueError:
                raise ConfigError(f"{a}: n must be a whole number") from None
            if n < 0:
                raise ConfigError(f"{a}: n must be >= 0")
        elif a.startswith("split="):
            split = a[6:]
        elif a.startswith("-"):
            _err(f"data preview: unknown option {a}")
            return 2
        else:
            overrides.append(a)
    cfg, _ = compose("train", overrides)
    show(cfg, _console(), n=n, split=split)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get("FTCTL_DEBUG", "") not in ("", "0")
    if "--debug" in argv:
        debug = True
        argv.remove("--debug")
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 2
    if argv[0] == "--version":
        from . import __version__

        print(f"ftctl {__version__}")
        return 0
    cmd, rest = argv[0], argv[1:]
    from .errors import FtctlError

    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")  # no telemetry; the hub is contacted only for a hub id

    if not debug:  # libraries' deprecation notices are for ftctl's developers, not its users
        import warnings

        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)

    try:
        if cmd == "train":
            return cmd_train(rest, debug)
        if cmd == "eval":
            return cmd_eval(rest)
        if cmd == "recipes":
            return cmd_recipes(rest)
        if cmd == "data":
            return cmd_data(rest)
        _err(f"unknown command '{cmd}' (commands: train, eval, data, recipes; see ftctl --help)")
        return 2
    except FtctlError as e:
        if debug:
            raise
        _err(str(e))
        return e.exit_code
    except KeyboardInterrupt:
        if debug:
            raise
        _err("interrupted")
        return 130
    except Exception as e:  # anything else: one line, the traceback only with --debug
        if debug:
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        _err(f"{type(e).__name__}: {msg} (run with --debug for the traceback)")
        return 1


if __name__ == "__main__":
    sys.exit(main())
