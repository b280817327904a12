"""The criterion-quality report: Spearman against SciPy, the pooled variants, the score command."""

import argparse
import csv
import io
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
from core_helpers import init
from toy_models import ConvBNDense, DepthwiseSeparable

from jaxprune import checkpoint
from jaxprune.commands.score import ScoreConfig, add_score_command, run_score, validation_batches
from jaxprune.criteria import ScoringContext, normalize_l2, score
from jaxprune.criteria.rank_correlation import average_ranks, spearman
from jaxprune.criteria.report import (
    ORACLES,
    compare_scores,
    criteria_report,
    default_criteria,
    write_report,
)
from jaxprune.graph import channel_graph
from jaxprune.models import build_model, widths_from_params

X = jax.random.normal(jax.random.key(1), (6, 8, 8, 3))
Y = np.array([0, 1, 2, 0, 1, 2], np.int32)
BATCHES = [{"image": X[:3], "label": Y[:3]}, {"image": X[3:], "label": Y[3:]}]


def setup(model):
    variables = init(model, X)
    return variables, ScoringContext(model.apply, channel_graph(model.apply, variables, X))


# --- rank correlation -------------------------------------------------------------------------


def test_average_ranks_match_scipy_with_ties():
    rng = np.random.default_rng(0)
    for n in (1, 2, 7, 50):
        values = rng.integers(0, 4, n).astype(float)  # many ties
        np.testing.assert_array_equal(average_ranks(values), scipy.stats.rankdata(values))
    np.testing.assert_array_equal(average_ranks([10, 20, 20, 5]), [2, 3.5, 3.5, 1])
    np.testing.assert_array_equal(average_ranks([-np.inf, 0.0, -np.inf]), [1.5, 3, 1.5])


def test_spearman_matches_scipy_on_arrays_with_ties():
    rng = np.random.default_rng(1)
    for trial in range(30):
        n = int(rng.integers(2, 40))
        a = rng.integers(0, 5, n).astype(float)
        b = a + rng.normal(0, 2, n) if trial % 2 else rng.integers(0, 3, n).astype(float)
        expected = scipy.stats.spearmanr(a, b).statistic
        if np.isnan(expected):
            assert math.isnan(spearman(a, b))
        else:
            assert spearman(a, b) == pytest.approx(expected, abs=1e-12)
    x = rng.normal(size=20)
    assert spearman(x, 3 * x + 1) == pytest.approx(1.0)
    assert spearman(x, -np.exp(x)) == pytest.approx(-1.0)
    assert math.isnan(spearman(np.ones(5), x[:5]))  # a constant vector ranks nothing


def test_spearman_rejects_bad_input():
    with pytest.raises(ValueError, match="same length"):
        spearman(np.ones(3), np.ones(4))
    with pytest.raises(ValueError, match="at least two"):
        spearman([1.0], [2.0])
    with pytest.raises(ValueError, match="NaN"):
        spearman([1.0, np.nan], [2.0, 3.0])


# --- comparing scores -------------------------------------------------------------------------


def synthetic(seed=0):
    rng = np.random.default_rng(seed)
    sizes = {"a": 5, "b": 9, "c": 4}
    oracle = {g: rng.exponential(size=n) for g, n in sizes.items()}
    return rng, sizes, oracle


def test_scaled_oracle_is_perfect_per_layer_and_after_l2_but_not_raw():
    rng, sizes, oracle = synthetic()
    # Each layer on its own scale: the same ranking within layers, a mixed one when pooled raw.
    scaled = {g: s * 10.0**i for i, (g, s) in enumerate(oracle.items())}
    noisy = {g: s + rng.normal(0, 0.5, s.size) for g, s in oracle.items()}
    report = compare_scores({"scaled": scaled, "noisy": noisy}, oracle, sizes)

    row = report["scaled"]
    assert row.per_layer == pytest.approx({"a": 1.0, "b": 1.0, "c": 1.0})
    assert row.mean_per_layer == pytest.approx(1.0)
    assert row.all_layers_l2 == pytest.approx(1.0)
    assert row.all_layers < 0.9
    pooled = np.concatenate([scaled[g] for g in sizes])
    assert row.all_layers == pytest.approx(
        scipy.stats.spearmanr(pooled, np.concatenate(list(oracle.values()))).statistic
    )

    row = report["noisy"]
    for g in sizes:
        assert row.per_layer[g] == pytest.approx(scipy.stats.spearmanr(noisy[g], oracle[g])[0])
    assert row.mean_per_layer == pytest.approx(np.mean(list(row.per_layer.values())))
    noisy_l2, oracle_l2 = normalize_l2(noisy), normalize_l2(oracle)
    assert row.all_layers_l2 == pytest.approx(
        scipy.stats.spearmanr(
            np.concatenate([noisy_l2[g] for g in sizes]),
            np.concatenate([oracle_l2[g] for g in sizes]),
        ).statistic
    )
    # The other reading of "all layers, L2": only the criterion normalised, the oracle raw.
    assert row.all_layers_l2_criterion == pytest.approx(
        scipy.stats.spearmanr(
            np.concatenate([noisy_l2[g] for g in sizes]),
            np.concatenate([oracle[g] for g in sizes]),
        ).statistic
    )
    assert report.groups == ("a", "b", "c") and report.names == ("scaled", "noisy")


def test_a_criterion_is_judged_on_the_groups_it_scores():
    rng, sizes, oracle = synthetic(1)
    partial = {"b": rng.normal(size=9), "c": rng.normal(size=4)}
    flat_in_a = {"a": np.ones(5), "b": oracle["b"] ** 2, "c": -oracle["c"]}
    report = compare_scores({"partial": partial, "flat": flat_in_a, "none": {}}, oracle, sizes)

    row = report["partial"]
    assert row.groups == ("b", "c")
    pooled = spearman(np.concatenate(list(partial.values())), np.r_[oracle["b"], oracle["c"]])
    assert row.all_layers == pytest.approx(pooled)

    row = report["flat"]  # constant in "a": undefined there, left out of the mean
    assert math.isnan(row.per_layer["a"])
    assert row.per_layer["b"] == pytest.approx(1.0) and row.per_layer["c"] == pytest.approx(-1.0)
    assert row.mean_per_layer == pytest.approx(0.0)

    assert report["none"].groups == () and math.isnan(report["none"].all_layers_l2)
    table = report.table()
    assert "2/3" in table and "0/3" in table and "nan" in table


def test_compare_scores_rejects_bad_scores():
    _, sizes, oracle = synthetic()
    with pytest.raises(ValueError, match="has 9 channels"):
        compare_scores({"bad": {"b": np.ones(3)}}, oracle, sizes)
    with pytest.raises(ValueError, match="NaN"):
        compare_scores({"bad": {"a": np.full(5, np.nan)}}, oracle, sizes)
    with pytest.raises(ValueError, match="no scores for groups"):
        compare_scores({}, {"a": oracle["a"]}, sizes)


def test_csv_json_and_png_hold_the_report(tmp_path):
    rng, sizes, oracle = synthetic(2)
    scores = {"x": {g: rng.normal(size=n) for g, n in sizes.items()}, "y": {"a": oracle["a"]}}
    report = compare_scores(scores, oracle, sizes, examples=7, seconds={"x": 1.5})
    paths = write_report(report, tmp_path / "out", title="synthetic", extra={"note": 1})

    rows = list(csv.DictReader(io.StringIO(paths["csv"].read_text())))
    assert [r["criterion"] for r in rows] == ["x", "y"]
    assert float(rows[0]["all_layers_l2"]) == pytest.approx(report["x"].all_layers_l2, abs=1e-6)
    assert rows[1]["b"] == "" and rows[1]["groups_scored"] == "1"

    stored = json.loads(paths["json"].read_text())
    assert stored["run"] == {"note": 1} and stored["examples"] == 7
    assert stored["groups"] == sizes
    assert stored["criteria"][0]["per_layer"]["b"] == pytest.approx(report["x"].per_layer["b"])
    np.testing.assert_allclose(stored["scores"]["oracle_abs"]["c"], oracle["c"])
    assert paths["png"].read_bytes()[:4] == b"\x89PNG"


# --- scoring a model --------------------------------------------------------------------------


def test_report_on_a_toy_model_ranks_the_oracle_perfectly():
    variables, context = setup(ConvBNDense())
    report = criteria_report(
        context, variables, BATCHES, ["oracle_abs", "l1", "taylor", "random"], scope="conv"
    )
    assert report.groups == ("conv0", "conv1") and dict(report.sizes) == {"conv0": 6, "conv1": 8}
    assert report.examples == 6 and report.names == ("oracle_abs", "l1", "taylor", "random")
    row = report["oracle_abs"]
    assert row.per_layer == pytest.approx({"conv0": 1.0, "conv1": 1.0})
    assert (row.mean_per_layer, row.all_layers, row.all_layers_l2) == pytest.approx((1, 1, 1))
    for name in ("l1", "taylor"):
        np.testing.assert_allclose(
            report.scores[name]["conv1"], score(name, context, variables, BATCHES)["conv1"]
        )
        assert all(-1 <= v <= 1 for v in report[name].per_layer.values())
    for name in report.names:
        assert report[name].seconds >= 0
        assert {g: s.shape for g, s in report.scores[name].items()} == {
            "conv0": (6,),
            "conv1": (8,),
        }

    # The oracle was scored in two halves: its reliability is the halves' agreement.
    reliability = report.oracle_reliability
    assert reliability.examples == (3, 3) and set(reliability.per_layer) == {"conv0", "conv1"}
    half_a = score("oracle_abs", context, variables, BATCHES[:1])
    half_b = score("oracle_abs", context, variables, BATCHES[1:])
    for group, value in reliability.per_layer.items():
        assert value == pytest.approx(scipy.stats.spearmanr(half_a[group], half_b[group])[0])
    assert "\nhalves" in report.table() and "\nceiling" in report.table()
    one_batch = criteria_report(context, variables, BATCHES[:1], ["l1"])
    assert one_batch.oracle_reliability is None and "\nhalves" not in one_batch.table()

    everything = criteria_report(context, variables, BATCHES, ["l1"], scope="all")
    assert everything.groups == ("conv0", "conv1", "fc")
    assert everything["l1"].per_layer["conv1"] == pytest.approx(report["l1"].per_layer["conv1"])


def test_batch_norm_criteria_are_reported_on_the_groups_they_score():
    variables, context = setup(DepthwiseSeparable())
    report = criteria_report(context, variables, BATCHES, ["bn_gamma", "l2"])
    with_bn = set(score("bn_gamma", context, variables)) & set(report.groups)
    assert set(report["bn_gamma"].groups) == with_bn
    assert 0 < len(with_bn) < len(report.groups)
    assert set(report["l2"].groups) == set(report.groups)


def test_criteria_report_rejects_bad_requests():
    variables, context = setup(ConvBNDense())
    with pytest.raises(ValueError, match="at least one criterion"):
        criteria_report(context, variables, BATCHES, [])
    with pytest.raises(ValueError, match="more than once"):
        criteria_report(context, variables, BATCHES, ["l1", "l1"])
    with pytest.raises(KeyError, match="no_such"):
        criteria_report(context, variables, BATCHES, ["no_such"])
    with pytest.raises(ValueError, match="scope"):
        criteria_report(context, variables, BATCHES, ["l1"], scope="dense")
    with pytest.raises(ValueError, match="at least one batch"):
        criteria_report(context, variables, [], ["l1"])


def test_default_criteria_are_every_registered_one_but_the_oracles():
    names = default_criteria()
    assert not set(names) & set(ORACLES)
    assert {"taylor", "activation_mean", "activation_std", "min_weight", "mutual_info"} <= set(
        names
    )


class FakeDataset:
    """Just enough of `data.Dataset` to see which split is read and how much of it."""

    num_examples = {"train": 100, "validation": 50, "test": 40}

    def __init__(self):
        self.splits_read = []

    def iterate(self, split, batch_size, *, shuffle, drop_remainder):
        self.splits_read.append(split)
        assert shuffle is False and drop_remainder is False
        count = self.num_examples[split]
        for start in range(0, count, batch_size):
            n = min(batch_size, count - start)
            labels = np.arange(start, start + n)
            yield {"image": np.zeros((n, 2, 2, 1), np.uint8), "label": labels}

    def preprocess(self, images, labels, train=False):
        return images.astype(np.float32), labels


def test_validation_batches_read_exactly_the_asked_validation_examples():
    dataset = FakeDataset()
    batches = validation_batches(dataset, 45, 20)
    assert dataset.splits_read == ["validation"]
    assert [len(b["label"]) for b in batches] == [20, 20, 5]
    np.testing.assert_array_equal(np.concatenate([b["label"] for b in batches]), np.arange(45))
    with pytest.raises(ValueError, match="51 examples asked of the 50 in the validation split"):
        validation_batches(dataset, 51, 20)


# --- the command ------------------------------------------------------------------------------


def lenet_file(path):
    model = build_model("lenet5", 10)
    variables = dict(model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1))))
    return checkpoint.save_model_file(
        path,
        model_name="lenet5",
        num_classes=10,
        widths=widths_from_params(variables["params"]),
        variables=variables,
        input_shape=(28, 28, 1),
        meta={"note": "random weights"},
    )


@pytest.mark.slow
def test_score_command_writes_the_report_for_a_model_file(tmp_path, capsys):
    model_file = lenet_file(tmp_path / "lenet.msgpack")
    parser = argparse.ArgumentParser(prog="jaxprune")
    add_score_command(parser.add_subparsers(dest="command", required=True))
    workdir = tmp_path / "score"
    args = parser.parse_args(
        [
            "score",
            "--model",
            "lenet5",
            "--variables",
            str(model_file),
            "--criteria",
            "l1",
            "taylor",
            "random",
            "--examples",
            "48",
            "--batch-size",
            "32",
            "--workdir",
            str(workdir),
        ]
    )
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "taylor" in out and "oracle_abs, 48 examples" in out

    stored = json.loads((workdir / "criteria_quality.json").read_text())
    assert stored["run"]["split"] == "validation" and stored["examples"] == 48
    assert stored["groups"] == {"conv1": 6, "conv2": 16}
    assert [c["name"] for c in stored["criteria"]] == ["l1", "taylor", "random"]
    rows = list(csv.DictReader(io.StringIO((workdir / "criteria_quality.csv").read_text())))
    assert len(rows) == 3 and all(-1 <= float(r["conv2"]) <= 1 for r in rows)
    assert (workdir / "criteria_quality.png").stat().st_size > 0
    # The live metrics: one record per criterion, the report's own numbers.
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [(r["step"], r["criterion"]) for r in records] == [
        (1, "l1"),
        (2, "taylor"),
        (3, "random"),
    ]
    for record, row in zip(records, stored["criteria"], strict=True):
        assert record["mean_per_layer"] == pytest.approx(row["mean_per_layer"])
        assert record["per_layer"] == pytest.approx(row["per_layer"])

    with pytest.raises(ValueError, match="oracles"):
        run_score(ScoreConfig(model="lenet5", variables=str(model_file), criteria=("oracle_abs",)))
    with pytest.raises(ValueError, match="does not exist"):
        run_score(ScoreConfig(model="lenet5", variables=str(tmp_path / "missing.msgpack")))
    with pytest.raises(ValueError, match="holds a lenet5, not a vgg_small"):
        run_score(ScoreConfig(model="vgg_small", variables=str(model_file)))
