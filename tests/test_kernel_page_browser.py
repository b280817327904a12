"""The kernel-selection page in a real headless Chromium: click, export, replay the selection.

Needs Debian's chromium and chromium-driver and selenium (``scripts/install.sh --dev`` installs
them). The test skips only when JAXPRUNE_NO_BROWSER=1; a missing browser is a failure, so CI
cannot pass without running it.
"""

import json
import os
import shutil
import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from toy_models import ConvBNDense

from jaxprune.gates import gated_call
from jaxprune.graph import channel_graph
from jaxprune.inspect import macs_per_kernel, write_kernel_page
from jaxprune.inspect.selection import FORMAT, read_selection, write_selection
from jaxprune.models.random_init import random_variables
from jaxprune.surgery import keep_to_masks, prune

GROUP = "conv1"
IMAGES = jax.random.normal(jax.random.key(0), (4, 8, 8, 3))
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


def click(chrome, index):
    chrome.find_element("css selector", f'.kernel[data-index="{index}"]').click()


def text_of(chrome, element_id):
    return chrome.find_element("id", element_id).text


def test_click_export_and_prune_with_the_exported_selection(browser, tmp_path):
    model = ConvBNDense()
    variables = random_variables(model, IMAGES)
    graph = channel_graph(model.apply, variables, IMAGES)
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
    removed = browser.find_elements("css selector", ".kernel.removed")
    assert sorted(int(e.get_attribute("data-index")) for e in removed) == [1, 6]
    saved = browser.find_element("id", "macs-saved")
    assert int(saved.get_attribute("data-macs")) == round(2 * per_kernel)
    assert saved.text.strip()

    browser.find_element("id", "export").click()
    exported = browser.find_element("id", "selection-json").get_attribute("value")
    document = json.loads(exported)
    assert document == {
        "format": FORMAT,
        "chosen_by": "person",
        "layers": {GROUP: {"num_kernels": graph[GROUP].size, "remove": [1, 6]}},
    }
    download = browser.downloads / f"selection_{GROUP}.json"
    deadline = time.monotonic() + 10
    while not download.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert json.loads(download.read_text()) == document
    assert browser.get_log("browser") == []

    layers = read_selection(write_selection(tmp_path / "selection.json", document))
    remove = layers[GROUP]["remove"]
    keep = {GROUP: np.setdiff1d(np.arange(graph[GROUP].size), remove)}
    pruned = prune(variables, graph, keep)
    assert pruned.widths["conv1"] == graph[GROUP].size - 2
    assert pruned.variables["params"]["conv1"]["kernel"].shape[-1] == graph[GROUP].size - 2
    small = ConvBNDense(widths=tuple(sorted(pruned.widths.items())))
    masked = gated_call(model.apply, graph, variables, IMAGES, keep_to_masks(graph, keep))
    chex.assert_trees_all_close(small.apply(pruned.variables, IMAGES), masked, atol=1e-5, rtol=1e-5)
    assert not jnp.allclose(masked, model.apply(variables, IMAGES))  # the removal did something
