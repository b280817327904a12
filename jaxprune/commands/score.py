"""`jaxprune score`: how closely each criterion ranks channels like the oracle, on a model and
the validation split (Molchanov et al. 2017, Table 1).

    jaxprune score --model vgg_small --criteria taylor l1 activation_mean --examples 2048
    jaxprune score --model my_models.py:make_cnn --dataset cifar10 --workdir workdirs/score
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Mapping
from typing import Any, NamedTuple

from jaxprune.commands.config import DefaultsHelpFormatter, UsageError
from jaxprune.commands.model_spec import add_model_arguments, load_model
from jaxprune.commands.shapes import data_shape
from jaxprune.criteria.base import ScoringContext
from jaxprune.criteria.registry import CRITERIA
from jaxprune.criteria.report import (
    ORACLES,
    SCOPES,
    CriterionQuality,
    Report,
    criteria_report,
    default_criteria,
    write_report,
)
from jaxprune.metrics import MetricsWriter
from jaxprune.runtime import is_main_process


@dataclasses.dataclass(frozen=True)
class ScoreConfig:
    """What `run_score` judges, on which data, and where the files go."""

    # A zoo model (its shipped weights, or --variables) or your own as FILE.py:NAME.
    model: str = "vgg_small"
    # The model's variables: a model file or an orbax checkpoint ("": the zoo's shipped ones).
    variables: str = ""
    # The dataset (a zoo model file's own training data when it names one).
    dataset: str = "fashion_mnist"
    # Registry names of the criteria to judge; () is every one but the oracles.
    criteria: tuple[str, ...] = ()
    # Validation examples scored (the first ones of the split, in storage order).
    examples: int = 512
    # Examples per batch.
    batch_size: int = 128
    # "conv": judge convolution groups only; "all": dense hidden layers too.
    scope: str = "conv"
    # The reference ranking.
    oracle: str = "oracle_abs"
    # Where criteria_quality.{csv,json,png,pdf} go.
    workdir: str = "workdirs/score"
    # Prepared TFDS data (None: the default data dir).
    data_dir: str | None = None
    # Seed of the "random" criterion.
    seed: int = 0
    # A progress bar over the oracle and the criteria.
    progress: bool = True

    def check(self) -> None:
        """Raises UsageError naming the first bad setting, before any data is read."""
        names = tuple(self.criteria) or default_criteria()
        unknown = [n for n in names if n not in CRITERIA]
        if unknown:
            raise UsageError(f"unknown criteria {unknown}; registered: {sorted(CRITERIA)}.")
        oracles = [n for n in names if n in ORACLES]
        if oracles:
            raise UsageError(
                f"criteria {oracles} are oracles, the reference itself; leave them out."
            )
        if self.oracle not in ORACLES:
            raise UsageError(f"oracle must be one of {ORACLES}, got {self.oracle!r}.")
        if self.scope not in SCOPES:
            raise UsageError(f"scope must be one of {SCOPES}, got {self.scope!r}.")
        for name in ("examples", "batch_size"):
            if getattr(self, name) < 1:
                raise UsageError(f"{name} must be >= 1, got {getattr(self, name)}.")


def data_config_for(meta: Mapping[str, Any], dataset: str, data_dir: str | None = None) -> Any:
    """The `DataConfig` a model was trained with (from its model file's meta), so its
    validation split is held out; else the plain `dataset`."""
    from jaxprune import data

    trained_on = dict(meta.get("config", {}).get("data") or {})
    known = {f.name for f in dataclasses.fields(data.DataConfig)}
    # Same dataset and the same carve of validation from train; nothing else of training.
    chosen = {
        k: trained_on[k]
        for k in ("name", "validation_size", "validation_seed", "image_size")
        if k in trained_on and k in known
    }
    chosen.setdefault("name", dataset)
    return data.DataConfig(**chosen, data_dir=data_dir)


def validation_batches(dataset: Any, examples: int, batch_size: int) -> list[dict[str, Any]]:
    """The first `examples` validation examples, preprocessed, in batches (never the test split).

    Raises:
      ValueError: a bad count, or more examples than the validation split holds.
    """
    from jaxprune.data import preprocessed_batches

    return list(preprocessed_batches(dataset, "validation", batch_size, examples))


class ScoringSetup(NamedTuple):
    """A model loaded for scoring on validation data."""

    label: str
    dataset: Any
    context: ScoringContext
    variables: Any
    batches: list[dict[str, Any]]


def load_scoring_setup(config: ScoreConfig) -> ScoringSetup:
    """Loads the model, its dataset and graph, and the validation batches of `config`.

    Raises:
      UsageError: a bad model or settings (before any data is read).
      ValueError: more examples than the validation split holds.
    """
    from jaxprune import data
    from jaxprune.graph import channel_graph

    config.check()
    input_shape, num_classes = data_shape(config.dataset)
    loaded = load_model(
        config.model,
        input_shape=input_shape,
        num_classes=num_classes,
        dataset=config.dataset,
        variables_path=config.variables or None,
    )
    dataset = data.load(data_config_for(loaded.meta, config.dataset, config.data_dir))
    batches = validation_batches(dataset, config.examples, config.batch_size)
    model = loaded.model
    graph = channel_graph(
        model.apply_fn, loaded.variables, model.example_input, **model.eval_kwargs
    )
    context = ScoringContext(model.apply_fn, graph, apply_kwargs=model.eval_kwargs)
    return ScoringSetup(loaded.label, dataset, context, loaded.variables, batches)


def run_score(config: ScoreConfig) -> Report:
    """Loads a model, judges the criteria on validation data, prints and writes the report.

    Returns:
      The report (also in `workdir`: criteria_quality.csv, .json, .png and .pdf).
    """
    import jax

    config.check()
    names = tuple(config.criteria) or default_criteria()
    started = time.perf_counter()
    label, dataset, context, variables, batches = load_scoring_setup(config)
    # Live metrics: one record per criterion as soon as it is judged (step = its position).
    main = is_main_process()  # one process writes and prints in a multi-process run
    with MetricsWriter(config.workdir, enabled=main) as metrics:

        def log(row: CriterionQuality) -> None:
            values = {"mean_per_layer": row.mean_per_layer, "all_layers": row.all_layers,
                      "all_layers_l2": row.all_layers_l2,
                      "all_layers_l2_criterion": row.all_layers_l2_criterion,
                      "per_layer": dict(row.per_layer), "seconds": row.seconds}  # fmt: skip
            metrics.write(names.index(row.name) + 1, "criterion", criterion=row.name, **values)

        report = criteria_report(
            context,
            variables,
            batches,
            names,
            oracle=config.oracle,
            scope=config.scope,
            options={"random": {"seed": config.seed}} if "random" in names else None,
            progress=config.progress and main,
            on_scored=log,
        )
    elapsed = time.perf_counter() - started
    title = f"{label} on {dataset.config.name} validation"
    extra = {
        "config": dataclasses.asdict(config),
        "model": label,
        "dataset": dataset.config.name,
        "split": "validation",
        "seconds": elapsed,
        "jax": jax.__version__,
        "devices": [str(d) for d in jax.devices()],
        "processes": jax.process_count(),
    }
    if main:
        paths = write_report(report, config.workdir, title=title, extra=extra)
        print(f"{title}\n")
        print(report.table())
        print(f"\ntotal {elapsed:.1f} s; wrote {', '.join(str(p) for p in paths.values())}")
    return report


def _score_from_args(args: argparse.Namespace) -> int:
    config = ScoreConfig(
        model=args.model,
        variables=args.variables or "",
        dataset=args.dataset,
        criteria=tuple(args.criteria or ()),
        examples=args.examples,
        batch_size=args.batch_size,
        scope=args.scope,
        oracle=args.oracle,
        workdir=args.workdir,
        data_dir=args.data_dir,
        seed=args.seed,
        progress=not args.no_progress,
    )
    run_score(config)
    return 0


def add_score_command(subparsers: Any) -> argparse.ArgumentParser:
    """Registers ``jaxprune score`` on the CLI's subparsers (its handler is ``args.func``)."""
    defaults = ScoreConfig()
    parser = subparsers.add_parser(
        "score",
        help="judge criteria by Spearman correlation with the oracle on validation data",
        description=(
            "Scores every channel of a model with each criterion and with the oracle on the "
            "validation split, and reports their Spearman rank correlations per layer and "
            "over all layers (Molchanov et al. 2017, Table 1)."
        ),
        formatter_class=DefaultsHelpFormatter,
    )
    add_model_arguments(parser)
    parser.add_argument(
        "--criteria",
        nargs="+",
        metavar="NAME",
        help="criteria to judge (default: every registered one except the oracles)",
    )
    parser.add_argument(
        "--examples", type=int, default=defaults.examples, help="validation examples scored"
    )
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="batch size")
    parser.add_argument(
        "--scope",
        choices=SCOPES,
        default=defaults.scope,
        help="conv: convolution groups only; all: dense hidden layers too",
    )
    parser.add_argument("--oracle", default=defaults.oracle, choices=ORACLES, help="the reference")
    parser.add_argument(
        "--workdir", default=defaults.workdir, help="where criteria_quality.{csv,json,png,pdf} go"
    )
    parser.add_argument("--data-dir", default=None, help="prepared TFDS data dir")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed of 'random'")
    parser.add_argument(
        "--no-progress", action="store_true", help="no progress bar (e.g. in log files)"
    )
    parser.set_defaults(func=_score_from_args)
    return parser
