"""A progressive run waiting for a person: the file names it reads, and the model it belongs to."""

import json
import re
import threading
import time

import jax
import numpy as np
import pytest
from toy_models import ConvBNDense

from jaxprune.graph import channel_graph
from jaxprune.inspect.selection import (
    SelectionError,
    model_fingerprint,
    selection_document,
    write_selection,
)
from jaxprune.methods import progressive_retrain as retraining
from jaxprune.methods.progressive import ProgressiveConfig, subjective_removals
from jaxprune.models.random_init import random_variables

IMAGES = jax.random.normal(jax.random.key(0), (4, 8, 8, 3))
BATCHES = [{"image": IMAGES, "label": np.arange(4) % 5}]
GROUP = "conv1"


@pytest.fixture(scope="module")
def network():
    model = ConvBNDense()
    variables = random_variables(model, IMAGES)
    graph = channel_graph(model.apply, variables, IMAGES)
    return retraining.Network(apply_fn=model.apply, variables=variables, graph=graph)


def waiting(**changes):
    values = dict(
        criterion="subjective",
        wait_for_selection=True,
        poll_seconds=0.02,
        selection_timeout_s=60,
    )
    return ProgressiveConfig(**{**values, **changes})


def page_data(path):
    found = re.search(r'id="page-data">(.*?)</script>', path.read_text())
    return json.loads(found.group(1))


def answer_when_the_page_is_there(folder, name, document_for, delay=0.0):
    """What a person does: wait for the page, then put a file into the folder."""

    def run():
        for _ in range(3000):
            pages = list(folder.glob("*.html")) if folder.is_dir() else []
            if pages:
                time.sleep(delay)
                (folder / name).write_text(json.dumps(document_for(page_data(pages[0]))))
                return
            time.sleep(0.02)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def exported(data, remove):
    """The document the page's Export button builds."""
    return {
        "format": data["format"],
        "chosen_by": data["chosen_by"],
        "model_fingerprint": data["model_fingerprint"],
        "layers": {data["group"]: {"num_kernels": data["num_kernels"], "remove": remove}},
    }


def test_the_browsers_download_name_is_accepted_in_the_selection_folder(tmp_path, network):
    folder = tmp_path / "selection"
    thread = answer_when_the_page_is_there(
        folder, "selection_conv1.json", lambda data: exported(data, [2, 5])
    )
    removed, chosen_by = subjective_removals(
        waiting(), network, GROUP, IMAGES, BATCHES, tmp_path, suggested=3
    )
    thread.join()
    np.testing.assert_array_equal(removed, [2, 5])
    assert chosen_by == "person"
    data = page_data(folder / "conv1.html")
    # The page names the exact file the run waits for, the count p means, and the model.
    assert data["save_to"] == str((folder / "conv1.json").resolve())
    assert data["download_name"] == "selection_conv1.json" and data["suggested"] == 3
    assert data["model_fingerprint"] == model_fingerprint(network.variables)


def test_a_file_still_being_written_is_not_read_too_early(tmp_path, network):
    folder = tmp_path / "selection"
    folder.mkdir()
    (folder / "conv1.json").write_text("")  # a browser's placeholder
    thread = answer_when_the_page_is_there(
        folder, "conv1.json", lambda data: exported(data, [1]), delay=0.2
    )
    removed, _ = subjective_removals(waiting(), network, GROUP, IMAGES, BATCHES, tmp_path)
    thread.join()
    np.testing.assert_array_equal(removed, [1])


def test_a_selection_for_another_model_is_refused_naming_both_fingerprints(tmp_path, network):
    theirs = "0123456789abcdef" * 4
    folder = tmp_path / "selection"
    write_selection(
        folder / "selection_conv1.json",
        selection_document({GROUP: [1]}, {GROUP: 8}, model_fingerprint=theirs),
    )
    with pytest.raises(SelectionError) as refused:
        subjective_removals(waiting(), network, GROUP, IMAGES, BATCHES, tmp_path)
    message = str(refused.value)
    assert theirs[:16] in message and model_fingerprint(network.variables)[:16] in message
    assert "selection_conv1.json" in message and "export a new file" in message


def test_a_replayed_selection_of_the_base_model_is_accepted_on_later_layers(tmp_path, network):
    base = "fe" * 32  # the run's base model; `network` stands for it after retraining
    path = write_selection(
        tmp_path / "chosen.json",
        selection_document({GROUP: [0, 3]}, {GROUP: 8}, model_fingerprint=base),
    )
    config = ProgressiveConfig(criterion="subjective", selection=str(path))
    removed, _ = subjective_removals(
        config, network, GROUP, IMAGES, BATCHES, None, model_fingerprint=base
    )
    np.testing.assert_array_equal(removed, [0, 3])
    with pytest.raises(SelectionError, match="another model"):
        subjective_removals(config, network, GROUP, IMAGES, BATCHES, None)


def test_nobody_answering_times_out_naming_both_names(tmp_path, network):
    with pytest.raises(TimeoutError, match=r"conv1\.json or .*selection_conv1\.json"):
        subjective_removals(
            waiting(selection_timeout_s=0.1), network, GROUP, IMAGES, BATCHES, tmp_path
        )
