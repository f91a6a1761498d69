"""graphs/circuits.py on small hand-made graphs, against what each query means, worked out by hand."""
from __future__ import annotations

import pytest

from graphs.circuits import (circuit_nodes, downstream_features, heads_attending, induction_circuit, induction_heads,
                             induction_peak, most_influential, operand_movers, why_pairs, z_peak, z_share)
from graphs.graph import AttributionGraph, Edge, Node, QKContrast, QKEntry, QKPair


def _induction_graph(parallel: bool = False) -> AttributionGraph:
    """Tokens a b c a (positions 0-3); the answer b follows the earlier a, at key position 1.  Layer 0: a
    previous-token head at position 1 (reads position 0) and a head at position 3 reading its own token;
    layer 1: two heads at position 3 peaking at 1 (edges +2 and +1 into the logit), one peaking at 2 (+5)."""
    emb = [Node(f"emb@{p}", "embedding", -1, p, 10 + p) for p in range(4)]
    prev = Node("lorsa.0.4@1", "lorsa", 0, 1, 4, activation=1.0, z_pattern=[0.9, 0.1])
    own = Node("lorsa.0.5@3", "lorsa", 0, 3, 5, activation=1.0, z_pattern=[0.0, 0.1, 0.1, 0.8])
    pairs = [QKPair("emb@3", "emb@1", 0.5), QKPair("lorsa.0.5@3", "lorsa.0.4@1", -2.0)]
    strong = Node("lorsa.1.7@3", "lorsa", 1, 3, 7, activation=1.0, z_pattern=[0.1, 0.7, 0.1, 0.1],
                  qk=[QKEntry(1, 0.8, 3.0, pairs), QKEntry(2, 0.1, 0.2, [QKPair("emb@3", "emb@2", 9.0)])])
    weak = Node("lorsa.1.8@3", "lorsa", 1, 3, 8, activation=1.0, z_pattern=[0.0, 0.6, 0.2, 0.2])
    other = Node("lorsa.1.9@3", "lorsa", 1, 3, 9, activation=1.0, z_pattern=[0.0, 0.1, 0.8, 0.1])
    mlp = Node("tc.0.2@3", "transcoder", 0, 3, 2, activation=1.0)
    logit = Node("logit.11@3", "logit", 2, 3, 11, prob=0.9)
    edges = [Edge("lorsa.1.7@3", "logit.11@3", 2.0), Edge("lorsa.1.8@3", "logit.11@3", 1.0),
             Edge("lorsa.1.9@3", "logit.11@3", 5.0), Edge("emb@3", "lorsa.1.7@3", 1.0), Edge("emb@1", "lorsa.0.4@1", 1.0),
             Edge("lorsa.0.5@3", "tc.0.2@3", 1.0), Edge("emb@3", "lorsa.0.5@3", 1.0)]
    return AttributionGraph("a b c a", ["a", "b", "c", "a"], [10, 11, 12, 10],
                            emb + [prev, own, mlp, strong, weak, other, logit], edges)


def test_z_peak_and_share():
    h = Node("lorsa.1.7@3", "lorsa", 1, 3, 7, z_pattern=[0.1, -0.7, 0.2, 0.1])
    assert z_peak(h) == 2  # the largest entry: key 1 takes activation away (the rule the pictures and families use)
    assert z_peak(Node("lorsa.1.7@3", "lorsa", 1, 3, 7, z_pattern=[-0.1, -0.7, -0.2])) == 1  # none positive: size
    assert z_share(h, 1) == pytest.approx(0.7 / 1.1) and z_share(h, 0) == pytest.approx(0.1 / 1.1) and z_share(h, 9) == 0.0


def test_induction_heads_and_circuit():
    g = _induction_graph()
    # where to look: after the earlier "a" (ids 10 at 0 and 3) is 1; "c" (12 at 2) occurs nowhere before
    assert induction_peak(g) == 1 and induction_peak(g, 2) is None and induction_peak(g, 0) is None
    assert induction_peak(AttributionGraph("a a x a", ["a", "a", "x", "a"], [5, 5, 7, 5], [], [])) == 2  # the latest
    assert [h.id for h in heads_attending(g, 3, 1)] == ["lorsa.1.7@3", "lorsa.1.8@3"]
    assert [h.id for h in heads_attending(g, 3, 3)] == ["lorsa.0.5@3"]
    assert heads_attending(g, 3, 3, min_layer=1) == []
    # the head peaking at 2 has the strongest edge, but not at the key position asked for
    assert [h.id for h in induction_heads(g, "logit.11@3", 1)] == ["lorsa.1.7@3", "lorsa.1.8@3"]
    c = induction_circuit(g, "logit.11@3", 1)
    assert c.head.id == "lorsa.1.7@3" and c.peak == 1
    # pairs at key 1 only, strongest |weight| first: the layer-0 pair, then the embeddings'
    assert [(e.query, e.key) for e in c.pairs] == [("lorsa.0.5@3", "lorsa.0.4@1"), ("emb@3", "emb@1")]
    assert c.query.id == "lorsa.0.5@3" and c.query_source == 3 and c.query_reads_current  # it reads its own token
    assert c.key.id == "lorsa.0.4@1" and c.key_source == 0 and c.prev_head is c.key  # 0 = 1 - 1: previous token
    # k = 1: the strongest source of each, the strongest QK pair over every key position (emb@3 x emb@2, 9.0)
    # and the embeddings where those sit (3) or their heads attend most: 1 (lorsa.1.7), 2 (lorsa.1.9); with k = 2
    # also 0, where the previous-token head lorsa.0.4@1 attends
    embs = {"emb@0", "emb@1", "emb@2", "emb@3"}
    assert circuit_nodes(g, c.head, g.node("logit.11@3"), k=1) == {"lorsa.1.7@3", "logit.11@3", "lorsa.1.9@3"} | (
        embs - {"emb@0"})
    assert circuit_nodes(g, c.head, g.node("logit.11@3"), k=2) == {
        "lorsa.1.7@3", "logit.11@3", "lorsa.1.9@3", "lorsa.1.7@3", "lorsa.0.5@3", "lorsa.0.4@1"} | embs
    with pytest.raises(LookupError):
        induction_circuit(g, "logit.11@3", 0)


def test_query_side_that_does_not_carry_the_current_token():
    g = _induction_graph()
    g.node("lorsa.0.5@3").z_pattern = [0.0, 0.9, 0.0, 0.1]  # now it reads position 1, not its own token
    c = induction_circuit(g, "logit.11@3", 1)
    assert not c.query_reads_current and c.query_source == 1
    g.node("lorsa.0.4@1").z_pattern = [0.1, 0.9]  # the key side reads its own position: no previous-token head
    assert induction_circuit(g, "logit.11@3", 1).prev_head is None


def test_the_circuit_takes_the_pair_that_raises_the_key_over_the_others():
    """With a contrast at the key, the pairs are the contrast's that raise it, with their key node at that key and
    both nodes in the graph, largest first: the raw split's largest pair (the layer-0 heads', -2.0) lowers the raw
    score and is no reason to attend there; a pair naming a node at another key (emb@2), one that lowers the
    difference and one naming a node outside the graph are left out."""
    g = _induction_graph()
    entry = g.node("lorsa.1.7@3").qk[0]
    entry.contrast = QKContrast("mean", -1, 1.0, 2.0, [QKPair("emb@3", "emb@2", 3.0), QKPair("emb@3", "emb@1", 1.5),
                                                       QKPair("lorsa.0.5@3", "lorsa.0.4@1", -0.5),
                                                       QKPair("tc.0.9@3", "emb@1", 2.5), QKPair("emb@2", "emb@1", 0.25)])
    assert [(e.query, e.key, e.weight) for e in why_pairs(g, g.node("lorsa.1.7@3"), 1)] == [
        ("emb@3", "emb@1", 1.5), ("emb@2", "emb@1", 0.25)]
    c = induction_circuit(g, "logit.11@3", 1)
    assert c.query.id == "emb@3" and c.key.id == "emb@1" and c.query_reads_current and c.prev_head is None
    entry.contrast.pairs = [QKPair("emb@3", "emb@1", -1.0)]  # nothing raises it: the raw pairs, largest first
    assert [e.weight for e in why_pairs(g, g.node("lorsa.1.7@3"), 1)] == [-2.0, 0.5]


def test_operand_movers_downstream_and_influence():
    nodes = [Node("emb@0", "embedding", -1, 0, 1), Node("emb@1", "embedding", -1, 1, 2),
             Node("lorsa.0.1@2", "lorsa", 0, 2, 1, z_pattern=[0.6, 0.2, 0.2]),
             Node("lorsa.0.2@2", "lorsa", 0, 2, 2, z_pattern=[0.1, -0.8, 0.1]),
             Node("lorsa.0.3@2", "lorsa", 0, 2, 3, z_pattern=[0.5, 0.5, 0.0]),  # exactly half: not a mover
             Node("lorsa.0.4@1", "lorsa", 0, 1, 4, z_pattern=[0.9, 0.1]),  # not at the last position
             Node("tc.0.5@2", "transcoder", 0, 2, 5, activation=1.0), Node("logit.3@2", "logit", 1, 2, 3, prob=1.0)]
    edges = [Edge("lorsa.0.1@2", "tc.0.5@2", 1.0), Edge("lorsa.0.1@2", "logit.3@2", 1.0),
             Edge("lorsa.0.2@2", "logit.3@2", -3.0), Edge("tc.0.5@2", "logit.3@2", 4.0), Edge("emb@0", "lorsa.0.1@2", 1.0)]
    g = AttributionGraph("x + y", ["x", "+", "y"], [1, 2, 3], nodes, edges)
    movers = operand_movers(g, [0, 1], 2)
    assert [(m.head.id, m.pos) for m in movers] == [("lorsa.0.1@2", 0), ("lorsa.0.2@2", 1)]
    assert [m.share for m in movers] == pytest.approx([0.6, 0.8])
    assert downstream_features(g, [m.head for m in movers]) == ["tc.0.5@2"]
    # influence (normalised |weights| into the logit: lorsa.0.1 1/8, lorsa.0.2 3/8, tc 4/8; tc passes 4/8 on
    # to lorsa.0.1, all it reads): lorsa.0.1 1/8 + 4/8 = 5/8 > lorsa.0.2 3/8 > the others' 0
    assert [h.id for h in most_influential(g, "lorsa", 2)] == ["lorsa.0.1@2", "lorsa.0.2@2"]
    # once the nodes hold an influence (a pruned graph's, from its full graph), those rank them
    g.node("lorsa.0.3@2").influence, g.node("lorsa.0.1@2").influence = 0.9, 0.1
    assert [h.id for h in most_influential(g, "lorsa", 2)] == ["lorsa.0.3@2", "lorsa.0.1@2"]


def test_layout_places_a_node_above_the_logits_layer():
    """A read-in graph may put a feature above the logits' layer (malformed, but readable): the grid makes rows for
    it (it used to fail with an IndexError) and draws it above every other layer's row."""
    from graphs.layout import grid

    g = _induction_graph()
    high = Node("tc.5.1@3", "transcoder", 5, 3, 1, activation=1.0)
    g = AttributionGraph(g.prompt, g.tokens, g.token_ids, g.node_list + [high], [])
    placed = grid(g, g.node_list)
    assert set(placed.xy) == {n.id for n in g.node_list}
    assert placed.xy["tc.5.1@3"][1] > max(y for i, (x, y) in placed.xy.items() if i not in ("tc.5.1@3", "logit.11@3"))


def test_long_tokens_in_narrow_columns_get_staggered_labels():
    """Where a token does not fit its narrow column, every other column's labels move LABEL_STEP further out, and
    each label may reach over its neighbours' columns: " truth" is written whole, and no two labels on one line
    overlap (LABEL_CHAR_W points a character)."""
    from graphs.layout import LABEL_CHAR_W, LABEL_STEP, grid

    toks = ["<s>", " It", " is", " a", " truth", " universally", " acknowledged", ",", " that"]
    nodes = [Node(f"emb@{p}", "embedding", -1, p, p) for p in range(len(toks))]
    g = AttributionGraph("".join(toks), toks, list(range(len(toks))), nodes, [])
    placed = grid(g, nodes)
    assert [dy for *_, dy in placed.columns] == [LABEL_STEP * (c % 2) for c in range(len(toks))]
    assert [label.split("\n")[1] for _, label, _ in placed.columns][4:6] == ['" truth"', '" universally"']
    for odd in (0, 1):
        line = [(x, LABEL_CHAR_W * len(label.split("\n")[1])) for x, label, dy in placed.columns if (dy > 0) == odd]
        for (x0, w0), (x1, w1) in zip(line, line[1:]):
            assert x0 + w0 / 2 <= x1 - w1 / 2, (x0, w0, x1, w1)
    low, high = placed.header_y
    assert low - LABEL_STEP > 0 and high + LABEL_STEP < placed.height  # the outer labels inside the picture


def test_layout_gives_a_run_of_empty_positions_one_column():
    """ELIDE_RUN (3) or more positions in a row where nothing is drawn share one EMPTY_COL_W column labelled with
    their span (a 127-token prompt drew 127 columns, mostly empty); a shorter run keeps a column each; the drawn
    positions keep their own, in order."""
    from graphs.layout import COL_GAP, ELIDE_RUN, EMPTY_COL_W, NARROW_W, column_spans, grid

    assert ELIDE_RUN == 3
    assert column_spans(12, {0, 1, 5, 11}) == [(0, 0), (1, 1), (2, 4), (5, 5), (6, 10), (11, 11)]
    assert column_spans(6, {0, 3}) == [(0, 0), (1, 1), (2, 2), (3, 3), (4, 4), (5, 5)]  # runs of two stay
    assert column_spans(5, set()) == [(0, 4)] and column_spans(4, {3}) == [(0, 2), (3, 3)]
    toks = [f" t{p}" for p in range(12)]
    nodes = [Node(f"emb@{p}", "embedding", -1, p, p) for p in (0, 1, 5, 11)]
    g = AttributionGraph("".join(toks), toks, list(range(12)), nodes, [])
    placed = grid(g, nodes)
    labels = [label.split("\n") for _, label, _ in placed.columns]
    assert labels == [["0", '" t0"'], ["1", '" t1"'], ["2-4", "…"], ["5", '" t5"'], ["6-10", "…"], ["11", '" t11"']]
    xs = [x for x, *_ in placed.columns]
    assert xs[3] - xs[2] == pytest.approx(EMPTY_COL_W / 2 + COL_GAP + NARROW_W / 2)
    assert [placed.xy[f"emb@{p}"][0] for p in (0, 1, 5, 11)] == [xs[0], xs[1], xs[3], xs[5]]


def test_layout_narrows_columns_of_embeddings_alone():
    """A column where only an embedding is drawn is NARROW_W wide (its box too), one where nothing is drawn
    EMPTY_COL_W; columns with heads keep full-width boxes; the columns stay in token order, without overlap."""
    from graphs.layout import COL_GAP, EMPTY_COL_W, LABEL_W, NARROW_W, NODE_W, grid

    base = _induction_graph()  # positions 0-3: heads at 1 and 3
    late = Node("emb@5", "embedding", -1, 5, 15)
    g = AttributionGraph("a b c a x y", base.tokens + ["x", "y"], base.token_ids + [13, 15], base.node_list + [late], [])
    drawn = [n for n in g.node_list if n.id != "emb@2"]  # drawn: embeddings alone at 0 and 5, nothing at 2 and 4
    placed = grid(g, drawn)
    assert placed.node_w["emb@0"] == placed.node_w["emb@5"] == NARROW_W
    assert placed.node_w["emb@1"] == placed.node_w["emb@3"] == placed.node_w["lorsa.1.7@3"] == NODE_W
    xs = [x for x, *_ in placed.columns]  # column centres: each column starts COL_GAP after the last one ends
    assert xs[0] == pytest.approx(LABEL_W + COL_GAP / 2 + NARROW_W / 2)
    assert xs[1] - xs[0] == pytest.approx(NARROW_W / 2 + COL_GAP + NODE_W / 2)
    assert xs[2] - xs[1] == pytest.approx(NODE_W / 2 + COL_GAP + EMPTY_COL_W / 2)
    assert xs[5] - xs[4] == pytest.approx(EMPTY_COL_W / 2 + COL_GAP + NARROW_W / 2)
    assert placed.xy["emb@0"][0] == pytest.approx(xs[0]) and placed.xy["emb@5"][0] == pytest.approx(xs[5])
    boxes = sorted((placed.xy[n.id][0] - placed.node_w[n.id] / 2, placed.xy[n.id][0] + placed.node_w[n.id] / 2, n.pos)
                   for n in drawn)
    for (a0, a1, pa), (b0, b1, pb) in zip(boxes, boxes[1:]):  # left to right: no two columns' boxes overlap
        assert pa <= pb and (pa == pb or a1 < b0)
    assert [label.split("\n") for _, label, _ in placed.columns] == [[str(p), f'"{t}"'] for p, t in enumerate(g.tokens)]
