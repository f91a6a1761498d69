"""What `trace` builds, as one library call: attribute a prompt through a replacement model under a feature budget,
prune the graph, find its families and give each kept node its logit lens.

    from graphs.pipeline import trace_graphs
    from replacement.assemble import ReplacementModel
    from replacement.models import load_model

    model = ReplacementModel.load(load_model("llama"))
    whole, graph = trace_graphs(model, "36 + 62 =")     # graph: what `trace` writes to graph.json

`attribute` and `prune` with their own defaults give another graph: no feature budget, no file caps, every head's
QK split computed before pruning.  Which nodes pruning keeps, and so which heads a family gathers, depends on
every setting here, so `circuits patch --family` builds its graph here too: a family id from trace's graph.json
names the same members.
"""
from __future__ import annotations

from .memory_estimate import DEFAULT_MAX_FEATURE_NODES
from .families import DEFAULT_FAMILIES
from .prune import EDGE_THRESHOLD, NODE_THRESHOLD


def trace_graphs(model, prompt, target: str | int | None = None, qk: bool = True, qk_heads: int | None = None,
                 node_threshold: float = NODE_THRESHOLD, edge_threshold: float = EDGE_THRESHOLD,
                 max_nodes: int | None = None, bos: str = "keep",
                 max_feature_nodes: int | None = DEFAULT_MAX_FEATURE_NODES, full: bool = False,
                 qk_reference: str = "mean", families=DEFAULT_FAMILIES, progress: bool = False,
                 check_memory: bool = True):
    """(the attributed graph, the pruned graph with its families and lens) as `trace` builds them, with its
    defaults.  ``prompt``: text or token ids [1, n]; ``target``: a token (text or id) whose logit the graph must
    hold and end at; ``max_feature_nodes``: the features expanded, most influential first (None: all); ``full``: no file caps
    (by default the pruned graph keeps at most 1,500 features and 80,000 edges); ``qk_reference``: mean,
    runner_up or none; ``families``: the rule to group by (`FamilyConfig`), None for none.  A graph holding NaN or
    infinite values (NaN weights in the model or its replacements) raises `BadGraphError`."""
    from .attribution import attribute
    from .families import find_families
    from .lens import add_lens
    from .prune import file_caps, prune
    from .validate import check_finite

    whole = attribute(model, prompt, target=target, qk=qk, qk_heads=qk_heads, progress=progress, bos=bos,
                      max_feature_nodes=max_feature_nodes, qk_reference=None if qk_reference == "none" else qk_reference,
                      qk_defer=True, check_memory=check_memory)  # qk_defer: only the heads pruning keeps are explained
    graph = prune(whole, node_threshold, edge_threshold, *file_caps(max_nodes, full))
    if families is not None:  # those of the pruned graph's heads and features: the ones the pictures draw
        find_families(graph, model, families, also=whole)  # the whole graph's nodes get the same marks
    add_lens(graph, model)  # what each kept head, feature and family writes, in tokens: the pictures' third lines
    check_finite(graph)  # NaN or infinite weights: one line, before anything is written
    return whole, graph
