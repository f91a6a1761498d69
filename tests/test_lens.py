"""The words under a node's id (graphs/lens.py): a unit's logit lens against the model's own final norm and
unembedding, a family's (its summed direction's), a head's key token, and the boxes, legends and files that carry
them."""
from __future__ import annotations

import pytest
import torch

from graphs.graph import Node, NodeKind
from graphs.lens import key_position, key_share
from replacement.dashboards import top_logits


def _model_reads(adapter, w: torch.Tensor) -> torch.Tensor:
    """[V] the demeaned logits the model's own final norm and unembedding give direction w, less what they give the
    zero vector (a LayerNorm's bias): (W_U (gamma * P w)) / s, s > 0 the norm's scale of w."""
    with torch.no_grad():
        U = adapter.unembedding
        logits = U(adapter.final_norm(w[None]))[0] - U(adapter.final_norm(torch.zeros_like(w)[None]))[0]
    return logits - logits.mean()


def test_lens_ranks_tokens_as_the_model_reads_the_direction(adapter):
    from replacement.norms import is_layernorm, norm_weight

    torch.manual_seed(3)
    W = torch.randn(6, adapter.d_model)
    k = 5
    ids, vals = top_logits(W, norm_weight(adapter.final_norm), adapter.unembedding.weight.detach(),
                           is_layernorm(adapter.final_norm), k, chunk=4, demean=True)  # two chunks
    assert ids.shape == vals.shape == (6, k)
    for w, row_ids, row_vals in zip(W, ids, vals):
        real = _model_reads(adapter, w)
        assert row_ids.tolist() == real.topk(k).indices.tolist()
        ratio = row_vals / real[row_ids]  # the norm's scale of w, the same for every token
        assert (ratio > 0).all() and torch.allclose(ratio, ratio[0].expand(k), rtol=1e-4)


def test_lens_leaves_excluded_tokens_out(llama_adapter):
    from replacement.norms import norm_weight

    a = llama_adapter
    torch.manual_seed(4)
    W = torch.randn(3, a.d_model)
    args = (W, norm_weight(a.final_norm), a.unembedding.weight.detach(), False, 4)
    ids, vals = top_logits(*args, demean=True)
    barred = ids[:, 0].tolist()  # every row's top token
    ids2, vals2 = top_logits(*args, exclude=barred, demean=True)
    assert not set(ids2.flatten().tolist()) & set(barred)
    for r in range(3):  # the others keep their values: the mean is still over the whole vocabulary
        for t, v in zip(ids2[r].tolist(), vals2[r].tolist()):
            if t in ids[r].tolist():
                assert abs(v - vals[r, ids[r].tolist().index(t)].item()) < 1e-5


def test_key_position_is_where_the_z_pattern_gives_most():
    head = Node("h", NodeKind.LORSA, 0, 3, 0, z_pattern=[0.1, -2.0, 1.5, 0.0])
    assert key_position(head) == 2  # the largest entry: key 1 takes activation away
    assert key_share(head) == pytest.approx(1.5 / 1.6)  # of the positive entries
    assert key_share(Node("g", NodeKind.LORSA, 0, 3, 0, z_pattern=[0.4, 0.3, 0.3])) == pytest.approx(0.4)
    assert key_share(Node("f", NodeKind.TRANSCODER, 0, 3, 0)) == 0.0
    assert key_position(Node("f", NodeKind.TRANSCODER, 0, 3, 0)) is None


def test_traced_graph_names_what_its_units_write(saved_model, tmp_path):
    """On a traced graph: each kept unit's lens is its own output direction's (against the model's reading),
    the boxes carry it (features) or the key token (heads), a family's is its summed direction's, and graph.json
    keeps them."""
    from graphs.pipeline import trace_graphs
    from graphs.export import from_dict, to_dict
    from graphs.families import collapse, find_families, output_directions
    from graphs.layout import MAX_GIST_CHARS, box_label, quoted
    from graphs.layout import one_line
    from graphs.validate import check_graph_dict
    from replacement.assemble import ReplacementModel
    from replacement.models import load_model
    from replacement.tokenizer import token_text

    adapter = load_model(str(saved_model))
    model = ReplacementModel.load(adapter, None, "lorsa")
    ids = adapter.tokenize("the cat sat on the mat. 1 + 2 =")
    _, graph = trace_graphs(model, ids, max_feature_nodes=None)
    units = [n for n in graph.node_list if n.type in (NodeKind.LORSA, NodeKind.TRANSCODER)]
    assert units and all(n.lens and len(n.lens) == 3 for n in units)
    specials = adapter.tokenizer.all_special_ids  # never listed (graphs/lens.py)
    assert specials
    for n, w in zip(units, output_directions(model, units)):
        real = _model_reads(adapter, w)
        real[specials] = -torch.inf
        assert [t for t, _ in n.lens] == [token_text(adapter.tokenizer, int(i)) for i in real.topk(3).indices]
        lines = box_label(graph, n).split("\n")
        assert len(lines) == 3
        if n.type == NodeKind.TRANSCODER:
            assert lines[2] == "\u2192" + quoted(one_line(n.lens[0][0], MAX_GIST_CHARS))
        else:
            z = torch.tensor(n.z_pattern)
            key, share = int(z.argmax()), float(z.max() / z.clamp(min=0).sum())
            assert lines[2] == "\u2190" + quoted(one_line(graph.tokens[key], MAX_GIST_CHARS)) + \
                ("+" if share < 0.5 else "")
    fams = graph.families()
    assert fams  # the random replacements' heads at the last position group
    collapsed = collapse(graph, fams)
    for f in fams:  # a family's lens: its members' directions summed, weighted by their activations
        members = [graph.node(m) for m in f.members]
        summed = sum(m.activation * w for m, w in zip(members, output_directions(model, members)))
        real = _model_reads(adapter, summed)
        real[specials] = -torch.inf
        node = collapsed.node(f.id)
        assert [t for t, _ in node.lens] == [token_text(adapter.tokenizer, int(i)) for i in real.topk(3).indices]
        assert all(m.family_lens == node.lens for m in members)
        assert box_label(collapsed, node).split("\n")[2][0] in "\u2190\u2192"
    d = to_dict(graph)
    check_graph_dict(d)
    again = from_dict(d)
    assert [(again.node(n.id).lens, again.node(n.id).family_lens) for n in units] == \
        [(n.lens, n.family_lens) for n in units]
    find_families(graph, model)  # grouping again clears the families' lenses (the next add_lens sets them)
    assert all(n.family_lens is None for n in units)


def test_query_prints_a_node_and_a_family_lens(saved_model, tmp_path):
    """`circuits query --node` on a written graph: a unit's lens line and a family's, from graph.json alone."""
    import subprocess
    import sys

    from graphs.pipeline import trace_graphs
    from graphs.export import write_json
    from replacement.assemble import ReplacementModel
    from replacement.models import load_model

    adapter = load_model(str(saved_model))
    model = ReplacementModel.load(adapter, None, "lorsa")
    _, graph = trace_graphs(model, adapter.tokenize("the cat sat on the mat. 1 + 2 ="), max_feature_nodes=None)
    path = write_json(graph, tmp_path / "graph.json")
    unit = next(n for n in graph.node_list if n.lens)
    fam = graph.families()[0]
    for node, lens, words in ((unit.id, unit.lens, "its output raises"),
                              (fam.id, graph.node(fam.members[0]).family_lens, "its summed output raises")):
        r = subprocess.run([sys.executable, "-c", "from cli.main import circuits; circuits()", "query", str(path),
                            "--node", node], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        line = next(x for x in r.stdout.splitlines() if words in x)
        assert line.split(": ", 1)[1] == ", ".join(f"{t!r} {v:+.3g}" for t, v in lens)


def test_legends_explain_the_third_line_with_the_graphs_strongest_examples(saved_model):
    """The DOT legend and the page's name the strongest head's and feature's gist (of the picture each opens on:
    with families as one node, the collapsed graph's); a graph whose features carry no lens (a graph.json from
    before) says nothing about features' third lines."""
    import html

    from graphs.pipeline import trace_graphs
    from graphs.export import to_dot
    from graphs.html import to_html
    from graphs.layout import gist
    from replacement.assemble import ReplacementModel
    from replacement.models import load_model

    adapter = load_model(str(saved_model))
    model = ReplacementModel.load(adapter, None, "lorsa")
    _, graph = trace_graphs(model, adapter.tokenize("the cat sat on the mat. 1 + 2 ="), max_feature_nodes=None)
    head = max(graph.nodes(type="lorsa"), key=lambda n: n.influence)
    feature = max(graph.nodes(type="transcoder"), key=lambda n: n.influence)
    dot, page = to_dot(graph, expand_families=True), to_html(graph, expand_families=True)
    for words in (f"{gist(graph, head)} the token head L{head.layer}.H{head.index} takes",
                  f"{gist(graph, feature)} the token feature L{feature.layer}.F{feature.index}'s output raises"):
        assert words.replace('"', '\\"') in dot and html.escape(words) in page
    if graph.families():  # the page opens on the families as one node, and its legend names their examples
        from graphs.layout import gist_examples

        assert html.escape("; ".join(gist_examples(graph.collapsed()))) in to_html(graph)
    for n in graph.node_list:
        n.lens = None
    assert "output raises" not in to_dot(graph, expand_families=True) and "head L" in to_dot(graph, expand_families=True)


def test_drawn_qk_pair_is_at_the_key_the_third_line_names():
    """A head with QK pairs at two keys, the stronger at key 0 but its z pattern's peak at key 1: the picture's
    dashed pair is the key-1 one (the key its ←"token" names); without a pattern, the strongest."""
    from graphs.graph import AttributionGraph, QKEntry, QKPair
    from graphs.layout import drawn_qk

    nodes = [Node.make(NodeKind.EMBEDDING, -1, 0, p, activation=1.0) for p in range(3)]
    head = Node.make(NodeKind.LORSA, 0, 0, 2, activation=1.0, z_pattern=[0.1, 0.7, 0.2])
    head.qk = [QKEntry(0, 0.2, pairs=[QKPair("emb@2", "emb@0", 5.0)]),
               QKEntry(1, 0.7, pairs=[QKPair("emb@2", "emb@1", 1.5)])]
    g = AttributionGraph("a b c", ["a", "b", "c"], [1, 2, 3], nodes + [head], [])
    ids = {n.id for n in g.node_list}
    assert [(p.key, p.weight) for p in drawn_qk(g, ids)] == [("emb@1", 1.5)]
    head.z_pattern = None
    assert [(p.key, p.weight) for p in drawn_qk(g, ids)] == [("emb@0", 5.0)]
