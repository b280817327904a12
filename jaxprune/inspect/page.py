"""The kernel-selection page: a person looks at every kernel of a layer and picks some to remove.

`kernel_page` returns one self-contained HTML file (inline CSS and JavaScript, pictures as PNG
data URIs; no server, no network). For every kernel it shows its activation maps laid over the
sample images (a small map, e.g. 7x7, is stretched smoothly over its image), its filter (one
tile per input channel) and its objective score when given. Clicking a kernel toggles "remove"
and shift-clicking another sets the range between them; "select the N lowest by score" takes
the kernels an objective run would; the page shows the count that p% of the layer means (as a
progressive run rounds it), the kernels removed and the MACs they save. "Export" writes the
choice as a selection file (`jaxprune.inspect.selection`, ``"chosen_by": "person"``, with the
model's fingerprint) both as a download and into a text box, and the page says where to put
it: the file a waiting run reads (`PageConfig.save_to`), or how to replay it. The browser keeps
the choice across reloads (localStorage, keyed by model fingerprint and layer). Layers with many
kernels get a compact grid that fills the window.

Element ids and classes the page promises (tests and scripts rely on them): ``.kernel`` with
``data-index`` (and class ``removed`` when chosen), ``#removed-count``, ``#kept-count``,
``#macs-saved`` (its ``data-macs`` holds the exact number), ``#p-percent``, ``#p-count``,
``#lowest-count``, ``#select-lowest``, ``#export``, ``#download``, ``#selection-json``,
``#clear``, ``#sort-index``, ``#sort-score``, ``#save-to`` (with a waiting run), ``#message``.
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
from jaxprune.inspect.selection import FORMAT, SHORT_FINGERPRINT, model_fingerprint
from jaxprune.methods.progressive_choice import removal_count


@dataclasses.dataclass(frozen=True)
class PageConfig:
    """How the page looks and what it tells the person; defaults keep 32 kernels under 1 MB."""

    # Side, in screen pixels, of each image with its heat map laid over it (layers with more
    # than `compact_above` kernels use half of it, so many kernels fit on a screen).
    image_side: int = 56
    # Longest side, in screen pixels, of each kernel's filter grid (one tile per input channel).
    filter_side: int = 96
    # Layers with more kernels than this get the compact grid (smaller tiles, more per row).
    compact_above: int = 32
    # Images per row inside a kernel's card.
    images_per_row: int = 4
    # File name the export offers; None: "selection_<layer>.json" (`selection_file_names`).
    download_name: str | None = None
    # Where the waiting job reads the selection (shown on the page); None: no job is waiting,
    # the page explains how to replay the file instead.
    save_to: str | None = None
    # Kernels shown as removed when the page opens (e.g. a stand-in's proposal to review).
    removed: tuple[int, ...] = ()
    # The criterion the scores come from, named in the legend (oracle_loss: the objective one).
    score_name: str = "oracle_loss"
    # p: the fraction of the layer a progressive run removes (the paper's 5%); the page shows
    # the count it means (as the run counts it, at least one kernel kept) and offers to
    # select that many of the lowest scores.
    ratio: float = 0.05
    # How the run turns p into a count: "floor" (its default, as the authors' code) or
    # "nearest" (`ProgressiveConfig.rounding`).
    rounding: str = "floor"
    # p as a count of kernels instead (a run's `count` or `per_layer` entry); overrides ratio.
    count: int | None = None
    # The model's fingerprint recorded in the exported file; None: that of the variables shown
    # (`jaxprune.inspect.selection.model_fingerprint`).
    model_fingerprint: str | None = None


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
      config: picture sizes, p, where the file goes, kernels shown removed at first.

    Returns:
      The HTML text.

    Raises:
      ValueError: a dense group, bad images, scores of the wrong length or with NaN, initially
        removed kernels out of range or all of them, or p out of range.
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
    suggested, percent = _suggestion(config, num_kernels)
    if macs_per_kernel is None:
        macs_per_kernel = default_macs_per_kernel(apply_fn, variables, graph, group, images[:1])
    fingerprint = config.model_fingerprint or model_fingerprint(variables)
    compact = num_kernels > config.compact_above
    side = max(8, config.image_side // 2 if compact else config.image_side)
    # Images are stored at their own size (or shrunk to the tile) and enlarged by the browser.
    tile_height, tile_width = render.display_size(images.shape[1], images.shape[2], side)
    zoom = render.enlargement(tile_height, tile_width, side)
    shown = render.resize_images(render.display_images(images), tile_height, tile_width)
    signed = bool(np.min(maps) < 0)
    peaks = np.max(np.abs(maps), axis=(0, 1, 2))
    layer_peak = float(np.max(peaks)) if peaks.size else 0.0
    ranks = _ranks(score_values) if score_values is not None else None
    columns = max(1, min(config.images_per_row, images.shape[0]))
    grid_height, grid_width = render.filter_grid(filters[0]).shape[:2]
    filter_side = config.filter_side // 2 if compact else config.filter_side
    grid_zoom = min(8, render.enlargement(grid_height, grid_width, filter_side))
    cards = []
    for k in range(num_kernels):
        tiles = render.overlay_tiles(shown, maps[..., k], float(peaks[k]), signed=signed)
        maps_alt = f"activation maps of kernel {k} over the images"
        cards.append(
            _card(
                k,
                _img("maps", maps_alt, render.mosaic(tiles, columns), zoom),
                _img("weights", f"filter of kernel {k}", render.filter_grid(filters[k]), grid_zoom),
                float(peaks[k]),
                layer_peak,
                None if score_values is None else float(score_values[k]),
                None if ranks is None else int(ranks[k]),
                k in removed,
            )
        )
    canonical, download = selection_file_names(group)
    download = config.download_name or download
    data = {
        "format": FORMAT,
        "chosen_by": "person",
        "model_fingerprint": fingerprint,
        "group": group,
        "num_kernels": int(num_kernels),
        "rounding": config.rounding,
        "macs_per_kernel": float(macs_per_kernel),
        "download_name": download,
        "save_to": config.save_to,
        "suggested": suggested,
        "removed": removed,
    }
    card_width = _card_width(columns * (tile_width + 1) - 1, zoom, grid_width, grid_zoom)
    heading = title or f"Kernels of {group}"
    facts = (
        f"layer <b>{html.escape(group)}</b> &middot; {num_kernels} kernels &middot; "
        f"filters {filters.shape[1]}&times;{filters.shape[2]}&times;{filters.shape[3]} &middot; "
        f"maps {maps.shape[1]}&times;{maps.shape[2]} over {images.shape[0]} images of "
        f"{images.shape[1]}&times;{images.shape[2]} &middot; "
        f"{_si(macs_per_kernel)} MACs per kernel per image &middot; model "
        f'<code id="fingerprint" title="{html.escape(fingerprint)}">'
        f"{html.escape(fingerprint[:SHORT_FINGERPRINT])}</code>"
    )
    return _TEMPLATE.format(
        title=html.escape(heading),
        facts=facts,
        save_help=_save_help(config.save_to, canonical, download),
        samples=_img(
            "samples", "sample images", render.mosaic(_uint8(shown), images.shape[0]), zoom
        ),
        legend=_legend(signed, score_values is not None, config.score_name),
        cards="\n".join(cards),
        data=script_json(data),
        css=_CSS.replace("CARD_WIDTH", str(card_width)),
        script=_SCRIPT,
        density="compact" if compact else "comfortable",
        num_kernels=num_kernels,
        percent=_number(percent),
        suggested=suggested,
        score_disabled="" if score_values is not None else " disabled",
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


def selection_file_names(group: str) -> tuple[str, str]:
    """The names a layer's selection file may have in a waiting run's selection folder.

    Args:
      group: the layer, e.g. "stage1/block0/conv1".

    Returns:
      ("stage1-block0-conv1.json", "selection_stage1-block0-conv1.json"): the name the page
      asks for, and the one the page's download gets by default (browsers keep it).
    """
    stem = _file_stem(group)
    return f"{stem}.json", f"selection_{stem}.json"


def script_json(value: Any) -> str:
    """JSON that is safe inside an HTML ``<script>`` element.

    Every ``<``, ``>`` and ``&`` becomes a ``\\u`` escape, so no text (``</script>``, ``<!--``
    that would start the parser's escaped state, ``<script`` that would nest one) can end or
    bend the element; ``JSON.parse`` reads the same value back.

    Args:
      value: a JSON-ready value.

    Returns:
      The JSON text.
    """
    text = json.dumps(value)
    return text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")


def _file_stem(group: str) -> str:
    return "".join(c if c.isalnum() or c in "_." else "-" for c in group)


def _suggestion(config: PageConfig, num_kernels: int) -> tuple[int, float]:
    """The count p means for this layer, as a progressive run counts it, and p in percent."""
    if config.count is not None:
        if not 0 <= config.count < num_kernels:
            raise ValueError(
                f"PageConfig.count must be in [0, {num_kernels}) for this layer of "
                f"{num_kernels} kernels; got {config.count}."
            )
        return int(config.count), 100.0 * config.count / num_kernels
    if not 0.0 <= config.ratio < 1.0:
        raise ValueError(f"PageConfig.ratio must be in [0, 1); got {config.ratio}.")
    # The run's own rule (`removal_count`); the page's script repeats it as p is edited.
    count = removal_count(float(config.ratio), num_kernels, rounding=config.rounding)
    return count, 100.0 * config.ratio


def _number(value: float) -> str:
    """A short decimal for an input field (5.000000000000001 -> "5")."""
    return f"{value:.4f}".rstrip("0").rstrip(".")


def _uint8(rgb: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(np.asarray(rgb) * 255.0), 0, 255).astype(np.uint8)


def _card_width(maps_width: int, zoom: int, grid_width: int, grid_zoom: int) -> int:
    """The narrowest a card can be: its two pictures, their gap, padding and border."""
    return max(150, maps_width * zoom + grid_width * grid_zoom + 6 + 2 * 6 + 2 * 2)


def _save_help(save_to: str | None, canonical: str, download: str) -> str:
    if save_to:
        where = Path(save_to)
        return (
            f"A run is waiting for this choice. Export, then save the file as "
            f'<code id="save-to">{html.escape(str(where))}</code> '
            f"(the run also reads <code>{html.escape(download)}</code>, the name your browser "
            f"gives the download, in <code>{html.escape(str(where.parent))}</code>)."
        )
    return (
        f"Export downloads <code>{html.escape(download)}</code>; replay it with "
        f"<code>jaxprune prune --method progressive --criterion subjective --selection "
        f"{html.escape(download)}</code> (a folder of such files works too). A run started "
        f"with <code>--wait-for-selection</code> reads <code>{html.escape(canonical)}</code> "
        f"or <code>{html.escape(download)}</code> in its <code>selection/</code> folder."
    )


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
    # Number() in the script reads "Infinity" but not Python's "inf".
    shown = "Infinity" if score == np.inf else "-Infinity" if score == -np.inf else repr(score)
    score_attr = f' data-score="{shown}"' if score is not None else ""
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
        "Each image with the kernel's map laid over it (stretched to the image): blue negative, "
        "red positive, the image shows through where the kernel is silent"
        if signed
        else "Each image with the kernel's map laid over it (stretched to the image): the "
        "brighter the colour, the closer to the kernel's own peak; the image shows through "
        "where the kernel is silent"
    )
    parts = [
        maps + ". The bar under each kernel is its peak as a share of the layer's highest.",
        "Filters: one tile per input channel, blue &lt; 0 &lt; red.",
    ]
    if has_scores:
        parts.append(f"Score: {html.escape(score_name)} (higher = more relevant; rank 1 = least).")
    parts.append(
        "Click a kernel to remove it, again to keep it; shift-click another to set every kernel "
        "between the two like the first; then Export. This browser keeps the choice across "
        "reloads (per model and layer)."
    )
    return " ".join(parts)


_CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 0; color: #222; background: #fafafa; }
header { background: #fff; padding: 8px 16px 0; }
h1 { font-size: 18px; margin: 0 0 4px; }
.facts, .legend { color: #555; font-size: 12px; }
.save-help { margin: 4px 0; padding: 4px 8px; background: #eef5ff; border-left: 3px solid #48c;
  font-size: 13px; }
code { font-size: 12px; background: #f0f0f0; padding: 0 3px; word-break: break-all; }
.controls { position: sticky; top: 0; z-index: 1; display: flex; flex-wrap: wrap; gap: 6px 12px;
  align-items: center; background: #fff; border-bottom: 1px solid #ccc; padding: 6px 16px; }
.controls .stat b { font-size: 16px; }
.controls .group { display: inline-flex; gap: 4px; align-items: center; }
input[type=number] { width: 4.5em; font: inherit; }
button { font: inherit; padding: 3px 10px; cursor: pointer; }
#export { font-weight: bold; }
#message { color: #a40; }
.samples { padding: 8px 16px; }
img { image-rendering: pixelated; display: block; }
main { display: grid; gap: 8px; padding: 8px 16px;
  grid-template-columns: repeat(auto-fill, minmax(min(100%, CARD_WIDTHpx), 1fr)); }
main.compact { gap: 4px; }
.kernel { background: #fff; border: 2px solid #ddd; border-radius: 6px; padding: 4px 6px;
  cursor: pointer; user-select: none; scroll-margin-top: 64px; min-width: 0; }
.kernel:focus { outline: 2px solid #48c; }
.kernel.removed { border-color: #c33; box-shadow: inset 0 3px 0 #c33; }
.kernel .head { display: flex; flex-wrap: wrap; gap: 0 10px; font-size: 12px;
  margin-bottom: 3px; }
.kernel .name { font-weight: bold; }
.kernel .state { margin-left: auto; color: #393; }
.kernel.removed .state { color: #fff; background: #c33; padding: 0 6px; border-radius: 3px;
  font-weight: bold; }
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
  const percentInput = document.getElementById("p-percent");
  const lowestInput = document.getElementById("lowest-count");
  // One saved choice per model and layer: pages of other models or layers never mix.
  const storageKey = "jaxprune-selection/" + data.model_fingerprint + "/" + data.group;
  let anchor = null;  // the kernel last clicked without shift: a shift-click extends from it
  let exported = null;

  function si(value) {
    const units = [["G", 1e9], ["M", 1e6], ["k", 1e3]];
    for (const [unit, size] of units) {
      if (Math.abs(value) >= size) return (value / size).toPrecision(3) + " " + unit;
    }
    return String(Math.round(value));
  }

  // Python's round (half to even): the count a progressive run makes of p.
  function roundHalfEven(x) {
    const r = Math.round(x);
    return Math.abs(x % 1) === 0.5 && r % 2 !== 0 ? r - 1 : r;
  }

  // The run's rule (`removal_count`): floored (with its tolerance for 0.05 * 60) or nearest.
  function countFor(percent) {
    if (!(percent >= 0)) return 0;
    const exact = percent / 100 * data.num_kernels;
    const wanted = data.rounding === "nearest" ? roundHalfEven(exact) : Math.floor(exact + 1e-9);
    return Math.max(0, Math.min(wanted, data.num_kernels - 1));
  }

  function sortedRemoved() {
    return Array.from(removed).sort(function (a, b) { return a - b; });
  }

  function selectionText() {
    const layers = {};
    layers[data.group] = {num_kernels: data.num_kernels, remove: sortedRemoved()};
    const selection = {
      format: data.format,
      chosen_by: data.chosen_by,
      model_fingerprint: data.model_fingerprint,
      layers: layers,
    };
    return JSON.stringify(selection, null, 1);
  }

  function save() {
    try {
      window.localStorage.setItem(storageKey, JSON.stringify(
        {remove: sortedRemoved(), exported: exported}));
    } catch (error) {
      document.getElementById("storage").textContent =
        "(this browser does not keep the choice across reloads: export it)";
    }
  }

  function restore() {
    let stored = null;
    try {
      stored = JSON.parse(window.localStorage.getItem(storageKey));
    } catch (error) {
      return false;
    }
    if (stored === null || !Array.isArray(stored.remove)) return false;
    const valid = stored.remove.every(function (i) {
      return Number.isInteger(i) && i >= 0 && i < data.num_kernels;
    });
    if (!valid || new Set(stored.remove).size >= data.num_kernels) return false;
    removed.clear();
    for (const i of stored.remove) removed.add(i);
    exported = typeof stored.exported === "string" ? stored.exported : null;
    return true;
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
    save();
  }

  // Sets the kernels of `indices` to removed (on) or kept, unless that keeps none.
  function setKernels(indices, on) {
    const next = new Set(removed);
    for (const i of indices) {
      if (on) next.add(i); else next.delete(i);
    }
    if (next.size >= data.num_kernels) {
      message.textContent = "Keep at least one kernel of the layer.";
      return false;
    }
    removed.clear();
    for (const i of next) removed.add(i);
    update();
    return true;
  }

  function click(card, shift) {
    message.textContent = "";
    const index = Number(card.dataset.index);
    if (shift && anchor !== null && anchor !== card) {
      // The range runs in the order shown (by index or by score), both ends included.
      const order = Array.from(main.querySelectorAll(".kernel"));
      const a = order.indexOf(anchor);
      const b = order.indexOf(card);
      const range = order.slice(Math.min(a, b), Math.max(a, b) + 1);
      const on = removed.has(Number(anchor.dataset.index));
      if (setKernels(range.map(function (c) { return Number(c.dataset.index); }), on)) {
        message.textContent = (on ? "Removed " : "Kept ") + range.length + " kernels (" +
          anchor.dataset.index + " to " + index + ").";
      }
      return;
    }
    setKernels([index], !removed.has(index));
    anchor = card;
  }

  for (const card of cards) {
    card.addEventListener("click", function (event) { click(card, event.shiftKey); });
    card.addEventListener("keydown", function (event) {
      if (event.key === "Enter" || event.key === " ") {
        event.preventDefault();
        click(card, event.shiftKey);
      }
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

  function showCount() {
    const count = countFor(Number(percentInput.value));
    document.getElementById("p-count").textContent = String(count);
    lowestInput.value = String(count);
  }
  percentInput.addEventListener("input", showCount);

  document.getElementById("select-lowest").addEventListener("click", function () {
    const wanted = Math.floor(Number(lowestInput.value));
    if (!(wanted >= 0) || wanted >= data.num_kernels) {
      message.textContent = "Choose a number from 0 to " + (data.num_kernels - 1) + ".";
      return;
    }
    // Lowest first, ties to the lower index: the kernels an objective run would remove.
    const ranked = cards.slice().sort(function (a, b) {
      return Number(a.dataset.score) - Number(b.dataset.score) ||
        Number(a.dataset.index) - Number(b.dataset.index);
    });
    removed.clear();
    for (const card of ranked.slice(0, wanted)) removed.add(Number(card.dataset.index));
    message.textContent = "Selected the " + wanted + " lowest by score.";
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
    message.textContent = "Exported " + removed.size + " kernels as " + data.download_name +
      (data.save_to ? "; save it as " + data.save_to + "." : ".");
    update();
  });

  if (restore()) {
    message.textContent = "Restored the choice made in this browser before (" + removed.size +
      " kernels); 'keep all' starts over.";
  }
  document.getElementById("selection-json").value = "";
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
<div class="save-help">{save_help}</div>
<div class="legend">{legend}</div>
</header>
<nav class="controls">
<span class="stat">removed <b id="removed-count">0</b></span>
<span class="stat">kept <b id="kept-count">0</b></span>
<span class="stat">MACs saved per image <b id="macs-saved" data-macs="0">0</b></span>
<span class="group"><label for="p-percent">p =</label>
<input id="p-percent" type="number" min="0" max="100" step="any" value="{percent}">%
of {num_kernels} kernels = <b id="p-count">{suggested}</b> kernels</span>
<span class="group"><button id="select-lowest" type="button"{score_disabled}>select the</button>
<input id="lowest-count" type="number" min="0" max="{num_kernels}" step="1"
value="{suggested}"{score_disabled}> lowest by score</span>
<button id="sort-index" type="button">by index</button>
<button id="sort-score" type="button"{score_disabled}>by score</button>
<button id="clear" type="button">keep all</button>
<button id="export" type="button">Export selection</button>
<a id="download" href="#" hidden>download</a>
<span id="export-status"></span>
<span id="storage"></span>
<span id="message" role="status"></span>
</nav>
<div class="samples"><div class="legend">The sample images</div>{samples}</div>
<main class="{density}">
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
