"""Hostile values through every option of every command: which end in anything but success or one line.

    python benchmarks/fuzz_options.py [COMMAND ...]   (default: every command below; about 15 minutes on 2 cores)

For each command a good base invocation on a tiny saved model with random replacements (tests/conftest.py's),
then, option by option, the base with that option set to each hostile value of its type: 0, -1, 10^12, 2.5 and
"" for integers; nan, inf, 1e308, 1e-320 and "" for floats; "", a blank, an RTL mark, 5,000 characters, a binary
file, a folder or a missing path for text; "", /dev/null, /, a file where a folder goes, an uncreatable path for
paths.  Each run is in-process (`cmd.main(..., standalone_mode=True)`), stopped after 60 s (a value that asks for
endless work, such as --steps 10^12, is legitimate: a progress bar shows it).  Printed: every case that ended
with a traceback, several lines on stderr, or a warning next to success ("BAD"), or ran past 60 s ("SLOW"); and
the counts.  tests/test_bad_input.py keeps each fault found as a regression case.
"""
from __future__ import annotations

import contextlib
import io
import os
import signal
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

INTS = ["0", "-1", "1000000000000", "2.5", ""]
FLOATS = ["0", "-1", "nan", "inf", "-inf", "1e308", "", "1e-320"]


class Slow(Exception):
    pass


def _alarm(*_):
    raise Slow()


def world() -> dict[str, Path]:
    """A tiny Llama with a tokenizer and random replacements, a text file, a binary file."""
    import torch

    from replacement.lm.tokenizer import train_tokenizer
    from replacement.models import load_model, model_fingerprint
    from replacement.store import save_module
    from tests.conftest import random_replacements, tiny_llama

    w = Path(tempfile.mkdtemp(prefix="fuzz-options-"))
    tok = train_tokenizer(["the cat sat on the mat. 1 + 2 = 3\n" * 50], vocab_size=2400, number_copies=2)
    tiny_llama(vocab_size=len(tok), bos_token_id=tok.bos_token_id).save_pretrained(w / "model")
    tok.save_pretrained(w / "model")
    adapter = load_model(str(w / "model"))
    rm, fp = random_replacements(adapter), model_fingerprint(adapter)
    for kind, mods in (("lorsa", rm.lorsas), ("transcoder", rm.transcoders)):
        for m in mods.values():
            save_module(m, kind, w / "model" / "replacements", fp, adapter.name, dtype=torch.float32)
    (w / "text.txt").write_text("the cat sat on the mat and the dog sat on the log.\n" * 200)
    (w / "bin.dat").write_bytes(os.urandom(5000))
    return {"W": w, "M": w / "model", "TEXT": w / "text.txt", "BIN": w / "bin.dat"}


def hostile(param, w: dict) -> list[str]:
    name = getattr(param.type, "name", "")
    if name.startswith("integer"):
        return INTS
    if name.startswith("float"):
        return FLOATS
    if name == "choice":
        return ["", "bogus"]
    if name in ("path", "directory", "file"):
        return ["", " ", "/nonexistent/x", "/dev/null", "/", str(w["TEXT"]), str(w["BIN"]), str(w["W"]), "/proc/nope/x"]
    return ["", " ", "\u202e", "x" * 5000, ",", "a,b", "-1", "0", str(w["BIN"]), str(w["W"]), "/nonexistent/x"]


def run(cmd, args: list[str]) -> tuple[str, str]:
    """("ok" | "BAD" | "SLOW", what stderr ended with)."""
    err = io.StringIO()
    signal.alarm(60)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            cmd.main(args, prog_name="x", standalone_mode=True)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
    except Slow:
        return "SLOW", ""
    except BaseException as e:  # noqa: BLE001 - a traceback is what this hunts
        return "BAD", f"{type(e).__name__}: {str(e)[:200]}"
    finally:
        signal.alarm(0)
    lines = [ln for ln in err.getvalue().splitlines() if ln.strip() and "\r" not in ln and "%|" not in ln]
    if code == 0:
        return ("BAD" if any("warn" in ln.lower() for ln in lines) else "ok"), (lines[-1] if lines else "")
    return ("ok" if len(lines) == 1 and lines[0].startswith("error: ") else "BAD"), " / ".join(lines)[-300:]


COMMANDS = ("trace", "render", "query", "models", "patch", "heads", "correspond", "eval", "train", "train-joint")


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("commands", nargs="*", metavar="COMMAND", help=f"some of {', '.join(COMMANDS)} (default: all)")
    names = ap.parse_args().commands or list(COMMANDS)
    unknown = [n for n in names if n not in COMMANDS]
    if unknown:
        ap.error(f"unknown command(s) {', '.join(unknown)}; choose from {', '.join(COMMANDS)}")
    from cli.main import circuits
    from cli.trace import trace

    w, here = world(), os.getcwd()
    try:
        sweep(names, w, trace, circuits)
    finally:  # the scratch model, text and outputs go with the run
        os.chdir(here)
        shutil.rmtree(w["W"], ignore_errors=True)


def sweep(names: list[str], w: dict, trace, circuits) -> None:
    """Every hostile value of every option of the ``names`` commands, in the scratch world ``w``."""
    os.environ["CIRCUITS_CACHE"] = str(w["W"] / "cache")
    os.chdir(w["W"])
    signal.signal(signal.SIGALRM, _alarm)
    out = lambda: str(Path(tempfile.mkdtemp(dir=w["W"])) / "o")  # noqa: E731
    M, TEXT = str(w["M"]), str(w["TEXT"])
    graph = w["W"] / "g"
    run(trace, ["the cat sat", "--model", M, "--out", str(graph)])
    small = ["--steps", "2", "--batch-size", "2", "--seq-len", "16", "--text", TEXT]
    bases = {
        "trace": lambda: (trace, ["the cat sat", "--model", M, "--out", out()]),
        "render": lambda: (circuits, ["render", str(graph / "graph.json")]),
        "query": lambda: (circuits, ["query", str(graph / "graph.json")]),
        "models": lambda: (circuits, ["models"]),
        "patch": lambda: (circuits, ["patch", "1 + 2 =", "--model", M, "--component", "mlp_err.0@1"]),
        "heads": lambda: (circuits, ["heads", "--model", M, "--layer", "0", "--text", TEXT, "--n-seqs", "2",
                                     "--cache-dir", out()]),
        "correspond": lambda: (circuits, ["correspond", "--model", M, "--layer", "0", "--n-seqs", "2", "--seq-len",
                                          "16", "--out", out()]),
        "eval": lambda: (circuits, ["eval", "--model", M, "--text", TEXT, "--no-samples"]),
        "train": lambda: (circuits, ["train", "--model", M, *small, "--out", out(), "--tc-expansion", "2",
                                     "--lorsa-heads-per-group", "2", "--lorsa-top-k", "2", "--tc-top-k", "2"]),
        "train-joint": lambda: (circuits, ["train", "--joint", "--model", M, "--init-from", str(w["M"] / "replacements"),
                                           *small, "--out", out()]),
    }
    counts: dict[str, int] = {}
    assert set(bases) == set(COMMANDS)
    for name in names:
        cmd, base = bases[name]()
        params = trace.params if name == "trace" else circuits.commands[name.removesuffix("-joint")].params
        for param in params:
            if not param.opts[0].startswith("--") or getattr(param, "is_flag", False):
                continue
            for value in hostile(param, w):
                cmd, args = bases[name]()
                if param.opts[0] in args:
                    args[args.index(param.opts[0]) + 1] = value
                else:
                    args += [param.opts[0], value]
                verdict, said = run(cmd, args)
                counts[verdict] = counts.get(verdict, 0) + 1
                if verdict != "ok":
                    print(verdict, name, param.opts[0], repr(value)[:40], "::", said, flush=True)
    print("cases:", ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))


if __name__ == "__main__":
    main()
