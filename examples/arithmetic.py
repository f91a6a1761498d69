"""Addition, traced: `36 + 62 =` on the bundled `llama` (the paper's Figure 5 setting).

    python examples/arithmetic.py [--out examples/out]

Shows the Lorsa heads at the last position whose z patterns attend to the operand positions (the operand
movers), the transcoder features downstream of them and the ` 98` logit; confirms the top two movers by path
patching; and draws an operand plot: a 100 x 100 heat map (PNG) of one head's activation over `a + b =`.
"""
from __future__ import annotations

import argparse
import struct
import zlib
from pathlib import Path

import torch


def write_png(path: Path, values: torch.Tensor) -> Path:
    """A heat map of a 2-D tensor as an RGB PNG (white = 0, red = positive, blue = negative), no dependencies."""
    v = values.float()
    m = float(v.abs().max()) or 1.0
    scale = 4  # pixels per cell
    rows = []
    for i in range(v.shape[0]):
        row = bytearray()
        for j in range(v.shape[1]):
            x = float(v[i, j]) / m
            r, g, b = (255, int(255 * (1 - x)), int(255 * (1 - x))) if x >= 0 else (int(255 * (1 + x)), int(255 * (1 + x)), 255)
            row += bytes((r, g, b)) * scale
        rows += [b"\x00" + bytes(row)] * scale

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    h, w = v.shape[0] * scale, v.shape[1] * scale
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(b"".join(rows), 9)) + chunk(b"IEND", b"")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png)
    return path


@torch.no_grad()
def operand_plot(model, layer: int, head: int, path: Path) -> Path:
    """Head activation (z) at the last position of `a + b =` for every a, b in 0..99."""
    from replacement.hooks import hook_name
    from replacement.tokenizer import number_token_ids

    a = model.adapter
    tok = a.tokenizer
    bare, spaced = number_token_ids(tok)
    plus, eq = tok.encode(" +", add_special_tokens=False)[0], tok.encode(" =", add_special_tokens=False)[0]
    lorsa = model.lorsas[layer]
    grid = torch.zeros(100, 100)
    for x in range(100):
        ids = torch.tensor([[tok.bos_token_id, bare[x], plus, spaced[y], eq] for y in range(100)])
        attn_in = a.run(ids, capture=[hook_name(layer, "attn.in")]).cache[hook_name(layer, "attn.in")]
        grid[x] = lorsa.head_activations(attn_in.float())[:, -1, head]
    return write_png(path, grid)


def analyse(out: str | Path = "examples/out", verbose: bool = True, plot: bool = True) -> dict:
    from graphs.attribution import attribute
    from graphs.export import RenderError, render, write_dot, write_json
    from graphs.patching import PathPatcher, agreement, graph_effects, parse_component
    from graphs.prune import prune
    from replacement.assemble import ReplacementModel
    from replacement.models import load_model

    say = print if verbose else (lambda *a, **k: None)
    adapter = load_model("llama")
    model = ReplacementModel.load(adapter)
    prompt = "36 + 62 ="
    ids = adapter.tokenize(prompt)
    tok = adapter.tokenizer
    toks = [tok.decode([i]) for i in ids[0].tolist()]
    pos36, pos62, last = toks.index("36"), toks.index(" 62"), len(toks) - 1
    full = attribute(model, ids, target=" 98")
    graph = prune(full, 0.8, 0.98)
    logit = graph.node(f"logit.{tok.encode(' 98', add_special_tokens=False)[0]}@{last}")
    say(f"{prompt!r} -> ' 98' p={logit.prob:.3f}; replacement score {graph.scores['replacement_score']:.3f}")
    # operand movers: last-position heads whose z pattern puts most of its mass on an operand position
    movers = []
    for h in full.nodes(type="lorsa", position=last):
        zp = torch.tensor(h.extra["z_pattern"]).abs()
        share = zp / zp.sum().clamp_min(1e-9)
        for p in (pos36, pos62):
            if share[p] > 0.5:
                movers.append((h, p, float(share[p])))
    eff = graph_effects(full, logit.id)
    movers.sort(key=lambda m: -abs(float(eff[full.index[m[0].id]])))
    for h, p, s in movers[:6]:
        say(f"  operand mover {h.id}: {s:.0%} of its z pattern on {toks[p]!r}; graph effect on ' 98' "
            f"{float(eff[full.index[h.id]]):+.3f}")
    downstream = sorted({e.target for h, _, _ in movers[:4] for e in full.outgoing(h.id) if e.target.startswith("tc.")})
    say(f"  transcoder features downstream of the top movers: {downstream[:8]}")
    patcher = PathPatcher(model, ids, logit.index, demean=True)
    checks = patcher.effects([parse_component(h.id) for h, _, _ in movers[:2]])
    for (h, _, _), r in zip(movers[:2], checks):
        say(f"  path patching {h.id}: ' 98' logit change {r.effect:+.3f} (graph {float(eff[full.index[h.id]]):+.3f})")
    # graph vs patching agreement over the most influential heads
    from graphs.prune import influence

    infl = influence(full)
    heads = sorted(full.nodes(type="lorsa"), key=lambda n: -float(infl[full.index[n.id]]))[:20]
    patched = torch.tensor([r.effect for r in patcher.effects([parse_component(h.id) for h in heads])])
    predicted = torch.tensor([float(eff[full.index[h.id]]) for h in heads])
    # heads in order of influence: signs for the 5 most influential, signs_largest for the 5 largest graph effects
    corr, signs, signs_largest = agreement(predicted, patched)
    say(f"  20 most influential heads: correlation(graph, patching) = {corr:.3f}; signs agree for {signs}/5 of the "
        f"5 most influential, {signs_largest}/5 of the 5 with the largest graph effects")
    out = Path(out)
    write_json(graph, out / "arithmetic.json")
    dot = write_dot(graph, out / "arithmetic.dot")
    try:
        say(f"wrote {render(dot, 'svg')}")
    except RenderError as e:
        say(f"note: {e}")
    png = None
    if plot and movers:
        h = movers[0][0]
        png = operand_plot(model, h.layer, h.index, out / "operand_plot.png")
        say(f"wrote {png} (activation of {h.id.split('@')[0]} over a + b =, a down, b across)")
    return {"movers": movers, "graph": graph, "full": full, "checks": checks, "corr": corr, "signs": signs,
            "signs_largest": signs_largest,
            "logit": logit, "png": png, "positions": (pos36, pos62, last)}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="examples/out")
    analyse(ap.parse_args().out)
