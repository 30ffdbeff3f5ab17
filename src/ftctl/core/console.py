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
