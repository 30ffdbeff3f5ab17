"""After training: ftctl merge, quantize, generate and chat."""
from __future__ import annotations

from pathlib import Path

from ftctl.cli.args import (
    Command,
    WithOverrides,
    compose_overrides,
    help_requested,
    options,
    parse_with_overrides,
)


# ----------------------------------------------------------------------------- merge
def parse_merge(args: list[str]):
    from ftctl.post.merge import MergeConfig

    help_requested(args)
    return options(MergeConfig, args, "merge")


def run_merge(mcfg, debug: bool) -> int:
    from ftctl.core.console import make_console
    from ftctl.post.merge import merge

    merge(mcfg, make_console())
    return 0


# ----------------------------------------------------------------------------- quantize
def parse_quantize(args: list[str]) -> WithOverrides:
    from ftctl.post.quantize import QuantizeConfig

    return parse_with_overrides(QuantizeConfig, args, "quantize")


def check_quantize(q: WithOverrides) -> None:
    """The method's name, and the held-out rows' config as the run composes it."""
    from ftctl.post.quantize import QUANTIZERS

    if q.options.method:
        QUANTIZERS.get(q.options.method)
    src = Path(q.options.model or ".").expanduser().resolve()
    compose_overrides(list(q.overrides) + [f"model.path={src}", "quant=none"])


def run_quantize(q: WithOverrides, debug: bool) -> int:
    from ftctl.core.console import make_console
    from ftctl.post.quantize import quantize

    quantize(q.options, q.overrides, make_console())
    return 0


# ----------------------------------------------------------------------------- generate, chat
def parse_generate(args: list[str], command: str = "generate"):
    from ftctl.post.chat import GenerateConfig

    help_requested(args)
    return options(GenerateConfig, args, command)


def parse_chat(args: list[str]):
    return parse_generate(args, "chat")


def run_generate(gcfg, debug: bool) -> int:
    from ftctl.core.console import make_console
    from ftctl.post.chat import generate_cmd

    generate_cmd(gcfg, make_console())
    return 0


def run_chat(gcfg, debug: bool) -> int:
    from ftctl.core.console import make_console
    from ftctl.post.chat import chat_cmd

    chat_cmd(gcfg, make_console())
    return 0


MERGE = Command(parse_merge, run_merge)
QUANTIZE = Command(parse_quantize, run_quantize, check_quantize)
GENERATE = Command(parse_generate, run_generate)
CHAT = Command(parse_chat, run_chat)
