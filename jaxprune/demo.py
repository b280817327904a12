"""The quick start's main job: base model -> prune -> fine-tune -> report, on Fashion-MNIST.

    jaxprune demo                                    # VGG-small, one-shot L1, 50% of kernels
    jaxprune demo --criterion taylor --ratio 0.7     # any registered criterion and ratio
    jaxprune demo --method iterative --criterion taylor  # Molchanov et al. 2017, iterative
    jaxprune demo --method progressive               # Osaku et al. 2021, objective criterion
    jaxprune demo --method blending                  # He et al. 2021, 12 criteria blended
    jaxprune demo --method functional                # Qin et al. 2019, repeated functionality

Steps, each resumable from the workdir (run the same command again to continue):

1. prepare Fashion-MNIST from the Debian package (once) and load it;
2. load the base model shipped in `jaxprune/pretrained/` (or train it with the config of
   `experiments/base_<model>.py` when the file is missing);
3. score every kernel with the criterion on validation images, keep the best `1 - ratio` of
   every convolution's channels, and remove the rest physically (`surgery.prune`); with
   ``--method iterative``, remove `channels_per_step` kernels at a time over all convolutions,
   with `updates_per_step` fine-tuning updates in between, until `ratio` of them are gone
   (`jaxprune.methods.iterative`, checkpointed in `workdir/iterative`); with ``--method
   progressive`` (or another paper method), the method's own procedure with demo-sized settings
   (`METHOD_SETTINGS`), checkpointed in `workdir/<method>`;
4. fine-tune the pruned model (`finetune_epochs`), checkpointed in `workdir/finetune`;
5. evaluate both on the test split, count MACs and parameters, time CPU inference at batch 1
   and 128, and print a table; `workdir/summary.png` and `workdir/results.json` keep it.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import checkpoint, cost, data, train, train_job
from jaxprune.graph import channel_graph
from jaxprune.methods.contract import DatasetData
from jaxprune.methods.oneshot import OneShotConfig, oneshot_prune
from jaxprune.model import Model
from jaxprune.models import widths_from_params
from jaxprune.surgery import Pruned

PRETRAINED = Path(__file__).parent / "pretrained"


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """What the demo prunes, and how."""

    model: str = "vgg_small"
    dataset: str = "fashion_mnist"
    workdir: str = "workdirs/demo"
    method: str = "oneshot"
    criterion: str = ""
    ratio: float = 0.5
    finetune_epochs: int = 1
    finetune_lr: float = 0.01
    finetune_examples: int = 0
    score_examples: int = 1024
    base: str = ""
    seed: int = 0
    channels_per_step: int = 16
    updates_per_step: int = 10


FIELDS = tuple(f.name for f in dataclasses.fields(DemoConfig))
HELP = {
    "model": "zoo model (its base model must be shipped or trainable: lenet5, vgg_small)",
    "dataset": "dataset name (fashion_mnist is built in)",
    "workdir": "where checkpoints, results.json and summary.png go",
    "method": "pruning method: oneshot, iterative, progressive, blending, functional",
    "criterion": "relevance criterion by name (see jaxprune.criteria.CRITERIA); default: the "
    "method's own (oneshot l1, iterative taylor, progressive oracle_loss, blending all: the "
    "paper's 12-criteria pool, functional taylor: the representative kept per cluster)",
    "ratio": "fraction of every convolution's kernels to remove (iterative: of all of them)",
    "finetune_epochs": "epochs of fine-tuning after pruning (0: none)",
    "finetune_lr": "learning rate of the fine-tuning (SGD, momentum 0.9, cosine)",
    "finetune_examples": "fine-tune on a fixed subset of this many training images (0: all)",
    "score_examples": "validation images the criterion sees",
    "base": "base model file (default: jaxprune/pretrained/<model>_<dataset>.msgpack)",
    "seed": "seed of scoring (random criterion) and fine-tuning",
    "channels_per_step": "iterative: kernels removed per pruning step (the paper: 1)",
    "updates_per_step": "iterative: fine-tuning updates between pruning steps",
}


def _progressive_settings(config: DemoConfig) -> Any:
    from jaxprune.methods.progressive import ProgressiveConfig

    # Osaku et al.'s procedure at demo size: a few hundred images per layer, learning rates x100
    # of the authors' (their 1e-5..1e-8 need a whole epoch of batch-8 updates per layer).
    return ProgressiveConfig(
        criterion=config.criterion,
        ratio=config.ratio,
        score_examples=256,
        retrain_examples=512,
        learning_rates=((0, 1e-3), (1, 1e-4), (3, 1e-5)),
        eval_examples=1000,
        seed=config.seed,
    )


def _blending_settings(config: DemoConfig) -> Any:
    from jaxprune.methods.blending import BlendingConfig
    from jaxprune.methods.evolution import EvolutionConfig

    # He et al.'s search at demo size: 8 candidates for 5 generations on 500 validation images
    # (the library's defaults: 32 for 20 on 1000), one candidate per call on a CPU (automatic
    # chunk size); the demo's own fine-tuning follows.
    return BlendingConfig(
        criterion=config.criterion,
        ratio=config.ratio,
        evolution=EvolutionConfig(population=8, generations=5),
        score_examples=512,
        fitness_examples=500,
        finetune_epochs=0,
        seed=config.seed,
    )


def _functional_settings(config: DemoConfig) -> Any:
    from jaxprune.criteria.functionality import VisualizationConfig
    from jaxprune.methods.functional import FunctionalConfig

    # Qin et al.'s method at demo size: 24 ascent steps of 0.1 per image (the default: 64 of
    # 0.05), the representative chosen by Taylor on 512 images; the demo's own fine-tuning
    # follows.
    return FunctionalConfig(
        criterion=config.criterion,
        ratio=config.ratio,
        visualization=VisualizationConfig(steps=24, step_size=0.1),
        score_examples=512,
        finetune_epochs=0,
        seed=config.seed,
    )


# The paper methods run by their `jaxprune prune` runner: method -> (default criterion, the
# demo's settings of the method's config).
METHOD_SETTINGS: dict[str, tuple[str, Any]] = {
    "progressive": ("oracle_loss", _progressive_settings),
    "blending": ("all", _blending_settings),
    "functional": ("taylor", _functional_settings),
}
DEFAULT_CRITERIA = {"oneshot": "l1", "iterative": "taylor"} | {
    method: criterion for method, (criterion, _) in METHOD_SETTINGS.items()
}
METHODS = tuple(DEFAULT_CRITERIA)


def base_model_file(config: DemoConfig) -> Path:
    """The base model: the given file, the shipped one, or one trained into the workdir."""
    if config.base:
        path = Path(config.base)
        if not path.is_file():
            raise FileNotFoundError(f"--base {path} does not exist.")
        return path
    shipped = PRETRAINED / f"{config.model}_{config.dataset}.msgpack"
    if shipped.is_file():
        return shipped
    trained = Path(config.workdir) / "base.msgpack"
    if trained.is_file():
        return trained
    experiment = Path(__file__).parent.parent / "experiments" / f"base_{config.model}.py"
    if not experiment.is_file():
        raise FileNotFoundError(
            f"No base model for {config.model} on {config.dataset}: neither {shipped} nor a "
            f"training config {experiment}. Train one with `jaxprune train` and pass --base."
        )
    from jaxprune.commands.config import load_config

    print(f"no shipped base model: training one with {experiment} (resumable)")
    train_config = dataclasses.replace(load_config(experiment))
    workdir = Path(config.workdir) / "base"
    result = train_job.train_and_evaluate(train_config, workdir)
    return train_job.export_latest(workdir, trained, meta={"result": result})


def run(config: DemoConfig) -> dict[str, Any]:
    """Runs the demo and returns its results (also written to `workdir/results.json`)."""
    if config.method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {config.method!r}.")
    if not config.criterion:
        config = dataclasses.replace(config, criterion=DEFAULT_CRITERIA[config.method])
    workdir = Path(config.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    data_config = data.DataConfig(name=config.dataset, seed=config.seed)
    dataset = data.load(data_config)

    model, variables, meta = checkpoint.load_model_file(base_model_file(config))
    x = jnp.zeros((1, *dataset.image_shape), jnp.float32)
    graph = channel_graph(model.apply, variables, x)

    pruned_file = workdir / "pruned.msgpack"
    if not pruned_file.is_file():
        if config.method == "iterative":
            pruned = _iterative(config, variables, dataset, workdir)
        elif config.method in METHOD_SETTINGS:
            pruned = _paper_method(config, model, variables, dataset, workdir)
        else:
            result = oneshot_prune(
                Model.linen(model, x, variables=variables),
                variables,
                DatasetData(dataset, 128, seed=config.seed),
                OneShotConfig(
                    criterion=config.criterion,
                    ratio=config.ratio,
                    scope="conv",
                    score_batches=max(1, -(-config.score_examples // 128)),
                    seed=config.seed,
                ),
            )
            widths = widths_from_params(result.variables["params"])
            pruned = Pruned(result.variables, None, widths, dict(result.keep))
        keep = pruned.keep
        checkpoint.save_model_file(
            pruned_file,
            model_name=config.model,
            num_classes=dataset.num_classes,
            widths=pruned.widths,
            variables=pruned.variables,
            input_shape=dataset.image_shape,
            meta={
                "criterion": config.criterion,
                "ratio": config.ratio,
                "keep": {k: v.tolist() for k, v in keep.items()},
            },
        )
    small, small_variables, _ = checkpoint.load_model_file(pruned_file)
    rows = {"base": _measure(model, variables, dataset)}
    if config.finetune_epochs > 0:
        rows["pruned, before fine-tuning"] = _measure(small, small_variables, dataset, timing=False)
        small_variables = train_job.fine_tune(
            config.model,
            pruned_file,
            data.DataConfig(name=config.dataset, train_examples=config.finetune_examples or None),
            workdir / "finetune",
            epochs=config.finetune_epochs,
            learning_rate=config.finetune_lr,
            seed=config.seed,
        )
    rows["pruned"] = _measure(small, small_variables, dataset)
    base_cost = cost.count(model.apply, variables, x)
    pruned_cost = cost.count(small.apply, small_variables, x)
    report = {
        "config": dataclasses.asdict(config),
        "results": rows,
        "layers": cost.compare(base_cost, pruned_cost),
    }
    (workdir / "results.json").write_text(json.dumps(report, indent=2, default=float))
    _print_table(config, rows, report["layers"])
    fractions = summary_fractions(
        [g.name for g in graph.groups],
        widths_from_params(variables["params"]),
        widths_from_params(small_variables["params"]),
        base_cost,
        pruned_cost,
    )
    figures = _plot(workdir / "summary.png", config, rows, fractions)
    print(f"\nwrote {workdir / 'results.json'}, " + " and ".join(str(p) for p in figures.values()))
    return report


def _iterative(config: DemoConfig, variables, dataset, workdir: Path):
    """Iterative pruning until `ratio` of the convolution kernels are gone (resumable)."""
    from jaxprune.methods.iterative import IterativeConfig, iterative_prune

    iterative = IterativeConfig(
        criterion=config.criterion,
        channels_per_step=config.channels_per_step,
        updates_per_step=config.updates_per_step,
        target_channels=1.0 - config.ratio,
        batch_size=64,
        eval_examples=1000,
        test_at_end=False,
        seed=config.seed,
        progress=True,
    )
    return iterative_prune(
        iterative, config.model, variables, dataset, workdir=workdir / "iterative"
    )


def _paper_method(config: DemoConfig, model, variables, dataset, workdir: Path):
    """A paper method through its `jaxprune prune` runner, in `workdir/<method>` (resumable)."""
    from jaxprune.commands.prune import RUNNERS

    settings = METHOD_SETTINGS[config.method][1](config)
    runner = RUNNERS[config.method]
    method_dir = workdir / config.method
    report = runner.run(settings, config.model, model, variables, dataset, method_dir)
    _, pruned_variables, _ = checkpoint.load_model_file(method_dir / "pruned.msgpack")
    keep = {group: np.asarray(indices) for group, indices in report["keep"].items()}
    return Pruned(pruned_variables, None, dict(report["widths"]), keep)


def _measure(model, variables, dataset, timing: bool = True) -> dict[str, float]:
    x1 = jnp.zeros((1, *dataset.image_shape), jnp.float32)
    counted = cost.count(model.apply, variables, x1)
    test = train.evaluate(
        Model.linen(model, x1), variables, data.preprocessed_batches(dataset, "test", 500)
    )
    row = {
        "test_accuracy": test["accuracy"],
        "test_kappa": test["kappa"],
        "macs": counted.macs,
        "flops": counted.flops,
        "params": counted.params,
    }
    if timing:
        b128 = jax.random.normal(jax.random.key(0), (128, *dataset.image_shape))
        row["latency_b1_ms"] = 1e3 * cost.latency(model.apply, variables, x1).median
        row["latency_b128_ms"] = 1e3 * cost.latency(model.apply, variables, b128).median
    return row


def _print_table(config, rows, layers: str) -> None:
    base, pruned = rows["base"], rows["pruned"]
    print(
        f"\n{config.model} on {config.dataset}: {config.method} pruning by "
        f"{config.criterion}, {config.ratio:.0%} of "
        + ("the convolution" if config.method == "iterative" else "every convolution's")
        + " kernels removed, "
        f"{config.finetune_epochs} epoch(s) of fine-tuning\n"
    )
    print(layers)
    print()
    if "pruned, before fine-tuning" in rows:
        before = rows["pruned, before fine-tuning"]
        print(
            f"pruned, before fine-tuning: test accuracy {100 * before['test_accuracy']:.2f}%, "
            f"kappa {before['test_kappa']:.4f}\n"
        )
    print(f"{'':<18}{'base':>12}{'pruned':>12}{'ratio':>9}")
    fmt = {
        "test_accuracy": ("test accuracy", lambda v: f"{100 * v:.2f}%"),
        "test_kappa": ("Cohen's kappa", lambda v: f"{v:.4f}"),
        "macs": ("MACs", lambda v: f"{v / 1e6:.2f}M"),
        "params": ("parameters", lambda v: f"{v / 1e3:.1f}k"),
        "latency_b1_ms": ("CPU ms, batch 1", lambda v: f"{v:.3f}"),
        "latency_b128_ms": ("CPU ms, batch 128", lambda v: f"{v:.2f}"),
    }
    for key, (label, show) in fmt.items():
        ratio = base[key] / pruned[key] if key not in ("test_accuracy", "test_kappa") else None
        print(
            f"{label:<18}{show(base[key]):>12}{show(pruned[key]):>12}"
            + (f"{ratio:>8.2f}x" if ratio else "")
        )


def summary_fractions(
    groups: list[str],
    widths_before: dict[str, int],
    widths_after: dict[str, int],
    base_cost: cost.CostReport,
    pruned_cost: cost.CostReport,
) -> dict[str, Any]:
    """The relative per-layer quantities `summary.png` plots, so that small layers show too.

    Args:
      groups: the prunable channel groups, in model order.
      widths_before: kernels per group of the base model.
      widths_after: kernels per group of the pruned model.
      base_cost: `cost.count` of the base model.
      pruned_cost: `cost.count` of the pruned model.

    Returns:
      ``{"groups", "kept"}``: per group, the fraction of its kernels kept (in [0, 1]);
      ``{"layers", "macs_base", "macs_pruned"}``: per conv / dense layer, its MACs as a share
      of the base model's total (the base shares sum to 1, the pruned ones to the MACs ratio).
    """
    pruned_layers = {row.name: row.macs for row in pruned_cost.layers}
    total = float(base_cost.macs)
    layers = [row.name for row in base_cost.layers]
    return {
        "groups": list(groups),
        "kept": [widths_after[g] / widths_before[g] for g in groups],
        "layers": layers,
        "macs_base": [row.macs / total for row in base_cost.layers],
        "macs_pruned": [pruned_layers.get(name, 0.0) / total for name in layers],
    }


def _plot(path: Path, config, rows, fractions: dict[str, Any]) -> dict[str, Path]:
    from jaxprune.figures import new_figure, save_figure

    figure = new_figure(13.0, 4.2)
    ax1, ax2, ax3 = figure.subplots(1, 3, width_ratios=(1.0, 1.3, 1.0))
    groups = fractions["groups"]
    ax1.bar(np.arange(len(groups)), fractions["kept"], 0.6, color="tab:orange")
    ax1.axhline(1.0, color="0.5", linewidth=0.8, linestyle="--")
    ax1.set_xticks(np.arange(len(groups)), groups, rotation=45, ha="right")
    ax1.set_ylim(0, 1.05)
    ax1.set_xlabel("layer (channel group)")
    ax1.set_ylabel("kernels kept (fraction of the base layer's)")
    ax1.set_title("kernels kept per layer")

    layers = fractions["layers"]
    pos = np.arange(len(layers))
    ax2.bar(pos - 0.2, fractions["macs_base"], 0.4, label="base", color="tab:blue")
    ax2.bar(pos + 0.2, fractions["macs_pruned"], 0.4, label="pruned", color="tab:orange")
    ax2.set_xticks(pos, layers, rotation=45, ha="right")
    ax2.set_xlabel("layer")
    ax2.set_ylabel("MACs per image (fraction of the base total)")
    ax2.set_title("share of MACs per layer")
    ax2.legend()

    base_macs = rows["base"]["macs"]
    for key, marker in zip(rows, ("o", "^", "s"), strict=False):
        r = rows[key]
        ax3.scatter(r["macs"] / base_macs, 100 * r["test_accuracy"], marker=marker, s=60, label=key)
    ax3.set_xlim(0, 1.05)
    ax3.set_xlabel(f"MACs per image (fraction of base: {base_macs / 1e6:.3g} M)")
    ax3.set_ylabel("test accuracy (%)")
    ax3.set_title(f"{config.criterion}, {config.ratio:.0%} removed")
    ax3.legend()
    return save_figure(figure, path)
