"""The two showcase circuits on the bundled models (slow; they also run the examples)."""
from __future__ import annotations

import importlib.util
import re

import pytest

from replacement.lm.presets import PRESETS
from tests.conftest import ROOT

pytestmark = pytest.mark.slow
EXAMPLES = ROOT / "examples"


def _example(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _need(name: str):
    if not (PRESETS[name].folder / "replacements" / "config.json").is_file():
        pytest.fail(f"the bundled {name!r} model and its replacements are missing from the package")


def _load(name: str):
    from replacement.assemble import ReplacementModel
    from replacement.models import load_model

    adapter = load_model(name)
    return adapter, ReplacementModel.load(adapter)


# a held-out English sentence that recurs (each model's case in examples/induction.py), and a repeated random span
@pytest.mark.parametrize("model,prompt", [("toy", "natural"), ("toy", "random"), ("pythia", "natural")])
def test_induction_circuit(model, prompt):
    from graphs.circuits import heads_attending, induction_circuit
    from graphs.patching import PathPatcher, graph_effects, parse_component

    from graphs.attribution import attribute

    _need(model)
    adapter, rm = _load(model)
    ids, answer, expected_peak = _example("induction").showcase_prompt(adapter, prompt)
    full = attribute(rm, ids, target=adapter.tokenizer.decode([answer]))
    n = ids.shape[1]
    logit_id = f"logit.{answer}@{n - 1}"
    c = induction_circuit(full, logit_id, expected_peak, adapter.parallel_residual)
    head = c.head
    # a Lorsa head at the last position whose z pattern peaks on the token after the earlier occurrence, with the
    # strongest positive edge into the correct token's logit among such heads; the model predicts that token
    assert head.pos == n - 1 and c.peak == expected_peak and head.layer >= 1
    assert full.node(logit_id).prob == max(x.prob for x in full.logits())
    into = {e.source: e.weight for e in full.incoming(logit_id)}
    rivals = [h for h in full.nodes(type="lorsa", position=n - 1) if h.id in into  # keyed by the largest z entry
              and max(range(len(h.z_pattern)), key=lambda s: h.z_pattern[s]) == expected_peak]
    assert into[head.id] > 0 and into[head.id] == max(into[h.id] for h in rivals)
    # its QK pairs explain its attention to that key position
    assert any(e.key_pos == expected_peak for e in head.qk) and c.pairs
    # its strongest QK pair at that key: the key side is an earlier head that read the previous token, the query
    # side a node carrying the current token, in the recurring sentence as on random spans (pythia's query side there
    # is the current token's embedding; with its replacements before 2026-12-05 it was a layer-0 head reading an
    # earlier token of the context, matched by a head at the key position reading the same token)
    assert c.prev_head is not None and c.prev_head.id == c.pairs[0].key and c.key_source == expected_peak - 1
    assert c.query_reads_current
    # path patching the head moves the logit the way the graph predicts: as the model runs it moves it the same way,
    # and with the norm scales frozen (the graph's own linear regime) by >= 50% of the prediction.  (As the model
    # runs, the norms' rescaling of the rest of the residual stream makes up part of one head's loss: on pythia's
    # showcase with the replacements of 2026-12-04, -0.53 as it runs, -1.94 frozen, -1.64 predicted; see
    # docs/checking.md and bench_induction_patching.py for 20 prompts.)
    effects = graph_effects(full, logit_id)
    predicted = float(effects[full.index[head.id]])
    comp = parse_component(head.id)
    family = heads_attending(full, n - 1, expected_peak, min_layer=1)
    patched, family_patched = (r.effect for r in PathPatcher(rm, ids, answer, demean=True).effects(
        [comp, tuple(parse_component(h.id) for h in family)]))
    assert predicted < 0
    frozen = PathPatcher(rm, ids, answer, demean=True, freeze_norms=True).effects([comp])[0].effect
    assert patched < 0 and frozen <= 0.5 * predicted
    # (on random spans the toy's chosen head is one of ~57 attending there, each a few percent of the logit; alone it
    # reaches >= 50% of its prediction on 18 of 20 prompts as the model runs and on 20 of 20 with the norms frozen,
    # the heads together on 20 of 20 (bench_induction_patching.py --prompt random, the toy's replacements of
    # 2026-12-06).  With those of 2026-12-05 this prompt (seed 1) missed even frozen: +0.13 against -0.66.)
    # every last-position head of a later layer attending there, ablated together: >= 50% of the graph's prediction
    family_predicted = sum(float(effects[full.index[h.id]]) for h in family)
    assert head in family and len(family) > 1
    assert family_predicted < 0 and family_patched <= 0.5 * family_predicted


@pytest.mark.parametrize("model", ["toy", "pythia"])
def test_induction_family(model, tmp_path):
    """Head families on the natural-text showcase (examples/families.py, the default rule): the largest induction
    family (last-position heads of one layer >= 1 keyed on the token after the earlier occurrence; on pythia the
    one on the strongest path), path patched as one unit, moves the logit by >= 50% of the graph's prediction
    (examples/families.py on the bundled replacements of 2026-12-06: 0.88 on toy, 0.54 on pythia); its edge into
    the logit is its members' sum."""
    _need(model)
    r = _example("families").analyse(model, out=tmp_path, verbose=False)
    full, f = r["full"], r["family"]
    assert f is not None and len(f) >= 2 and f.pos == len(full.tokens) - 1 and f.layers[0] >= 1
    assert r["predicted"] < 0 and r["patched"] <= 0.5 * r["predicted"]
    logit = full.logits()[0]
    into = {e.source: e.weight for e in full.incoming(logit.id)}
    summed = {e.source: e.weight for e in full.collapsed().incoming(logit.id)}
    assert summed[f.id] == pytest.approx(sum(into.get(m, 0.0) for m in f.members), rel=1e-4, abs=1e-5)
    assert (tmp_path / f"families-{model}.json").is_file()


@pytest.mark.parametrize("model", ["toy", "pythia"])
def test_induction_familys_key_is_chosen_by_a_previous_token_unit(model, tmp_path):
    """Why the largest induction family looks at its key (`family_contrast`, traced as `trace` traces): its
    strongest contrastive pair reads, on the key side, a layer-0 Lorsa unit (a head, or a family of heads) at the
    key position whose z pattern peaks on the token before it: the previous-token composition of an induction
    head, found by the tool on held-out text (pythia: the current token's embedding x a 13-head layer-0 family at
    the key that attends to the token before it)."""
    from graphs.families import family

    _need(model)
    r = _example("families").analyse(model, out=tmp_path, verbose=False, why=True)
    assert r["why"] is not None
    f, c, heads, graph = r["why"]
    peak = f.key_positions[0]
    assert heads == len(f) and c.difference > 0
    top = c.pairs[0]
    key = family(graph, top.key) if top.key.startswith("fam.") else graph.node(top.key)
    members = [graph.node(m) for m in key.members] if top.key.startswith("fam.") else [key]
    assert {m.layer for m in members} == {0} and {m.pos for m in members} == {peak}
    assert all(max(range(len(m.z_pattern)), key=lambda i: m.z_pattern[i]) == peak - 1 for m in members), top.key
    assert top.weight > 0 and graph.node(top.query if not top.query.startswith("fam.") else
                                         family(graph, top.query).members[0]).pos == len(graph.tokens) - 1


@pytest.mark.parametrize("model", [
    "pythia",
    pytest.param("toy", marks=pytest.mark.xfail(strict=True, reason=(
        "on the toy's showcase the strongest path runs through a layer-0 family reading the current token "
        "(emb@64 -> fam.lorsa.0.1@64 -> logit): the induction family sends +1.47 straight into the logit (of "
        "22.9 in size), but a path's strength multiplies each target's share of its input, and the family's input is "
        "spread over the positions it copies from; see docs/families.md")))])
def test_strongest_path_runs_through_an_induction_family(model, tmp_path):
    """The strongest collapsed path to the answer's logit runs through an induction family (last position, one
    layer >= 1, keyed on the token after the earlier occurrence): emb@7 -> tc family@7 -> L1 family@36 -> logit
    on pythia, the token at the key position copied to the last one."""
    _need(model)
    assert _example("families").analyse(model, out=tmp_path, verbose=False)["through"]


def test_induction_example(tmp_path):
    """The example script finds the same head as the library, prints it, and writes the circuit's picture, which
    draws the head and the key side it names (the previous-token head was left out where pruning dropped it)."""
    _need("toy")
    graph, full, c, checks = _example("induction").analyse("toy", tmp_path, verbose=False, prompt="random")
    assert c.head.id in full.index and c.head.pos == len(full.tokens) - 1
    assert (tmp_path / "induction.json").is_file()
    assert (tmp_path / "induction.svg").is_file() or (tmp_path / "induction.dot").is_file()
    dot = (tmp_path / "induction.dot").read_text()
    assert all(f'"{n.id}" [label=' in dot for n in (c.head, c.key, c.prev_head) if n is not None)
    assert checks["predicted"] < 0 and c.head in checks["family"]


def test_addition_circuit(tmp_path):
    from graphs.circuits import downstream_features, most_influential, operand_movers, z_share
    from graphs.patching import PathPatcher, agreement, graph_effects, parse_component

    from graphs.attribution import attribute

    _need("llama")
    adapter, rm = _load("llama")
    ids = adapter.tokenize("36 + 62 =")
    full = attribute(rm, ids, target=" 98")
    toks = [adapter.tokenizer.decode([i]) for i in ids[0].tolist()]
    pos36, pos62, last = toks.index("36"), toks.index(" 62"), len(toks) - 1
    logit = full.logits()[0]
    assert logit.label == " 98"
    movers = operand_movers(full, [pos36, pos62], last)
    assert {m.pos for m in movers} == {pos36, pos62}  # heads that move each operand to the last position
    for m in movers:
        zp = [abs(x) for x in m.head.z_pattern]
        assert m.head.pos == last and m.share == pytest.approx(zp[m.pos] / sum(zp), rel=1e-5) and m.share > 0.5
    others = [h for h in full.nodes(type="lorsa", position=last) if h.id not in {m.head.id for m in movers}]
    assert all(z_share(h, p) <= 0.5 for h in others for p in (pos36, pos62))
    eff = graph_effects(full, logit.id)
    movers.sort(key=lambda m: -abs(float(eff[full.index[m.head.id]])))
    downstream = downstream_features(full, [m.head for m in movers[:4]])
    assert downstream and all(full.node(f).type == "transcoder" for f in downstream)
    patcher = PathPatcher(rm, ids, logit.index, demean=True)
    for check in patcher.effects([parse_component(m.head.id) for m in movers[:2]]):
        assert check.effect < -0.1  # path patching confirms the top two movers: ablating each lowers ' 98'
    # graph vs path patching on the real model: of the 5 most influential Lorsa heads, at least 4 agree in sign on
    # average over six additions (the faithfulness issue's bar; on `36 + 62 =` alone the bundled replacements get
    # 3 of 5, the six prompts 3-5)
    signs = []
    for prompt in ("36 + 62 =", "23 + 45 =", "51 + 38 =", "17 + 64 =", "72 + 19 =", "44 + 33 ="):
        a, b = (int(x) for x in prompt[:-2].split(" + "))
        ids = adapter.tokenize(prompt)
        g = full if prompt == "36 + 62 =" else attribute(rm, ids, target=f" {a + b}")
        top = g.logits()[0]
        assert top.label == f" {a + b}"
        heads = most_influential(g, "lorsa", 20)
        pred = graph_effects(g, top.id)
        patched = [r.effect for r in PathPatcher(rm, ids, top.index, demean=True).effects(
            [parse_component(h.id) for h in heads])]
        signs.append(agreement([float(pred[g.index[h.id]]) for h in heads], patched)[1])
    assert sum(signs) / len(signs) >= 4, signs
    png = _example("arithmetic").operand_plot(rm, movers[0].head.layer, movers[0].head.index, tmp_path / "p.png")
    svg = png.with_suffix(".svg").read_text()
    png = png.read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 1000
    assert "a (first operand)" in svg and "b (second operand)" in svg and "base64," in svg  # labelled, PNG inside


def test_queries_example(tmp_path, monkeypatch, capsys):
    """The queries example traces `36 + 62 =`, and what it prints is true of the graph file: its paths are
    chains of edges from an embedding or error node to the top logit, strongest first, its heads are layer 1's,
    and the ancestor count is a breadth-first search over the file's links."""
    import graphs

    _need("llama")
    monkeypatch.chdir(tmp_path)
    _example("queries").main(None)
    out = capsys.readouterr().out
    g = graphs.load(tmp_path / "traces" / "36-62" / "graph.json")
    target = g.logits()[0]
    edges = {(e.source, e.target) for e in g.edges}
    paths = re.findall(r"^  ([0-9.]+)  (\S.*)$", out.split("top 10 paths")[1].split("Lorsa heads")[0], re.M)
    assert paths and len(paths) <= 10
    strengths = [float(s) for s, _ in paths]
    assert strengths == sorted(strengths, reverse=True) and all(0 < s <= 1 for s in strengths)
    for _, p in paths:
        chain = p.split(" -> ")
        assert chain[-1] == target.id and g.node(chain[0]).type in ("embedding", "attn_error", "mlp_error")
        assert all(pair in edges for pair in zip(chain, chain[1:]))
    listed = re.findall(r"^  (lorsa\.1\.\d+@\d+) ", out, re.M)
    assert listed == [h.id for h in g.nodes(type="lorsa", layer=1)]
    parents: dict[str, set] = {}
    for s, t in edges:
        parents.setdefault(t, set()).add(s)
    seen, todo = set(), [target.id]
    while todo:
        for s in parents.get(todo.pop(), ()):
            if s not in seen:
                seen.add(s)
                todo.append(s)
    assert f"ancestors of {target.id}: {len(seen)} nodes" in out
