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
from jaxprune.inspect.page import script_json, selection_file_names
from jaxprune.inspect.render import (
    filter_grid,
    mosaic,
    overlay_tiles,
    png_bytes,
    resize_smooth,
)
from jaxprune.inspect.selection import (
    FORMAT,
    SelectionError,
    check_against,
    model_fingerprint,
    read_selection,
    write_selection,
)
from jaxprune.methods.progressive import ProgressiveConfig, removal_count
from jaxprune.models.random_init import random_variables

IMAGES = jax.random.normal(jax.random.key(0), (4, 8, 8, 3))
HOSTILE = "x</script><!--<script>alert(1)</script>&amp;.json"


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
    for element in (
        "removed-count",
        "kept-count",
        "macs-saved",
        "export",
        "selection-json",
        "p-percent",
        "p-count",
        "select-lowest",
        "lowest-count",
    ):
        assert f'id="{element}"' in text
    # One sample strip, then maps and filter per kernel; all decode as PNGs.
    images = [Image.open(io.BytesIO(png)) for png in pngs(text)]
    assert len(images) == 1 + 2 * 8
    # conv1 is read after the 2x2 pool (4x4 maps), but each map is laid over its 8x8 image:
    # the four images in one row, one white pixel between them.
    assert images[1].size == (4 * 8 + 3, 8)
    assert "rank 1</span>" in text and 'data-score="-1.0"' in text


def test_maps_are_laid_over_their_images_and_small_maps_are_stretched_smoothly():
    images = np.zeros((2, 28, 28, 3))
    images[:, :, :7] = 1.0  # a white band on the left, then black
    maps = np.zeros((2, 7, 7))
    maps[:, :, 4:] = 2.0  # the kernel responds on the right only
    tiles = overlay_tiles(images, maps, 2.0, signed=False)
    assert tiles.shape == (2, 28, 28, 3)
    # Where the kernel is silent, the image shows through unchanged (white, black).
    np.testing.assert_array_equal(tiles[:, :, :7], 255)
    np.testing.assert_array_equal(tiles[:, :, 7:13], 0)
    # At its peak, the heat colour covers the image.
    assert tiles[0, 14, 27].tolist() != [0, 0, 0] and tiles[0, 14, 27, 0] > 200
    # A 7x7 map over 28x28 pixels is a smooth ramp, not 4x4 blocks.
    ramp = resize_smooth(np.arange(7, dtype=np.float32)[None, None].repeat(7, 1), 28, 28)[0, 0]
    assert ramp.shape == (28,) and len(np.unique(ramp)) > 7
    assert np.all(np.diff(ramp) >= 0)


def test_the_embedded_choice_exports_a_selection_of_this_model(toy, tmp_path):
    model, variables, graph = toy
    config = PageConfig(removed=(5, 2), download_name="mine.json")
    text = kernel_page(model.apply, variables, graph, "conv1", IMAGES, config=config)
    data = page_data(text)
    assert data["format"] == FORMAT and data["chosen_by"] == "person"
    assert data["download_name"] == "mine.json" and data["macs_per_kernel"] > 0
    assert data["model_fingerprint"] == model_fingerprint(variables)
    assert data["model_fingerprint"][:16] in text  # shown on the page
    assert re.findall(r'class="kernel removed" data-index="(\d+)"', text) == ["2", "5"]
    # The document the page's Export builds from these fields.
    document = {
        "format": data["format"],
        "chosen_by": data["chosen_by"],
        "model_fingerprint": data["model_fingerprint"],
        "layers": {data["group"]: {"num_kernels": data["num_kernels"], "remove": data["removed"]}},
    }
    layers = read_selection(write_selection(tmp_path / "s.json", document))
    np.testing.assert_array_equal(layers["conv1"]["remove"], [2, 5])
    assert layers["conv1"]["num_kernels"] == graph["conv1"].size
    check_against(layers, {"conv1": 8}, fingerprints=model_fingerprint(variables))
    other = random_variables(model, IMAGES, seed=1)
    with pytest.raises(SelectionError, match="another model"):
        check_against(layers, {"conv1": 8}, fingerprints=model_fingerprint(other))


def test_the_embedded_json_cannot_end_or_bend_its_script_element(toy):
    text = script_json({"name": HOSTILE, "n": [1, 2]})
    for forbidden in ("<", ">", "&", "</", "<!--", "<script"):
        assert forbidden not in text
    assert json.loads(text) == {"name": HOSTILE, "n": [1, 2]}

    model, variables, graph = toy
    config = PageConfig(download_name=HOSTILE)
    page = kernel_page(model.apply, variables, graph, "conv1", IMAGES, config=config)
    block = page.split('id="page-data">', 1)[1].split("</script>", 1)[0]
    for forbidden in ("</", "<!--", "<script"):
        assert forbidden not in block
    assert page_data(page)["download_name"] == HOSTILE


@pytest.mark.parametrize("size", [3, 8, 10, 30, 32, 64, 128])
@pytest.mark.parametrize("ratio", [0.0, 0.05, 0.1, 0.25, 0.5, 0.75, 0.95])
def test_the_count_p_means_is_the_one_a_progressive_run_removes(toy, size, ratio):
    from jaxprune.inspect.page import _suggestion

    expected = removal_count(ProgressiveConfig(ratio=ratio), 0, size)
    assert _suggestion(PageConfig(ratio=ratio), size)[0] == expected


def test_p_and_where_to_save_are_on_the_page(toy):
    model, variables, graph = toy
    text = kernel_page(
        model.apply,
        variables,
        graph,
        "conv1",
        IMAGES,
        scores=np.arange(8.0),
        config=PageConfig(ratio=0.25, save_to="/runs/a/selection/conv1.json"),
    )
    assert re.search(r'id="p-percent"[^>]*value="25"', text)
    assert '<b id="p-count">2</b>' in text and re.search(r'id="lowest-count"[^>]*value="2"', text)
    assert '<code id="save-to">/runs/a/selection/conv1.json</code>' in text
    assert "selection_conv1.json" in text and "/runs/a/selection</code>" in text
    data = page_data(text)
    assert data["save_to"] == "/runs/a/selection/conv1.json" and data["suggested"] == 2
    # Without scores, "select the N lowest" cannot be used.
    plain = kernel_page(model.apply, variables, graph, "conv1", IMAGES, config=PageConfig())
    assert re.search(r'id="select-lowest" type="button" disabled', plain)
    assert "--selection selection_conv1.json" in plain  # no run waiting: how to replay


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
        ({"config": PageConfig(ratio=1.0)}, r"ratio must be in \[0, 1\)"),
        ({"config": PageConfig(count=8)}, r"count must be in \[0, 8\)"),
    ],
)
def test_bad_arguments_are_refused(toy, kwargs, message):
    model, variables, graph = toy
    with pytest.raises(ValueError, match=message):
        kernel_page(model.apply, variables, graph, "conv1", IMAGES, **kwargs)


class Wide(nn.Module):
    width: int = 32

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(nn.Conv(self.width, (3, 3), name="conv")(x))
        x = nn.relu(nn.Conv(16, (3, 3), name="conv2")(x))
        return nn.Dense(10, name="head")(x.reshape(x.shape[0], -1))


def test_a_32_kernel_page_with_8_images_stays_small_and_large_layers_are_compact(tmp_path):
    images = jax.random.normal(jax.random.key(1), (8, 28, 28, 1))
    model = Wide()
    variables = random_variables(model, images)
    graph = channel_graph(model.apply, variables, images)
    path = write_kernel_page(tmp_path / page_file_name("conv"), model.apply, variables, graph,
                             "conv", images)  # fmt: skip
    assert path.name == "conv.html"
    assert path.stat().st_size < 1_000_000
    assert '<main class="comfortable">' in path.read_text()
    wide = Wide(width=128)
    variables = random_variables(wide, images[:2])
    graph = channel_graph(wide.apply, variables, images[:2])
    text = kernel_page(wide.apply, variables, graph, "conv", images[:2])
    assert '<main class="compact">' in text and text.count('class="kernel"') == 128


def test_pictures():
    png = png_bytes(np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3))
    np.testing.assert_array_equal(
        np.asarray(Image.open(io.BytesIO(png))), np.arange(18).reshape(2, 3, 3)
    )
    tiles = np.stack([np.full((2, 3, 3), 10 * (i + 1), np.uint8) for i in range(5)])
    grid = mosaic(tiles, 2)
    assert grid.shape == (3 * 3 - 1, 2 * 4 - 1, 3)
    assert np.all(grid[:2, :3] == 10) and np.all(grid[:2, 4:] == 20)
    assert np.all(grid[6:, :3] == 50) and np.all(grid[6:, 4:] == 255)  # the empty last cell
    grid = filter_grid(np.ones((3, 3, 5)))
    assert grid.shape == (2 * 4 - 1, 3 * 4 - 1, 3)
    assert page_file_name("stage1/block0/conv1") == "stage1-block0-conv1.html"
    assert selection_file_names("stage1/block0/conv1") == (
        "stage1-block0-conv1.json",
        "selection_stage1-block0-conv1.json",
    )
