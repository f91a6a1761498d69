"""Which original attention head(s) does each Lorsa head come from?

For one layer, over a held-out sample (position 0, BOS, left out as in training), with

    z_t^h              the Lorsa head's activation before TopK (dense, so defined for every head and token)
    o_t^m              what original head m writes: (sum_s A^m_{t,s} v_s^m) W_O^m, a vector [d]
    p_t^{m,h} = o_t^m . w_o^h / |w_o^h|   that output projected on the Lorsa head's output direction

a Lorsa head's match with original head m is the share of the variance of z^h that p^{m,h} explains (R^2,
the squared correlation); with a set S of original heads, the R^2 of the least-squares fit of z^h on
(p^{m,h})_{m in S}.  Its **kind** (`classify`, thresholds in `CorrespondConfig`):

    one     the best single original head explains at least ``share`` (default 0.5) of the variance
    few     not one, but the best set of at most ``few`` (default 3) original heads does
    spread  no set of at most ``few`` heads does (the head mixes many, or follows none)
    dead    the head never fires (is never among the TopK) on the sample: no kind

Attention-pattern overlap of a QK group g (shared by its heads) with original head m: the mean over query
positions t >= 1 of sum_s min(A^g_{t,s}, A^m_{t,s}) (1: the same pattern; 0: disjoint).  Distinct original
heads' mutual overlap is the baseline.

Everything is accumulated as sums over tokens (moments): per Lorsa head, of z, z^2, its M projections, their
products with z and with each other ([H, M, M]); the R^2 of any set of original heads follows from them.  The
projections are linear in the original heads' mixed values, so what is summed per token is those values'
moments (`Moments`), projected once at the end.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, field, replace

import torch

from .errors import BadInputError
from .io import progress_bar

KINDS = ("one", "few", "spread", "dead")


@dataclass
class CorrespondConfig:
    n_seqs: int = 32  # held-out sequences
    seq_len: int = 128
    batch_size: int = 8
    seed: int = 0
    share: float = 0.5  # R^2 a set of original heads must reach to count as the Lorsa head's origin
    few: int = 3  # "a few heads": at most this many
    top: int = 3  # original heads listed per Lorsa head


@dataclass
class HeadMatch:
    """One Lorsa head's best-matching original heads."""

    head: int
    kind: str  # one | few | spread | dead
    heads: list[int]  # original heads by single-head R^2, best first (``top`` of them)
    r2: list[float]  # their R^2
    few_heads: list[int]  # the best set of at most ``few`` heads
    few_r2: float
    all_r2: float  # R^2 of the fit on every original head
    pattern_head: int  # the original head whose pattern overlaps the head's QK group's most
    pattern_overlap: float
    fired: int  # tokens of the sample where the head is among the TopK


@dataclass
class Correspondence:
    model: str
    layer: int
    tokens: int
    config: CorrespondConfig
    heads: list[HeadMatch]
    original_overlap: list[list[float]]  # [M, M] pattern overlap between original heads
    group_overlap: list[list[float]] = field(default_factory=list)  # [G, M] each QK group's pattern with each original head's

    def counts(self) -> dict[str, int]:
        return {k: sum(h.kind == k for h in self.heads) for k in KINDS}

    def summary(self) -> dict:
        live = [h for h in self.heads if h.kind != "dead"]
        M = len(self.original_overlap)
        off = [self.original_overlap[i][j] for i in range(M) for j in range(M) if i != j]
        return {"counts": self.counts(), "live": len(live),
                "best_r2_over_half": sum(h.r2[0] > 0.5 for h in live) / max(1, len(live)),
                "median_best_r2": _median([h.r2[0] for h in live]),
                "mean_best_overlap": _mean([h.pattern_overlap for h in live]),
                "mean_original_overlap": _mean(off)}

    def to_json(self) -> dict:
        return {"model": self.model, "layer": self.layer, "tokens": self.tokens, "config": asdict(self.config),
                "summary": self.summary(), "original_overlap": self.original_overlap,
                "group_overlap": self.group_overlap, "heads": [asdict(h) for h in self.heads]}


def _mean(x: list[float]) -> float:
    return sum(x) / len(x) if x else float("nan")


def _median(x: list[float]) -> float:
    return float(torch.tensor(x).median()) if x else float("nan")


# ---------------------------------------------------------------------------------------------------------
# Small pure functions
# ---------------------------------------------------------------------------------------------------------


def pattern_overlap(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """[P, Q]: sum over batch and query positions t >= 1 of sum_s min(A_{p,t,s}, B_{q,t,s}), for causal
    patterns A [batch, P, n, n] and B [batch, Q, n, n] (divide by batch x (n - 1) for the mean)."""
    out = A.new_zeros(A.shape[1], B.shape[1])
    for q in range(B.shape[1]):  # [batch, P, n-1, n] at a time
        out[:, q] = torch.minimum(A[:, :, 1:], B[:, q, None, 1:]).sum((0, 2, 3))
    return out


def subset_r2(cov_ap: torch.Tensor, cov_pp: torch.Tensor, var_a: torch.Tensor, subsets: torch.Tensor) -> torch.Tensor:
    """[H, S]: the R^2 of the least-squares fit of a on the predictors in each subset (indices [S, k]).
    cov_ap [H, M]: covariance of a with each predictor; cov_pp [H, M, M]; var_a [H].
    R^2 = c_S^T C_SS^+ c_S / var(a) (pseudo-inverse: a predictor with no variance adds nothing)."""
    c = cov_ap[:, subsets]  # [H, S, k]
    C = cov_pp[:, subsets[:, :, None], subsets[:, None, :]]  # [H, S, k, k]
    x = torch.linalg.pinv(C, hermitian=True, rtol=1e-6) @ c[..., None]  # [H, S, k, 1]
    explained = (c[..., None, :] @ x)[..., 0, 0]
    return (explained / var_a[:, None].clamp(min=1e-30)).clamp(0.0, 1.0) * (var_a[:, None] > 0)


def classify(best_one: float, best_few: float, fired: int, share: float) -> str:
    """The kind of a Lorsa head from its best single-head R^2 and best few-head R^2 (module docstring)."""
    if fired == 0:
        return "dead"
    if best_one >= share:
        return "one"
    return "few" if best_few >= share else "spread"


# ---------------------------------------------------------------------------------------------------------
# Streaming moments of one layer
# ---------------------------------------------------------------------------------------------------------


class Moments:
    """Sums over tokens for one layer (float64): of z [H], z^2, the original heads' mixed values zo [M dh], z zo^T
    [H, M dh] and zo zo^T [M dh, M dh]; pattern overlaps; TopK firing counts.

    Each Lorsa head h reads original head m's output as p[h, m] = u_h . (zo_m W_O^m) = zo_m . U[m, :, h], with
    u_h its unit output direction and U[m] = W_O^m u (``self.U`` [M, dh, H]).  p is linear in zo, so its sums
    (p, z p, p p^T per head) follow from the sums of zo exactly (`projected`): a token costs one [H] x [M dh]
    outer product, not an [H, M] projection of every head."""

    def __init__(self, w_o: torch.Tensor, G: int, W_O_orig: torch.Tensor, chunk: int = 256):
        """w_o [H, d]: the Lorsa heads' output rows; G: its QK groups; W_O_orig [M, dh, d]: the original heads'
        output matrices; ``chunk``: heads projected at a time in `projected`."""
        f = dict(dtype=torch.float64)
        w = w_o.detach().double().cpu()
        w = w / w.norm(dim=-1, keepdim=True).clamp(min=1e-30)  # [H, d] the output directions
        self.U = torch.einsum("med,hd->meh", W_O_orig.detach().double().cpu(), w)  # [M, dh, H]
        M, dh, H = self.U.shape
        self.T, self.chunk = 0, chunk
        self.Sz, self.Szz = torch.zeros(H, **f), torch.zeros(H, **f)
        self.So, self.Szo = torch.zeros(M * dh, **f), torch.zeros(H, M * dh, **f)
        self.Soo = torch.zeros(M * dh, M * dh, **f)
        self.fired = torch.zeros(H, dtype=torch.long)
        self.ov_g, self.ov_m, self.n_rows = torch.zeros(G, M, **f), torch.zeros(M, M, **f), 0

    def add(self, z: torch.Tensor, zo: torch.Tensor, fired: torch.Tensor, A_lorsa: torch.Tensor,
            A_orig: torch.Tensor):
        """z [T, H] Lorsa activations before TopK, zo [T, M, dh] the original heads' mixed values (what each
        writes through its W_O), fired [T, K] the TopK heads of each token (-1: none); A_lorsa [B, G, n, n] and
        A_orig [B, M, n, n] the sequences' patterns."""
        z, o = z.double(), zo.double().flatten(1)  # [T, H], [T, M dh]
        self.T += len(z)
        self.Sz += z.sum(0)
        self.Szz += (z * z).sum(0)
        self.So += o.sum(0)
        self.Szo += z.T @ o
        self.Soo += o.T @ o
        f = fired[fired >= 0]
        self.fired += torch.bincount(f, minlength=len(self.fired)).cpu()
        self.ov_g += pattern_overlap(A_lorsa.float(), A_orig.float()).double().cpu()
        self.ov_m += pattern_overlap(A_orig.float(), A_orig.float()).double().cpu()
        self.n_rows += A_orig.shape[0] * (A_orig.shape[-1] - 1)

    def projected(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The sums over tokens of p [H, M], z p [H, M] and p p^T [H, M, M], from those of zo."""
        M, dh, H = self.U.shape
        Sp = torch.einsum("me,meh->hm", self.So.view(M, dh), self.U)
        Szp = torch.einsum("hme,meh->hm", self.Szo.view(H, M, dh), self.U)
        Q = self.Soo.view(M, dh, M, dh)
        chunks = [self.U[..., c:c + self.chunk] for c in range(0, H, self.chunk)]  # [M, dh, Hc] each
        Spp = torch.cat([torch.einsum("meh,menf,nfh->hmn", U, Q, U) for U in chunks])
        return Sp, Szp, Spp

    def result(self, heads_per_group: int, cfg: CorrespondConfig, model: str, layer: int) -> Correspondence:
        """Each head's matches, from the moments."""
        if self.T < 2:
            raise BadInputError("the sample has fewer than 2 tokens after BOS; use more or longer sequences")
        T, (M, _, H) = self.T, self.U.shape
        Sp, Szp, Spp = self.projected()
        mz, mp = self.Sz / T, Sp / T  # [H], [H, M]
        var_z = self.Szz / T - mz ** 2
        cov_zp = Szp / T - mz[:, None] * mp
        cov_pp = Spp / T - mp[:, :, None] * mp[:, None, :]
        singles = subset_r2(cov_zp, cov_pp, var_z, torch.arange(M)[:, None])  # [H, M]
        k_max = min(cfg.few, M)
        best_few = torch.zeros(H, dtype=torch.float64)
        best_set = torch.full((H, k_max), -1, dtype=torch.long)
        for k in range(1, k_max + 1):
            sets = torch.tensor(list(itertools.combinations(range(M), k)))  # [S, k]
            r2 = subset_r2(cov_zp, cov_pp, var_z, sets)  # [H, S]
            v, i = r2.max(1)
            better = v > best_few + 1e-12
            best_few = torch.where(better, v, best_few)
            best_set[better] = torch.nn.functional.pad(sets[i[better]], (0, k_max - k), value=-1)
        all_r2 = subset_r2(cov_zp, cov_pp, var_z, torch.arange(M)[None])[:, 0]
        ov_g = (self.ov_g / self.n_rows).float()  # [G, M]
        top = singles.topk(min(cfg.top, M), dim=1)
        heads = []
        for h in range(H):
            g = h // heads_per_group
            heads.append(HeadMatch(
                head=h, kind=classify(float(top.values[h, 0]), float(best_few[h]), int(self.fired[h]), cfg.share),
                heads=top.indices[h].tolist(), r2=[round(float(x), 5) for x in top.values[h]],
                few_heads=[m for m in best_set[h].tolist() if m >= 0], few_r2=round(float(best_few[h]), 5),
                all_r2=round(float(all_r2[h]), 5), pattern_head=int(ov_g[g].argmax()),
                pattern_overlap=round(float(ov_g[g].max()), 5), fired=int(self.fired[h])))
        return Correspondence(model, layer, T, cfg, heads, (self.ov_m / self.n_rows).float().tolist(),
                              ov_g.tolist())


# ---------------------------------------------------------------------------------------------------------
# One pass over the sample
# ---------------------------------------------------------------------------------------------------------


def layer_points(layer: int) -> list[str]:
    from .hooks import hook_name

    return [hook_name(layer, p) for p in ("attn.in", "attn.z", "attn.pattern")]


def add_batch(moments: Moments, model, layer: int, cache: dict, z: torch.Tensor | None = None) -> None:
    """Feed one batch's captures (`layer_points`) of ``layer`` to ``moments`` (position 0 left out); ``z``: the
    Lorsa's head activations [B, n, H] on them, where the caller has them already."""
    from .hooks import hook_name

    lorsa = model.lorsas[layer]
    x = cache[hook_name(layer, "attn.in")].float()  # [B, n, d]
    z = lorsa.head_activations(x) if z is None else z  # [B, n, H]
    code = lorsa.code_of(z)
    fired = torch.where(code.values > 0, code.indices, -1)[:, 1:]  # [B, n-1, K]
    zo = cache[hook_name(layer, "attn.z")][:, 1:]  # [B, n-1, M, dh]
    moments.add(z[:, 1:].flatten(0, 1).cpu(), zo.flatten(0, 1).cpu(), fired.flatten(0, 1).cpu(),
                lorsa.patterns(x).cpu(), cache[hook_name(layer, "attn.pattern")].cpu())


def new_moments(model, layer: int) -> Moments:
    lorsa = model.lorsas[layer]
    return Moments(lorsa.W_O, lorsa.cfg.n_qk, model.adapter.W_O(layer)[0])


@torch.no_grad()
def correspond(model, layer: int, cfg: CorrespondConfig | None = None, source=None,
               progress: bool = False) -> Correspondence:
    """Every Lorsa head of ``layer`` matched to the original heads (module docstring) on ``cfg.n_seqs``
    held-out sequences (``source``: an activations source; default: the model's held-out data).  ``model``: a
    ReplacementModel, or anything with its ``adapter`` and ``lorsas`` {layer: Lorsa} (no transcoder is read)."""
    from .activations import default_source

    cfg = cfg or CorrespondConfig()
    a = model.adapter
    if layer not in model.lorsas:
        have = ", ".join(map(str, sorted(model.lorsas))) or "none"
        raise BadInputError(f"no Lorsa for layer {layer} (layers with one: {have})")
    if cfg.n_seqs < 1 or not 0 < cfg.share <= 1 or cfg.few < 1:
        raise BadInputError("n_seqs and few must be at least 1 and share in (0, 1]")
    seq_len = min(cfg.seq_len, a.context)
    cfg = replace(cfg, seq_len=seq_len)  # what was read, as correspond.json records it
    source = source or default_source(a, seq_len, cfg.seed, heldout=True)
    moments = new_moments(model, layer)
    for b in progress_bar(range(math.ceil(cfg.n_seqs / cfg.batch_size)), "correspond", not progress):
        ids = source.batch(20_000 + b, min(cfg.batch_size, cfg.n_seqs - b * cfg.batch_size))[:, :seq_len]
        cache = a.run(ids.to(a.device), capture=layer_points(layer)).cache
        add_batch(moments, model, layer, cache)
    return moments.result(model.lorsas[layer].cfg.heads_per_group, cfg, a.name, layer)


# ---------------------------------------------------------------------------------------------------------
# Summary chart (a DOT bar chart: graphviz renders it to PNG, no plotting library needed)
# ---------------------------------------------------------------------------------------------------------

KIND_LABELS = {"one": "one head", "few": "a few heads", "spread": "spread", "dead": "dead (never fires)"}
KIND_COLOURS = {"one": "#2b7bba", "few": "#7fb3d5", "spread": "#e67e22", "dead": "#bbbbbb"}


def histogram_dot(series: dict[str, dict[str, int]], title: str, width: int = 360) -> str:
    """A horizontal bar chart of kind counts, one block of bars per series ({name: {kind: count}}), as DOT.
    Bars are shares of the live heads (one, few, spread); the dead heads are counted apart."""
    from html import escape

    rows = [f'<TR><TD COLSPAN="3"><B>{escape(title)}</B></TD></TR>']
    for name, counts in series.items():
        live = sum(counts.get(k, 0) for k in KINDS if k != "dead")
        rows.append(f'<TR><TD COLSPAN="3" ALIGN="LEFT"><B>{escape(name)}</B>: {live} live heads '
                    f'({counts.get("dead", 0)} dead)</TD></TR>')
        for k in KINDS[:-1]:
            v = counts.get(k, 0)
            w = min(width - 1, max(1, round(width * v / max(1, live))))
            bar = (f'<TABLE BORDER="0" CELLPADDING="0" CELLSPACING="0"><TR><TD WIDTH="{w}" HEIGHT="14" FIXEDSIZE="TRUE" '
                   f'BGCOLOR="{KIND_COLOURS[k] if v else "white"}"></TD><TD WIDTH="{width - w}" HEIGHT="14" '
                   f'FIXEDSIZE="TRUE" BGCOLOR="#f2f2f2"></TD></TR></TABLE>')
            rows.append(f'<TR><TD ALIGN="RIGHT">{KIND_LABELS[k]}</TD><TD>{bar}</TD>'
                        f'<TD ALIGN="LEFT">{v} ({v / max(1, live):.0%})</TD></TR>')
    table = '<TABLE BORDER="0" CELLSPACING="3">' + "".join(rows) + "</TABLE>"
    return f"digraph correspond {{\n  graph [bgcolor=white];\n  node [shape=plaintext, fontname=Helvetica];\n  chart [label=<{table}>];\n}}\n"
