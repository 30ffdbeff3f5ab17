"""Jinja rendering for templates that come from recipes or datasets: always sandboxed, as
transformers renders chat templates, so a template cannot reach Python internals."""
from __future__ import annotations

from functools import lru_cache

from ftctl.core.errors import ConfigError, DataError


@lru_cache(maxsize=64)
def _compile(source: str):
    from jinja2 import StrictUndefined, TemplateSyntaxError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True,
                                        undefined=StrictUndefined)
    try:
        return env.from_string(source)
    except TemplateSyntaxError as e:
        raise DataError(f"template line {e.lineno}: {e.message}") from e


def check(source: str, where: str) -> None:
    """Compile ``source`` now, so a syntax error is a config error naming ``where``, not a bad row."""
    try:
        _compile(source)
    except DataError as e:

        raise ConfigError(f"{where}: {e.message}") from None


def render(source: str, values: dict, where: str = "template") -> str:
    """Render ``source`` with ``values``; unsafe attribute access or an undefined name is a DataError."""
    from jinja2.exceptions import SecurityError, TemplateError, UndefinedError

    try:
        return _compile(source).render(values)
    except SecurityError as e:
        raise DataError(f"{where}: refused by the template sandbox ({e})") from e
    except UndefinedError as e:
        raise DataError(f"{where}: {e.message}") from e
    except (TemplateError, TypeError, ValueError) as e:  # e.g. a field of the wrong type for the template
        raise DataError(f"{where}: {type(e).__name__}: {e}") from e
