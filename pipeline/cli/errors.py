"""How a command reports a failure a person can act on: one red line on stderr, then an exit code
(2: bad input or settings, 1: the work itself failed), never a traceback."""

from collections.abc import Iterator
from contextlib import contextmanager

import typer
from rich.console import Console

console = Console(stderr=True)


def fail(error: object, code: int = 2) -> typer.Exit:
    """Print `error` and return the Exit to raise: `raise fail(error) from None`."""
    console.print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


@contextmanager
def reported(*errors: type[Exception]) -> Iterator[None]:
    """Within this block, the `errors` a person can act on end the command through `fail`."""
    try:
        yield
    except errors as error:
        raise fail(error) from None
