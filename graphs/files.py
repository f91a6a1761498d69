"""The files a graph is written as: which formats there are, what each needs, and writing them all at once.

    json  the graph (`graphs.export.write_json`, the schema's format)
    dot   the drawing's source (nop2: nodes and edges pinned where the grid puts them)
    svg   \\ rendered from the DOT by graphviz's ``dot``, so they need it installed (and the DOT written first)
    png   /
    html  the interactive page, with the dashboards of its features when given
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

from replacement.errors import BadInputError

from .graph import AttributionGraph
from .layout import DEFAULT_DRAW_NODES

FORMATS = ("json", "dot", "svg", "png", "html")
RENDERED = ("svg", "png")


def parse_formats(value: str, allowed: tuple[str, ...] = FORMATS) -> list[str]:
    """``"json,svg"`` -> ``["json", "svg"]``; `BadInputError` for an unknown or empty list, or for a rendered
    format when graphviz's ``dot`` is not installed."""
    fmts = [f.strip() for f in value.split(",") if f.strip()]
    bad = [f for f in fmts if f not in allowed]
    if bad or not fmts:
        raise BadInputError(f"unknown format(s) {', '.join(bad) or repr(value)}; choose from {', '.join(allowed)}")
    if set(RENDERED) & set(fmts) and shutil.which("dot") is None:
        without = ",".join(f for f in allowed if f not in RENDERED)
        raise BadInputError(f"--format {','.join(fmts)} needs graphviz's `dot`, which is not installed "
                            f"(apt-get install graphviz); --format {without} needs none")
    return fmts


def write_all(graph: AttributionGraph, base: str | Path, formats: list[str], draw_nodes: int = DEFAULT_DRAW_NODES,
              dashboards: Callable[[], object] | None = None, expand_families: bool = False) -> dict[str, Path]:
    """Write ``graph`` as ``base.<format>`` for each of ``formats``; returns {format: path} in FORMATS order.

    A DOT is written whenever svg or png is asked for (they are rendered from it), so the result may hold a
    ``"dot"`` that was not asked for.  ``dashboards``: called (only if html is asked for) for the page's
    feature dashboards.  ``expand_families``: the pictures draw each family's members rather than one node per
    family (the page opens so too; its "families as one node" box switches between the two).  A failed rendering
    is a `BadInputError`, raised once the other formats are written (graphviz missing: the JSON is kept)."""
    from .export import Rendering, RenderError, write_dot, write_json

    base, written, renderings, failed = Path(base), {}, {}, None
    try:
        if {"dot", *RENDERED} & set(formats):  # first, so that dot renders while the other files are written
            written["dot"] = write_dot(graph, base.with_suffix(".dot"), draw_nodes, expand_families)
            for f in (f for f in RENDERED if f in formats):
                try:
                    renderings[f] = Rendering(written["dot"], f)
                except RenderError as e:  # no graphviz: said at the end, once the other files are written
                    failed = failed or e
        if "json" in formats:
            written["json"] = write_json(graph, base.with_suffix(".json"))
        if "html" in formats:
            from .html import write_html

            dash = dashboards() if dashboards is not None else None
            written["html"] = write_html(graph, base.with_suffix(".html"), dash, draw_nodes, expand_families)
        for f, r in renderings.items():
            written[f] = r.wait()
        if failed is not None:
            raise failed
    except RenderError as e:
        raise BadInputError(str(e)) from None
    finally:
        for r in renderings.values():
            r.cancel()  # those not waited for (an error on the way); no-op for the finished ones
    return {f: written[f] for f in FORMATS if f in written}


__all__ = ["FORMATS", "RENDERED", "parse_formats", "write_all"]
