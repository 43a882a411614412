"""The command lines' error handling, written once: a known error becomes one line and exit status 2.

    from common.cli import exit_2_on

    @app.command()
    @exit_2_on(EngineError, ValueError, OSError)
    def info(...): ...

    with exit_2_on(SegqueueError):      # the same as a context manager
        store = connect(...)

Each command line names the error types that mean "a problem with the user's files, settings or
services" (EngineError, SegqueueError, ImageError, ...); any of them raised inside prints
`error: <message>` on stderr, with no traceback, and exits with status 2. Other exceptions pass
through unchanged: they are bugs, and their traceback is wanted.
"""

from __future__ import annotations

import contextlib
from typing import NoReturn

import typer


def fail(message: object) -> NoReturn:
    """Print `error: <message>` on stderr and exit with status 2."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


class exit_2_on(contextlib.ContextDecorator):  # noqa: N801 - used as a decorator, named like one
    """Decorator and context manager: the given error types become `error: <message>` and exit status 2.

    errors: the exception classes to catch (at least one). The decorated function keeps its
    signature (functools.wraps), so typer still reads its parameters.
    """

    def __init__(self, *errors: type[BaseException]) -> None:
        if not errors:
            raise TypeError("exit_2_on needs at least one error type")
        self.errors = errors

    def __enter__(self) -> "exit_2_on":
        return self

    def __exit__(self, kind, exc, tb) -> bool:
        if exc is not None and isinstance(exc, self.errors):
            fail(exc)
        return False
