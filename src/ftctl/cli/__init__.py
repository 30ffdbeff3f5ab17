"""ftctl's command line: parse argv, compose the config, dispatch. Imports little at start-up;
torch and transformers load only inside the command that needs them."""
from __future__ import annotations

import os
import sys
from ftctl.config.compose import first_trial
from ftctl.core.console import make_console

USAGE = """\
usage: ftctl [--debug] <command> [args]

commands:
  train [-m] [--cfg job] [--dry-run] [recipe=NAME] [group=option ...] [key=value ...]
        fine-tune; -m runs a sweep (e.g. peft.r=4,8,16); --cfg job prints the composed config;
        --dry-run prints the torchrun command of a multi-process run (launcher.*) without running it;
        config_file=FILE [key=value ...] trains on a saved config (a run's config.yaml)
  eval METRIC [METRIC ...] run=DIR|model=DIR [compare=base] [shots=K] [split=S] [limit=N] [key=value ...]
        generate on held-out rows and score (exact_match rouge rougeL bleu accuracy f1 precision recall
        perplexity); a classifier (task=classify): accuracy f1 precision recall and the confusion matrix
  merge run=DIR [output=DIR] [dtype=float32|bfloat16|float16] [overwrite=true]
        fold a LoRA-family adapter into the base weights; checks logits, writes a standalone model folder
  quantize model=DIR method=nf4|int8|int8_weight_only|int4_weight_only|bitdelta [base=DIR] [output=DIR]
        write a quantized copy; prints size before/after and held-out perplexity before/after
  generate run=DIR|model=DIR prompt="..."|prompts=FILE [max_new_tokens=N] [do_sample=true] [output=FILE]
        generate for one prompt or a file of prompts, wrapped as the run was trained (raw=true: as is)
  chat run=DIR|model=DIR [system="..."] [do_sample=true]
        talk to the model in the terminal, answers streamed (lines piped in are user turns)
  report run=DIR [output=FILE] [examples=5]
        plots/ and one self-contained report.html for a run directory or a sweep folder
  sweep report DIR [metric=NAME]
        the table of a sweep's trials (best marked), DIR/report.md, report.csv and plots/sweep_*.png
  runs [DIR ...] [status=S] | runs compare RUN RUN [...]
        list the runs under a folder (default outputs/ and multirun/), or their config differences and metrics
  plan [recipe=NAME] [key=value ...] [devices=N] [strategy=S] [tokens_per_s=X] | plan run=DIR
        estimate memory (weights, gradients, optimizer, activations) and compute without loading weights;
        run=DIR puts the run's measured peak memory and throughput beside the estimate
  data preview [recipe=NAME] [n=3] [split=train|validation|test] [key=value ...]
        show rendered examples (trained tokens marked) and token statistics, without training
  recipes
        list the recipes with a one-line description each
  methods
        list the adaptation methods (peft=NAME) with a one-line description each

config groups: model data template peft quant precision trainer distributed
examples:
  ftctl train recipe=qlora_llama
  ftctl train recipe=lora_smollm2 trainer.max_steps=50 output_dir=outputs/try
  ftctl train -m recipe=lora_smollm2 peft.r=4,8,16,32
  ftctl train -m recipe=lora_smollm2 hydra/sweeper=optuna hydra.sweeper.n_trials=6 'trainer.lr=interval(1e-4,1e-3)' 'peft.r=choice(4,8,16)'
  ftctl eval exact_match rougeL run=outputs/try compare=base
options:
  --debug   show Python tracebacks (also FTCTL_DEBUG=1)
"""


def _err(msg: str) -> None:
    print(f"ftctl: error: {msg}", file=sys.stderr)


def cmd_recipes(args: list[str]) -> int:
    from ftctl.config.compose import list_recipes

    from rich.table import Table

    table = Table(show_header=True, header_style="bold")
    table.add_column("recipe")
    table.add_column("description")
    for name, desc, _ in list_recipes():
        table.add_row(name, desc)
    make_console().print(table)
    return 0


def cmd_methods(args: list[str]) -> int:
    from rich.table import Table

    from ftctl.methods.peft import describe
    from ftctl.core.registry import ADAPTERS

    table = Table(show_header=True, header_style="bold")
    table.add_column("peft=")
    table.add_column("what it trains")
    for name in ADAPTERS.names():
        table.add_row(name, describe(name))
    make_console().print(table)
    return 0


def cmd_train(args: list[str], debug: bool) -> int:
    from omegaconf import OmegaConf

    from ftctl.config.compose import compose

    multirun = dry_run = False
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
        elif a == "--dry-run":
            dry_run = True
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
            compose("train", first_trial(overrides))  # one clear line for a bad key, before any trial
        except HydraException as e:
            from ftctl.core.errors import ConfigError

            raise ConfigError(str(e).splitlines()[0]) from e
        from ftctl.experiments.sweep import multirun as run_sweep

        return run_sweep(overrides, debug=debug)

    from ftctl.train import launch

    cfg, choices = launch.load_config(overrides) if launch.config_file(overrides) else compose("train", overrides)
    if print_cfg == "job":
        print(OmegaConf.to_yaml(cfg), end="")
        return 0
    if dry_run or launch.needed(cfg):  # N processes: re-run under torchrun, each worker reading the saved config
        return launch.launch(cfg, choices, make_console(), debug=debug, dry_run=dry_run)
    from ftctl.train.runner import train

    train(cfg, choices, console=make_console(), debug=debug)
    return 0


def cmd_eval(args: list[str]) -> int:
    from ftctl.evaluate.run import EvalConfig, run_eval

    if any(a in ("-h", "--help") for a in args):
        print(USAGE)
        return 0
    metrics = [a for a in args if "=" not in a]
    kv, overrides = _own_keys(EvalConfig, [a for a in args if "=" in a])
    ecfg = _options(EvalConfig, kv, "eval")
    ecfg.metrics = list(ecfg.metrics) + metrics
    run_eval(ecfg, overrides, console=make_console())
    return 0


def _own_keys(cls, args: list[str]) -> tuple[list[str], list[str]]:
    """key=value arguments for the command's own dataclass ``cls``, and the rest (training-config
    overrides such as recipe= or data.path=)."""
    import dataclasses

    keys = {f.name for f in dataclasses.fields(cls)}
    own = [a for a in args if a.split("=", 1)[0] in keys]
    return own, [a for a in args if a not in own]


def _options(cls, args: list[str], command: str):
    """key=value arguments into the dataclass ``cls``; one clear line for an unknown key or bad value.
    Text fields take the value literally (a prompt may hold '#', ':' or brackets); the others are parsed
    as YAML values (numbers, booleans, lists)."""
    import dataclasses

    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from ftctl.core.errors import ConfigError

    fields = {f.name: f for f in dataclasses.fields(cls)}
    text, other = {}, []
    for a in args:
        key = a.split("=", 1)[0]
        if "=" not in a or key not in fields:
            raise ConfigError(f"{command}: unknown argument {a!r}; keys: {', '.join(k + '=' for k in fields)}")
        if str(fields[key].type).replace("Optional[", "").rstrip("]") == "str":
            text[key] = a.split("=", 1)[1]
        else:
            other.append(a)
    try:
        conf = OmegaConf.merge(OmegaConf.structured(cls), OmegaConf.from_dotlist(other))
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or ""
        raise ConfigError(f"{command}: {key + ': ' if key else ''}{str(e).splitlines()[0]}") from e
    obj = OmegaConf.to_object(conf)
    for k, v in text.items():
        setattr(obj, k, v)
    return obj


def cmd_merge(args: list[str]) -> int:
    from ftctl.post.merge import MergeConfig, merge

    if any(a in ("-h", "--help") for a in args):
        print(USAGE)
        return 0
    merge(_options(MergeConfig, args, "merge"), make_console())
    return 0


def cmd_quantize(args: list[str]) -> int:
    from ftctl.post.quantize import QuantizeConfig, quantize

    if any(a in ("-h", "--help") for a in args):
        print(USAGE)
        return 0
    own, rest = _own_keys(QuantizeConfig, args)
    quantize(_options(QuantizeConfig, own, "quantize"), rest, make_console())
    return 0


def cmd_generate(args: list[str], chat: bool) -> int:
    from ftctl.post.chat import GenerateConfig, chat_cmd, generate_cmd

    if any(a in ("-h", "--help") for a in args):
        print(USAGE)
        return 0
    gcfg = _options(GenerateConfig, args, "chat" if chat else "generate")
    (chat_cmd if chat else generate_cmd)(gcfg, make_console())
    return 0


def cmd_report(args: list[str]) -> int:
    from ftctl.report import ReportConfig, report

    if any(a in ("-h", "--help") for a in args):
        print(USAGE)
        return 0
    # `ftctl report DIR` works too
    args = [a if "=" in a else f"run={a}" for a in args]
    report(_options(ReportConfig, args, "report"), make_console())
    return 0


def cmd_plan(args: list[str]) -> int:
    from ftctl.experiments.plan import PlanConfig, plan

    if any(a in ("-h", "--help") for a in args):
        print(USAGE)
        return 0
    own, rest = _own_keys(PlanConfig, args)
    plan(_options(PlanConfig, own, "plan"), rest, make_console())
    return 0


def cmd_sweep(args: list[str]) -> int:
    from ftctl.experiments.sweep import SweepReportConfig, sweep_report

    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if args else 2
    if args[0] != "report":
        _err(f"sweep: unknown subcommand '{args[0]}' (available: report)")
        return 2
    rest = [a if "=" in a else f"dir={a}" for a in args[1:]]
    opts = _options(SweepReportConfig, rest, "sweep report")
    if not opts.dir:
        from ftctl.core.errors import ConfigError

        raise ConfigError("sweep report needs the sweep folder: ftctl sweep report multirun/<recipe>/<time>")
    sweep_report(opts.dir, opts.metric, console=make_console())
    return 0


def cmd_runs(args: list[str]) -> int:
    from ftctl.experiments.runs import compare_runs, list_runs

    if args and args[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    if args and args[0] == "compare":
        compare_runs(args[1:], make_console())
        return 0
    list_runs(args, make_console())
    return 0


def cmd_data(args: list[str]) -> int:
    from ftctl.config.compose import compose
    from ftctl.experiments.preview import show
    from ftctl.core.errors import ConfigError

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
    show(cfg, make_console(), n=n, split=split)
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
        from ftctl import __version__

        print(f"ftctl {__version__}")
        return 0
    cmd, rest = argv[0], argv[1:]
    from ftctl.core.errors import FtctlError

    # Accelerate imports DeepSpeed whenever it is installed (2-3 s, in every process); only distributed=zero*
    # needs it, and that engine imports it itself (ftctl.train.distributed.import_deepspeed)
    if "deepspeed" not in sys.modules:
        sys.modules["deepspeed"] = None
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")  # no telemetry; the hub is contacted only for a hub id

    if not debug:  # libraries' deprecation notices are for ftctl's developers, not its users
        import warnings

        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        import logging

        # torchao (imported by transformers/peft when installed) reports CUDA kernels it cannot load on a CPU
        # machine, and torch's pytree module a deprecation: neither is the user's concern
        logging.getLogger("torchao").setLevel(logging.ERROR)
        logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
        # bitsandbytes, on a CPU with AVX512-BF16, looks for an optional faster 4-bit kernel on the hub and
        # falls back to its own when it is not there
        logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
        # ... and, offline, the kernels package says it skips its publisher check for that kernel
        logging.getLogger("kernels").setLevel(logging.ERROR)

    try:
        if cmd == "train":
            return cmd_train(rest, debug)
        if cmd == "eval":
            return cmd_eval(rest)
        if cmd == "recipes":
            return cmd_recipes(rest)
        if cmd == "methods":
            return cmd_methods(rest)
        if cmd == "data":
            return cmd_data(rest)
        if cmd == "merge":
            return cmd_merge(rest)
        if cmd == "quantize":
            return cmd_quantize(rest)
        if cmd in ("generate", "chat"):
            return cmd_generate(rest, chat=cmd == "chat")
        if cmd == "report":
            return cmd_report(rest)
        if cmd == "plan":
            return cmd_plan(rest)
        if cmd == "sweep":
            return cmd_sweep(rest)
        if cmd == "runs":
            return cmd_runs(rest)
        _err(f"unknown command '{cmd}' (commands: train, eval, report, sweep, runs, plan, merge, quantize, generate, chat, data, recipes, methods; "
             "see ftctl --help)")
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
