"""JSON (schema-checked, viewer layout, exact round trip), DOT and rendering, queries, and `trace` end to end
on a tiny saved model with random replacements."""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest
import torch

import graphs
from graphs.attribution import attribute
from graphs.export import SCHEMA_PATH, render, to_dict, validate, write_dot, write_json
from graphs.prune import prune
from replacement.models import ModelAdapter
from tests import svg
from tests.conftest import random_replacements, tiny_llama


@pytest.fixture(scope="module")
def graph():
    adapter = ModelAdapter(tiny_llama(), name="m")
    model = random_replacements(adapter)
    torch.manual_seed(0)
    # no families: these tests check the grid with every node its own box (families: tests/test_families.py)
    return prune(attribute(model, torch.randint(0, 97, (1, 8)), qk_heads=4, families=None), 0.95, 0.995)


def test_json_validates_and_round_trips(graph, tmp_path):
    path = write_json(graph, tmp_path / "g.json")
    d = json.loads(path.read_text())
    validate(d)
    assert d["metadata"]["schema_version"] == 1 and json.loads(SCHEMA_PATH.read_text())["title"]
    assert (d["metadata"]["settings"]["dtype"], d["metadata"]["settings"]["device"]) == ("float32", "cpu")  # ran at
    for field in ("node_id", "feature", "layer", "ctx_idx", "feature_type", "jsNodeId", "clerp", "influence",
                  "activation", "token_prob", "is_target_logit"):
        assert all(field in n for n in d["nodes"])
    logit = [n for n in d["nodes"] if n["feature_type"] == "logit"][0]
    assert logit["clerp"].startswith('Output "') and "(p=" in logit["clerp"]
    assert sum(n["is_target_logit"] for n in d["nodes"]) == 1
    ids = [n["node_id"] for n in d["nodes"]]
    assert len(ids) == len(set(ids))
    assert any("qk" in n for n in d["nodes"]) and any("z_pattern" in n for n in d["nodes"])
    back = graphs.load(path)
    assert back == graph


def test_whole_numbers_written_as_floats_read_as_ints(graph, tmp_path):
    """JSON Schema's ``integer`` admits ``1.0``: such a file (another writer's) reads back as the same graph, with
    int layers, positions and indices (the DOT layout multiplies by them), and renders."""
    d = json.loads(write_json(graph, tmp_path / "g.json").read_text())
    for n in d["nodes"]:
        n.update(model_layer=float(n["model_layer"]), ctx_idx=float(n["ctx_idx"]), index=float(n["index"]))
    path = tmp_path / "floats.json"
    path.write_text(json.dumps(d))
    back = graphs.load(path)
    assert back == graph
    assert all(type(v) is int for n in back.node_list for v in (n.layer, n.pos, n.index))
    assert "digraph" in write_dot(back, tmp_path / "g.dot").read_text()


def test_qk_entries_round_trip_as_typed_objects(graph, tmp_path):
    """The QK results are written with their heads and read back as the same QKEntry / QKPair objects."""
    from graphs.graph import QKEntry, QKPair

    back = graphs.load(write_json(graph, tmp_path / "g.json"))
    heads = [n for n in graph.node_list if n.qk]
    assert heads and graph.qk
    for n in heads:
        got = back.node(n.id).qk
        assert all(isinstance(e, QKEntry) and all(isinstance(p, QKPair) for p in e.pairs) for e in got)
        assert got == n.qk
        for e in got:  # the score's four parts, as read back, still add up to it
            assert e.pairs_total + e.query_bias_x_keys + e.queries_x_key_bias + e.bias_x_bias == pytest.approx(e.score, abs=1e-5)
    assert [(e.head, e.query, e.key, e.key_pos, e.weight) for e in back.qk] == \
        [(e.head, e.query, e.key, e.key_pos, e.weight) for e in graph.qk]


def test_schema_rejects_broken_files(graph):
    import jsonschema

    d = to_dict(graph)
    del d["nodes"][0]["ctx_idx"]
    with pytest.raises(jsonschema.ValidationError):
        validate(d)


def _svg(graph, tmp_path, draw_nodes):
    if shutil.which("dot") is None:
        if os.environ.get("CIRCUITS_CI"):
            pytest.fail("graphviz's dot is required here (apt-get install graphviz)")
        pytest.skip("graphviz is not installed")
    return svg.parse(render(write_dot(graph, tmp_path / "g.dot", draw_nodes), "svg").read_text())


@pytest.mark.parametrize("budget", [1, 2, 3])
def test_a_budget_shorter_than_the_marked_path_draws_its_drawn_part(graph, tmp_path, budget):
    """`--draw-nodes` under the marked path's length (1 to 4 here) raised a KeyError in every picture: the path's
    edges were drawn whatever the budget kept; now the highlighter marks the edges between drawn nodes only."""
    from graphs.layout import marked_path

    root = _svg(graph, tmp_path, draw_nodes=budget)
    boxes = {k for k in svg.node_boxes(root) if k in graph.index}
    path = marked_path(graph)[1]
    assert len(path) > budget and boxes == set(path[:budget])  # the path's first nodes: the budget's first claim
    marked = {(e["source"], e["target"]) for e in svg.edges(root) if e["highlight"]}
    assert marked == {(a, b) for a, b in zip(path, path[1:]) if a in boxes and b in boxes}


def test_dot_draws_the_most_influential_nodes_on_a_grid(graph, tmp_path):
    from graphs.layout import node_name

    from graphs.layout import marked_path

    root = _svg(graph, tmp_path, draw_nodes=30)
    boxes = {k: v for k, v in svg.node_boxes(root).items() if k in graph.index}
    path = marked_path(graph)[1]
    assert set(boxes) == svg.drawn_by_rule(graph, 30, must=path) and set(path) <= set(boxes)
    drawn_edges = [e for e in svg.edges(root) if not e["dashed"] and not e["highlight"]]
    for k in boxes:  # no drawn node hangs loose: each but a logit has a drawn edge out
        assert graph.node(k).type == "logit" or any(e["source"] == k for e in drawn_edges), k
    marked = {(e["source"], e["target"]) for e in svg.edges(root) if e["highlight"]}
    assert marked == set(zip(path, path[1:]))  # the strongest path, under the highlighter
    svg.assert_grid(graph, {k: v["box"] for k, v in boxes.items()})
    w, h = svg.size(root)
    assert 0.5 <= w / h <= 3, (w, h)
    text = " ".join(t.text or "" for t in root.iter(svg.NS + "text"))
    n = len(boxes)
    assert f"{n} of {len(graph.node_list)} nodes drawn" in text and f"{len(graph.node_list) - n} left out" in text
    assert f"--draw-nodes {len(graph.node_list)}" in text  # which draws every one (`drawn_by_rule`)
    assert "--draw-nodes" in text
    texts = [t.text for t in root.iter(svg.NS + "text")]
    labels = list(zip(texts, texts[1:]))  # a column's label: its position over its token
    for p, tok in enumerate(graph.tokens):  # each column is labelled with its position and token, under and over
        assert labels.count((str(p), f'"{tok}"')) == 2
    for k, v in boxes.items():  # error nodes are dashed and say so; the others are not
        is_error = graph.node(k).type.endswith("error")
        assert bool(v["shape"].get("stroke-dasharray")) == is_error and ("error" in v["text"]) == is_error
    weights = {(e.source, e.target): e.weight for e in graph.edges}
    solid = [e for e in svg.edges(root) if not e["dashed"] and not e["highlight"]]
    assert solid and all(e["stroke"] == ("#2166ac" if weights[e["source"], e["target"]] > 0 else "#b2182b") for e in solid)
    into: dict[str, float] = {}
    for e in graph.edges:
        into[e.target] = into.get(e.target, 0.0) + abs(e.weight)
    flow = {(e["source"], e["target"]): abs(weights[e["source"], e["target"]]) / into[e["target"]]
            * max(graph.node(e["target"]).influence, 0.0) for e in solid}  # share of the target's input x its influence
    for e in solid:  # hovering an edge names its two ends and gives its weight; its width, the logits' input along it
        a, b = graph.node(e["source"]), graph.node(e["target"])
        assert e["tooltip"] == f"{node_name(graph, a)} -> {node_name(graph, b)}: {weights[a.id, b.id]:+.3g}"
        assert e["width"] == pytest.approx(0.4 + 3.6 * (flow[a.id, b.id] / max(flow.values())) ** 0.5, abs=0.01)
    outlined = {k for k, v in boxes.items() if v["shape"].get("stroke") == svg.HIGHLIGHT}
    assert outlined == set(path)  # the marked path's nodes, outlined
    assert all(e["source"] in boxes and e["target"] in boxes for e in svg.edges(root))


def test_node_names_are_distinct_and_readable(graph, saved_model):
    from transformers import AutoTokenizer

    from graphs.layout import box_label, node_name, one_line
    from replacement.tokenizer import token_text as decode

    for label in (node_name, box_label):
        names = [label(graph, n) for n in graph.node_list]
        assert len(set(names)) == len(names)
    for n in graph.logits():  # a drawn logit's probability: two decimals, and "p<0.01" rather than "p=0.00"
        assert box_label(graph, n).endswith(f"p={n.prob:.2f}" if n.prob >= 0.005 else "p<0.01")
        assert not box_label(graph, n).endswith("p=0.00")
    assert one_line("a\nb\tc\x01") == "a\\nb\\tc\\x01"
    assert one_line("\\") == "\\\\" and one_line("\\n") != one_line("\n")  # a backslash is doubled
    tok = AutoTokenizer.from_pretrained(saved_model)
    texts = [decode(tok, i) for i in range(len(tok))]
    assert len(set(texts)) == len(texts) and "\ufffd" not in "".join(texts)
    ids = tok.encode("caf\u00e9 \u2014", add_special_tokens=False)  # bytes the tiny tokenizer never merged
    assert "".join(decode(tok, i) for i in ids) == "caf<0xC3><0xA9> <0xE2><0x80><0x94>"


def _sentencepiece_style_tokenizer():
    """A byte-fallback BPE with sentencepiece's word-start mark (as Llama-2's), trained on a little text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    tok.train_from_iterator(["import os, sys; print(sys.argv) is as it was, this is his"] * 50,
                            trainers.BpeTrainer(vocab_size=320, special_tokens=specials))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_every_token_trace_prints_names_that_token(saved_model):
    """`token_text` reads every token apart (bytes as <0x82>, a sentencepiece word start with its space), and what
    it prints, given back as a --target (`single_token`), is that token: byte-level BPE and sentencepiece style;
    so is the token as `trace` prints it between quotes (``'\\n'``), typed back without them."""
    from transformers import AutoTokenizer

    from replacement.errors import BadInputError
    from replacement.models import single_token
    from replacement.tokenizer import token_text

    for tok in (AutoTokenizer.from_pretrained(saved_model), _sentencepiece_style_tokenizer()):
        ids = [i for i in range(len(tok)) if i not in tok.all_special_ids]
        texts = [token_text(tok, i) for i in ids]
        assert len(set(texts)) == len(texts)
        assert [single_token(tok, t) for t in texts] == ids
        printed = [repr(t)[1:-1] for t in texts]  # as trace prints them between quotes: a line break as \\n
        assert [single_token(tok, p) for p in printed] == ids
    from replacement.models import load_tokenizer

    byte_level = AutoTokenizer.from_pretrained(saved_model)
    assert len(byte_level.encode("é", add_special_tokens=False)) == 2 and byte_level.convert_tokens_to_ids("é") > 0
    with pytest.raises(BadInputError, match="not a single token"):  # the piece "é" is the byte 0xE9, not the text
        single_token(byte_level, "é")
    toy = load_tokenizer("toy")[0]  # a vocabulary with a line break, a tab and a backslash
    for t in ("\n", "\t", "\\"):
        assert repr(t)[1:-1] != t and single_token(toy, repr(t)[1:-1]) == single_token(toy, t)
    for bad in ("\\UFFFFFFFF", "\\ud800"):  # escapes of no character: refused in one line, as given
        with pytest.raises(BadInputError, match="not a single token"):
            single_token(toy, bad)
    sp = _sentencepiece_style_tokenizer()
    ids = sp.encode("this is his", add_special_tokens=False)
    assert [token_text(sp, i) for i in ids][0].startswith(" ")  # the word start's mark is its space
    vocab = sp.get_vocab()
    both = [p for p in vocab if p.isalpha() and "\u2581" + p in vocab]  # e.g. "is" within a word and "▁is" starting one
    assert both
    for p in both:  # "is" names the piece within a word, " is" the one that starts a word
        assert single_token(sp, p) == vocab[p] and single_token(sp, " " + p) == vocab["\u2581" + p]


def test_ids_past_the_tokenizer_read_apart_and_stay_out_of_lenses(saved_model):
    """A padded vocabulary (Pythia: 50,304 unembedding rows, 50,277 tokens): the ids past the tokenizer all read
    '' (trace's top predictions read '' 0.477, '' 0.358 and warned that the pure replacement predicts '', the real
    model ''); they now read as their ids, and a lens never lists them, as it never lists special tokens."""
    from transformers import AutoTokenizer

    from replacement.tokenizer import special_ids, token_text

    tok = AutoTokenizer.from_pretrained(saved_model)
    n = len(tok)
    assert [token_text(tok, i) for i in (n, n + 1)] == [f"<id {n}>", f"<id {n + 1}>"]
    assert token_text(tok, n - 1) != token_text(tok, n) != ""
    assert special_ids(tok, n + 3)[-3:] == [n, n + 1, n + 2]
    assert set(special_ids(tok, n)) == {i for i in tok.all_special_ids if i < n}


def test_queries(graph):
    logit = graph.logits()[0]
    paths = graph.top_paths(k=3)
    assert paths and paths[0][1][-1] == logit.id
    assert [p[0] for p in paths] == sorted((p[0] for p in paths), reverse=True)
    inc = graph.incoming(logit, k=3)
    assert all(e.target == logit.id for e in inc) and abs(inc[0].weight) >= abs(inc[-1].weight)
    g = graph.to_networkx()
    import networkx as nx

    assert nx.is_directed_acyclic_graph(g) and logit.id in g
    assert g.number_of_edges() == len(graph.edge_arrays) and g.nodes[logit.id]["type"] == "logit"
    assert {(e.source, e.target): e.weight for e in graph.edges} == {(a, b): d["weight"] for a, b, d in g.edges(data=True)}
    nx.write_graphml(g, io.BytesIO())  # plain attributes: networkx's writers take it
    json.dumps(nx.node_link_data(g, edges="links"))
    # with QK pairs: two more edges per pair, query side and key side, into its head
    m = graph.to_networkx(include_qk=True)
    assert graph.qk and m.number_of_edges() == len(graph.edge_arrays) + 2 * len(graph.qk)
    qk = [(a, b, d) for a, b, d in m.edges(data=True) if d["kind"] == "qk"]
    for side in ("query", "key"):
        assert sorted((d[f"{side}_node"], b, d["weight"]) for a, b, d in qk if d["side"] == side) == \
            sorted((getattr(e, side), e.head, e.weight) for e in graph.qk)
        assert all(a == d[f"{side}_node"] for a, b, d in qk if d["side"] == side)
    nx.write_graphml(m, io.BytesIO())
    assert all(n.pos == 3 for n in graph.nodes(position=3))
    sub = graph.subgraph([n.id for n in graph.node_list if n.type != "mlp_error"])
    assert not sub.nodes(type="mlp_error") and len(sub.edge_arrays) <= len(graph.edge_arrays)


def _trace(*args, cwd=None):
    return subprocess.run([sys.executable, "-c", "from cli.trace import trace; trace()", *args], capture_output=True,
                          text=True, timeout=300, cwd=cwd)


def test_a_reused_output_folder_names_the_files_it_did_not_write(saved_model, tmp_path):
    """A second trace into the same folder leaves the first one's files of other formats (runs never delete each
    other's files) but says they are there: they may show another prompt's graph."""
    out = tmp_path / "o"
    r = _trace("the cat sat", "--model", str(saved_model), "--out", str(out), "--format", "json,dot")
    assert r.returncode == 0, r.stderr
    r = _trace("a dog ran", "--model", str(saved_model), "--out", str(out), "--format", "json")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["graph.dot", "graph.json"]
    assert f"note: {out} also holds graph.dot, which this trace did not write" in r.stdout
    assert graphs.load(out / "graph.json").prompt == "a dog ran"
    # the folder stands for its graph.json in query and render
    by_file, by_folder = (subprocess.run([sys.executable, "-c", "from cli.main import circuits; circuits()", "query",
                                          str(p), "--paths", "2"], capture_output=True, text=True, timeout=300)
                          for p in (out / "graph.json", out))
    assert by_folder.returncode == 0 and by_folder.stdout == by_file.stdout and "a dog ran" in by_file.stdout


def test_trace_without_graphviz_writes_json_and_dot_and_says_why(saved_model, tmp_path):
    """The default formats on a machine without graphviz's `dot` (no `dot` on PATH): graph.json and graph.dot, a
    note naming what was not drawn and how to get it; an explicit --format svg is still refused in one line."""
    empty = tmp_path / "bin"
    empty.mkdir()
    env = {**os.environ, "PATH": str(empty)}
    run = lambda *extra: subprocess.run([sys.executable, "-c", "from cli.trace import main; main()", "the cat sat",  # noqa: E731
                                         "--model", str(saved_model), *extra], capture_output=True, text=True,
                                        timeout=300, env=env, cwd=tmp_path)
    r = run("--out", str(tmp_path / "o"))
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["graph.dot", "graph.json"]
    assert "note: graphviz's `dot` is not installed, so no graph.svg was drawn (apt-get install graphviz)" in r.stdout
    r = run("--out", str(tmp_path / "p"), "--format", "json,svg")
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [r.stderr.strip()] and "needs graphviz" in r.stderr


def test_trace_writes_json_dot_svg(saved_model, tmp_path):
    t0 = time.time()
    r = subprocess.run([sys.executable, "-c", "from cli.trace import main; main()", "the cat sat", "--model", str(saved_model),
                        "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=300)
    wall = time.time() - t0
    assert r.returncode == 0, r.stderr
    assert "replacement score" in r.stdout
    g = graphs.load(tmp_path / "o" / "graph.json")
    validate(json.loads((tmp_path / "o" / "graph.json").read_text()))
    assert (tmp_path / "o" / "graph.dot").is_file()
    if shutil.which("dot"):
        assert (tmp_path / "o" / "graph.svg").is_file()
    # the strongest path printed starts at an embedding; the strongest from an error node has a line of its own
    feature = re.search(r"^strongest feature path .*\n  ids: (.*)$", r.stdout, re.M)
    error = re.search(r"^strongest error path .*\n  ids: (.*)$", r.stdout, re.M)
    assert feature and error, r.stdout
    assert feature.group(1).split(" -> ") == g.top_paths(k=1, sources=("embedding",), min_len=3)[0][1]
    assert g.node(error.group(1).split(" -> ")[0]).type.endswith("error")
    top = g.logits()[0]
    assert f"top logit {top.label!r}: {top.activation:.2f} demeaned" in r.stdout
    # the time line covers the command: its parts add up to its total, and the total to the process's life
    # but for the interpreter's start (and this test's own overhead, on a busy machine)
    m = re.search(r"^time: ([\d.]+)s in all \((.*)\)$", r.stdout, re.M)
    parts = {k: float(v) for k, v in re.findall(r"([a-z +]+) ([\d.]+)s", m.group(2))}
    assert {"imports", "load", "attribution + pruning", "files"} <= {k.strip() for k in parts}
    assert abs(sum(parts.values()) - float(m.group(1))) <= 0.1 * len(parts)
    assert wall - 1.5 <= float(m.group(1)) <= wall, (m.group(0), wall)


def test_query_paths_end_at_the_traced_target_or_at_to(saved_model, tmp_path):
    """`query --paths` follows the trace's --target (the logit its decomposition names), not the top logit; `--to`
    names another end (an id or a picture's name); a node listing names each node (a logit by its token); a
    reader that stops reading (`| head`) ends the command quietly."""
    from graphs.layout import node_name

    r = _trace("the cat sat on", "--model", str(saved_model), "--out", str(tmp_path), "--format", "json")
    assert r.returncode == 0, r.stderr
    g = graphs.load(tmp_path / "graph.json")
    other = g.logits()[1]  # not the top token
    r = _trace("the cat sat on", "--model", str(saved_model), "--out", str(tmp_path), "--format", "json",
               "--target", other.label)
    assert r.returncode == 0, r.stderr
    g = graphs.load(tmp_path / "graph.json")
    # Python sees the same target: `target`, the default end of `top_paths`, and the one logit graph.json marks
    assert g.target.id == other.id and g.target is not g.logits()[0]
    assert g.top_paths(k=3) == g.top_paths(to=other.id, k=3) and g.top_paths(k=1) == g.top_paths(to=other.id, k=1)
    marked = [x["node_id"] for x in json.loads((tmp_path / "graph.json").read_text())["nodes"] if x["is_target_logit"]]
    assert marked == [other.id]
    # the pruned graph's decomposition, stored and printed, is that of the graph the file holds
    from graphs.prune import logit_decomposition

    kept, full = logit_decomposition(g, other.index), g.scores["logit_decomposition"]
    assert logit_decomposition(g) == kept  # by default, of the graph's target
    stored = g.scores["pruned_logit_decomposition"]
    for key in ("target", "runner_up", "margin"):
        assert {k: v for k, v in stored[key].items() if isinstance(v, float)} == pytest.approx(
            {k: v for k, v in kept[key].items() if isinstance(v, float)}, abs=1e-4)
    lost = kept["target"]["dropped"] - full["target"]["dropped"]
    assert f"the pruned graph (graph.json's) leaves out {lost:+.2f} of the logit and " in r.stdout, r.stdout
    query = lambda *a: subprocess.run([sys.executable, "-c", "from cli.main import circuits; circuits()", "query",  # noqa: E731
                                       str(tmp_path), *a], capture_output=True, text=True, timeout=300)
    r = query("--paths", "3")
    assert r.returncode == 0 and f"strongest paths into {other.id} (the trace's target):" in r.stdout, r.stderr
    ends = [ln.split()[-1] for ln in r.stdout.splitlines() if ln.startswith("  ")]
    assert ends and set(ends) == {other.id}
    assert ends == [p[-1] for _, p in g.top_paths(to=other.id, k=3)]
    head = max(g.nodes(type="lorsa"), key=lambda n: n.influence)
    r = query("--paths", "2", "--to", f"L{head.layer}.H{head.index}@{head.pos}")
    assert r.returncode == 0 and f"strongest paths into {head.id}:" in r.stdout, r.stderr
    r = query("--to", "tc.9.9@99")
    assert r.returncode == 1 and r.stderr.strip() == f"error: no node 'tc.9.9@99' in {tmp_path} (list them with " \
        "--type, --layer or --position)"
    r = query("--type", "logit")
    assert [ln.split(None, 5)[-1] for ln in r.stdout.splitlines()[1:]] == [node_name(g, n) for n in g.logits()]
    reader = subprocess.Popen([sys.executable, "-c", "from cli.main import circuits; circuits()", "query", str(tmp_path),
                               "--type", "lorsa"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    reader.stdout.close()  # as `| head` does once it has its lines
    assert reader.wait(timeout=300) == 1 and reader.stderr.read() == b""
    # a trace whose reader is gone (`trace ... | grep -q`) still writes its files, then ends as quietly
    reader = subprocess.Popen([sys.executable, "-c", "from cli.trace import trace; trace()", "the cat sat", "--model",
                               str(saved_model), "--out", str(tmp_path / "piped"), "--format", "json"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    reader.stdout.close()
    assert reader.wait(timeout=300) == 1 and reader.stderr.read() == b""
    assert graphs.load(tmp_path / "piped").prompt == "the cat sat"


def test_query_and_render_commands(saved_model, tmp_path):
    r = _trace("the cat sat", "--model", str(saved_model), "--out", str(tmp_path), "--format", "json")
    assert r.returncode == 0, r.stderr
    path = str(tmp_path / "graph.json")
    r = subprocess.run([sys.executable, "-c", "from cli.main import circuits; circuits()", "query", path, "--node", "tc.9.9@99"],
                       capture_output=True, text=True, timeout=300)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode != 0 and len(lines) == 1 and "no node 'tc.9.9@99'" in lines[0], r.stderr
    g = graphs.load(path)
    head = next(n for n in g.nodes(type="lorsa") if n.qk and n.qk[0].contrast is not None)
    c = head.qk[0].contrast
    r = subprocess.run([sys.executable, "-c", "from cli.main import circuits; circuits()", "query", path, "--node", head.id],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    # the contrast of the head's top key, as the file holds it
    assert f"vs the other keys' attention-weighted mean (score {c.reference_score:+.3f}): difference {c.difference:+.3f}" in r.stdout
    assert f"{c.pairs[0].query} x {c.pairs[0].key} {c.pairs[0].weight:+.4f}" in r.stdout
    # the name the pictures give it (L1.H5@3) finds the same node
    by_name = subprocess.run([sys.executable, "-c", "from cli.main import circuits; circuits()", "query", path,
                              "--node", f"L{head.layer}.H{head.index}@{head.pos}"], capture_output=True, text=True,
                             timeout=300)
    assert by_name.returncode == 0 and by_name.stdout == r.stdout, by_name.stderr
    for args, want in ((["--type", "lorsa", "--position", "2"], g.nodes(type="lorsa", position=2)),
                       (["--layer", "7"], [])):
        r = subprocess.run([sys.executable, "-c", "from cli.main import circuits; circuits()", "query", path, *args],
                           capture_output=True, text=True, timeout=300)
        listed = [ln.split()[0] for ln in r.stdout.splitlines()[1:]]
        assert r.returncode == 0 and listed == ([n.id for n in want] or ["no"]), (r.stdout, r.stderr)
    layers = [n.layer for n in g.node_list]
    assert (f"no node matches (the graph's nodes: layers {min(layers)}..{max(layers)}, positions "
            f"0..{len(g.tokens) - 1})") in r.stdout  # not a silent nothing
    dot = (tmp_path / "graph.dot").read_bytes() if (tmp_path / "graph.dot").is_file() else None
    r = subprocess.run([sys.executable, "-c", "from cli.main import circuits; circuits()", "render", path, "--format",
                        "svg,html", "--draw-nodes", "7"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "graph.html").is_file() and "graph.dot" not in r.stdout  # as trace: only what was asked for
    assert (tmp_path / "graph.dot").read_bytes() == dot if dot is not None else not (tmp_path / "graph.dot").exists()
    if shutil.which("dot"):
        g = graphs.load(path)
        drawn = set(svg.node_boxes(svg.parse((tmp_path / "graph.svg").read_text()))) & (set(g.index) |
                                                                                        {f.id for f in g.families()})
        assert len(drawn) == 7  # a family (graphs/families.py) is drawn as one node


@pytest.mark.parametrize("args, message", [
    (("",), "the prompt is empty"),
    (("the cat " * 40,), "longer than the model's context"),
    (("the cat", "--node-threshold", "1.5"), "--node-threshold must be in (0, 1]"),
    (("the cat", "--target", "zzqqxx yy"), "not a single token"),
    (("the cat", "--out", "/proc/nope/x"), "cannot write to --out"),
    (("the cat", "--device", "cuda"), "no CUDA GPU") if not torch.cuda.is_available() else (("", ), "empty"),
    (("the cat", "--format", "gif"), "unknown format"),
])
def test_trace_bad_input_is_one_line(saved_model, tmp_path, args, message):
    r = _trace(args[0], "--model", str(saved_model), "--out", str(tmp_path / "o"), *args[1:])
    assert r.returncode != 0 and "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and message in lines[0], r.stderr


def test_trace_without_replacements_and_with_foreign_ones(saved_model, tmp_path):
    plain = tmp_path / "plain"
    shutil.copytree(saved_model, plain, ignore=shutil.ignore_patterns("replacements"))
    r = _trace("the cat", "--model", str(plain), "--out", str(tmp_path / "o"))
    assert r.returncode != 0 and "circuits train --model" in r.stderr and "Traceback" not in r.stderr
    other = tmp_path / "other"
    shutil.copytree(saved_model, other)
    m = tiny_llama(vocab_size=2400, num_hidden_layers=2)
    with torch.no_grad():
        next(m.parameters()).add_(1.0)
    m.save_pretrained(other)  # same shape, other weights: the replacements belong to another model
    r = _trace("the cat", "--model", str(other), "--out", str(tmp_path / "o"))
    assert r.returncode != 0 and "were trained on model" in r.stderr and "Traceback" not in r.stderr
    # a truncated checkpoint
    broken = tmp_path / "broken"
    shutil.copytree(saved_model, broken)
    f = broken / "replacements" / "layer0.transcoder.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    r = _trace("the cat", "--model", str(broken), "--out", str(tmp_path / "o"))
    assert r.returncode != 0 and "corrupt or truncated" in r.stderr and "Traceback" not in r.stderr


def test_circuits_train_and_eval_commands(saved_model, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("the cat sat on the mat and the dog sat on the log.\n" * 200)
    out = tmp_path / "rep"
    r = subprocess.run([sys.executable, "-c", "from cli.main import circuits; circuits()", "train", "--model", str(saved_model),
                        "--what", "transcoder", "--layers", "1", "--steps", "4", "--batch-size", "4", "--seq-len", "16",
                        "--tc-expansion", "2", "--text", str(text), "--out", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "layer1.transcoder" in r.stdout and (out / "layer1.transcoder.safetensors").is_file()
    r = subprocess.run([sys.executable, "-c", "from cli.main import circuits; circuits()", "eval", "--model", str(saved_model),
                        "--replacements", str(out), "--json", "--no-samples", "--text", str(text)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert "layer1.transcoder" in d["replacements"] and d["replacements"]["layer1.transcoder"]["l0"] <= 32
    # a freshly trained model with no replacements yet, named by a relative path (its own replacements folder,
    # absent, was taken for an HF repo id "runs/x" and the command failed)
    fresh = tmp_path / "runs" / "fresh"
    shutil.copytree(saved_model, fresh, ignore=shutil.ignore_patterns("replacements"))
    r = subprocess.run([sys.executable, "-c", "from cli.main import circuits; circuits()", "eval", "--model",
                        "runs/fresh", "--json", "--no-samples", "--text", str(text)],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path,
                       env={**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))})
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert "replacements" not in d and d["heldout_text_loss"] > 0


def test_json_loads_with_circuit_tracers_own_models(graph, tmp_path):
    """circuit-tracer's pydantic graph models (frontend/graph_models.py, read from its wheel without installing
    the package, whose pins clash with ours) accept the JSON we write."""
    import os
    import types
    import zipfile

    wheel = os.environ.get("CIRCUIT_TRACER_WHEEL")
    if not wheel:
        if os.environ.get("CIRCUITS_CI"):  # .ci/run fetches the wheel
            pytest.fail("CIRCUIT_TRACER_WHEEL is not set")
        pytest.skip("set CIRCUIT_TRACER_WHEEL to a circuit-tracer wheel (pip download --no-deps circuit-tracer)")
    pytest.importorskip("pydantic")
    source = zipfile.ZipFile(wheel).read("circuit_tracer/frontend/graph_models.py").decode()
    mod = types.ModuleType("circuit_tracer_graph_models")
    exec(compile(source, "graph_models.py", "exec", dont_inherit=True), mod.__dict__)  # not our __future__ flags
    d = json.loads(write_json(graph, tmp_path / "g.json").read_text())
    model = mod.Model.model_validate(d)
    assert len(model.nodes) == len(d["nodes"]) and len(model.links) == len(d["links"])
    assert {n.node_id for n in model.nodes} == {n.id for n in graph.node_list}
    assert sum(n.is_target_logit for n in model.nodes) == 1
    assert all(n.layer == "E" for n in model.nodes if n.feature_type == "embedding")
    # each kind's `feature` number as circuit-tracer's own constructors make it, where it has that kind
    ours = {n["node_id"]: n for n in d["nodes"]}
    for nd in graph.node_list:
        theirs = {"transcoder": lambda: mod.Node.feature_node(nd.layer, nd.pos, nd.index),
                  "mlp_error": lambda: mod.Node.error_node(nd.layer, nd.pos),
                  "embedding": lambda: mod.Node.token_node(nd.pos, nd.index),
                  "logit": lambda: mod.Node.logit_node(nd.pos, nd.index, nd.label, 2)}.get(nd.type.value)
        if theirs is not None:
            assert ours[nd.id]["feature"] == theirs().feature, nd.id
    # the viewer (frontend/assets/attribution_graph/util-cg.js) keys a node by layer_feature_ctx, an error node
    # also by its position from the end: no two of our nodes may share a key (a Lorsa head and a transcoder
    # feature of one index, layer and position did; an attention and an MLP error of one layer and position did)
    n_tokens = len(d["metadata"]["prompt_tokens"])
    keys = [f"{n['layer']}_{n['feature']}_{n['ctx_idx']}" + (f"__err_idx_{n_tokens - n['ctx_idx']}"
                                                             if "error" in n["feature_type"] else "") for n in d["nodes"]]
    assert len(keys) == len(set(keys))
    errors = [n for n in d["nodes"] if "error" in n["feature_type"]]
    assert {n["feature_type"] for n in errors} == {"mlp reconstruction error", "attention reconstruction error"}
    # a graph in circuit-tracer's own layout (its model, dumped: none of our fields) is refused as such, in one line
    from graphs.validate import BadGraphError, check_graph_dict

    theirs = model.model_dump()
    with pytest.raises(BadGraphError, match="is a graph in circuit-tracer's .* own layout"):
        check_graph_dict(theirs, "g.json")


SPIN = "import time\nfrom cli.common import spinner\nwith spinner('loading m'):\n    time.sleep(0.6)\nprint('done')"


def test_spinner_shows_on_a_terminal_and_stays_out_of_logs():
    import pty

    pid, fd = pty.fork()
    if pid == 0:  # the child: a process whose stdout and stderr are a terminal
        os.execv(sys.executable, [sys.executable, "-c", SPIN])
    out = b""
    while True:
        try:
            chunk = os.read(fd, 1024)
        except OSError:  # the child is gone
            break
        if not chunk:
            break
        out += chunk
    os.waitpid(pid, 0)
    text = out.decode()
    frames = re.findall(r"\r([|/\\-]) loading m (\d+\.\d)s", text)
    assert len(frames) >= 3 and len({f for f, _ in frames}) >= 3, text  # it turns, counting the seconds
    last = re.search(r"\rloading m (\d+\.\d)s\r?\n", text)  # then the time it took, on a line of its own
    assert last and float(last.group(1)) >= 0.6 and text.rstrip().endswith("done"), text
    r = subprocess.run([sys.executable, "-c", SPIN], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout == "done\n" and r.stderr == ""


def test_strongest_path_equals_networkx_first_path(graph):
    """top_paths(k=1) (a hop-limited Bellman-Ford on the edge arrays) finds networkx's first simple path."""
    from graphs.graph import INPUT_KINDS

    for sources, min_len in ((INPUT_KINDS, 2), (("embedding",), 2), (("embedding",), 3), (INPUT_KINDS, 4)):
        for to in [n.id for n in graph.logits()] + [n.id for n in graph.nodes("transcoder")][-3:]:
            fast = graph.top_paths(to=to, k=1, sources=sources, min_len=min_len)
            slow = graph._top_paths_nx(to, 1, 12, sources, min_len)
            assert [p for _, p in fast] == [p for _, p in slow]
            assert all(abs(a - b) <= 1e-9 * b for (a, _), (b, _) in zip(fast, slow))
            assert all(len(p) >= min_len for _, p in fast)


def test_a_token_holding_a_double_quote_is_quoted_readably():
    from graphs.layout import quoted

    assert quoted('"') == "'\"'" and quoted(" 98") == '" 98"' and quoted("it's") == "\"it's\""
    texts = ['"', "'", "a\"b", "'a", '"a', "a"]
    assert len({quoted(t) for t in texts}) == len(texts)  # distinct tokens stay distinct


def test_edge_routes_bow_around_a_node_in_the_way():
    """Three nodes in one column, one over the other, and one to the side: the edge from the lowest to the highest
    bows around the middle one (checked on a fine sampling of its curve), on the side that stays in the grid;
    the edge to the middle one, with nothing between, stays straight; one across columns is an S (controls at its
    ends' x); one that does not go up runs centre to centre."""
    from graphs.layout import NODE_H, NODE_W, Grid, edge_routes

    x, xr = 200.0, 200.0 + NODE_W + 12.0
    xy = {"low": (x, 50.0), "mid": (x, 150.0), "top": (x, 250.0), "side": (xr, 150.0)}
    g = Grid(xy, {k: NODE_W for k in xy}, 200.0 + 2 * NODE_W + 40.0, 300.0, [], [], (0.0, 300.0))
    up, near, across, level = edge_routes(g, [("low", "top"), ("low", "mid"), ("low", "side"), ("mid", "side")])
    x0, y0, x1, y1, x2, y2, x3, y3 = up
    assert (x0, y0, x3, y3) == (x, 50 + NODE_H / 2, x, 250 - NODE_H / 2) and x1 == x2 != x
    t = torch.linspace(0, 1, 1001)[:, None]
    pts = (1 - t) ** 3 * torch.tensor([x0, y0]) + 3 * (1 - t) ** 2 * t * torch.tensor([x1, y1]) + \
        3 * (1 - t) * t ** 2 * torch.tensor([x2, y2]) + t ** 3 * torch.tensor([x3, y3])
    in_mid = ((pts[:, 0] - x).abs() < NODE_W / 2) & ((pts[:, 1] - 150).abs() < NODE_H / 2)
    in_side = ((pts[:, 0] - xr).abs() < NODE_W / 2) & ((pts[:, 1] - 150).abs() < NODE_H / 2)
    assert not in_mid.any() and not in_side.any()
    assert x1 < x  # the right side holds "side": the bow goes left, which the grid's width allows
    assert near == (x, 50 + NODE_H / 2, x, 100.0, x, 100.0, x, 150 - NODE_H / 2)
    assert across[2] == x and across[4] == xr  # an S: leaves and arrives vertically
    assert level == (x, 150.0, x, 150.0, xr, 150.0, xr, 150.0)


def _passes(route, xy, w, h, skip=()):
    """The nodes (centres ``xy``, boxes w x h) a route's Bezier curve passes, on a fine sampling."""
    x0, y0, x1, y1, x2, y2, x3, y3 = route
    t = torch.linspace(0, 1, 2001)[:, None]
    pts = (1 - t) ** 3 * torch.tensor([x0, y0]) + 3 * (1 - t) ** 2 * t * torch.tensor([x1, y1]) + \
        3 * (1 - t) * t ** 2 * torch.tensor([x2, y2]) + t ** 3 * torch.tensor([x3, y3])
    return {k for k, (cx, cy) in xy.items() if k not in skip
            and bool((((pts[:, 0] - cx).abs() < w / 2) & ((pts[:, 1] - cy).abs() < h / 2)).any())}


def test_the_marked_path_bows_around_a_crowded_row():
    """A row of five nodes between an edge's ends, too wide for the ordinary bows (1-4 half node widths): an
    ordinary edge stays straight through the middle one, while an edge of the marked path bows further and passes
    none (the highlighted band seemed to run through nodes that were not on the path)."""
    from graphs.layout import GAP, NODE_H, NODE_W, Grid, edge_routes

    x, step = 600.0, NODE_W + GAP
    xy = {"low": (x, 50.0), "top": (x, 250.0)} | {f"mid{k}": (x + k * step, 150.0) for k in range(-2, 3)}
    g = Grid(xy, {k: NODE_W for k in xy}, 1200.0, 300.0, [], [], (0.0, 300.0))
    plain, marked = edge_routes(g, [("low", "top"), ("low", "top")], marked={1})
    ends = ("low", "top")
    assert plain[2] == x and _passes(plain, xy, NODE_W, NODE_H, ends) == {"mid0"}
    assert marked[2] != x and _passes(marked, xy, NODE_W, NODE_H, ends) == set()


def test_dot_pins_nodes_and_edges_as_laid_out(graph, tmp_path):
    """The DOT file is drawn as written (layout=nop2): every node at its grid position and every edge along its
    routed curve, whichever graphviz layout a plain `dot -Tsvg` would otherwise run."""
    from graphs.export import to_dot

    dot = to_dot(graph, draw_nodes=30)
    assert "layout=nop2;" in dot
    edge_lines = [line for line in dot.splitlines() if " -> " in line and "[" in line]
    assert edge_lines and all('pos="e,' in line for line in edge_lines)


def test_a_margin_near_zero_gets_no_share(capsys):
    """The errors' (and the pruned-away) share of a margin near 0 would read as thousands of percent: below
    SHARED_MARGIN trace gives the amounts alone."""
    from cli.trace import _print_decomposition
    from graphs.prune import SHARED_MARGIN

    def part(errors, total, dropped=0.0):
        return {"features": total - errors - dropped, "errors": errors, "embeddings": 0.0, "constants": 0.0,
                "dropped": dropped, "total": total}

    for total, shared in ((SHARED_MARGIN / 4, False), (2.0, True)):
        dec = {"target": dict(part(1.0, 5.0), token=" a", node="logit.1@3"), "runner_up": dict(part(0.9, 5.0 - total),
               token=" b", node="logit.2@3"), "margin": part(0.1, total), "error_share": 0.1 / total}
        kept = {"target": part(1.0, 5.0, 0.2), "margin": part(0.1, total, 0.05)}
        _print_decomposition({"logit_decomposition": dec, "pruned_logit_decomposition": kept})
        out = capsys.readouterr().out
        if shared:
            assert f"errors carry {0.1 / total:.0%} of the margin" in out and f"(+{0.05 / total:.0%})" not in out
            assert f"+0.05 of the margin ({0.05 / total:.0%})" in out
        else:
            assert "errors carry +0.10 of the margin, too near 0 for a share" in out and "%" not in out
