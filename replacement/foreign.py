"""Replacement folders from elsewhere, detected from their files and loaded as our modules.

    ours             config.json with "modules", layer{L}.{lorsa|transcoder}.safetensors   (replacement/store.py)
    circuit-tracer   config.yaml (model_kind: transcoder_set) and/or layer_{L}.safetensors: per-layer transcoders,
                     ReLU or JumpReLU (activation_function.threshold), with or without W_skip; top_k in
                     config.yaml makes them TopK (circuit-tracer itself writes none: every feature that passes);
                     its CLTs (model_kind: cross_layer_transcoder, or W_enc_{L}/W_dec_{L}.safetensors): one
                     transcoder per layer whose features also write into every later MLP output
    Llamascopium     config.json (no "modules") + sae_weights.safetensors, in the folder or in one subfolder per
                     layer: Lorsa (W_Q ...) or transcoders (W_E ...); the layer comes from hook_point_in

A spec is a folder, or an HF repo id (``owner/name[/subfolder]``) already in the local HF cache.  Several specs
mix: each later folder replaces the modules (kind, layer) it holds, e.g. Lorsa from ours, transcoders from
circuit-tracer (a CLT's layers cannot mix with other transcoders: each MLP output is the sum of its decoders).
Anything corrupt, partial or not fitting the model is a `ForeignFormatError` (one line).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from .errors import ForeignFormatError
from .hooks import hook_name

# circuit-tracer hook names a transcoder may read (the MLP's input after its norm, or the residual stream before
# it) and write ("what the MLP adds to the residual"); what each read is called here (replacement/hooks.py)
CT_INPUT_HOOKS = {"mlp.hook_in": "mlp.in", "ln2.hook_normalized": "mlp.normalized", "hook_resid_mid": "resid_mid"}
CT_OUTPUT_HOOKS = ("mlp.hook_out", "hook_mlp_out")


def replacement_specs(values) -> str | list[str] | None:
    """A ``--replacements`` option given 0, 1 or more times: None, the one folder, or the list (later wins)."""
    values = [v for v in (values or ()) if v]
    return None if not values else values[0] if len(values) == 1 else values


def resolve_spec(spec: str | Path) -> Path:
    """A folder as given, or the snapshot folder of a cached HF repo id ``owner/name[/subfolder][@revision]``
    (circuit-tracer's ``hf://`` prefix allowed; a string only: a ``Path``, such as a model's own folder, is a
    folder even where it does not exist yet)."""
    path = Path(spec).expanduser()
    text = str(spec)
    if isinstance(spec, Path) or path.exists():
        return path
    hub = text.startswith("hf://")
    text = text.removeprefix("hf://")
    if not hub and (text.startswith((".", "/", "~")) or text.count("/") < 1):
        return path
    from huggingface_hub import snapshot_download

    text, _, revision = text.partition("@")
    owner, name, *sub = text.split("/")
    repo = f"{owner}/{name}" + (f"@{revision}" if revision else "")
    try:
        root = Path(snapshot_download(f"{owner}/{name}", revision=revision or None, local_files_only=True))
    except Exception:  # noqa: BLE001 - LocalEntryNotFoundError, a malformed id, an unreadable cache
        raise ForeignFormatError(f"no folder {spec} and no HF repo {repo} in the local HF cache (download it first, "
                                 f"e.g. huggingface-cli download {owner}/{name}"
                                 + (f" --revision {revision}" if revision else "") + ")") from None
    return root.joinpath(*sub)


def detect_format(folder: Path) -> str:
    """'ours', 'circuit-tracer', 'circuit-tracer-clt' or 'llamascope' (anything unrecognised: 'ours', whose loader
    then reports what is missing)."""
    if (folder / "config.yaml").is_file():
        kind = _read_yaml(folder / "config.yaml").get("model_kind", "transcoder_set")
        if kind not in ("transcoder_set", "cross_layer_transcoder"):
            raise ForeignFormatError(f"{folder / 'config.yaml'}: unknown model_kind {kind!r}")
        return "circuit-tracer" if kind == "transcoder_set" else "circuit-tracer-clt"
    if any(folder.glob("layer_*.safetensors")):
        return "circuit-tracer"
    if any(folder.glob("W_enc_*.safetensors")):  # what circuit-tracer's CrossLayerTranscoder.to_safetensors writes
        return "circuit-tracer-clt"
    if _llamascope_parts(folder):
        return "llamascope"
    return "ours"


def load_specs(specs, adapter, device=None, folders: dict | None = None) -> dict[tuple[str, int], torch.nn.Module]:
    """Every module of one spec or a list of them (later ones replace earlier ones' (kind, layer)); no spec: the
    model's default folder (replacement/store.py).  ``folders``, if given, is filled with the folder each
    returned module came from ({(kind, layer): Path})."""
    from .store import default_folder

    out, origin, clt, where = {}, {}, set(), []
    for i, spec in enumerate(spec_list(specs, default_folder(adapter))):
        folder = resolve_spec(spec)
        modules = load_folder(folder, adapter, device)
        out.update(modules)
        origin.update({key: i for key in modules})
        where.append(folder)
        if detect_format(folder) == "circuit-tracer-clt":
            clt.add(i)
    if folders is not None:
        folders.update({key: where[origin[key]] for key in out})
    from_ = {origin[k] for k in out if k[0] == "transcoder"}
    if clt & from_ and len(from_) > 1:
        raise ForeignFormatError("a cross-layer transcoder folder cannot be mixed with other transcoders (every MLP "
                                 "output is the sum of the CLT's decoders into it); give Lorsa folders beside it only")
    return out


def spec_list(specs, default: Path) -> list:
    """One spec, a list of them, or None (then ``default``, the model's own folder) as a list."""
    return [default] if specs is None else [specs] if isinstance(specs, (str, Path)) else list(specs)


def load_folder(folder: Path, adapter, device=None) -> dict[tuple[str, int], torch.nn.Module]:
    fmt = detect_format(folder)
    device = device or adapter.device
    if fmt == "ours":
        from .store import load_replacements

        return load_replacements(folder, adapter, device)
    loaders = {"circuit-tracer": load_circuit_tracer, "circuit-tracer-clt": load_circuit_tracer_clt,
               "llamascope": load_llamascope}
    modules = loaders[fmt](folder, adapter)
    for (kind, L), m in modules.items():
        _check_fits(m, kind, L, adapter, folder)
        m.requires_grad_(False)
    return {k: m.to(device).eval() for k, m in modules.items()}


# -- circuit-tracer ----------------------------------------------------------------------------------------


def circuit_tracer_config(folder: Path, default_in: str = "mlp.hook_in") -> tuple[dict, str, int]:
    """A circuit-tracer folder's config.yaml (``{}`` without one), the point its transcoders read (checked;
    ``default_in`` where it names none) and its top_k (0: none)."""
    conf = _read_yaml(folder / "config.yaml") if (folder / "config.yaml").is_file() else {}
    return conf, _check_ct_hooks(conf, folder, default_in), _config_top_k(conf.get("top_k"), folder / "config.yaml")


def load_circuit_tracer(folder: Path, adapter) -> dict[tuple[str, int], torch.nn.Module]:
    """Per-layer transcoders ``layer_{L}.safetensors`` (or those config.yaml lists by local path)."""
    from .transcoder import Transcoder

    conf, reads, k = circuit_tracer_config(folder)
    files = _ct_layer_files(folder, conf)
    if not files:
        raise ForeignFormatError(f"{folder} has a circuit-tracer config.yaml but no layer_<L>.safetensors files")
    out = {("transcoder", L): Transcoder.from_circuit_tracer_file(_existing(p, L), L, k) for L, p in files.items()}
    return reading(out, reads, folder)


def reading(modules: dict, reads: str, folder: Path) -> dict:
    """``modules`` with their encoders reading ``reads`` (a point of replacement/hooks.py)."""
    for (_, L), tc in modules.items():
        if reads != "mlp.in" and tc.W_skip is not None:
            raise ForeignFormatError(f"{folder}: the layer-{L} transcoder reads {reads} and has a skip connection; "
                                     "only transcoders reading the MLP's input (mlp.hook_in) may have one")
        tc.cfg.reads = reads
    return modules


def load_circuit_tracer_clt(folder: Path, adapter) -> dict[tuple[str, int], torch.nn.Module]:
    """A cross-layer transcoder: ``W_enc_{L}`` / ``W_dec_{L}.safetensors`` (replacement/transcoder.py's
    `clt_from_circuit_tracer`), with the hooks and top_k of its config.yaml (circuit-tracer's default input hook
    for a CLT without one is hook_resid_mid)."""
    from .transcoder import clt_from_circuit_tracer

    _, reads, k = circuit_tracer_config(folder, default_in="hook_resid_mid")
    layers = clt_from_circuit_tracer(folder, k)
    if len(layers) != adapter.n_layers:
        raise ForeignFormatError(f"{folder} is a CLT of {len(layers)} layers; {adapter.name} has {adapter.n_layers} "
                                 "layers")
    return reading({("transcoder", L): tc for L, tc in layers.items()}, reads, folder)


def _config_top_k(raw, config: Path) -> int:
    """A config file's top_k: absent or null is 0 (no top-K); anything but a whole number >= 0 is one line."""
    if raw is None:
        return 0
    if isinstance(raw, bool) or not isinstance(raw, int) or raw < 0:
        raise ForeignFormatError(f"{config}: top_k must be a whole number >= 0, not {raw!r}")
    return raw


def _existing(path: Path, L: int) -> Path:
    if not path.is_file():
        raise ForeignFormatError(f"the layer-{L} transcoder file {path} does not exist")
    return path


def _ct_layer_files(folder: Path, conf: dict) -> dict[int, Path]:
    listed = conf.get("transcoders")
    if listed is None:
        found = {int(m.group(1)): p for p in folder.glob("layer_*.safetensors")
                 if (m := re.fullmatch(r"layer_(\d+)\.safetensors", p.name))}
        return dict(sorted(found.items()))
    if not isinstance(listed, list) or not all(isinstance(p, str) for p in listed):
        raise ForeignFormatError(f"{folder / 'config.yaml'}: transcoders must be a list of paths")
    remote = [p for p in listed if p.startswith("hf://")]
    if remote:
        raise ForeignFormatError(f"{folder / 'config.yaml'} lists hub files ({remote[0]}); download them and list "
                                 "local paths, or use the repo's own folder")
    return {L: (folder / p if not Path(p).is_absolute() else Path(p)) for L, p in enumerate(listed)}


def _check_ct_hooks(conf: dict, folder: Path, default_in: str = "mlp.hook_in") -> str:
    """The point (replacement/hooks.py) the transcoders of a circuit-tracer config read; one line if they do not
    replace an MLP."""
    hin, hout = conf.get("feature_input_hook", default_in), conf.get("feature_output_hook", CT_OUTPUT_HOOKS[0])
    names = isinstance(hin, str) and isinstance(hout, str)  # a list or a mapping there is no hook name
    if not names or hin not in CT_INPUT_HOOKS or hout not in CT_OUTPUT_HOOKS:
        raise ForeignFormatError(f"{folder}: transcoders reading {hin!r} and writing {hout!r}; only those that read the "
                                 f"MLP's normalised input or the residual stream before it ({', '.join(CT_INPUT_HOOKS)}) "
                                 f"and predict its output ({' or '.join(CT_OUTPUT_HOOKS)}) replace an MLP")
    return CT_INPUT_HOOKS[hin]


# -- Llamascopium ----------------------------------------------------------------------------------------


def _llamascope_parts(folder: Path) -> list[Path]:
    """The folder itself, or its subfolders, that hold config.json + sae_weights.safetensors."""
    def is_part(p: Path) -> bool:
        return (p / "sae_weights.safetensors").is_file() and (p / "config.json").is_file()

    if not folder.is_dir():
        return []
    return [folder] if is_part(folder) else sorted(p for p in folder.iterdir() if p.is_dir() and is_part(p))


def load_llamascope(folder: Path, adapter) -> dict[tuple[str, int], torch.nn.Module]:
    from .checkpoint import load
    from .lorsa import from_llamascope
    from .transcoder import Transcoder

    out = {}
    for part in _llamascope_parts(folder):
        conf = _read_json(part / "config.json")
        L = _llamascope_layer(conf, part)
        if conf.get("norm_activation", "none") not in ("none", None):
            raise ForeignFormatError(f"{part}: norm_activation {conf['norm_activation']!r} is not supported (only 'none')")
        keys = set(load(part / "sae_weights.safetensors")[0])
        if "W_Q" in keys:
            _check_llamascope_hooks(conf, part, "lorsa")
            out[("lorsa", L)] = _checked(lambda: from_llamascope(part, L, adapter), part)
        elif "W_E" in keys:
            _check_llamascope_hooks(conf, part, "transcoder")
            k = _config_top_k(conf.get("top_k"), part / "config.json")
            out[("transcoder", L)] = _checked(lambda: Transcoder.from_llamascope(
                part / "sae_weights.safetensors", top_k=k, layer=L), part)
        else:
            raise ForeignFormatError(f"{part}/sae_weights.safetensors is neither a Lorsa (W_Q) nor a transcoder (W_E)")
    return out


# what a module replacing a layer's attention or MLP may read and write (TransformerLens hook names, the end of
# ``hook_point_in`` / ``hook_point_out``): a residual-stream SAE or an attention-output transcoder replaces neither
LLAMASCOPE_HOOKS = {"lorsa": (("ln1.hook_normalized", "hook_attn_in", "hook_resid_pre"), ("hook_attn_out", "attn.hook_out")),
                    "transcoder": (("ln2.hook_normalized", "hook_mlp_in", "mlp.hook_in", "hook_resid_mid"),
                                   ("hook_mlp_out", "mlp.hook_out"))}


def _check_llamascope_hooks(conf: dict, part: Path, kind: str) -> None:
    """ForeignFormatError (one line) if a Llamascopium config's hook points are not a layer's attention (Lorsa) or
    MLP (transcoder) input and output; a hook point the config leaves out is not checked."""
    ins, outs = LLAMASCOPE_HOOKS[kind]
    hin, hout = str(conf.get("hook_point_in", "")), conf.get("hook_point_out")
    if not hin.endswith(ins) or (hout is not None and not str(hout).endswith(outs)):
        what = "an attention layer" if kind == "lorsa" else "an MLP"
        raise ForeignFormatError(f"{part / 'config.json'}: hook points {hin!r} -> {hout!r} do not replace {what} "
                                 f"(a {kind} here reads one of {', '.join(ins)} and writes {' or '.join(outs)})")


def _llamascope_layer(conf: dict, part: Path) -> int:
    m = re.search(r"blocks\.(\d+)\.", str(conf.get("hook_point_in", "")))
    if not m:
        raise ForeignFormatError(f"{part / 'config.json'}: no layer in hook_point_in {conf.get('hook_point_in')!r}")
    return int(m.group(1))


def _checked(make, part: Path):
    """Run a loader, turning a missing tensor or a shape clash into one line."""
    try:
        return make()
    except (KeyError, RuntimeError, ValueError, TypeError) as e:
        if isinstance(e, ForeignFormatError):
            raise
        raise ForeignFormatError(f"{part} is not a complete Llamascopium checkpoint ({type(e).__name__}: "
                                 f"{str(e).splitlines()[0] if str(e) else ''})") from None


# -- shared checks ---------------------------------------------------------------------------------------


def _check_fits(module, kind: str, L: int, adapter, folder: Path) -> None:
    if module.cfg.d_model != adapter.d_model:
        raise ForeignFormatError(f"{folder}: the layer-{L} {kind} has width {module.cfg.d_model}; {adapter.name} has "
                                 f"d_model {adapter.d_model}")
    if not 0 <= L < adapter.n_layers:
        raise ForeignFormatError(f"{folder} has a {kind} for layer {L}; {adapter.name} has {adapter.n_layers} layers")
    if getattr(module.cfg, "reads", "mlp.in") == "resid_mid" and adapter.parallel_residual:
        raise ForeignFormatError(f"{folder}: transcoders reading hook_resid_mid need a sequential block; "
                                 f"{adapter.name}'s attention and MLP read the same residual (no resid_mid)")
    bad = [n for n, p in module.named_parameters() if not bool(torch.isfinite(p).all())]
    if bad:
        raise ForeignFormatError(f"{folder}: the layer-{L} {kind}'s {bad[0]} holds NaN or infinite values")


def _read_yaml(path: Path) -> dict:
    import yaml

    try:
        conf = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ForeignFormatError(f"{path} is not valid YAML ({type(e).__name__})") from None
    if not isinstance(conf, dict):
        raise ForeignFormatError(f"{path} is not a circuit-tracer config (a mapping of keys)")
    return conf


def _read_json(path: Path) -> dict:
    try:
        conf = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ForeignFormatError(f"{path} is not valid JSON ({type(e).__name__})") from None
    if not isinstance(conf, dict):
        raise ForeignFormatError(f"{path} is not a config object")
    return conf


def specs_metrics(specs, default: Path) -> dict | None:
    """The training metrics our folders among ``specs`` (default: ``default``) record, by module name
    (`store.saved_metrics`); {} when only foreign folders hold replacements; None when no folder holds any."""
    from .store import saved_metrics

    found = None
    for spec in spec_list(specs, default):
        folder = resolve_spec(spec)
        if detect_format(folder) != "ours":
            found = found if found is not None else {}
        elif (folder / "config.json").is_file():
            found = {**(found or {}), **{k: v for k, v in saved_metrics(folder).items() if v}}
    return found


def feature_bound(model, ids: torch.Tensor) -> list[int]:
    """Per layer, the most transcoder features active at one position of the prompt ids [1, n]: a transcoder's
    top_k, or, without one (every feature that passes), the count measured in one forward pass."""
    tcs = model.transcoders
    if all(tcs[L].cfg.top_k for L in sorted(tcs)):
        return [tcs[L].cfg.top_k for L in sorted(tcs)]
    with torch.no_grad():
        from .assemble import input_point, transcoder_input

        cache = model.adapter.run(ids, capture=[hook_name(L, input_point(tcs[L])) for L in tcs]).cache
        return [tcs[L].cfg.top_k or int((tcs[L].encode(transcoder_input(model.adapter, tcs[L], L, cache)[0]).values > 0)
                                        .sum(-1).max()) for L in sorted(tcs)]
