"""Issue 21 item by item, beyond the bad-input corpus (tests/test_bad_input.py) and the writers' properties
(tests/test_properties.py): output folders that never collide, runs that never delete each other's files,
temporary files and `dot` children removed on every exit path (SIGKILL included, as far as it allows),
full disks, control characters in prompts, special-token text, and a misleading training error."""
from __future__ import annotations

import errno
import fcntl
import os
import signal
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch

from cli.outputs import RunFolder, default_out_dir
from replacement.io import remove_leftovers
from replacement.errors import BadInputError
from tests.conftest import ROOT

SETTINGS = {"attention": "lorsa", "target": None, "node_threshold": 0.8}


def _trace(*args, cwd: Path, path: str | None = None, popen: bool = False):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CIRCUITS_CACHE": str(cwd / "cache")}
    if path is not None:
        env["PATH"] = path
    cmd = [sys.executable, "-c", "from cli.trace import trace; trace()", *args]
    if popen:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


# -- item 2: default output folders -------------------------------------------------------------------------


def test_default_folders_never_collide():
    names = {default_out_dir(p, "toy", SETTINGS) for p in ("36 + 62 =", "36 - 62 =", "36 * 62 =", "+", "-", "?!", "...")}
    assert len(names) == 7
    assert default_out_dir("36 + 62 =", "toy", SETTINGS).name.startswith("36-62-")
    assert default_out_dir("?!", "toy", SETTINGS).name.startswith("graph-")
    same = default_out_dir("36 + 62 =", "toy", dict(SETTINGS))
    assert same == default_out_dir("36 + 62 =", "toy", SETTINGS)  # the same trace goes to the same folder
    assert default_out_dir("36 + 62 =", "llama", SETTINGS) != same
    assert default_out_dir("36 + 62 =", "toy", {**SETTINGS, "node_threshold": 0.9}) != same


def test_two_prompts_with_one_slug_keep_both_graphs(saved_model, tmp_path):
    for prompt in ("the cat + sat", "the cat - sat"):
        r = _trace(prompt, "--model", str(saved_model), "--format", "json", cwd=tmp_path)
        assert r.returncode == 0, r.stderr
    folders = sorted((tmp_path / "traces").iterdir())
    assert len(folders) == 2 and all(f.name.startswith("the-cat-sat-") for f in folders)
    prompts = {__import__("json").loads((f / "graph.json").read_text())["metadata"]["prompt"] for f in folders}
    assert prompts == {"the cat + sat", "the cat - sat"}


# -- item 8: runs into one folder -----------------------------------------------------------------------------


def test_an_html_run_keeps_the_svg_another_run_wrote(saved_model, tmp_path):
    """The former trace rendered graph.svg for the page, then deleted it: the svg another run had written."""
    out = tmp_path / "o"
    r = _trace("the cat sat", "--model", str(saved_model), "--out", str(out), "--format", "svg", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    svg = (out / "graph.svg").read_bytes()
    r = _trace("the dog sat", "--model", str(saved_model), "--out", str(out), "--format", "json,html", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (out / "graph.svg").read_bytes() == svg and (out / "graph.html").is_file()
    assert sorted(p.name for p in out.iterdir()) == ["graph.html", "graph.json", "graph.svg"]


def test_concurrent_runs_keep_their_files(saved_model, tmp_path):
    out = tmp_path / "o"
    procs = [_trace("the cat sat", "--model", str(saved_model), "--out", str(out), "--format", fmt, cwd=tmp_path,
                    popen=True) for fmt in ("svg", "json,html", "json,dot")]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["graph.dot", "graph.html", "graph.json", "graph.svg"]


def test_run_folders_are_private_and_cleaned(tmp_path):
    out = tmp_path / "a" / "b"
    with RunFolder(out) as one, RunFolder(out) as two:
        assert one.tmp != two.tmp and one.tmp.parent == out == two.tmp.parent
        one.path("graph.json").write_text("one")
        two.path("graph.json").write_text("two")
        two.path("graph.svg").write_text("svg of two")
        assert one.commit(["graph.json"]) == [out / "graph.json"]
    assert (out / "graph.json").read_text() == "one" and _files(out) == {"graph.json"}
    with pytest.raises(RuntimeError):
        with RunFolder(tmp_path / "new" / "deeper") as run:
            run.path("graph.json").write_text("x")
            raise RuntimeError("a failed run")
    assert not (tmp_path / "new").exists()  # the folders it created are gone with it


def test_a_commit_that_fails_midway_puts_every_file_back(tmp_path, monkeypatch):
    """Three files replace an earlier run's; the third cannot be moved in (as an undeletable file would refuse):
    the folder must hold the earlier run's files exactly, not a mix of two prompts' graphs."""
    out = tmp_path / "o"
    with RunFolder(out) as run:
        for name in ("graph.json", "graph.dot", "graph.svg"):
            run.path(name).write_text(f"old {name}")
        run.commit(["graph.json", "graph.dot", "graph.svg"])
    before = {n: (out / n).read_text() for n in _files(out)}
    real = os.replace

    def refuse_svg(src, dst):
        if Path(src).name == "graph.svg" or Path(dst).name == "graph.svg":
            raise PermissionError(1, "Operation not permitted", str(dst))
        return real(src, dst)

    with RunFolder(out) as run:
        for name in ("graph.json", "graph.dot", "graph.svg"):
            run.path(name).write_text(f"new {name}")
        monkeypatch.setattr(os, "replace", refuse_svg)
        with pytest.raises(PermissionError):
            run.commit(["graph.json", "graph.dot", "graph.svg"])
        monkeypatch.setattr(os, "replace", real)
    assert {n: (out / n).read_text() for n in _files(out)} == before
    with RunFolder(out) as run:  # a folder where a file goes is refused before anything moves
        (out / "graph.html").mkdir()
        (out / "graph.html" / "keep").write_text("a user's file")
        run.path("graph.json").write_text("newer")
        run.path("graph.html").write_text("page")
        with pytest.raises(BadInputError, match="is a folder"):
            run.commit(["graph.json", "graph.html"])
    assert (out / "graph.html" / "keep").read_text() == "a user's file" and (out / "graph.json").read_text() == "old graph.json"


def test_an_interrupt_among_the_commits_moves_leaves_one_whole_set(tmp_path, monkeypatch):
    """Ctrl-C (or SIGTERM) arriving while a run moves its files in waits until they are all in, then stops the
    command: the folder holds the new set whole (it held the new graph.json beside the old DOT and SVG, and the old
    graph.json was deleted with the private folder).  An exception among the moves, KeyboardInterrupt included
    (the rollback caught only OSError), puts every old file back."""
    out = tmp_path / "o"
    names = ["graph.json", "graph.dot", "graph.svg"]
    out.mkdir()
    for n in names:
        (out / n).write_text(f"old {n}")
    real = os.replace

    def signal_after_first(src, dst):
        real(src, dst)
        if Path(dst) == out / "graph.json":
            signal.raise_signal(signal.SIGINT)  # the user's Ctrl-C, now

    def commit_interrupted(text: str, replace) -> None:  # a run writing "<text> <name>" files, os.replace swapped
        with pytest.raises(KeyboardInterrupt):
            with RunFolder(out) as run:
                for n in names:
                    run.path(n).write_text(f"{text} {n}")
                monkeypatch.setattr(os, "replace", replace)
                run.commit(names)
        monkeypatch.setattr(os, "replace", real)

    # Python's own Ctrl-C handler, as a command has it (late in a full run of the suite the process had another)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        commit_interrupted("new", signal_after_first)
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.SIG_DFL)
    assert {n: (out / n).read_text() for n in _files(out)} == {n: f"new {n}" for n in names}

    def interrupted_at_svg(src, dst):
        if Path(dst) == out / "graph.svg" and Path(src).name == "graph.svg":  # the new file's move, not the rollback's
            raise KeyboardInterrupt
        real(src, dst)

    commit_interrupted("newer", interrupted_at_svg)
    assert {n: (out / n).read_text() for n in _files(out)} == {n: f"new {n}" for n in names}


def test_the_next_run_finishes_a_commit_a_killed_run_began(tmp_path):
    """kill -9 among a commit's moves: the dead run's private folder holds the list of its files and those not yet
    moved; the next run into the folder moves them in (the whole new set, not a mix), then removes the rest.  A
    dead run that had not begun its commit (no list) changes nothing."""
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)
    out = tmp_path / "o"
    out.mkdir()
    (out / "graph.json").write_text("new graph.json")  # moved in before the kill
    (out / "graph.dot").write_text("old graph.dot")
    (out / "graph.svg").write_text("old graph.svg")
    run = out / f".run-{dead}-abc"
    run.mkdir()
    (run / ".old-graph.json").write_text("old graph.json")
    (run / "graph.dot").write_text("new graph.dot")
    (run / "graph.svg").write_text("new graph.svg")
    (run / ".commit").write_text("graph.json\ngraph.dot\ngraph.svg\n")
    idle = out / f".run-{dead}-def"  # died while writing its files
    idle.mkdir()
    (idle / "graph.json").write_text("unfinished")
    with RunFolder(out):
        pass
    assert {n: (out / n).read_text() for n in _files(out)} == {n: f"new {n}" for n in ("graph.json", "graph.dot", "graph.svg")}


def test_commit_waits_for_the_folder_lock(tmp_path):
    out = tmp_path / "o"
    with RunFolder(out) as run:
        run.path("graph.json").write_text("new")
        fd = os.open(out, os.O_RDONLY)
        fcntl.flock(fd, fcntl.LOCK_EX)  # another run moving its files in
        t = threading.Thread(target=run.commit, args=(["graph.json"],))
        t.start()
        time.sleep(0.5)
        assert t.is_alive() and not (out / "graph.json").exists()
        os.close(fd)
        t.join(10)
        assert not t.is_alive() and (out / "graph.json").read_text() == "new"


def test_leftovers_of_dead_processes_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    (tmp_path / f".run-{pid}-abc").mkdir()
    (tmp_path / f".run-{pid}-abc" / "graph.json").write_text("x")
    (tmp_path / f".graph.png.tmp{pid}").write_text("x")
    (tmp_path / f".run-{os.getpid()}-live").mkdir()  # a live run's folder stays
    (tmp_path / "graph.json").write_text("kept")
    remove_leftovers(tmp_path)
    assert _files(tmp_path) == {f".run-{os.getpid()}-live", "graph.json"}


# -- items 9 and 4: killed runs, the dot child, full disks -----------------------------------------------------

SLOW_DOT = "#!/bin/sh\necho $$ > {pidfile}\nexec sleep 60\n"


def _slow_dot(tmp_path: Path) -> tuple[Path, Path]:
    folder, pidfile = tmp_path / "bin", tmp_path / "dot.pid"
    folder.mkdir()
    (folder / "dot").write_text(SLOW_DOT.format(pidfile=pidfile))
    (folder / "dot").chmod(0o755)
    return folder, pidfile


def _wait_for(path: Path, timeout: float = 120) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.is_file() and path.read_text().strip():
            return int(path.read_text())
        time.sleep(0.05)
    raise AssertionError(f"{path} never appeared")


def _gone(pid: int, timeout: float = 10) -> bool:
    """True once ``pid`` has exited (a zombie waiting for its new parent to reap it counts as exited)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.05)
    return False


SPAWNER = """
import subprocess, sys, time
import graphs.export as export
if sys.argv[1] == "preexec":
    export._setpriv = lambda: None  # as where setpriv is missing
argv, preexec = export._dying_with_parent(["sleep", "60"])
child = subprocess.Popen(argv, preexec_fn=preexec)
print(child.pid, argv[0], flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize("how", ["setpriv", "preexec"])
def test_a_child_dies_with_its_parent(how):
    """Both ways of starting dot (util-linux's setpriv, else a preexec_fn) give a child that the kernel kills
    when its parent is killed by SIGKILL."""
    from graphs.export import _setpriv

    if how == "setpriv" and _setpriv() is None:
        pytest.skip("no setpriv with --pdeathsig here")
    p = subprocess.Popen([sys.executable, "-c", SPAWNER, how], stdout=subprocess.PIPE, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    pid, exe = p.stdout.readline().split()
    assert Path(exe).name == ("setpriv" if how == "setpriv" else "sleep")
    assert not _gone(int(pid), timeout=0.2)
    p.kill()
    p.wait(timeout=30)
    assert _gone(int(pid)), "the child outlived its parent"


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killed_during_rendering(saved_model, tmp_path, sig):
    """SIGTERM: the run stops with one line, kills dot and removes its files.  SIGKILL runs no code in the
    process: the kernel kills dot (PR_SET_PDEATHSIG) and the next run into the folder removes what was left."""
    bin_dir, pidfile = _slow_dot(tmp_path)
    out = tmp_path / "o"
    p = _trace("the cat sat", "--model", str(saved_model), "--out", str(out), "--format", "json,svg", cwd=tmp_path,
               path=f"{bin_dir}:{os.environ['PATH']}", popen=True)
    dot_pid = _wait_for(pidfile)
    p.send_signal(sig)
    _, err = p.communicate(timeout=60)
    assert _gone(dot_pid), "dot outlived the run"
    if sig == signal.SIGTERM:
        assert p.returncode == 1 and err.strip() == "error: interrupted"
        assert not out.exists()  # it created the folder and wrote nothing into it
        return
    assert p.returncode == -signal.SIGKILL
    assert [x.name for x in out.iterdir() if x.name.startswith(".run-")]  # SIGKILL left its folder behind
    r = _trace("the cat sat", "--model", str(saved_model), "--out", str(out), "--format", "json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert _files(out) == {"graph.json"}


def test_atomic_writes_give_files_the_usual_mode(tmp_path):
    """Checkpoints are readable as other files are (safetensors alone creates them 0600), under any umask."""
    import stat

    import torch

    from replacement.checkpoint import atomic_save
    from replacement.io import atomic_write_text

    mask = os.umask(0o022)
    os.umask(mask)
    atomic_save({"w": torch.zeros(2)}, tmp_path / "m.safetensors")
    atomic_write_text(tmp_path / "c.json", "{}")
    for name in ("m.safetensors", "c.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~mask, name


def test_atomic_writes_leave_nothing_on_a_full_disk(tmp_path, monkeypatch):
    from replacement import checkpoint as ckpt
    from replacement.io import atomic_write_text

    target = tmp_path / "graph.json"
    target.write_text("before")
    real_write = Path.write_bytes

    def full_disk(self, data, *a, **k):
        real_write(self, data[:3], *a, **k)  # part of it reached the disk
        raise OSError(errno.ENOSPC, "No space left on device", str(self))

    monkeypatch.setattr(Path, "write_bytes", full_disk)  # what atomic_write_text writes with
    with pytest.raises(OSError, match="No space left"):
        atomic_write_text(target, "after")
    monkeypatch.undo()
    assert _files(tmp_path) == {"graph.json"} and target.read_text() == "before"

    import safetensors.torch

    def failing_save(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise safetensors.SafetensorError("No space left on device (os error 28)")

    monkeypatch.setattr(ckpt, "save_file", failing_save)
    with pytest.raises(ckpt.CheckpointError, match="No space left"):
        ckpt.atomic_save({"w": torch.zeros(2)}, tmp_path / "m.safetensors")
    assert _files(tmp_path) == {"graph.json"}


def test_a_full_disk_is_one_line():
    from cli.common import _message

    e = OSError(errno.ENOSPC, "No space left on device", "/data/traces/x/.graph.json.tmp12")
    assert _message(e) == "No space left on device (disk full?): nothing was written: /data/traces/x/.graph.json.tmp12"


# -- items 5 and 12: what a prompt can hold ---------------------------------------------------------------------


def test_control_characters_and_entities_in_a_prompt(saved_model, tmp_path):
    prompt = "the \x01cat &lt; \x1b[31m sat\x7f"
    out = tmp_path / "o"
    r = _trace(prompt, "--model", str(saved_model), "--out", str(out), "--format", "json,dot,svg", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    root = ET.parse(out / "graph.svg").getroot()  # well-formed XML
    texts = " ".join(t.text or "" for t in root.iter("{http://www.w3.org/2000/svg}text"))
    assert "the \\x01cat &lt; \\x1b[31m sat\\x7f" in texts  # shown as written, the entity not decoded
    r = subprocess.run([sys.executable, "-m", "cli.main", "render", str(out / "graph.json"), "--format", "svg"],
                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert r.returncode == 0, r.stderr
    ET.parse(out / "graph.svg")


def test_spelled_special_tokens_stay_text(saved_model):
    from replacement.models import encode_prompt, load_tokenizer

    tok, context = load_tokenizer(str(saved_model))
    ids = encode_prompt(tok, "<|bos|>the cat<|eos|>", context)[0].tolist()
    assert ids[0] == tok.bos_token_id and tok.bos_token_id not in ids[1:] and tok.eos_token_id not in ids
    assert tok.decode(ids[1:]) == "<|bos|>the cat<|eos|>"


# -- item 11: a resumed state whose loss is not finite --------------------------------------------------------


def test_a_bad_resumed_state_names_no_resume(tmp_path):
    from replacement import checkpoint as ckpt
    from replacement.errors import TrainingDiverged
    from replacement.models import ModelAdapter
    from replacement.train import TrainConfig, Trainer
    from tests.conftest import tiny_llama
    from tests.test_train import SMALL, _source

    adapter = ModelAdapter(tiny_llama(), name="t")
    state = tmp_path / "s.safetensors"
    cfg = TrainConfig(steps=10, **SMALL)
    Trainer(adapter, cfg, _source(), state).train(progress=False, stop_after=5)
    tensors, meta = ckpt.load(state)
    key = next(k for k in tensors if k.endswith(".scales"))
    tensors[key] = torch.tensor([1.0, 1e300], dtype=torch.float64)  # finite, but the loss overflows
    ckpt.atomic_save(tensors, state, meta)
    with pytest.raises(TrainingDiverged, match=r"at step 5; .*the state this run resumed from; --no-resume starts afresh"):
        Trainer(adapter, cfg, _source(), state).train(progress=False)
    Trainer(adapter, cfg, _source(), state).train(resume=False, progress=False)  # --no-resume trains afresh


def test_a_loss_diverging_later_does_not_blame_the_state(tmp_path):
    from replacement.errors import TrainingDiverged
    from replacement.models import ModelAdapter
    from replacement.train import TrainConfig, Trainer
    from tests.conftest import tiny_llama
    from tests.test_train import SMALL, _source

    adapter = ModelAdapter(tiny_llama(), name="t")
    with pytest.raises(TrainingDiverged) as e:
        Trainer(adapter, TrainConfig(steps=10, **SMALL, lr=1e30), _source(), tmp_path / "s.safetensors").train(
            progress=False)
    # it diverged at step 1, before the first checkpoint: the message must not point at a file that is not there
    assert not (tmp_path / "s.safetensors").exists()
    assert "no checkpoint had been saved yet" in str(e.value) and "--no-resume" not in str(e.value)


def _record_fsyncs_and_renames(monkeypatch) -> list:
    """[("fsync", path) or ("replace", destination)], in order, of every os.fsync and os.replace from now on."""
    calls = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        calls.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(a, b):
        calls.append(("replace", str(b)))
        real_replace(a, b)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return calls


def test_a_checkpoint_reaches_the_disk_before_its_rename(tmp_path, monkeypatch):
    """`checkpoint.atomic_save` (training states, modules) flushes the new file to the disk before renaming it over
    the old one, and the folder's entries after (os.fsync, recorded here in order with os.replace), so a power cut
    leaves the old file or the new one; a graph's write (`atomic_path` by default) does not wait for the disk."""
    from replacement import checkpoint as ckpt
    from replacement import io

    calls = _record_fsyncs_and_renames(monkeypatch)
    path = tmp_path / "state.safetensors"
    ckpt.atomic_save({"w": torch.ones(3)}, path, {"step": 1})
    assert calls == [("fsync", str(io.temp_path(path))), ("replace", str(path)), ("fsync", str(tmp_path))]
    assert ckpt.load(path)[0]["w"].tolist() == [1.0, 1.0, 1.0]
    calls.clear()
    with io.atomic_path(tmp_path / "graph.json") as tmp:
        tmp.write_text("{}")
    assert calls == [("replace", str(tmp_path / "graph.json"))]


def test_a_saved_set_reaches_the_disk_before_its_training_state_goes(tmp_path, monkeypatch):
    """`store.save_modules` (the end of a training run, which then removes its state): every staged module and the
    set's config.json are flushed before their renames, and the folder after the last rename, so that a power cut
    after the state is gone never leaves an empty config.json (or entries not yet on the disk) naming no set."""
    from replacement import io, store
    from replacement.transcoder import Transcoder, TranscoderConfig

    calls = _record_fsyncs_and_renames(monkeypatch)
    folder = tmp_path / "set"
    tc = Transcoder(TranscoderConfig(d_model=4, n_features=8, top_k=2, layer=0))
    store.save_modules([(tc, "transcoder", None)], folder, "fp", "m")
    cfg, module = folder / "config.json", folder / store.module_filename("transcoder", 0)
    i = calls.index(("replace", str(cfg)))
    assert calls[i - 1] == ("fsync", str(io.temp_path(cfg)))  # config.json's bytes before its rename
    j = calls.index(("replace", str(module)))
    assert i < j and calls[j + 1:] == [("fsync", str(folder))]  # the module moved in, then the folder's entries
