"""What the commands share: the command record of the table, help and usage errors, and key=value arguments
into a command's options dataclass. Imports nothing heavy; omegaconf loads when options are parsed."""
from __future__ import annotations

import dataclasses
import sys
from typing import Any, Callable

from ftctl.core.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Command:
    """One row of the command table. ``parse`` reads the arguments after the command word (raising ShowUsage
    or a ConfigError); ``check`` composes what the run would compose, without loading a model, reading a run
    directory or writing a file; ``run`` does the work and returns the exit status."""

    parse: Callable[[list[str]], Any]
    run: Callable[[Any, bool], int]
    check: Callable[[Any], None] = lambda parsed: None


class ShowUsage(Exception):
    """The arguments ask for help (code 0), or name no subcommand (code 2, ``why`` says what is missing):
    print the usage and exit with ``code``."""

    def __init__(self, code: int = 0, why: str = ""):
        super().__init__(why)
        self.code = code
        self.why = why


class UsageError(ConfigError):
    """A command line that cannot be read (unknown command, option or subcommand): one line and exit status 2,
    without a traceback even under --debug."""


def err(msg: str) -> None:
    print(f"ftctl: error: {msg}", file=sys.stderr)


def help_requested(args: list[str]) -> None:
    """-h or --help anywhere among ``args``: show the usage."""
    if any(a in ("-h", "--help") for a in args):
        raise ShowUsage(0)


def subcommand(args: list[str], command: str, available: str) -> list[str]:
    """The arguments after ``command``'s one subcommand ``available`` (e.g. ``sweep report``)."""
    if not args:
        raise ShowUsage(2, f"{command}: needs a subcommand (available: {available})")
    if args[0] in ("-h", "--help"):
        raise ShowUsage(0)
    if args[0] != available:
        raise UsageError(f"{command}: unknown subcommand '{args[0]}' (available: {available})")
    return args[1:]


@dataclasses.dataclass
class WithOverrides:
    """A command's own options (its dataclass), and the training config's keys it composes beside them
    (recipe=, data.path=, peft.r=, ...): ftctl eval, quantize and plan."""
    options: Any
    overrides: list[str] = dataclasses.field(default_factory=list)


def parse_with_overrides(cls, args: list[str], command: str) -> WithOverrides:
    help_requested(args)
    own, rest = own_keys(cls, args)
    return WithOverrides(options(cls, own, command), rest)


def own_keys(cls, args: list[str]) -> tuple[list[str], list[str]]:
    """key=value arguments for the command's own dataclass ``cls``, and the rest (training-config
    overrides such as recipe= or data.path=)."""
    keys = {f.name for f in dataclasses.fields(cls)}
    own = [a for a in args if a.split("=", 1)[0] in keys]
    return own, [a for a in args if a not in own]


def options(cls, args: list[str], command: str):
    """key=value arguments into the dataclass ``cls``; one clear line for an unknown key or bad value.
    Text fields take the value literally (a prompt may hold '#', ':' or brackets); the others are parsed
    as YAML values (numbers, booleans, lists)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

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


def compose_overrides(overrides: list[str]):
    """The training config ``overrides`` compose to (recipe=, data.path=, ...), validated; no model loads."""
    from ftctl.config.compose import compose

    return compose("train", overrides)
