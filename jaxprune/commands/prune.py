"""`jaxprune prune`: prune a trained model file, iteratively or with a one-shot baseline.

    jaxprune prune --method iterative --criterion taylor --target-flops 0.5 \\
        --channels-per-step 8 --model-file jaxprune/pretrained/vgg_small_fashion_mnist.msgpack \\
        --workdir workdirs/iterative_taylor
    jaxprune prune --method oneshot --criterion l1 --ratio 0.5 --workdir workdirs/oneshot_l1
    jaxprune prune --config experiments/iterative_vgg16_birds.py --workdir workdirs/birds \\
        --set iterative.max_steps=10

The job is a `PruneJob`: the defaults, then a config file's `get_config()`, then the flags, then
the ``--set`` overrides. The workdir receives the checkpoints (an interrupted iterative run
resumes when the same command is run again), ``pruned.msgpack`` (the pruned model, loadable with
`jaxprune.checkpoint.load_model_file`) and ``result.json`` (summary and per-step history).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

import jax.numpy as jnp

from jaxprune import checkpoint, data, train
from jaxprune.commands import reporting, run_blending, run_functional, run_progressive
from jaxprune.fit import FitConfig
from jaxprune.methods.blending import BlendingConfig
from jaxprune.methods.contract import DatasetData
from jaxprune.methods.functional import FunctionalConfig
from jaxprune.methods.iterative import IterativeConfig, iterative_prune
from jaxprune.methods.oneshot import OneShotConfig, oneshot_prune
from jaxprune.methods.progressive import ProgressiveConfig
from jaxprune.methods.selection import Selection, select_groups
from jaxprune.model import Model
from jaxprune.models import MODELS, build_model, widths_from_params

# The methods whose runner module has `FLAGS` and `run(config, name, model, variables, dataset,
# workdir, progress=...)`; the job's field of the method's name holds its config.
RUNNERS: dict[str, Any] = {
    "progressive": run_progressive,
    "blending": run_blending,
    "functional": run_functional,
}
METHODS = ("iterative", "oneshot", *RUNNERS)
PRETRAINED = Path(__file__).resolve().parent.parent / "pretrained"


@dataclasses.dataclass(frozen=True)
class OneShotJob:
    """A one-shot baseline: score once on validation images, remove, optionally fine-tune."""

    # Relevance criterion by registry name (see `jaxprune.criteria.CRITERIA`).
    criterion: str = "l1"
    # How many channels go, from which groups, ranked per layer or globally (a global ranking
    # compares L2-normalised scores).
    selection: Selection = dataclasses.field(default_factory=Selection)
    # Validation images the criterion reads.
    score_examples: int = 1024
    # Batch size of scoring and evaluation.
    batch_size: int = 128
    # Epochs of fine-tuning of the pruned model (SGD, momentum 0.9, cosine); 0: none.
    finetune_epochs: int = 0
    # Peak learning rate of that fine-tuning.
    finetune_lr: float = 0.01
    # Seed of the random criterion and of the fine-tuning.
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class PruneJob:
    """What `jaxprune prune` runs."""

    # "iterative" (Molchanov et al. 2017), "oneshot" (the baselines), "progressive" (Osaku et
    # al. 2021), "blending" (He et al. 2021) or "functional" (Qin et al. 2019).
    method: str = "iterative"
    # The trained model (`checkpoint.save_model_file`); "": the shipped base of `model` on
    # `data.name` (jaxprune/pretrained/<model>_<dataset>.msgpack).
    model_file: str = ""
    # Zoo model name, used only to find the shipped base when `model_file` is empty.
    model: str = "vgg_small"
    # The dataset (its batch_size is not used: each method has its own).
    data: data.DataConfig = dataclasses.field(default_factory=data.DataConfig)
    # The iterative method's settings (criterion, k, u, targets, fine-tuning).
    iterative: IterativeConfig = dataclasses.field(default_factory=IterativeConfig)
    # The one-shot baseline's settings.
    oneshot: OneShotJob = dataclasses.field(default_factory=OneShotJob)
    # Osaku et al. 2021: layer by layer, objective/subjective criterion, progressive retraining.
    progressive: ProgressiveConfig = dataclasses.field(default_factory=ProgressiveConfig)
    # He et al. 2021: a blend of criteria, its calibration factors found by evolutionary search.
    blending: BlendingConfig = dataclasses.field(default_factory=BlendingConfig)
    # Qin et al. 2019: remove filters whose functionality (activation-maximisation image)
    # repeats another's, keeping one per cluster.
    functional: FunctionalConfig = dataclasses.field(default_factory=FunctionalConfig)

    def to_dict(self) -> dict[str, Any]:
        """The job as JSON-compatible nested dicts."""
        return json.loads(json.dumps(dataclasses.asdict(self)))


def zoo_name(model: Any) -> str:
    """The zoo name of a linen module loaded from a model file (e.g. "vgg_small").

    Raises:
      ValueError: the module is no zoo model.
    """
    num_classes = getattr(model, "num_classes", None)
    widths = model.full_widths() if hasattr(model, "full_widths") else None
    for name in MODELS if num_classes is not None else ():
        try:
            if build_model(name, num_classes, widths) == model:
                return name
        except (ValueError, TypeError):
            continue
    raise ValueError(
        f"{type(model).__name__} is not a zoo model ({', '.join(MODELS)}); prune your own model "
        "from Python with jaxprune.methods.iterative.iterative_prune(config, rebuild, ...)."
    )


def model_file(job: PruneJob) -> Path:
    """The base model file of a job: the given one, or the shipped one."""
    shipped_file = PRETRAINED / f"{job.model}_{job.data.name}.msgpack"
    path = Path(job.model_file) if job.model_file else shipped_file
    if not path.is_file():
        shipped = sorted(p.name for p in PRETRAINED.glob("*.msgpack"))
        raise FileNotFoundError(
            f"No model file {path}. Pass --model-file (a file written by `jaxprune train "
            f"--export` or checkpoint.save_model_file); shipped base models: {shipped}."
        )
    return path


def run_job(job: PruneJob, workdir: str | Path, *, progress: bool = True) -> dict[str, Any]:
    """Runs a job; writes ``pruned.msgpack`` and ``result.json`` into `workdir`.

    Args:
      job: the job.
      workdir: the run's folder (checkpoints, results); rerunning resumes.
      progress: show progress bars.

    Returns:
      The report written to ``result.json``: the job, the summary (base and final cost,
      validation and test metrics, timings) and, for the iterative method, the history.

    Raises:
      ValueError: an unknown method, or a model file that holds no zoo model.
    """
    if job.method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {job.method!r}.")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    path = model_file(job)
    model, variables, _ = checkpoint.load_model_file(path)
    name = zoo_name(model)
    dataset = data.load(job.data)
    if job.method == "iterative":
        report = _run_iterative(job, name, variables, dataset, workdir)
    elif job.method == "oneshot":
        report = _run_oneshot(job, name, model, variables, dataset, workdir, progress)
    else:
        config = getattr(job, job.method)
        runner = RUNNERS[job.method]
        report = runner.run(config, name, model, variables, dataset, workdir, progress=progress)
    report = {"job": job.to_dict(), "model": name, "model_file": str(path), **report}
    (workdir / "result.json").write_text(
        json.dumps(report, indent=1, default=reporting.json_default)
    )
    _print_report(report)
    return report


def _run_iterative(job: PruneJob, name: str, variables: Any, dataset: Any, workdir: Path):
    result = iterative_prune(job.iterative, name, variables, dataset, workdir=workdir)
    reporting.save_pruned(
        workdir / "pruned.msgpack",
        model_name=name,
        dataset=dataset,
        widths=result.widths,
        variables=result.variables,
        method="iterative",
        criterion=job.iterative.criterion,
        keep=result.keep,
        summary=reporting.plain_json(result.summary),
    )
    return {
        "widths": result.widths,
        "keep": reporting.keep_lists(result.keep),
        "summary": result.summary,
        "history": result.history,
    }


def _run_oneshot(
    job: PruneJob, name: str, module: Any, variables: Any, dataset: Any, workdir: Path, progress
):
    settings = job.oneshot
    selection = settings.selection
    x = jnp.zeros((1, *dataset.image_shape), jnp.float32)
    model = Model.linen(module, x, variables=variables)
    finetune = None
    if settings.finetune_epochs > 0:
        finetune = FitConfig(
            epochs=settings.finetune_epochs,
            optimizer=train.OptimizerConfig(
                name="sgd",
                learning_rate=settings.finetune_lr,
                momentum=0.9,
                schedule="cosine",
                weight_decay=5e-4,
            ),
            seed=settings.seed,
        )
    config = OneShotConfig(
        criterion=settings.criterion,
        ratio=selection.ratio,
        scope=selection.scope,
        ranking=selection.ranking,
        min_channels=selection.min_channels,
        score_batches=max(1, -(-settings.score_examples // settings.batch_size)),
        finetune=finetune,
        seed=settings.seed,
    )
    data_source = DatasetData(dataset, settings.batch_size, seed=settings.seed)
    result = oneshot_prune(
        model, variables, data_source, config, workdir=workdir / "oneshot", progress=progress
    )
    widths = widths_from_params(result.variables["params"])
    graph = result.graph
    summary, _ = reporting.pruned_summary(
        (module.apply, variables),
        (result.apply_fn, result.variables),
        dataset,
        batch_size=settings.batch_size,
        channels_remaining=reporting.channels_remaining(
            graph, select_groups(graph, selection.scope), reporting.keep_lists(result.keep)
        ),
    )
    # The pruned model file is the run's final model (fine-tuned, when asked), with its metrics.
    reporting.save_pruned(
        workdir / "pruned.msgpack",
        model_name=name,
        dataset=dataset,
        widths=widths,
        variables=result.variables,
        method="oneshot",
        criterion=settings.criterion,
        keep=result.keep,
        summary=reporting.plain_json(summary),
    )
    return {"widths": widths, "keep": reporting.keep_lists(result.keep), "summary": summary}


def _print_report(report: dict[str, Any]) -> None:
    summary = report["summary"]
    base, final = summary["base"], summary["final"]
    job = report["job"]
    criterion = job[report["job"]["method"]]["criterion"]
    print(f"\n{report['model']} pruned by {job['method']} / {criterion}")
    print(f"{'':<22}{'base':>14}{'pruned':>14}{'left':>9}")
    for key, label in (("flops", "FLOPs"), ("macs", "MACs"), ("params", "parameters")):
        print(
            f"{label:<22}{base[key] / 1e6:>13.3f}M{final[key] / 1e6:>13.3f}M"
            f"{100 * final[key] / base[key]:>8.1f}%"
        )
    for split in ("validation", "test"):
        if summary.get(split):
            print(f"{split + ' accuracy':<22}{'':>14}{100 * summary[split]['accuracy']:>13.2f}%")
    if "pruning_steps" in summary:
        seconds = summary["time"]
        print(
            f"{summary['pruning_steps']} pruning steps, {summary['updates']} updates, stopped "
            f"by {summary['stop_reason']}; {seconds.get('step_s', 0.0):.1f} s in pruning steps, "
            f"of which {seconds.get('compile_s', 0.0):.1f} s compiling"
        )


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

# flag -> (type, help, config paths it sets)
_FLAGS: dict[str, tuple[Any, str, tuple[str, ...]]] = {
    "model_file": (str, "the trained model file (default: the shipped base)", ("model_file",)),
    "model": (str, "zoo model whose shipped base to prune (default vgg_small)", ("model",)),
    "dataset": (str, "dataset name (default fashion_mnist)", ("data.name",)),
    "train_examples": (int, "fine-tune on a fixed subset of this many images", ()),
    "target_flops": (float, "stop at this fraction of the FLOPs", ("iterative.target_flops",)),
    "target_macs": (float, "stop at this fraction of the MACs", ("iterative.target_macs",)),
    "target_params": (float, "stop at this fraction of the parameters", ()),
    "target_channels": (float, "stop at this fraction of the channels", ()),
    "min_accuracy": (float, "stop before validation accuracy falls below this", ()),
    "max_steps": (int, "stop after this many pruning steps", ()),
    "channels_per_step": (int, "channels removed per pruning step (k; the paper: 1)", ()),
    "updates_per_step": (int, "fine-tuning updates between pruning steps (u)", ()),
    "score_updates": (int, "criterion reads only the last this-many updates' batches", ()),
    "batch_size": (int, "fine-tuning batch size", ()),
    "learning_rate": (float, "fine-tuning learning rate", ("iterative.optimizer.learning_rate",)),
    "weight_decay": (float, "fine-tuning weight decay", ("iterative.optimizer.weight_decay",)),
    "shrink_every": (int, "physical shrink every this many steps (0: at the end)", ()),
    "final_updates": (int, "fine-tuning updates after pruning", ()),
    "flops_regularization": (float, "FLOPs regularisation strength lambda", ()),
    "eval_examples": (int, "validation images per evaluation (default: all)", ()),
    "scope": (str, "'conv' or 'all' (dense layers too)", ()),
    "seed": (int, "seed of data order, dropout and the random criterion", ()),
    "ratio": (
        float,
        "one-shot: fraction of channels removed; progressive: of each layer's",
        ("oneshot.selection.ratio", "progressive.ratio"),
    ),
    "ranking": (str, "one-shot: 'per_layer' or 'global'", ("oneshot.selection.ranking",)),
    "score_examples": (int, "one-shot: validation images scored", ("oneshot.score_examples",)),
    "finetune_epochs": (int, "one-shot: fine-tuning epochs", ("oneshot.finetune_epochs",)),
}
# Flags whose config paths follow from their names.
_DEFAULT_PATHS = {
    "train_examples": ("data.train_examples",),
    "scope": ("iterative.scope", "oneshot.selection.scope"),
    "seed": ("iterative.seed", "oneshot.seed"),
}


def _paths(flag: str) -> tuple[str, ...]:
    paths = _FLAGS[flag][2] or _DEFAULT_PATHS.get(flag)
    return paths or (f"iterative.{flag}",)


def _all_flags() -> dict[str, tuple[Any, str, tuple[str, ...]]]:
    """Every flag of the command: ours, and each runner's (a shared name sets every path)."""
    flags = {name: (kind, text, _paths(name)) for name, (kind, text, _) in _FLAGS.items()}
    for runner in RUNNERS.values():
        for name, (kind, text, paths) in runner.FLAGS.items():
            if name in flags:
                known_kind, known_text, known_paths = flags[name]
                if known_kind is not kind:
                    raise TypeError(f"--{name} is a {known_kind} and a {kind} in two methods.")
                flags[name] = (kind, known_text, known_paths + tuple(paths))
            else:
                flags[name] = (kind, text, tuple(paths))
    return flags


def add_command(subparsers: Any) -> argparse.ArgumentParser:
    """Adds the ``prune`` subcommand to the `jaxprune` command's subparsers.

    Args:
      subparsers: what ``parser.add_subparsers()`` returned.

    Returns:
      The ``prune`` parser.
    """
    parser = subparsers.add_parser(
        "prune",
        help="prune a trained model (iterative Molchanov 2017 or one-shot); resumes its workdir",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("--workdir", required=True, help="checkpoints and results go here")
    parser.add_argument("--method", choices=METHODS, help="default: iterative")
    parser.add_argument("--criterion", help="relevance criterion (see jaxprune.criteria)")
    parser.add_argument("--config", help="a config file whose get_config() returns a PruneJob")
    parser.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a PruneJob field, e.g. --set iterative.eval_examples=1000",
    )
    for flag, (kind, help_text, _) in _all_flags().items():
        name = "--" + flag.replace("_", "-")
        if kind is bool:
            parser.add_argument(name, action="store_true", default=None, help=help_text)
        else:
            parser.add_argument(name, type=kind, help=help_text)
    parser.add_argument(
        "--no-progress", action="store_true", help="no progress bar (e.g. in log files)"
    )
    parser.set_defaults(func=cmd_prune)
    return parser


def job_from_args(args: argparse.Namespace) -> PruneJob:
    """The job a command line describes: defaults < config file < flags < --set."""
    from jaxprune.commands.config import apply_overrides, load_config

    job = load_config(args.config) if args.config else PruneJob()
    if not isinstance(job, PruneJob):
        raise SystemExit(
            f"error: {args.config}'s get_config() returns a {type(job).__name__}, not a PruneJob."
        )
    overrides = []
    if args.method:
        overrides.append(f"method={args.method!r}")
    method = args.method or job.method
    if args.criterion:
        overrides.append(f"{method}.criterion={args.criterion!r}")
    for flag, (_, _, paths) in _all_flags().items():
        value = getattr(args, flag)
        if value is not None:
            overrides += [f"{path}={value!r}" for path in paths]
    overrides.append(f"iterative.progress={not args.no_progress!r}")
    return apply_overrides(job, overrides + list(args.set or []))


def cmd_prune(args: argparse.Namespace) -> int:
    """Runs ``jaxprune prune``."""
    job = job_from_args(args)
    run_job(job, args.workdir, progress=not args.no_progress)
    print(
        f"\nwrote {Path(args.workdir) / 'pruned.msgpack'} and {Path(args.workdir) / 'result.json'}"
    )
    return 0
