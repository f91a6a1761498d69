"""Head and feature dashboards: what each Lorsa head and transcoder feature responds to, and what it writes.

For every Lorsa head and transcoder feature of every layer, over a held-out sample of the model's data:

* its **top-activating contexts**: a window of tokens around each of its strongest activations, with the
  activation of every token in the window;
* for Lorsa heads, each context's **z pattern**: z_t = sum_s A[t, s] v_s, so A[t, s] v_s is the share of key
  position s in the activation at query position t; the strongest keys anywhere in the sequence are kept too,
  since an induction or operand-moving head may read far outside the window;
* the **logit lens** of its output direction w (a Lorsa head's W_O row, a feature's decoder row): the logits
  W_U (gamma * P(w)) through the final norm's weight (P centres for LayerNorm) and the unembedding.

One pass over the sample feeds every layer.  The result is cached as one safetensors file per layer, keyed
by the model, the replacement weights and the sample, so a second call reads it back.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import checkpoint as ckpt
from .errors import BadInputError
from .models import NO_TOKENIZER
from .norms import centre as centre_
from .norms import is_layernorm, norm_weight
from .hooks import hook_name, layer_names
from .tokenizer import special_ids
from .io import make_folder, progress_bar

KINDS = ("lorsa", "transcoder")
CONTENTS_VERSION = 4  # 2: Lorsa dashboards hold each head's original heads (replacement/correspond.py); 3: no special
# tokens in the logit lens; 4: n_seqs sequences exactly (they were rounded up to whole batches)


@dataclass
class DashboardConfig:
    n_seqs: int = 64  # held-out sequences in the sample
    seq_len: int = 128
    batch_size: int = 16
    top_contexts: int = 8
    before: int = 12  # window: tokens before the activating token...
    after: int = 3  # ... and after it
    top_z: int = 3  # strongest z-pattern keys kept per Lorsa context
    top_logits: int = 8
    seed: int = 0


def sample_bytes(model, cfg: DashboardConfig) -> int:
    """About the bytes `build` holds for its sample, twice (the per-batch parts, then their concatenation): per
    scanned token its id, each Lorsa layer's input (d float32) and each module's code (K float32 values and K
    int64 indices; a transcoder without a top-K counted at 64 features a token)."""
    a = model.adapter
    per_token = 8
    for L in range(a.n_layers):
        per_token += 12 * (model.transcoders[L].cfg.top_k or 64)
        if L in model.lorsas:
            per_token += 4 * a.d_model + 12 * model.lorsas[L].cfg.top_k
    return 2 * cfg.n_seqs * min(cfg.seq_len, a.context) * per_token


def default_cache_dir() -> Path:
    return Path(os.environ.get("CIRCUITS_CACHE", "").strip() or Path.home() / ".cache" / "circuits") / "dashboards"  # empty: unset


# ---------------------------------------------------------------------------------------------------------
# Small pure functions
# ---------------------------------------------------------------------------------------------------------


def top_logits(W: torch.Tensor, norm_weight: torch.Tensor, W_U: torch.Tensor, centre: bool, k: int,
               chunk: int = 512, exclude: list[int] = (), demean: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest logits of each direction through the final norm's weight (``centre``: P first, for a
    LayerNorm) and the unembedding, the tokens of ``exclude`` (special tokens) left out; ``demean``: each minus
    the direction's mean logit over the whole vocabulary.  W [F, d], norm_weight [d], W_U [V, d].

    Returns (ids, values), each [F, k]."""
    U = W_U.float()
    mean_row = U.mean(0) if demean else None  # [d]: a direction's mean logit over the vocabulary is mean_row . x
    barred = torch.tensor(sorted(set(exclude)), dtype=torch.long)
    k = max(0, min(k, U.shape[0] - len(barred)))
    ids, vals = [torch.zeros(0, k, dtype=torch.long)], [torch.zeros(0, k)]
    for i in range(0, len(W), chunk):
        x = centre_(W[i : i + chunk].float(), centre) * norm_weight.float()  # [f, d]
        logits = x @ U.t()  # [f, V]
        logits[:, barred] = -torch.inf
        top = logits.topk(k, dim=-1)
        ids.append(top.indices)
        vals.append(top.values - (x @ mean_row)[:, None] if demean else top.values)
    return torch.cat(ids), torch.cat(vals)


def logit_lens(W: torch.Tensor, norm_weight: torch.Tensor, W_U: torch.Tensor, centre: bool, k: int,
               chunk: int = 512, exclude: list[int] = ()) -> tuple[torch.Tensor, ...]:
    """Top and bottom k logits of each direction (`top_logits`; the bottom ones are the top ones of -W, negated).

    Returns (top_ids, top_vals, bottom_ids, bottom_vals), each [F, k]."""
    top_ids, top_vals = top_logits(W, norm_weight, W_U, centre, k, chunk, exclude)
    low_ids, low_vals = top_logits(-W, norm_weight, W_U, centre, k, chunk, exclude)
    return top_ids, top_vals, low_ids, -low_vals


def top_locations(values: torch.Tensor, indices: torch.Tensor, n_features: int, c: int) -> tuple[torch.Tensor, ...]:
    """The c strongest activations of every feature from sparse codes.

    values, indices: [N, K] (token t activates feature indices[t, j] with values[t, j]).
    Returns (vals [F, c], token [F, c]); unused slots have value 0 and token -1."""
    tok = torch.arange(len(values))[:, None].expand_as(indices).reshape(-1)
    v, f = values.reshape(-1).float(), indices.reshape(-1)
    keep = v > 0
    v, f, tok = v[keep], f[keep], tok[keep]
    order = v.argsort(descending=True, stable=True)
    order = order[f[order].argsort(stable=True)]  # grouped by feature, strongest first within each group
    v, f, tok = v[order], f[order], tok[order]
    starts = torch.zeros(n_features + 1, dtype=torch.long)
    starts[1:] = torch.bincount(f, minlength=n_features).cumsum(0)
    rank = torch.arange(len(f)) - starts[f]
    sel = rank < c
    out_v, out_t = torch.zeros(n_features, c), torch.full((n_features, c), -1, dtype=torch.long)
    out_v[f[sel], rank[sel]] = v[sel]
    out_t[f[sel], rank[sel]] = tok[sel]
    return out_v, out_t


def dense_from_sparse(values: torch.Tensor, indices: torch.Tensor, feature: torch.Tensor) -> torch.Tensor:
    """Activation of ``feature`` [C] at each token of windows: values, indices [C, W, K] -> [C, W]."""
    return ((indices == feature[:, None, None]) * values.float()).sum(-1)


def window_positions(t: torch.Tensor, n: int, before: int, after: int) -> torch.Tensor:
    """Token positions [C, before+1+after] of windows around positions t [C] (out of range: -1)."""
    pos = t[:, None] + torch.arange(-before, after + 1)[None]
    return torch.where((pos >= 0) & (pos < n), pos, torch.full_like(pos, -1))


# ---------------------------------------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------------------------------------


@torch.no_grad()
def build(model, cfg: DashboardConfig, source=None, progress: bool = True) -> dict[int, dict[str, torch.Tensor]]:
    """Dashboards of every layer: {layer: tensors} (see ``Dashboards`` for the names)."""
    from .activations import default_source

    a = model.adapter
    seq_len = min(cfg.seq_len, a.context)
    source = source or default_source(a, seq_len, cfg.seed, heldout=True)
    ids, codes, attn_in, moments = _codes(model, cfg, source, seq_len, progress)
    W_U, final_w = a.unembedding.weight.detach().float().cpu(), norm_weight(a.final_norm).cpu()
    centre = is_layernorm(a.final_norm)
    out: dict[int, dict[str, torch.Tensor]] = {L: {} for L in range(a.n_layers)}
    for (kind, L), parts in progress_bar(list(codes.items()), "dashboards: contexts", not progress):
        if not parts:
            continue
        module = model.lorsas[L] if kind == "lorsa" else model.transcoders[L]
        values = torch.cat([p[0] for p in parts])  # [S*n, K]
        indices = torch.cat([p[1] for p in parts])
        lens = logit_lens(module.decoder()[0].detach().float().cpu(), final_w, W_U, centre, cfg.top_logits,
                          exclude=special_ids(a.tokenizer, len(W_U)))
        out[L].update(_entries(kind, module, values, indices, ids, lens, cfg, attn_in[L]))
    for L, m in moments.items():  # which original heads each Lorsa head comes from (replacement/correspond.py)
        out[L].update(_original_heads(m, model, L))
    return out


def _original_heads(moments, model, L: int) -> dict[str, torch.Tensor]:
    from .correspond import KINDS as MATCH_KINDS
    from .correspond import CorrespondConfig

    lorsa = model.lorsas[L]
    res = moments.result(lorsa.cfg.heads_per_group, CorrespondConfig(), model.adapter.name, L)
    k = max(len(h.heads) for h in res.heads)
    return {"lorsa.orig_heads": torch.tensor([h.heads + [-1] * (k - len(h.heads)) for h in res.heads]).int(),
            "lorsa.orig_r2": torch.tensor([h.r2 + [0.0] * (k - len(h.r2)) for h in res.heads]).float(),
            "lorsa.orig_few": torch.tensor([h.few_heads + [-1] * (3 - len(h.few_heads)) for h in res.heads]).int(),
            "lorsa.orig_few_r2": torch.tensor([h.few_r2 for h in res.heads]).float(),
            "lorsa.orig_kind": torch.tensor([MATCH_KINDS.index(h.kind) for h in res.heads]).int(),
            "lorsa.orig_pattern_head": torch.tensor([h.pattern_head for h in res.heads]).int(),
            "lorsa.orig_pattern_overlap": torch.tensor([h.pattern_overlap for h in res.heads]).float()}


def _codes(model, cfg: DashboardConfig, source, seq_len: int, progress: bool):
    """One pass over the sample: (ids [S, n], {(kind, layer): [(values, indices) [B*n, K] per batch]},
    {layer: [Lorsa inputs [B, n, d] per batch]}, {Lorsa layer: its correspondence `Moments`})."""
    from . import correspond

    a = model.adapter
    n_batches = -(-cfg.n_seqs // cfg.batch_size)
    layers = range(a.n_layers)
    from .assemble import input_point, transcoder_input

    points = sorted(set(layer_names(layers, "attn.in")) | {hook_name(L, input_point(model.transcoders[L])) for L in layers}
                    | {p for L in model.lorsas for p in correspond.layer_points(L)})
    moments = {L: correspond.new_moments(model, L) for L in model.lorsas}
    ids_all, codes, attn_in = [], {(k, L): [] for k in KINDS for L in layers}, {L: [] for L in layers}
    for b in progress_bar(range(n_batches), "dashboards: activations", not progress):
        ids = source.batch(10_000 + b, min(cfg.batch_size, cfg.n_seqs - b * cfg.batch_size))[:, :seq_len]  # n_seqs in all
        cache = a.run(ids.to(a.device), capture=points).cache
        ids_all.append(ids.cpu())
        for L in layers:
            x_mlp = transcoder_input(a, model.transcoders[L], L, cache)  # what its encoder reads
            c = model.transcoders[L].encode(x_mlp)
            codes[("transcoder", L)].append((c.values.flatten(0, 1).cpu(), c.indices.flatten(0, 1).cpu()))
            if L in model.lorsas:
                x = cache[hook_name(L, "attn.in")].float()
                z = model.lorsas[L].head_activations(x)  # once, for the codes and the correspondence
                c = model.lorsas[L].code_of(z)
                codes[("lorsa", L)].append((c.values.flatten(0, 1).cpu(), c.indices.flatten(0, 1).cpu()))
                attn_in[L].append(x.cpu())
                correspond.add_batch(moments[L], model, L, cache, z)
    return torch.cat(ids_all), codes, attn_in, moments


def _entries(kind: str, module, values, indices, ids, lens, cfg: DashboardConfig, attn_in: list) -> dict:
    """One module's dashboard tensors, named ``<kind>.<name>``: top contexts of each of its F features from
    their sparse codes ``values``/``indices`` [S*n, K] over the sample ``ids`` [S, n], and its logit lens."""
    S, n = ids.shape
    F = lens[0].shape[0]  # the logit lens has a row per feature
    vals, tok = top_locations(values, indices, F, cfg.top_contexts)  # [F, C]
    seq, t = tok.clamp(min=0) // n, tok.clamp(min=0) % n
    win = window_positions(t.reshape(-1), n, cfg.before, cfg.after)  # [F*C, W]
    flat = seq.reshape(-1)[:, None] * n + win.clamp(min=0)
    win_ids = torch.where(win >= 0, ids.reshape(-1)[flat], torch.full_like(win, -1))
    feat = torch.arange(F)[:, None].expand(F, cfg.top_contexts).reshape(-1)
    win_acts = dense_from_sparse(values[flat], indices[flat], feat) * (win >= 0)
    used = tok.reshape(-1) >= 0
    win_ids[~used], win_acts[~used] = -1, 0.0
    p = f"{kind}."
    t_ids, t_vals, b_ids, b_vals = lens
    out = {p + "max": vals, p + "density": torch.bincount(indices[values > 0].reshape(-1), minlength=F).float() / (S * n),
           p + "ctx_tokens": win_ids.view(F, cfg.top_contexts, -1).int(),
           p + "ctx_acts": win_acts.view(F, cfg.top_contexts, -1).half(),
           p + "ctx_seq": seq.int(), p + "ctx_pos": torch.where(tok >= 0, t, -1).int(),
           p + "logit_top_ids": t_ids.int(), p + "logit_top": t_vals.half(),
           p + "logit_bottom_ids": b_ids.int(), p + "logit_bottom": b_vals.half()}
    if kind == "lorsa":
        z_win, z_top_pos, z_top = _lorsa_contexts(module, torch.cat(attn_in), seq, t, used.view(F, -1), win, cfg)
        out.update({p + "ctx_z": z_win, p + "z_top_pos": z_top_pos, p + "z_top_ids": torch.where(
            z_top_pos >= 0, ids[seq[..., None].expand_as(z_top_pos), z_top_pos.clamp(min=0).long()], -1).int(),
            p + "z_top": z_top})
    return out


def _lorsa_contexts(lorsa, X: torch.Tensor, seq: torch.Tensor, t: torch.Tensor, used: torch.Tensor,
                    win: torch.Tensor, cfg: DashboardConfig):
    """z patterns of every head's contexts: over the window [F, C, W], and the top_z keys anywhere [F, C, top_z]."""
    F, C = seq.shape
    n = X.shape[1]
    z_win = torch.zeros(F * C, win.shape[1])
    z_top_pos = torch.full((F * C, cfg.top_z), -1, dtype=torch.long)
    z_top = torch.zeros(F * C, cfg.top_z)
    heads = torch.arange(F)[:, None].expand(F, C).reshape(-1)
    seq_f, t_f, used_f = seq.reshape(-1), t.reshape(-1), used.reshape(-1)
    for s in seq_f[used_f].unique().tolist():
        rows = ((seq_f == s) & used_f).nonzero().squeeze(1)
        with torch.no_grad():
            z = lorsa.z_patterns(X[s].to(lorsa.W_V.device).float(), heads[rows], t_f[rows]).cpu()  # [R, n]
        w = win[rows]
        z_win[rows] = torch.where(w >= 0, torch.gather(z, 1, w.clamp(min=0)), torch.zeros_like(w, dtype=z.dtype))
        k = min(cfg.top_z, n)
        top = z.abs().topk(k, dim=1)
        z_top_pos[rows, :k] = torch.where(top.values > 0, top.indices, -1)
        z_top[rows, :k] = torch.gather(z, 1, top.indices)
    return (z_win.view(F, C, -1).half(), z_top_pos.view(F, C, -1).int(), z_top.view(F, C, -1).half())


# ---------------------------------------------------------------------------------------------------------
# Cache and lookup
# ---------------------------------------------------------------------------------------------------------


def default_source_name(adapter) -> str:
    """What the default sample is, for the cache key: the shipped held-out text (by content), or random tokens
    for a model without a tokenizer."""
    if adapter.tokenizer is None:
        return "random-tokens"
    from .corpus import HELDOUT_SAMPLE

    if not HELDOUT_SAMPLE.is_file():
        return "missing"  # building from it fails with the corpus module's one-line error
    return "heldout-sample:" + hashlib.sha256(HELDOUT_SAMPLE.read_bytes()).hexdigest()[:16]


def texts_name(texts) -> str:
    """The dashboards' sample when it is ``texts``: each file by its contents (a SHA-256), so that an edited file, or
    another of the same name, is scanned anew (keyed by name, the old text's contexts were shown)."""
    def name(t) -> str:
        try:
            return hashlib.sha256(Path(t).read_bytes()).hexdigest()[:16]
        except OSError:  # not a readable file: reading it says why, in one line
            return str(t)

    return "texts:" + "|".join(sorted(name(t) for t in texts))


def cache_key(model, cfg: DashboardConfig, source_name: str) -> str:
    """Model fingerprint + the replacement weights + the sample: any change gives a new key."""
    from .models import model_fingerprint

    h = hashlib.sha256()
    h.update(model_fingerprint(model.adapter).encode())
    h.update(json.dumps(asdict(cfg), sort_keys=True).encode() + source_name.encode())
    h.update(f"contents {CONTENTS_VERSION}".encode())
    for kind, mods in (("lorsa", model.lorsas), ("transcoder", model.transcoders)):
        for L in sorted(mods):
            for name, t in sorted(mods[L].state_dict().items()):
                h.update(f"{kind}{L}{name}".encode())
                h.update(t.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


class Dashboards:
    """Read access to the dashboards of one model: ``entry(kind, layer, index)`` gives a plain dict."""

    def __init__(self, layers: dict[int, dict[str, torch.Tensor]], tokenizer, cfg: DashboardConfig):
        self.layers, self.tokenizer, self.cfg = layers, tokenizer, cfg

    def _tok(self, i: int) -> str:
        """A token as text; part of a multi-byte character reads as its bytes (`tokenizer.token_text`)."""
        from .tokenizer import token_text

        return token_text(self.tokenizer, i) if self.tokenizer is not None else f"<{i}>"

    def n_features(self, kind: str, layer: int) -> int:
        t = self.layers.get(layer, {}).get(f"{kind}.max")
        return 0 if t is None else len(t)

    def ranked(self, kind: str, layer: int) -> list[int]:
        """Features of a layer, strongest top activation first (dead ones last)."""
        t = self.layers[layer][f"{kind}.max"][:, 0]
        return t.argsort(descending=True).tolist()

    def entry(self, kind: str, layer: int, index: int) -> dict:
        T = self.layers.get(layer, {})
        p = f"{kind}."
        if p + "max" not in T:
            raise BadInputError(f"no {kind} dashboards for layer {layer}")
        F = len(T[p + "max"])
        if not 0 <= index < F:
            raise BadInputError(f"{kind} index {index} out of range: layer {layer} has {F}")
        contexts = []
        for c in range(T[p + "max"].shape[1]):
            if int(T[p + "ctx_pos"][index, c]) < 0:
                continue
            toks = T[p + "ctx_tokens"][index, c].tolist()
            keep = [i for i, tid in enumerate(toks) if tid >= 0]
            ctx = {"activation": float(T[p + "max"][index, c]), "seq": int(T[p + "ctx_seq"][index, c]),
                   "pos": int(T[p + "ctx_pos"][index, c]),
                   "tokens": [self._tok(toks[i]) for i in keep],
                   "acts": [round(float(T[p + "ctx_acts"][index, c, i]), 4) for i in keep],
                   "query": keep.index(self.cfg.before)}
            if kind == "lorsa":
                ctx["z"] = [round(float(T[p + "ctx_z"][index, c, i]), 4) for i in keep]
                ctx["z_top"] = [{"pos": int(pos), "offset": int(pos) - ctx["pos"], "token": self._tok(int(tid)),
                                 "z": round(float(z), 4)}
                                for pos, tid, z in zip(T[p + "z_top_pos"][index, c].tolist(),
                                                       T[p + "z_top_ids"][index, c].tolist(),
                                                       T[p + "z_top"][index, c].tolist()) if pos >= 0]
            contexts.append(ctx)
        lens = lambda i, v: [[self._tok(a), round(float(b), 3)] for a, b in zip(T[p + i][index].tolist(), T[p + v][index].tolist())]  # noqa: E731
        out = {"kind": kind, "layer": layer, "index": index, "density": float(T[p + "density"][index]),
               "contexts": contexts, "logits_up": lens("logit_top_ids", "logit_top"),
               "logits_down": lens("logit_bottom_ids", "logit_bottom")}
        if kind == "lorsa" and "lorsa.orig_kind" in T:
            from .correspond import KINDS as MATCH_KINDS

            out["original_heads"] = {
                "kind": MATCH_KINDS[int(T["lorsa.orig_kind"][index])],
                "heads": [[int(m), round(float(r), 4)] for m, r in zip(T["lorsa.orig_heads"][index].tolist(),
                                                                       T["lorsa.orig_r2"][index].tolist()) if m >= 0],
                "few": [int(m) for m in T["lorsa.orig_few"][index].tolist() if m >= 0],
                "few_r2": round(float(T["lorsa.orig_few_r2"][index]), 4),
                "pattern_head": int(T["lorsa.orig_pattern_head"][index]),
                "pattern_overlap": round(float(T["lorsa.orig_pattern_overlap"][index]), 4)}
        return out


def load_or_build(model, cfg: DashboardConfig | None = None, texts: list[str] | None = None,
                  cache_dir: str | Path | None = None, rebuild: bool = False, progress: bool = True) -> Dashboards:
    """The dashboards of every layer of ``model`` (a ReplacementModel): read from the cache, else built and cached."""
    from .activations import TextSource

    cfg = cfg or DashboardConfig()
    a = model.adapter
    source, source_name = None, default_source_name(a)
    if texts:
        if a.tokenizer is None:
            raise BadInputError(f"text files cannot be read: {NO_TOKENIZER}")
        source = TextSource(a.tokenizer, list(texts), min(cfg.seq_len, a.context), cfg.seed, heldout=True)
        source_name = texts_name(texts)
    folder = Path(cache_dir or default_cache_dir()) / f"{a.name.replace('/', '--')}-{cache_key(model, cfg, source_name)}"
    files = {L: folder / f"layer{L}.safetensors" for L in range(a.n_layers)}
    if not rebuild and all(f.is_file() for f in files.values()):
        try:
            layers = {L: ckpt.load(f)[0] for L, f in files.items()}
            return Dashboards(layers, a.tokenizer, cfg)
        except ckpt.CheckpointError:
            pass  # a damaged cache is rebuilt
    make_folder(folder, "the dashboard cache")  # before the scan, not after it
    layers = build(model, cfg, source, progress)
    for L, tensors in layers.items():
        ckpt.atomic_save({k: v.contiguous() for k, v in tensors.items()}, files[L], {"config": asdict(cfg), "layer": L})
    return Dashboards(layers, a.tokenizer, cfg)
