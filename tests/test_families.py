"""Head families (graphs/families.py): the grouping rule on constructed cases, exact edge sums of collapsed
families against a brute-force sum over the adjacency, top_paths(families=True) against a brute-force path
enumeration, the JSON field and schema, the pictures, and bad input."""
from __future__ import annotations

import itertools
import json
import math
import random

import pytest
import torch

from graphs.families import FamilyConfig, Unit, collapse, family, group, z_key
from graphs.graph import AttributionGraph, Edge, Node, NodeKind
from replacement.errors import BadInputError

L, T = NodeKind.LORSA, NodeKind.TRANSCODER


# -- the rule ----------------------------------------------------------------------------------------------------

def test_parallel_heads_on_one_key_group_and_orthogonal_ones_do_not():
    e = torch.eye(4)
    units = [Unit(L, 1, 9, key=5, strength=3.0, index=0), Unit(L, 1, 9, key=5, strength=2.0, index=1),
             Unit(L, 1, 9, key=5, strength=1.0, index=2), Unit(L, 1, 9, key=5, strength=0.5, index=3)]
    dirs = torch.stack([e[0], 2 * e[0] + 0.1 * e[1], e[2], e[2] + 0.05 * e[3]])  # 0~1 parallel, 2~3 parallel, 0 _|_ 2
    assert group(units, dirs, FamilyConfig(cosine=0.5)) == [[0, 1], [2, 3]]
    # anti-parallel writes the opposite: no family
    assert group(units[:2], torch.stack([e[0], -e[0]]), FamilyConfig(cosine=0.5)) == []
    # the same directions but other keys, positions or kinds: no family
    for other in (Unit(L, 1, 9, key=4, strength=2.0), Unit(L, 1, 8, key=5, strength=2.0), Unit(T, 1, 9, key=5, strength=2.0)):
        assert group([units[0], other], torch.stack([e[0], e[0]]), FamilyConfig()) == []
    # a head whose pattern holds no key (key -1) joins nothing
    assert group([units[0], Unit(L, 1, 9, key=-1, strength=2.0)], torch.stack([e[0], e[0]]), FamilyConfig()) == []


def test_layer_span_and_threshold_and_order():
    e = torch.eye(3)
    units = [Unit(L, 1, 4, 2, 3.0), Unit(L, 2, 4, 2, 2.0), Unit(L, 3, 4, 2, 1.0)]
    same = torch.stack([e[0]] * 3)
    assert group(units, same, FamilyConfig(layer_span=0)) == []
    assert group(units, same, FamilyConfig(layer_span=1)) == [[0, 1]]  # layer 3 would make the span 2
    assert group(units, same, FamilyConfig(layer_span=2)) == [[0, 1, 2]]
    # cosine exactly at the threshold joins, just below does not
    c = 0.6
    d = torch.stack([e[0], c * e[0] + math.sqrt(1 - c * c) * e[1]])
    assert group(units[:2], d, FamilyConfig(cosine=0.6 - 1e-9, layer_span=1)) == [[0, 1]]
    assert group(units[:2], d, FamilyConfig(cosine=0.6 + 1e-6, layer_span=1)) == []
    # strongest first whatever the input order, and a unit joins the family whose leader it is most aligned with
    shuffled = [units[1], units[0]]
    assert group(shuffled, torch.stack([e[0], e[0]]), FamilyConfig(layer_span=1)) == [[1, 0]]
    lead = [Unit(L, 1, 4, 2, 5.0), Unit(L, 1, 4, 2, 4.0), Unit(L, 1, 4, 2, 1.0)]
    d = torch.stack([e[0], e[1], 0.6 * e[0] + 0.8 * e[1]])  # cos 0.6 with the first, 0.8 with the second
    assert group(lead, d, FamilyConfig(cosine=0.5)) == [[1, 2]]


def test_z_key_and_min_share():
    assert z_key([0.1, -0.7, 0.2], 0.0) == 2  # the largest entry: a negative one takes activation away
    assert z_key([0.1, -0.7, 0.2], 0.2) == 2 and z_key([0.1, -0.7, 0.2], 0.21) == -1  # 0.2 of the size 1.0
    assert z_key([-0.1, -0.7, -0.2], 0.7) == 1  # no entry positive: the largest in size
    assert z_key([0.0, 0.0], 0.0) == -1 and z_key([], 0.0) == -1
    with pytest.raises(BadInputError):
        FamilyConfig(cosine=1.5)
    with pytest.raises(BadInputError):
        FamilyConfig(key_rule="mean")


# -- hand-built graphs ---------------------------------------------------------------------------------------------

def _graph(seed: int = 0, n_heads: int = 6, density: float = 0.7) -> AttributionGraph:
    """Embeddings at positions 0-2, Lorsa heads of layers 1 and 2 and transcoder features at position 2, an error,
    a logit; random edges from lower to higher layers; two head families (one across layers 1-2, with edges
    between its members) and one feature family."""
    rng = random.Random(seed)
    nodes = [Node.make(NodeKind.EMBEDDING, -1, 0, p, activation=1.0) for p in range(3)]
    nodes.append(Node.make(NodeKind.MLP_ERROR, 0, -1, 2))
    for h in range(n_heads):
        nodes.append(Node.make(L, 1 + h % 2, h, 2, activation=1.0 + h, z_pattern=[0.1, 0.8, 0.1]))
    nodes += [Node.make(T, 2, f, 2, activation=0.5 + f) for f in range(3)]
    nodes.append(Node.make(NodeKind.LOGIT, 3, 7, 2, activation=2.0, prob=0.9))
    fams = {"fam.lorsa.1.0@2": ["lorsa.1.0@2", "lorsa.2.1@2", "lorsa.1.2@2"],
            "fam.lorsa.1.1@2": ["lorsa.2.3@2", "lorsa.1.4@2"], "fam.tc.2.0@2": ["tc.2.0@2", "tc.2.1@2"]}
    for fid, members in fams.items():
        for m in members:
            n = next(x for x in nodes if x.id == m)
            n.family, n.family_cosine = fid, 0.9
    # where each node sits in the forward pass (embeddings, then each layer's attention, then its MLP, then logits):
    # edges run only forward, as a graph file must have them
    stage = {n.id: -1 if n.type == NodeKind.EMBEDDING else 99 if n.type == NodeKind.LOGIT else
             2 * n.layer + (n.type in (T, NodeKind.MLP_ERROR)) for n in nodes}
    edges = []
    for a, b in itertools.permutations(nodes, 2):
        if b.type in (NodeKind.EMBEDDING, NodeKind.MLP_ERROR) or stage[a.id] >= stage[b.id] or rng.random() > density:
            continue
        edges.append(Edge(a.id, b.id, rng.uniform(-1, 1), "ov" if b.type == L else "direct"))
    return AttributionGraph("a b c", ["a", "b", "c"], [1, 2, 3], nodes, edges)


def _dense(graph: AttributionGraph) -> dict[tuple[str, str, str], float]:
    return {(e.source, e.target, e.kind): e.weight for e in graph.edges}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_family_edges_are_exact_sums_of_members(seed):
    g = _graph(seed)
    fams = g.families()
    assert sorted(f.id for f in fams) == ["fam.lorsa.1.0@2", "fam.lorsa.1.1@2", "fam.tc.2.0@2"]
    group_of = {n.id: n.id for n in g.node_list}
    for f in fams:
        group_of.update({m: f.id for m in f.members})
    brute: dict[tuple[str, str, str], float] = {}
    internal = 0
    for e in g.edges:  # brute force: every original edge, added into its groups' edge unless internal to a family
        s, t = group_of[e.source], group_of[e.target]
        if s == t and s.startswith("fam."):
            internal += 1
            continue
        brute[(s, t, e.kind)] = brute.get((s, t, e.kind), 0.0) + e.weight
    assert internal > 0  # the cross-layer family has edges between its members, and they are dropped
    c = collapse(g)
    got = _dense(c)
    assert got.keys() == brute.keys()
    for k, v in brute.items():
        assert got[k] == pytest.approx(v, abs=1e-6)
    assert len(c) == len(g) - sum(len(f) - 1 for f in fams)
    fnode = c.node("fam.lorsa.1.0@2")
    members = [g.node(m) for m in family(g, fnode.id).members]
    assert fnode.activation == pytest.approx(sum(m.activation for m in members))
    assert fnode.z_pattern == pytest.approx([sum(m.z_pattern[s] for m in members) for s in range(3)])
    assert fnode.members == [m.id for m in members] and fnode.layer == 1 and fnode.pos == 2
    # nodes outside families keep their edges untouched
    assert c.node("emb@0") is g.node("emb@0")


def test_a_family_node_holds_its_members_sums_and_keeps_the_identity():
    """Brute force over the members: a collapsed family's activation, influence, pre-activation, constants and dropped
    weight are its members' sums, and (each member's incoming edges + const + dropped = preact) its incoming edges +
    const + dropped + the members' edges into each other (dropped by the collapse) = its pre-activation."""
    g = _graph(1)
    rng = random.Random(5)
    into = {}
    for e in g.edges:
        into[e.target] = into.get(e.target, 0.0) + e.weight
    for n in g.node_list:  # every target's identity, as `attribute` makes it
        n.const, n.dropped, n.influence = rng.uniform(-1, 1), rng.uniform(-1, 1), rng.uniform(0, 1)
        n.preact = into.get(n.id, 0.0) + n.const + n.dropped
    c = collapse(g)
    for f in g.families():
        ms = [g.node(m) for m in f.members]
        node = c.node(f.id)
        for field in ("activation", "influence", "preact", "const", "dropped"):
            assert getattr(node, field) == pytest.approx(sum(getattr(m, field) for m in ms), abs=1e-9), (f.id, field)
        internal = sum(e.weight for e in g.edges if e.source in f.members and e.target in f.members)
        incoming = sum(e.weight for e in c.edges if e.target == f.id)
        assert incoming + node.const + node.dropped + internal == pytest.approx(node.preact, abs=1e-5), f.id


def test_family_cosines_are_cosines_with_the_members_mean_unit_direction():
    """`Node.family_cosine` (what `find_families` marks each member with, via `mean_direction_cosines`) against a
    brute force: the cosine of each member's direction with the mean of the members' unit directions, for
    directions of different sizes that are not parallel (where the mean of unit vectors is shorter than 1)."""
    from graphs.families import mean_direction_cosines

    d = torch.randn(5, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    d = d * torch.tensor([0.5, 1.0, 2.0, 3.0, 7.0], dtype=torch.float64)[:, None]
    unit = [row / math.sqrt(sum(float(x) ** 2 for x in row)) for row in d]
    mean = sum(unit) / len(unit)
    want = [float(u @ mean) / math.sqrt(float(mean @ mean)) for u in unit]
    assert mean_direction_cosines(d).tolist() == pytest.approx(want, abs=1e-9)
    assert math.sqrt(float(mean @ mean)) < 0.9  # the normalisation matters here


def test_read_directions_are_outgoing_edges_per_activation():
    from graphs.families import find_families, read_directions

    g = _graph()
    heads = g.nodes(type="lorsa")
    got = read_directions(g, heads).to_dense()
    ids = [n.id for n in g.node_list]
    for i, h in enumerate(heads):
        want = [0.0] * len(ids)
        for e in g.edges:
            if e.source == h.id:
                want[ids.index(e.target)] += e.weight / h.activation
        assert got[i].tolist() == pytest.approx(want, abs=1e-6)
    with pytest.raises(BadInputError, match="needs the model"):
        find_families(g, None, FamilyConfig(direction="weights"))
    # identical heads (same edges per unit of activation, same key) group, by the graph alone
    twin = AttributionGraph(g.prompt, g.tokens, g.token_ids, [
        Node.make(NodeKind.EMBEDDING, -1, 0, 0), Node.make(L, 1, 0, 1, activation=1.0, z_pattern=[0.9, 0.1]),
        Node.make(L, 1, 1, 1, activation=2.0, z_pattern=[0.8, 0.2]), Node.make(L, 1, 2, 1, activation=1.0, z_pattern=[0.9, 0.1]),
        Node.make(NodeKind.LOGIT, 2, 5, 1, prob=1.0), Node.make(NodeKind.LOGIT, 2, 6, 1, prob=0.0)],
        [Edge("lorsa.1.0@1", "logit.5@1", 1.0), Edge("lorsa.1.0@1", "logit.6@1", -0.5),
         Edge("lorsa.1.1@1", "logit.5@1", 2.0), Edge("lorsa.1.1@1", "logit.6@1", -1.0),
         Edge("lorsa.1.2@1", "logit.5@1", 0.5), Edge("lorsa.1.2@1", "logit.6@1", 1.0)])  # the third: orthogonal
    fams = find_families(twin, None, FamilyConfig(cosine=0.9))
    assert [(f.id, f.members) for f in fams] == [("fam.lorsa.1.0@1", ["lorsa.1.1@1", "lorsa.1.0@1"])]
    assert fams[0].mean_cosine == pytest.approx(1.0) and twin.settings["families"]["cosine"] == 0.9


def test_target_direction_groups_the_heads_that_push_the_target_one_way():
    """direction="target": a unit's direction is its effect on the traced logit per unit of activation (here its
    direct edge: no transcoder feature between), so the heads of a slot that raise it form one family whatever
    else they write (the third is orthogonal to the first two in read space: the read rule at cosine 0.5 splits it
    off), and one that lowers it stays out."""
    from graphs.families import find_families, target_directions

    heads = [Node.make(L, 1, i, 1, activation=a, z_pattern=[0.9, 0.1]) for i, a in enumerate((1.0, 2.0, 1.0, 1.0))]
    g = AttributionGraph("a b", ["a", "b"], [1, 2], [Node.make(NodeKind.EMBEDDING, -1, 0, 0), *heads,
                         Node.make(NodeKind.LOGIT, 2, 5, 1, prob=0.9), Node.make(NodeKind.LOGIT, 2, 6, 1, prob=0.1)],
                         [Edge("lorsa.1.0@1", "logit.5@1", 1.0), Edge("lorsa.1.0@1", "logit.6@1", -0.5),
                          Edge("lorsa.1.1@1", "logit.5@1", 2.0), Edge("lorsa.1.1@1", "logit.6@1", -1.0),
                          Edge("lorsa.1.2@1", "logit.5@1", 0.5), Edge("lorsa.1.2@1", "logit.6@1", 1.0),
                          Edge("lorsa.1.3@1", "logit.5@1", -1.0)])
    per = target_directions(g, heads)[:, 0].abs()  # graph_effects' sign is the ablation's; the sizes are these
    assert per.tolist() == pytest.approx([1.0, 1.0, 0.5, 1.0])
    fams = find_families(g, None, FamilyConfig(direction="target"))
    assert [sorted(f.members) for f in fams] == [["lorsa.1.0@1", "lorsa.1.1@1", "lorsa.1.2@1"]]
    read = find_families(g, None, FamilyConfig(cosine=0.5))
    assert "lorsa.1.2@1" not in read[0].members


def test_families_query():
    g = _graph()
    f = family(g, "fam.lorsa.1.0@2")
    assert f.layers == (1, 2) and f.key_positions == (1,) and f.pos == 2 and f.kind == L
    assert f.members == ["lorsa.1.2@2", "lorsa.2.1@2", "lorsa.1.0@2"]  # strongest (largest activation) first
    assert f.mean_cosine == pytest.approx(0.9)
    # a pruned graph keeps the families it holds at least two members of
    sub = g.subgraph([n.id for n in g.node_list if n.id not in ("lorsa.2.3@2",)])
    assert sorted(x.id for x in sub.families()) == ["fam.lorsa.1.0@2", "fam.tc.2.0@2"]
    with pytest.raises(BadInputError, match="no family 'fam.lorsa.9.0@2'"):
        family(g, "fam.lorsa.9.0@2")


def _brute_paths(graph: AttributionGraph, target: str, sources) -> list[tuple[float, list[str]]]:
    """Every path from a source node into the target, with its strength: the product of each edge's share of its
    target's absolute input (parallel edges of two kinds between one pair summed in size, as networkx keeps one)."""
    into: dict[str, float] = {}
    w: dict[tuple[str, str], float] = {}
    for (s, t, _), x in _dense(graph).items():
        into[t] = into.get(t, 0.0) + abs(x)
        w[(s, t)] = w.get((s, t), 0.0) + abs(x)
    out: dict[str, list[str]] = {}
    for s, t in w:
        out.setdefault(s, []).append(t)
    found = []

    def walk(path, strength):
        if path[-1] == target:
            found.append((strength, list(path)))
            return
        for t in out.get(path[-1], []):
            if t not in path and w[(path[-1], t)] > 0:
                walk(path + [t], strength * w[(path[-1], t)] / into[t])

    for n in graph.node_list:
        if n.type in sources:
            walk([n.id], 1.0)
    return sorted(found, key=lambda x: -x[0])


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_top_paths_with_families_match_brute_force(seed):
    from graphs.graph import INPUT_KINDS

    g = _graph(seed, density=0.5)
    logit = g.logits()[0].id
    # brute force on the collapsed edges summed by hand (not by `collapse`)
    group_of = {n.id: n.family or n.id for n in g.node_list}
    summed: dict[tuple[str, str, str], float] = {}
    for e in g.edges:
        s, t = group_of[e.source], group_of[e.target]
        if not (s == t and s.startswith("fam.")):
            summed[(s, t, e.kind)] = summed.get((s, t, e.kind), 0.0) + e.weight
    ids = list(dict.fromkeys(group_of[n.id] for n in g.node_list))
    types = {group_of[n.id]: n.type for n in g.node_list}
    hand = AttributionGraph(g.prompt, g.tokens, g.token_ids, [Node(i, types[i], 0, 2, 0) for i in ids],
                            [Edge(s, t, w, k) for (s, t, k), w in summed.items()])
    brute = _brute_paths(hand, logit, INPUT_KINDS)
    got = g.top_paths(to=logit, k=5, families=True)
    assert [p for _, p in got] == [p for _, p in brute[:5]]
    assert [s for s, _ in got] == pytest.approx([s for s, _ in brute[:5]], rel=1e-4)
    best = g.top_paths(to=logit, k=1, families=True)  # the vectorised strongest path agrees
    assert best[0][1] == brute[0][1] and best[0][0] == pytest.approx(brute[0][0], rel=1e-4)
    # a member named as the target stands for its family
    assert g.top_paths(to="lorsa.1.0@2", k=1, families=True)[0][1][-1] == "fam.lorsa.1.0@2"
    # without families the paths are the plain graph's, which hold no family id
    assert not any(x.startswith("fam.") for _, p in g.top_paths(to=logit, k=5) for x in p)


@pytest.mark.parametrize("seed", [0, 1])
def test_top_paths_of_bounded_length_match_brute_force(seed):
    """top_paths with min_len/max_len gives the strongest paths of that many nodes, in order, and stops when fewer
    than k exist (it used to enumerate every longer path, without end on a real graph); k < 1 is refused."""
    from graphs.graph import INPUT_KINDS

    g = _graph(seed, density=0.5)
    logit = g.logits()[0].id
    brute = _brute_paths(g, logit, INPUT_KINDS)
    for min_len, max_len in ((2, 12), (2, 2), (3, 3), (3, 4), (2, 3)):
        want = [(s, p) for s, p in brute if min_len <= len(p) <= max_len]
        got = g.top_paths(to=logit, k=len(want) + 5, max_len=max_len, min_len=min_len)
        assert [p for _, p in got] == [p for _, p in want], (min_len, max_len)
        assert [s for s, _ in got] == pytest.approx([s for s, _ in want], rel=1e-6)
        best = g.top_paths(to=logit, k=1, max_len=max_len, min_len=min_len)
        assert [p for _, p in best] == [p for _, p in want[:1]]
    with pytest.raises(ValueError, match="k >= 1"):
        g.top_paths(k=0)
    with pytest.raises(ValueError, match="no node 'logit.5@9'"):
        g.top_paths(to="logit.5@9")


# -- files and pictures --------------------------------------------------------------------------------------------

def test_json_schema_and_round_trip(tmp_path):
    import graphs
    from graphs.export import to_dict, validate, write_json
    from graphs.validate import BadGraphError, check_graph_dict

    g = _graph()
    path = write_json(g, tmp_path / "g.json", check_schema=True)
    d = json.loads(path.read_text())
    validate(d)
    members = {n["node_id"]: n["family"] for n in d["nodes"] if "family" in n}
    assert members == {n.id: n.family for n in g.node_list if n.family}
    assert sorted(map(tuple, d["qParams"]["supernodes"])) == sorted((f.id, *f.members) for f in g.families())
    back = graphs.load(path)
    assert back == g and [f.id for f in back.families()] == [f.id for f in g.families()]
    # a collapsed graph saved and read back keeps its families' members (they were lost), and a family node says
    # what it is: its key would name another unit (a family's index is its rank)
    c = g.collapsed()
    fam = next(n for n in c.node_list if n.id.startswith("fam."))
    again = graphs.load(write_json(c, tmp_path / "c.json", check_schema=True))
    assert again.node(fam.id).members == fam.members == family(g, fam.id).members and again == c
    assert fam.is_family and not any(n.is_family for n in g.node_list)
    old = json.loads((tmp_path / "c.json").read_text())  # as saved before family nodes kept their members: read
    for n in old["nodes"]:
        n.pop("members", None)
    (tmp_path / "old.json").write_text(json.dumps(old))
    assert graphs.load(tmp_path / "old.json").node(fam.id).activation == fam.activation
    from graphs.layout import node_name
    assert c.node(node_name(c, fam)) is fam and node_name(c, fam).count(f"@{fam.pos}") == 1  # as trace prints it
    from graphs.layout import box_label

    for f in g.families():  # and as a picture's box reads ("L1 x3 ←1" over "fam 0 @2"), lines joined or not
        box = box_label(c, c.node(f.id))
        assert g.resolve(box) == f.id and g.resolve(" ".join(box.split("\n")[:2])) == f.id, box
    with pytest.raises(BadInputError, match="is a family node"):
        fam.key
    # a family id in the wrong form breaks the schema; a member of the wrong kind or position the reader's check
    bad = to_dict(g)
    next(n for n in bad["nodes"] if "family" in n)["family"] = "family 1"
    with pytest.raises(BadGraphError, match="schema"):
        check_graph_dict(bad)
    bad = to_dict(g)
    next(n for n in bad["nodes"] if n["node_id"] == "tc.2.2@2")["family"] = "fam.lorsa.1.0@2"
    with pytest.raises(BadGraphError, match="cannot belong to family"):
        check_graph_dict(bad)
    bad = to_dict(g)
    next(n for n in bad["nodes"] if n["node_id"] == "lorsa.1.0@2")["family"] = "fam.lorsa.1.0@1"
    with pytest.raises(BadGraphError, match="cannot belong to family"):
        check_graph_dict(bad)


def test_dot_draws_a_family_as_one_node_and_expands(tmp_path):
    from graphs.export import to_dot

    g = _graph()
    dot = to_dot(g, draw_nodes=100)
    # the third line: the token at the key position (1, "b") the family takes most of its activation from
    assert '"fam.lorsa.1.0@2" [label="L1-2 x3 ←1\\nfam 0 @2\\n←\\"b\\""' in dot and "peripheries=2" in dot
    assert '"lorsa.1.0@2" [' not in dot and "double outline: a family" in dot
    assert "e.g. L1-2 x3 ←1: 3 heads of layers 1-2 at " in dot  # the legend's example: this graph's largest family
    expanded = to_dot(g, draw_nodes=100, expand_families=True)
    assert '"lorsa.1.0@2" [' in expanded and "fam." not in expanded


def test_html_page_switches_between_families_and_members():
    from graphs.html import page_data, to_html

    g = _graph()
    d = page_data(g, draw_nodes=100, expand_families=False)
    assert d["family_steps"] and not d["expand_families"]
    last = d["family_steps"][-1]
    assert "fam.lorsa.1.0@2" in last["xy"] and "lorsa.1.0@2" not in last["xy"]
    assert "lorsa.1.0@2" in d["steps"][-1]["xy"] and "fam.lorsa.1.0@2" not in d["steps"][-1]["xy"]
    assert d["nodes"]["fam.lorsa.1.0@2"]["members"] == family(g, "fam.lorsa.1.0@2").members
    assert d["nodes"]["lorsa.1.0@2"]["family"] == "fam.lorsa.1.0@2"
    assert not page_data(g, draw_nodes=100)["expand_families"]  # the page opens as the DOT: families as one node
    assert 'id="families"' in to_html(g)



def test_family_contrast_sums_members_and_names_ends_by_family(tmp_path):
    """A closed-form case: two members of a family hold a contrast at the family's key (a third none); the family's
    is their sum, term by term, with a pair whose end is a member of another family named by that family and the
    same pair of two members summed; the page's panel data carries it."""
    from graphs.families import family_contrast
    from graphs.graph import QKContrast, QKEntry, QKPair
    from graphs.html import page_data

    g = _graph()
    a, b, _ = family(g, "fam.lorsa.1.0@2").members
    g.node(a).qk = [QKEntry(1, 0.8, contrast=QKContrast("mean", -1, 1.0, 2.0, [QKPair("emb@2", "lorsa.2.3@2", 1.5),
                                                                              QKPair("emb@2", "emb@1", 0.25)],
                                                       1.75, 0.5, -0.25, [("emb@2", 1.5)], [("lorsa.2.3@2", 1.5)]))]
    g.node(b).qk = [QKEntry(1, 0.6, contrast=QKContrast("mean", -1, 3.0, 1.0, [QKPair("emb@2", "lorsa.1.4@2", -0.5)],
                                                       -0.5, 1.0, 0.5, [("emb@2", 0.5)], [("lorsa.1.4@2", -0.5)])),
                    QKEntry(0, 0.1)]  # another key: not the family's
    c, n = family_contrast(g, family(g, "fam.lorsa.1.0@2"))
    assert n == 2
    assert (c.reference_score, c.difference, c.pairs_total, c.query_bias_x_keys, c.position) == (4.0, 3.0, 1.25, 1.5, 0.25)
    assert [(p.query, p.key, p.weight) for p in c.pairs] == [("emb@2", "fam.lorsa.1.1@2", 1.0), ("emb@2", "emb@1", 0.25)]
    assert c.query_marginals == [("emb@2", 2.0)] and c.key_marginals == [("fam.lorsa.1.1@2", 1.0)]
    assert family_contrast(g, family(g, "fam.lorsa.1.1@2")) is None  # no member holds a contrast
    assert family_contrast(g, family(g, "fam.tc.2.0@2")) is None  # features have no QK
    d = page_data(g, draw_nodes=100)
    assert d["nodes"]["fam.lorsa.1.0@2"]["contrast"] == c.to_json() and d["nodes"]["fam.lorsa.1.0@2"]["contrast_heads"] == 2
    assert d["nodes"]["fam.lorsa.1.1@2"]["contrast"] is None
    path = str(g.save(tmp_path / "g.json"))  # and `circuits query --node` prints it
    r = _circuits("query", path, "--node", "fam.lorsa.1.0@2")
    assert r.returncode == 0, r.stderr
    assert ("why its heads look at key pos 1 ('b') (graphs/families.py's family_contrast: the QK contrasts of 2 of "
            "its 3 heads summed, scores too" in r.stdout), r.stdout
    assert "difference +3.000 = pairs +1.250 + query bias x keys +1.500 + position +0.250" in r.stdout, r.stdout
    assert "top pairs: emb@2 x fam.lorsa.1.1@2 +1.0000" in r.stdout
    r = _circuits("query", path, "--node", "fam.lorsa.1.1@2")  # a family of heads without one says why
    assert r.returncode == 0 and "(no QK contrast for its heads at their key" in r.stdout, r.stderr

# -- on a model ------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def traced():
    from graphs.attribution import attribute
    from replacement.models import ModelAdapter
    from tests.conftest import random_replacements, tiny_llama

    adapter = ModelAdapter(tiny_llama(), name="m")
    model = random_replacements(adapter)
    torch.manual_seed(0)
    ids = torch.randint(0, 97, (1, 8))
    return model, ids, attribute(model, ids, qk=False, families=FamilyConfig(cosine=-1.0))


def test_find_families_on_a_traced_graph(traced):
    from graphs.families import find_families, output_directions

    model, ids, g = traced
    fams = g.families()
    assert fams and g.settings["families"]["cosine"] == -1.0
    for f in fams:
        ms = [g.node(m) for m in f.members]
        assert {m.pos for m in ms} == {f.pos} and {m.type for m in ms} == {f.kind}
        assert max(f.layers) - min(f.layers) <= 1
        if f.kind == L:
            peaks = {int(torch.tensor(m.z_pattern).argmax()) for m in ms}  # every member's largest entry
            assert peaks == set(f.key_positions) and len(peaks) == 1
    # the directions are the heads' W_O rows and the features' decoders
    h = next(n for n in g.node_list if n.type == L)
    assert torch.equal(output_directions(model, [h])[0], model.lorsas[h.layer].W_O[h.index].detach().float())
    # with any cosine accepted, two units of one kind, position and key in one layer always share a family
    slots = {}
    for n in g.node_list:
        if n.type == L:
            slots.setdefault((n.pos, int(torch.tensor(n.z_pattern).argmax()), n.layer), set()).add(n.family)
    assert all(len(fs) == 1 for fs in slots.values())
    from graphs.layout import box_label  # a box's name resolves to its family, heads and features of one layer
    c = g.collapsed()  # and rank apart ("←key" marks heads)
    assert all(g.resolve(" ".join(box_label(c, c.node(f.id)).split("\n")[:2])) == f.id for f in fams)
    assert any(f.id.replace("lorsa", "tc") in {x.id for x in fams} for f in fams if f.kind == L)  # such a pair is here
    before = [(f.id, f.members) for f in fams]
    again = find_families(g, model, FamilyConfig(cosine=-1.0))
    assert [(f.id, f.members) for f in again] == before  # deterministic


def test_default_rule_on_a_traced_graph_sums_members_edges_exactly(traced):
    """At the default rule (one layer, cosine >= 0), every edge of the collapsed traced graph is the sum of the
    uncollapsed graph's edges between the groups it joins (members' edges between themselves dropped), and a
    family's members sit in one layer."""
    from graphs.families import DEFAULT_FAMILIES, find_families

    model, ids, g = traced
    fams = find_families(g, model, DEFAULT_FAMILIES)
    try:
        assert fams and all(len(f.layers) == 1 for f in fams)
        group_of = {n.id: n.id for n in g.node_list} | {m: f.id for f in fams for m in f.members}
        brute: dict[tuple[str, str, str], float] = {}
        for e in g.edges:
            s, t = group_of[e.source], group_of[e.target]
            if not (s == t and s.startswith("fam.")):
                brute[(s, t, e.kind)] = brute.get((s, t, e.kind), 0.0) + e.weight
        got = _dense(collapse(g))
        assert got.keys() == brute.keys()
        assert all(got[k] == pytest.approx(v, rel=1e-5, abs=1e-5) for k, v in brute.items())
    finally:
        find_families(g, model, FamilyConfig(cosine=-1.0))  # the module's fixture, as the other tests see it


def test_patching_a_family_ablates_its_members_together(traced):
    from graphs.families import family_components, predicted_effect
    from graphs.patching import PathPatcher, graph_effects

    model, ids, g = traced
    logit = g.logits()[0]
    f = max((f for f in g.families() if f.kind == L), key=lambda f: abs(predicted_effect(g, f, logit.id)))
    comps = family_components(f)
    assert [str(c) for c in comps] == f.members
    effects = graph_effects(g, logit.id)
    assert predicted_effect(g, f, logit.id) == pytest.approx(sum(float(effects[g.index[m]]) for m in f.members))
    patcher = PathPatcher(model, ids, logit.index, demean=True)
    together, reversed_, first = patcher.effects([comps, comps[::-1], comps[0]])
    assert together.component == comps
    assert together.effect == pytest.approx(reversed_.effect, abs=1e-5)  # a set of members, ablated at once
    assert abs(together.effect - first.effect) > 1e-6  # not just its first member


# -- commands ----------------------------------------------------------------------------------------------------------

def _circuits(*args):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-c", "from cli.main import circuits; circuits()", *args], capture_output=True,
                          text=True, timeout=600)


def test_query_lists_families_and_their_paths(tmp_path):
    g = _graph()
    path = str(g.save(tmp_path / "g.json"))
    r = _circuits("query", path, "--families", "--paths", "2")
    assert r.returncode == 0, r.stderr
    for f in g.families():
        assert f"{f.id}" in r.stdout and f"{len(f)} {'heads' if f.kind == L else 'features'}, layer(s) " \
            f"{','.join(map(str, f.layers))}" in r.stdout
    shown = [ln.split("  ", 2)[-1] for ln in r.stdout.splitlines() if " -> " in ln]
    assert shown == [" -> ".join(p) for _, p in g.top_paths(k=2, families=True)]
    f = max(g.families(), key=len)  # --to a family: the paths into it, each family one node
    with pytest.raises(KeyError, match="a family is a node of `collapsed"):
        g.node(f.id)
    assert g.collapsed().node(f.id).members
    r = _circuits("query", path, "--paths", "2", "--to", f.id)
    assert r.returncode == 0 and f"strongest paths into {f.id}:" in r.stdout, r.stderr
    shown = [ln.split("  ", 2)[-1] for ln in r.stdout.splitlines() if " -> " in ln]
    assert shown and shown == [" -> ".join(p) for _, p in g.top_paths(to=f.id, k=2, families=True)]
    from graphs.layout import node_name  # --node with the family's name as trace prints it (a KeyError traceback)
    r = _circuits("query", path, "--node", node_name(g.collapsed(), g.collapsed().node(f.id)))
    assert r.returncode == 0 and f"{f.id}: a family of {len(f)}" in r.stdout, r.stderr
    r = _circuits("query", path, "--families", "--compare", path)  # two questions: refused (--families was ignored)
    assert r.returncode == 1 and "--compare and --families ask different questions" in r.stderr, r.stderr


def test_patch_ablates_a_family_that_trace_found(tmp_path):
    """A family id from a default `trace`'s graph.json names the same members in `circuits patch --family`, which
    prints its size and the graph's prediction (QK pairs keep their nodes in the pruned graph, so the settings must
    be trace's; nodes kept for their QK pairs alone join no family: this prompt's graph has 32 families with or
    without `--no-qk`, 42 by default before they were left out)."""
    prompt = "the cat sat on the mat. the cat sat on the"
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", "from cli.trace import trace; trace()", prompt, "--model", "toy", "--out",
                        str(tmp_path), "--format", "json"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    g = AttributionGraph.load(tmp_path / "graph.json")
    from graphs.pipeline import trace_graphs  # what `patch --family` builds: every family, member for member, as trace's
    from replacement.assemble import ReplacementModel
    from replacement.models import load_model

    model = ReplacementModel.load(load_model("toy"))
    _, pruned = trace_graphs(model, model.adapter.tokenize(prompt))
    assert {f.id: sorted(f.members) for f in pruned.families()} == {f.id: sorted(f.members) for f in g.families()}
    f, g2 = sorted(g.families(), key=len)[-2:][::-1]
    r = _circuits("patch", prompt, "--model", "toy", "--family", f.id)
    assert r.returncode == 0, r.stderr
    line = next(ln for ln in r.stdout.splitlines() if ln.strip().startswith(f.id))
    assert f"({len(f)} {'heads' if f.kind == L else 'features'} of layer(s) " in line and "graph predicts" in line
    # like with like: the patched effect on the demeaned logit (as the graph's logit is) and the members' sum
    from graphs.families import family_components
    from graphs.patching import PathPatcher, graph_effects

    ids = model.adapter.tokenize(prompt)
    full, _ = trace_graphs(model, ids)
    t_id = int(model.adapter.next_token_probs(ids).argmax())
    patcher = PathPatcher(model, ids, t_id, demean=True)
    effects = graph_effects(full, full.logit(t_id).id)
    fam = {x.id: x for x in full.families()}
    expect = patcher.effects([family_components(fam[f.id])])[0].effect
    pred = sum(float(effects[full.index[m]]) for m in fam[f.id].members)
    assert f"effect {expect:+.4f}  the full graph predicts {pred:+.4f}" in line, line
    # beside it, the pruned graph's: what `predicted_effect` gives on the trace's graph.json
    from graphs.families import predicted_effect

    kept = predicted_effect(g, f, g.logit(t_id).id)
    assert f"the pruned graph, as graph.json holds it: {kept:+.4f}" in line, line
    assert "mean over the vocabulary" in r.stdout.splitlines()[0]
    # --together: both families as one unit, and the prediction the sum over the union of their members
    r = _circuits("patch", prompt, "--model", "toy", "--family", f.id, "--family", g2.id, "--together")
    assert r.returncode == 0, r.stderr
    (line,) = [ln for ln in r.stdout.splitlines() if ln.strip().startswith(f"{f.id} + {g2.id}")]
    union = tuple(dict.fromkeys(family_components(fam[f.id]) + family_components(fam[g2.id])))
    expect = patcher.effects([union])[0].effect
    pred = sum(float(effects[full.index[m]]) for m in set(fam[f.id].members) | set(fam[g2.id].members))
    assert f"effect {expect:+.4f}  the full graph predicts {pred:+.4f}" in line, line


def test_patch_gives_the_graphs_prediction_for_components():
    """With --demean, each component's line carries the graph's prediction of its zero ablation (the full graph's and
    the pruned one's, `graph_effects` at its node), beside the patched effect; --together sums them; a component
    with no node says so; without --demean a line says how to get it."""
    from graphs.pipeline import trace_graphs
    from graphs.patching import PathPatcher, graph_effects, parse_component
    from replacement.assemble import ReplacementModel
    from replacement.models import load_model

    prompt = "the cat sat on the mat. the cat sat on the"
    model = ReplacementModel.load(load_model("toy"))
    ids = model.adapter.tokenize(prompt)
    t_id = int(model.adapter.next_token_probs(ids).argmax())
    full, pruned = trace_graphs(model, ids, target=model.adapter.tokenizer.decode([t_id]))
    effects, kept = graph_effects(full, full.logit(t_id).id), graph_effects(pruned, pruned.logit(t_id).id)
    last = len(full.tokens) - 1
    heads = sorted((n for n in pruned.node_list if n.type == NodeKind.LORSA and n.pos == last),
                   key=lambda n: -abs(float(kept[pruned.index[n.id]])))[:2]
    assert len(heads) == 2
    ids_ = [n.id for n in heads]
    r = _circuits("patch", prompt, "--model", "toy", "--demean", *(a for i in ids_ + ["head.0.0@3"] for a in ("--component", i)))
    assert r.returncode == 0, r.stderr
    patcher = PathPatcher(model, ids, t_id, demean=True)
    for i in ids_:
        line = next(ln for ln in r.stdout.splitlines() if ln.strip().startswith(i))
        effect = patcher.effects([parse_component(i)])[0].effect
        want = f"effect {effect:+.4f}"
        assert want in line and f"graph {float(effects[full.index[i]]):+.4f}, pruned {float(kept[pruned.index[i]]):+.4f}" in line, line
    line = next(ln for ln in r.stdout.splitlines() if ln.strip().startswith("head.0.0@3"))
    assert "graph: no node" in line, line
    r = _circuits("patch", prompt, "--model", "toy", "--demean", "--together", *(a for i in ids_ for a in ("--component", i)))
    assert r.returncode == 0, r.stderr
    (line,) = [ln for ln in r.stdout.splitlines() if " effect " in ln]
    both = sum(float(effects[full.index[i]]) for i in ids_)
    assert f"graph {both:+.4f}" in line, line
    r = _circuits("patch", prompt, "--model", "toy", "--together", "--component", "head.1.0", "--component",
                  f"head.1.0@{last}")  # one unit: the head at every position holds its last-position self
    (line,) = [ln for ln in r.stdout.splitlines() if " effect " in ln]
    alone = PathPatcher(model, ids, t_id).effects([parse_component("head.1.0")])[0].effect  # the raw logit, as printed
    assert r.returncode == 0 and line.strip().startswith("head.1.0 ") and f"effect {alone:+.4f}" in line, line
    r = _circuits("patch", prompt, "--model", "toy", "--component", ids_[0])
    assert r.returncode == 0 and "graph" not in next(ln for ln in r.stdout.splitlines() if " effect " in ln), r.stdout
    early = next(n for n in pruned.node_list if n.type == NodeKind.LORSA and n.pos < last)  # fires, earlier position
    r = _circuits("patch", prompt, "--model", "toy", "--component", early.id)
    line = next(ln for ln in r.stdout.splitlines() if " effect " in ln)
    assert r.returncode == 0 and "effect +0.0000" in line and f"({early.id} at an earlier position: it reaches the " \
        "prediction only through attention" in line, line
    assert "with --demean, each line also gives the attribution graph's prediction" in r.stdout


def test_patch_names_a_bad_family_in_one_line():
    r = _circuits("patch", "the cat", "--model", "toy", "--family", "lorsa.1.2@3")
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 1 and len(lines) == 1 and "cannot parse family id 'lorsa.1.2@3'" in lines[0], r.stderr
    r = _circuits("patch", "the cat", "--model", "toy")
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 1 and len(lines) == 1 and "--component ID or --family ID" in lines[0], r.stderr


def test_trace_says_when_no_family_path_reaches_the_target(capsys):
    """A target logit no path reaches in the pruned graph (a --target the model gives almost no probability):
    every path line says "none in the pruned graph", the families' line too (it ended in a bare colon)."""
    from cli.trace import _print_paths

    nodes = [Node.make(NodeKind.EMBEDDING, -1, 0, 0, activation=1.0),
             Node.make(L, 0, 0, 1, activation=2.0, z_pattern=[0.9, 0.1]),
             Node.make(L, 0, 1, 1, activation=1.0, z_pattern=[0.8, 0.2]),
             Node.make(NodeKind.LOGIT, 1, 5, 1, activation=3.0, prob=0.001, label=" x")]
    for n in nodes[1:3]:
        n.family, n.family_cosine = "fam.lorsa.0.0@1", 1.0
    edges = [Edge("emb@0", "lorsa.0.0@1", 0.5, "ov"), Edge("emb@0", "lorsa.0.1@1", 0.4, "ov")]
    g = AttributionGraph("a b", ["a", "b"], [1, 2], nodes, edges)
    assert g.families() and not g.top_paths(to="logit.5@1", k=1, families=True, sources=("emb",), min_len=3)
    _print_paths(g, 5, 7)
    out = capsys.readouterr().out
    assert "strongest feature path with each family as one node: none in the pruned graph" in out
    assert "strongest feature path: none in the pruned graph" in out and not out.rstrip().endswith(":")


def test_families_come_in_order_of_rank_not_of_id_text():
    """fam.lorsa.1.2 before fam.lorsa.1.10 (as text, "10" sorts first)."""
    nodes = [Node.make(L, 1, h, 3, activation=1.0) for h in range(4)]
    for n, fid in zip(nodes, ["fam.lorsa.1.10@3", "fam.lorsa.1.10@3", "fam.lorsa.1.2@3", "fam.lorsa.1.2@3"]):
        n.family, n.family_cosine = fid, 1.0
    g = AttributionGraph("a b c d", ["a", "b", "c", "d"], [1, 2, 3, 4], nodes, [])
    assert [f.id for f in g.families()] == ["fam.lorsa.1.2@3", "fam.lorsa.1.10@3"]


def test_a_family_draws_its_members_qk_pairs_between_drawn_nodes():
    """A collapsed graph's family of heads has no QK table of its own; its picture draws its members' strongest
    pair, each end a drawn node or the family holding it (the induction family's link to the previous-token
    family was lost).  Checked against the members' pairs in the uncollapsed graph, mapped by hand."""
    from graphs.attribution import attribute
    from graphs.layout import drawn_qk, family_qk_pairs
    from replacement.models import ModelAdapter
    from tests.conftest import random_replacements, tiny_llama

    adapter = ModelAdapter(tiny_llama(), name="m")
    model = random_replacements(adapter)
    torch.manual_seed(1)
    g = attribute(model, torch.randint(0, 97, (1, 8)), families=FamilyConfig(cosine=-1.0))
    c = g.collapsed()
    family_of = {m: f.id for f in g.families() for m in f.members}
    heads = [n for n in c.node_list if n.members and n.type == L]
    assert heads and c.expanded is g
    ids = {n.id for n in c.node_list}
    drawn = {(e.head, e.query, e.key, e.weight) for e in drawn_qk(c, ids, per_head=1, most=10**6)}
    some = 0
    for fam in heads:
        by_hand = sorted(((family_of.get(p.query, p.query), family_of.get(p.key, p.key), p.weight)
                          for m in fam.members for p in g.qk_pairs(m)), key=lambda t: -abs(t[2]))
        assert [(e.query, e.key, e.weight) for e in family_qk_pairs(c, fam)] == by_hand
        if by_hand:
            some += 1
            mine = {d for d in drawn if d[0] == fam.id}
            assert len(mine) == 1 and all(d[1] in ids and d[2] in ids for d in mine)
            assert abs(next(iter(mine))[3]) <= abs(by_hand[0][2])  # at its key first, then the strongest
    assert some


def test_a_collapsed_graph_in_networkx_tells_families_apart():
    """A family node's type is its members' and its index its rank, so without more only its id prefix told it from
    a head of that layer: it carries is_family and n_members (every other node is_family False)."""
    c = _graph().collapsed()
    g = c.to_networkx()
    fams = [n for n in c.node_list if n.members]
    assert fams and all(g.nodes[f.id]["is_family"] and g.nodes[f.id]["n_members"] == len(f.members) for f in fams)
    assert not any(g.nodes[n.id]["is_family"] for n in c.node_list if not n.members)


def test_family_contrast_sums_its_heads_real_score_differences():
    """Why a family of heads looks at its key (`family_contrast`): its difference is the sum over its members of
    each head's score at the key minus the other keys' attention-weighted mean, computed here from the Lorsa
    module's own Q and K (as tests/test_contrast.py does for one head); with every pair kept, its pairs add up to
    its pairs_total, and each pair's ends are nodes or families of the graph."""
    from graphs.attribution import attribute
    from graphs.families import family_contrast
    from replacement.models import ModelAdapter
    from tests.conftest import random_replacements, tiny_llama
    from tests.test_contrast import _real_scores

    model = random_replacements(ModelAdapter(tiny_llama(), name="m"))
    torch.manual_seed(1)
    ids = torch.randint(0, 97, (1, 9))
    g = attribute(model, ids, qk_top_keys=9, qk_top_pairs=10_000, families=FamilyConfig(cosine=-1.0))
    rec = model.record(ids)
    names = set(g.index) | {f.id for f in g.families()}
    checked = 0
    for f in g.families():
        if f.kind != L or f.pos == 0:
            assert family_contrast(g, f) is None
            continue
        c, n = family_contrast(g, f)
        s, want = f.key_positions[0], 0.0
        for m in map(g.node, f.members):
            A = rec.layers[m.layer].lorsa_pattern[m.index // model.lorsas[m.layer].cfg.heads_per_group, m.pos, : m.pos + 1]
            scores, rest = _real_scores(model, rec, m), A.clone()
            rest[s] = 0
            want += float(scores[s] - rest @ scores / rest.sum())
        assert n == len(f)  # every key is explained (qk_top_keys covers them all)
        assert c.difference == pytest.approx(want, rel=1e-4, abs=1e-4)
        assert c.difference == pytest.approx(c.pairs_total + c.query_bias_x_keys + c.position, rel=1e-5, abs=1e-5)
        assert sum(p.weight for p in c.pairs) == pytest.approx(c.pairs_total, rel=1e-4, abs=1e-4)
        assert all(p.query in names and p.key in names for p in c.pairs)
        assert [abs(p.weight) for p in c.pairs] == sorted((abs(p.weight) for p in c.pairs), reverse=True)
        checked += 1
    assert checked >= 2
