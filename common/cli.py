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
import re
from typing import NoReturn

import typer
import typer.core


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

    def __enter__(self) -> exit_2_on:
        return self

    def __exit__(self, kind, exc, tb) -> None:
        if exc is not None and isinstance(exc, self.errors):
            fail(exc)


# --- help text -----------------------------------------------------------------------------------

_CODE_SPAN = re.compile(r"(`[^`]*`)")


def _escape_markdown_html(text: str | None) -> str | None:
    """`<word>` outside code spans escaped (`\\<word>`), so that markdown help shows it instead of eating it as HTML."""
    if not text:
        return text
    parts = _CODE_SPAN.split(text)
    return "".join(part if part.startswith("`") else part.replace("<", "\\<") for part in parts)


_TYPE_METAVARS = {"int": "INTEGER", "integer": "INTEGER", "float": "FLOAT", "str": "TEXT", "text": "TEXT",
                  "path": "PATH"}


def _is_argument(param: object) -> bool:
    return getattr(param, "param_type_name", "") == "argument"


def _metavar(param) -> str | None:
    """How an option's value is shown in help: nothing for a flag, else its type (INTEGER, FLOAT, PATH, TEXT);
    None (typer's own) for a choice. typer >= 0.2x vendors click and describes types with `type_descriptor`."""
    if getattr(param, "is_flag", False) or getattr(param, "count", False):
        return ""
    descriptor = getattr(param, "type_descriptor", None)
    if descriptor is not None:
        if descriptor.is_choice:
            return None
        name = "path" if descriptor.is_path else param.bare_type()
    else:
        if type(param.type).__name__ == "Choice":
            return None
        name = param.type.name.split()[0]  # "integer range" -> integer
    return _TYPE_METAVARS.get(name.lower(), name.upper())


def _tidy_params(params: list, markdown: bool) -> None:
    """Plain metavars (typer's `<bool>`, `<int range>`, `<list[Path]>` go), help texts escaped for markdown."""
    for param in params:
        if markdown and getattr(param, "help", None):  # options, and typer's arguments, carry help
            param.help = _escape_markdown_html(param.help)
        if _is_argument(param):
            param.metavar = param.metavar or param.name.upper() + ("..." if param.nargs != 1 else "")
            param.display_type_rich = lambda ctx: None  # the name column already says it; no type column
        elif param.metavar is None:
            param.metavar = _metavar(param)


def _usage_pieces(command, ctx) -> list[str]:
    """`[OPTIONS] PATHS...`: arguments by name, `...` when repeated, in brackets when optional."""
    pieces = [command.options_metavar] if command.options_metavar else []
    for param in command.get_params(ctx):
        if _is_argument(param):
            name = param.name.upper() + ("..." if param.nargs != 1 else "")
            pieces.append(name if param.required else f"[{name}]")
    return pieces


class _NoHelpMetavar:
    """--help shows no value type (typer's `--help <bool>`)."""

    def get_help_option(self, ctx):
        option = super().get_help_option(ctx)  # type: ignore[misc]
        if option is not None:
            option.metavar = ""
        return option


class HelpCommand(_NoHelpMetavar, typer.core.TyperCommand):
    """A typer command whose --help reads cleanly: `--burst` not `--burst <bool>`, `--n INTEGER`, usage
    `[OPTIONS] PATHS...`, and `<index>` in a help text shown as written under markdown rendering."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        markdown = self.rich_markup_mode == "markdown"
        if markdown:
            self.help = _escape_markdown_html(self.help)
        _tidy_params(self.params, markdown)

    def collect_usage_pieces(self, ctx) -> list[str]:
        return _usage_pieces(self, ctx)


class HelpGroup(_NoHelpMetavar, typer.core.TyperGroup):
    """A typer group (`producer`, `worker`, `engines`) with the same clean --help as HelpCommand."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        _tidy_params(self.params, self.rich_markup_mode == "markdown")


class Typer(typer.Typer):
    """typer.Typer whose commands and groups default to HelpCommand and HelpGroup (see there)."""

    def __init__(self, **kwargs) -> None:
        kwargs.setdefault("cls", HelpGroup)
        super().__init__(**kwargs)

    def command(self, *args, **kwargs):  # noqa: D102 - typer.Typer.command, with a default cls
        kwargs.setdefault("cls", HelpCommand)
        return super().command(*args, **kwargs)
