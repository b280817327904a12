"""`jaxprune prune`: prune any model with any method, resuming from its workdir.

    jaxprune prune --method oneshot --oneshot.criterion fpgm --oneshot.ratio 0.5 \\
        --workdir workdirs/fpgm
    jaxprune prune --method iterative --model my_models.py:make_cnn --dataset cifar10 \\
        --iterative.target-flops 0.5 --workdir workdirs/mine
    jaxprune prune --config experiments/iterative_vgg16_birds.py --workdir workdirs/birds \\
        --set iterative.max_steps=10

The job is a `PruneJob`: the defaults, then a config file's ``get_config()``, then the flags,
then the ``--set`` overrides. Each method's flags are its config's fields, named
``--<method>.<field>`` (``--oneshot.ratio``, ``--iterative.target-flops``); nested settings
(optimizers, fine-tuning, clustering) are set with ``--set oneshot.finetune.epochs=2``.

Everything is checked before any data loads: the method, every value's type, the method's own
``check()``, the model, and the workdir. A workdir belongs to one run: the same command resumes
it (a finished run is reported again), other settings are refused with the changed ones named.

The workdir receives:

* ``result.json``: the job, the model, the kept channels per group and the widths, the cost
  (FLOPs, MACs, parameters) before and after, the base and pruned models' validation and test
  metrics, the method's own summary and history, and the devices;
* ``pruned.msgpack``: the run's final model (after the method's fine-tuning, when it has one),
  whose metrics are those of ``result.json``;
* ``<method>/``: the method's checkpoints.

Loading ``pruned.msgpack``: `load_pruned(path)` returns the pruned model (a `jaxprune.Model`)
and its variables for any model. By hand: a zoo model's file is
``module, variables, meta = jaxprune.checkpoint.load_model_file(path)``; your own model's file
holds the pruned variables and, in its metadata, the kept channels, so::

    graph = jp.channel_graph(module.apply, base_variables, x)
    pruned = jp.prune(base_variables, graph, meta["keep"])      # the pruned program
    variables = jaxprune.checkpoint.load_variables(path, pruned.variables)
    logits = pruned.apply_fn(variables, x)

(``jp.rebuild_linen(module, pruned)`` gives a linen module back.)
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from jaxprune import data
from jaxprune.commands.config import (
    FlagSpec,
    UsageError,
    add_config_flags,
    apply_overrides,
    load_config,
    overrides_from_flags,
)
from jaxprune.commands.model_spec import LoadedModel, add_model_arguments, load_model
from jaxprune.methods.blending import BlendingConfig
from jaxprune.methods.functional import FunctionalConfig
from jaxprune.methods.iterative import IterativeConfig
from jaxprune.methods.oneshot import OneShotConfig
from jaxprune.methods.progressive import ProgressiveConfig
from jaxprune.methods.registry import METHODS
from jaxprune.model import Model

PRUNED_FILE = "pruned.msgpack"
RESULT_FILE = "result.json"
# Settings that do not change a run's result (flattened names).
# The base variables count by their fingerprint (below), not by the path they were read from.
_COSMETIC = ("variables", "data.data_dir", "data.source_dir", "data.in_memory")
_COSMETIC_METHOD = ("checkpoint_every", "finetune.checkpoint_every")


@dataclasses.dataclass(frozen=True)
class PruneJob:
    """What `jaxprune prune` runs."""

    # The method, a key of `jaxprune.methods.registry.METHODS`: oneshot (the baselines),
    # iterative (Molchanov et al. 2017), progressive (Osaku et al. 2021), blending (He et al.
    # 2021) or functional (Qin et al. 2019).
    method: str = "oneshot"
    # The model: a zoo name, FILE.py:NAME or package.module:NAME (see `commands.model_spec`).
    model: str = "vgg_small"
    # Its trained variables: a model file or an orbax checkpoint; "": the zoo model's shipped
    # ones, or those your NAME() returns.
    variables: str = ""
    # The data: its train split trains, its validation split makes every choice, its test
    # split is only reported. Each method batches it with its own batch size.
    data: data.DataConfig = dataclasses.field(default_factory=data.DataConfig)
    # The settings of each method; only the one of `method` is used.
    oneshot: OneShotConfig = dataclasses.field(default_factory=OneShotConfig)
    iterative: IterativeConfig = dataclasses.field(default_factory=IterativeConfig)
    progressive: ProgressiveConfig = dataclasses.field(default_factory=ProgressiveConfig)
    blending: BlendingConfig = dataclasses.field(default_factory=BlendingConfig)
    functional: FunctionalConfig = dataclasses.field(default_factory=FunctionalConfig)

    def method_config(self) -> Any:
        """The config of the job's method."""
        return getattr(self, self.method)

    def to_dict(self) -> dict[str, Any]:
        """The part of the job that runs (its method's config only), as JSON values; loading
        it back with its method's config gives the same run."""
        return _plain(
            {
                "method": self.method,
                "model": self.model,
                "variables": self.variables,
                "data": dataclasses.asdict(self.data),
                self.method: dataclasses.asdict(self.method_config()),
            }
        )


def _plain(value: Any) -> Any:
    from jaxprune.checkpoint import json_default

    return json.loads(json.dumps(value, default=json_default))


# ---------------------------------------------------------------------------------------------
# Checking a job (everything before any data is read)


def check_job(job: PruneJob, *, wait_for_selection: bool = False) -> None:
    """Raises `UsageError` naming the first bad setting of `job` (cheap: no model, no data)."""
    if job.method not in METHODS:
        raise UsageError(f"method {job.method!r} is unknown; choose one of {', '.join(METHODS)}.")
    config = job.method_config()
    if not isinstance(config, METHODS[job.method].config):
        raise UsageError(
            f"the job's {job.method} field holds a {type(config).__name__}, not a "
            f"{METHODS[job.method].config.__name__}."
        )
    check = getattr(config, "check", None)
    if check is not None:
        try:
            check()
        except UsageError:
            raise
        except ValueError as error:
            raise UsageError(f"{job.method}: {error}") from error
    if (
        job.method == "progressive"
        and config.criterion == "subjective"
        and not config.selection
        and not wait_for_selection
    ):
        raise UsageError(
            "the subjective criterion needs a person's choice: pass --progressive.selection "
            "FILE (a selection exported from the kernel page of `jaxprune inspect`) or "
            "--wait-for-selection to be asked layer by layer."
        )
    if job.data.name not in data.DATASETS:
        raise UsageError(
            f"data.name={job.data.name!r} is unknown; datasets: {', '.join(data.DATASETS)}."
        )


def input_shape_of(config: data.DataConfig) -> tuple[tuple[int, ...], int]:
    """(one example's shape, classes) of the data a job reads, known before reading it."""
    from jaxprune.commands.shapes import data_shape

    shape, classes = data_shape(config.name)
    if config.image_size:
        shape = (int(config.image_size), int(config.image_size), shape[-1])
    return shape, classes


def load_job_model(job: PruneJob) -> LoadedModel:
    """The job's model and trained variables (`UsageError` when they cannot be had)."""
    shape, classes = input_shape_of(job.data)
    return load_model(
        job.model,
        input_shape=shape,
        num_classes=classes,
        dataset=job.data.name,
        variables_path=job.variables or None,
        need_trained=True,
    )


def job_identity(job: PruneJob, loaded: LoadedModel) -> dict[str, Any]:
    """What makes a run what it is: its settings (not cosmetic ones) and its base variables."""
    from jaxprune.run import config_identity, fingerprint

    cosmetic = {*_COSMETIC, *(f"{job.method}.{name}" for name in _COSMETIC_METHOD)}
    settings = config_identity(job.to_dict(), cosmetic)
    return {**settings, "base_variables": fingerprint(loaded.variables)}


# ---------------------------------------------------------------------------------------------
# Running a job


def run_job(
    job: PruneJob,
    workdir: str | Path,
    *,
    progress: bool = True,
    wait_for_selection: bool = False,
    quiet: bool = False,
) -> dict[str, Any]:
    """Runs a job in `workdir` and returns its report (also ``workdir/result.json``).

    Args:
      job: the job.
      workdir: the run's folder; the same job there resumes (a finished one is reported
        again), another is refused.
      progress: progress bars.
      wait_for_selection: progressive method, subjective criterion: write each layer's kernel
        page into ``workdir/selection`` and wait for the person's choice there.
      quiet: do not print the summary.

    Returns:
      The report (see the module docstring).

    Raises:
      UsageError: a bad job, model or dataset (before any data is read).
      jaxprune.run.RunMismatchError: the workdir holds another run (the changes are named).
      jaxprune.run.RunLockedError: another process has the workdir.
    """
    from jaxprune.run import RunDir
    from jaxprune.runtime import is_main_process

    # In a multi-process run only the first process prints and shows progress.
    quiet, progress = quiet or not is_main_process(), progress and is_main_process()
    started = time.perf_counter()
    check_job(job, wait_for_selection=wait_for_selection)
    loaded = load_job_model(job)
    workdir = Path(workdir)
    with RunDir.open(workdir, kind="prune", identity=job_identity(job, loaded)) as run:
        report = _finished(run) if run.resumed else None
        if report is None:
            report = _run(job, loaded, run, progress, wait_for_selection, started)
    if not quiet:
        print_report(report)
        print(f"\nwrote {workdir / PRUNED_FILE} and {workdir / RESULT_FILE}")
    return report


def _finished(run: Any) -> dict[str, Any] | None:
    """The report of a finished run, when its pruned model file is the one it describes."""
    from jaxprune.checkpoint import CheckpointError

    try:
        report = run.read_json(RESULT_FILE)
    except CheckpointError:
        return None  # damaged: the run is finished again (the method resumes)
    path = run.path / PRUNED_FILE
    if not isinstance(report, Mapping) or not path.is_file():
        return None
    if report.get("pruned_file", {}).get("sha256") != _sha256(path):
        return None
    return dict(report)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _run(
    job: PruneJob,
    loaded: LoadedModel,
    run: Any,
    progress: bool,
    wait_for_selection: bool,
    started: float,
) -> dict[str, Any]:
    import jax

    from jaxprune.methods.contract import DatasetData
    from jaxprune.runtime import sync_processes

    spec = METHODS[job.method]
    config = job.method_config()
    dataset = data.load(job.data)
    prune_data = DatasetData(
        dataset, spec.batch_size(config, job.data.batch_size), seed=getattr(config, "seed", 0)
    )
    extra = {}
    if job.method == "progressive" and wait_for_selection:
        extra["choose"] = _waiting_chooser(run.path / "selection", config)
    began = time.perf_counter()
    result = spec.prune(
        loaded.model,
        loaded.variables,
        prune_data,
        config,
        workdir=str(run.path / job.method),
        progress=progress,
        **extra,
    )
    method_s = time.perf_counter() - began
    path = save_pruned(run.path / PRUNED_FILE, job, loaded, result, dataset)
    sync_processes("jaxprune-pruned-file")  # the first process wrote it; all read it back
    # The pruned model is measured as read back from its file: the file and its numbers agree.
    pruned_model, pruned_variables, _ = load_pruned(path, base=(loaded.model, loaded.variables))
    batch_size = job.data.batch_size
    keep = {group: [int(i) for i in kept] for group, kept in result.keep.items()}
    sizes = {group.name: group.size for group in result.graph.groups}
    after = {name: len(keep[name]) if name in keep else size for name, size in sizes.items()}
    report = {
        "job": job.to_dict(),
        "model": {
            "spec": loaded.label,
            "zoo": loaded.zoo,
            "variables": job.variables or ("shipped" if loaded.zoo else "returned by the model"),
        },
        "method": {"name": job.method, "description": spec.description},
        "keep": keep,
        "widths": {"before": sizes, "after": after},
        "cost": _cost(loaded.model, loaded.variables, pruned_model, pruned_variables),
        "metrics": {
            "base": _metrics(loaded.model, loaded.variables, dataset, batch_size),
            "pruned": _metrics(pruned_model, pruned_variables, dataset, batch_size),
        },
        "summary": _plain(dict(result.summary)),
        "history": _plain(list(result.history)),
        "pruned_file": {"path": PRUNED_FILE, "sha256": _sha256(path)},
        "seconds": {"method": method_s, "total": time.perf_counter() - started},
        "jax": jax.__version__,
        "devices": [str(device) for device in jax.devices()],
        "processes": jax.process_count(),
    }
    run.write_json(RESULT_FILE, report)
    return _plain(report)


def _waiting_chooser(folder: Path, config: ProgressiveConfig) -> Any:
    """The subjective criterion's hand-off: each layer's kernel page, then wait for a file."""
    from jaxprune.inspect.page import (
        PageConfig,
        page_file_name,
        selection_file_names,
        write_kernel_page,
    )
    from jaxprune.methods.progressive_choice import SelectionPage, waiting_chooser

    def write(path: Path, view: Any, save_to: Path) -> Path:
        return write_kernel_page(
            path,
            view.model.apply_fn,
            view.variables,
            view.graph,
            view.group,
            view.images,
            scores=view.objective_scores(),
            title=f"{view.group}: choose the kernels to remove",
            config=PageConfig(
                save_to=str(save_to),
                count=view.count,
                model_fingerprint=view.fingerprint,
            ),
        )

    page = SelectionPage(write, page_file_name, selection_file_names)
    return waiting_chooser(folder, page)


def save_pruned(path: Path, job: PruneJob, loaded: LoadedModel, result: Any, dataset: Any) -> Path:
    """Writes the run's final model: a zoo model file, or your model's pruned variables with
    the kept channels (and how to rebuild the base) in the metadata."""
    from jaxprune import checkpoint
    from jaxprune.widths import widths_from_params

    shape, classes = input_shape_of(job.data)
    meta = {
        "method": job.method,
        "criterion": getattr(job.method_config(), "criterion", None),
        "model": loaded.label,
        "variables": job.variables,
        "dataset": job.data.name,
        "input_shape": list(shape),
        "num_classes": classes,
        "keep": {group: [int(i) for i in kept] for group, kept in result.keep.items()},
    }
    if loaded.zoo is not None:
        return checkpoint.save_model_file(
            path,
            model_name=loaded.zoo,
            num_classes=dataset.num_classes,
            widths=widths_from_params(result.variables["params"]),
            variables=result.variables,
            input_shape=tuple(dataset.image_shape),
            meta=meta,
        )
    return checkpoint.save_model_file(path, model_name=None, variables=result.variables, meta=meta)


def load_pruned(
    path: str | Path, *, base: tuple[Model, Any] | None = None
) -> tuple[Model, Any, dict[str, Any]]:
    """The pruned model of a ``pruned.msgpack`` that `jaxprune prune` wrote.

    Args:
      path: the file.
      base: your model and its base variables (as pruned), for a file of your own model;
        default: loaded again from the ``--model`` and ``--variables`` the file names.

    Returns:
      ``(model, variables, meta)``: a zoo model is its linen module at the pruned widths; your
      own model runs as the pruned program of the base model (`jaxprune.prune`).
    """
    import jax
    import jax.numpy as jnp

    from jaxprune import checkpoint
    from jaxprune.graph import channel_graph
    from jaxprune.surgery import prune

    path = Path(path)
    header = checkpoint.read_model_file_header(path)
    meta = dict(header["meta"])
    if header.get("model_name") is not None:
        module, variables, meta = checkpoint.load_model_file(path)
        example = jax.ShapeDtypeStruct((1, *header["input_shape"]), jnp.float32)
        return Model.linen(module, example, variables=variables), variables, meta
    if base is None:
        loaded = load_model(
            meta["model"],
            input_shape=tuple(meta["input_shape"]),
            num_classes=int(meta["num_classes"]),
            dataset=meta["dataset"],
            variables_path=meta.get("variables") or None,
        )
        base = (loaded.model, loaded.variables)
    model, base_variables = base
    graph = channel_graph(model.apply_fn, base_variables, model.example_input, **model.eval_kwargs)
    pruned = prune(base_variables, graph, meta["keep"], verify=False)
    variables = checkpoint.load_variables(path, pruned.variables)
    return model.with_apply_fn(pruned.apply_fn), variables, meta


def _cost(model: Model, variables: Any, pruned: Model, pruned_variables: Any) -> dict[str, Any]:
    from jaxprune import cost

    def count(m: Model, v: Any) -> dict[str, float]:
        report = cost.count(m.apply_fn, v, model.example_input, **m.eval_kwargs)
        return {"flops": report.flops, "macs": report.macs, "params": report.params}

    before, after = count(model, variables), count(pruned, pruned_variables)
    remaining = {key: after[key] / before[key] if before[key] else 1.0 for key in before}
    return {"before": before, "after": after, "remaining": remaining}


def _metrics(model: Model, variables: Any, dataset: Any, batch_size: int) -> dict[str, Any]:
    """Loss, accuracy and kappa on the validation split and (for the report only) the test
    split."""
    from jaxprune import train

    return {
        split: train.evaluate(
            model, variables, data.preprocessed_batches(dataset, split, batch_size)
        )
        for split in ("validation", "test")
    }


def print_report(report: Mapping[str, Any]) -> None:
    """The summary: cost and metrics of the base and the pruned model side by side."""
    job = report["job"]
    config = job[job["method"]]
    criterion = config.get("criterion")
    print(
        f"\n{report['model']['spec']} on {job['data']['name']}, pruned by {job['method']}"
        + (f" / {criterion}" if criterion else "")
    )
    print(f"{'':<22}{'base':>13}{'pruned':>13}{'left':>9}")
    cost = report["cost"]
    for key, label in (("flops", "FLOPs"), ("macs", "MACs"), ("params", "parameters")):
        before, after = cost["before"][key], cost["after"][key]
        print(
            f"{label:<22}{before / 1e6:>12.3f}M{after / 1e6:>12.3f}M"
            f"{100 * cost['remaining'][key]:>8.1f}%"
        )
    base, pruned = report["metrics"]["base"], report["metrics"]["pruned"]
    for split in ("validation", "test"):
        print(
            f"{split + ' accuracy':<22}{100 * base[split]['accuracy']:>12.2f}%"
            f"{100 * pruned[split]['accuracy']:>12.2f}%"
        )
        print(f"{split + ' loss':<22}{base[split]['loss']:>13.4f}{pruned[split]['loss']:>13.4f}")
    before, after = report["widths"]["before"], report["widths"]["after"]
    kept = ", ".join(f"{g} {after[g]}/{before[g]}" for g in before if after[g] != before[g])
    print(f"kernels kept: {kept or 'all'}")


# ---------------------------------------------------------------------------------------------
# Command line


class _Prefixed:
    """An argparse group whose options are named ``--<prefix>.<name>``."""

    def __init__(self, group: Any, prefix: str) -> None:
        self.group, self.prefix = group, prefix

    def add_argument(self, *names: str, **kwargs: Any) -> Any:
        return self.group.add_argument(
            *(f"--{self.prefix}.{name.removeprefix('--')}" for name in names), **kwargs
        )


def _nested_fields(cls: type) -> list[str]:
    """Names of a config's fields that hold further settings (set with ``--set``)."""
    import typing

    hints = typing.get_type_hints(cls)
    return [
        field.name
        for field in dataclasses.fields(cls)
        if any(
            dataclasses.is_dataclass(arg)
            for arg in (hints[field.name], *typing.get_args(hints[field.name]))
        )
        or typing.get_origin(hints[field.name]) in (Mapping, dict)
        or hints[field.name] in (Mapping, dict)
    ]


def add_command(subparsers: Any) -> argparse.ArgumentParser:
    """Adds the ``prune`` subcommand to the `jaxprune` command's subparsers.

    Returns:
      The ``prune`` parser (its handler is ``args.func``).
    """
    parser = subparsers.add_parser(
        "prune",
        help="prune any model with any method (oneshot, iterative, progressive, blending, "
        "functional); resumes its workdir",
        description=__doc__.split("\n\n")[0],
        epilog="Each method's flags are its config's fields; nested settings with --set, e.g. "
        "--set oneshot.finetune.epochs=2 --set iterative.optimizer.learning_rate=0.01.",
    )
    parser.add_argument("--workdir", required=True, help="the run's folder (resumed when rerun)")
    methods = "; ".join(f"{name}: {spec.description}" for name, spec in METHODS.items())
    parser.add_argument(
        "--method",
        choices=tuple(METHODS),
        help=f"the method (default: {PruneJob().method}). {methods}",
    )
    parser.add_argument("--config", help="a config file whose get_config() returns a PruneJob")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set any PruneJob field, e.g. --set oneshot.ratio=0.3 --set data.train_examples=5000",
    )
    parser.add_argument(
        "--no-progress", action="store_true", help="no progress bars (e.g. in log files)"
    )
    parser.add_argument(
        "--wait-for-selection",
        action="store_true",
        help="progressive method, subjective criterion: write each layer's kernel page into "
        "WORKDIR/selection and wait for the choice saved there",
    )
    model_group = parser.add_argument_group("model and data")
    add_model_arguments(model_group)
    defaults = PruneJob()
    parser.set_defaults(model=None, dataset=None)
    for action in model_group._group_actions:
        shown = {"model": defaults.model, "dataset": defaults.data.name}.get(action.dest)
        if shown is not None:
            action.help = f"{action.help} (default: {shown})"
    specs: dict[str, list[FlagSpec]] = {}
    for name, spec in METHODS.items():
        nested = _nested_fields(spec.config)
        description = spec.description + (
            f". Also with --set {name}.FIELD[.SUBFIELD]=VALUE: {', '.join(nested)}."
            if nested
            else "."
        )
        group = parser.add_argument_group(f"--method {name}", description)
        specs[name] = add_config_flags(_Prefixed(group, name), spec.config, prefix=f"{name}.")
    parser.set_defaults(func=cmd_prune, config_flags=specs)
    return parser


def job_from_args(args: argparse.Namespace) -> PruneJob:
    """The job a command line describes: defaults < config file < flags < --set.

    Raises:
      UsageError: a config file that gives no PruneJob, or a value of the wrong type.
    """
    job = load_config(args.config) if args.config else PruneJob()
    if not isinstance(job, PruneJob):
        raise UsageError(
            f"{args.config}'s get_config() returns a {type(job).__name__}, not a PruneJob."
        )
    overrides = [
        f"{field}={value!r}"
        for field, value in (
            ("method", args.method),
            ("model", args.model),
            ("variables", args.variables),
            ("data.name", args.dataset),
        )
        if value is not None
    ]
    for name, specs in args.config_flags.items():
        overrides += overrides_from_flags(args, specs, f"{name}.")
    return apply_overrides(job, overrides + list(args.set))


def cmd_prune(args: argparse.Namespace) -> int:
    """Runs ``jaxprune prune``."""
    job = job_from_args(args)
    run_job(
        job,
        args.workdir,
        progress=not args.no_progress,
        wait_for_selection=args.wait_for_selection,
    )
    return 0
