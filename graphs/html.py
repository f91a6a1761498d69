"""One self-contained HTML page per graph: the graph on its grid (graphs/layout.py) plus a side panel.

The page opens fitted to the graph, logits on top; the wheel zooms, dragging pans.  A slider sets the
pruning threshold: how many of the graph's nodes are drawn, the most influential first (every node of
graph.json at its far end).  Clicking a node, picking one in the search box or in the list of all nodes, or
opening ``page.html#node=ID`` selects it: it is drawn (the slider moves if it has to), brought into view,
and the panel shows its activation and influence, its strongest edges (by name and token, each a link),
and, from the dashboards (``replacement.dashboards``), its top-activating contexts and logit lens; for Lorsa
heads also its z pattern on this prompt and its top QK pairs.  Everything (data, script, style) is inlined,
so the file opens without network access; the page draws the SVG itself from the grid's coordinates.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

from .graph import FEATURE_KINDS, AttributionGraph, NodeKind
from .layout import (DEFAULT_DRAW_NODES, LABEL_W, NODE_H, NODE_W, box_label, drawing, drawn_qk, edge_order, edge_routes,
                     gist_examples, grid, marked_path, meaning, node_name, one_line)

STYLE = """
body { margin: 0; font-family: Helvetica, Arial, sans-serif; font-size: 13px; display: flex; height: 100vh; overflow: hidden; }
#graph { flex: 1; display: flex; flex-direction: column; min-width: 0; border-right: 1px solid #ccc; }
#toolbar { padding: 5px 8px; background: #f4f4f4; border-bottom: 1px solid #ddd; display: flex; flex-wrap: wrap; gap: 6px 12px; align-items: center; }
#toolbar input[type=search] { width: 260px; }
#toolbar input[type=range] { width: 200px; vertical-align: middle; }
#legend { font-size: 11px; color: #444; padding: 3px 8px; border-bottom: 1px solid #eee; }
#scene { flex: 1; width: 100%; min-height: 0; cursor: grab; background: #fff; }
#scene g.node { cursor: pointer; }
#scene g.node.onpath > :first-child { stroke: #ffc400; stroke-width: 3px; }
#scene g.node.selected > :first-child { stroke: #000; stroke-width: 3px; }
#scene.focus path.highlight { stroke-opacity: 0.25; }
#scene.focus path.edge { stroke-opacity: 0.07; }
#scene.focus path.edge.near { stroke-opacity: 0.95; }
#scene.focus g.node { opacity: 0.3; }
#scene.focus g.node.near, #scene.focus g.node.selected { opacity: 1; }
#scene text { font-family: Helvetica, Arial, sans-serif; pointer-events: none; }
#panel { width: 440px; display: flex; flex-direction: column; background: #fafafa; }
#info { flex: 0 1 auto; max-height: 65%; overflow: auto; padding: 10px 14px; }
#list { flex: 1 1 0; min-height: 120px; overflow: auto; padding: 0 14px; border-top: 1px solid #ddd; }
#panel h2 { font-size: 16px; margin: 4px 0; }
#panel h3 { font-size: 13px; margin: 12px 0 4px; color: #444; }
#node-list { font-size: 12px; padding-left: 2.5em; margin: 4px 0; }
#node-list li.selected { background: #ffe9a8; }
#node-list li.undrawn a { color: #777; }
.meta { color: #555; }
.ctx { font-family: Menlo, Consolas, monospace; font-size: 12px; margin: 3px 0; white-space: pre-wrap; word-break: break-all; }
.tok { border-radius: 2px; padding: 0 1px; }
.tok.q { outline: 2px solid #000; }
.num { color: #666; font-size: 11px; }
a { color: #1a4f8a; text-decoration: none; } a:hover { text-decoration: underline; }
table { border-collapse: collapse; } td { padding: 1px 6px 1px 0; vertical-align: top; }
"""

SCRIPT = r"""
const DATA = JSON.parse(document.getElementById('graph-data').textContent);
const NS = 'http://www.w3.org/2000/svg';
const scene = document.getElementById('scene');
const info = document.getElementById('info');
const slider = document.getElementById('slider');
const OPENING_PANEL = info.innerHTML;  // what the panel says while no node is selected
const SMALL_PX = 40, READABLE_PX = 60;  // a node's width on screen: below SMALL_PX fitted, the page opens at READABLE_PX
const esc = s => String(s).replace(/[&<>"]/g, c => ({'&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;'}[c]));
const tok = s => esc(JSON.stringify(String(s)).slice(1, -1));
const qtok = s => `&quot;${tok(s)}&quot;`;  // a token in quotes, so that " 97" never reads as the number 97
const fmt = v => (v === null || v === undefined) ? '' : Number(v).toPrecision(3);
const name = id => DATA.nodes[id] ? DATA.nodes[id].title : id;
const link = id => DATA.nodes[id] ? `<a href="#node=${encodeURIComponent(id)}">${esc(name(id))}</a>` : esc(id);
let step = null, view = null, selected = null;
const familiesBox = document.getElementById('families');
let STEPS = DATA.steps;  // the pictures of the graph, or (the families box ticked) of its families as one node each
function useFamilies(on) {
  STEPS = on && DATA.family_steps ? DATA.family_steps : DATA.steps;
  familiesBox.checked = STEPS !== DATA.steps;
  slider.max = STEPS.length - 1;
}

// -- drawing -------------------------------------------------------------------------------------------
function el(tag, attrs, parent) {
  const e = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (parent) parent.appendChild(e);
  return e;
}
function text(parent, x, y, lines, attrs) {
  const t = el('text', {x, y: y - (lines.length - 1) * 5.5, 'text-anchor': 'middle', 'dominant-baseline': 'middle', ...attrs}, parent);
  lines.forEach((line, i) => { const s = el('tspan', {x, dy: i ? 11 : 0}, t); s.textContent = line; });
  return t;
}
function shape(g, id, n, x, y) {
  const [fill, kind] = DATA.style[n.type], w = nodeW(id), h = DATA.node_h;
  if (n.members) {  // a family: a double outline, as the DOT/SVG/PNG draw it
    const o = {fill: 'none', stroke: '#333'};
    if (kind === 'ellipse') el('ellipse', {cx: x, cy: y, rx: w / 2 + 3, ry: h / 2 + 3, ...o}, g);
    else el('rect', {x: x - w / 2 - 3, y: y - h / 2 - 3, width: w + 6, height: h + 6, ...o}, g);
  }
  if (kind === 'ellipse') return el('ellipse', {cx: x, cy: y, rx: w / 2, ry: h / 2, fill, stroke: '#333'}, g);
  if (kind === 'box') return el('rect', {x: x - w / 2, y: y - h / 2, width: w, height: h, fill, stroke: '#333'}, g);
  const a = w / 2, b = h / 2, c = 0.3 * a;  // an octagon, dashed: an error node
  const pts = [[-a + c, -b], [a - c, -b], [a, -b / 2], [a, b / 2], [a - c, b], [-a + c, b], [-a, b / 2], [-a, -b / 2]];
  return el('polygon', {points: pts.map(([u, v]) => `${x + u},${y + v}`).join(' '), fill, stroke: '#333', 'stroke-dasharray': '4 2'}, g);
}
const Y = y => step.height - y;  // the grid's y runs up, the SVG's down
const nodeW = id => step.node_w[id] ?? DATA.node_w;  // a narrow column's embedding box is narrower
function draw(i) {
  step = STEPS[Math.min(i, STEPS.length - 1)];
  slider.value = i;
  scene.textContent = '';
  const root = el('g', {id: 'content'}, scene);
  for (const [x, label, dy] of step.columns) for (const y of [step.header_y[0] - dy, step.header_y[1] + dy])
    text(root, x, Y(y), label.split('\n'), {'font-size': 11, 'font-weight': 'bold'});  // dy: a staggered label
  for (const [y, label] of step.rows) text(root, DATA.label_w / 2, Y(y), [label], {'font-size': 11, fill: '#555'});
  const curve = (a, b, c1, c2) => {  // c1, c2: the control points' x (graphs/layout.py's edge_routes)
    const [x1, y1] = step.xy[a], [x2, y2] = step.xy[b];
    const ya = Y(y1) - DATA.node_h / 2, yb = Y(y2) + DATA.node_h / 2, m = (ya + yb) / 2;
    return `M${x1},${ya} C${c1},${m} ${c2},${m} ${x2},${yb}`;
  };
  for (const [a, b, w, width, onPath, c1, c2] of step.edges)  // the marked path (graphs/layout.py) under a highlighter
    if (onPath) el('path', {d: curve(a, b, c1, c2), fill: 'none', stroke: '#ffc400', 'stroke-opacity': 0.78,
                            'stroke-width': 12, class: 'highlight'}, root);
  for (const [a, b, w, width, onPath, c1, c2] of step.edges)
    el('path', {d: curve(a, b, c1, c2), fill: 'none', stroke: w > 0 ? '#2166ac' : '#b2182b', class: 'edge',
                'stroke-opacity': onPath ? 0.95 : 0.55, 'stroke-width': width,
                'data-a': a, 'data-b': b}, root).appendChild(el('title', {})).textContent = `${name(a)} -> ${name(b)}: ${fmt(w)}`;
  for (const [q, k, head, w, ...c] of step.qk) for (const [i, src] of [q, k].entries())  // over the edges, whose
    el('path', {d: curve(src, head, c[2 * i], c[2 * i + 1]), fill: 'none', stroke: w > 0 ? '#6a51a3' : '#e6550d',
                'stroke-opacity': 0.9, 'stroke-dasharray': '5 3', 'stroke-width': 1.5}, root)  // fan hid them
      .appendChild(el('title', {})).textContent = `QK pair of ${name(head)}: ${i ? 'key' : 'query'} side ` +
        `${name(src)} (query ${name(q)} x key ${name(k)}: ${fmt(w)})`;
  const onPath = new Set(step.edges.filter(e => e[4]).flatMap(e => [e[0], e[1]]));  // the marked path's nodes
  for (const [id, [x, y]] of Object.entries(step.xy)) {
    const n = DATA.nodes[id];
    const g = el('g', {class: 'node' + (onPath.has(id) ? ' onpath' : '') + (id === selected ? ' selected' : ''), 'data-node': id}, root);
    shape(g, id, n, x, Y(y));
    el('title', {}, g).textContent = n.title + (n.meaning ? ` (${n.meaning})` : '');
    text(g, x, Y(y), n.label.split('\n'), {'font-size': 9.5});
    g.addEventListener('click', () => { if (!dragged) go(id); });
    g.addEventListener('mouseenter', () => { if (!selected) show(id); });
  }
  const left = step.total - step.n;
  document.getElementById('count').textContent = `${step.n} of ${step.total} nodes drawn`;
  document.getElementById('threshold').textContent = fmt(step.threshold);
  document.getElementById('left-out').textContent = left ? `${left} nodes are left out: move the slider right, ` +
    'search, or pick them from the list on the right.' : 'All nodes are drawn.';
  for (const li of document.querySelectorAll('#node-list li'))  // a member is drawn as its family, when that is
    li.classList.toggle('undrawn', !(li.dataset.node in step.xy || DATA.nodes[li.dataset.node].family in step.xy));
  document.body.dataset.drawnNodes = step.n;
  highlight();
}
function highlight() {  // a selected node's drawn edges and neighbours stand out, the rest fades
  const on = !!(selected && selected in step.xy);
  scene.classList.toggle('focus', on);
  const near = new Set([selected]);
  for (const p of scene.querySelectorAll('path.edge')) {
    const hit = on && (p.dataset.a === selected || p.dataset.b === selected);
    p.classList.toggle('near', hit);
    if (hit) { near.add(p.dataset.a); near.add(p.dataset.b); }
  }
  for (const g of scene.querySelectorAll('g.node')) g.classList.toggle('near', on && near.has(g.dataset.node));
}

// -- zoom and pan ----------------------------------------------------------------------------------------
function setView(v) {
  view = v;
  scene.setAttribute('viewBox', `${v.x} ${v.y} ${v.w} ${v.h}`);
}
function fit() {
  const m = 8;
  document.getElementById('zoom-note').textContent = '';
  setView({x: -m, y: -m, w: step.width + 2 * m, h: step.height + 2 * m});
  measure();
}
function opening() {  // fitted; but where that leaves nodes too small to read (a long prompt), zoomed to a readable
  fit();               // size on the top right: the logits and the last positions, which the graph is about
  const px = DATA.node_w * Math.min(scene.clientWidth / view.w, scene.clientHeight / view.h);  // a node's width on screen
  if (!(px > 0) || px >= SMALL_PX) return;
  const f = READABLE_PX / px;
  setView({x: view.x + view.w - view.w / f, y: view.y, w: view.w / f, h: view.h / f});
  document.getElementById('zoom-note').textContent =
    ' Opened at a readable size on the last positions: "fit" shows the whole picture.';
  measure();
}
function zoom(f, cx, cy) {
  cx = cx ?? view.x + view.w / 2; cy = cy ?? view.y + view.h / 2;
  setView({x: cx - (cx - view.x) / f, y: cy - (cy - view.y) / f, w: view.w / f, h: view.h / f});
}
function toScene(ev) {
  const p = scene.createSVGPoint(); p.x = ev.clientX; p.y = ev.clientY;
  return p.matrixTransform(scene.getScreenCTM().inverse());
}
scene.addEventListener('wheel', ev => {
  ev.preventDefault();
  const p = toScene(ev);
  zoom(Math.exp(-ev.deltaY * 0.0015), p.x, p.y);
}, {passive: false});
let drag = null, dragged = false;
scene.addEventListener('pointerdown', ev => { drag = {x: ev.clientX, y: ev.clientY, v: view}; dragged = false; });
window.addEventListener('pointermove', ev => {
  if (!drag) return;
  const s = view.w / scene.clientWidth, s2 = view.h / scene.clientHeight, k = Math.max(s, s2);
  const dx = ev.clientX - drag.x, dy = ev.clientY - drag.y;
  if (Math.abs(dx) + Math.abs(dy) > 3) dragged = true;
  if (dragged) setView({...drag.v, x: drag.v.x - dx * k, y: drag.v.y - dy * k});
});
window.addEventListener('pointerup', () => { drag = null; });
scene.addEventListener('click', ev => {  // a click beside the nodes lets the selected one go
  if (dragged || ev.target.closest('g.node') || !selected) return;
  selected = null;
  for (const g of scene.querySelectorAll('g.node.selected')) g.classList.remove('selected');
  for (const li of document.querySelectorAll('#node-list li.selected')) li.classList.remove('selected');
  info.innerHTML = OPENING_PANEL;
  history.replaceState(null, '', location.pathname + location.search);
  highlight();
});
document.getElementById('toolbar').addEventListener('click', ev => {
  const f = ev.target.dataset.zoom;
  if (f) f === 'fit' ? fit() : zoom(Number(f));
});
function bringIntoView(id) {  // centre the node if it is off screen or drawn too small to read
  const [x, y] = step.xy[id], w = nodeW(id), h = DATA.node_h;
  const inside = x - w / 2 >= view.x && x + w / 2 <= view.x + view.w && Y(y) - h / 2 >= view.y && Y(y) + h / 2 <= view.y + view.h;
  const f = Math.max(1, view.w / scene.clientWidth, view.h / scene.clientHeight);  // > 1: smaller than 100%
  if (!inside || f > 1.5) setView({x: x - view.w / f / 2, y: Y(y) - view.h / f / 2, w: view.w / f, h: view.h / f});
}
function measure() {  // where each drawn node is on screen, for whoever checks the page (tests, scripts)
  const r = scene.getBoundingClientRect();
  scene.dataset.screen = [r.left, r.top, r.right, r.bottom].map(Math.round).join(' ');
  for (const g of scene.querySelectorAll('g.node')) {
    const b = g.getBoundingClientRect();
    g.dataset.screen = [b.left, b.top, b.right, b.bottom].map(v => v.toFixed(1)).join(' ');
  }
}

// -- the panel -------------------------------------------------------------------------------------------
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
  if (!n) {
    info.innerHTML = `<h2 id="panel-title">no node ${esc(id)}</h2><div class="meta">This graph has no node with that id; ` +
      'search for one, or pick it from the list below.</div>';
    delete info.dataset.node;
    return;
  }
  let h = `<h2 id="panel-title">${esc(n.title)}</h2><div class="meta">${esc(id)} &middot; ${esc(n.type)} at position ${n.pos} ` +
    `(${qtok(DATA.tokens[n.pos] ?? '')}) &middot; ${n.type === 'logit' ? 'demeaned logit' : 'activation'} ${fmt(n.activation)} ` +
    `&middot; influence ${fmt(n.influence)} ` + (n.rank ? `(rank ${n.rank} of ${DATA.total})` : "(its members' sum)") + '</div>';
  if (n.meaning) h += `<div class="meta">This is ${esc(n.meaning)}.</div>`;
  if (n.members) h += section(`a family of ${n.members.length} (output directions' mean cosine with their mean ` +
    `${fmt(n.mean_cosine)}; its edges are its members' sums)`, n.members.map(link).join(', '));
  if (n.family && DATA.nodes[n.family]) h += `<div class="meta">member of ${link(n.family)}</div>`;
  if (n.lens) h += section(n.members ?
    "logit lens of its output (its members' directions summed, weighted by activation, before the final norm's scale)" :
    "logit lens (demeaned logits per unit of activation, before the final norm's scale)",
    `<div class="num">raises ${n.lens.map(([t, v]) => `${qtok(t)} ${fmt(v)}`).join(', ')}</div>`);
  if (n.z_pattern) {
    h += section('z pattern on this prompt (each key position\'s part of the activation)',
      `<div class="ctx">${tokens(DATA.tokens.slice(0, n.z_pattern.length), n.z_pattern, n.pos)}</div>`);
  }
  if (n.qk && n.qk.length) {
    let rows = '';
    for (const e of n.qk) {
      rows += `<tr><td>key ${e.key_pos} (${tok(DATA.tokens[e.key_pos] ?? '')})</td><td>attn ${fmt(e.attention)}</td>` +
        `<td>score ${fmt(e.score)}</td></tr>`;
      for (const [q, k, v] of e.pairs.slice(0, 3)) rows += `<tr><td></td><td colspan="2" class="num">${link(q)} &times; ${link(k)}: ${fmt(v)}</td></tr>`;
      if (e.contrast) rows += contrastRows(e.contrast, 3);
    }
    h += section('QK: top key positions, feature pairs, and why each key wins (norm scales frozen at this prompt\'s; a '
      + 'bias is the residual stream\'s constant part, the model\'s and the replacements\' biases)', `<table>${rows}</table>`);
  }
  if (n.contrast) h += section(`QK: why its heads look at key ${n.key_pos} (${tok(DATA.tokens[n.key_pos] ?? '')}): the ` +
    `contrasts of ${n.contrast_heads} of its ${n.members.length} heads summed; the pairs sum each head's strongest few, ` +
    `each end named by its family`, `<table>${contrastRows(n.contrast, 5)}</table>`);
  const edges = (list, arrow) => list.map(([o, w]) => `<div class="num">${arrow} ${link(o)} ${fmt(w)}</div>`).join('');
  if (n.in.length || n.out.length) h += section('strongest edges', edges(n.in, '&larr; from') + edges(n.out, '&rarr; to'));
  const d = n.dash ? DATA.dashboards[n.dash] : null;
  if (d) {
    h += `<div class="meta">active on ${(100 * d.density).toFixed(2)}% of held-out tokens</div>`;
    const o = d.original_heads;
    if (o) h += section('original heads it comes from', `<div class="num">${esc(o.kind === 'one' ? 'one head' :
      o.kind === 'few' ? 'a few heads' : o.kind)}: ` + o.heads.map(([m, r]) => `head ${m} R&sup2; ${fmt(r)}`).join(', ') +
      `; best ${o.few.length} (${o.few.map(m => 'head ' + m).join(', ')}) R&sup2; ${fmt(o.few_r2)}; pattern closest to head ` +
      `${o.pattern_head} (overlap ${fmt(o.pattern_overlap)})</div>`);
    h += section('top-activating contexts', d.contexts.map(c =>
      `<div class="ctx"><span class="num">${fmt(c.activation)}</span> ${tokens(c.tokens, c.z || c.acts, c.query)}` +
      (c.z_top ? `<div class="num">reads ${c.z_top.map(z => `${tok(z.token)} at ${z.offset} (z ${fmt(z.z)})`).join(', ')}</div>` : '') +
      `</div>`).join('') || '<div class="num">never active on the sample</div>');
    h += section('logit lens over the vocabulary (raw logits per unit of activation, not demeaned)',
      `<div class="num">highest ${d.logits_up.map(([t, v]) => `${qtok(t)} ${fmt(v)}`).join(', ')}</div>` +
      `<div class="num">lowest ${d.logits_down.map(([t, v]) => `${qtok(t)} ${fmt(v)}`).join(', ')}</div>`);
  } else if (!n.members && (n.type === 'lorsa' || n.type === 'transcoder')) {
    h += '<div class="num">(no dashboard in this file)</div>';
  }
  info.innerHTML = h;
  info.dataset.node = id;
}
function contrastRows(c, k) {  // why a key wins (a head's QKContrast, or a family's summed): its split, top pairs
  const ref = c.reference === 'mean' ? 'the other keys\' attention-weighted mean' : c.reference_pos < 0 ?
    'the runner-up keys' : `key ${c.reference_pos} (${tok(DATA.tokens[c.reference_pos] ?? '')})`;
  let rows = `<tr class="why"><td></td><td colspan="2" class="num">why, vs ${ref}: ${fmt(c.difference)} = pairs ${fmt(c.pairs_total)}` +
    ` + query bias &times; keys ${fmt(c.query_bias_x_keys)} + position ${fmt(c.position)}</td></tr>`;
  for (const [q, kk, v] of c.pairs.slice(0, k)) rows += `<tr class="why"><td></td><td colspan="2" class="num">` +
    `${link(q)} &times; ${link(kk)}: ${fmt(v)}</td></tr>`;
  return rows;
}
function go(id) {  // select a node: draw it, bring it into view, fill the panel, mark it in the list
  if (DATA.nodes[id] && !(id in step.xy)) {  // a member while families are collapsed, or a family while expanded
    if (!STEPS.some(s => id in s.xy)) useFamilies(STEPS === DATA.steps);
    const usual = STEPS === DATA.steps ? DATA.default_step : DATA.family_default_step;
    draw(id in STEPS[usual].xy ? usual : STEPS.findIndex(s => id in s.xy)); fit();  // the usual picture if it holds it
  }
  selected = DATA.nodes[id] ? id : null;
  for (const g of scene.querySelectorAll('g.node.selected')) g.classList.remove('selected');
  for (const li of document.querySelectorAll('#node-list li.selected')) li.classList.remove('selected');
  show(id);
  highlight();
  if (!selected) return;
  scene.querySelector(`g.node[data-node="${CSS.escape(id)}"]`).classList.add('selected');
  bringIntoView(id);
  const li = document.querySelector(`#node-list li[data-node="${CSS.escape(id)}"]`);
  if (li) {  // a family is not in the list of the graph's nodes
    li.classList.add('selected');
    li.scrollIntoView({block: 'nearest'});
  }
  measure();
}

// -- search, slider, list, #node= --------------------------------------------------------------------------
const byName = new Map(Object.entries(DATA.nodes).map(([id, n]) => [n.title, id]));
document.getElementById('names').innerHTML = Object.entries(DATA.nodes)
  .map(([id, n]) => `<option value="${esc(n.title)}">${esc(id)}</option>`).join('');
document.getElementById('search').addEventListener('change', ev => {
  const q = ev.target.value.trim();
  const id = DATA.nodes[q] ? q : byName.get(q) ?? Object.keys(DATA.nodes).find(k => name(k).includes(q) || k.includes(q));
  if (q) location.hash = 'node=' + encodeURIComponent(id ?? q);
});
document.getElementById('families-box').style.display = DATA.family_steps ? '' : 'none';
familiesBox.addEventListener('change', () => {
  useFamilies(familiesBox.checked);
  draw(familiesBox.checked ? DATA.family_default_step : DATA.default_step); fit();
  if (selected && selected in step.xy) go(selected);
});
useFamilies(!DATA.expand_families);
slider.addEventListener('input', () => { draw(Number(slider.value)); fit(); if (selected && selected in step.xy) go(selected); });
document.getElementById('node-list').innerHTML = DATA.order
  .map(id => `<li data-node="${esc(id)}">${link(id)} <span class="num">${fmt(DATA.nodes[id].influence)}</span></li>`).join('');
function fromHash() {
  const m = location.hash.match(/^#node=(.+)$/);
  if (m) go(decodeURIComponent(m[1]));
}
window.addEventListener('hashchange', fromHash);
draw(STEPS === DATA.steps ? DATA.default_step : DATA.family_default_step);
opening();
fromHash();
"""


def _dash_key(node) -> str | None:
    return f"{node.type}.{node.layer}.{node.index}" if node.type in FEATURE_KINDS else None


def slider_steps(total: int, default: int) -> list[int]:
    """The node counts the page's slider offers: from 10, about x1.5 each step, ``default`` and ``total``."""
    steps, k = {min(default, total), total}, 10
    while k < total:
        steps.add(k)
        k = math.ceil(k * 1.5)
    return sorted(steps)


def picture(graph: AttributionGraph, n_nodes: int, order=None, marked=None) -> dict:
    """One slider step: the ``n_nodes`` most influential nodes on their grid, with the edges and QK pairs drawn
    (`layout.drawing`; ``marked``: the graph's marked path, found once for every step)."""
    d = drawing(graph, n_nodes, order, marked)
    nodes, ids = d.nodes, {n.id for n in d.nodes}
    g = grid(graph, nodes)
    E, names = graph.edge_arrays, [n.id for n in graph.node_list]
    # [source, target, weight, pen width, on the marked path]
    edges = [[names[int(E.src[i])], names[int(E.tgt[i])], round(float(E.w[i]), 5), width, int(i in d.on_path)]
             for i, width in zip(d.edges, d.widths)]
    qk = [[e.query, e.key, e.head, round(e.weight, 5)] for e in drawn_qk(graph, ids)]
    routes = iter(edge_routes(g, [(e[0], e[1]) for e in edges] + [(s, head) for q, k, head, _ in qk for s in (q, k)],
                              [e[2] for e in edges] + [0.0] * (2 * len(qk)),
                              marked={j for j, e in enumerate(edges) if e[4]}))
    for e in edges:  # each curve's control points' x: a bow around the nodes in its way (layout.edge_routes)
        r = next(routes)
        e += [round(r[2], 1), round(r[4], 1)]
    for e in qk:
        for _ in range(2):
            r = next(routes)
            e += [round(r[2], 1), round(r[4], 1)]
    rest = [n.influence for n in nodes if n.type != NodeKind.LOGIT]
    return {"n": len(nodes), "threshold": min(rest, default=0.0), "width": round(g.width, 1), "height": round(g.height, 1),
            "xy": {k: [round(x, 1), round(y, 1)] for k, (x, y) in g.xy.items()}, "columns": g.columns, "rows": g.rows,
            "node_w": {k: w for k, w in g.node_w.items() if w != NODE_W},
            "header_y": list(g.header_y), "edges": edges, "qk": qk}


def _pictures(graph: AttributionGraph, draw_nodes: int) -> tuple[list[dict], int]:
    """The slider's pictures of ``graph`` and the one drawn first."""
    edge_rank = edge_order(graph)
    ks = slider_steps(len(graph.node_list), draw_nodes)
    default = min(draw_nodes, len(graph.node_list))
    steps, first, marked = [], None, marked_path(graph)
    for k in ks:  # a step may draw fewer than k nodes (none hangs loose): one that draws no more than the last is left out
        s = picture(graph, k, edge_rank, marked)
        if not steps or s["n"] > steps[-1]["n"]:
            s["total"] = len(graph.node_list)
            steps.append(s)
        if k == default:
            first = len(steps) - 1
    return steps, first


def page_data(graph: AttributionGraph, dashboards=None, draw_nodes: int = DEFAULT_DRAW_NODES, n_edges: int = 5,
              expand_families: bool = False) -> dict:
    """The JSON the page embeds: every node (with its strongest edges) and its dashboard, each family of heads
    or features (graphs/families.py) with its members, and the pictures the slider steps through: of the graph
    (``steps``) and of the graph with each family as one node (``family_steps``; the page's "families" box
    switches between them; the page starts on these if not ``expand_families``)."""
    from replacement.errors import BadInputError

    from .export import STYLE as NODE_STYLE

    from .families import collapse, family_contrast

    fams = graph.families()
    collapsed = collapse(graph, fams) if fams else None
    order = sorted(graph.node_list, key=lambda n: -n.influence)
    nodes, dash = {}, {}
    for rank, n in enumerate(order, 1):
        key = _dash_key(n)
        if key and dashboards is not None and key not in dash:
            try:
                dash[key] = dashboards.entry(n.type, n.layer, n.index)
            except BadInputError:  # a layer without dashboards: the panel says so
                key = None
        nodes[n.id] = {
            "title": node_name(graph, n), "label": box_label(graph, n), "meaning": meaning(n), "type": n.type,
            "pos": n.pos, "rank": rank, "activation": n.activation, "influence": n.influence,
            "z_pattern": n.z_pattern, "qk": [e.to_json() for e in n.qk] or None, "dash": key if key in dash else None,
            "in": [[e.source, round(e.weight, 5)] for e in graph.incoming(n, k=n_edges)],
            "out": [[e.target, round(e.weight, 5)] for e in graph.outgoing(n, k=n_edges)], "family": n.family,
            "lens": n.lens,
        }
    for f in fams:  # a family node: its members, its summed edges in the collapsed graph, why its heads look at its key
        n = collapsed.node(f.id)
        contrast = family_contrast(graph, f, fams)
        nodes[f.id] = {
            "contrast": contrast[0].to_json() if contrast else None, "contrast_heads": contrast[1] if contrast else 0,
            "key_pos": f.key_positions[0] if f.key_positions else None,
            "title": node_name(collapsed, n), "label": box_label(collapsed, n), "meaning": "", "type": n.type,
            "pos": n.pos, "rank": None, "activation": n.activation, "influence": n.influence, "z_pattern": n.z_pattern,
            "qk": None, "dash": None, "members": f.members, "mean_cosine": f.mean_cosine,
            "in": [[e.source, round(e.weight, 5)] for e in collapsed.incoming(n, k=n_edges)],
            "out": [[e.target, round(e.weight, 5)] for e in collapsed.outgoing(n, k=n_edges)], "lens": n.lens,
        }
    steps, default = _pictures(graph, draw_nodes)
    family_steps, family_default = _pictures(collapsed, draw_nodes) if collapsed is not None else (None, None)
    return {"prompt": graph.prompt, "tokens": graph.tokens, "source": dashboard_source(graph),
            "nodes": nodes, "order": [n.id for n in order],
            "total": len(graph.node_list), "dashboards": dash, "steps": steps, "default_step": default,
            "family_steps": family_steps, "family_default_step": family_default,
            "expand_families": expand_families or collapsed is None,
            "style": {t.value: [fill, shape] for t, (fill, shape, _) in NODE_STYLE.items()}, "node_w": NODE_W, "node_h": NODE_H,
            "label_w": LABEL_W}


_WITH_DASHBOARDS = re.compile(r'(?<!\\)"dashboards": \{"')  # the embedded data's key, with an entry (not in a string)


def has_dashboards(path: str | Path) -> bool:
    """Whether the page at ``path`` embeds node dashboards (`trace --format html` builds them from the model;
    `circuits render` cannot)."""
    try:
        return bool(_WITH_DASHBOARDS.search(Path(path).read_text(encoding="utf-8", errors="replace")))
    except OSError:
        return False


def dashboard_source(graph: AttributionGraph) -> dict:
    """What a page's dashboards were built from: the model's name and fingerprint, the replacements' folders and a
    fingerprint of their weights (the graph's settings); a page's dashboards serve another graph only if it was
    traced from the same."""
    return {k: graph.settings.get(k) for k in ("model", "model_fingerprint", "replacements", "replacements_fingerprint")}


class PageDashboards:
    """The dashboards a page embeds, read back, to be embedded again (`circuits render` redraws a page that `trace`
    made without the model that built them): ``entry`` as `replacement.dashboards`' (a unit the page had none for is
    a BadInputError, which leaves that node's panel without one).  BadGraphError (one line) for a page whose data
    cannot be read."""

    def __init__(self, path: str | Path):
        from .validate import BadGraphError, strict_loads

        html = Path(path).read_text(encoding="utf-8", errors="replace")
        m = re.search(r'<script id="graph-data" type="application/json">(.*?)</script>', html, re.S)
        try:
            data = strict_loads(m.group(1)) if m else {}
            self.entries, self.source = data.get("dashboards") or {}, data.get("source")
            if not isinstance(self.entries, dict) or not all(isinstance(v, dict) for v in self.entries.values()):
                raise ValueError("its dashboards are not a table of entries")
        except (ValueError, RecursionError, AttributeError) as e:
            raise BadGraphError(f"{path} is damaged ({str(e).splitlines()[0][:80]})") from None

    @staticmethod
    def for_graph(path: str | Path, graph: AttributionGraph) -> "tuple[PageDashboards | None, str | None]":
        """The dashboards of the page at ``path`` if they can serve ``graph`` (its data reads, and it was traced
        from the same model, weights and replacements: `dashboard_source`), else None and a note saying why."""
        from .validate import BadGraphError

        try:
            page = PageDashboards(path)
        except (BadGraphError, OSError) as e:
            return None, f"{e}; its dashboards are not kept"
        if page.source != dashboard_source(graph):
            return None, (f"{path} was traced from another model or other replacements than the graph (or before pages "
                          "recorded theirs); its dashboards are not kept (trace --format html builds them)")
        return page, None

    def entry(self, kind: str, layer: int, index: int) -> dict:
        from replacement.errors import BadInputError

        key = f"{kind}.{layer}.{index}"
        if key not in self.entries:
            raise BadInputError(f"the page holds no dashboard of {key}")
        return self.entries[key]


def script_json(obj) -> str:
    """JSON safe inside ``<script type="application/json">``: ``<``, ``>`` and ``&`` (which can only occur in its
    strings) become ``\\u003c``-style escapes, so no ``</script``, ``<!--`` or ``<script`` in a prompt or label
    can end or swallow the block; ``JSON.parse`` reads the same values back."""
    from .validate import strict_dumps

    text = strict_dumps(obj)
    for c in "<>&\u2028\u2029":
        text = text.replace(c, f"\\u{ord(c):04x}")
    return text


def to_html(graph: AttributionGraph, dashboards=None, draw_nodes: int = DEFAULT_DRAW_NODES,
            expand_families: bool = False) -> str:
    import html

    data = script_json(page_data(graph, dashboards, draw_nodes, expand_families=expand_families))
    title = f"{one_line(graph.prompt)} - attribution graph"
    families = graph.families()
    opens = graph.collapsed() if families and not expand_families else graph  # the picture the page opens on
    gists = gist_examples(opens)  # what a box's third line says, with that picture's strongest examples
    third = f" Third line: {html.escape('; '.join(gists))}." if gists else ""
    family = (" Double outline: a family, heads at one position that attend to one key (or features at one "
              "position) and do not write against each other, one node whose edges are its members' sums (\u2190P: "
              "the key position its heads attend to; fam K: its rank in its id); untick 'families as one node' to draw "
              "its members.") if families else ""
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head>\n<body><div id=\"graph\"><div id=\"toolbar\">"
            f"<input id=\"search\" type=\"search\" list=\"names\" placeholder=\"find a node: id, name or token\">"
            f"<datalist id=\"names\"></datalist>"
            f"<label>pruning threshold: influence &ge; <span id=\"threshold\"></span> "
            f"<input id=\"slider\" type=\"range\" min=\"0\" step=\"1\"></label><span id=\"count\"></span>"
            f"<label id=\"families-box\" title=\"each family of heads (or features) that attend to one key and do not write against each other "
            f"as one node, its edges the sums of its members'\"><input id=\"families\" type=\"checkbox\"> families as one "
            f"node</label>"
            f"<span><button data-zoom=\"fit\">fit</button><button data-zoom=\"1.25\">+</button>"
            f"<button data-zoom=\"0.8\">&minus;</button> (or wheel; drag to pan)</span></div>"
            f"<div id=\"legend\"><span id=\"left-out\"></span><span id=\"zoom-note\"></span> Edges run upwards: blue excites, red inhibits, width by "
            f"how much of the logits' input flows along it; yellow: the strongest path from a token to the answer, its "
            f"nodes outlined; dashed: a "
            f"head's QK pair (purple raises its score, orange lowers it); click a node to light up its edges. Grey: "
            f"embedding, blue: Lorsa head, green: transcoder feature, "
            f"pink: logit (its probability), dashed octagon: error node (what the replacement misses; light: "
            f"attention, dark: MLP; with its influence)."
            f"{html.escape(family)}{third}</div>"
            f"<svg id=\"scene\" xmlns=\"http://www.w3.org/2000/svg\" preserveAspectRatio=\"xMidYMid meet\"></svg></div>\n"
            f"<div id=\"panel\"><div id=\"info\"><h2>{html.escape(one_line(graph.prompt))}</h2><div class=\"meta\">Click, search for or "
            f"hover over a node.</div></div><div id=\"list\"><h3>All {len(graph.node_list)} nodes, most influential first "
            f"(grey: not drawn at this threshold, alone or in its family)</h3><ol id=\"node-list\"></ol></div></div>\n"
            f"<script id=\"graph-data\" type=\"application/json\">{data}</script>\n<script>{SCRIPT}</script>\n"
            f"</body></html>\n")


def write_html(graph: AttributionGraph, path: str | Path, dashboards=None, draw_nodes: int = DEFAULT_DRAW_NODES,
               expand_families: bool = False) -> Path:
    from replacement.io import atomic_write_text

    path = Path(path)
    atomic_write_text(path, to_html(graph, dashboards, draw_nodes, expand_families))
    return path
