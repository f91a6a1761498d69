"""What every command shares: one-line errors instead of tracebacks, and the model options."""
from __future__ import annotations

import contextlib
import itertools
import sys
import threading
import time

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


@contextlib.contextmanager
def spinner(message: str):
    """On a terminal, show that ``message`` is under way: a spinner and the seconds elapsed (on stderr)."""
    stream = click.get_text_stream("stderr")
    if not stream.isatty():
        yield
        return
    done, t0 = threading.Event(), time.time()

    def spin():
        for frame in itertools.cycle("|/-\\"):
            stream.write(f"\r{frame} {message} {time.time() - t0:.1f}s")
            stream.flush()
            if done.wait(0.1):
                break
        stream.write(f"\r{message} {time.time() - t0:.1f}s\n")
        stream.flush()

    thread = threading.Thread(target=spin, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
