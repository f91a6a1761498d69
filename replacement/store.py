"""The replacement checkpoint folder: one file per module, a folder-level ``config.json`` naming the model.

    <folder>/config.json                       {"model", "architecture", "fingerprint", "modules": {...}}
    <folder>/layer{L}.lorsa.safetensors        weights; metadata: kind, config, metrics, fingerprint
    <folder>/layer{L}.transcoder.safetensors

Weights are stored in bf16 by default (float32 on request) and always loaded as float32.
"""
from __future__ import annotations

import json
import math
import os
import re
import zlib
from pathlib import Path

import torch

from .checkpoint import CheckpointError, atomic_save, load, signals_held
from .io import atomic_write_text, fsync_folder
from .lorsa import Lorsa, LorsaConfig
from .transcoder import Transcoder, TranscoderConfig

KINDS = {"lorsa": (Lorsa, LorsaConfig), "transcoder": (Transcoder, TranscoderConfig)}


def module_key(kind: str, layer: int) -> str:
    """A module's name in a replacement set, ``layer{L}.{kind}``: config.json's key, metrics' key, its file's stem."""
    return f"layer{layer}.{kind}"


def module_filename(kind: str, layer: int) -> str:
    return f"{module_key(kind, layer)}.safetensors"


def save_module(module, kind: str, folder: str | Path, fingerprint: str, model_name: str, metrics: dict | None = None,
                dtype: torch.dtype = torch.bfloat16) -> Path:
    return save_modules([(module, kind, metrics)], folder, fingerprint, model_name, dtype)[0]


def refuse_replacing(folder: Path, keys, state: Path, resume: bool, overwrite: bool,
                     fingerprint: str | None = None) -> None:
    """BadInputError (one line) if ``folder`` holds a module of ``keys`` [(kind, layer)] that a run would replace:
    hours of training are not replaced unasked.  Allowed with ``overwrite``, or when the run resumes its state
    ``state`` there and every such module is older than it (then they were there when that run began; one written
    since is another run's).  With the ``fingerprint`` of the model the run trains for: also if the folder's
    config.json belongs to another model, whose modules the run's save would drop from it, whichever it replaces."""
    from .errors import BadInputError

    names = lambda ks: ", ".join(module_key(k, L) for k, L in ks)  # noqa: E731
    cfg_path = folder / "config.json"
    there = read_folder_config(cfg_path) if fingerprint is not None and cfg_path.is_file() else {}
    if there.get("fingerprint") not in (None, fingerprint) and there.get("modules") and not overwrite:
        raise BadInputError(f"{folder} holds the replacements of another model ({there.get('model')!r}: "
                            f"{len(there['modules'])} modules); saving this run's there starts the folder afresh and "
                            "they would no longer load: add --overwrite to do so, or --out another folder")
    held = [(k, L) for k, L in keys if (folder / module_filename(k, L)).is_file()]
    if not held or overwrite:
        return
    if resume and state.is_file():
        since = [(k, L) for k, L in held
                 if (folder / module_filename(k, L)).stat().st_mtime_ns > state.stat().st_mtime_ns]
        if since:
            raise BadInputError(f"{folder} holds {names(since)}, saved after the interrupted run whose state "
                                f"{state.name} this run would resume, and resuming would replace them: add --overwrite, "
                                "or --out another folder")
        return
    raise BadInputError(f"{folder} already holds trained {names(held)}, which this run would replace: add "
                        "--overwrite, or --out another folder")


STAGED = ".staged-"  # the prefix of a module file written but not yet moved into place (`save_modules`)


def save_modules(items: list[tuple[torch.nn.Module, str, dict | None]], folder: str | Path, fingerprint: str,
                 model_name: str, dtype: torch.dtype = torch.bfloat16) -> list[Path]:
    """Save (module, kind, metrics) items as one set: every file is written beside its place first, then all are
    moved in (Ctrl-C and SIGTERM held back for those renames: `checkpoint.signals_held`) and config.json names
    them.  A run stopped while writing leaves the folder's modules as they were (a joint stage refining a folder
    in place then resumes from them), never half old and half new; staged files a stopped run left are removed by
    the next save."""
    folder = Path(folder)
    for old in folder.glob(STAGED + "*"):
        old.unlink(missing_ok=True)
    staged, sums = [], []
    for module, kind, metrics in items:
        tensors = {k: (v.to(dtype) if v.is_floating_point() and k not in ("inv_freq", "rope_scaling") else v)
                   for k, v in module.state_dict().items()}
        path = folder / module_filename(kind, module.cfg.layer)
        atomic_save(tensors, path.with_name(STAGED + path.name), {
            "kind": kind, "config": json.loads(module.cfg.to_json()), "metrics": metrics or {},
            "fingerprint": fingerprint, "model": model_name})
        staged.append(path)
        sums.append(file_checksum(path.with_name(STAGED + path.name)))
    with signals_held():  # delivered once the set is in place
        # config.json first (a full disk fails it before anything moved), then the renames, which need no room: a
        # kill -9 between leaves config.json naming files still staged, which `load_replacements` says
        _update_folder_config(folder, fingerprint, model_name, [(kind, module.cfg.layer, metrics or {}, crc)
                                                                for (module, kind, metrics), crc in zip(items, sums)])
        for path in staged:
            os.replace(path.with_name(STAGED + path.name), path)
        fsync_folder(folder)  # the renames on the disk before the caller removes the training state
    return staged


def file_checksum(path: Path) -> int:
    """CRC-32 of a file's bytes: config.json records each module file's, so that bytes damaged since (which still
    read as weights) are found at load (about 20 ms for a model's 30 MB)."""
    return zlib.crc32(Path(path).read_bytes())


def _update_folder_config(folder: Path, fingerprint: str, model_name: str,
                          entries: list[tuple[str, int, dict, int]]):
    cfg_path = folder / "config.json"
    cfg = read_folder_config(cfg_path) if cfg_path.is_file() else {}
    if cfg.get("fingerprint") not in (None, fingerprint):
        cfg = {}  # a folder retrained for another model starts afresh
    cfg.update(model=model_name, fingerprint=fingerprint)
    for kind, layer, metrics, crc in entries:
        cfg.setdefault("modules", {})[module_key(kind, layer)] = {"file": module_filename(kind, layer),
                                                                   "metrics": metrics, "crc32": crc}
    # durable: the set's modules are staged durably, and a power cut must not leave an empty config.json naming none
    atomic_write_text(cfg_path, json.dumps(cfg, indent=2, sort_keys=True), durable=True)


FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def load_module(path: str | Path, fingerprint: str | None = None, device="cpu"):
    """Load one module file; with ``fingerprint`` it must have been trained on that model."""
    tensors, meta = load(path, device)
    kind = meta.get("kind")
    if kind not in KINDS:
        raise CheckpointError(f"{path} is not a Lorsa or transcoder checkpoint")
    if fingerprint is not None and meta.get("fingerprint") != fingerprint:
        raise CheckpointError(
            f"{path} was trained on model {meta.get('model')!r} (fingerprint {meta.get('fingerprint')}), "
            f"not on the model loaded now (fingerprint {fingerprint})"
        )
    cls, cfg_cls = KINDS[kind]
    try:
        with torch.device("meta"):  # no random initialisation of weights about to be replaced (a cold trace's time)
            module = cls(cfg_cls.from_dict(meta["config"]))
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError, OverflowError) as e:
        # on the meta device nothing is allocated: a RuntimeError here is a shape no tensor can have
        why = (str(e).splitlines() or [""])[0][:120]
        why = f"{type(e).__name__}: {why}" if why and not isinstance(e, (ValueError, RuntimeError)) else why or type(e).__name__
        raise CheckpointError(f"{path} has no valid module config in its metadata ({why})") from None
    for k, v in tensors.items():  # .float() would read integers, booleans or fp8 as weights of another meaning
        if v.dtype not in FLOAT_DTYPES:
            raise CheckpointError(f"{path}: tensor {k} is {str(v.dtype).removeprefix('torch.')}; a module's tensors are "
                                  "float32, bfloat16, float16 or float64")
    scale = tensors.get("rope_scaling")
    if scale is not None and not (scale.numel() == 1 and math.isfinite(float(scale)) and float(scale) > 0):
        raise CheckpointError(f"{path}: rope_scaling must be one positive number (it scales the rotary cos/sin)")
    try:  # assign: the file's tensors become the parameters (every one must be there: strict)
        module.load_state_dict({k: v.float() for k, v in tensors.items()}, assign=True)
    except RuntimeError as e:  # torch's message: a header line, then one indented line per mismatch
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        raise CheckpointError(f"{path} does not match its own config: {' '.join(lines[1:3]) or lines[0]}") from None
    return module.to(device), meta


def load_replacements(folder: str | Path, adapter, device=None, earlier_version: bool = False
                      ) -> dict[tuple[str, int], torch.nn.Module]:
    """Every module in ``folder`` for ``adapter``'s model, keyed by (kind, layer).

    ``earlier_version``: also accept modules trained on an earlier version of this model (same name and width,
    other weights, e.g. before a fine-tuning stage), as a starting point for training."""
    from .models import model_fingerprint

    folder = Path(folder)
    cfg_path = folder / "config.json"
    if folder.is_file():
        raise CheckpointError(f"{folder} is a file, not a replacements folder (the folder that holds config.json and "
                              "the modules' .safetensors files)")
    if not cfg_path.is_file():
        where = f"{folder} does not exist" if not folder.is_dir() else f"none in {folder}"
        raise CheckpointError(f"no trained replacements ({where}); train them with: circuits train --model "
                              f"{adapter.model_arg} --what all")
    cfg = read_folder_config(cfg_path)
    if not cfg.get("fingerprint") or not cfg["modules"]:
        raise CheckpointError(f"{cfg_path} names no model or no modules: not a replacements config that "
                              "`circuits train` wrote")
    fp = model_fingerprint(adapter)
    same_model = cfg.get("fingerprint") == fp or (earlier_version and cfg.get("model") == adapter.name)
    if not same_model:
        what = (f"on model {cfg.get('model')!r}, not on {adapter.name!r}" if cfg.get("model") != adapter.name
                else f"on another version of {adapter.name!r}")
        raise CheckpointError(f"the replacements in {folder} were trained {what} (fingerprint "
                              f"{str(cfg.get('fingerprint'))[:20]!r}, the model loaded now: {fp!r})")
    out = {}
    for key, entry in sorted(cfg["modules"].items()):
        path = _module_path(folder, entry)
        module, meta = load_module(path, cfg.get("fingerprint"), device or adapter.device)
        if module.cfg.d_model != adapter.d_model or module.cfg.layer >= adapter.n_layers:
            raise CheckpointError(f"{folder / entry['file']} does not fit {adapter.name}: width {module.cfg.d_model}, "
                                  f"layer {module.cfg.layer}")
        if module_key(meta['kind'], module.cfg.layer) != key:  # two entries would claim one module, the other missing
            raise CheckpointError(f"{path} holds layer{module.cfg.layer}.{meta['kind']}, but config.json lists it "
                                  f"as {key}")
        crc = entry.get("crc32")  # (sets saved before 2026-12-07 record none) bytes that read, but not as saved
        if crc is not None and (isinstance(crc, bool) or not isinstance(crc, int)):  # a check skipped without a word
            raise CheckpointError(f"{folder / 'config.json'}: the crc32 of {key} is {crc!r}, not a whole number; "
                                  "the file was edited by hand: restore it, or train the set again")
        if isinstance(crc, int) and file_checksum(path) != crc:
            waiting = path.with_name(STAGED + path.name)
            if waiting.is_file() and file_checksum(waiting) == crc:
                raise CheckpointError(f"a save into {folder} stopped before moving its new {path.name} in (it waits as "
                                      f"{waiting.name}); run the command that saved it again, or move that file to "
                                      f"{path.name}")
            raise CheckpointError(f"{path} is damaged: its bytes differ from those saved (CRC-32 "
                                  f"{file_checksum(path):08x}, config.json records {crc:08x})")
        out[(meta["kind"], module.cfg.layer)] = module.eval()
    return out


def saved_metrics(folder: str | Path) -> dict[str, dict]:
    """The metrics recorded for each module of a replacements folder ({} when it has no config.json), keyed
    ``layer<L>.<kind>``."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        return {}
    return {k: v.get("metrics", {}) if isinstance(v, dict) else {} for k, v in read_folder_config(path)["modules"].items()}


def read_folder_config(path: Path) -> dict:
    """A replacements folder's config.json; CheckpointError (one line) if it is not the expected JSON."""
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("modules", {}), dict):
        raise CheckpointError(f"{path} is not a replacements config (an object with a \"modules\" object)")
    cfg.setdefault("modules", {})
    return cfg


def _module_path(folder: Path, entry) -> Path:
    """The file a config entry names, confined to the folder: a bare ``layer{L}.{kind}.safetensors`` name."""
    name = entry.get("file") if isinstance(entry, dict) else None
    if not isinstance(name, str) or not re.fullmatch(r"layer\d+\.(lorsa|transcoder)\.safetensors", name):
        raise CheckpointError(f"{folder / 'config.json'} names a module file {name!r} outside its folder or not of "
                              "the form layer<L>.<lorsa|transcoder>.safetensors")
    return folder / name


def default_train_folder(adapter) -> Path:
    """Where training writes when no folder is given: beside a local model (so the modules found by default are
    the ones trained last), but never into a bundled preset's package folder: ./replacements/<preset> instead
    (the shipped replacements change only by `circuits train-replacements --install`)."""
    from .bundle import is_preset

    return Path("replacements") / adapter.name if is_preset(adapter.name) else default_folder(adapter)


def default_folder(adapter) -> Path:
    """Where a model's replacements live: beside a bundled or local model, else ./replacements/<name>."""
    from .bundle import is_preset, preset_folder

    if is_preset(adapter.name):
        return preset_folder(adapter.name) / "replacements"
    path = Path(getattr(adapter.config, "_name_or_path", "") or "")
    if path.is_dir():
        return path / "replacements"
    return Path("replacements") / adapter.name.replace("/", "--")
