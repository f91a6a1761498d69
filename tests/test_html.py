"""The self-contained HTML page, opened in headless Chromium; and `circuits heads`."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    if os.environ.get("CIRCUITS_CI"):
        pytest.fail("headless Chromium is required here (apt-get install chromium)")
    pytest.skip("chromium is not installed")


def _run(module_call: str, *args, env=None):
    return subprocess.run([sys.executable, "-c", module_call, *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def page(saved_model, tmp_path_factory):
    if shutil.which("dot") is None:
        pytest.skip("graphviz is not installed")
    out = tmp_path_factory.mktemp("html")
    r = _run("from cli.trace import trace; trace()", "the cat sat on the mat", "--model", str(saved_model),
             "--out", str(out), "--format", "json,html", env={"CIRCUITS_CACHE": str(out / "cache")})
    assert r.returncode == 0, r.stderr
    html = (out / "graph.html").read_text(encoding="utf-8")
    data = json.loads(re.search(r'<script id="graph-data" type="application/json">(.*?)</script>', html, re.S)
                      .group(1).replace("<\\/", "</"))
    return out, html, data


def test_page_is_self_contained(page):
    out, html, data = page
    assert not (out / "graph.svg").exists()  # only asked for json and html
    assert "<svg" in html and "http://" not in html.split("<svg", 1)[0] and "<script src" not in html
    assert "<link" not in html
    graph = json.loads((out / "graph.json").read_text())
    ids = {n["node_id"] for n in graph["nodes"]}
    assert data["nodes"] and set(data["nodes"]) <= ids
    heads = [k for k, n in data["nodes"].items() if n["type"] == "lorsa"]
    assert heads and all(data["nodes"][h]["z_pattern"] for h in heads)
    assert all(data["nodes"][h]["dash"] in data["dashboards"] for h in heads)


def _dom(chromium, path, tmp_path, anchor="", extra=()):
    r = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'profile'}",
                        "--virtual-time-budget=5000", *extra, f"file://{path}{anchor}"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def _panel(dom: str) -> str:
    """The side panel's HTML in a DOM dump (the script after it holds the same words as text)."""
    return dom[dom.index('<div id="panel"') : dom.index('<script id="graph-data"')]


def test_chromium_renders_the_graph_and_a_click_opens_the_panel(page, tmp_path):
    chromium = _chromium()
    out, html, data = page
    path = out / "graph.html"
    dom = _dom(chromium, path, tmp_path, extra=("--dump-dom",))
    drawn = {t for t in re.findall(r"<title>(.*?)</title>", html.split("<svg", 1)[1])} & set(data["nodes"])
    assert f'data-bound-nodes="{len(drawn)}"' in dom  # the script ran and wired every drawn node
    assert 'id="panel-title"' not in _panel(dom)  # nothing selected yet
    head = max((k for k, n in data["nodes"].items() if n["type"] == "lorsa"), key=lambda k: data["nodes"][k]["influence"])
    dom = _dom(chromium, path, tmp_path, f"#node={head}", ("--dump-dom",))
    panel = _panel(dom)
    title = re.search(r'<h2 id="panel-title">(.*?)</h2>', panel)
    assert title and title.group(1).startswith(head)
    assert f'data-node="{head}"' in panel[:200]
    assert "z pattern on this prompt" in panel and "logit lens" in panel and "QK: top key positions" in panel
    n_ctx = len(data["dashboards"][data["nodes"][head]["dash"]]["contexts"])
    assert "top-activating contexts" in panel and panel.count('<div class="ctx">') == n_ctx + 1  # + the z pattern
    assert dom.count("node selected") == 1 and f'class="node selected" data-node="{head}"' in dom
    shot = tmp_path / "page.png"
    _dom(chromium, path, tmp_path, f"#node={head}", (f"--screenshot={shot}", "--window-size=1400,900", "--hide-scrollbars"))
    png = shot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000


def test_circuits_heads(saved_model, tmp_path):
    env = {"CIRCUITS_CACHE": str(tmp_path / "cache")}
    text = tmp_path / "t.txt"
    text.write_text("the cat sat on the mat and the dog sat on the log. 1 + 2 = 3\n" * 400)
    short = tmp_path / "short.txt"
    short.write_text("the cat sat\n" * 10)
    call = "from cli.main import circuits; circuits()"
    r = _run(call, "heads", "--model", str(saved_model), "--layer", "1", "--top", "3", "--n-seqs", "4", "--text", str(text), env=env)
    assert r.returncode == 0, r.stderr
    assert "Lorsa heads, strongest first" in r.stdout and "transcoder features, strongest first" in r.stdout
    head = int(re.search(r"L1\.H(\d+)", r.stdout).group(1))
    r = _run(call, "heads", "--model", str(saved_model), "--layer", "1", "--head", str(head), "--n-seqs", "4",
             "--text", str(text), "--json", env=env)
    assert r.returncode == 0, r.stderr
    (e,) = json.loads(r.stdout)
    assert e["kind"] == "lorsa" and e["index"] == head and e["contexts"] and "z_top" in e["contexts"][0]
    for args, msg in ((("--layer", "7"), "out of range"), (("--layer", "0", "--head", "99999"), "out of range"),
                      (("--layer", "0", "--text", str(tmp_path / "missing.txt")), "not found"),
                      (("--layer", "0", "--text", str(short)), "fewer than one sequence")):
        r = _run(call, "heads", "--model", str(saved_model), *args, env=env)
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert r.returncode != 0 and len(lines) == 1 and msg in lines[0], r.stderr
