"""`jaxprune inspect`: pages, stand-in selections and the index for a model file."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprune import checkpoint
from jaxprune.cli import build_parser
from jaxprune.commands.inspect import InspectConfig, run_inspect
from jaxprune.inspect.selection import read_selection
from jaxprune.models import build_model, widths_from_params


@pytest.fixture(scope="module")
def lenet_file(tmp_path_factory):
    model = build_model("lenet5", 10)
    variables = dict(model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1))))
    return checkpoint.save_model_file(
        tmp_path_factory.mktemp("model") / "lenet.msgpack",
        model_name="lenet5",
        num_classes=10,
        widths=widths_from_params(variables["params"]),
        variables=variables,
        input_shape=(28, 28, 1),
        meta={"note": "random weights"},
    )


@pytest.mark.slow
def test_every_conv_layer_gets_a_page_a_standin_file_and_an_index_entry(lenet_file, tmp_path):
    out = tmp_path / "inspect"
    args = build_parser().parse_args(
        ["inspect", "--model", "lenet5", "--variables", str(lenet_file), "--layer", "all"]
        + ["--images", "3"]
        + ["--scores", "l1", "--standin", "2", "--ratio", "0.25", "--out", str(out)]
    )
    assert args.func(args) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "conv1.html",
        "conv2.html",
        "index.html",
        "standin_conv1.json",
        "standin_conv2.json",
    ]
    index = (out / "index.html").read_text()
    for name in ("conv1.html", "conv2.html", "standin_conv1.json", "standin_conv2.json"):
        assert f'href="{name}"' in index
    page = (out / "conv2.html").read_text()
    assert page.count('class="kernel"') == 16 and "rank 16" in page  # l1 scores shown
    assert "Score: l1 (higher" in page and "objective criterion" not in page
    # p = 25%: 4 of conv2's 16 kernels; 1.5 of conv1's 6 is floored to 1, as a progressive run.
    assert '<b id="p-count">4</b>' in page
    assert '<b id="p-count">1</b>' in (out / "conv1.html").read_text()
    layers = read_selection(out / "standin_conv2.json")
    assert layers["conv2"]["chosen_by"].startswith("stand-in:")
    assert layers["conv2"]["num_kernels"] == 16 and len(layers["conv2"]["remove"]) == 2


@pytest.mark.slow
def test_the_default_layer_is_the_first_conv_and_scores_can_be_off(lenet_file, tmp_path):
    config = InspectConfig(
        model="lenet5", variables=str(lenet_file), images=2, scores="none", out=str(tmp_path / "o")
    )
    written = run_inspect(config)
    assert sorted(written) == ["index", "page:conv1"]
    assert "score " not in written["page:conv1"].read_text()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"layer": "fc1"}, r"not a prunable conv layer; choose one of \['conv1', 'conv2'\]"),
        ({"standin": 6}, "would remove every kernel"),
        ({"scores": "nope"}, "not a registered criterion"),
        ({"images": 0}, "at least 1"),
        ({"ratio": 1.0}, r"--ratio must be in \[0, 1\)"),
    ],
)
@pytest.mark.slow
def test_bad_requests_name_the_fix(lenet_file, tmp_path, change, message):
    config = InspectConfig(
        **{
            "model": "lenet5",
            "variables": str(lenet_file),
            "images": 2,
            "out": str(tmp_path),
            **change,
        }
    )
    with pytest.raises(ValueError, match=message):
        run_inspect(config)
    assert not np.any([p.suffix == ".html" for p in tmp_path.iterdir()])
