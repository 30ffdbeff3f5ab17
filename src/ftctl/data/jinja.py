"""Jinja rendering for templates that come from recipes or datasets: always sandboxed, as
transformers renders chat templates, so a template cannot reach Python internals, and bounded, so a
template cannot burn CPU or memory without end: each render may write MAX_OUTPUT characters, make
MAX_RANGE_ITEMS range() items in all, and take MAX_SECONDS (timed on the main thread)."""
from __future__ import annotations

import contextlib
import signal
import threading
from functools import lru_cache

from ftctl.core.errors import ConfigError, DataError

MAX_OUTPUT = 1_000_000  # characters one render may write (and the largest string or list it may build)
MAX_RANGE_ITEMS = 1_000_000  # items all range() calls of one render may make together
MAX_SECONDS = 5.0  # wall-clock time of one render (main thread only: the timer is SIGALRM)
MAX_POWER_BITS = 4096  # the largest number `a ** b` may make
# str methods whose integer argument is the size of the string they build
_WIDTH_METHODS = frozenset({"center", "ljust", "rjust", "zfill", "expandtabs"})

_state = threading.local()


class _Stop(BaseException):
    """A render limit was reached (a BaseException, so no ``except Exception`` inside Jinja swallows it)."""


def _spend(items: int) -> None:
    _state.left = getattr(_state, "left", MAX_RANGE_ITEMS) - items
    if _state.left < 0:
        raise _Stop(f"loops over more than {MAX_RANGE_ITEMS:,} range() items")


def _check_size(n: int) -> None:
    if n > MAX_OUTPUT:
        raise _Stop(f"a value over {MAX_OUTPUT:,} characters")


def _width_checked(f):
    def checked(value, width=80, *args, **kwargs):
        _check_size(width if isinstance(width, int) else 0)
        return f(value, width, *args, **kwargs)

    return checked


@lru_cache(maxsize=1)
def _environment():
    from jinja2 import StrictUndefined
    from jinja2.sandbox import ImmutableSandboxedEnvironment, safe_range

    def bounded_range(*args):
        r = safe_range(*args)
        _spend(len(r))
        return r

    class Bounded(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "**"})

        def call_binop(self, context, operator, left, right):
            if operator == "*":
                seq, n = (left, right) if isinstance(right, int) else (right, left)
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int):
                    _check_size(len(seq) * n)
            elif (isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1
                  and right * abs(left).bit_length() > MAX_POWER_BITS):
                raise _Stop(f"too large a number ({left} ** {right})")
            return super().call_binop(context, operator, left, right)

        def call(self, context, obj, /, *args, **kwargs):
            if getattr(obj, "__name__", None) in _WIDTH_METHODS and isinstance(getattr(obj, "__self__", None), str):
                _check_size(max([a for a in args if isinstance(a, int)] + [0]))
            return super().call(context, obj, *args, **kwargs)

    env = Bounded(trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True, undefined=StrictUndefined)
    env.globals["range"] = bounded_range
    for name in ("center", "indent"):  # filters whose width argument is the size of what they build
        env.filters[name] = _width_checked(env.filters[name])
    return env


@lru_cache(maxsize=64)
def _compile(source: str):
    from jinja2 import TemplateSyntaxError

    try:
        return _environment().from_string(source)
    except TemplateSyntaxError as e:
        raise DataError(f"template line {e.lineno}: {e.message}") from e
    except _Stop as e:  # a constant expression over the limits, folded while compiling
        raise ConfigError(_stopped(e)) from None


def _stopped(e: _Stop) -> str:
    return (f"rendering stopped: {e} (a template may write {MAX_OUTPUT:,} characters, loop over "
            f"{MAX_RANGE_ITEMS:,} range() items and run {MAX_SECONDS:g} s per row)")


def check(source: str, where: str) -> None:
    """Compile ``source`` now, so a syntax error is a config error naming ``where``, not a bad row."""
    try:
        _compile(source)
    except (DataError, ConfigError) as e:

        raise ConfigError(f"{where}: {e.message}") from None


@contextlib.contextmanager
def _deadline(seconds: float):
    """Stop a render that runs over ``seconds`` (on the main thread, when no other timer is set)."""
    if (threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer")
            or signal.getitimer(signal.ITIMER_REAL)[0] > 0):
        yield
        return

    def on_alarm(signum, frame):
        raise _Stop(f"took over {seconds:g} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old if old is not None else signal.SIG_DFL)


def _bounded(template, values: dict) -> str:
    out, size = [], 0
    _state.left = MAX_RANGE_ITEMS
    with _deadline(MAX_SECONDS):
        for chunk in template.generate(values):
            size += len(chunk)
            if size > MAX_OUTPUT:
                raise _Stop(f"output over {MAX_OUTPUT:,} characters")
            out.append(chunk)
    return "".join(out)


@contextlib.contextmanager
def time_limit(where: str, seconds: float = MAX_SECONDS):
    """Stop whatever renders inside (e.g. a tokenizer's chat template) after ``seconds``: a ConfigError."""
    try:
        with _deadline(seconds):
            yield
    except _Stop as e:
        raise ConfigError(f"{where}: {_stopped(e)}") from None


def render(source: str, values: dict, where: str = "template") -> str:
    """Render ``source`` with ``values``; unsafe attribute access or an undefined name is a DataError (this
    row's problem); a render over the limits (output, loops, time) is a ConfigError (the template's)."""
    from jinja2.exceptions import SecurityError, TemplateError, UndefinedError

    template = _compile(source)
    try:
        return _bounded(template, values)
    except _Stop as e:  # the template's fault, not the row's: no data.bad_rows=skip of every row
        raise ConfigError(f"{where}: {_stopped(e)}") from None
    except SecurityError as e:
        raise DataError(f"{where}: refused by the template sandbox ({e})") from e
    except UndefinedError as e:
        raise DataError(f"{where}: {e.message}") from e
    except (TemplateError, TypeError, ValueError, OverflowError) as e:  # e.g. a field of the wrong type
        raise DataError(f"{where}: {type(e).__name__}: {e}") from e
