"""The rich consoles ftctl prints with."""
from __future__ import annotations


def make_console():
    from rich.console import Console

    # soft_wrap: long lines are not broken at 80 columns when stdout is a file or a CI log
    return Console(soft_wrap=True)


def table_console(console, columns: int):
    """``console``, or where it is not a terminal (a log file, a pipe) one as wide as a table of ``columns``
    columns needs, so the table is written whole instead of squeezed into 80 columns of ellipses."""
    if console.is_terminal:
        return console
    from rich.console import Console

    return Console(file=console.file, width=max(console.width, 40 + 13 * columns), soft_wrap=True)


# control characters (C0, DEL, C1) other than newline and tab: a file or a model could move the cursor,
# clear the screen, retitle the window or write a hyperlink with them; shown escaped instead, as \x1b
_UNPRINTABLE = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7f, 0xa0)) if chr(c) not in "\n\t"}


def printable(text) -> str:
    """``text`` (anything: str() of it) safe to write to a terminal: control characters other than newline
    and tab, escape sequences' ESC included, appear escaped (``\\x1b``) instead of acting."""
    return str(text).translate(_UNPRINTABLE)


def markup_safe(text) -> str:
    """``printable(text)`` with rich markup escaped: for text read from files or written by a model that goes
    into a string rich reads markup from (a table cell, a console.print with markup)."""
    from rich.markup import escape

    return escape(printable(text))
