"""What every command shares: one-line errors instead of tracebacks, and the model options."""
from __future__ import annotations

import sys

import click

from replacement.checkpoint import CheckpointError
from replacement.errors import CircuitsError

USER_ERRORS = (CircuitsError, CheckpointError, FileNotFoundError, PermissionError, IsADirectoryError)


def fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(1)


class FriendlyCommand(click.Command):
    """A click command that reports user errors as one line and exits 1."""

    def invoke(self, ctx):
        return run_friendly(super().invoke, ctx)


class FriendlyGroup(click.Group):
    """A click group whose commands report user errors as one line and exit 1."""

    def invoke(self, ctx):
        return run_friendly(super().invoke, ctx)


def run_friendly(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except USER_ERRORS as e:
        fail(str(e) if not isinstance(e, OSError) or not e.filename else f"{e.strerror}: {e.filename}")
    except KeyboardInterrupt:
        fail("interrupted")


def model_options(f):
    f = click.option("--dtype", type=click.Choice(["float32", "bfloat16"]), default="float32", show_default=True,
                     help="Precision of the model weights.")(f)
    f = click.option("--device", default="cpu", show_default=True, help="cpu or cuda.")(f)
    f = click.option("--model", "model_name", default="llama", show_default=True,
                     help="A bundled preset (toy, pythia, llama), a local HF folder, or an HF id.")(f)
    return f
