"""`ReplacementModel`: the wrapped model with every attention layer's Lorsa and every MLP's transcoder.

For a prompt, `record` runs the real model and keeps, per layer and position: the norm scales, the real
attention patterns, the Lorsa patterns and sparse activations, the transcoder activations, and the errors

    attn_err = real attention output - Lorsa output         (one attention error node per layer, position)
    mlp_err  = real MLP output      - transcoder output      (one MLP error node per layer, position)

where a cross-layer transcoder's "transcoder output" at layer T is the sum of every decoder into T (the
features of layers L <= T: `mlp_replacement`).

Adding the errors back reproduces the real model exactly.  With ``attention="frozen"`` (transcoders only,
circuit-tracer's method) attention stays the real MHSA with its patterns frozen, and has no error nodes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import CircuitsError
from .hooks import EMBED, FINAL_OUT, FINAL_SCALE, LOGITS, hook_name, layer_names
from .models import ModelAdapter, freeze_hooks
from .norms import norm_bias, norm_weight
from .sparse import SparseCode, decode


@dataclass
class LayerRecord:
    attn_in: torch.Tensor  # [n, d] what attention reads (after its norm)
    attn_out: torch.Tensor  # [n, d] real attention output
    mlp_in: torch.Tensor  # [n, d]
    mlp_out: torch.Tensor  # [n, d]
    ln1_scale: torch.Tensor  # [n, 1]
    ln2_scale: torch.Tensor  # [n, 1]
    pattern: torch.Tensor  # [H, n, n] real attention pattern
    tc_code: SparseCode  # values/indices [n, K]
    tc_out: torch.Tensor  # [n, d]
    mlp_err: torch.Tensor  # [n, d]
    lorsa_pattern: torch.Tensor | None = None  # [n_qk, n, n]
    lorsa_z: torch.Tensor | None = None  # [n, H_lorsa] pre-TopK head activations
    lorsa_code: SparseCode | None = None
    lorsa_out: torch.Tensor | None = None
    attn_err: torch.Tensor | None = None
    tc_in: torch.Tensor | None = None  # [n, d] what the transcoder's encoder reads (mlp_in, or resid_mid)


@dataclass
class Record:
    ids: torch.Tensor  # [n]
    logits: torch.Tensor  # [n, V] real logits
    embed: torch.Tensor  # [n, d]
    final_scale: torch.Tensor  # [n, 1]
    layers: list[LayerRecord] = field(default_factory=list)
    attention: str = "lorsa"
    cache: dict = field(default_factory=dict, repr=False)
    logits_linear: torch.Tensor | None = None  # [n, V] before the logits' soft-capping (Gemma-2), else None


def required_modules(n_layers: int, attention: str = "lorsa") -> set[tuple[str, int]]:
    """The modules a replacement model needs: a transcoder per MLP, and a Lorsa per attention layer unless the
    attention is the real one, frozen."""
    need = {("transcoder", L) for L in range(n_layers)}
    return need | {("lorsa", L) for L in range(n_layers)} if attention == "lorsa" else need


def train_commands(model_arg: str, missing, n_layers: int) -> str:
    """The `circuits train` commands that train the modules ``missing`` [(kind, layer)] and no module a set holds
    ("--what all" after Lorsa alone was refused: it would replace them): one, or one per kind where some layers lack
    one kind and others the other."""
    kinds = sorted({k for k, _ in missing})
    layers = sorted({L for _, L in missing})
    if len(kinds) > 1 and set(missing) != {(k, L) for k in kinds for L in layers}:
        return " and ".join(train_commands(model_arg, [m for m in missing if m[0] == k], n_layers) for k in kinds)
    what = kinds[0] if len(kinds) == 1 else "all"
    return (f"circuits train --model {model_arg} --what {what}"
            + ("" if len(layers) == n_layers else f" --layers {','.join(map(str, layers))}"))


class ReplacementModel:
    def __init__(self, adapter: ModelAdapter, modules: dict[tuple[str, int], torch.nn.Module], attention: str = "lorsa"):
        if attention not in ("lorsa", "frozen"):
            raise CircuitsError(f"attention must be 'lorsa' or 'frozen', not {attention!r}")
        self.adapter, self.attention = adapter, attention
        for m in modules.values():
            m.requires_grad_(False)
        self.transcoders = {L: m for (k, L), m in modules.items() if k == "transcoder"}
        self.lorsas = {L: m for (k, L), m in modules.items() if k == "lorsa"}
        self._codes: dict = {}  # {layer: SparseCode} of the run in progress (`_module_hooks`)
        self._last_in: dict = {}  # {hook name: tensor} each module's input in the run in progress (`_module_hooks`)
        self.origins: dict[tuple[str, int], Path] = {}  # the folder (`load`) or file (`use_module`) of each module
        missing = sorted(required_modules(adapter.n_layers, attention) - set(modules))
        if missing:
            from .store import module_key

            raise CircuitsError(
                f"missing trained replacements {', '.join(module_key(k, L) for k, L in missing)}; "
                f"train them with: {train_commands(adapter.model_arg, missing, adapter.n_layers)}"
            )

    @classmethod
    def load(cls, adapter: ModelAdapter, folder=None, attention: str = "lorsa") -> "ReplacementModel":
        """``folder``: ours, a circuit-tracer or Llamascopium folder, a cached HF repo id, or a list of them (later
        ones replace earlier ones' modules); None: the model's default folder (replacement/foreign.py)."""
        from .foreign import load_specs

        folders = {}
        model = cls(adapter, load_specs(folder, adapter, folders=folders), attention)
        model.origins = folders
        return model

    def use_module(self, path) -> torch.nn.Module:
        """Put the saved module at ``path`` (trained on this model) in place of the one of its kind and layer."""
        from .models import model_fingerprint
        from .store import load_module

        module, meta = load_module(path, model_fingerprint(self.adapter), self.adapter.device)
        if module.cfg.layer >= self.adapter.n_layers:
            raise CircuitsError(f"{path} is for layer {module.cfg.layer}; the model has {self.adapter.n_layers}")
        module.requires_grad_(False)
        (self.lorsas if meta["kind"] == "lorsa" else self.transcoders)[module.cfg.layer] = module.eval()
        self.origins[(meta["kind"], module.cfg.layer)] = Path(path)
        return module

    def provenance(self) -> dict:
        """What a graph was traced with, for its settings: the model's fingerprint, per folder (or file) the
        modules loaded from it (``{folder: ["layer0.lorsa", ...]}``; a bundled set as ``bundled:<model>``; modules
        built in Python, not loaded from files, are left out), and a fingerprint of every module's weights (a set
        retrained in place keeps its folder and names)."""
        import hashlib

        from .bundle import BUNDLE_DIR
        from .models import model_fingerprint, sample_tensors
        from .store import module_key

        by_folder: dict[str, list[str]] = {}
        for (kind, L), folder in sorted(self.origins.items(), key=lambda kv: (kv[0][1], kv[0][0])):
            folder = Path(folder).resolve()
            name = f"bundled:{folder.parent.name}" if folder.parent.parent == BUNDLE_DIR else str(folder)
            by_folder.setdefault(name, []).append(module_key(kind, L))
        h = hashlib.sha256()
        for kind, mods in (("lorsa", self.lorsas), ("transcoder", self.transcoders)):
            for L in sorted(mods):
                sample_tensors(h, {f"{kind}{L}.{k}": v for k, v in mods[L].state_dict().items()})
        return {"model_fingerprint": model_fingerprint(self.adapter), "replacements": by_folder,
                "replacements_fingerprint": h.hexdigest()[:16]}

    @property
    def cross_layer(self) -> bool:
        """Whether the transcoders are a cross-layer transcoder (features writing into later MLP outputs)."""
        return any(tc.cfg.n_later for tc in self.transcoders.values())

    def writers(self, T: int) -> list[int]:
        """The layers whose transcoder features write into layer T's MLP output (T itself; a CLT's L <= T)."""
        return [L for L in sorted(self.transcoders) if T in self.transcoders[L].writes_into()]

    def mlp_replacement(self, T: int, codes: dict[int, SparseCode], x: torch.Tensor) -> torch.Tensor:
        """[..., d]: what replaces layer T's MLP output: the decoder into T of every writer L applied to its
        code ``codes[L]`` ([..., K]), plus layer T's bias and skip connection (x [..., d]: layer T's MLP input)."""
        y = self.transcoders[T].decode(codes[T], x)
        for L in self.writers(T):
            if L != T:
                y = y + decode(codes[L], self.transcoders[L].decoder_into(T).to(y.dtype), 0)
        return y

    @torch.no_grad()
    def record(self, ids: torch.Tensor, sparse: bool = False) -> Record:
        """Run the real model on one prompt [n] (or [1, n]) and record everything the graph needs.

        ``sparse=True`` records the pure sparse model instead (every block's output is its replacement's),
        so that all errors are zero up to rounding."""
        ids = ids.reshape(-1).to(self.adapter.device)
        self._last_in = {}
        res = self.adapter.run(ids[None], hooks=self._module_hooks(None, False) if sparse else None, capture=True)
        c = {k: v[0].float() for k, v in res.cache.items()}
        rec = Record(ids=ids, logits=res.logits[0].float(), embed=c[EMBED], final_scale=c[FINAL_SCALE],
                     attention=self.attention, cache=c)
        if getattr(self.adapter, "logit_softcap", None):
            U = self.adapter.unembedding
            rec.logits_linear = c[FINAL_OUT] @ U.weight.float().t() + (0 if U.bias is None else U.bias.float())
        codes = {}
        for L in range(self.adapter.n_layers):
            at = {p: c[hook_name(L, p)] for p in ("attn.in", "attn.out", "mlp.in", "mlp.out", "ln1.scale", "ln2.scale",
                                                   "attn.pattern")}
            tc_in = transcoder_input(self.adapter, self.transcoders[L], L, c)
            codes[L] = tc_code = self.transcoders[L].encode(tc_in)
            tc_out = self.mlp_replacement(L, codes, at["mlp.in"])
            lr = LayerRecord(attn_in=at["attn.in"], attn_out=at["attn.out"], mlp_in=at["mlp.in"], mlp_out=at["mlp.out"],
                             ln1_scale=at["ln1.scale"], ln2_scale=at["ln2.scale"], pattern=at["attn.pattern"],
                             tc_code=tc_code, tc_out=tc_out, mlp_err=at["mlp.out"] - tc_out, tc_in=tc_in)
            if self.attention == "lorsa":
                lorsa = self.lorsas[L]
                x = lr.attn_in[None]
                lr.lorsa_pattern = lorsa.patterns(x)[0]
                lr.lorsa_z = lorsa.head_activations(x, lr.lorsa_pattern[None])[0]
                code = lorsa.code_of(lr.lorsa_z[None])  # what `encode` gives, from z computed once
                lr.lorsa_code = SparseCode(code.values[0], code.indices[0])
                lr.lorsa_out = lorsa.decode(lr.lorsa_code)
                lr.attn_err = lr.attn_out - lr.lorsa_out
            rec.layers.append(lr)
        return rec

    # -- runs with replaced modules -----------------------------------------------------------------------

    def _module_hooks(self, rec: Record | None, with_errors: bool) -> dict:
        """Hooks that compute each block's output from its replacement (plus the recorded error)."""
        hooks = {}
        for L in range(self.adapter.n_layers):
            tc, mlp_in = self.transcoders[L], hook_name(L, "mlp.in")
            tc_in = hook_name(L, input_point(tc))

            def mlp_hook(t, name, L=L, tc=tc, mlp_in=mlp_in):
                self._codes[L] = tc.encode(transcoder_input(self.adapter, tc, L, self._last_in))
                y = self.mlp_replacement(L, self._codes, self._last_in[mlp_in])
                return self._add_err(y, rec, L, "mlp", with_errors).to(t.dtype)

            hooks[hook_name(L, "mlp.out")] = mlp_hook
            hooks[mlp_in] = hooks[tc_in] = self._stash
            if self.attention == "lorsa":
                lorsa, attn_in = self.lorsas[L], hook_name(L, "attn.in")

                def attn_hook(t, name, L=L, lorsa=lorsa, attn_in=attn_in):
                    pat = None if rec is None or not with_errors else rec.layers[L].lorsa_pattern[None]
                    y = lorsa(self._last_in[attn_in], pat)[0]
                    return self._add_err(y, rec, L, "attn", with_errors).to(t.dtype)

                hooks[hook_name(L, "attn.out")] = attn_hook
                hooks[attn_in] = self._stash
        return hooks

    def _stash(self, t, name):
        self._last_in[name] = t.float()

    @staticmethod
    def _add_err(y, rec, L, kind, with_errors):
        if not with_errors or rec is None:
            return y
        return y + (rec.layers[L].attn_err if kind == "attn" else rec.layers[L].mlp_err)

    @torch.no_grad()
    def run_with_errors(self, rec: Record) -> torch.Tensor:
        """Logits [n, V] of the replacement model with every error added back (equals the real model)."""
        self._last_in = {}
        return self.adapter.run(rec.ids[None], hooks=self._module_hooks(rec, True)).logits[0]

    def sparse_hooks(self, only: set[tuple[str, int]] | None = None) -> dict:
        """Run hooks of the pure sparse (error-free) replacement model: every block's output is its replacement
        module's, Lorsa patterns computed live.  Fresh hooks for each run; batches [B, n] work too.

        ``only``: splice just these modules ((``"lorsa"`` | ``"transcoder"``, layer)); every other block runs as
        the real model's (e.g. ``{("transcoder", 1)}``: what that one transcoder costs on its own)."""
        self._last_in = {}
        hooks = self._module_hooks(None, False)
        if only is None:
            return hooks
        if self.cross_layer and any(kind == "transcoder" for kind, _ in only):
            raise CircuitsError("a cross-layer transcoder's layer does not replace one MLP on its own")
        out_point = {"lorsa": "attn.out", "transcoder": "mlp.out"}
        dropped = {hook_name(L, point) for L in range(self.adapter.n_layers) for kind, point in out_point.items()
                   if (kind, L) not in only}
        return {name: f for name, f in hooks.items() if name not in dropped}

    @torch.no_grad()
    def run_sparse(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits [n, V] of the pure sparse model: no error terms, Lorsa patterns computed live."""
        return self.adapter.run(ids.reshape(1, -1).to(self.adapter.device), hooks=self.sparse_hooks()).logits[0]

    # -- the frozen replacement model (for checks of the attribution graph) -----------------------------

    @torch.no_grad()
    def frozen_run(self, rec: Record, attn_writes: list[torch.Tensor] | None, mlp_writes: list[torch.Tensor],
                   embed: torch.Tensor) -> dict:
        """Run the model with norm scales (and, in frozen mode, attention patterns) frozen and every block's
        output replaced by the given writes [n, d] (in Lorsa mode, attention too). A transcoder's skip
        connection stays live: its change (mlp.in - recorded mlp.in) @ W_skip is added. Returns the cache."""
        c = rec.cache
        names = [k for k in c if k.endswith(".scale")]
        if self.attention == "frozen":
            names += layer_names(range(self.adapter.n_layers), "attn.pattern")
        hooks = freeze_hooks({k: v[None].to(self.adapter.dtype) if k.endswith("pattern") else v[None] for k, v in c.items()}, names)
        hooks[EMBED] = lambda t, n: embed[None].to(t.dtype)
        for L in range(self.adapter.n_layers):
            W_skip = self.transcoders[L].W_skip
            if W_skip is None:
                hooks[hook_name(L, "mlp.out")] = lambda t, n, v=mlp_writes[L]: v[None].to(t.dtype)
            else:
                hooks.update(linear_mlp_hooks(rec, L, mlp_writes[L], lambda dx, W=W_skip.float(): dx @ W))
            if attn_writes is not None:
                hooks[hook_name(L, "attn.out")] = lambda t, n, v=attn_writes[L]: v[None].to(t.dtype)
        points = layer_names(range(self.adapter.n_layers), "attn.in", "mlp.in")
        points += [hook_name(L, input_point(tc)) for L, tc in self.transcoders.items() if input_point(tc) != "mlp.in"]
        res = self.adapter.run(rec.ids[None], hooks=hooks, capture=points)
        out = {k: v[0].float() for k, v in res.cache.items()}
        out[LOGITS] = res.logits[0].float()
        return out


def input_point(tc) -> str:
    """The block point (replacement/hooks.py) a run must capture for transcoder tc's input."""
    return "mlp.in" if tc.cfg.reads == "mlp.normalized" else tc.cfg.reads


def transcoder_input(adapter: ModelAdapter, tc, L: int, cache: dict) -> torch.Tensor:
    """[..., d]: what the layer-L transcoder tc's encoder reads, from a run's ``cache`` (hook name -> tensor, with
    `input_point`): the MLP input, the residual stream before its norm, or the norm's output before its gain and
    bias, (mlp.in - b) / w."""
    x = cache[hook_name(L, input_point(tc))].float()
    if tc.cfg.reads != "mlp.normalized":
        return x
    norm = adapter.mlp_norm(L)
    b = norm_bias(norm)
    return (x if b is None else x - b.to(x.device)) / norm_weight(norm).to(x.device)


def linear_mlp_hooks(rec: Record, L: int, out: torch.Tensor, f) -> dict:
    """Hooks (for one prompt) that make layer L's MLP write ``out`` [n, d] + f(its input - the recorded input),
    f: [n, d] -> [n, d] linear: the MLP replaced by a linear map around the recorded point."""
    live = {}
    return {hook_name(L, "mlp.in"): lambda t, n: live.__setitem__("x", t[0].float()),
            hook_name(L, "mlp.out"): lambda t, n: (out + f(live["x"] - rec.layers[L].mlp_in))[None].to(t.dtype)}
