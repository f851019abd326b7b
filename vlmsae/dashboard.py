"""A latent dashboard: one self-contained HTML file for an SAE, opened offline in any browser.

The file holds everything it shows: the latent table and top examples as JSON, each image once
as a base64 PNG, plotly.js inline for the summary figures, and a small script that renders a
searchable latent list and, for the selected latent, its top images with the patch heatmap
drawn over them, the tokens around each peak and its statistics. Nothing is fetched.

The URL fragment selects and filters: ``dashboard.html#f=12`` opens latent 12,
``#q=red`` pre-fills the search.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
from PIL import Image

from .analysis import Scan, latent_table
from .checks import check_labels
from .deprecation import renamed_kwargs
from .errors import ConfigError
from .files import write_text_atomic
from .plots import density_histogram, l0_by_kind, to_rgb

STATS = ("density", "mean_firing", "max", "image_fraction", "text_fraction", "concept", "concept_auroc")
"""Latent-table columns shown per latent (those present)."""


def png_data_uri(image) -> str:
    """A ``data:image/png;base64,...`` URI of an image (PIL, or an array / tensor as :func:`vlmsae.plots.to_rgb` takes)."""
    buffer = io.BytesIO()
    Image.fromarray(to_rgb(image)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def script_json(data) -> str:
    """JSON to embed in a ``<script>`` element: ``<``, ``>`` and ``&`` as ``\\u003c`` etc., so that no string
    can close the element (``</script>``) or open an HTML comment (``<!--``) that swallows the page."""
    text = json.dumps(data, separators=(",", ":"), allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _number(value):
    """JSON-safe: NaN and infinities become ``None``; numpy scalars become Python ones."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _token_strings(tokenizer, ids: list[int]) -> list[str | None]:
    if tokenizer is None:
        return [None if t < 0 else str(t) for t in ids]
    return [None if t < 0 else str(tokenizer.convert_ids_to_tokens(t)) for t in ids]


@renamed_kwargs(features="latents")
def dashboard_data(scan: Scan, images: Sequence, *, table: pd.DataFrame, tokenizer=None,
                   latents: Iterable[int] | None = None, labels=None) -> dict:
    """The JSON the page renders: latents with stats, label and top examples, and each image used, once.

    ``labels``: a mapping latent -> label, or a DataFrame with a ``label`` column indexed by latent (as
    :func:`vlmsae.export.neuronpedia_json` takes); a latent without one gets ``None``.

    Raises:
        ConfigError: a top example has no image in ``images``; a latent was not scanned; labels for latents
            not scanned.
    """
    top = scan.top
    names = check_labels(labels, top.latents.tolist())
    chosen = top.latents.tolist() if latents is None else list(latents)
    shown, uris = [], {}
    for latent in chosen:
        row = top.row(latent)
        heats, examples = top.heatmap(row), []
        for j in range(top.values.shape[1]):
            example, value = int(top.example[row, j]), float(top.values[row, j])
            if example < 0 or value <= 0:
                continue
            if example >= len(images):
                raise ConfigError(f"the scan's example {example} has no image: images holds {len(images)}; pass the "
                                  "images of the scanned data, in the order it was scanned")
            if example not in uris:
                uris[example] = png_data_uri(images[example])
            examples.append({
                "image": example, "value": round(value, 4),
                "heat": None if heats is None else [[round(float(v), 4) for v in r] for r in heats[j]],
                "tokens": _token_strings(tokenizer, top.tokens[row, j].tolist()),
                "token_acts": [round(float(v), 4) for v in top.token_acts[row, j]],
            })
        stats = {c: _number(table.at[latent, c]) for c in STATS if c in table.columns}
        shown.append({"id": latent, "label": names.get(latent), "top_tokens": str(table.at[latent, "top_tokens"]),
                      "stats": stats,
                      "dead": bool(table.at[latent, "dead"]), "examples": examples})
    return {"latents": shown, "images": {str(k): v for k, v in uris.items()}}


@renamed_kwargs(features="latents")
def write_dashboard(path: str | os.PathLike, scan: Scan, images: Sequence, *, table: pd.DataFrame | None = None,
                    tokenizer=None, latents: Iterable[int] | None = None, title: str = "vlmsae latents",
                    figures: Sequence[go.Figure] | None = None, labels=None) -> Path:
    """Write the dashboard of the latents in ``scan`` to ``path`` (atomically) and return the path.

    ``images[i]`` is example ``i`` of the scanned data. ``table`` defaults to ``latent_table(scan)``
    (pass your own to add concept columns); ``latents`` defaults to every latent the scan kept
    examples for; ``figures`` default to the density histogram and L0 per token kind. ``images`` are PIL
    images or ``(3, H, W)`` / ``(H, W, 3)`` arrays or tensors (:func:`vlmsae.plots.to_rgb`). ``labels`` (as
    :func:`dashboard_data`) show in each latent's list entry and header, the same labels
    :func:`vlmsae.export.write_neuronpedia` exports.

    Raises:
        ConfigError: a top example has no image in ``images``, a latent was not scanned, or labels for latents
            not scanned.
        OSError: the file cannot be written (an existing file at ``path`` is left as it was).
    """
    table = latent_table(scan, tokenizer=tokenizer) if table is None else table
    data = dashboard_data(scan, images, table=table, tokenizer=tokenizer, latents=latents, labels=labels)
    if figures is None:
        figures = [density_histogram(table), l0_by_kind(scan)]
    # plotly.js goes in once, inline, with the first figure: the page must open with no network.
    plots = "\n".join(f.to_html(full_html=False, include_plotlyjs="inline" if i == 0 else False,
                                default_height="360px", config={"displaylogo": False})
                      for i, f in enumerate(figures))
    parts = {"TITLE": html.escape(title), "PLOTS": plots, "DATA": script_json(data)}
    # one pass, so that a title or figure holding "__DATA__" is text, not a placeholder
    page = re.sub(r"__(TITLE|PLOTS|DATA)__", lambda m: parts[m.group(1)], _PAGE)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, page)
    return path


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>__TITLE__</title>
<style>
body{font-family:system-ui,sans-serif;margin:0;display:flex;flex-direction:column;height:100vh}
header{padding:8px 16px;background:#222;color:#eee}
#main{display:flex;flex:1;min-height:0}
#side{width:300px;border-right:1px solid #ccc;display:flex;flex-direction:column}
#search{margin:8px;padding:6px;font-size:14px}
#list{list-style:none;margin:0;padding:0;overflow-y:auto;flex:1}
#list li{padding:4px 10px;cursor:pointer;border-bottom:1px solid #eee;font-size:13px}
#list li.selected{background:#dde8ff}
#list li .tok{color:#666}
#list li .label{display:block}
#detail{flex:1;overflow-y:auto;padding:12px 16px}
.examples{display:flex;flex-wrap:wrap;gap:12px}
.example{width:160px;font-size:12px}
.frame{position:relative;width:160px;height:160px}
.frame img{width:160px;height:160px;image-rendering:pixelated;display:block}
.heat{position:absolute;inset:0;display:grid}
.ctx span{padding:0 1px}
.ctx .peak{font-weight:bold;text-decoration:underline}
table.stats td{padding:1px 8px}
#errors{color:#b00}
</style></head>
<body><header><b>__TITLE__</b> · <span id="count"></span></header>
<div id="main"><div id="side"><input id="search" type="search" placeholder="search: id, token, concept, label">
<ul id="list"></ul></div>
<div id="detail"><div id="latent"></div><h3>Summary</h3>__PLOTS__</div></div>
<pre id="errors"></pre>
<script type="application/json" id="data">__DATA__</script>
<script>
"use strict";
window.addEventListener("error", e => {document.getElementById("errors").textContent += e.message + "\\n";});
const data = JSON.parse(document.getElementById("data").textContent);
const list = document.getElementById("list"), search = document.getElementById("search");
let selected = null;

function el(tag, attrs, text) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

function fmt(v) {
  if (v === null || v === undefined) return "";
  return typeof v === "number" ? (Math.abs(v) >= 0.01 || v === 0 ? v.toFixed(3) : v.toExponential(2)) : String(v);
}

function heatLayer(heat, peak) {
  const layer = el("div", {class: "heat"});
  layer.style.gridTemplateRows = `repeat(${heat.length}, 1fr)`;
  layer.style.gridTemplateColumns = `repeat(${heat[0].length}, 1fr)`;
  for (const row of heat) for (const v of row) {
    const cell = el("div", {class: "cell"});
    cell.style.background = `rgba(255, 40, 0, ${(0.7 * Math.max(v, 0) / peak).toFixed(3)})`;
    layer.appendChild(cell);
  }
  return layer;
}

function showLatent(f) {
  selected = f.id;
  for (const li of list.children) li.classList.toggle("selected", Number(li.dataset.id) === f.id);
  const box = document.getElementById("latent");
  box.replaceChildren(el("h2", {}, `Latent ${f.id}` + (f.label ? ": " + f.label : "") + (f.dead ? " (dead)" : "")));
  const stats = el("table", {class: "stats"});
  for (const [k, v] of Object.entries(f.stats)) {
    const tr = el("tr");
    tr.append(el("td", {}, k), el("td", {}, fmt(v)));
    stats.appendChild(tr);
  }
  box.appendChild(stats);
  box.appendChild(el("p", {}, "top tokens: " + f.top_tokens));
  const grid = el("div", {class: "examples"});
  const peak = Math.max(1e-9, ...f.examples.flatMap(x => x.heat ? x.heat.flat() : []));
  for (const x of f.examples) {
    const card = el("div", {class: "example"});
    const frame = el("div", {class: "frame"});
    frame.appendChild(el("img", {src: data.images[String(x.image)], alt: `example ${x.image}`}));
    if (x.heat) frame.appendChild(heatLayer(x.heat, peak));
    card.appendChild(frame);
    card.appendChild(el("div", {}, `example ${x.image} · ${fmt(x.value)}`));
    const ctx = el("div", {class: "ctx"});
    const middle = Math.floor(x.tokens.length / 2);
    x.tokens.forEach((t, i) => {
      if (t === null) return;
      const span = el("span", {class: i === middle ? "peak" : "", title: fmt(x.token_acts[i])}, t);
      const a = x.value > 0 ? Math.max(0, x.token_acts[i]) / x.value : 0;
      span.style.background = `rgba(255, 40, 0, ${(0.5 * a).toFixed(3)})`;
      ctx.appendChild(span);
      ctx.appendChild(document.createTextNode(" "));
    });
    card.appendChild(ctx);
    grid.appendChild(card);
  }
  if (!f.examples.length) grid.appendChild(el("p", {}, "no example where it fires"));
  box.appendChild(grid);
}

function render() {
  const q = search.value.trim().toLowerCase();
  list.replaceChildren();
  let shown = 0;
  for (const f of data.latents) {
    const text = `${f.id} ${f.top_tokens} ${f.stats.concept || ""} ${f.label || ""}`.toLowerCase();
    if (q && !text.split(/\\s+/).some(w => w.startsWith(q)) && !text.includes(q)) continue;
    const li = el("li", {class: "latent", "data-id": f.id});
    li.append(el("b", {}, `#${f.id}`), document.createTextNode(` ${fmt(f.stats.density)} `),
              el("span", {class: "tok"}, f.top_tokens + (f.stats.concept ? " · " + f.stats.concept : "")));
    if (f.label) li.appendChild(el("span", {class: "label"}, f.label));
    li.addEventListener("click", () => showLatent(f));
    list.appendChild(li);
    shown++;
  }
  document.getElementById("count").textContent = `${shown} of ${data.latents.length} latents`;
  document.body.dataset.shown = String(shown);
}

const params = new URLSearchParams(location.hash.slice(1));
search.value = params.get("q") || "";
search.addEventListener("input", render);
render();
const first = data.latents.find(f => String(f.id) === params.get("f")) ||
  data.latents.find(f => Number(list.firstChild && list.firstChild.dataset.id) === f.id) || data.latents[0];
if (first) showLatent(first);
document.body.dataset.ready = "1";
</script></body></html>
"""
