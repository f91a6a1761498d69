"""One self-contained HTML page per graph: the rendered SVG plus a side panel.

Hovering or clicking a node shows its activation and influence, its strongest edges, and, from the
dashboards (``replacement.dashboards``), its top-activating contexts and logit lens; for Lorsa heads also its
z pattern on this prompt and its top QK pairs.  Everything (SVG, data, script, style) is inlined, so the file
opens without network access.  ``page.html#node=ID`` selects a node on load (by dispatching a click on it).
"""
from __future__ import annotations

import json
from pathlib import Path

from .graph import AttributionGraph

STYLE = """
body { margin: 0; font-family: Helvetica, Arial, sans-serif; font-size: 13px; display: flex; height: 100vh; }
#graph { flex: 1; overflow: auto; border-right: 1px solid #ccc; }
#graph { position: relative; }
#graph svg { height: auto; }
#zoom { position: sticky; top: 0; left: 0; z-index: 1; background: rgba(255,255,255,0.9); padding: 4px; display: inline-block; }
#zoom button { font-size: 12px; margin-right: 2px; }
#graph g.node { cursor: pointer; }
#graph g.node.selected polygon, #graph g.node.selected ellipse { stroke: #000; stroke-width: 3px; }
#panel { width: 460px; overflow: auto; padding: 10px 14px; background: #fafafa; }
#panel h2 { font-size: 16px; margin: 4px 0; }
#panel h3 { font-size: 13px; margin: 12px 0 4px; color: #444; }
.meta { color: #555; }
.ctx { font-family: Menlo, Consolas, monospace; font-size: 12px; margin: 3px 0; white-space: pre-wrap; word-break: break-all; }
.tok { border-radius: 2px; padding: 0 1px; }
.tok.q { outline: 2px solid #000; }
.num { color: #666; font-size: 11px; }
table { border-collapse: collapse; } td { padding: 1px 6px 1px 0; vertical-align: top; }
"""

SCRIPT = r"""
const DATA = JSON.parse(document.getElementById('graph-data').textContent);
const panel = document.getElementById('panel');
const esc = s => String(s).replace(/[&<>"]/g, c => ({'&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;'}[c]));
const tok = s => esc(JSON.stringify(String(s)).slice(1, -1));
const fmt = v => (v === null || v === undefined) ? '' : Number(v).toPrecision(3);
function shade(v, m) {
  const a = m > 0 ? Math.min(1, Math.abs(v) / m) * 0.6 : 0;
  return v >= 0 ? `rgba(33,102,172,${a})` : `rgba(178,24,43,${a})`;
}
function tokens(toks, vals, q) {
  const m = Math.max(1e-9, ...vals.map(Math.abs));
  return toks.map((t, i) => `<span class="tok${i === q ? ' q' : ''}" style="background:${shade(vals[i], m)}" ` +
    `title="${fmt(vals[i])}">${tok(t)}</span>`).join('');
}
const section = (title, body) => `<h3>${esc(title)}</h3>${body}`;
function show(id) {
  const n = DATA.nodes[id];
  if (!n) return;
  document.querySelectorAll('#graph g.node.selected').forEach(e => e.classList.remove('selected'));
  const el = document.querySelector(`#graph g.node[data-node="${CSS.escape(id)}"]`);
  if (el) el.classList.add('selected');
  let h = `<h2 id="panel-title">${esc(n.title)}</h2><div class="meta">${esc(n.type)} at position ${n.pos} ` +
    `(${tok(DATA.tokens[n.pos] ?? '')}) &middot; activation ${fmt(n.activation)} &middot; influence ${fmt(n.influence)}</div>`;
  if (n.z_pattern) {
    h += section('z pattern on this prompt (share of each key position)',
      `<div class="ctx">${tokens(DATA.tokens.slice(0, n.z_pattern.length), n.z_pattern, n.pos)}</div>`);
  }
  if (n.qk && n.qk.length) {
    let rows = '';
    for (const e of n.qk) {
      rows += `<tr><td>key ${e.key_pos} (${tok(DATA.tokens[e.key_pos] ?? '')})</td><td>attn ${fmt(e.attention)}</td>` +
        `<td>score ${fmt(e.score)}</td></tr>`;
      for (const [q, k, v] of e.pairs.slice(0, 3)) rows += `<tr><td></td><td colspan="2" class="num">${esc(q)} &times; ${esc(k)}: ${fmt(v)}</td></tr>`;
    }
    h += section('QK: top key positions and feature pairs', `<table>${rows}</table>`);
  }
  const edges = (list, arrow) => list.map(([o, w]) => `<div class="num">${arrow} ${esc(o)} ${fmt(w)}</div>`).join('');
  if (n.in.length || n.out.length) h += section('strongest edges', edges(n.in, '&larr;') + edges(n.out, '&rarr;'));
  const d = n.dash ? DATA.dashboards[n.dash] : null;
  if (d) {
    h += `<div class="meta">active on ${(100 * d.density).toFixed(2)}% of held-out tokens</div>`;
    h += section('top-activating contexts', d.contexts.map(c =>
      `<div class="ctx"><span class="num">${fmt(c.activation)}</span> ${tokens(c.tokens, c.z || c.acts, c.query)}` +
      (c.z_top ? `<div class="num">reads ${c.z_top.map(z => `${tok(z.token)} at ${z.offset} (z ${fmt(z.z)})`).join(', ')}</div>` : '') +
      `</div>`).join('') || '<div class="num">never active on the sample</div>');
    h += section('logit lens', `<div class="num">promotes ${d.logits_up.map(([t, v]) => `${tok(t)} ${fmt(v)}`).join(', ')}</div>` +
      `<div class="num">suppresses ${d.logits_down.map(([t, v]) => `${tok(t)} ${fmt(v)}`).join(', ')}</div>`);
  } else if (n.type === 'lorsa' || n.type === 'transcoder') {
    h += '<div class="num">(no dashboard in this file)</div>';
  }
  panel.innerHTML = h;
  panel.dataset.node = id;
}
const svgEl = document.querySelector('#graph svg');
const natural = svgEl ? svgEl.getBoundingClientRect().width : 0;
function zoom(f) {
  if (!svgEl) return;
  const box = document.getElementById('graph');
  const w = f === 'fit' ? box.clientWidth - 20 : f === 1 ? natural : svgEl.getBoundingClientRect().width * f;
  svgEl.style.width = `${Math.max(100, w)}px`;
}
document.getElementById('zoom').addEventListener('click', e => {
  const f = e.target.dataset.zoom;
  if (f) zoom(f === 'fit' ? 'fit' : Number(f));
});
let bound = 0;
for (const g of document.querySelectorAll('#graph g.node')) {
  const t = g.querySelector('title');
  const id = t ? t.textContent : '';
  if (!DATA.nodes[id]) continue;
  g.dataset.node = id;
  g.addEventListener('click', () => show(id));
  g.addEventListener('mouseenter', () => { if (!panel.dataset.pinned) show(id); });
  bound++;
}
document.body.dataset.boundNodes = bound;
const m = location.hash.match(/^#node=(.+)$/);
if (m) {
  const el = document.querySelector(`#graph g.node[data-node="${CSS.escape(decodeURIComponent(m[1]))}"]`);
  if (el) el.dispatchEvent(new MouseEvent('click', {bubbles: true}));
}
"""


def _dash_key(node) -> str | None:
    return f"{node.type}.{node.layer}.{node.index}" if node.type in ("lorsa", "transcoder") else None


def page_data(graph: AttributionGraph, drawn_ids: set[str], dashboards=None, n_edges: int = 5) -> dict:
    """The JSON the page embeds: the drawn nodes (with their strongest edges) and their dashboards."""
    from replacement.errors import BadInputError

    from .export import _short_label

    nodes, dash = {}, {}
    for n in graph.node_list:
        if n.id not in drawn_ids:
            continue
        key = _dash_key(n)
        if key and dashboards is not None and key not in dash:
            try:
                dash[key] = dashboards.entry(n.type, n.layer, n.index)
            except BadInputError:  # a layer without dashboards: the panel says so
                key = None
        nodes[n.id] = {
            "title": f"{n.id}: {_short_label(graph, n).replace(chr(10), ' ')}", "type": n.type, "pos": n.pos,
            "activation": n.activation, "influence": n.influence, "z_pattern": n.extra.get("z_pattern"),
            "qk": n.extra.get("qk"), "dash": key if key in dash else None,
            "in": [[e.source, round(e.weight, 5)] for e in graph.incoming(n, k=n_edges)],
            "out": [[e.target, round(e.weight, 5)] for e in graph.outgoing(n, k=n_edges)],
        }
    return {"prompt": graph.prompt, "tokens": graph.tokens, "nodes": nodes, "dashboards": dash}


def script_json(obj) -> str:
    """JSON safe inside ``<script type="application/json">``: ``<``, ``>`` and ``&`` (which can only occur in its
    strings) become ``\\u003c``-style escapes, so no ``</script``, ``<!--`` or ``<script`` in a prompt or label
    can end or swallow the block; ``JSON.parse`` reads the same values back."""
    from .validate import strict_dumps

    text = strict_dumps(obj)
    for c in "<>&\u2028\u2029":
        text = text.replace(c, f"\\u{ord(c):04x}")
    return text


def to_html(graph: AttributionGraph, svg: str, dashboards=None) -> str:
    import html
    import re

    svg = svg[svg.index("<svg"):]  # drop the XML prolog and DOCTYPE
    drawn = {html.unescape(t) for t in re.findall(r"<title>(.*?)</title>", svg)}
    data = script_json(page_data(graph, drawn, dashboards))
    title = f"{graph.prompt} - attribution graph"
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head>\n<body><div id=\"graph\"><div id=\"zoom\"><button data-zoom=\"fit\">fit</button>"
            f"<button data-zoom=\"1\">100%</button><button data-zoom=\"1.25\">+</button><button data-zoom=\"0.8\">&minus;</button>"
            f"</div>{svg}</div>\n"
            f"<div id=\"panel\"><h2>{html.escape(graph.prompt)}</h2><div class=\"meta\">Hover over or click a node.</div></div>\n"
            f"<script id=\"graph-data\" type=\"application/json\">{data}</script>\n<script>{SCRIPT}</script>\n"
            f"</body></html>\n")


def write_html(graph: AttributionGraph, svg_path: str | Path, path: str | Path, dashboards=None) -> Path:
    from replacement.data import atomic_write_text

    path = Path(path)
    atomic_write_text(path, to_html(graph, Path(svg_path).read_text(encoding="utf-8"), dashboards))
    return path
