"""Kernel selection files: round trip, directories, and the errors that name the fix."""

import json

import numpy as np
import pytest

from jaxprune.inspect.selection import (
    FORMAT,
    SelectionError,
    check_against,
    read_selection,
    selection_document,
    write_selection,
)


def test_a_written_selection_reads_back_sorted(tmp_path):
    document = selection_document({"conv1": [7, 3]}, {"conv1": 8}, chosen_by="stand-in:empty")
    path = write_selection(tmp_path / "s.json", document)
    layers = read_selection(path)
    np.testing.assert_array_equal(layers["conv1"]["remove"], [3, 7])
    assert layers["conv1"]["num_kernels"] == 8
    assert layers["conv1"]["chosen_by"] == "stand-in:empty"


def test_a_directory_reads_as_the_union_of_its_files(tmp_path):
    write_selection(tmp_path / "a.json", selection_document({"a": [0]}, {"a": 4}))
    write_selection(tmp_path / "b.json", selection_document({"b": [1, 2]}, {"b": 4}))
    assert sorted(read_selection(tmp_path)) == ["a", "b"]
    write_selection(tmp_path / "c.json", selection_document({"a": [1]}, {"a": 4}))
    with pytest.raises(SelectionError, match="chosen twice"):
        read_selection(tmp_path)


@pytest.mark.parametrize(
    ("remove", "message"),
    [([4], r"in \[0, 4\)"), ([-1], r"in \[0, 4\)"), ([1, 1], "repeated"), ([0, 1, 2, 3], "all 4")],
)
def test_bad_indices_are_refused(tmp_path, remove, message):
    path = tmp_path / "s.json"
    path.write_text(
        json.dumps({"format": FORMAT, "layers": {"c": {"num_kernels": 4, "remove": remove}}})
    )
    with pytest.raises(SelectionError, match=message):
        read_selection(path)


def test_files_that_are_no_selection_are_refused(tmp_path):
    path = tmp_path / "s.json"
    path.write_text(json.dumps({"layers": {}}))
    with pytest.raises(SelectionError, match="not a kernel selection"):
        read_selection(path)
    with pytest.raises(FileNotFoundError, match="jaxprune inspect"):
        read_selection(tmp_path / "missing.json")


def test_a_selection_must_fit_the_model():
    layers = {"c": {"num_kernels": 4, "remove": np.array([1])}}
    check_against(layers, {"c": 4})
    with pytest.raises(SelectionError, match="make the selection again"):
        check_against(layers, {"c": 3})
    with pytest.raises(SelectionError, match="another model"):
        check_against(layers, {"d": 4})


def test_the_model_fingerprint_travels_with_the_file_and_another_model_is_refused(tmp_path):
    ours, theirs = "a" * 64, "b" * 64
    document = selection_document({"c": [1]}, {"c": 4}, model_fingerprint=ours)
    assert document["model_fingerprint"] == ours
    layers = read_selection(write_selection(tmp_path / "s.json", document))
    assert layers["c"]["model_fingerprint"] == ours
    check_against(layers, {"c": 4}, fingerprints=ours)
    check_against(layers, {"c": 4}, fingerprints={theirs, ours})  # either is accepted
    with pytest.raises(SelectionError) as refused:
        check_against(layers, {"c": 4}, fingerprints=theirs)
    message = str(refused.value)
    # Both fingerprints, the file, and the fix.
    assert "a" * 16 in message and "b" * 16 in message and "s.json" in message
    assert "another model" in message and "jaxprune inspect" in message


def test_a_file_without_a_fingerprint_is_taken_on_trust(tmp_path):
    layers = read_selection(
        write_selection(tmp_path / "s.json", selection_document({"c": [1]}, {"c": 4}))
    )
    assert layers["c"]["model_fingerprint"] is None
    check_against(layers, {"c": 4}, fingerprints="f" * 64)


def test_a_fingerprint_that_is_not_a_string_is_refused(tmp_path):
    path = tmp_path / "s.json"
    document = {"format": FORMAT, "model_fingerprint": 7, "layers": {}}
    path.write_text(json.dumps(document))
    with pytest.raises(SelectionError, match="must be a string"):
        read_selection(path)


def test_the_fingerprint_is_the_one_a_progressive_run_records():
    import jax.numpy as jnp

    from jaxprune.checkpoint import tree_fingerprint
    from jaxprune.inspect.selection import model_fingerprint

    variables = {"params": {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}}
    assert model_fingerprint(variables) == tree_fingerprint(variables)
    # A progressive run hashes its base variables as JAX arrays: the same value.
    as_jax = {"params": {"w": jnp.asarray(variables["params"]["w"])}}
    assert model_fingerprint(as_jax) == model_fingerprint(variables)
    variables["params"]["w"][0, 0] = 1.0
    assert model_fingerprint(variables) != model_fingerprint(as_jax)


@pytest.mark.parametrize(
    ("layer", "message"),
    [
        # A string is not a list of indices (it used to read as kernels 1 and 2).
        ({"num_kernels": 4, "remove": "12"}, "must be a list of integer"),
        # Booleans and floats are not indices (they used to be truncated to 1 and 2).
        ({"num_kernels": 4, "remove": [True]}, "must be a list of integer"),
        ({"num_kernels": 4, "remove": [2.7]}, "must be a list of integer"),
        # null is an error that names the layer (it used to be a raw TypeError).
        ({"num_kernels": 4, "remove": None}, "must be a list of integer"),
        ({"num_kernels": "4", "remove": [1]}, "positive integer"),
        ({"num_kernels": 4.0, "remove": [1]}, "positive integer"),
        ({"num_kernels": None, "remove": [1]}, "positive integer"),
        ({"num_kernels": 0, "remove": []}, "positive integer"),
    ],
)
def test_values_of_the_wrong_type_are_refused_not_coerced(tmp_path, layer, message):
    path = tmp_path / "s.json"
    path.write_text(json.dumps({"format": FORMAT, "layers": {"conv1": layer}}))
    with pytest.raises(SelectionError, match=message) as refused:
        read_selection(path)
    assert "conv1" in str(refused.value) and "s.json" in str(refused.value)


def test_a_chosen_by_that_is_not_a_string_is_refused(tmp_path):
    path = tmp_path / "s.json"
    path.write_text(json.dumps({"format": FORMAT, "chosen_by": ["me"], "layers": {}}))
    with pytest.raises(SelectionError, match='"chosen_by" must be a string'):
        read_selection(path)


def test_documents_take_numpy_indices_and_the_inspect_module_is_the_same_format():
    from jaxprune.inspect import selection as inspect_selection
    from jaxprune.methods import selection_file

    document = selection_file.selection_document({"c": np.array([3, 1])}, {"c": np.int64(4)})
    assert document["layers"]["c"] == {"num_kernels": 4, "remove": [1, 3]}
    assert inspect_selection.read_selection is selection_file.read_selection
    assert inspect_selection.SelectionError is selection_file.SelectionError
