"""The kernel-selection page in a real headless Chromium: every control a person uses.

Needs Debian's chromium and chromium-driver and selenium (``scripts/install.sh --dev`` installs
them). The test skips only when JAXPRUNE_NO_BROWSER=1; a missing browser is a failure, so CI
cannot pass without running it.
"""

import json
import os
import shutil
import time

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from toy_models import ConvBNDense

from jaxprune.gates import gated_call
from jaxprune.graph import channel_graph
from jaxprune.inspect import PageConfig, macs_per_kernel, write_kernel_page
from jaxprune.inspect.selection import (
    FORMAT,
    SelectionError,
    check_against,
    model_fingerprint,
    read_selection,
    write_selection,
)
from jaxprune.models.random_init import random_variables
from jaxprune.surgery import keep_to_masks, prune

GROUP = "conv1"
IMAGES = jax.random.normal(jax.random.key(0), (4, 8, 8, 3))
# Scores whose order differs from the index order: the lowest three are kernels 6, 2 and 4.
SCORES = np.array([0.9, 0.5, 0.1, 0.7, 0.3, 0.8, 0.05, 0.6])
INSTALL = "run `scripts/install.sh --dev` (Debian's chromium, chromium-driver and selenium)"


@pytest.fixture
def browser(tmp_path):
    if os.environ.get("JAXPRUNE_NO_BROWSER") == "1":
        pytest.skip("JAXPRUNE_NO_BROWSER=1: the browser test is switched off")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.options import Options
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail(f"selenium is not installed; {INSTALL}.")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if chromium is None or driver is None:
        pytest.fail(f"chromium or chromedriver is not on PATH; {INSTALL}.")
    options = Options()
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--window-size=1280,1024",
    ):
        options.add_argument(argument)
    options.binary_location = chromium
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    options.add_experimental_option(
        "prefs",
        {"download.default_directory": str(downloads), "download.prompt_for_download": False},
    )
    chrome = webdriver.Chrome(options=options, service=Service(driver))
    chrome.downloads = downloads
    yield chrome
    chrome.quit()


@pytest.fixture(scope="module")
def toy():
    model = ConvBNDense()
    variables = random_variables(model, IMAGES)
    return model, variables, channel_graph(model.apply, variables, IMAGES)


def card(chrome, index):
    return chrome.find_element("css selector", f'.kernel[data-index="{index}"]')


def click(chrome, index, *, shift=False):
    if not shift:
        card(chrome, index).click()
        return
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    target = card(chrome, index)
    ActionChains(chrome).key_down(Keys.SHIFT).click(target).key_up(Keys.SHIFT).perform()


def text_of(chrome, element_id):
    return chrome.find_element("id", element_id).text


def removed_now(chrome):
    return sorted(
        int(e.get_attribute("data-index"))
        for e in chrome.find_elements("css selector", ".kernel.removed")
    )


def set_number(chrome, element_id, value):
    """Types into a number field as a person does (the page listens to "input")."""
    field = chrome.find_element("id", element_id)
    field.clear()
    field.send_keys(str(value))


def export(chrome):
    chrome.find_element("id", "export").click()
    return json.loads(chrome.find_element("id", "selection-json").get_attribute("value"))


def test_click_export_and_prune_with_the_exported_selection(browser, toy, tmp_path):
    model, variables, graph = toy
    per_kernel = macs_per_kernel(model.apply, variables, graph, GROUP, IMAGES[:1])
    page = write_kernel_page(
        tmp_path / "page.html", model.apply, variables, graph, GROUP, IMAGES, title="toy"
    )
    browser.get(page.as_uri())
    assert len(browser.find_elements("css selector", ".kernel")) == graph[GROUP].size
    assert text_of(browser, "removed-count") == "0"

    for index in (6, 1, 4):
        click(browser, index)
    assert text_of(browser, "removed-count") == "3"
    click(browser, 4)  # changed my mind
    assert text_of(browser, "removed-count") == "2"
    assert text_of(browser, "kept-count") == str(graph[GROUP].size - 2)
    assert removed_now(browser) == [1, 6]
    saved = browser.find_element("id", "macs-saved")
    assert int(saved.get_attribute("data-macs")) == round(2 * per_kernel)
    assert saved.text.strip()

    document = export(browser)
    assert document == {
        "format": FORMAT,
        "chosen_by": "person",
        "model_fingerprint": model_fingerprint(variables),
        "layers": {GROUP: {"num_kernels": graph[GROUP].size, "remove": [1, 6]}},
    }
    download = browser.downloads / f"selection_{GROUP}.json"
    deadline = time.monotonic() + 10
    while not download.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert json.loads(download.read_text()) == document
    assert browser.get_log("browser") == []

    layers = read_selection(write_selection(tmp_path / "selection.json", document))
    check_against(layers, {GROUP: graph[GROUP].size}, fingerprints=model_fingerprint(variables))
    other = random_variables(model, IMAGES, seed=3)
    with pytest.raises(SelectionError, match="another model"):
        check_against(layers, {GROUP: graph[GROUP].size}, fingerprints=model_fingerprint(other))
    remove = layers[GROUP]["remove"]
    keep = {GROUP: np.setdiff1d(np.arange(graph[GROUP].size), remove)}
    pruned = prune(variables, graph, keep)
    assert pruned.widths["conv1"] == graph[GROUP].size - 2
    assert pruned.variables["params"]["conv1"]["kernel"].shape[-1] == graph[GROUP].size - 2
    small = ConvBNDense(widths=tuple(sorted(pruned.widths.items())))
    masked = gated_call(model.apply, graph, variables, IMAGES, keep_to_masks(graph, keep))
    chex.assert_trees_all_close(small.apply(pruned.variables, IMAGES), masked, atol=1e-5, rtol=1e-5)
    assert not jnp.allclose(masked, model.apply(variables, IMAGES))  # the removal did something


def test_p_counts_and_the_n_lowest_by_score_are_selected(browser, toy, tmp_path):
    model, variables, graph = toy
    page = write_kernel_page(
        tmp_path / "page.html",
        model.apply,
        variables,
        graph,
        GROUP,
        IMAGES,
        scores=SCORES,
        config=PageConfig(ratio=0.25),
    )
    browser.get(page.as_uri())
    # p = 25% of 8 kernels is 2; the field for "select the N lowest" follows p.
    assert text_of(browser, "p-count") == "2"
    assert browser.find_element("id", "lowest-count").get_attribute("value") == "2"
    set_number(browser, "p-percent", "31.25")  # 2.5 kernels: floored, as the run counts p
    assert text_of(browser, "p-count") == "2"
    set_number(browser, "p-percent", "48.75")  # 3.9 kernels: still 3 (nearest would say 4)
    assert text_of(browser, "p-count") == "3"
    set_number(browser, "p-percent", "40")  # 3.2 kernels
    assert text_of(browser, "p-count") == "3"
    assert browser.find_element("id", "lowest-count").get_attribute("value") == "3"
    click(browser, 0)  # replaced by the N lowest
    browser.find_element("id", "select-lowest").click()
    assert removed_now(browser) == [2, 4, 6]
    assert "3 lowest" in text_of(browser, "message")
    set_number(browser, "lowest-count", "8")  # every kernel: refused
    browser.find_element("id", "select-lowest").click()
    assert removed_now(browser) == [2, 4, 6] and "from 0 to 7" in text_of(browser, "message")
    assert export(browser)["layers"][GROUP]["remove"] == [2, 4, 6]
    assert browser.get_log("browser") == []


def test_shift_click_sets_a_range_in_the_order_shown(browser, toy, tmp_path):
    model, variables, graph = toy
    page = write_kernel_page(
        tmp_path / "page.html", model.apply, variables, graph, GROUP, IMAGES, scores=SCORES
    )
    browser.get(page.as_uri())
    click(browser, 1)
    click(browser, 4, shift=True)
    assert removed_now(browser) == [1, 2, 3, 4]
    click(browser, 3)  # keep 3 again: it becomes the anchor, and a range from it keeps
    click(browser, 1, shift=True)
    assert removed_now(browser) == [4]
    # Sorted by score (6, 2, 4, 1, 7, 3, 5, 0), a range follows the order on screen.
    browser.find_element("id", "sort-score").click()
    click(browser, 6)
    click(browser, 1, shift=True)
    assert removed_now(browser) == [1, 2, 4, 6]
    click(browser, 0, shift=True)  # from 6 to the last: every kernel, which is refused
    assert removed_now(browser) == [1, 2, 4, 6]
    assert "Keep at least one" in text_of(browser, "message")
    assert browser.get_log("browser") == []


def test_the_choice_survives_a_reload_for_this_model_and_layer_only(browser, toy, tmp_path):
    model, variables, graph = toy
    ours = write_kernel_page(
        tmp_path / "ours.html", model.apply, variables, graph, GROUP, IMAGES, scores=SCORES
    )
    browser.get(ours.as_uri())
    for index in (0, 5):
        click(browser, index)
    export(browser)
    browser.refresh()
    assert removed_now(browser) == [0, 5]
    assert "Restored" in text_of(browser, "message")
    assert text_of(browser, "export-status") == "exported"
    # Another layer of the same model, and the same layer of another model, start empty.
    other_layer = write_kernel_page(
        tmp_path / "layer.html", model.apply, variables, graph, "conv0", IMAGES
    )
    browser.get(other_layer.as_uri())
    assert removed_now(browser) == []
    retrained = random_variables(model, IMAGES, seed=7)
    other_model = write_kernel_page(
        tmp_path / "model.html", model.apply, retrained, graph, GROUP, IMAGES
    )
    browser.get(other_model.as_uri())
    assert removed_now(browser) == []
    browser.get(ours.as_uri())
    assert removed_now(browser) == [0, 5]
    browser.find_element("id", "clear").click()  # "keep all" starts over, also after a reload
    browser.refresh()
    assert removed_now(browser) == []
    assert browser.get_log("browser") == []


def test_maps_lie_over_the_images_and_removed_kernels_stay_readable(browser, toy, tmp_path):
    model, variables, graph = toy
    page = write_kernel_page(
        tmp_path / "page.html", model.apply, variables, graph, GROUP, IMAGES, scores=SCORES
    )
    browser.get(page.as_uri())
    click(browser, 2)
    pictures = browser.execute_script(
        """
        const card = document.querySelector('.kernel[data-index="2"]');
        const maps = card.querySelector("img.maps");
        return {natural: [maps.naturalWidth, maps.naturalHeight], shown: [maps.width, maps.height],
                opacity: [getComputedStyle(card).opacity, getComputedStyle(maps).opacity],
                filter: getComputedStyle(maps).filter, removed: card.classList.contains("removed")};
        """
    )
    # conv1's maps are 4x4, but they lie over the 8x8 images: four of them in a row,
    # enlarged to about 56 screen pixels each.
    assert pictures["natural"] == [4 * 8 + 3, 8]
    assert pictures["shown"] == [7 * (4 * 8 + 3), 7 * 8]
    assert pictures["removed"] and pictures["opacity"] == ["1", "1"]
    assert pictures["filter"] == "none"
    assert browser.get_log("browser") == []


class Wide(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(nn.Conv(128, (3, 3), name="conv")(x))
        return nn.Dense(3, name="head")(x.reshape(x.shape[0], -1))


def test_a_128_kernel_layer_fills_the_width_without_an_empty_band(browser, tmp_path):
    images = jax.random.normal(jax.random.key(2), (8, 28, 28, 1))
    model = Wide()
    variables = random_variables(model, images)
    graph = channel_graph(model.apply, variables, images)
    page = write_kernel_page(tmp_path / "wide.html", model.apply, variables, graph, "conv", images)
    browser.get(page.as_uri())
    layout = browser.execute_script(
        """
        const main = document.querySelector("main");
        const cards = Array.from(main.querySelectorAll(".kernel"));
        const top = cards[0].getBoundingClientRect().top;
        const row = cards.filter(c => Math.abs(c.getBoundingClientRect().top - top) < 1);
        const inner = main.getBoundingClientRect().right -
          parseFloat(getComputedStyle(main).paddingRight);
        const overflow = cards.some(c => Array.from(c.querySelectorAll("img")).some(
          img => img.getBoundingClientRect().right > c.getBoundingClientRect().right + 0.5));
        return {cards: cards.length, perRow: row.length, overflow: overflow,
                band: inner - row[row.length - 1].getBoundingClientRect().right};
        """
    )
    assert layout["cards"] == 128
    assert layout["perRow"] >= 5  # at 1280 pixels; the old layout had two per row
    assert abs(layout["band"]) < 1.0  # the last card of a row ends at the row's end
    assert not layout["overflow"]
    assert browser.get_log("browser") == []


def test_the_page_says_where_the_waiting_run_reads_the_file(browser, toy, tmp_path):
    model, variables, graph = toy
    target = tmp_path / "run" / "selection" / "conv1.json"
    page = write_kernel_page(
        tmp_path / "page.html",
        model.apply,
        variables,
        graph,
        GROUP,
        IMAGES,
        config=PageConfig(save_to=str(target)),
    )
    browser.get(page.as_uri())
    assert text_of(browser, "save-to") == str(target)
    assert "selection_conv1.json" in browser.find_element("css selector", ".save-help").text
    click(browser, 3)
    export(browser)
    assert str(target) in text_of(browser, "message")
    assert browser.get_log("browser") == []


def test_a_hostile_name_in_the_embedded_data_does_not_stop_the_script(browser, toy, tmp_path):
    model, variables, graph = toy
    hostile = "x</script><!--<script>window.hacked=1</script>.json"
    page = write_kernel_page(
        tmp_path / "page.html",
        model.apply,
        variables,
        graph,
        GROUP,
        IMAGES,
        config=PageConfig(download_name=hostile),
    )
    browser.get(page.as_uri())
    click(browser, 1)
    assert text_of(browser, "removed-count") == "1"  # the script runs
    read = browser.execute_script(
        "return [JSON.parse(document.getElementById('page-data').textContent).download_name,"
        " window.hacked === undefined];"
    )
    assert read == [hostile, True]
    assert browser.get_log("browser") == []
