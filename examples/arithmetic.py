"""Addition, traced: `36 + 62 =` on the bundled `llama` (the paper's Figure 5 setting).

    python examples/arithmetic.py [--out examples/out]

Shows the Lorsa heads at the last position whose z patterns attend to the operand positions (the operand
movers), the transcoder features downstream of them and the ` 98` logit; confirms the top two movers by path
patching; and draws an operand plot: a 100 x 100 heat map of one head's activation over `a + b =`, as a PNG and
as an SVG that labels its axes, title and colour scale (the PNG inside it).
"""
from __future__ import annotations

import argparse
import base64
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


def write_labelled_svg(path: Path, png: Path, title: str, scale: float, n: int = 100) -> Path:
    """``png`` (an n x n heat map, `write_png`) inside an SVG with its title, its axes (a down, b across, ticks at
    0, 50 and n - 1) and its colour scale (blue -scale, white 0, red +scale)."""
    side, left, top = 400, 60, 50
    at = lambda k: (k + 0.5) * side / n  # noqa: E731  the centre of cell k
    ticks = [0, n // 2, n - 1]
    parts = [f'<text x="{left + side / 2}" y="22" text-anchor="middle" font-size="14">{title}</text>',
             f'<image x="{left}" y="{top}" width="{side}" height="{side}" style="image-rendering:pixelated" '
             f'href="data:image/png;base64,{base64.b64encode(png.read_bytes()).decode()}"/>',
             f'<rect x="{left}" y="{top}" width="{side}" height="{side}" fill="none" stroke="black"/>',
             f'<text x="{left + side / 2}" y="{top + side + 36}" text-anchor="middle" font-size="13">b (second operand)</text>',
             f'<text x="18" y="{top + side / 2}" text-anchor="middle" font-size="13" '
             f'transform="rotate(-90 18 {top + side / 2})">a (first operand)</text>']
    for k in ticks:
        parts += [f'<text x="{left + at(k)}" y="{top + side + 16}" text-anchor="middle" font-size="11">{k}</text>',
                  f'<text x="{left - 6}" y="{top + at(k) + 4}" text-anchor="end" font-size="11">{k}</text>']
    bar = left + side + 20
    parts += ['<defs><linearGradient id="z" x1="0" y1="0" x2="0" y2="1"><stop offset="0" stop-color="rgb(255,0,0)"/>'
              '<stop offset="0.5" stop-color="white"/><stop offset="1" stop-color="rgb(0,0,255)"/></linearGradient></defs>',
              f'<rect x="{bar}" y="{top}" width="14" height="{side}" fill="url(#z)" stroke="black"/>']
    for frac, label in ((0, f"+{scale:.3g}"), (0.5, "0"), (1, f"-{scale:.3g}")):
        parts.append(f'<text x="{bar + 18}" y="{top + frac * side + 4}" font-size="11">{label}</text>')
    w, h = bar + 70, top + side + 50
    svg = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" '
           f'font-family="sans-serif"><rect width="{w}" height="{h}" fill="white"/>' + "".join(parts) + "</svg>\n")
    path.write_text(svg)
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
    png = write_png(path, grid)
    write_labelled_svg(path.with_suffix(".svg"), png, f"lorsa.{layer}.{head}: its activation z at = of a + b =",
                       float(grid.abs().max()))
    return png


PROMPT, ANSWER = "36 + 62 =", " 98"


def analyse(out: str | Path = "examples/out", verbose: bool = True, plot: bool = True):
    """Trace the prompt, find the operand movers (graphs/circuits.py), check them and the 20 most influential
    heads by path patching, write the graph, its picture and the operand plot; returns (pruned graph, full
    graph, movers sorted by |graph effect|, patching figures, the PNG or None)."""
    from graphs.attribution import attribute
    from graphs.circuits import operand_movers
    from graphs.lens import add_lens
    from graphs.patching import graph_effects
    from graphs.prune import prune
    from replacement.assemble import ReplacementModel
    from replacement.models import load_model

    say = print if verbose else (lambda *a, **k: None)
    adapter = load_model("llama")
    model = ReplacementModel.load(adapter)
    ids = adapter.tokenize(PROMPT)
    toks = [adapter.tokenizer.decode([i]) for i in ids[0].tolist()]
    pos36, pos62, last = toks.index("36"), toks.index(" 62"), len(toks) - 1
    full = attribute(model, ids, target=ANSWER)
    graph = prune(full)
    add_lens(graph, model)  # the pictures' third lines: what each kept head reads, each feature writes
    logit = graph.logit(adapter.tokenizer.encode(ANSWER, add_special_tokens=False)[0])
    eff = graph_effects(full, logit.id)
    movers = sorted(operand_movers(full, [pos36, pos62], last), key=lambda m: -abs(float(eff[full.index[m.head.id]])))
    checks = patch_checks(model, ids, logit.index, full, [m.head for m in movers[:2]], eff)
    _report(say, toks, graph, full, logit, movers, checks, eff)
    _write(say, graph, Path(out))
    png = None
    if plot and movers:
        h = movers[0].head
        png = operand_plot(model, h.layer, h.index, Path(out) / "operand_plot.png")
        say(f"wrote {png} and {png.with_suffix('.svg')} (activation of {h.id.split('@')[0]} over a + b =, a down, "
            "b across; the SVG labels its axes and colour scale)")
    return graph, full, movers, checks, png


def patch_checks(model, ids, target: int, full, movers: list, eff) -> dict:
    """Path patching of ``movers``, and the graph vs path patching agreement over the 20 most influential heads
    (their correlation; signs for the 5 most influential, and for the 5 largest graph effects)."""
    from graphs.circuits import most_influential
    from graphs.graph import NodeKind
    from graphs.patching import PathPatcher, agreement, parse_component

    patcher = PathPatcher(model, ids, target, demean=True)
    checks = patcher.effects([parse_component(h.id) for h in movers])
    heads = most_influential(full, NodeKind.LORSA, 20)
    patched = torch.tensor([r.effect for r in patcher.effects([parse_component(h.id) for h in heads])])
    predicted = torch.tensor([float(eff[full.index[h.id]]) for h in heads])
    corr, signs, signs_largest = agreement(predicted, patched)
    return {"movers": checks, "corr": corr, "signs": signs, "signs_largest": signs_largest}


def _report(say, toks, graph, full, logit, movers, checks, eff) -> None:
    from graphs.circuits import downstream_features

    say(f"{PROMPT!r} -> {ANSWER!r} p={logit.prob:.3f}; replacement score {graph.scores['replacement_score']:.3f}")
    say("  (graph effects from the full graph, every active feature expanded; `trace` and `circuits patch --demean` "
        "expand the 1,500 most influential, so their figures differ in the last digits)")
    for m in movers[:6]:
        say(f"  operand mover {m.head.id}: {m.share:.0%} of its z pattern on {toks[m.pos]!r}; graph effect on "
            f"{ANSWER!r} {float(eff[full.index[m.head.id]]):+.3f}")
    say(f"  transcoder features downstream of the top movers: {downstream_features(full, [m.head for m in movers[:4]])[:8]}")
    for m, r in zip(movers, checks["movers"]):
        say(f"  path patching {m.head.id}: {ANSWER!r} logit change {r.effect:+.3f} (graph {float(eff[full.index[m.head.id]]):+.3f})")
    say(f"  20 most influential heads: correlation(graph, patching) = {checks['corr']:.3f}; signs agree for "
        f"{checks['signs']}/5 of the 5 most influential, {checks['signs_largest']}/5 of the 5 with the largest "
        "graph effects")


def _write(say, graph, out: Path) -> None:
    from graphs.files import write_all
    from replacement.errors import BadInputError

    try:
        say(f"wrote {write_all(graph, out / 'arithmetic', ['json', 'svg'])['svg']}")
    except BadInputError as e:  # no graphviz: the JSON and DOT are written all the same (graphs.files.write_all)
        say(f"note: {e}; wrote {out / 'arithmetic.json'} and {out / 'arithmetic.dot'}")

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="examples/out", help="output folder (default: examples/out, relative to the current folder; git ignores it at the repository root)")
    analyse(ap.parse_args().out)
