"""Turning library errors into one clear message and an exit code (2 for bad input)."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

import typer

from ..errors import UnisdError, UsageError


@contextlib.contextmanager
def cli_errors() -> Iterator[None]:
    from ..loop import TrainingInterrupted

    try:
        yield
    except TrainingInterrupted as exc:
        typer.echo(f"{exc}", err=True)
        raise typer.Exit(130) from None
    except UsageError as exc:
        typer.echo(f"Error: {exc}", err=True)
        raise typer.Exit(2) from None
    except UnisdError as exc:
        typer.echo(f"Error: {exc}", err=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        typer.echo("Interrupted.", err=True)
        sys.exit(130)
