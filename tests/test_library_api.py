"""The library functions behind the commands: writing a graph's formats, filtering its nodes, the shared settings
checks, the saved metrics of a replacements folder, and the learning-rate schedule the trainers share."""
from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from graphs.attribution import attribute
from graphs.export import to_dict, to_dot
from graphs.files import parse_formats, write_all
from graphs.prune import prune
from replacement.checks import check_count, check_fraction
from replacement.errors import BadInputError
from replacement.models import ModelAdapter
from tests.conftest import random_replacements, tiny_llama


@pytest.fixture(scope="module")
def graph():
    adapter = ModelAdapter(tiny_llama(), name="m")
    torch.manual_seed(0)
    return prune(attribute(random_replacements(adapter), torch.randint(0, 97, (1, 8)), qk_heads=2), 0.9, 0.98)


def test_write_all_writes_each_format_and_the_dot_that_rendering_needs(graph, tmp_path):
    calls = []
    written = write_all(graph, tmp_path / "g", ["json", "html"], 20, dashboards=lambda: calls.append(1))
    assert list(written) == ["json", "html"] and calls == [1]  # dashboards asked for once, for the page
    assert json.loads(written["json"].read_text()) == json.loads(json.dumps(to_dict(graph)))
    assert not (tmp_path / "g.dot").exists()
    assert list(write_all(graph, tmp_path / "h", ["json"], 20, dashboards=lambda: calls.append(2))) == ["json"]
    assert calls == [1]  # no page, no dashboards
    if shutil.which("dot"):
        written = write_all(graph, tmp_path / "g", ["svg"], 20)
        assert list(written) == ["dot", "svg"] and written["dot"].read_text() == to_dot(graph, 20)
        assert written["svg"].read_text().lstrip().startswith(("<?xml", "<svg", "<!DOCTYPE"))


def test_write_all_without_graphviz_keeps_the_other_formats(graph, tmp_path, monkeypatch):
    """With no `dot` on PATH, asking for json and svg writes the JSON and the DOT and then says, in one line, that
    nothing was drawn (the rendering was started first and failed before the JSON was written: a script that
    caught the error had no graph.json)."""
    import graphs.export

    monkeypatch.setattr(graphs.export.shutil, "which", lambda name: None)
    with pytest.raises(BadInputError, match="graphviz's `dot` is not installed"):
        write_all(graph, tmp_path / "g", ["json", "svg"], 20)
    assert json.loads((tmp_path / "g.json").read_text()) == json.loads(json.dumps(to_dict(graph)))
    assert (tmp_path / "g.dot").read_text() == to_dot(graph, 20) and not (tmp_path / "g.svg").exists()


def test_nodes_filters_by_type_layer_and_position_and_refuses_an_unknown_type(graph):
    brute = [n for n in graph.node_list if n.type == "lorsa" and n.layer == 1 and n.pos == 7]
    assert graph.nodes(type="lorsa", layer=1, position=7) == brute and brute
    assert graph.nodes() == graph.node_list
    with pytest.raises(ValueError, match="unknown node type 'heads'; one of embedding, lorsa"):
        graph.nodes(type="heads")  # was an empty list: a misspelt type read as "no such nodes"
    # an id's prefix names its kind too, in filters and in top_paths' sources (was a bare ValueError from the enum)
    assert graph.nodes(type="tc") == graph.nodes(type="transcoder") and graph.nodes(type="emb") == graph.nodes(type="embedding")
    assert graph.top_paths(k=2, sources=("emb", "attn_err")) == graph.top_paths(k=2, sources=("embedding", "attn_error"))
    emb = graph.nodes(type="emb")[0].id  # a source node as the end: no path of two nodes or more (was [emb] alone)
    assert graph.top_paths(to=emb, k=3) == [] and graph.top_paths(to=emb, k=1) == []


def test_node_takes_the_names_pictures_and_printed_paths_give(graph):
    """`node` and `circuits query --node` take an id, a unit's short name, or a name as `trace` and `query` print it
    (`layout.node_name`), with or without what follows the position."""
    from graphs.layout import node_name

    for n in graph.node_list:  # every node: the names are written in graphs/layout.py and read in graphs/graph.py
        assert graph.node(node_name(graph, n)) is n and graph.node(n.id + " ") is n
        if n.type != "logit":
            assert graph.node(node_name(graph, n).split('"')[0].strip()) is n  # the name up to its position
    assert {n.type for n in graph.node_list} >= {"lorsa", "transcoder", "embedding", "mlp_error", "attn_error"}
    for logit in graph.logits():  # `logit " 98" (p=0.958) @4`
        assert graph.node(node_name(graph, logit)) is logit and graph.node(f'logit "{logit.label}"') is logit
    h = graph.nodes(type="lorsa")[0]
    assert graph.node(f"L{h.layer}.H{h.index}@{h.pos}") is h
    with pytest.raises(KeyError, match="no node 'L99.H1@0'"):
        graph.node("L99.H1@0")


def test_parse_formats(monkeypatch):
    assert parse_formats(" json, html ") == ["json", "html"]
    for bad in ("gif", "", " , ", "json,pdf"):
        with pytest.raises(BadInputError, match="unknown format"):
            parse_formats(bad)
    with pytest.raises(BadInputError, match="unknown format"):
        parse_formats("json", allowed=("dot", "svg"))
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(BadInputError, match="needs graphviz's `dot`"):
        parse_formats("json,svg")
    assert parse_formats("json,dot,html") == ["json", "dot", "html"]


def test_settings_checks_and_prune_share_them(graph):
    for ok in (1e-9, 0.5, 1.0):
        check_fraction("x", ok)
    for bad in (0.0, -1.0, 1.5, math.nan, math.inf):
        with pytest.raises(BadInputError, match=r"x must be in \(0, 1\]"):
            check_fraction("x", bad)
    check_count("n", None)
    check_count("n", 1)
    with pytest.raises(BadInputError, match="n must be at least 1, not 0"):
        check_count("n", 0)
    with pytest.raises(BadInputError, match="max_nodes must be at least 1"):
        prune(graph, 0.9, 0.98, max_nodes=0)


def test_saved_metrics_reads_the_folder_config(tmp_path):
    from replacement.errors import CheckpointError
    from replacement.store import saved_metrics

    assert saved_metrics(tmp_path) == {}
    cfg = {"modules": {"layer0.lorsa": {"file": "layer0.lorsa.safetensors", "metrics": {"fvu": 0.25}},
                       "layer1.transcoder": {"file": "layer1.transcoder.safetensors"}}}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert saved_metrics(tmp_path) == {"layer0.lorsa": {"fvu": 0.25}, "layer1.transcoder": {}}
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        saved_metrics(tmp_path)


def test_one_learning_rate_schedule():
    """Warm-up, constant, then linear decay to 10%: checked at its corners against the closed form."""
    from replacement.train import warmup_then_decay

    lr, steps, warmup, frac = 1e-3, 1000, 100, 0.25
    f = lambda s: warmup_then_decay(lr, s, steps, warmup, frac)  # noqa: E731
    assert f(0) == pytest.approx(lr / warmup) and f(warmup - 1) == pytest.approx(lr)
    assert f(warmup) == f(749) == lr
    assert f(750) == pytest.approx(lr) and f(875) == pytest.approx(lr * (1 - 0.9 * 0.5))
    assert f(steps) == pytest.approx(0.1 * lr)


@pytest.fixture(scope="module")
def small_model():
    adapter = ModelAdapter(tiny_llama(), name="m")
    return random_replacements(adapter)


@pytest.mark.parametrize("call, message", [
    (lambda m: attribute(m, torch.tensor([[1.0, 2.0]])), "must be whole numbers"),
    (lambda m: attribute(m, torch.tensor([[1, 97]])), "token id 97 in the prompt is outside the vocabulary"),
    (lambda m: attribute(m, torch.tensor([[-1, 2]])), "token id -1"),
    (lambda m: attribute(m, torch.zeros(2, 3, dtype=torch.long)), "one sequence of token ids"),
    (lambda m: attribute(m, torch.zeros(1, 0, dtype=torch.long)), "the prompt is empty"),
    (lambda m: attribute(m, torch.zeros(1, 65, dtype=torch.long)), "longer than the model's context of 64"),
    (lambda m: attribute(m, [1, 2.5]), "token ids (whole numbers)"),
    (lambda m: attribute(m, {"a": 1}), "not dict"),
    (lambda m: attribute(m.adapter, [1, 2]), "needs a ReplacementModel"),
    (lambda m: attribute(m, [1, 2], target=97), "target id 97 is outside the vocabulary"),
    (lambda m: attribute(m, [1, 2], target=2.5), "a token (text) or a token id"),
    (lambda m: attribute(m, [1, 2], qk_top_keys=0), "at least 1"),
    (lambda m: attribute(m, [1, 2], edges_per_target=0), "at least 1"),
    (lambda m: attribute(m, [1, 2], max_logits=0), "at least 1"),
    (lambda m: attribute(m, [1, 2], logit_coverage=2), "logit_coverage must be in (0, 1]"),
    (lambda m: _patch(m, [1, 2, 3], target=-1), "target id -1 is outside the vocabulary"),
    (lambda m: _patch(m, [1, 2, 3], target=3, baseline=10 ** 6), "baseline id 1000000"),
    (lambda m: _patch(m, [1, 2, 3], target=3, counterfactual=[1, 2]), "as many tokens as the prompt"),
])
def test_library_calls_refuse_bad_arguments_in_one_line(small_model, call, message):
    """Prompts as token ids, targets as ids, and settings given to the library are checked before any work: one
    BadInputError naming the argument, not an error from deep inside torch."""
    with pytest.raises(BadInputError, match="^[^\n]+$") as e:
        call(small_model)
    assert message in str(e.value)


def _patch(model, ids, target, baseline=None, counterfactual=None):
    from graphs.patching import PathPatcher

    return PathPatcher(model, ids, target, baseline, counterfactual)


def test_ids_and_ids_as_a_list_give_the_same_graph(small_model):
    """A prompt given as a tensor [n], [1, n] or a list of ids, and a target given by id, are the same request."""
    ids = [0, 5, 9, 14, 3]
    a = attribute(small_model, torch.tensor(ids), target=7, qk=False)
    b = attribute(small_model, ids, target=7, qk=False)
    assert [n.id for n in a.node_list] == [n.id for n in b.node_list] and "logit.7@4" in a.index
    assert torch.equal(a.edge_arrays.w, b.edge_arrays.w)


def test_graph_queries_refuse_unknown_names(graph):
    with pytest.raises(BadInputError, match="unknown edge kind 'foo'"):
        graph.incoming(graph.logits()[0].id, kind="foo")
    with pytest.raises(BadInputError, match="no node 'nope@1'"):
        graph.subgraph([graph.node_list[0].id, "nope@1"])


def test_queries_take_printed_names_and_refuse_what_has_no_answer(graph):
    """qk_pairs and top_paths(to=) read a node's name as `node` does (qk_pairs gave [] for a name, an unknown node
    or a feature: "no pairs"); logit takes a token's text; a graph with no logit says it has no target."""
    from graphs.layout import node_name

    head = next(h for h in graph.nodes(type="lorsa") if graph.qk_pairs(h.id))
    assert graph.qk_pairs(node_name(graph, head)) == graph.qk_pairs(head.id)
    assert graph.qk_pairs(f"L{head.layer}.H{head.index}@{head.pos}") == graph.qk_pairs(head.id)
    with pytest.raises(KeyError, match="no node"):
        graph.qk_pairs("lorsa.9.9@0")
    with pytest.raises(BadInputError, match="only Lorsa heads have QK pairs"):
        graph.qk_pairs(graph.nodes(type="tc")[0].id)
    assert graph.top_paths(to=node_name(graph, head), k=2) == graph.top_paths(to=head.id, k=2)
    logit = graph.logits()[0]
    assert graph.logit(logit.label) is logit and graph.logit(logit.index) is logit
    assert graph.top_paths(to=node_name(graph, logit), k=2) == graph.top_paths(to=logit.id, k=2)  # it was refused
    with pytest.raises(KeyError, match="no logit node"):
        graph.logit("no such token")
    with pytest.raises(BadInputError, match="no logit node"):
        graph.subgraph([head.id]).target


def test_compare_matches_nodes_by_id_or_from_the_end(small_model, tmp_path):
    """graphs.compare: every node of either graph once, matched by id (prompts of one length) or by position from
    the end; each change is b's influence less a's (0 for a node a graph lacks), largest first; `query --compare`
    prints it; --align alone, or ids across prompts of two lengths, are refused in one line."""
    from click.testing import CliRunner

    from cli.main import circuits
    from graphs.compare import compare
    from graphs.export import write_json

    a = attribute(small_model, [0, 5, 9, 14, 3], target=7, qk=False)
    b = attribute(small_model, [0, 5, 9, 15, 3], target=7, qk=False)
    changes = compare(a, b)
    assert sorted(c.key for c in changes) == sorted({n.id for n in a.node_list} | {n.id for n in b.node_list})
    for c in changes:
        want = (b.node(c.key).influence if c.key in b.index else 0) - (a.node(c.key).influence if c.key in a.index else 0)
        assert c.d_influence == pytest.approx(want, abs=1e-12) and c.where == (
            "both" if c.key in a.index and c.key in b.index else "only a" if c.key in a.index else "only b")
    assert [abs(c.d_influence) for c in changes] == sorted((abs(c.d_influence) for c in changes), reverse=True)
    longer = attribute(small_model, [0, 2, 5, 9, 14, 3], target=7, qk=False)  # one token more, at the front
    with pytest.raises(BadInputError, match="6 tokens: match nodes by position from the end"):
        compare(a, longer)
    ends = compare(a, longer, align="end")
    last = lambda g: {(n.type, n.layer, n.index) for n in g.nodes(position=len(g.tokens) - 1)}  # noqa: E731
    assert sum(c.where == "both" and c.key.endswith("@-1") for c in ends) == len(last(a) & last(longer))
    pa, pb = write_json(a, tmp_path / "a.json"), write_json(b, tmp_path / "b.json")
    r = CliRunner().invoke(circuits, ["query", str(pa), "--compare", str(pb)])
    both = sum(c.where == "both" for c in changes)
    unit = next(c for c in changes if (c.a or c.b).type != "logit")  # a logit is printed by its token
    assert r.exit_code == 0 and f"{both} nodes in both" in r.output and f"  {unit.key} " in r.output, r.output
    r = CliRunner().invoke(circuits, ["query", str(pa), "--align", "end"])
    assert r.exit_code == 1 and "give the other with --compare" in r.output
    other = attribute(small_model, [0, 5, 9, 15, 3], target=7, qk=False)  # graphs of another model's: not matched
    other.settings["model_fingerprint"] = "0123456789abcdef"  # (ids would name other units there, unsaid)
    with pytest.raises(BadInputError, match="traced with different models"):
        compare(a, other)


def test_queries_answer_bad_arguments_in_one_line_and_take_what_names_a_node(graph, tmp_path):
    """The Python API audit's defects: a negative k sliced off the weakest edges; a missing node was a KeyError in
    some calls, a BadInputError in others and a bare KeyError in graph_effects; node() refused a Node or NodeKey;
    subgraph split a string into characters and did not read printed names; a graph without a logit saved and
    then did not load; graph.json's is_target_logit was written and never read."""
    from graphs.export import read_json, write_json
    from graphs.graph import NodeKey, UnknownNodeError
    from graphs.layout import node_name
    from graphs.patching import graph_effects

    target = graph.target
    n_in = len(graph.incoming(target))
    assert n_in > 2 and len(graph.incoming(target, k=2)) == 2
    for k in (-1, 0, 1.5, True):
        for call in (lambda: graph.incoming(target, k=k), lambda: graph.outgoing(graph.node_list[0], k=k)):
            with pytest.raises(BadInputError, match="k must be"):
                call()
    head = graph.nodes(type="lorsa")[0]
    assert graph.node(head) is head and graph.node(NodeKey.parse(head.id)) is head
    key = NodeKey.parse(target.id)
    assert graph.incoming(key) == graph.incoming(target) and graph.outgoing(NodeKey.parse(head.id)) == graph.outgoing(head)
    assert graph.qk_pairs(NodeKey.parse(head.id)) == graph.qk_pairs(head.id)
    assert graph.node(node_name(graph, head)) is head
    for missing in (lambda: graph.node("lorsa.0.9999@1"), lambda: graph.subgraph(["nope"]),
                    lambda: graph_effects(graph, "nope"), lambda: graph.logit("no such token")):
        with pytest.raises(UnknownNodeError) as e:
            missing()
        assert isinstance(e.value, BadInputError) and isinstance(e.value, KeyError) and str(e.value).startswith("no ")
    assert torch.equal(graph_effects(graph, node_name(graph, target)), graph_effects(graph, target.id))
    with pytest.raises(BadInputError, match="a collection of nodes"):
        graph.subgraph(head.id)
    from graphs.compare import compare

    with pytest.raises(BadInputError, match="compare takes two graphs"):
        compare(graph, "traces/36-61")
    with pytest.raises(BadInputError, match="not NoneType"):  # None itself passed the check (an AttributeError)
        compare(graph, None)
    with pytest.raises(BadInputError, match="layer must be a whole number"):  # "1" matched nothing, without a word
        graph.nodes(layer="1")
    assert graph.nodes(layer=1) == [n for n in graph.node_list if n.layer == 1]
    with pytest.raises(BadInputError, match="a node id is text"):
        NodeKey.parse(5)
    assert graph.top_paths(k=2, sources="emb") == graph.top_paths(k=2, sources=("embedding",))  # read 'e', 'm', 'b'
    sub = graph.subgraph([node_name(graph, head), target, NodeKey.parse(graph.node_list[0].id)])
    assert {n.id for n in sub.node_list} == {head.id, target.id, graph.node_list[0].id}
    with pytest.raises(BadInputError, match="needs a logit node"):
        write_json(graph.subgraph([head.id]), tmp_path / "x.json")
    # the target a file marks is read back where its scores name none; two marks, or one against them, refused
    other = next(n for n in graph.logits() if n.id != target.id)
    d = to_dict(graph)
    d["metadata"]["scores"].pop("logit_decomposition", None)
    for node in d["nodes"]:
        node["is_target_logit"] = node["node_id"] == other.id
    (tmp_path / "marked.json").write_text(json.dumps(d))
    assert read_json(tmp_path / "marked.json").target.id == other.id
    d = to_dict(graph)
    for node in d["nodes"]:
        node["is_target_logit"] = node["node_id"] == other.id
    (tmp_path / "clash.json").write_text(json.dumps(d))
    from graphs.validate import BadGraphError

    assert graph.scores["logit_decomposition"]["target"]["node"] == target.id != other.id
    with pytest.raises(BadGraphError, match="is_target_logit marks"):
        read_json(tmp_path / "clash.json")
    d = to_dict(graph)
    d["nodes"][0]["is_target_logit"] = True  # an embedding
    for node in d["nodes"][1:]:
        node["is_target_logit"] = False
    (tmp_path / "notlogit.json").write_text(json.dumps(d))
    with pytest.raises(BadGraphError, match="not a logit node"):
        read_json(tmp_path / "notlogit.json")
    # a subgraph without the traced logit, but other logits, saves and loads: the likeliest it holds is its target
    sub = graph.subgraph([n.id for n in graph.node_list if n.id != target.id])
    assert read_json(write_json(sub, tmp_path / "sub.json")).target.id == sub.target.id != target.id


def test_circuit_helpers_and_patching_refuse_positions_layers_and_budgets_out_of_range(small_model, graph):
    """rank_lorsa_heads and induction_peak leaked IndexErrors; the library took budgets the CLI refuses
    (max_feature_nodes 0 made a graph of no features, max_nodes 0 read as the file cap); a reference prompt given
    as text failed deep in torch; z_peak of a feature failed in torch."""
    from graphs.circuits import induction_peak, operand_movers, z_peak
    from graphs.patching import PathPatcher, rank_lorsa_heads
    from graphs.pipeline import trace_graphs
    from graphs.prune import file_caps

    m = small_model
    with pytest.raises(BadInputError, match="layer 9 does not exist"):
        rank_lorsa_heads(m, [1, 2, 3], 9, 5)
    with pytest.raises(BadInputError, match="position 9 is outside"):
        rank_lorsa_heads(m, [1, 2, 3], 0, 5, positions=[9])
    with pytest.raises(BadInputError, match="outside the prompt"):
        induction_peak(graph, 99)
    with pytest.raises(BadInputError, match="outside the prompt"):
        operand_movers(graph, [99], 1)
    import numpy as np

    assert operand_movers(graph, [np.int64(0), 1], np.int64(3)) == operand_movers(graph, [0, 1], 3)
    with pytest.raises(BadInputError, match="no z pattern"):
        z_peak(graph.nodes(type="tc")[0])
    with pytest.raises(BadInputError, match="a FamilyConfig"):
        trace_graphs(m, [1, 2, 3], families="yes")
    for bad in (0, -1):
        with pytest.raises(BadInputError, match="max_feature_nodes must be at least 1"):
            trace_graphs(m, [1, 2, 3], max_feature_nodes=bad)
        with pytest.raises(BadInputError, match="max_nodes must be at least 1"):
            file_caps(bad, full=False)
    assert file_caps(None, False)[0] == file_caps(10 ** 9, False)[0] and file_caps(3, False)[0] == 3
    from replacement.assemble import ReplacementModel
    from replacement.models import load_model

    toy = ReplacementModel.load(load_model("toy"))  # a model with a tokenizer, for prompts as text
    ref = "the cat sat on the mat"
    as_ids = PathPatcher(toy, "a b c", " d", reference=[toy.adapter.tokenize(ref)]).effects(["mlp_err.0@3"],
                                                                                         mode="mean")
    by_text = PathPatcher(toy, "a b c", " d", reference=[ref]).effects(["mlp_err.0@3"], mode="mean")
    assert by_text[0].effect == as_ids[0].effect != 0
    with pytest.raises(BadInputError, match="list of prompts"):
        PathPatcher(toy, "a b c", " d", reference=ref)


def test_a_partial_set_names_the_runs_that_complete_it(small_model):
    """A set of Lorsa alone was told to run `--what all`, which then refused to replace the Lorsa: the advice names
    the missing kind and layers, one run per kind where layers lack different kinds."""
    from replacement.assemble import ReplacementModel, train_commands
    from replacement.errors import CircuitsError

    adapter = small_model.adapter
    lorsa = {("lorsa", L): m for L, m in small_model.lorsas.items()}
    with pytest.raises(CircuitsError, match=r"--what transcoder$"):
        ReplacementModel(adapter, lorsa)
    one = lorsa | {("transcoder", 0): small_model.transcoders[0]}
    with pytest.raises(CircuitsError, match=r"--what transcoder --layers 1$"):
        ReplacementModel(adapter, one)
    assert train_commands("m", [("lorsa", 0), ("transcoder", 1)], 2) == (
        "circuits train --model m --what lorsa --layers 0 and circuits train --model m --what transcoder --layers 1")
    assert train_commands("m", [(k, L) for k in ("lorsa", "transcoder") for L in (0, 1)], 2) == \
        "circuits train --model m --what all"


def test_top_paths_refuses_a_k_that_is_not_a_whole_number_at_once(graph):
    """top_paths(k=1.5) never reached len(out) == k: it enumerated every simple path into the target (it ran on
    without end on a trace's graph); k='3' and k=None were TypeErrors from a comparison, to=5 an AttributeError.
    A Node names the node as `node` takes it."""
    import signal

    def hung(signum, frame):
        raise TimeoutError("top_paths did not answer within 20 s")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(20)
    try:
        for bad in (dict(k=1.5), dict(k="3"), dict(k=None), dict(k=2.0), dict(max_len=3.5), dict(min_len=None)):
            with pytest.raises(BadInputError, match="top_paths needs whole numbers"):
                graph.top_paths(**bad)
        with pytest.raises(BadInputError, match="to= names a node by its id"):
            graph.top_paths(to=5)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert graph.top_paths(to=graph.target, k=2) == graph.top_paths(to=graph.target.id, k=2)


def test_saving_a_graph_names_the_file_asked_for(graph, tmp_path):
    """`save` into a folder is one line naming the file to give (os.replace named the temporary file: "Is a
    directory: '.g.tmp123' -> 'g'"); an error writing it names the path asked for, not its temporary name."""
    (tmp_path / "g").mkdir()
    with pytest.raises(BadInputError, match="is a folder; name the graph's file, e.g. .*g/graph.json"):
        graph.save(tmp_path / "g")
    with pytest.raises(FileNotFoundError) as e:
        graph.save("/proc/no/graph.json")
    assert e.value.filename == "/proc/no/graph.json"
    from graphs.export import read_json

    assert read_json(graph.save(tmp_path / "g" / "graph.json")) == graph
