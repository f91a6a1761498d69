"""The forked command runner (tests/forked_cli.py) against a fresh `python -c` on the same code and input: the
same exit status, stdout and stderr, including a traceback, Python's exit rules, a large output, the folder,
the environment and a file-size limit."""
from __future__ import annotations

import os
import resource
import subprocess
import sys

import pytest

from tests.conftest import ROOT
from tests.forked_cli import CliServer

ENTRY = r"""
import os, sys
what = sys.argv[1]
if what == "echo":
    print(repr(sys.argv[2:]), os.getcwd(), os.environ.get("FORKED_CLI_TEST"))
    print("to stderr", file=sys.stderr)
elif what == "raise":
    raise ValueError("boom " + sys.argv[2])
elif what == "exit":
    sys.exit(int(sys.argv[2]) if sys.argv[2].isdigit() else sys.argv[2])
elif what == "big":
    sys.stdout.write("x" * 300_000)
    sys.stderr.write("y" * 200_000)
elif what == "write":
    try:
        with open("out.bin", "wb") as f:
            f.write(b"z" * 100_000)
    except OSError as e:
        print("error:", e.strerror, file=sys.stderr)
        sys.exit(1)
"""

CASES = [["echo", "a b", "é", b"\xff\xfe"], ["raise", "now"], ["exit", "3"], ["exit", "a message"], ["exit", "0"],
         ["big"], ["write"]]


@pytest.fixture(scope="module")
def server():
    s = CliServer(entry=ENTRY)
    yield s
    s.close()


@pytest.mark.parametrize("args", CASES, ids=[c[0] + str(i) for i, c in enumerate(CASES)])
def test_forked_equals_a_fresh_process(server, args, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FORKED_CLI_TEST": "set"}
    fsize = 4096 if args[0] == "write" else None
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    fresh = subprocess.run([sys.executable, "-c", ENTRY, *args], cwd=tmp_path / "a", env=env, capture_output=True,
                           timeout=60, preexec_fn=limit if fsize else None)
    forked = server.run(args, tmp_path / "b", env, fsize=fsize, timeout=60)
    assert forked.returncode == fresh.returncode
    assert forked.stdout == fresh.stdout.replace(str(tmp_path / "a").encode(), str(tmp_path / "b").encode())
    if args[0] == "raise":  # the traceback's frames differ (the server's exec); its first and last lines do not
        assert forked.stderr.splitlines()[0] == fresh.stderr.splitlines()[0] == b"Traceback (most recent call last):"
        assert forked.stderr.splitlines()[-1] == fresh.stderr.splitlines()[-1] == b"ValueError: boom now"
    else:
        assert forked.stderr == fresh.stderr
    if args[0] == "write":  # the limit held in both
        assert (tmp_path / "a" / "out.bin").stat().st_size == (tmp_path / "b" / "out.bin").stat().st_size == 4096


def test_the_server_refuses_imports_that_print(tmp_path):
    """A warning printed while importing would reach the user on every command: the server cannot hide it."""
    (tmp_path / "sitecustomize.py").write_text("import sys; print('a warning', file=sys.stderr)\n")
    with pytest.raises(RuntimeError, match="importing the package printed: a warning"):
        CliServer(entry=ENTRY, env={"PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"})
