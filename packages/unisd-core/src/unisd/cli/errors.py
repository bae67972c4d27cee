"""Turning library errors into one clear message and an exit code (2 for bad input)."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

import typer

from ..errors import TrainingInterrupted, UnisdError, UsageError


def _say(message: str) -> None:
    # Under a multi-process launch every process meets the same bad input: one copy of the message
    # (from the first process) is enough. Unexpected errors keep their traceback on every process.
    if int(os.environ.get("RANK", "0")) == 0:
        typer.echo(message, err=True)


@contextlib.contextmanager
def cli_errors() -> Iterator[None]:
    """Run a command body: a unisd error becomes one message (``Error: ...``) and its exit code (2 for bad
    input, 1 for other failures, 130 for an interrupt), instead of a traceback."""
    try:
        yield
    except TrainingInterrupted as exc:
        _say(f"{exc}")
        raise typer.Exit(130) from None
    except UsageError as exc:
        _say(f"Error: {exc}")
        raise typer.Exit(2) from None
    except UnisdError as exc:
        _say(f"Error: {exc}")
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        typer.echo("Interrupted.", err=True)
        sys.exit(130)
