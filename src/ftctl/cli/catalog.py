"""What ftctl offers: ftctl recipes and ftctl methods, one line each."""
from __future__ import annotations

from ftctl.cli.args import Command, UsageError, help_requested


def parse_none(command: str):
    """A command that takes no arguments."""
    def parse(args: list[str]) -> None:
        help_requested(args)
        if args:
            raise UsageError(f"{command}: unknown argument {args[0]!r}; {command} takes no arguments")
    return parse


def run_recipes(_, debug: bool) -> int:
    from rich.table import Table

    from ftctl.config.compose import list_recipes
    from ftctl.core.console import make_console

    table = Table(show_header=True, header_style="bold")
    table.add_column("recipe")
    table.add_column("description")
    for name, desc, _ in list_recipes():
        table.add_row(name, desc)
    make_console().print(table)
    return 0


def run_methods(_, debug: bool) -> int:
    from rich.table import Table

    from ftctl.core.console import make_console
    from ftctl.methods.spec import method_names, method_spec

    table = Table(show_header=True, header_style="bold")
    table.add_column("peft=")
    table.add_column("what it trains")
    for name in method_names():
        table.add_row(name, method_spec(name).description)
    make_console().print(table)
    return 0


RECIPES = Command(parse_none("recipes"), run_recipes)
METHODS = Command(parse_none("methods"), run_methods)
