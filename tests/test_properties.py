"""Property-based tests (Hypothesis) of the graph writers and readers, on small hand-built graphs whose prompt,
tokens, labels and node ids are arbitrary Unicode text:

* graph.json is strict JSON (no NaN/Infinity), passes the schema and reads back equal; a graph holding a
  non-finite value is refused, not written;
* graph.dot is accepted by `dot`, and the SVG it renders is well-formed XML naming every node;
* the HTML page's data block can only end where it should and parses back to the page's data, whatever the
  text (a `<!--<script>` prompt included); Chromium runs the page's script on such a page;
* `circuits query` / `circuits render` on arbitrary bytes, arbitrary JSON and single-field mutations of a
  valid graph either succeed (printing no control character) or fail with one line, writing nothing;
* a saved Lorsa/transcoder file, a circuit-tracer config.yaml and a Llamascopium config.json with any value in
  any key (or a key gone) load, or fail with one of the tool's one-line errors.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET

import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings, strategies as st

from graphs.export import read_json, to_dict, to_dot, validate, write_json
from graphs.graph import AttributionGraph, Edge, Node, QKEntry, QKPair
from graphs.html import page_data, to_html
from graphs.validate import BadGraphError, strict_dumps, strict_loads

# CIRCUITS_FUZZ_EXAMPLES raises the count for a longer hunt (each run draws new examples: CI too)
EXAMPLES = settings(max_examples=int(os.environ.get("CIRCUITS_FUZZ_EXAMPLES", 200)), deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
text = st.text(max_size=40)  # any Unicode text but lone surrogates (a command line refuses those: invalid UTF-8)
hostile = st.sampled_from(["<!--<script>", "</script><script>alert(1)</script>", "&lt;b&gt;", "\x00\x01\x1b[31m",
                           "\\N\\G\\L", '"quoted" \\"', "\ufffe\uffff", "\u2028\u2029", "]]>", "-->"])
any_text = st.one_of(text, hostile, st.lists(st.one_of(text, hostile), max_size=4).map("".join))


def fake_graph(prompt: str, tokens: list[str], label: str, odd_id: str, value: float = 0.5) -> AttributionGraph:
    """Embeddings, a Lorsa head with a z pattern and a QK pair, a transcoder feature with an arbitrary id, an
    MLP error and a logit, linked as a traced graph would be."""
    n = len(tokens)
    last = n - 1
    nodes = [Node(f"emb@{p}", "embedding", -1, p, -1, label=tokens[p]) for p in range(n)]
    head = Node(f"lorsa.0.3@{last}", "lorsa", 0, last, 3, activation=1.5, influence=0.3, preact=1.2, const=0.1,
                z_pattern=[1.0 / n] * n,
                qk=[QKEntry(key_pos=0, attention=0.9, score=2.0, pairs=[QKPair(f"emb@{last}", "emb@0", 0.7)])])
    taken = {x.id for x in nodes} | {f"lorsa.0.3@{last}", f"mlp_err.0@{last}", f"logit.5@{last}", ""}
    feature_id = f"tc.0.7@{last}" if odd_id in taken else odd_id
    nodes += [head,
              Node(feature_id, "transcoder", 0, last, 7, activation=value, influence=0.2, label=label, preact=0.8),
              Node(f"mlp_err.0@{last}", "mlp_error", 0, last, -1, activation=0.1, influence=0.1),
              Node(f"logit.5@{last}", "logit", 1, last, 5, activation=3.0, influence=1.0, label=label, prob=0.6)]
    edges = [Edge(f"emb@{p}", head.id, 0.1 * (p + 1), "ov") for p in range(n)]
    edges += [Edge(head.id, feature_id, -0.4), Edge(f"emb@{last}", feature_id, 0.3),
              Edge(feature_id, f"logit.5@{last}", 1.1), Edge(f"mlp_err.0@{last}", f"logit.5@{last}", -0.2)]
    return AttributionGraph(prompt, tokens, list(range(n)), nodes, edges, {"model": "m", "node_threshold": 0.8},
                            {"replacement_score": 0.7, "completeness_score": 0.9})


graphs_ = st.builds(fake_graph, any_text, st.lists(any_text, min_size=1, max_size=4), any_text, any_text)


@EXAMPLES
@given(graph=graphs_)
def test_json_is_strict_valid_and_round_trips(graph, tmp_path):
    path = write_json(graph, tmp_path / "g.json")
    d = strict_loads(path.read_text(encoding="utf-8"))  # raises on NaN, Infinity or overflow
    validate(d)
    feature = next(n for n in graph.node_list if n.type == "transcoder")
    if feature.id == f"tc.0.7@{feature.pos}":
        assert read_json(path) == graph
    else:  # an id its fields do not give: the reader, which rebuilds nodes from their fields, refuses it
        with pytest.raises(BadGraphError, match="does not match its fields"):
            read_json(path)


@EXAMPLES
@given(graph=graphs_, bad=st.sampled_from([math.nan, math.inf, -math.inf]))
def test_non_finite_values_are_refused_not_written(graph, bad, tmp_path):
    graph.node_list[-3].activation = bad
    with pytest.raises(BadGraphError, match="NaN or infinite"):
        write_json(graph, tmp_path / "g.json")
    assert not list(tmp_path.iterdir())


def _dot() -> str:
    exe = shutil.which("dot")
    if exe is None:
        import os

        if os.environ.get("CIRCUITS_CI"):
            pytest.fail("graphviz's dot is required here")
        pytest.skip("graphviz is not installed")
    return exe


def _svg(dot_source: str) -> str:
    r = subprocess.run([_dot(), "-Tsvg"], input=dot_source.encode(), capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr.decode(errors="replace")[-500:]
    return r.stdout.decode("utf-8")


@EXAMPLES
@given(graph=graphs_)
def test_dot_is_accepted_and_svg_is_xml(graph):
    svg = _svg(to_dot(graph))
    root = ET.fromstring(svg)
    ns = "{http://www.w3.org/2000/svg}"
    # (Graphviz writes a run of spaces in a title as a space and no-break spaces: "  " is " \xa0")
    titles = {t.text.replace("\xa0", " ") for g in root.iter(f"{ns}g") if g.get("class") == "node"
              for t in g.iter(f"{ns}title")}
    xml_safe = re.compile("[^\x00-\x1f\x7f\ufffe\uffff]*")  # no control character (fullmatch: "$" would let a final "\n" in)
    # every node is drawn, under its own id (ids with characters XML forbids are shown escaped; DOT keeps a
    # name's backslashes doubled and renames names starting with "%", which Graphviz reserves for anonymous
    # objects: the ids of traced graphs hold neither)
    drawn = {n.id.replace("\\", "\\\\").replace("\xa0", " ") for n in graph.node_list
             if xml_safe.fullmatch(n.id) and not n.id.startswith("%")}
    assert drawn <= titles


def _data_block(page: str) -> str:
    """The JSON block as an HTML parser sees it: from the opening tag to the first `</script` that ends it."""
    start = page.index('<script id="graph-data" type="application/json">') + len('<script id="graph-data" type="application/json">')
    end = re.compile(r"</script[\t\n\f\r />]", re.I).search(page, start).start()
    return page[start:end]


@EXAMPLES
@given(graph=graphs_)
def test_html_data_block_cannot_be_broken(graph):
    page = to_html(graph)
    block = _data_block(page)
    # in a script element only "<!--" (escaped states) or "</script" changes where the block ends
    assert "<!--" not in block and "<script" not in block.lower() and "</" not in block
    assert json.loads(block) == strict_loads(strict_dumps(page_data(graph)))  # the page reads its data back whole
    assert page[page.index(block) + len(block):].startswith("</script>\n<script>")


def test_hostile_prompt_page_runs_its_script_in_chromium(tmp_path):
    """The page of a graph whose prompt, tokens and labels hold `<!--<script>` still runs: it draws its nodes and
    `#node=` fills the panel."""
    from tests.test_html import _chromium, _dom

    chromium = _chromium()
    graph = fake_graph("<!--<script>", ["<!--<script>", "</script>x"], "<!--", "tc.0.7@1")
    page = tmp_path / "g.html"
    page.write_text(to_html(graph), encoding="utf-8")
    dom = _dom(chromium, page, tmp_path, "#node=tc.0.7%401", ("--dump-dom",))
    drawn = re.search(r'data-drawn-nodes="(\d+)"', dom)
    assert drawn and int(drawn.group(1)) == len(graph.node_list), dom[-2000:]
    assert 'id="info" data-node="tc.0.7@1"' in dom


# -- the readers, through the command line (in-process) ---------------------------------------------------

json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | text,
                           lambda kids: st.lists(kids, max_size=3) | st.dictionaries(text, kids, max_size=3),
                           max_leaves=10)
BASE = to_dict(fake_graph("the cat", ["<bos>", "the", " cat"], " sat", "tc.0.7@2"))


def _paths(x, prefix=()):
    yield prefix
    if isinstance(x, dict):
        for k, v in x.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(x, list):
        for i, v in enumerate(x):
            yield from _paths(v, prefix + (i,))


PATHS = [p for p in _paths(BASE) if p]


@st.composite
def mutated_graphs(draw) -> bytes:
    d = json.loads(json.dumps(BASE))
    path = draw(st.sampled_from(PATHS))
    parent = d
    for k in path[:-1]:
        parent = parent[k]
    if draw(st.booleans()):
        del parent[path[-1]]
    else:
        parent[path[-1]] = draw(json_values)
    return json.dumps(d).encode()


files = st.one_of(st.binary(max_size=200), json_values.map(lambda v: json.dumps(v).encode()), mutated_graphs())


def _circuits(*args):
    from cli.main import circuits

    return CliRunner().invoke(circuits, list(args))


@EXAMPLES
@given(content=files, command=st.sampled_from(["query", "render"]))
def test_query_and_render_any_file(content, command, tmp_path_factory):
    folder = tmp_path_factory.mktemp("f")
    path = folder / "g.json"
    path.write_bytes(content)
    args = [command, str(path)] + (["--format", "dot"] if command == "render" else [])
    r = _circuits(*args)
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    if r.exit_code == 0:  # a valid graph: what is printed holds no control character
        assert not re.search(r"[\x00-\x09\x0b-\x1f\x7f]", r.stdout)
        return
    assert r.exit_code == 1
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.stderr, r.stderr
    assert sorted(p.name for p in folder.iterdir()) == ["g.json"]  # nothing written beside it


@EXAMPLES
@given(graph=graphs_, how=st.sampled_from(["paths", "type", "node"]))
def test_query_escapes_hostile_node_ids(graph, how, tmp_path_factory):
    path = write_json(graph, tmp_path_factory.mktemp("q") / "g.json")
    odd = graph.node_list[-3].id
    args = {"paths": [], "type": ["--type", "transcoder"], "node": ["--node", odd]}[how]
    r = _circuits("query", str(path), *args)
    if odd != f"tc.0.7@{graph.node_list[-3].pos}":  # an id its fields do not give: refused in one escaped line
        assert r.exit_code == 1 and "does not match its fields" in r.stderr and r.stderr.count("\n") == 1, r.stderr
        assert not re.search(r"[\x00-\x09\x0b-\x1f\x7f]", r.stderr)
        return
    assert r.exit_code == 0, r.stderr
    assert not re.search(r"[\x00-\x09\x0b-\x1f\x7f]", r.stdout)
    if how != "paths":  # the odd node is listed, escaped
        assert "".join(c if c.isprintable() else repr(c)[1:-1] for c in odd) in r.stdout


def _tiny_module_file(kind: str, folder):
    from replacement.lorsa import Lorsa, LorsaConfig
    from replacement.store import save_module
    from replacement.transcoder import Transcoder, TranscoderConfig

    module = (Lorsa(LorsaConfig(d_model=8, n_qk=2, d_qk=4, heads_per_group=4, top_k=2, rotary_dim=2))
              if kind == "lorsa" else Transcoder(TranscoderConfig(d_model=8, n_features=16, top_k=4, skip=True)))
    save_module(module, kind, folder, "fp", "tiny")
    return folder / f"layer0.{kind}.safetensors"


config_values = st.one_of(json_values, st.integers(min_value=-2**70, max_value=2**70), st.sampled_from([0, -1, 10**11]))


def _mutated(config: dict, data) -> dict:
    """``config`` with one key, drawn, either gone or set to any value (a wrong type, a huge or negative size)."""
    key = data.draw(st.sampled_from(sorted(config)))
    if data.draw(st.booleans()):
        del config[key]
    else:
        config[key] = data.draw(config_values)
    return config


@EXAMPLES
@given(kind=st.sampled_from(["lorsa", "transcoder"]), data=st.data())
def test_module_file_with_any_config_loads_or_fails_in_one_line(kind, data, tmp_path_factory):
    """A module file whose saved config was changed (another size, a wrong type, a field gone) loads, or raises
    one of the tool's one-line errors (CircuitsError): never another exception, never an allocation it claims."""
    from replacement import checkpoint
    from replacement.errors import CircuitsError
    from replacement.store import load_module

    path = _tiny_module_file(kind, tmp_path_factory.mktemp("m"))
    tensors, meta = checkpoint.load(path)
    config = _mutated(dict(meta["config"]), data)
    checkpoint.atomic_save(tensors, path, {**meta, "config": config})
    try:
        module, _ = load_module(path)
    except CircuitsError as e:
        assert "\n" not in str(e)
    else:  # what loads holds the file's weights
        state = module.state_dict()
        assert all(torch.equal(state[k], v.float()) for k, v in tensors.items())


class _Adapter:  # what the foreign loaders ask of a model
    name, d_model, n_layers, parallel_residual, device, rotary_dim = "tiny", 8, 2, False, "cpu", 0


def _foreign_folder(kind: str, folder):
    """A circuit-tracer transcoder set (config.yaml) or a Llamascopium transcoder (config.json) of width 8."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    if kind == "circuit-tracer":
        for L in range(2):
            save_file({"W_enc": torch.randn(16, 8, generator=g), "W_dec": torch.randn(16, 8, generator=g),
                       "b_enc": torch.zeros(16), "b_dec": torch.zeros(8)}, str(folder / f"layer_{L}.safetensors"))
        return folder / "config.yaml", {"model_kind": "transcoder_set", "feature_input_hook": "mlp.hook_in",
                                         "feature_output_hook": "mlp.hook_out", "top_k": 4}
    if kind == "llamascope-lorsa":  # 2 QK groups of width 4 with 4 heads each
        t = {"W_Q": torch.randn(2, 8, 4, generator=g), "W_K": torch.randn(2, 8, 4, generator=g),
             "b_Q": torch.zeros(2, 4), "b_K": torch.zeros(2, 4), "W_V": torch.randn(8, 8, generator=g),
             "b_V": torch.zeros(8), "W_O": torch.randn(8, 8, generator=g), "b_D": torch.zeros(8)}
        save_file(t, str(folder / "sae_weights.safetensors"))
        return folder / "config.json", {"n_qk_heads": 2, "d_qk_head": 4, "top_k": 4, "rotary_dim": 2,
                                        "rotary_base": 10000.0, "norm_activation": "none",
                                        "hook_point_in": "blocks.0.ln1.hook_normalized"}
    save_file({"W_E": torch.randn(8, 16, generator=g), "b_E": torch.zeros(16), "W_D": torch.randn(16, 8, generator=g),
               "b_D": torch.zeros(8)}, str(folder / "sae_weights.safetensors"))
    return folder / "config.json", {"hook_point_in": "blocks.1.ln2.hook_normalized", "top_k": 4,
                                    "norm_activation": "none"}


@EXAMPLES
@given(kind=st.sampled_from(["circuit-tracer", "llamascope", "llamascope-lorsa"]), data=st.data())
def test_foreign_config_with_any_values_loads_or_fails_in_one_line(kind, data, tmp_path_factory):
    """A circuit-tracer config.yaml or a Llamascopium config.json with any value in any of its keys (or a key
    gone) loads, or raises one of the tool's one-line errors: never another exception."""
    import yaml

    from replacement.errors import CircuitsError
    from replacement.foreign import load_folder

    path, config = _foreign_folder(kind, tmp_path_factory.mktemp("f"))
    config = _mutated(config, data)
    path.write_text(yaml.safe_dump(config) if path.suffix == ".yaml" else json.dumps(config))
    try:
        modules = load_folder(path.parent, _Adapter())
    except CircuitsError as e:
        assert "\n" not in str(e)
    else:
        assert set(modules) <= {("transcoder", 0), ("transcoder", 1), ("lorsa", 0), ("lorsa", 1)}
