"""Composition of configs/ + recipes/ + command-line overrides into one validated config.

YAML declares, Python decides: every choice is a short name looked up in a registry
(``ftctl.core.registry``). The schema's dataclasses (schema.py) are registered in Hydra's ConfigStore so
that a misspelt key or a value of the wrong type stops composition; ``validate`` (validate.py) then checks
allowed values (choices.py) and ranges. Either way the user gets one line naming the key, the value and what is allowed.
"""
from __future__ import annotations

import atexit
import dataclasses
import difflib
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, open_dict

from ftctl.config.schema import GROUPS, TrainConfig, register_schemas
from ftctl.config.validate import locate, validate
from ftctl.core.errors import ConfigError
from ftctl.core.paths import config_dir, recipes_dir

# ----------------------------------------------------------------------------- recipes
_search_roots: dict[str, str] = {}


def _recipe_root(folder: Path) -> str:
    """Hydra finds group ``recipe`` under a search-path root; make a root whose recipe/ is ``folder``."""
    key = str(folder.resolve())
    if key not in _search_roots:
        root = tempfile.mkdtemp(prefix="ftctl-recipes-")
        os.symlink(key, os.path.join(root, "recipe"))
        atexit.register(shutil.rmtree, root, True)
        _search_roots[key] = root
    return _search_roots[key]


def recipe_dirs() -> list[Path]:
    """Built-in recipes, then any folders in $FTCTL_RECIPES (os.pathsep-separated)."""
    dirs = [recipes_dir()]
    for p in os.environ.get("FTCTL_RECIPES", "").split(os.pathsep):
        if p:
            d = Path(p).expanduser()
            if not d.is_dir():
                raise ConfigError(f"FTCTL_RECIPES: no such folder: {d}")
            dirs.append(d)
    return dirs


def list_recipes() -> list[tuple[str, str, Path]]:
    """(name, description, file) for every recipe; a later folder's recipe shadows an earlier one's."""
    import yaml

    found: dict[str, tuple[str, str, Path]] = {}
    for d in recipe_dirs():
        for f in sorted(d.glob("*.yaml")):
            try:
                desc = (yaml.safe_load(f.read_text()) or {}).get("description", "")
            except yaml.YAMLError as e:
                desc = f"(unreadable: {str(e).splitlines()[0]})"
            found[f.stem] = (f.stem, desc, f)
    return sorted(found.values())


def _find_recipe_file(name: str) -> Optional[Path]:
    for d in reversed(recipe_dirs()):
        f = d / f"{name}.yaml"
        if f.is_file():
            return f
    return None


def _prepare_recipe_override(overrides: list[str]) -> list[str]:
    """``recipe=path/to/file.yaml`` works too: its folder joins the search path."""
    out = []
    for o in overrides:
        m = re.fullmatch(r"recipe=(.+\.ya?ml)", o)
        if m:
            f = Path(m.group(1)).expanduser()
            if not f.is_file():
                raise ConfigError(f"recipe={m.group(1)}: no such file")
            os.environ["FTCTL_RECIPES"] = os.pathsep.join(
                p for p in [os.environ.get("FTCTL_RECIPES", ""), str(f.parent)] if p
            )
            o = f"recipe={f.stem}"
        out.append(o)
    return out


def recipe_search_path() -> str:
    """The ``hydra.searchpath=[...]`` override that makes every recipe folder Hydra's group ``recipe``."""
    roots = ",".join(f"file://{_recipe_root(d)}" for d in recipe_dirs())
    return f"hydra.searchpath=[{roots}]"


def prepare_overrides(overrides: list[str]) -> list[str]:
    """Command-line overrides as Hydra takes them: ``recipe=file.yaml`` resolved, keys checked, Hydra's own
    settings limited to the allow-list, and every recipe named checked as untrusted data (``check_recipe``)."""
    overrides = _prepare_recipe_override(list(overrides))
    check_hydra_overrides(overrides)
    check_override_keys(overrides)
    for name in recipe_names(overrides):
        f = _find_recipe_file(name)
        if f is not None:
            check_recipe(f)
    return overrides


# ----------------------------------------------------------------------------- untrusted recipes
# Hydra settings a command line may give (a sweep's search and where its trials run), and nothing else:
# hydra.job.env_set, hydra.callbacks, hydra.output_subdir, hydra.run.dir, hydra.searchpath... are refused
HYDRA_CHOICES = ("hydra/sweeper", "hydra/sweeper/sampler", "hydra/launcher")
HYDRA_KEYS = ("hydra.sweeper.", "hydra.launcher.")
HYDRA_VALUES = ("hydra.sweep.dir",)
# a resolver call in a value (${oc.env:HOME}, ${oc.decode:...}); plain interpolations (${trainer.lr}) have no colon
_RESOLVER = re.compile(r"\$\{\s*([\w.\-]+)\s*:")


def check_hydra_overrides(overrides: list[str]) -> None:
    """Only the allow-list of Hydra settings (sweeper, sampler and launcher choice and their parameters, and
    hydra.sweep.dir) is accepted on the command line; ConfigError (exit 2) for anything else under hydra."""
    for o in overrides:
        key = o.lstrip("+~").split("=", 1)[0].strip()
        if not (key == "hydra" or key.startswith(("hydra.", "hydra/"))):
            continue
        if not o.startswith("~") and "=" in o and (key in HYDRA_CHOICES or key in HYDRA_VALUES
                                                    or key.startswith(HYDRA_KEYS)):
            continue
        raise ConfigError(f"{o}: refused; of Hydra's settings ftctl takes only {', '.join(c + '=' for c in HYDRA_CHOICES)},"
                          f" {', '.join(k + '*' for k in HYDRA_KEYS)} and hydra.sweep.dir= on the command line")


def recipe_names(overrides: list[str]) -> list[str]:
    """The recipe names an override list chooses (``recipe=a``, or a sweep's ``recipe=a,b`` / ``choice(a,b)``)."""
    names = []
    for o in overrides:
        if o.lstrip("+").startswith("recipe="):
            value = o.split("=", 1)[1]
            value = re.sub(r"^\s*\w+\((.*)\)\s*$", r"\1", value)  # choice(a,b), range(...)
            names += [v.strip().strip("'\"") for v in value.split(",") if v.strip()]
    return names


def _recipe_line(text: str, pattern: str) -> int:
    for n, line in enumerate(text.splitlines(), 1):
        if re.search(pattern, line):
            return n
    return 1


def check_recipe(f: Path) -> None:
    """A recipe file is data: it may set ftctl's keys and choose options of ftctl's groups, and nothing
    else. Refused, with file:line: a ``hydra`` key (job.env_set, callbacks, output_subdir... would run or write
    anything), a package other than ``_global_``, a defaults entry that is not ``[override] /<group>: <option>``
    of ftctl's groups (hydra/..., another file, a package with @), and a resolver (``${oc.env:...}`` reads the
    environment; only plain interpolations like ``${trainer.lr}`` are kept)."""
    import yaml

    text = f.read_text()
    m = re.search(r"^#\s*@package\s+(\S+)", text, re.M)
    if m and m.group(1) != "_global_":
        raise ConfigError(f"{f}:{_recipe_line(text, '@package')}: '# @package {m.group(1)}' refused; a recipe sets "
                          "keys at the top level (# @package _global_)")
    try:
        alias = next((e for e in yaml.parse(text) if isinstance(e, yaml.AliasEvent)), None)
        if alias is not None:  # *name copies a node: a few lines can expand to billions of values
            raise ConfigError(f"{f}:{alias.start_mark.line + 1}: YAML alias *{alias.anchor} refused in a recipe; "
                              "write the values out")
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise ConfigError(f"{f}:{mark.line + 1 if mark else 1}: not valid YAML "
                          f"({getattr(e, 'problem', None) or str(e).splitlines()[0]})") from None
    if data is None:
        return
    if not isinstance(data, dict):
        raise ConfigError(f"{f}:1: a recipe must be a mapping of keys, not {type(data).__name__}")
    for key in data:
        if str(key).split(".")[0].split("/")[0] == "hydra":
            line = _recipe_line(text, "^" + re.escape(str(key)) + r"\s*:")
            raise ConfigError(f"{f}:{line}: {key}: refused; a recipe "
                              "may not set Hydra's settings (sweeper and launcher choices go on the command line)")
    _check_recipe_defaults(f, text, data.get("defaults"))
    _check_resolvers(f, text, data, "")


def _check_recipe_defaults(f: Path, text: str, defaults) -> None:
    if defaults is None:
        return
    if not isinstance(defaults, list):
        raise ConfigError(f"{f}:{_recipe_line(text, '^defaults')}: defaults must be a list")
    for entry in defaults:
        if entry == "_self_":
            continue
        ok = isinstance(entry, dict) and len(entry) == 1
        if ok:
            (key, value), = entry.items()
            group = re.sub(r"^(override\s+)?/?", "", str(key).strip())
            ok = group in GROUPS and isinstance(value, str) and "@" not in str(key) and re.fullmatch(r"[\w.\-]+", value)
        if not ok:
            shown = entry if not isinstance(entry, dict) else ", ".join(f"{k}: {v}" for k, v in entry.items())
            raise ConfigError(f"{f}:{_recipe_line(text, re.escape(str(shown).split(':')[0].strip()))}: defaults entry "
                              f"'{shown}' refused; a recipe may choose only options of ftctl's groups "
                              f"(override /<group>: <option>, group one of {', '.join(GROUPS)})")


def _check_resolvers(f: Path, text: str, node, where: str) -> None:
    if isinstance(node, dict):
        for k, v in node.items():
            _check_resolvers(f, text, v, f"{where}.{k}" if where else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            _check_resolvers(f, text, v, f"{where}[{i}]")
    elif isinstance(node, str):
        m = _RESOLVER.search(node)
        if m:
            raise ConfigError(f"{f}:{_recipe_line(text, re.escape(m.group(0)))}: {where}: '${{{m.group(1)}:...}}' "
                              "refused; a recipe file may not call resolvers (oc.env reads your environment); "
                              f"give the value on the command line instead ({where}=...)")


def recipe_destinations(overrides: list[str]) -> list[str]:
    """``key=url`` for each network address (scheme://host, other than file: and sqlite:) that a recipe file sets
    and the command line does not: printed before anything is sent, since the recipe may come from anyone."""
    import yaml

    given = {o.lstrip("+").split("=", 1)[0] for o in overrides if "=" in o}
    found = []
    for name in recipe_names(overrides):
        f = Path(name).expanduser() if name.endswith((".yaml", ".yml")) else _find_recipe_file(name)
        data = yaml.safe_load(f.read_text()) if f is not None and f.is_file() else None

        def walk(node, where):
            if isinstance(node, dict):
                for k, v in node.items():
                    walk(v, f"{where}.{k}" if where else str(k))
            elif isinstance(node, str) and re.match(r"^[a-zA-Z][\w+.\-]*://", node) \
                    and not node.startswith(("file:", "sqlite:")) and where not in given:
                found.append(f"{where}={node} (set by {f})")
        if isinstance(data, dict):
            walk({k: v for k, v in data.items() if k not in ("defaults", "description")}, "")
    return found


# ----------------------------------------------------------------------------- compose
def _schema_keys(cls) -> dict[str, Any]:
    return {f.name: f for f in dataclasses.fields(cls)}


def check_override_keys(overrides: list[str], schema=TrainConfig) -> None:
    """Catch misspelt keys on the command line with a suggestion, before Hydra does."""
    for o in overrides:
        if o.startswith(("~", "hydra.", "hydra/", "+hydra")) or "=" not in o:
            continue
        key = o.lstrip("+").split("=", 1)[0]
        if key.split(".")[-1] in ("_target_", "_partial_", "_args_"):
            raise ConfigError(f"{o}: refused; ftctl does not instantiate classes named in configs "
                              "(choose methods by name, e.g. peft.method=lora)")
        parts = key.split(".")
        cls = schema
        for i, part in enumerate(parts):
            fields = _schema_keys(cls)
            if part not in fields:
                where = ".".join(parts[:i]) or "the top level"
                close = difflib.get_close_matches(part, fields, n=1)
                if i == 0 and part in ("recipe",) + GROUPS:
                    break
                hint = f"did you mean {'.'.join(parts[:i] + [close[0]])}?" if close else ""
                raise ConfigError(
                    f"{o}: unknown key '{key}'; keys in {where}: {', '.join(fields)}"
                    + (f" — {hint}" if hint else "")
                )
            ftype = fields[part].type
            sub = getattr(cls, "__dataclass_fields__", {}).get(part)
            default_factory = getattr(sub, "default_factory", dataclasses.MISSING)
            if default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(default_factory):
                cls = default_factory
            elif i < len(parts) - 1:
                # a leaf with a sub-key: only Any/Dict leaves can take one
                if "Dict" not in str(ftype) and "Any" not in str(ftype):
                    raise ConfigError(f"{o}: '{'.'.join(parts[:i + 1])}' is a value, not a group of keys")
                break


def _one_line(exc: BaseException, files: list[Path]) -> str:
    """Turn Hydra/OmegaConf's multi-line messages into one line that names the key."""
    from omegaconf.errors import OmegaConfBaseException

    msg = str(exc).strip()
    cause = exc.__cause__ or exc.__context__
    if isinstance(cause, OmegaConfBaseException) and not isinstance(exc, OmegaConfBaseException):
        inner = cause
    else:
        inner = exc
    full_key = getattr(inner, "full_key", None)
    text = str(inner).strip()
    first = text.splitlines()[0] if text else msg.splitlines()[0]
    m = re.search(r"Could not find '([^']+)'", msg)
    if m:
        group = m.group(1).split("/")[0]
        listing = msg.split("Available options", 1)[-1].split("Config search path", 1)[0] if "Available options" in msg else ""
        opts = re.findall(r"^\t(\S+)", listing, re.M)
        return f"{m.group(1).replace('/', '=', 1)}: no such option for '{group}'" + (
            f"; available: {', '.join(opts)}" if opts else ""
        )
    m = re.search(r"Key '([^']+)' not in '(\w+)'", text)
    if m:
        fk = full_key or m.group(1)
        if m.group(1) in ("_target_", "_partial_", "_args_"):
            return (f"{locate(fk, files)}{fk}: refused; ftctl does not instantiate classes named in configs "
                    "(choose methods by name, e.g. peft.method=lora)")
        return f"{locate(fk, files)}unknown key '{fk}' (not in {m.group(2)})"
    if full_key:
        return f"{locate(full_key, files)}{full_key}: {first}"
    return "; ".join(line.strip() for line in msg.splitlines() if line.strip())


def _unparsable_override(overrides: list[str], exc: BaseException) -> str:
    """Which override Hydra's grammar could not read, and how to quote it."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    parser = OverridesParser.create()
    for o in overrides:
        try:
            parser.parse_overrides([o])
        except OverrideParseException as e:
            key, _, value = o.partition("=")
            why = str(e).strip().splitlines()[0]
            return (f"{o}: cannot read this override ({why}); quote a value holding brackets, parentheses, "
                    f"commas or spaces, e.g. {key}='\"{value}\"' on a shell command line")
    return str(exc).strip().splitlines()[0]


def compose(command: str, overrides: list[str]) -> tuple[DictConfig, dict]:
    """Compose configs/<command>.yaml + recipe + overrides into a validated config (no model loads).

    Returns the config and the group choices (``{"recipe": ..., "model": ...}``).
    """
    import hydra
    from hydra.errors import HydraException, MissingConfigException, OverrideParseException
    from omegaconf.errors import OmegaConfBaseException

    register_schemas()
    overrides = prepare_overrides(overrides)
    hydra_overrides = overrides + [recipe_search_path()]
    recipe = next((o.split("=", 1)[1] for o in overrides if o.startswith("recipe=")), None)
    files = [f for f in [_find_recipe_file(recipe) if recipe else None] if f]
    try:
        with hydra.initialize_config_dir(config_dir=str(config_dir()), version_base="1.3", job_name=command):
            cfg = hydra.compose(config_name=command, overrides=hydra_overrides, return_hydra_config=True)
    except OverrideParseException as e:
        raise ConfigError(_unparsable_override(overrides, e)) from e
    except (HydraException, MissingConfigException, OmegaConfBaseException, ValueError) as e:
        raise ConfigError(_one_line(e, files)) from e
    choices = dict(cfg.hydra.runtime.choices)
    with open_dict(cfg):
        del cfg["hydra"]
    validate(cfg, files)
    return cfg, {k: v for k, v in choices.items() if not k.startswith("hydra") and v is not None}


def first_trial(overrides: list[str]) -> list[str]:
    """The first trial of a sweep, for validating it before any trial starts."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    out = []
    for o, parsed in zip(overrides, OverridesParser.create().parse_overrides(overrides)):
        if parsed.is_sweep_override():
            from hydra.core.override_parser.types import IntervalSweep

            value = parsed.value()
            if isinstance(value, IntervalSweep):  # Optuna's interval(a, b): any value in it composes the same
                first = str(value.start)
            else:
                first = next(iter(parsed.sweep_string_iterator()))
            out.append(f"{parsed.get_key_element()}={first}")
        else:
            out.append(o)
    return out
