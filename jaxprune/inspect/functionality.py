"""The functionality report: each conv layer's activation-maximisation images, grouped by cluster.

`write_functionality_report` (what ``jaxprune inspect --functionality`` calls) writes, per conv
group, a labelled figure (PNG and PDF, `jaxprune.figures.save_figure`) with one row per
functionality cluster (largest clusters first, filters in index order, each picture captioned
with its filter index, each row with its cluster number and size, the layer in the title; the
filters alone in their cluster share the last rows) and, given real images, a second figure of
every filter's mean response pattern over them in the same layout; then one self-contained HTML
page
(PNG data URIs, no network) with the same pictures, each filter labelled and the filter
nearest each cluster's centroid marked (the one ``representative="centroid"`` keeps;
the page has no labels to score a criterion). Images come from
`jaxprune.criteria.functionality`; clusters from `jaxprune.methods.functional` with the given
(or default) config, filters whose image does not drive them each in a cluster of their own.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from jaxprune.criteria.functionality import (
    RESPONSE_DESCRIPTORS,
    response_patterns,
    responsive_filters,
)
from jaxprune.figures import new_figure, save_figure
from jaxprune.graph import ChannelGraph
from jaxprune.inspect.render import colormap, data_uri, display_images
from jaxprune.methods.functional import (
    FunctionalConfig,
    choose_representatives,
    layer_clusters,
    layer_images,
    probe_responses,
)
from jaxprune.methods.oneshot import select_groups

# Each picture is enlarged to about this many pixels on its longer side (page and figures).
CELL_SIDE = 56
# Pictures per line of the figures; a longer cluster continues on the next line.
FIGURE_COLUMNS = 16
# Response maps run from dark (no response) to bright orange (the filter's strongest).
_RESPONSE_STOPS = np.array([[10, 10, 30], [120, 40, 110], [240, 120, 30], [255, 240, 170]], float)


def cluster_order(labels: np.ndarray) -> list[np.ndarray]:
    """Filter indices per cluster, largest clusters first (ties: the lower first filter)."""
    labels = np.asarray(labels)
    clusters = [np.nonzero(labels == c)[0] for c in np.unique(labels)]
    return sorted(clusters, key=lambda members: (-len(members), int(members[0])))


def _enlarge(rgb: np.ndarray) -> np.ndarray:
    """(N, h, w, 3) floats in [0, 1] -> uint8 cells enlarged by an integer factor."""
    h, w = rgb.shape[1:3]
    factor = max(1, CELL_SIDE // max(h, w))
    big = np.repeat(np.repeat(rgb, factor, axis=1), factor, axis=2)
    return np.round(np.clip(big, 0, 1) * 255).astype(np.uint8)


def cluster_figure(
    cells: np.ndarray,
    clusters: Sequence[np.ndarray],
    *,
    title: str,
    representatives: Collection[int] = (),
    columns: int = FIGURE_COLUMNS,
) -> Figure:
    """A labelled figure of one picture per filter, one row per cluster.

    Clusters of two or more filters get a row each (wrapped after `columns` pictures), labelled
    with the cluster's number and size; the filters alone in their cluster share the last rows.
    Each picture is captioned with its filter index; representatives are outlined.

    Args:
      cells: (filters, H, W, 3) uint8 pictures, one per filter.
      clusters: the filter indices of each cluster, in the order drawn (`cluster_order`).
      title: the figure's title (name the layer and what the pictures are).
      representatives: filters to outline (the ones a pruning keeps).
      columns: pictures per line.

    Returns:
      The figure (`jaxprune.figures.save_figure` writes it).
    """
    from matplotlib.patches import Rectangle

    lines: list[tuple[str, list[int]]] = []
    alone = [int(members[0]) for members in clusters if len(members) == 1]
    for number, members in enumerate(clusters):
        if len(members) == 1:
            continue
        members = [int(f) for f in members]
        for start in range(0, len(members), columns):
            label = f"cluster {number}\n{len(members)} filters" if start == 0 else "(cont.)"
            lines.append((label, members[start : start + columns]))
    for start in range(0, len(alone), columns):
        label = f"clusters of one\n{len(alone)} filters" if start == 0 else "(cont.)"
        lines.append((label, alone[start : start + columns]))
    width = max(len(members) for _, members in lines)
    cell, gap_x, gap_y = 0.5, 0.08, 0.25  # inches; gap_y leaves room for the captions
    figure = new_figure(1.3 + width * (cell + gap_x), 0.6 + len(lines) * (cell + gap_y))
    ax = figure.add_subplot()
    step_x, step_y = 1.0 + gap_x / cell, 1.0 + gap_y / cell
    marked = {int(f) for f in representatives}
    for row, (label, members) in enumerate(lines):
        top = row * step_y
        ax.text(-0.15, top + 0.5, label, ha="right", va="center", fontsize=7)
        for col, f in enumerate(members):
            left = col * step_x
            ax.imshow(cells[f], extent=(left, left + 1, top + 1, top), interpolation="nearest")
            ax.text(left + 0.5, top + 1.04, str(f), ha="center", va="top", fontsize=6)
            if f in marked:
                ax.add_patch(Rectangle((left, top), 1, 1, fill=False, edgecolor="#d9480f", lw=1.2))
    ax.set_xlim(-0.05, (width - 1) * step_x + 1.05)
    ax.set_ylim(len(lines) * step_y, -0.05)
    ax.set_aspect("equal")
    ax.set_axis_off()
    note = "\noutlined: the filter each cluster keeps (nearest its centroid)" if marked else ""
    ax.set_title(title + note, fontsize=9)
    return figure


def _pattern_cells(patterns: np.ndarray, height: int, width: int) -> np.ndarray:
    """Mean response maps (filters, h, w) as heat-map cells on the input's grid."""
    rows = np.linspace(0, patterns.shape[1] - 1e-9, height).astype(int)
    cols = np.linspace(0, patterns.shape[2] - 1e-9, width).astype(int)
    resized = patterns[:, rows][:, :, cols]
    low = resized.min(axis=(1, 2), keepdims=True)
    span = resized.max(axis=(1, 2), keepdims=True) - low
    scaled = (resized - low) / np.where(span > 0, span, 1.0)
    return colormap(scaled, _RESPONSE_STOPS) / 255.0


def _input_shape(graph: ChannelGraph) -> tuple[int, ...]:
    program = graph.program
    for path, value_id in zip(program.input_paths, program.input_ids, strict=True):
        if path == ("<input>",):
            return tuple(program.shapes[value_id][1:])
    raise ValueError("The graph's program has no model input; pass images to set the shape.")


def _layer_section(
    group: str,
    clusters: Sequence[np.ndarray],
    representatives: set[int],
    image_cells: np.ndarray,
    pattern_cells: np.ndarray | None,
    threshold: float,
    similarity: np.ndarray,
    responsive: np.ndarray,
) -> str:
    rows = []
    for number, members in enumerate(clusters):
        cells = []
        for f in members:
            mark = " rep" if int(f) in representatives else ""
            pictures = f'<img src="{data_uri(image_cells[f])}" alt="filter {f}">'
            if pattern_cells is not None:
                pictures += f'<img src="{data_uri(pattern_cells[f])}" alt="response {f}">'
            cells.append(
                f'<figure class="cell{mark}">{pictures}<figcaption>{f}</figcaption></figure>'
            )
        if len(members) > 1:
            block = similarity[np.ix_(members, members)]
            mean = (block.sum() - len(members)) / (len(members) * (len(members) - 1))
            note = f"{len(members)} filters, mean similarity {mean:.2f}"
        elif not responsive[members[0]]:
            note = "1 filter; its image does not drive it (no visible functionality)"
        else:
            note = "1 filter"
        rows.append(
            f'<div class="cluster"><div class="label">cluster {number}: {note}</div>'
            f"{''.join(cells)}</div>"
        )
    cut = f"threshold {threshold:.3f}" if np.isfinite(threshold) else "no threshold"
    return (
        f"<section><h2>{html.escape(group)}</h2><p>{similarity.shape[0]} filters in "
        f"{len(clusters)} clusters ({cut}); outlined: the filter nearest each cluster's "
        "centroid.</p>"
        f"{''.join(rows)}</section>"
    )


_STYLE = """
body { font-family: sans-serif; margin: 1.5em; }
.cluster { display: flex; flex-wrap: wrap; align-items: flex-start; gap: 4px;
           border-top: 1px solid #ccc; padding: 4px 0; }
.label { width: 100%; font-size: 0.85em; color: #444; }
.cell { margin: 0; text-align: center; font-size: 0.75em; padding: 2px;
        border: 2px solid transparent; }
.cell.rep { border-color: #d9480f; }
.cell img { width: 56px; image-rendering: pixelated; display: block; }
"""


def write_functionality_report(
    apply_fn: Callable[..., Any],
    variables: Any,
    graph: ChannelGraph,
    out_dir: str | Path,
    *,
    groups: Sequence[str] | None = None,
    images: np.ndarray | None = None,
    config: FunctionalConfig | None = None,
    workdir: str | Path | None = None,
) -> dict[str, Path]:
    """Writes each conv layer's activation-maximisation images grouped by cluster, PNG and HTML.

    Args:
      apply_fn: the model function the graph was built from.
      variables: the model variables.
      graph: its channel graph.
      out_dir: the folder written (created if needed).
      groups: the conv groups to draw (None: every conv group).
      images: optional preprocessed real images [N, H, W, C]; adds each filter's mean
        response pattern over them.
      config: images and clustering (default `FunctionalConfig()`: the similarity
        threshold); representatives are always the filters nearest the centroids.
      workdir: optional checkpoint folder for the images (reruns reuse them).

    Returns:
      Name -> path: ``"<group>"`` and ``"<group>:pdf"`` (the image figure as PNG and PDF),
      ``"<group>:responses"`` and ``"<group>:responses:pdf"`` (the response figure, with
      `images`) and ``"html"`` (the page).

    Raises:
      ValueError: an unknown or non-conv group, or images of the wrong shape.
    """
    config = config if config is not None else FunctionalConfig(representative="centroid")
    conv_groups = select_groups(graph, "conv")
    chosen = list(conv_groups if groups is None else groups)
    for group in chosen:
        if group not in conv_groups:
            raise ValueError(
                f"{group!r} is not a conv group of this model; choose from {conv_groups}."
            )
    input_shape = _input_shape(graph) if images is None else tuple(np.shape(images)[1:])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Response descriptors probe with every conv layer's images, as the method does, so the
    # page shows the method's clusters even when it draws fewer layers.
    probing = config.clustering.descriptor in RESPONSE_DESCRIPTORS
    imaged = list(conv_groups) if probing else chosen
    found = layer_images(
        apply_fn, graph, variables, imaged, input_shape, config.visualization, workdir=workdir
    )
    responses = probe_responses(apply_fn, graph, variables, found) if probing else {}
    written: dict[str, Path] = {}
    sections = []
    for group in chosen:
        layer = np.asarray(found[group])
        responsive = responsive_filters(
            apply_fn, graph, variables, group, layer, config.visualization
        )
        descriptors, similarity, labels, threshold = layer_clusters(
            layer, responsive, config, responses.get(group)
        )
        representatives = set(choose_representatives(labels, descriptors=descriptors).tolist())
        clusters = cluster_order(labels)
        image_cells = _enlarge(display_images(layer))
        stem = group.replace("/", "_")
        figure = cluster_figure(
            image_cells,
            clusters,
            title=f"layer {group}: each filter's activation-maximisation image, by cluster",
            representatives=representatives,
        )
        figures = save_figure(figure, out / f"{stem}_images.png")
        written[group], written[f"{group}:pdf"] = figures["png"], figures["pdf"]
        pattern_cells = None
        if images is not None:
            patterns = response_patterns(apply_fn, graph, variables, group, images)
            pattern_cells = _enlarge(_pattern_cells(patterns, *input_shape[:2]))
            figure = cluster_figure(
                pattern_cells,
                clusters,
                title=f"layer {group}: each filter's mean response over {len(images)} images "
                "(dark: none, bright: its strongest), by cluster",
                representatives=representatives,
            )
            figures = save_figure(figure, out / f"{stem}_responses.png")
            written[f"{group}:responses"] = figures["png"]
            written[f"{group}:responses:pdf"] = figures["pdf"]
        sections.append(
            _layer_section(
                group,
                clusters,
                representatives,
                image_cells,
                pattern_cells,
                threshold,
                similarity,
                responsive,
            )
        )
    views = "activation-maximisation image" + (
        " and mean response pattern over the given images" if images is not None else ""
    )
    page = (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>Filter functionality</title>"
        f"<style>{_STYLE}</style></head><body><h1>Filter functionality</h1>"
        f"<p>Each filter's {views}; one row per cluster of filters whose images are alike "
        "(cosine similarity of standardised images, average linkage).</p>"
        f"{''.join(sections)}</body></html>"
    )
    written["html"] = out / "functionality.html"
    written["html"].write_text(page)
    return written
