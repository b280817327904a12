"""The kernel-selection page: every kernel, no network, small, a valid selection to export."""

import base64
import io
import json
import re

import flax.linen as nn
import jax
import numpy as np
import pytest
from PIL import Image
from toy_models import ConvBNDense

from jaxprune.graph import channel_graph
from jaxprune.inspect import PageConfig, kernel_page, page_file_name, write_kernel_page
from jaxprune.inspect.render import filter_grid, heat_strip, png_bytes
from jaxprune.inspect.selection import FORMAT, read_selection, write_selection
from jaxprune.models.random_init import random_variables

IMAGES = jax.random.normal(jax.random.key(0), (4, 8, 8, 3))


@pytest.fixture(scope="module")
def toy():
    model = ConvBNDense()
    variables = random_variables(model, IMAGES)
    return model, variables, channel_graph(model.apply, variables, IMAGES)


def page_data(text):
    found = re.search(r'<script type="application/json" id="page-data">(.*?)</script>', text)
    return json.loads(found.group(1))


def pngs(text):
    return [base64.b64decode(s) for s in re.findall(r'src="data:image/png;base64,([^"]+)"', text)]


def test_the_page_shows_every_kernel_and_needs_no_network(toy):
    model, variables, graph = toy
    scores = np.linspace(-1.0, 1.0, 8)
    text = kernel_page(model.apply, variables, graph, "conv1", IMAGES, scores=scores, title="t")
    indices = [int(i) for i in re.findall(r'class="kernel[^"]*" data-index="(\d+)"', text)]
    assert indices == list(range(8))
    assert not re.search(r"https?://", text)
    assert not re.search(r'(src|href)="(?!data:image/png;base64,|#)', text)
    for element in ("removed-count", "kept-count", "macs-saved", "export", "selection-json"):
        assert f'id="{element}"' in text
    # One sample strip, then maps and filter per kernel; all decode as PNGs.
    images = [Image.open(io.BytesIO(png)) for png in pngs(text)]
    assert len(images) == 1 + 2 * 8
    # conv1 is read after the 2x2 pool: 4x4 maps, 4 images with 1-pixel gaps.
    assert images[1].size == (4 * 4 + 3, 4)
    assert "rank 1</span>" in text and 'data-score="-1.0"' in text


def test_the_embedded_choice_exports_a_valid_selection(toy, tmp_path):
    model, variables, graph = toy
    config = PageConfig(removed=(5, 2), download_name="mine.json")
    text = kernel_page(model.apply, variables, graph, "conv1", IMAGES, config=config)
    data = page_data(text)
    assert data["format"] == FORMAT and data["chosen_by"] == "person"
    assert data["download_name"] == "mine.json" and data["macs_per_kernel"] > 0
    assert re.findall(r'class="kernel removed" data-index="(\d+)"', text) == ["2", "5"]
    # The document the page's Export builds from these fields.
    document = {
        "format": data["format"],
        "chosen_by": data["chosen_by"],
        "layers": {data["group"]: {"num_kernels": data["num_kernels"], "remove": data["removed"]}},
    }
    layers = read_selection(write_selection(tmp_path / "s.json", document))
    np.testing.assert_array_equal(layers["conv1"]["remove"], [2, 5])
    assert layers["conv1"]["num_kernels"] == graph["conv1"].size


def test_a_given_macs_per_kernel_is_used(toy):
    model, variables, graph = toy
    text = kernel_page(model.apply, variables, graph, "conv0", IMAGES, macs_per_kernel=1234.0)
    assert page_data(text)["macs_per_kernel"] == 1234.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"scores": np.zeros(3)}, "one score per kernel"),
        ({"scores": np.full(8, np.nan)}, "NaN"),
        ({"config": PageConfig(removed=tuple(range(8)))}, "fewer than all 8"),
        ({"config": PageConfig(removed=(8,))}, r"\[0, 8\)"),
    ],
)
def test_bad_arguments_are_refused(toy, kwargs, message):
    model, variables, graph = toy
    with pytest.raises(ValueError, match=message):
        kernel_page(model.apply, variables, graph, "conv1", IMAGES, **kwargs)


class Wide(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(nn.Conv(32, (3, 3), name="conv")(x))
        x = nn.relu(nn.Conv(16, (3, 3), name="conv2")(x))
        return nn.Dense(10, name="head")(x.reshape(x.shape[0], -1))


def test_a_32_kernel_page_with_8_images_stays_small(tmp_path):
    model = Wide()
    images = jax.random.normal(jax.random.key(1), (8, 28, 28, 1))
    variables = random_variables(model, images)
    graph = channel_graph(model.apply, variables, images)
    path = write_kernel_page(tmp_path / page_file_name("conv"), model.apply, variables, graph,
                             "conv", images)  # fmt: skip
    assert path.name == "conv.html"
    assert path.stat().st_size < 1_000_000


def test_pictures():
    png = png_bytes(np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3))
    np.testing.assert_array_equal(
        np.asarray(Image.open(io.BytesIO(png))), np.arange(18).reshape(2, 3, 3)
    )
    maps = np.zeros((2, 3, 3))
    maps[1, 1, 1] = 2.0
    strip = heat_strip(maps, 2.0, signed=False)
    assert strip.shape == (3, 7, 3)
    assert np.all(strip[:, 3] == 255)  # the gap
    assert strip[1, 5].sum() > strip[0, 4].sum()  # the peak is brighter than zero
    grid = filter_grid(np.ones((3, 3, 5)))
    assert grid.shape == (2 * 4 - 1, 3 * 4 - 1, 3)
    assert page_file_name("stage1/block0/conv1") == "stage1-block0-conv1.html"
