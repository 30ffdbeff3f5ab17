"""ftctl's command line: a table of commands, each a small module with a parse step (argv into the command's
options, shared by ``check_command`` and the run) and a run step. Imports little at start-up; torch and
transformers load only inside the command that needs them."""
from __future__ import annotations

import os
import sys

from ftctl.cli import catalog, evaluate, experiments, post, train
from ftctl.cli.args import Command, ShowUsage, UsageError, err
from ftctl.cli.usage import USAGE
from ftctl.core.atomic import disk_full

# the commands, in the order the unknown-command message lists them
COMMANDS: dict[str, Command] = {
    "train": train.COMMAND,
    "eval": evaluate.COMMAND,
    "report": experiments.REPORT,
    "sweep": experiments.SWEEP,
    "runs": experiments.RUNS,
    "plan": experiments.PLAN,
    "merge": post.MERGE,
    "quantize": post.QUANTIZE,
    "generate": post.GENERATE,
    "chat": post.CHAT,
    "data": experiments.DATA,
    "recipes": catalog.RECIPES,
    "methods": catalog.METHODS,
}

__all__ = ["COMMANDS", "USAGE", "check_command", "main"]


def command(name: str) -> Command:
    if name not in COMMANDS:
        raise UsageError(f"unknown command '{name}' (commands: {', '.join(COMMANDS)}; see ftctl --help)")
    return COMMANDS[name]


def check_command(argv: list[str]) -> None:
    """Parse and validate ``argv`` (the words after ``ftctl``) as the command would, composing the training
    config it would compose, without loading a model, reading a run directory or writing a file. Raises
    ConfigError with one line for an unknown command, option or key, or a bad value."""
    from ftctl.core.errors import ConfigError

    argv = [a for a in argv if a != "--debug"]
    if not argv:
        raise ConfigError("no command (see ftctl --help)")
    if argv[0] in ("-h", "--help", "help", "--version"):
        return
    cmd = command(argv[0])
    try:
        parsed = cmd.parse(argv[1:])
    except ShowUsage as e:
        if e.code:
            raise ConfigError(e.why or f"{argv[0]}: incomplete command (see ftctl --help)") from None
        return
    cmd.check(parsed)


def _quiet_libraries() -> None:
    """Libraries' deprecation notices and log lines that are for ftctl's developers, not its users."""
    import logging
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    # torchao (imported by transformers/peft when installed) reports CUDA kernels it cannot load on a CPU
    # machine, and torch's pytree module a deprecation: neither is the user's concern
    logging.getLogger("torchao").setLevel(logging.ERROR)
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
    # bitsandbytes, on a CPU with AVX512-BF16, looks for an optional faster 4-bit kernel on the hub and
    # falls back to its own when it is not there
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    # ... and, offline, the kernels package says it skips its publisher check for that kernel
    logging.getLogger("kernels").setLevel(logging.ERROR)


def _prepare(debug: bool) -> None:
    # Accelerate imports DeepSpeed whenever it is installed (2-3 s, in every process); only distributed=zero*
    # needs it, and that engine imports it itself (ftctl.train.distributed.import_deepspeed)
    if "deepspeed" not in sys.modules:
        sys.modules["deepspeed"] = None
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")  # no telemetry; the hub is contacted only for a hub id
    if not debug:
        _quiet_libraries()


def _run(name: str, args: list[str], debug: bool) -> int:
    """Parse and run one command; every error becomes one line and an exit status (tracebacks with --debug)."""
    from ftctl.core.errors import FtctlError

    try:
        cmd = command(name)
        return cmd.run(cmd.parse(args), debug)
    except ShowUsage as e:
        print(USAGE)
        return e.code
    except UsageError as e:  # the command line itself: one line even with --debug
        err(str(e))
        return e.exit_code
    except FtctlError as e:
        if debug:
            raise
        err(str(e))
        return e.exit_code
    except KeyboardInterrupt:
        if debug:
            raise
        err("interrupted")
        return 130
    except Exception as e:  # anything else: one line, the traceback only with --debug
        if debug:
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        if disk_full(e):  # a full disk anywhere ftctl writes (data and model caches too): the user's to fix, exit 2
            where = getattr(e, "filename", None)
            err(f"no space left on device{f' writing {where}' if where else ''}: {msg}")
            return 2
        err(f"{type(e).__name__}: {msg} (run with --debug for the traceback)")
        return 1


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
        from ftctl import __version__

        print(f"ftctl {__version__}")
        return 0
    _prepare(debug)
    return _run(argv[0], argv[1:], debug)


if __name__ == "__main__":
    sys.exit(main())
