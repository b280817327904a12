"""A progressive run waiting for a person: the page hand-off (`waiting_chooser`), the file
names it reads, and the model a selection belongs to."""

import json
import re
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from toy_models import ConvBNDense

from jaxprune.inspect import PageConfig, macs_per_kernel, write_kernel_page
from jaxprune.inspect.page import page_file_name, selection_file_names
from jaxprune.inspect.selection import (
    SelectionError,
    model_fingerprint,
    selection_document,
    write_selection,
)
from jaxprune.methods.progressive_choice import (
    LayerView,
    SelectionPage,
    subjective_removals,
    waiting_chooser,
)
from jaxprune.methods.progressive_retrain import Network
from jaxprune.methods.selection_file import file_complete
from jaxprune.model import Model
from jaxprune.models.random_init import random_variables

IMAGES = jax.random.normal(jax.random.key(0), (4, 8, 8, 3))
BATCHES = ({"image": IMAGES, "label": np.arange(4) % 5},)
GROUP = "conv1"


def write_layer_page(path, view, save_to):
    """The kernel page of a layer, as the inspect layer hands it to a waiting run."""
    example = jnp.zeros((1, *view.images.shape[1:]), jnp.float32)
    write_kernel_page(
        path,
        view.model.apply_fn,
        view.variables,
        view.graph,
        view.group,
        view.images,
        scores=view.objective_scores(),
        macs_per_kernel=macs_per_kernel(
            view.model.apply_fn, view.variables, view.graph, view.group, example
        ),
        title=f"layer {view.group}: choose kernels to remove",
        config=PageConfig(
            save_to=str(save_to), count=view.count, model_fingerprint=view.fingerprint
        ),
    )


PAGE = SelectionPage(
    write=write_layer_page, page_name=page_file_name, answer_names=selection_file_names
)


@pytest.fixture(scope="module")
def network():
    module = ConvBNDense()
    variables = random_variables(module, IMAGES)
    return Network.of(Model.linen(module, IMAGES, variables=variables), variables)


def view_of(network, *, count=3, base=None):
    current = model_fingerprint(network.variables)
    return LayerView(
        group=GROUP,
        index=0,
        count=count,
        model=network.model,
        variables=network.variables,
        graph=network.graph,
        images=IMAGES,
        batches=BATCHES,
        fingerprint=base or current,
        accepted=tuple(sorted({current, base or current})),
    )


def waiting(folder, **changes):
    return waiting_chooser(folder, PAGE, **{"poll_seconds": 0.02, "timeout_s": 60, **changes})


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
    removed, chosen_by = waiting(folder)(view_of(network))
    thread.join()
    np.testing.assert_array_equal(removed, [2, 5])
    assert chosen_by == "person"
    data = page_data(folder / "conv1.html")
    # The page names the exact file the run waits for, the count p means, and the model.
    assert data["save_to"] == str((folder / "conv1.json").resolve())
    assert data["download_name"] == "selection_conv1.json" and data["suggested"] == 3
    assert data["model_fingerprint"] == model_fingerprint(network.variables)


def test_an_answer_already_there_is_used_without_writing_the_page(tmp_path, network):
    folder = tmp_path / "selection"
    write_selection(folder / "conv1.json", selection_document({GROUP: [4]}, {GROUP: 8}))
    removed, _ = waiting(folder)(view_of(network))
    np.testing.assert_array_equal(removed, [4])
    assert not list(folder.glob("*.html"))


def test_a_file_still_being_written_is_not_read_too_early(tmp_path, network):
    folder = tmp_path / "selection"
    folder.mkdir()
    (folder / "conv1.json").write_text("")  # a browser's placeholder
    assert not file_complete(folder / "conv1.json")
    thread = answer_when_the_page_is_there(
        folder, "conv1.json", lambda data: exported(data, [1]), delay=0.2
    )
    removed, _ = waiting(folder)(view_of(network))
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
        waiting(folder)(view_of(network))
    message = str(refused.value)
    assert theirs[:16] in message and model_fingerprint(network.variables)[:16] in message
    assert "selection_conv1.json" in message and "export a new file" in message


def test_a_replayed_selection_of_the_base_model_is_accepted_on_later_layers(tmp_path, network):
    base = "fe" * 32  # the run's base model; `network` stands for it after retraining
    path = write_selection(
        tmp_path / "chosen.json",
        selection_document({GROUP: [0, 3]}, {GROUP: 8}, model_fingerprint=base),
    )
    removed, _ = subjective_removals(view_of(network, base=base), str(path), None)
    np.testing.assert_array_equal(removed, [0, 3])
    with pytest.raises(SelectionError, match="another model"):
        subjective_removals(view_of(network), str(path), None)


def test_nobody_answering_times_out_naming_both_names(tmp_path, network):
    with pytest.raises(TimeoutError, match=r"conv1\.json or .*selection_conv1\.json"):
        waiting(tmp_path / "selection", timeout_s=0.1)(view_of(network))
