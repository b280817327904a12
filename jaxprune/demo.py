"""The quick start's main job: base model -> prune -> fine-tune -> report, on Fashion-MNIST.

    jaxprune demo                                    # VGG-small, one-shot L1, 50% of kernels
    jaxprune demo --criterion taylor --ratio 0.7     # any registered criterion and ratio
    jaxprune demo --method iterative --criterion taylor  # Molchanov et al. 2017, iterative
    jaxprune demo --method progressive               # Osaku et al. 2021, objective criterion
    jaxprune demo --method blending                  # He et al. 2021, 12 criteria blended
    jaxprune demo --method functional                # Qin et al. 2019, repeated functionality

The demo is a `jaxprune prune` job (`commands.prune.run_job`) with demo-sized settings for each
method (`METHOD_SETTINGS`, one table), so every step resumes from the workdir (run the same
command again to continue; other settings in the same workdir are refused, naming them):

1. prepare Fashion-MNIST from the Debian package (once) and load it;
2. take the base model shipped in `jaxprune/pretrained/` (or train it with the config of
   `experiments/base_<model>.py` when the file is missing);
3. prune it with the method: one-shot scores every kernel on validation images and removes
   `ratio` of every convolution's; iterative removes `channels_per_step` kernels at a time with
   `updates_per_step` fine-tuning updates in between until `ratio` of all are gone; the paper
   methods run their own procedure;
4. fine-tune the pruned model (`finetune_epochs`, inside the method: its result is the final
   model, ``workdir/pruned.msgpack``);
5. evaluate both on the test split, count MACs and parameters, time CPU inference at batch 1
   and 128, and print a table; `workdir/summary.png` and `workdir/results.json` keep it (and
   `workdir/result.json` the whole `jaxprune prune` report).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import cost, data, train, train_job
from jaxprune.commands.config import UsageError
from jaxprune.commands.prune import PRUNED_FILE, PruneJob, load_job_model, load_pruned, run_job
from jaxprune.criteria.functionality import VisualizationConfig
from jaxprune.fit import FitConfig
from jaxprune.methods.blending import BlendingConfig
from jaxprune.methods.evolution import EvolutionConfig
from jaxprune.methods.functional import FunctionalConfig
from jaxprune.methods.iterative import IterativeConfig
from jaxprune.methods.oneshot import OneShotConfig
from jaxprune.methods.progressive import ProgressiveConfig
from jaxprune.run import write_json_atomic

PRETRAINED = Path(__file__).parent / "pretrained"
# Fashion-MNIST's training images once the 5000 validation ones are carved out.
TRAIN_IMAGES = 55_000


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
    eval_examples: int = 0
    base: str = ""
    seed: int = 0
    channels_per_step: int = 16
    updates_per_step: int = 10
    timing: bool = True
    progress: bool = True


FIELDS = tuple(f.name for f in dataclasses.fields(DemoConfig))
HELP = {
    "model": (
        "zoo model (its base model must be shipped or trainable: lenet5, vgg_small), or your "
        "own trained model as FILE.py:NAME or package.module:NAME (see jaxprune prune --help)"
    ),
    "dataset": "dataset name (fashion_mnist is built in)",
    "workdir": "where checkpoints, result.json, results.json and summary.png go",
    "method": "pruning method: oneshot, iterative, progressive, blending, functional",
    "criterion": "relevance criterion by name (see jaxprune.criteria.CRITERIA); default: the "
    "method's own (oneshot l1, iterative taylor, progressive oracle_loss, blending all: the "
    "paper's 12-criteria pool, functional taylor: the representative kept per cluster)",
    "ratio": "fraction of every convolution's kernels to remove (iterative: of all of them)",
    "finetune_epochs": "epochs of fine-tuning after pruning (0: none)",
    "finetune_lr": "learning rate of the fine-tuning (SGD, momentum 0.9, cosine)",
    "finetune_examples": "train on a fixed subset of this many training images (0: all)",
    "score_examples": "validation images the criterion sees",
    "eval_examples": "evaluate on the first this-many validation and test images (0: all)",
    "base": "base model file (default: jaxprune/pretrained/<model>_<dataset>.msgpack)",
    "seed": "seed of scoring (random criterion), data order and fine-tuning",
    "channels_per_step": "iterative: kernels removed per pruning step (the paper: 1)",
    "updates_per_step": "iterative: fine-tuning updates between pruning steps",
    "timing": "time CPU inference of the base and pruned models",
    "progress": "progress bars (--no-progress for log files)",
}


def _finetune(config: DemoConfig) -> FitConfig | None:
    """SGD with momentum 0.9 and a cosine schedule from `finetune_lr`; None for 0 epochs."""
    if config.finetune_epochs <= 0:
        return None
    optimizer = train.OptimizerConfig(
        name="sgd",
        learning_rate=config.finetune_lr,
        momentum=0.9,
        schedule="cosine",
        weight_decay=5e-4,
    )
    return FitConfig(epochs=config.finetune_epochs, optimizer=optimizer, seed=config.seed)


def _batches(examples: int, batch_size: int = 128) -> int:
    return max(1, -(-examples // batch_size))


def _oneshot(config: DemoConfig) -> OneShotConfig:
    return OneShotConfig(
        criterion=config.criterion,
        ratio=config.ratio,
        scope="conv",
        score_batches=_batches(config.score_examples),
        finetune=_finetune(config),
        seed=config.seed,
    )


def _iterative(config: DemoConfig) -> IterativeConfig:
    # Pruning steps until `ratio` of the conv kernels are gone, then `finetune_epochs` epochs
    # of updates at the steps' batch size and learning rate.
    images = config.finetune_examples or TRAIN_IMAGES
    return IterativeConfig(
        criterion=config.criterion,
        channels_per_step=config.channels_per_step,
        updates_per_step=config.updates_per_step,
        target_channels=1.0 - config.ratio,
        final_updates=round(config.finetune_epochs * images / 64),
        batch_size=64,
        eval_examples=min(1000, config.eval_examples or 1000),
        seed=config.seed,
    )


def _progressive(config: DemoConfig) -> ProgressiveConfig:
    # Osaku et al.'s procedure at demo size: a few hundred images per layer, learning rates x100
    # of the authors' (their 1e-5..1e-8 need a whole epoch of batch-8 updates per layer); the
    # final step fine-tunes the whole network like the other methods (no re-initialisation).
    return ProgressiveConfig(
        criterion=config.criterion,
        ratio=config.ratio,
        score_examples=min(256, config.score_examples),
        retrain_examples=512,
        learning_rates=((0, 1e-3), (1, 1e-4), (3, 1e-5)),
        final_finetune_epochs=config.finetune_epochs,
        final_learning_rate=config.finetune_lr,
        final_batch_size=64,
        final_reinit="none",
        eval_examples=min(1000, config.eval_examples or 1000),
        seed=config.seed,
    )


def _blending(config: DemoConfig) -> BlendingConfig:
    # He et al.'s search at demo size: 8 candidates for 5 generations on 500 validation images
    # (the library's defaults: 32 for 20 on 1000), one candidate per call on a CPU.
    return BlendingConfig(
        criterion=config.criterion,
        ratio=config.ratio,
        evolution=EvolutionConfig(population=8, generations=5),
        score_examples=min(512, config.score_examples),
        fitness_examples=min(500, config.score_examples),
        finetune=_finetune(config),
        seed=config.seed,
    )


def _functional(config: DemoConfig) -> FunctionalConfig:
    # Qin et al.'s method at demo size: 24 ascent steps of 0.1 per image (the default: 64 of
    # 0.05), the representative chosen by Taylor on 512 images.
    return FunctionalConfig(
        criterion=config.criterion,
        ratio=config.ratio,
        visualization=VisualizationConfig(steps=24, step_size=0.1),
        score_examples=min(512, config.score_examples),
        finetune=_finetune(config),
        seed=config.seed,
    )


class MethodSettings(NamedTuple):
    """A method's default criterion in the demo and its demo-sized config."""

    criterion: str
    config: Callable[[DemoConfig], Any]


# The demo's settings of every method (`jaxprune.methods.registry.METHODS`), in one table.
METHOD_SETTINGS: dict[str, MethodSettings] = {
    "oneshot": MethodSettings("l1", _oneshot),
    "iterative": MethodSettings("taylor", _iterative),
    "progressive": MethodSettings("oracle_loss", _progressive),
    "blending": MethodSettings("all", _blending),
    "functional": MethodSettings("taylor", _functional),
}
DEFAULT_CRITERIA = {method: settings.criterion for method, settings in METHOD_SETTINGS.items()}
METHODS = tuple(METHOD_SETTINGS)


def base_model_file(config: DemoConfig) -> Path | None:
    """The base model: the given file, None for the shipped one, or one trained into the
    workdir (resumable) when neither exists."""
    if config.base:
        path = Path(config.base)
        if not path.is_file():
            raise UsageError(f"--base {path} does not exist.")
        return path
    if ":" in config.model:  # FILE.py:NAME or package.module:NAME brings its own variables
        return None
    shipped = PRETRAINED / f"{config.model}_{config.dataset}.msgpack"
    if shipped.is_file():
        return None
    trained = Path(config.workdir) / "base.msgpack"
    if trained.is_file():
        return trained
    experiment = Path(__file__).parent.parent / "experiments" / f"base_{config.model}.py"
    if not experiment.is_file():
        raise UsageError(
            f"No base model for {config.model} on {config.dataset}: neither {shipped} nor a "
            f"training config {experiment}. Train one with `jaxprune train` and pass --base."
        )
    from jaxprune.commands.config import load_config

    print(f"no shipped base model: training one with {experiment} (resumable)")
    workdir = Path(config.workdir) / "base"
    result = train_job.train_and_evaluate(load_config(experiment), workdir)
    return train_job.export_latest(workdir, trained, meta={"result": result})


def demo_job(config: DemoConfig, base: Path | None = None) -> PruneJob:
    """The `jaxprune prune` job the demo runs (`config.criterion` already chosen)."""
    eval_examples = config.eval_examples or None
    settings = METHOD_SETTINGS[config.method].config(config)
    return dataclasses.replace(
        PruneJob(
            method=config.method,
            model=config.model,
            variables=str(base) if base is not None else "",
            data=data.DataConfig(
                name=config.dataset,
                seed=config.seed,
                train_examples=config.finetune_examples or None,
                validation_examples=eval_examples,
                test_examples=eval_examples,
            ),
        ),
        **{config.method: settings},
    )


def run(config: DemoConfig) -> dict[str, Any]:
    """Runs the demo and returns its results (also written to `workdir/results.json`)."""
    if config.method not in METHOD_SETTINGS:
        raise UsageError(f"method must be one of {METHODS}, got {config.method!r}.")
    if not config.criterion:
        config = dataclasses.replace(config, criterion=DEFAULT_CRITERIA[config.method])
    workdir = Path(config.workdir)
    job = demo_job(config, base_model_file(config))
    report = run_job(job, workdir, quiet=True, progress=config.progress)

    loaded = load_job_model(job)
    base_model, base_variables = loaded.model, loaded.variables
    small, small_variables, _ = load_pruned(
        workdir / PRUNED_FILE, base=(base_model, base_variables)
    )
    base_cost = _count(base_model, base_variables)
    pruned_cost = _count(small, small_variables)
    metrics = report["metrics"]
    rows = {
        "base": _row(base_model, base_variables, base_cost, metrics["base"], config.timing),
        "pruned": _row(small, small_variables, pruned_cost, metrics["pruned"], config.timing),
    }
    results = {
        "config": dataclasses.asdict(config),
        "results": rows,
        "layers": cost.compare(base_cost, pruned_cost),
    }
    write_json_atomic(workdir / "results.json", results)
    _print_table(config, rows, results["layers"])
    widths = report["widths"]
    fractions = summary_fractions(
        list(widths["before"]), widths["before"], widths["after"], base_cost, pruned_cost
    )
    figures = _plot(workdir / "summary.png", config, rows, fractions)
    print(f"\nwrote {workdir / 'results.json'}, " + " and ".join(str(p) for p in figures.values()))
    return results


def _count(model: Any, variables: Any) -> cost.CostReport:
    return cost.count(model.apply_fn, variables, model.example_input, **model.eval_kwargs)


def _row(
    model: Any, variables: Any, counted: cost.CostReport, metrics: dict[str, Any], timing: bool
) -> dict[str, float]:
    row = {
        "test_accuracy": metrics["test"]["accuracy"],
        "test_kappa": metrics["test"]["kappa"],
        "validation_accuracy": metrics["validation"]["accuracy"],
        "macs": counted.macs,
        "flops": counted.flops,
        "params": counted.params,
    }
    if timing:
        shape = model.example_input.shape[1:]
        x1 = jnp.zeros((1, *shape), jnp.float32)
        b128 = jax.random.normal(jax.random.key(0), (128, *shape))
        kwargs = model.eval_kwargs
        row["latency_b1_ms"] = 1e3 * cost.latency(model.apply_fn, variables, x1, **kwargs).median
        row["latency_b128_ms"] = (
            1e3 * cost.latency(model.apply_fn, variables, b128, **kwargs).median
        )
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
        if key not in base:
            continue
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
