"""Replacement folders from elsewhere, detected from their files and loaded as our modules; every other tool's
file layout is read here (and circuit-tracer's written: `write_circuit_tracer`), so lorsa.py and transcoder.py hold
the maths alone.

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
from .lorsa import Lorsa, LorsaConfig, inv_freq_of
from .transcoder import Transcoder, TranscoderConfig

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
    conf, reads, k = circuit_tracer_config(folder)
    files = _ct_layer_files(folder, conf)
    if not files:
        raise ForeignFormatError(f"{folder} has a circuit-tracer config.yaml but no layer_<L>.safetensors files")
    out = {("transcoder", L): transcoder_from_circuit_tracer_file(_existing(p, L), L, k) for L, p in files.items()}
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
    """A cross-layer transcoder: ``W_enc_{L}`` / ``W_dec_{L}.safetensors`` (`clt_from_circuit_tracer`), with the
    hooks and top_k of its config.yaml (circuit-tracer's default input hook for a CLT without one is
    hook_resid_mid)."""
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


def write_circuit_tracer(tc: Transcoder, folder: str | Path, layer: int) -> Path:
    """Write transcoder ``tc`` as circuit-tracer's ``layer_{i}.safetensors`` and the set's ``config.yaml`` (its
    input hook from ``tc.cfg.reads``, the output hook ``mlp.hook_out``, and ``top_k``).  A folder whose config.yaml
    says otherwise (another input, another K: circuit-tracer reads one config for every layer) is refused in one
    line.

    circuit-tracer has no top-K: it keeps every feature its ReLU (JumpReLU) passes, so it runs a top-K
    transcoder as a wider code than ours (a warning says so); this tool's reader applies the ``top_k`` line."""
    import warnings

    from .checkpoint import atomic_save
    from .io import atomic_write_text

    folder = Path(folder)
    if tc.W_skip is not None and tc.cfg.reads != "mlp.in":  # what circuit-tracer (and our reader) refuse
        raise ForeignFormatError(f"a transcoder reading {tc.cfg.reads} with a skip connection has no "
                                 "circuit-tracer form (a skip reads the MLP's input, mlp.hook_in)")
    hook_in = next(h for h, reads in CT_INPUT_HOOKS.items() if reads == tc.cfg.reads)
    settings = {"model_kind": "transcoder_set", "feature_input_hook": hook_in, "feature_output_hook": CT_OUTPUT_HOOKS[0]}
    if tc.cfg.top_k:
        settings["top_k"] = tc.cfg.top_k
    cfg_path = folder / "config.yaml"
    if cfg_path.is_file():
        there = _read_yaml(cfg_path)
        same = lambda k: there.get(k) == settings.get(k) or (  # noqa: E731  the MLP's output, by either name
            k == "feature_output_hook" and there.get(k) in CT_OUTPUT_HOOKS)
        clash = [k for k in sorted(set(settings) | {"top_k"}) if not same(k)]
        if clash:
            k = clash[0]
            raise ForeignFormatError(f"{cfg_path} has {k} {there.get(k, 'none')!r} where this transcoder needs "
                                     f"{settings.get(k, 'none')!r}: circuit-tracer reads one config for every "
                                     "layer, so write it into another folder")
    if tc.cfg.top_k:
        warnings.warn(f"circuit-tracer has no top-K: it keeps every feature its activation passes, so it runs "
                      f"this K = {tc.cfg.top_k} transcoder as a wider code (this tool's reader applies the "
                      "top_k line of config.yaml)", stacklevel=2)
    folder.mkdir(parents=True, exist_ok=True)
    t = {"W_enc": tc.W_enc, "b_enc": tc.b_enc, "W_dec": tc.W_dec, "b_dec": tc.b_dec}
    if tc.W_skip is not None:
        t["W_skip"] = tc.W_skip.t()  # circuit-tracer: skip = x @ W_skip.T
    if tc.threshold is not None:
        t["activation_function.threshold"] = tc.threshold
    path = folder / f"layer_{layer}.safetensors"
    atomic_save(t, path)
    if not cfg_path.is_file():
        atomic_write_text(cfg_path, "".join(f"{k}: {v}\n" for k, v in settings.items()))
    return path


def transcoder_from_circuit_tracer(folder: str | Path, layer: int, top_k: int | None = None) -> Transcoder:
    """circuit-tracer's ``layer_{layer}.safetensors`` in ``folder``, reading the input its ``config.yaml`` names;
    ``top_k`` (else ``top_k`` in its ``config.yaml``, else none): see `transcoder_from_circuit_tracer_file`."""
    folder = Path(folder)
    _, reads, k = circuit_tracer_config(folder)
    tc = transcoder_from_circuit_tracer_file(folder / f"layer_{layer}.safetensors", layer,
                                             k if top_k is None else top_k)
    return reading({("transcoder", layer): tc}, reads, folder)[("transcoder", layer)]


def transcoder_from_circuit_tracer_file(path: str | Path, layer: int, top_k: int = 0) -> Transcoder:
    """One circuit-tracer per-layer file: ReLU, or JumpReLU where it holds ``activation_function.threshold``;
    with a skip where it holds ``W_skip`` (applied as x @ W_skip.T).  ``top_k`` > 0 keeps only the k
    strongest features; 0 keeps every feature that passes its activation (circuit-tracer's rule)."""
    from .checkpoint import load

    t, _ = load(path)
    N, d = _check_circuit_tracer_tensors(t, Path(path))
    W_skip, theta = t.get("W_skip"), t.get("activation_function.threshold")
    tc = Transcoder(TranscoderConfig(d_model=d, n_features=N, top_k=top_k, skip=W_skip is not None, layer=layer,
                                     jumprelu=theta is not None))
    tc.assign_weights(t["W_enc"], t["b_enc"], t["W_dec"], t["b_dec"], None if W_skip is None else W_skip.t())
    if theta is not None:
        with torch.no_grad():
            tc.threshold.copy_(theta.float().reshape(-1).expand(N))  # [N], [1, N] or one value
    return tc


def clt_from_circuit_tracer(folder: str | Path, top_k: int = 0) -> dict[int, Transcoder]:
    """circuit-tracer's cross-layer transcoder folder (what its ``CrossLayerTranscoder.to_safetensors`` writes),
    as one `Transcoder` per layer L (``n_later`` = n_layers - 1 - L):

        W_enc_{L}.safetensors   W_enc_{L} [N, d], b_enc_{L} [N], b_dec_{L} [d] (the bias of layer L's MLP
                                output), threshold_{L} [N] (JumpReLU; absent: ReLU)
        W_dec_{L}.safetensors   W_dec_{L} [N, n_layers - L, d]: slice j is the decoder into layer L + j

    Layers are 0 .. n_layers - 1 with no gap.  Anything missing, misshapen or not finite: ForeignFormatError."""
    from .checkpoint import load

    folder = Path(folder)
    layers = sorted(int(m.group(1)) for p in folder.glob("W_enc_*.safetensors")
                    if (m := re.fullmatch(r"W_enc_(\d+)\.safetensors", p.name)))
    if not layers:
        raise ForeignFormatError(f"{folder} holds no W_enc_<L>.safetensors files of a circuit-tracer CLT")
    n = len(layers)
    if layers != list(range(n)):
        raise ForeignFormatError(f"{folder}: the CLT's W_enc_<L>.safetensors files must be layers 0..{n - 1} with "
                                 f"no gap; found {layers}")
    out, jump = {}, None
    for L in range(n):
        enc, _ = load(folder / f"W_enc_{L}.safetensors")
        dec_path = folder / f"W_dec_{L}.safetensors"
        if not dec_path.is_file():
            raise ForeignFormatError(f"{folder} is a partial CLT: W_enc_{L}.safetensors has no W_dec_{L}.safetensors")
        dec, _ = load(dec_path)
        t = _clt_layer_tensors(enc, dec, L, n, folder)
        N, d = t["W_enc"].shape
        if jump is None:
            jump, width = "threshold" in t, (N, d)
        if ("threshold" in t) != jump or (N, d) != width:
            raise ForeignFormatError(f"{folder}: the CLT's layer {L} differs from layer 0 (features, width or "
                                     "activation); every layer must share them")
        tc = Transcoder(TranscoderConfig(d_model=d, n_features=N, top_k=top_k, layer=L, jumprelu=jump,
                                         n_later=n - 1 - L))
        W_dec = t["W_dec"]  # [N, n - L, d]
        tc.assign_weights(t["W_enc"], t["b_enc"], W_dec[:, 0], t["b_dec"])
        with torch.no_grad():
            if tc.W_dec_later is not None:
                tc.W_dec_later.copy_(W_dec[:, 1:])
            if jump:
                tc.threshold.copy_(t["threshold"].float().reshape(-1).expand(N))
        out[L] = tc
    return out


def _clt_layer_tensors(enc: dict, dec: dict, L: int, n: int, folder: Path) -> dict:
    """One CLT layer's tensors under our names (W_enc, b_enc, b_dec, W_dec, threshold), checked."""
    names = {"W_enc": (enc, f"W_enc_{L}"), "b_enc": (enc, f"b_enc_{L}"), "b_dec": (enc, f"b_dec_{L}"),
             "W_dec": (dec, f"W_dec_{L}"), "threshold": (enc, f"threshold_{L}")}
    missing = [key for name, (src, key) in names.items() if key not in src and name != "threshold"]
    if missing:
        raise ForeignFormatError(f"{folder} is not a complete circuit-tracer CLT: layer {L} lacks {', '.join(missing)}")
    t = {name: src[key] for name, (src, key) in names.items() if key in src}
    N, d = t["W_enc"].shape if t["W_enc"].dim() == 2 else (-1, -1)
    want = {"W_enc": (N, d), "b_enc": (N,), "b_dec": (d,), "W_dec": (N, n - L, d)}
    for name, shape in want.items():
        if tuple(t[name].shape) != shape:
            raise ForeignFormatError(f"{folder}: the CLT's {names[name][1]} has shape {tuple(t[name].shape)}, expected "
                                     f"{shape} (a CLT of {n} layers)")
    theta = t.get("threshold")
    if theta is not None and (theta.numel() not in (1, N) or bool((theta.float() < 0).any())):
        raise ForeignFormatError(f"{folder}: threshold_{L} must be {N} values >= 0 (or one)")
    bad = [names[k][1] for k, v in t.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ForeignFormatError(f"{folder}: the CLT's {bad[0]} holds NaN or infinite values")
    return t


def _check_circuit_tracer_tensors(t: dict, path: Path) -> tuple[int, int]:
    """(n_features, d_model) of a circuit-tracer per-layer file; ForeignFormatError (one line) if a tensor is
    missing, misshapen, not finite, or a threshold is negative (JumpReLU features would then write negative
    activations, which no graph node can carry)."""
    missing = [k for k in ("W_enc", "W_dec", "b_enc", "b_dec") if k not in t]
    if missing or "log_thresholds" in t:
        what = f"lacks {', '.join(missing)}" if missing else "holds log_thresholds (not a circuit-tracer layout)"
        raise ForeignFormatError(f"{path} is not a circuit-tracer transcoder file: it {what}")
    N, d = t["W_enc"].shape if t["W_enc"].dim() == 2 else (-1, -1)
    want = {"W_enc": (N, d), "W_dec": (N, d), "b_enc": (N,), "b_dec": (d,), "W_skip": (d, d)}
    for k, shape in want.items():
        if k in t and tuple(t[k].shape) != shape:
            raise ForeignFormatError(f"{path}: {k} has shape {tuple(t[k].shape)}, expected {shape}")
    theta = t.get("activation_function.threshold")
    if theta is not None and (theta.numel() not in (1, N) or bool((theta.float() < 0).any())):
        raise ForeignFormatError(f"{path}: activation_function.threshold must be {N} values >= 0 (or one)")
    bad = [k for k, v in t.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ForeignFormatError(f"{path}: {bad[0]} holds NaN or infinite values")
    return N, d


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

    out = {}
    for part in _llamascope_parts(folder):
        conf = _read_json(part / "config.json")
        L = _llamascope_layer(conf, part)
        if conf.get("norm_activation", "none") not in ("none", None):
            raise ForeignFormatError(f"{part}: norm_activation {conf['norm_activation']!r} is not supported (only 'none')")
        keys = set(load(part / "sae_weights.safetensors")[0])
        if "W_Q" in keys:
            _check_llamascope_hooks(conf, part, "lorsa")
            out[("lorsa", L)] = _checked(lambda: lorsa_from_llamascope(part, L, adapter), part)
        elif "W_E" in keys:
            _check_llamascope_hooks(conf, part, "transcoder")
            k = _config_top_k(conf.get("top_k"), part / "config.json")
            out[("transcoder", L)] = _checked(lambda: transcoder_from_llamascope(
                part / "sae_weights.safetensors", top_k=k, layer=L), part)
        else:
            raise ForeignFormatError(f"{part}/sae_weights.safetensors is neither a Lorsa (W_Q) nor a transcoder (W_E)")
    return out


def transcoder_from_llamascope(path: str | Path, top_k: int, layer: int = 0) -> Transcoder:
    """A Llamascopium transcoder file's layout: ``W_E [d, d_tc]``, ``b_E``, ``W_D [d_tc, d]``, ``b_D``."""
    from .checkpoint import load

    t, _ = load(path)
    tc = Transcoder(TranscoderConfig(d_model=t["W_E"].shape[0], n_features=t["W_E"].shape[1], top_k=top_k, layer=layer))
    tc.assign_weights(t["W_E"].t(), t["b_E"], t["W_D"], t["b_D"])
    return tc


def lorsa_from_llamascope(folder, layer: int = 0, adapter=None) -> Lorsa:
    """Load an OpenMOSS Llamascopium Lorsa (``config.json`` + ``sae_weights.safetensors``).  Its rotary map is
    the config's ``rotary_dim`` and ``rotary_base``; one the config leaves out is the model's (``adapter``: a
    Lorsa uses its model's rotary map), else none (no ``rotary_dim``) and 10,000."""
    from .checkpoint import load

    folder = Path(folder)
    conf = json.loads((folder / "config.json").read_text())
    t, _ = load(folder / "sae_weights.safetensors")
    if "ln_q.w" in t or "ln_k.w" in t:
        raise ForeignFormatError("Llamascopium Lorsa with q/k layer norms (ln_q/ln_k) is not supported yet")
    n_qk, d, d_qk = t["W_Q"].shape
    H = t["W_V"].shape[0]
    rd, base = conf.get("rotary_dim"), conf.get("rotary_base")
    model_map = adapter is not None and base is None and rd in (None, adapter.rotary_dim) and adapter.rotary_dim > 0
    if adapter is not None and rd is None:
        rd = adapter.rotary_dim
    rd, base = rd or 0, 10000.0 if base is None else base  # rd: checked by LorsaConfig
    if isinstance(base, bool) or not isinstance(base, (int, float)) or not 0 < base < 1e300:
        raise ForeignFormatError(f"{folder}/config.json: rotary_base {base!r} is not a positive number")
    cfg = LorsaConfig(d_model=d, n_qk=n_qk, d_qk=d_qk, heads_per_group=H // n_qk, top_k=conf["top_k"],
                      rotary_dim=rd, layer=layer)
    if conf.get("n_qk_heads", n_qk) != n_qk or conf.get("d_qk_head", d_qk) != d_qk:
        raise ForeignFormatError(f"{folder}: config.json and the weights disagree on the QK shape")
    if model_map:  # the model's own frequencies (scaled variants included)
        inv, scale = inv_freq_of(adapter)
    else:
        inv, scale = (1.0 / (float(base) ** (torch.arange(0, rd, 2).float() / rd)) if rd else None), 1.0
    lorsa = Lorsa(cfg, inv_freq=inv, rope_scaling=scale)
    with torch.no_grad():
        for ours, theirs in (("W_Q", "W_Q"), ("W_K", "W_K"), ("b_Q", "b_Q"), ("b_K", "b_K"), ("W_V", "W_V"),
                             ("b_V", "b_V"), ("W_O", "W_O"), ("b_O", "b_D")):
            getattr(lorsa, ours).copy_(t[theirs].float())
    return lorsa


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
