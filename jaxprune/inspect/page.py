"""The kernel-selection page: a person looks at every kernel of a layer and picks some to remove.

`kernel_page` returns one self-contained HTML file (inline CSS and JavaScript, pictures as PNG
data URIs; no server, no network). For every kernel it shows its activation maps over the sample
images (heat maps laid over the images), its filter (one tile per input channel) and its
objective score when given. Clicking a kernel toggles "remove"; the page counts the removed
kernels and the MACs they save, and "Export" writes the choice as a selection file
(`jaxprune.inspect.selection`, ``"chosen_by": "person"``) both as a download and into a text
box. `jaxprune prune --method progressive --criterion subjective --selection FILE` replays it.

Element ids and classes the page promises (tests and scripts rely on them): ``.kernel`` with
``data-index`` (and class ``removed`` when chosen), ``#removed-count``, ``#kept-count``,
``#macs-saved`` (its ``data-macs`` holds the exact number), ``#export``, ``#download``,
``#selection-json``, ``#clear``, ``#sort-index``, ``#sort-score``, ``#message``.
"""

from __future__ import annotations

import dataclasses
import html
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxprune.graph import ChannelGraph
from jaxprune.inspect import render
from jaxprune.inspect.filters import kernel_filters
from jaxprune.inspect.macs import macs_per_kernel as default_macs_per_kernel
from jaxprune.inspect.maps import activation_maps
from jaxprune.inspect.selection import FORMAT


@dataclasses.dataclass(frozen=True)
class PageConfig:
    """How the page looks; the defaults keep a 32-kernel, 8-image page well under 1 MB."""

    # Longest side, in screen pixels, of each sample image and heat map; maps larger than this
    # are stored shrunk, smaller ones are enlarged by a whole factor.
    image_side: int = 56
    # Longest side, in screen pixels, of each kernel's filter grid (one tile per input channel).
    filter_side: int = 96
    # File name the export offers; None: "selection_<group>.json".
    download_name: str | None = None
    # Kernels shown as removed when the page opens (e.g. a stand-in's proposal to review).
    removed: tuple[int, ...] = ()
    # The criterion the scores come from, named in the legend (oracle_loss: the objective one).
    score_name: str = "oracle_loss"


def kernel_page(
    apply_fn: Callable[..., Any],
    variables: Any,
    graph: ChannelGraph,
    group: str,
    images: Any,
    *,
    scores: Sequence[float] | np.ndarray | None = None,
    macs_per_kernel: float | None = None,
    title: str = "",
    config: PageConfig | None = None,
) -> str:
    """The kernel-selection page of one conv layer, as a self-contained HTML document.

    Args:
      apply_fn: the model function the graph was built from.
      variables: the model variables.
      graph: the channel graph.
      group: the conv group (layer) to show.
      images: float32 NHWC sample images (a handful: 4 to 16).
      scores: one objective score per kernel (higher = more relevant), shown with its rank.
      macs_per_kernel: the MACs per example one kernel of this layer costs; None computes it
        (`jaxprune.inspect.macs.macs_per_kernel`).
      title: a heading (e.g. the model file and dataset).
      config: picture sizes, the export's file name, kernels shown removed at first.

    Returns:
      The HTML text.

    Raises:
      ValueError: a dense group, bad images, scores of the wrong length or with NaN, or
        initially removed kernels out of range or all of them.
    """
    config = config or PageConfig()
    images = np.asarray(images, np.float32)
    maps = activation_maps(apply_fn, variables, graph, group, images)
    num_kernels = maps.shape[-1]
    filters = kernel_filters(variables, graph, group)
    score_values = _checked_scores(scores, num_kernels)
    removed = sorted({int(k) for k in config.removed})
    if removed and (removed[0] < 0 or removed[-1] >= num_kernels or len(removed) >= num_kernels):
        raise ValueError(
            f"PageConfig.removed must name fewer than all {num_kernels} kernels, each in "
            f"[0, {num_kernels}); got {removed}."
        )
    if macs_per_kernel is None:
        macs_per_kernel = default_macs_per_kernel(apply_fn, variables, graph, group, images[:1])
    map_height, map_width = render.display_size(maps.shape[1], maps.shape[2], config.image_side)
    if (map_height, map_width) != maps.shape[1:3]:
        maps_shown = render.resize_nearest(np.moveaxis(maps, 0, 2), map_height, map_width)
        maps_shown = np.moveaxis(maps_shown, 2, 0)
    else:
        maps_shown = maps
    zoom = render.enlargement(map_height, map_width, config.image_side)
    shown = render.display_images(images)
    shown = np.stack(
        [render.resize_nearest(im, map_height * zoom, map_width * zoom) for im in shown]
    )
    signed = bool(np.min(maps) < 0)
    peaks = np.max(np.abs(maps), axis=(0, 1, 2))
    layer_peak = float(np.max(peaks)) if peaks.size else 0.0
    ranks = _ranks(score_values) if score_values is not None else None
    cards = []
    for k in range(num_kernels):
        strip = render.heat_strip(maps_shown[..., k], float(peaks[k]), signed=signed)
        grid = render.filter_grid(filters[k])
        grid_zoom = min(8, render.enlargement(*grid.shape[:2], config.filter_side))
        cards.append(
            _card(
                k,
                _img("maps", f"activation maps of kernel {k}", strip, zoom),
                _img("weights", f"filter of kernel {k}", grid, grid_zoom),
                float(peaks[k]),
                layer_peak,
                None if score_values is None else float(score_values[k]),
                None if ranks is None else int(ranks[k]),
                k in removed,
            )
        )
    data = {
        "format": FORMAT,
        "chosen_by": "person",
        "group": group,
        "num_kernels": int(num_kernels),
        "macs_per_kernel": float(macs_per_kernel),
        "download_name": config.download_name or f"selection_{_file_stem(group)}.json",
        "removed": removed,
    }
    heading = title or f"Kernels of {group}"
    facts = (
        f"layer <b>{html.escape(group)}</b> &middot; {num_kernels} kernels &middot; "
        f"filters {filters.shape[1]}&times;{filters.shape[2]}&times;{filters.shape[3]} &middot; "
        f"maps {maps.shape[1]}&times;{maps.shape[2]} over {images.shape[0]} images &middot; "
        f"{_si(macs_per_kernel)} MACs per kernel per image"
    )
    return _TEMPLATE.format(
        title=html.escape(heading),
        facts=facts,
        samples=_img("samples", "sample images", render.image_strip(shown, gap=zoom), 1),
        legend=_legend(signed, score_values is not None, config.score_name),
        cards="\n".join(cards),
        data=json.dumps(data).replace("</", "<\\/"),
        css=_CSS,
        script=_SCRIPT,
        sort_disabled="" if score_values is not None else " disabled",
    )


def write_kernel_page(
    path: str | Path,
    apply_fn: Callable[..., Any],
    variables: Any,
    graph: ChannelGraph,
    group: str,
    images: Any,
    *,
    scores: Sequence[float] | np.ndarray | None = None,
    macs_per_kernel: float | None = None,
    title: str = "",
    config: PageConfig | None = None,
) -> Path:
    """Writes `kernel_page` to `path` (parent folders are created).

    Args:
      path: the HTML file to write.
      apply_fn, variables, graph, group, images, scores, macs_per_kernel, title, config: as
        for `kernel_page`.

    Returns:
      The path written.
    """
    text = kernel_page(
        apply_fn,
        variables,
        graph,
        group,
        images,
        scores=scores,
        macs_per_kernel=macs_per_kernel,
        title=title,
        config=config,
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def page_file_name(group: str) -> str:
    """The file name of a group's page: "stage1/block0/conv1" -> "stage1-block0-conv1.html"."""
    return _file_stem(group) + ".html"


def _file_stem(group: str) -> str:
    return "".join(c if c.isalnum() or c in "_." else "-" for c in group)


def _checked_scores(scores: Any, num_kernels: int) -> np.ndarray | None:
    if scores is None:
        return None
    values = np.asarray(scores, np.float64).reshape(-1)
    if values.shape != (num_kernels,):
        raise ValueError(
            f"scores has {values.size} entries but the layer has {num_kernels} kernels; pass one "
            "score per kernel (e.g. criteria.score(...)[group])."
        )
    if np.isnan(values).any():
        raise ValueError("scores contain NaN; fix the criterion or pass scores=None.")
    return values


def _ranks(scores: np.ndarray) -> np.ndarray:
    """Rank 1 = the least relevant kernel (the first an objective criterion removes)."""
    ranks = np.empty(scores.size, np.int64)
    ranks[np.argsort(scores, kind="stable")] = np.arange(1, scores.size + 1)
    return ranks


def _si(value: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.3g} {unit}"
    return f"{value:.3g}"


def _img(kind: str, alt: str, rgb: np.ndarray, zoom: int) -> str:
    """An inline PNG shown `zoom` times its stored size."""
    height, width = rgb.shape[:2]
    return (
        f'<img class="{kind}" alt="{html.escape(alt)}" width="{width * zoom}" '
        f'height="{height * zoom}" src="{render.data_uri(rgb)}">'
    )


def _card(
    index: int,
    maps_img: str,
    weights_img: str,
    peak: float,
    layer_peak: float,
    score: float | None,
    rank: int | None,
    removed: bool,
) -> str:
    share = 100.0 * peak / layer_peak if layer_peak > 0 else 0.0
    score_html = (
        f'<span class="score" title="objective score: higher = more relevant">'
        f"score {score:.4g} &middot; rank {rank}</span>"
        if score is not None
        else ""
    )
    score_attr = f' data-score="{score!r}"' if score is not None else ""
    return (
        f'<div class="kernel{" removed" if removed else ""}" data-index="{index}"{score_attr} '
        f'role="button" tabindex="0" aria-pressed="{"true" if removed else "false"}">'
        f'<div class="head"><span class="name">kernel {index}</span>{score_html}'
        f'<span class="state">{"remove" if removed else "keep"}</span></div>'
        f'<div class="body">{maps_img}{weights_img}</div>'
        f'<div class="peak" title="peak activation {peak:.4g}; the bar is its share of the '
        f'layer\'s highest peak"><div class="bar" style="width:{share:.1f}%"></div></div>'
        f"</div>"
    )


def _legend(signed: bool, has_scores: bool, score_name: str) -> str:
    maps = (
        "Heat maps: blue negative, red positive"
        if signed
        else "Heat maps: dark = no activation, bright = the kernel's own peak"
    )
    parts = [
        maps + "; the bar under each kernel is its peak as a share of the layer's highest.",
        "Filters: one tile per input channel, blue &lt; 0 &lt; red.",
    ]
    if has_scores:
        parts.append(f"Score: {html.escape(score_name)} (higher = more relevant; rank 1 = least).")
    parts.append("Click a kernel to remove it, again to keep it; then Export.")
    return " ".join(parts)


_CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 0; color: #222; background: #fafafa; }
header { background: #fff; padding: 8px 16px 0; }
h1 { font-size: 18px; margin: 0 0 4px; }
.facts, .legend { color: #555; font-size: 12px; }
.controls { position: sticky; top: 0; z-index: 1; display: flex; flex-wrap: wrap; gap: 12px;
  align-items: center; background: #fff; border-bottom: 1px solid #ccc; padding: 6px 16px; }
.controls .stat b { font-size: 16px; }
button { font: inherit; padding: 3px 10px; cursor: pointer; }
#export { font-weight: bold; }
#message { color: #a40; }
.samples { padding: 8px 24px; }
img { image-rendering: pixelated; }
main { display: flex; flex-wrap: wrap; gap: 8px; padding: 8px 16px; }
.kernel { background: #fff; border: 2px solid #ddd; border-radius: 6px; padding: 4px 6px;
  cursor: pointer; user-select: none; scroll-margin-top: 48px; }
.kernel:focus { outline: 2px solid #48c; }
.kernel.removed { border-color: #c33; background: #fee; opacity: 0.75; }
.kernel .head { display: flex; gap: 10px; font-size: 12px; margin-bottom: 3px; }
.kernel .name { font-weight: bold; }
.kernel .state { margin-left: auto; color: #393; }
.kernel.removed .state { color: #c33; font-weight: bold; }
.kernel .body { display: flex; gap: 6px; align-items: flex-start; }
.kernel img.weights { border: 1px solid #eee; }
.peak { height: 4px; background: #eee; margin-top: 3px; }
.peak .bar { height: 4px; background: #e80; }
footer { padding: 8px 16px 24px; }
textarea { width: 100%; max-width: 60em; height: 9em; font: 12px monospace; }
"""

_SCRIPT = """
(function () {
  "use strict";
  const data = JSON.parse(document.getElementById("page-data").textContent);
  const removed = new Set(data.removed);
  const main = document.querySelector("main");
  const cards = Array.from(document.querySelectorAll(".kernel"));
  const message = document.getElementById("message");
  let exported = null;

  function si(value) {
    const units = [["G", 1e9], ["M", 1e6], ["k", 1e3]];
    for (const [unit, size] of units) {
      if (Math.abs(value) >= size) return (value / size).toPrecision(3) + " " + unit;
    }
    return String(Math.round(value));
  }

  function selectionText() {
    const layers = {};
    layers[data.group] = {
      num_kernels: data.num_kernels,
      remove: Array.from(removed).sort(function (a, b) { return a - b; }),
    };
    const selection = {format: data.format, chosen_by: data.chosen_by, layers: layers};
    return JSON.stringify(selection, null, 1);
  }

  function update() {
    for (const card of cards) {
      const on = removed.has(Number(card.dataset.index));
      card.classList.toggle("removed", on);
      card.setAttribute("aria-pressed", on ? "true" : "false");
      card.querySelector(".state").textContent = on ? "remove" : "keep";
    }
    const saved = Math.round(removed.size * data.macs_per_kernel);
    document.getElementById("removed-count").textContent = String(removed.size);
    document.getElementById("kept-count").textContent = String(data.num_kernels - removed.size);
    const macs = document.getElementById("macs-saved");
    macs.textContent = si(saved);
    macs.dataset.macs = String(saved);
    const status = document.getElementById("export-status");
    if (exported === null) status.textContent = "not exported yet";
    else status.textContent = exported === selectionText() ? "exported" : "changed since export";
  }

  function toggle(card) {
    const index = Number(card.dataset.index);
    message.textContent = "";
    if (removed.has(index)) {
      removed.delete(index);
    } else if (removed.size + 1 >= data.num_kernels) {
      message.textContent = "Keep at least one kernel of the layer.";
      return;
    } else {
      removed.add(index);
    }
    update();
  }

  for (const card of cards) {
    card.addEventListener("click", function () { toggle(card); });
    card.addEventListener("keydown", function (event) {
      if (event.key === "Enter" || event.key === " ") { event.preventDefault(); toggle(card); }
    });
  }

  function sortBy(key) {
    const sorted = cards.slice().sort(function (a, b) {
      return Number(a.dataset[key]) - Number(b.dataset[key]) ||
        Number(a.dataset.index) - Number(b.dataset.index);
    });
    for (const card of sorted) main.appendChild(card);
  }
  document.getElementById("sort-index").addEventListener("click", function () { sortBy("index"); });
  document.getElementById("sort-score").addEventListener("click", function () { sortBy("score"); });
  document.getElementById("clear").addEventListener("click", function () {
    removed.clear();
    message.textContent = "";
    update();
  });

  document.getElementById("export").addEventListener("click", function () {
    const text = selectionText();
    document.getElementById("selection-json").value = text;
    const url = URL.createObjectURL(new Blob([text + "\\n"], {type: "application/json"}));
    const link = document.getElementById("download");
    link.href = url;
    link.download = data.download_name;
    link.click();
    setTimeout(function () { URL.revokeObjectURL(url); }, 60000);
    exported = text;
    message.textContent = "Exported " + removed.size + " kernels as " + data.download_name + ".";
    update();
  });

  update();
})();
"""

_TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title}</title>
<style>{css}</style>
</head>
<body>
<header>
<h1>{title}</h1>
<div class="facts">{facts}</div>
<div class="legend">{legend}</div>
</header>
<nav class="controls">
<span class="stat">removed <b id="removed-count">0</b></span>
<span class="stat">kept <b id="kept-count">0</b></span>
<span class="stat">MACs saved per image <b id="macs-saved" data-macs="0">0</b></span>
<button id="sort-index" type="button">by index</button>
<button id="sort-score" type="button"{sort_disabled}>by score</button>
<button id="clear" type="button">keep all</button>
<button id="export" type="button">Export selection</button>
<a id="download" href="#" hidden>download</a>
<span id="export-status"></span>
<span id="message" role="status"></span>
</nav>
<div class="samples"><div class="legend">Sample images</div>{samples}</div>
<main>
{cards}
</main>
<footer>
<div class="legend">The selection (what Export downloads; copy it from here too):</div>
<textarea id="selection-json" readonly spellcheck="false"></textarea>
</footer>
<script type="application/json" id="page-data">{data}</script>
<script>{script}</script>
</body>
</html>
"""
