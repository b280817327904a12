"""The functionality report: grids by cluster (PNG) and a self-contained page, from the CLI too."""

from __future__ import annotations

import re
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from test_functional import SHAPE, hand_made_variables

from jaxprune.cli import build_parser
from jaxprune.criteria.functionality import VisualizationConfig
from jaxprune.graph import channel_graph
from jaxprune.inspect.functionality import (
    cluster_figure,
    cluster_order,
    write_functionality_report,
)
from jaxprune.methods.functional import FunctionalConfig, layer_images

FAST = FunctionalConfig(
    representative="centroid", visualization=VisualizationConfig(steps=8, step_size=0.1)
)
REPO_ROOT = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def png_size(data: bytes) -> tuple[int, int]:
    """(height, width) from a PNG header."""
    assert data[:8] == PNG_MAGIC
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    return height, width


def test_clusters_are_drawn_largest_first_one_row_each_and_labelled():
    labels = np.array([0, 1, 1, 2, 1, 0, 3])
    clusters = cluster_order(labels)
    assert [c.tolist() for c in clusters] == [[1, 2, 4], [0, 5], [3], [6]]
    cells = np.stack([np.full((2, 3, 3), 10 * (i + 1), np.uint8) for i in range(7)])
    figure = cluster_figure(cells, clusters, title="layer conv: images", representatives=[2])
    (ax,) = figure.axes
    texts = [t.get_text() for t in ax.texts]
    # Row labels: cluster number and size; the two filters alone share the last row.
    assert texts.count("cluster 0\n3 filters") == 1 and "cluster 1\n2 filters" in texts
    assert "clusters of one\n2 filters" in texts
    # Every filter captioned with its index, once.
    assert sorted(t for t in texts if t.isdigit()) == sorted(str(i) for i in range(7))
    assert ax.get_title().startswith("layer conv: images\noutlined: the filter each cluster")
    assert len(ax.images) == 7 and len(ax.patches) == 1  # filter 2 outlined
    # Long clusters wrap after `columns` pictures.
    wrapped = cluster_figure(cells, [np.arange(7)], title="t", columns=3)
    assert [t.get_text() for t in wrapped.axes[0].texts].count("(cont.)") == 2


def test_report_draws_every_filter_once_grouped_by_cluster(tmp_path):
    model, variables = hand_made_variables()
    graph = channel_graph(model.apply, variables, jnp.zeros((1, *SHAPE)))
    images = np.random.default_rng(0).normal(size=(3, *SHAPE)).astype(np.float32)
    written = write_functionality_report(
        model.apply, variables, graph, tmp_path, images=images, config=FAST
    )
    assert set(written) == {"conv", "conv:pdf", "conv:responses", "conv:responses:pdf", "html"}
    page = written["html"].read_text()
    assert "http://" not in page and "https://" not in page  # self-contained
    assert page.count('alt="filter ') == 4 and page.count('alt="response ') == 4
    # The identical filters 0 and 1 share the first row; 2 and 3 have rows of their own.
    assert page.count('class="cluster"') == 3
    first_row = page.split('class="cluster"')[1]
    assert re.findall(r'alt="filter (\d+)"', first_row) == ["0", "1"]
    assert page.count('class="cell rep"') == 3
    for name in ("conv", "conv:responses"):
        height, width = png_size(written[name].read_bytes())
        assert height > 400 and width > 400  # labelled, at 200 dpi
        assert written[f"{name}:pdf"].read_bytes()[:5] == b"%PDF-"


def test_report_reuses_stored_images_and_refuses_dense_layers(tmp_path):
    model, variables = hand_made_variables()
    graph = channel_graph(model.apply, variables, jnp.zeros((1, *SHAPE)))
    write_functionality_report(
        model.apply, variables, graph, tmp_path / "a", config=FAST, workdir=tmp_path / "store"
    )
    stored = layer_images(
        model.apply,
        graph,
        variables,
        ["conv"],
        SHAPE,
        FAST.visualization,
        workdir=tmp_path / "store",
    )
    fresh = layer_images(model.apply, graph, variables, ["conv"], SHAPE, FAST.visualization)
    np.testing.assert_array_equal(stored["conv"], fresh["conv"])
    with pytest.raises(ValueError, match="not a conv group"):
        write_functionality_report(model.apply, variables, graph, tmp_path, groups=["head"])


@pytest.mark.slow
def test_inspect_command_writes_and_links_the_report(tmp_path):
    model_file = REPO_ROOT / "jaxprune/pretrained/lenet5_fashion_mnist.msgpack"
    out = tmp_path / "inspect"
    args = build_parser().parse_args(
        [
            "inspect",
            "--model",
            "lenet5",
            "--variables",
            str(model_file),
            "--layer",
            "all",
            "--images",
            "4",
        ]
        + ["--scores", "none", "--functionality", "--out", str(out)]
    )
    assert args.func(args) == 0
    report = out / "functionality"
    assert sorted(p.name for p in report.iterdir()) == [
        "conv1_images.pdf",
        "conv1_images.png",
        "conv1_responses.pdf",
        "conv1_responses.png",
        "conv2_images.pdf",
        "conv2_images.png",
        "conv2_responses.pdf",
        "conv2_responses.png",
        "functionality.html",
    ]
    page = (report / "functionality.html").read_text()
    assert page.count('alt="filter ') == 6 + 16
    index = (out / "index.html").read_text()
    assert "functionality.html" in index
