"""Run the command-line entry points (`trace`, `circuits`) in a process of their own without paying the
imports each time.

A bad-input case must run in its own process: its exit status, its stdout and stderr, its working folder,
environment and file-size limit are the user's. Starting a fresh Python for each one costs 2-5 s of imports
(torch, transformers, the package) before the command does anything, which is most of a case's time. So one
server process imports all of that once and, for each request, forks: the child takes the request's
stdout/stderr pipes, folder, environment and limits and runs the same entry code a fresh `python -c` would,
with Python's exit rules (an uncaught exception prints its traceback and exits 1). The server itself runs no
torch operation, so no thread pool exists when it forks.

What this does not give a case is the import itself: a warning printed while importing would go to the
server's stderr, once. `CliServer` therefore refuses to start when the imports print anything.
"""
from __future__ import annotations

import json
import os
import selectors
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# what `python -c ENTRY trace|circuits ARGS...` runs: the console scripts' own functions
ENTRY = ("import sys; from cli.main import circuits; from cli.trace import trace; "
         "cmd = trace if sys.argv[1] == 'trace' else circuits; sys.argv = sys.argv[1:]; cmd()")

SERVER = r'''
import atexit, json, os, resource, signal, socket, sys, traceback

import torch, transformers  # the imports every command pays, done once here
from transformers import GPTNeoXForCausalLM, LlamaForCausalLM
import cli.main, cli.trace, cli.outputs
import replacement.models, replacement.assemble, replacement.store, replacement.train, replacement.evaluate
import graphs.attribution, graphs.export, graphs.html, graphs.families, graphs.patching

ENTRY = sys.argv[1]
sock = socket.socket(fileno=int(sys.argv[2]))


def read_exactly(n):
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return data


def child(req, out_fd, err_fd):
    sock.close()
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(out_fd, 1)
    os.dup2(err_fd, 2)
    for fd in (null, out_fd, err_fd):
        os.close(fd)
    os.chdir(req["cwd"])
    os.environ.clear()
    os.environ.update(req["env"])
    if req["fsize"]:
        resource.setrlimit(resource.RLIMIT_FSIZE, (req["fsize"], req["fsize"]))
    signal.alarm(req["timeout"])  # the default action of SIGALRM ends the process
    sys.argv = ["-c"] + [os.fsdecode(bytes.fromhex(a)) for a in req["argv"]]
    code = 0
    try:
        exec(compile(ENTRY, "<string>", "exec"), {"__name__": "__main__"})
    except SystemExit as e:  # Python's own rules for the exit status
        if e.code is None:
            code = 0
        elif isinstance(e.code, int):
            code = e.code
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except BaseException:
        traceback.print_exc()
        code = 1
    try:
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


sock.sendall(b"ready\n")
while True:
    try:
        header, fds, _, _ = socket.recv_fds(sock, 16, 2)
    except OSError:
        break
    if not header:
        break
    header += read_exactly(16 - len(header))
    req = json.loads(read_exactly(int(header)))
    pid = os.fork()
    if pid == 0:
        child(req, *fds)
    for fd in fds:
        os.close(fd)
    _, status = os.waitpid(pid, 0)
    sock.sendall(b"%d\n" % os.waitstatus_to_exitcode(status))
'''


class CliServer:
    """One server process; `run(args, ...)` answers as `subprocess.run([python, "-c", entry, *args], ...)`."""

    def __init__(self, entry: str = ENTRY, env: dict | None = None):
        ours, theirs = socket.socketpair()
        self.sock, self.entry = ours, entry
        full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
        self.proc = subprocess.Popen([sys.executable, "-c", SERVER, entry, str(theirs.fileno())],
                                     pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=full_env, cwd=ROOT)
        theirs.close()
        ready = self._line(timeout=300)
        if ready != b"ready":
            out, err = self.proc.communicate(timeout=30)
            raise RuntimeError(f"the CLI server did not start: {err.decode(errors='replace')[-3000:]}")
        # the imports must print nothing: a real process would print it on every command's stderr
        sel = selectors.DefaultSelector()
        for f in (self.proc.stdout, self.proc.stderr):
            os.set_blocking(f.fileno(), False)
            sel.register(f, selectors.EVENT_READ)
        printed = b"".join(os.read(key.fileobj.fileno(), 65536) for key, _ in sel.select(timeout=0.5))
        sel.close()
        if printed:
            self.close()
            raise RuntimeError(f"importing the package printed: {printed.decode(errors='replace')[:2000]}")

    def _line(self, timeout: float) -> bytes:
        self.sock.settimeout(timeout)
        data = b""
        while not data.endswith(b"\n"):
            chunk = self.sock.recv(64)
            if not chunk:
                break
            data += chunk
        return data.strip()

    def run(self, args: list, cwd: Path | str, env: dict, fsize: int | None = None,
            timeout: int = 300) -> subprocess.CompletedProcess:
        """``args`` (str or bytes) after the entry code; ``env`` is the child's whole environment."""
        req = json.dumps({"argv": [os.fsencode(a).hex() for a in args], "cwd": str(cwd), "env": env,
                          "fsize": fsize, "timeout": timeout}).encode()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        try:
            socket.send_fds(self.sock, [b"%16d" % len(req)], [out_w, err_w])
        finally:
            os.close(out_w)
            os.close(err_w)
        self.sock.sendall(req)
        out, err = _drain(out_r, err_r, deadline=time.monotonic() + timeout + 30)
        code = self._line(timeout=60)
        return subprocess.CompletedProcess(["-c", self.entry, *args], int(code), out, err)

    def close(self):
        self.sock.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        for f in (self.proc.stdout, self.proc.stderr):
            f.close()


def _drain(out_r: int, err_r: int, deadline: float) -> tuple[bytes, bytes]:
    """Read both pipes to their end (the child's exit closes them), whichever has data first."""
    chunks = {out_r: [], err_r: []}
    sel = selectors.DefaultSelector()
    for fd in chunks:
        sel.register(fd, selectors.EVENT_READ)
    open_fds = set(chunks)
    try:
        while open_fds:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("the command's output did not end in time")
            for key, _ in sel.select(timeout=left):
                data = os.read(key.fd, 65536)
                if data:
                    chunks[key.fd].append(data)
                else:
                    sel.unregister(key.fd)
                    open_fds.discard(key.fd)
    finally:
        sel.close()
        os.close(out_r)
        os.close(err_r)
    return b"".join(chunks[out_r]), b"".join(chunks[err_r])
