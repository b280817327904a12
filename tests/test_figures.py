"""Figures for papers: PNG at 200 dpi and PDF, labelled, relative where layers differ in size."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from jaxprune import cost
from jaxprune.criteria.report import compare_scores, report_figure, write_report
from jaxprune.demo import DemoConfig, _plot, summary_fractions
from jaxprune.figures import DPI, new_figure, save_figure
from jaxprune.models import build_model, widths_from_params


def assert_png_and_pdf(paths, stem):
    assert set(paths) == {"png", "pdf"}
    assert paths["png"].name == f"{stem}.png" and paths["pdf"].name == f"{stem}.pdf"
    with Image.open(paths["png"]) as image:
        assert image.format == "PNG"
        assert min(image.info["dpi"]) >= DPI - 0.5  # PNG stores pixels per metre
    assert paths["pdf"].read_bytes()[:5] == b"%PDF-"


def test_every_figure_is_saved_as_png_at_200_dpi_and_as_a_reproducible_pdf(tmp_path):
    def draw():
        figure = new_figure(3.0, 2.0)
        ax = figure.add_subplot()
        ax.plot([0, 1], [0, 1])
        ax.set_xlabel("x (units)")
        return figure

    paths = save_figure(draw(), tmp_path / "sub" / "plot.png")
    assert_png_and_pdf(paths, "plot")
    with Image.open(paths["png"]) as image:
        assert image.size == (3 * DPI, 2 * DPI)
    first = paths["pdf"].read_bytes()
    again = save_figure(draw(), tmp_path / "sub" / "plot.png")
    assert again["pdf"].read_bytes() == first  # no creation date: reruns give the same file
    svg = save_figure(draw(), tmp_path / "vector", formats=("svg",))
    assert svg["svg"].read_text().lstrip().startswith("<?xml")
    with pytest.raises(ValueError, match="200 dpi"):
        save_figure(draw(), tmp_path / "low.png", dpi=110)
    with pytest.raises(ValueError, match="formats"):
        save_figure(draw(), tmp_path / "x.png", formats=("jpg",))


def synthetic_report():
    rng = np.random.default_rng(0)
    sizes = {"a": 5, "b": 9, "c": 4}
    oracle = {g: rng.exponential(size=n) for g, n in sizes.items()}
    scores = {
        "noisy": {g: s + rng.normal(0, 0.5, s.size) for g, s in oracle.items()},
        "partial": {"b": rng.normal(size=9), "c": rng.normal(size=4)},
        "flat": {"a": np.ones(5), "b": oracle["b"] ** 2, "c": -oracle["c"]},
        "bn_only": {},  # a criterion that applies to none of the judged layers
    }
    return compare_scores(scores, oracle, sizes, examples=7)


def test_the_quality_map_greys_what_does_not_apply_and_labels_its_colour_bar(tmp_path):
    report = synthetic_report()
    figure = report_figure(report, title="synthetic")
    ax, bar = figure.axes
    texts = [t.get_text() for t in ax.texts]
    assert "nan" not in texts
    rows = [label.get_text() for label in ax.get_yticklabels()]
    assert rows == ["noisy", "partial", "flat"]  # bn_only has no row...
    assert "bn_only" in figure.get_supxlabel()  # ...but is named under the map
    # "partial" does not score layer a; "flat" is constant there.
    assert texts[len(ax.get_xticklabels()) * 1] == "n/a"
    assert texts[len(ax.get_xticklabels()) * 2] == "const."
    assert bar.get_ylabel() == "Spearman \u03c1 (unitless, -1 to 1)"
    assert "oracle_abs" in ax.get_title()
    assert ax.get_xlabel() and ax.get_ylabel() == "criterion"
    paths = write_report(report, tmp_path, title="synthetic")
    assert_png_and_pdf({k: paths[k] for k in ("png", "pdf")}, "criteria_quality")


@pytest.fixture(scope="module")
def lenet_costs():
    x = jnp.zeros((1, 28, 28, 1))
    base = build_model("lenet5", 10)
    base_vars = base.init(jax.random.key(0), x)
    small = build_model("lenet5", 10, {"conv1": 3, "conv2": 8, "fc1": 60, "fc2": 84})
    small_vars = small.init(jax.random.key(0), x)
    return (
        widths_from_params(base_vars["params"]),
        widths_from_params(small_vars["params"]),
        cost.count(base.apply, base_vars, x),
        cost.count(small.apply, small_vars, x),
    )


@pytest.mark.slow
def test_the_summary_plots_fractions_per_layer(lenet_costs, tmp_path):
    before, after, base_cost, pruned_cost = lenet_costs
    groups = ["conv1", "conv2", "fc1", "fc2"]
    fractions = summary_fractions(groups, before, after, base_cost, pruned_cost)
    assert fractions["groups"] == groups
    np.testing.assert_allclose(fractions["kept"], [after[g] / before[g] for g in groups])
    assert fractions["kept"][:2] == [0.5, 0.5]
    for key in ("kept", "macs_base", "macs_pruned"):
        values = np.asarray(fractions[key])
        assert np.all((values >= 0) & (values <= 1)), key
    assert sum(fractions["macs_base"]) == pytest.approx(1.0)
    assert sum(fractions["macs_pruned"]) == pytest.approx(pruned_cost.macs / base_cost.macs)
    assert fractions["layers"] == [row.name for row in base_cost.layers]

    rows = {
        "base": {"macs": base_cost.macs, "test_accuracy": 0.9},
        "pruned": {"macs": pruned_cost.macs, "test_accuracy": 0.88},
    }
    paths = _plot(tmp_path / "summary.png", DemoConfig(criterion="l1"), rows, fractions)
    assert_png_and_pdf(paths, "summary")
