"""Atomic safetensors checkpoints (never pickle) and optimiser-state round trips.

Every file is written to a temporary name in the same folder and renamed, so a crash or ``kill -9``
never leaves a half-written checkpoint behind.
"""
from __future__ import annotations

import json
import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from .errors import CheckpointError, CircuitsError
from .io import atomic_path

__all__ = ["CheckpointError", "atomic_save", "check_finite", "check_same_settings", "load", "load_training_state",
           "optimizer_tensors", "restore_optimizer", "restoring"]


TEXT_KEYS = ("fingerprint", "model", "kind")  # metadata that is text; files before 2026-12-07 hold it unquoted


def atomic_save(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict | None = None) -> None:
    """Write ``tensors`` atomically, with ``metadata``'s values as JSON (text quoted: a fingerprint such as
    6942162248e30930 written bare read back as the number inf, and that model's replacements never loaded)."""
    meta = {k: json.dumps(v) for k, v in (metadata or {}).items()}
    try:
        with atomic_path(path, durable=True) as tmp:  # training states and modules: on the disk before the rename
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=meta)
    except SafetensorError as e:  # how safetensors reports a failed write (e.g. no space left)
        raise CheckpointError(f"cannot write {path}: {e}") from None


def load(path: str | Path, device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and metadata of a safetensors file; one clear `CheckpointError` if it is unreadable."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw_meta = f.metadata() or {}
        tensors = load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"corrupt or truncated checkpoint {path}: {e}") from None
    meta = {}
    for k, v in raw_meta.items():
        if k in TEXT_KEYS and not v.startswith('"'):  # text written bare, before it was quoted
            meta[k] = v
            continue
        try:
            meta[k] = json.loads(v)
        except json.JSONDecodeError:
            meta[k] = v
    return tensors, meta


def optimizer_tensors(opt: torch.optim.Optimizer, names: dict[torch.nn.Parameter, str]) -> dict[str, torch.Tensor]:
    """Adam/AdamW state as flat named tensors (``opt.<param>.<key>``)."""
    out = {}
    for p, st in opt.state.items():
        for key, val in st.items():
            out[f"opt.{names[p]}.{key}"] = val if torch.is_tensor(val) else torch.tensor(val)
    return out


@contextmanager
def restoring(path: str | Path, what: str = "training state"):
    """Around the reading of a saved state: a key, tensor or value it lacks or holds in another form (a file cut
    short or edited) is one `CheckpointError` line, and the file is kept."""
    try:
        yield
    except (KeyError, ValueError, TypeError, IndexError) as e:
        if isinstance(e, CircuitsError):  # already one line (BadInputError is a ValueError)
            raise
        raise CheckpointError(f"{path} is not a complete {what} ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}); start afresh with --no-resume "
                              "(the file is kept)") from None


def restore_optimizer(opt: torch.optim.Optimizer, named_params: dict[str, torch.nn.Parameter], tensors: dict) -> None:
    """Adam's state of each parameter from ``tensors``; a ValueError (`restoring` makes it one line) for moments
    of another shape or of no float type, which Adam's first step met as a RuntimeError traceback."""
    for name, p in named_params.items():
        prefix = f"opt.{name}."
        st = {k[len(prefix):]: v.to(p.device) for k, v in tensors.items() if k.startswith(prefix)}
        for key, v in st.items():
            if key != "step" and (v.shape != p.shape or not v.is_floating_point()):
                raise ValueError(f"optimizer state {name}.{key} is {str(v.dtype).removeprefix('torch.')} "
                                 f"{list(v.shape)}, its parameter {list(p.shape)}")
        if st:
            if "step" in st:
                st["step"] = st["step"].float().cpu()
            opt.state[p] = st


def load_training_state(path: str | Path, model_name: str, device="cpu", what: str = "training state",
                        inputs: dict | None = None):
    """(tensors, metadata) of a resumable state saved for ``model_name``; None when there is none yet.  A state of
    another model, or one holding NaN or infinite values, is a `CheckpointError`.  With the run's ``inputs``
    (`run_inputs`), a model of another name whose weights the state records (a renamed or copied folder) is the
    same model."""
    path = Path(path)
    if not path.is_file():
        return None
    tensors, meta = load(path, device)
    if not isinstance(meta.get("inputs") or {}, dict):  # an edited file: was an AttributeError traceback
        raise CheckpointError(f"{path} is not a complete {what} (its inputs record is a "
                              f"{type(meta['inputs']).__name__}, not an object); start afresh with --no-resume "
                              "(the file is kept)")
    weights = "the model's weights"
    same_weights = inputs is not None and (meta.get("inputs") or {}).get(weights) == inputs.get(weights)
    if meta.get("model") != model_name and not same_weights:
        raise CheckpointError(f"{path} is a {what} for {meta.get('model')!r}, not {model_name!r}")
    check_finite(path, tensors)
    return tensors, meta


def check_finite(path: str | Path, tensors: dict[str, torch.Tensor]) -> None:
    """A training state holding NaN or infinite values is corrupt: a `CheckpointError`, not a resumed run that
    diverges at once."""
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(f"{path} holds NaN or infinite values ({bad[0]}): corrupt; start afresh with --no-resume")


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM) during training; its message says where the last saved state is."""


class StopRequest:
    """What a training loop checks after each step: ``requested`` is set by the first Ctrl-C, SIGTERM or SIGHUP,
    so that the loop saves the step it has just finished and stops (nothing trained is lost); a second signal
    stops at once, from the last saved state.  Outside the main thread (no signal handlers) every signal stops
    at once."""

    SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP")

    def __init__(self):
        self.requested = False
        self._previous: dict = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                sig = getattr(signal, name)
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nstopping: saving the state after this step (interrupt again to stop at once, from the last state "
              "saved)", file=sys.stderr, flush=True)


@contextmanager
def signals_held():
    """Ctrl-C, SIGTERM and SIGHUP wait until the block ends, then act as they would have (for a few renames that
    must happen together).  Python runs signal handlers in the main thread whichever thread the signal reaches,
    so the handlers are swapped, not the threads' signal masks; outside the main thread nothing is held."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: got.append(signum))
                for sig in (getattr(signal, n) for n in StopRequest.SIGNALS)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        if got:
            signal.raise_signal(got[0])  # now, to the handler it would have met


@contextmanager
def reporting_interrupts(trainer):
    """Around a training loop: yields a `StopRequest` the loop checks after each step (saving that step's state
    and raising KeyboardInterrupt when it is set), and turns Ctrl-C (or SIGTERM) into an `Interrupted` saying
    which step's state is saved and how to go on.  ``trainer``: its ``state_file``, ``saved_step`` (None before
    the first save) and ``cfg`` (``steps``, ``checkpoint_every``), read when the interrupt comes."""
    try:
        with StopRequest() as stop:
            yield stop
    except KeyboardInterrupt:
        cfg = trainer.cfg
        if trainer.saved_step:
            raise Interrupted(f"the state of step {trainer.saved_step} of {cfg.steps} is saved in {trainer.state_file}; "
                              "run the same command again to resume from it") from None
        raise Interrupted(f"no state saved yet (the first is saved at step {cfg.checkpoint_every}); the next run "
                          "starts afresh") from None


def fingerprint(tensors) -> str:
    """16 hex digits of SHA-256 over the bytes of ``tensors`` (an iterable), in order."""
    import hashlib

    h = hashlib.sha256()
    for t in tensors:
        t = t.detach()
        h.update(str((t.dtype, tuple(t.shape))).encode())
        h.update(t.contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def run_inputs(adapter, source, start: dict[str, torch.Tensor] | None = None) -> dict[str, str]:
    """What a training run is made from beyond its settings, as fingerprints: the model's weights, the stream of
    training batches (a function of the step: its first two batches stand for it) and, where given, the modules it
    starts from.  A state saved from other inputs must not resume (`check_same_inputs`)."""
    from .models import model_fingerprint

    out = {"the model's weights": model_fingerprint(adapter),
           "the training text": fingerprint([source.batch(0, 2), source.batch(1, 2)])}
    if start is not None:
        out["the starting modules"] = fingerprint(start[k] for k in sorted(start))
    return out


def resume(trainer, defaults, what: str = "training state") -> bool:
    """Restore a trainer (`train.Trainer`, `joint.JointTrainer`: its ``state_file``, ``adapter``, ``cfg``,
    ``inputs``, ``_restore`` and ``step``) from its saved state, refused in one line unless the state was saved
    under the same settings (``defaults``: the config class's defaults, for states saved before a setting
    existed) and from the same inputs; False where there is no state."""
    from dataclasses import asdict

    state = load_training_state(trainer.state_file, trainer.adapter.name, trainer.adapter.device, what,
                                inputs=trainer.inputs)
    if state is None:
        return False
    tensors, meta = state
    with restoring(trainer.state_file, what):
        check_same_settings(trainer.state_file, meta.get("config"), asdict(trainer.cfg), asdict(defaults))
        check_same_inputs(trainer.state_file, meta.get("inputs"), trainer.inputs)
        trainer._restore(tensors, meta)
    trainer.saved_step = trainer.step
    return True


def check_same_inputs(path: str | Path, saved: dict | None, now: dict) -> None:
    """A `CheckpointError` naming what differs when a state was saved from another model, text or start (states
    saved before these were recorded are not checked)."""
    if not saved:
        return
    changed = [k for k in now if k in saved and saved[k] != now[k]]
    if changed:
        raise CheckpointError(f"{path} was saved from other inputs ({', '.join(changed)}: another --model, --text or "
                              "--init-from); give the same to resume, or start again with --no-resume")


def check_same_settings(path: str | Path, saved: dict | None, now: dict, defaults: dict,
                        may_change: tuple[str, ...] = ("checkpoint_every",)) -> None:
    """A training state resumes exactly only under the settings it was saved with (batches are a function of the
    step, and the loss of the settings): any other is a `CheckpointError` naming each change, not a silent mix.
    ``saved``/``now``/``defaults``: the configs as dicts; a setting the state predates counts as its default."""
    if saved is None:
        return
    saved = defaults | saved
    changed = [k for k in now if k not in may_change and saved.get(k) != now[k]]
    if changed:
        what = ", ".join(f"{k} {saved.get(k)!r} -> {now[k]!r}" for k in changed)
        raise CheckpointError(f"{path} was saved with other settings ({what}); give the same options to resume, "
                              "or start again with --no-resume")
