"""What every command shares: one-line errors instead of tracebacks, and the model options."""
from __future__ import annotations

import contextlib
import errno
import io
import itertools
import math
import os
import re
import signal
import sys
import threading
import time

import click

from replacement.errors import BadInputError, CircuitsError

USER_ERRORS = (CircuitsError, OSError)
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_NO_ARGS_IS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())  # click >= 8.2


class FiniteRange(click.FloatRange):
    """A float range that also refuses nan and inf (click's FloatRange lets nan through every bound)."""

    def convert(self, value, param, ctx):
        rv = super().convert(value, param, ctx)
        if not math.isfinite(rv):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return rv


def refuse_file(flag: str, path: str | None) -> None:
    """A folder option naming an existing file: one line, before any work is done."""
    from pathlib import Path

    if path is not None and Path(path).exists() and not Path(path).is_dir():
        raise BadInputError(f"{flag} {path} is a file, not a folder")


def printable(text: str) -> str:
    """``text`` with every character a terminal could act on (control characters, escape sequences, line
    breaks, lone surrogates) shown as a Python escape such as ``\\x1b``: safe to print, always one line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


def fail(message: str) -> None:
    click.echo(f"error: {printable(message)}", err=True)
    sys.exit(1)


class FriendlyCommand(click.Command):
    """A click command that reports user errors (usage errors included) as one line and exits 1."""

    def main(self, *args, **kwargs):
        return one_line_usage_errors(super().main, *args, **kwargs)

    def invoke(self, ctx):
        return run_friendly(_checked_invoke, super().invoke, ctx)


class FriendlyGroup(click.Group):
    """A click group whose commands report user errors as one line and exit 1."""

    command_class = FriendlyCommand

    def main(self, *args, **kwargs):
        return one_line_usage_errors(super().main, *args, **kwargs)

    def invoke(self, ctx):
        return run_friendly(super().invoke, ctx)


def one_line_usage_errors(main, *args, standalone_mode: bool = True, **kwargs):
    """Click's ``main``, with a usage error (unknown option, bad value, missing argument) printed as one line
    instead of click's usage block."""
    if not standalone_mode:
        return main(*args, standalone_mode=False, **kwargs)
    try:
        rv = main(*args, standalone_mode=False, **kwargs)
    except _NO_ARGS_IS_HELP as e:  # a bare group or command: its help, as click shows it
        e.show()
        sys.exit(e.exit_code)
    except click.NoSuchOption as e:  # "-5 + 3 =" reads as an option: a prompt that starts with "-" goes after "--"
        given = next((a for a in sys.argv[1:] if a.startswith(e.option_name)), e.option_name)
        prompt = re.match(r"-[\d.]", given) is not None or " " in given
        fail(f"{e.format_message()} (see --help" + (f"; a prompt that starts with - goes after --: ... -- {given!r})"
                                                    if prompt else ")"))
    except click.ClickException as e:
        fail(f"{e.format_message()} (see --help)")
    except click.Abort:
        fail("interrupted")
    sys.exit(rv if isinstance(rv, int) else 0)


class _UntilReaderGone(io.RawIOBase):
    """Standard output's file descriptor, written until whoever reads it stops (`trace ... | head`), then discarded:
    the command goes on to write its files, where a broken pipe would have ended it before them."""

    def __init__(self, fd: int):
        super().__init__()
        self.fd, self.gone = fd, False

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self.fd

    def isatty(self) -> bool:
        return os.isatty(self.fd)

    def write(self, b) -> int:
        if not self.gone:
            try:
                return os.write(self.fd, b)
            except BrokenPipeError:
                self.gone = True
        return len(b)


@contextlib.contextmanager
def _stdout_until_reader_gone():
    """The process's standard output (not a test's captured one) as `_UntilReaderGone`; yields it, or None."""
    old = sys.stdout
    try:
        fd = old.fileno() if old is sys.__stdout__ and old is not None else None
    except (OSError, ValueError):
        fd = None
    if fd is None:
        yield None
        return
    old.flush()
    raw = _UntilReaderGone(fd)
    sys.stdout = io.TextIOWrapper(io.BufferedWriter(raw), encoding=old.encoding, errors=old.errors,
                                  line_buffering=old.line_buffering)
    try:
        yield raw
    finally:
        try:
            sys.stdout.flush()
        finally:
            sys.stdout = old


def run_friendly(fn, *args, **kwargs):
    """Run ``fn``, turning user errors, full disks, Ctrl-C and SIGTERM/SIGHUP into one line on stderr and exit 1.
    A reader that stops reading the output (`| head`) leaves the command to finish its work (files included)
    quietly, and the exit status 1.

    SIGTERM and SIGHUP raise KeyboardInterrupt, so every ``finally`` and ``except`` on the way out runs
    (temporary files are removed, child processes killed) as it does for Ctrl-C."""
    main_thread = threading.current_thread() is threading.main_thread()  # only it may set signal handlers
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)} if main_thread else {}
    try:
        with _stdout_until_reader_gone() as out:
            result = fn(*args, **kwargs)
            sys.stdout.flush()
        if out is not None and out.gone:
            sys.exit(1)
        return result
    except BrokenPipeError:  # whoever read our output stopped (`| head`): end quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so that exiting flushes nowhere
        sys.exit(1)
    except USER_ERRORS as e:
        fail(_message(e))
    except RecursionError:
        fail("input nested too deeply")
    except (MemoryError, RuntimeError) as e:
        if not out_of_memory(e):
            raise
        fail("out of memory: " + _allocation(e) + "; use smaller sizes (--batch-size, --seq-len, the modules' widths, "
             "a shorter prompt) or a machine with more memory")
    except KeyboardInterrupt as e:  # a training's says where its last saved state is
        fail("interrupted" + (f"; {e}" if str(e) else ""))
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def out_of_memory(e: BaseException) -> bool:
    """Whether ``e`` is an allocation that failed (Python's MemoryError, torch's CPU allocator or CUDA OOM)."""
    return isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError" or (
        isinstance(e, RuntimeError) and ("can't allocate memory" in str(e) or "out of memory" in str(e)))


def _allocation(e: BaseException) -> str:
    """What could not be allocated, as torch says it ("you tried to allocate N bytes"), in one short phrase."""
    m = re.search(r"tried to allocate (\d+) bytes", str(e)) or re.search(r"Tried to allocate ([\d.]+ [KMGT]iB)", str(e))
    if m is None:
        return "an allocation failed"
    size = m.group(1)
    return f"an allocation of {int(size) / 2**30:.1f} GB failed" if size.isdigit() else f"an allocation of {size} failed"


def _message(e: BaseException) -> str:
    if not isinstance(e, OSError):
        return str(e)
    what = e.strerror or str(e)
    if e.errno in _DISK_FULL:
        what = f"{what} (disk full?): nothing was written"
    return f"{what}: {e.filename}" if e.filename else what


def _checked_invoke(invoke, ctx):
    check_text_params(ctx)
    return invoke(ctx)


def check_text_params(ctx: click.Context) -> None:
    """Refuse an argument that is not valid UTF-8 (Python holds the bad bytes as lone surrogates); paths are
    left alone, since file names may be any bytes."""
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if isinstance(param.type, click.Path):
            continue
        for v in value if isinstance(value, (tuple, list)) else [value]:
            if isinstance(v, str) and any("\ud800" <= c <= "\udfff" for c in v):
                name = param.human_readable_name if isinstance(param, click.Argument) else param.opts[0]
                raise BadInputError(f"{name} is not valid UTF-8 text")


REPLACEMENTS_HELP = ("Replacements folder (default: beside the model): ours, circuit-tracer transcoders, Llamascopium, or a "
                     "cached HF repo id; repeat to mix (a later folder replaces the modules it holds).")


def given(ctx: click.Context, name: str) -> bool:
    """Whether option ``name`` (its parameter name) was given on the command line, not left at its default."""
    return ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE


def not_empty(ctx, param, value):
    """A click callback: an option given as "" (or blanks) is refused, not read as its default."""
    values = value if isinstance(value, tuple) else (value,)
    if any(isinstance(v, str) and not v.strip() for v in values):
        raise click.BadParameter("is empty", param_hint=f"'{param.opts[0]}'")
    return value


def model_options(f):
    f = click.option("--dtype", type=click.Choice(["float32", "bfloat16"]), default="float32", show_default=True,
                     help="Precision of the model weights.")(f)
    f = click.option("--device", default="cpu", show_default=True, callback=not_empty, help="cpu, cuda or cuda:N.")(f)
    f = click.option("--model", "model_name", default="llama", show_default=True, callback=not_empty,
                     help="A bundled preset (toy, pythia, llama), a local HF folder, or an HF id.")(f)
    return f


@contextlib.contextmanager
def spinner(message: str):
    """On a terminal, show that ``message`` is under way: a spinner and the seconds elapsed (on stderr)."""
    stream = sys.stderr  # (click.get_text_stream is deprecated)
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
