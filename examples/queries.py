"""Querying a graph from Python: load it, strongest paths, Lorsa heads with their QK pairs, positions, networkx.

    python examples/queries.py [graph.json]      (default: traces `36 + 62 =` on llama first)
"""
from __future__ import annotations

from pathlib import Path

import networkx as nx

import graphs


def main(path: str | None = None) -> None:
    if path is None:
        path = "traces/36-62/graph.json"
        if not Path(path).is_file():
            from cli.trace import trace

            trace.main(["36 + 62 =", "--model", "llama", "--format", "json", "--out", "traces/36-62"], standalone_mode=False)
    g = graphs.load(path)  # 1. load
    print(g)
    target = g.target  # the logit traced for (trace's --target, else the top one)
    print(f"\ntop 10 paths to {target.label!r}:")  # 2. strongest paths
    for strength, p in g.top_paths(k=10):
        print(f"  {strength:.4f}  " + " -> ".join(p))
    print("\nLorsa heads in layer 1 and their strongest QK pairs:")  # 3. heads + QK pairs
    for head in g.nodes(type="lorsa", layer=1):
        pairs = g.qk_pairs(head)[:2]
        desc = "; ".join(f"{e.query} x {e.key} = {e.weight:+.3f}" for e in pairs) or "(no QK pairs kept)"
        print(f"  {head.id:<22} act {head.activation:.3f}  {desc}")
    last = len(g.tokens) - 1
    print(f"\nnodes at the last position ({g.tokens[last]!r}):")  # 4. by position
    for n in g.nodes(position=last):  # with what a head or feature writes, in tokens (its logit lens)
        print(f"  {n.type:<11} {n.id:<22} {', '.join(repr(t) for t, _ in n.lens or ())}")
    G = g.to_networkx()  # 5. networkx
    first = g.nodes(type="embedding")[0]
    G2 = G.copy()
    for a, b, d in G2.edges(data=True):
        d["cost"] = 1.0 / (abs(d["weight"]) + 1e-9)
    if nx.has_path(G2, first.id, target.id):
        print(f"\ncheapest path (cost 1/|w|) {first.id} -> {target.id}: {nx.shortest_path(G2, first.id, target.id, weight='cost')}")
    print(f"ancestors of {target.id}: {len(nx.ancestors(G, target.id))} nodes")


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("graph", nargs="?", help="a graph.json or a trace's folder (default: trace `36 + 62 =` on llama "
                                             "first)")
    graph = ap.parse_args().graph
    if graph is not None and not (Path(graph).is_file() or (Path(graph) / "graph.json").is_file()):
        ap.error(f"no graph file {graph!r}")
    from replacement.errors import run_script

    run_script(lambda: main(graph))
