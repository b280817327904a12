"""Every jaxprune benchmark in one run, beside its PyTorch / Torch-Pruning peer: one table.

Command (70 s on the idle 2-core CPU; ``--quick``: a smoke run of about 15 s):

    python -m experiments.bench            # or: make bench
    # prints the table, writes experiments/results/bench/bench.{md,json}

Rows, all measured in the same process so every ratio shares one machine state:

* train step (forward, cross-entropy, backward, SGD momentum) at batch 128, LeNet-5, VGG-small
  and ResNet-20: ``jaxprune.train.train_step`` on the zoo model with ``conv_impl="auto"``, and
  the variants ``gemm`` (``conv_impl="gemm"``) and ``no-ynn`` (compiled with
  `jaxprune.ops.cpu_compiler_options`), against the PyTorch twin (channels_last, denormals
  flushed like XLA:CPU does); the runners take turns so the load is
  shared alike;
* inference throughput at batch 1 and 128, same models (eval mode);
* the exact oracle (`removal_losses`, the shared-prefix "auto" mode, every group of VGG-small,
  128 images) against one compiled masked forward pass per channel (timed on a sample of
  channels and multiplied out), and the Taylor pass against a train step (VGG-small, batch 128),
  both from ``experiments/bench_criteria.py``;
* graph + surgery for ResNet-56 (``channel_graph`` + 50% L1 ``prune``) against Torch-Pruning's
  dependency graph + one 50% L1 pruning step on the PyTorch twin;
* realised speed-up of VGG-small and ResNet-56 with 50% of every group removed, at batch 1 and
  128, against the MACs ratio: jaxprune, and Torch-Pruning for reference.

Without ``torch`` or ``torch_pruning`` (the ``compare`` extra) the peer cells are empty and the
run says why. By default the process re-executes itself once with the malloc settings of
`jaxprune.ops.GLIBC_TUNABLES` (PyTorch runs under them too); ``--malloc inherit`` keeps the
environment. The oracle loop, the oracle image count and the repeat counts are cut down from
``experiments/bench_criteria.py`` and ``experiments/bench/train_step.py`` to keep the run
under about 12 minutes.

Result (2-core Intel Xeon with AVX-512, jax 0.10.2, oneDNN 2.6.3, torch 2.13.0, torch-pruning
1.6.0, tuned malloc, CPU pressure < 1% throughout; experiments/results/bench/bench.{md,json}).
"auto" is the process default: no YNNPACK fusions and oneDNN convolutions; "xla-conv" is the
same with XLA's convolutions (the default before), "ynn" jaxlib's stock configuration:

    measure                                 model       auto      xla-conv   ynn     PyTorch
    train step ms, b128                     lenet5        8.4       12.1     13.5      5.78
    train step ms, b128                     vgg_small     165        199      347      89.6
    train step ms, b128                     resnet20      191        399      577       152
    inference images/s, b128                lenet5      40329      30724    35016     61711
    inference images/s, b128                vgg_small    5543       4445     2222      4091
    inference images/s, b128                resnet20     3674       2204     1632      2848
    inference images/s, b1 (convs on XLA)   vgg_small    1820       1860     1491      1338
    graph + surgery s, 50% L1               resnet56    0.309   (Torch-Pruning 0.060: 5.2x)
    pruned 50% speed-up / MACs ratio, b128  vgg_small   0.851   (Torch-Pruning 0.773)

With oneDNN the train step is 1.45x (LeNet-5), 1.84x (VGG-small) and 1.25x (ResNet-20) of
PyTorch's. The convolutions now match PyTorch's (``python -m experiments.bench.onednn``: 0.89x
of PyTorch summed over VGG-small's layers); what is left is the rest of the step (BatchNorm,
pooling and their gradients, the optimizer).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import bench_criteria
from experiments.bench import core, torch_zoo
from experiments.bench.timing import cpu_pressure, take_turns
from jaxprune import ops, train
from jaxprune.graph import channel_graph
from jaxprune.models import build_model
from jaxprune.models.random_init import random_variables
from jaxprune.ops import onednn
from jaxprune.runtime import enable_compilation_cache

RESULTS = Path(__file__).resolve().parent.parent / "results" / "bench"
NUM_CLASSES = torch_zoo.NUM_CLASSES


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """What one run measures, and how long it times each thing."""

    # Models of the train-step and inference rows.
    train_models: tuple[str, ...] = ("lenet5", "vgg_small", "resnet20")
    # Batch of the train step (and of the Taylor pass).
    batch: int = 128
    # Train-step variants timed besides the default one: "gemm" (``conv_impl="gemm"``),
    # "ynn" (compiled with XLA:CPU's stock options, `jaxprune.ops.stock_cpu_compiler_options`).
    extra_variants: tuple[str, ...] = ("xla-conv", "gemm", "ynn")
    # Turns each runner takes, and timed calls per turn.
    rounds: int = 3
    per_round: int = 2
    # Batch sizes of the inference and pruned speed-up rows.
    inference_batches: tuple[int, ...] = (1, 128)
    # Model of the oracle and Taylor rows, images of the oracle, loop calls timed.
    criteria_model: str = "vgg_small"
    oracle_images: int = 128
    loop_sample: int = 8
    # Model of the graph + surgery row.
    surgery_model: str = "resnet56"
    # Models of the pruned speed-up rows.
    speedup_models: tuple[str, ...] = ("vgg_small", "resnet56")
    # Timed calls per latency (graph, surgery, pruned inference).
    repeats: int = 10
    # Time the PyTorch / Torch-Pruning peers when they are installed.
    use_peers: bool = True


# A smoke run: tiny batches, LeNet-5 wherever something is compiled (ResNet-56 only traced).
QUICK = BenchConfig(
    train_models=("lenet5",),
    batch=8,
    extra_variants=(),
    rounds=1,
    per_round=1,
    inference_batches=(1, 8),
    criteria_model="lenet5",
    oracle_images=16,
    loop_sample=2,
    speedup_models=("lenet5",),
    repeats=2,
)

ROW_KEYS = ("measure", "model", "jaxprune", "reference", "reference_is", "ratio", "ratio_is")


def _row(measure, model, value, reference, reference_is, ratio, ratio_is) -> dict[str, Any]:
    values = (measure, model, value, reference, reference_is, ratio, ratio_is)
    return dict(zip(ROW_KEYS, values, strict=True))


def _div(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a / b


# ---------------------------------------------------------------------------------------------
# Train step and inference
# ---------------------------------------------------------------------------------------------


# variant -> (conv_impl of the model, whether to compile with XLA:CPU's stock options, i.e.
# with YNNPACK fusions, which `jaxprune.ops.use_cpu_defaults` turns off for the process,
# whether convolutions go to oneDNN, `jaxprune.ops.onednn`, which the defaults turn on where
# the library is built). "auto" is the process default; "xla-conv" the same without oneDNN
# (the default before it); "ynn" jaxlib's stock configuration.
TRAIN_VARIANTS = {
    "auto": ("auto", False, True),
    "xla-conv": ("auto", False, False),
    "gemm": ("gemm", False, False),
    "ynn": ("auto", True, False),
}
# Variants whose forward pass differs from "auto", so their inference is timed too.
INFERENCE_VARIANTS = ("auto", "xla-conv", "ynn")


@contextlib.contextmanager
def convolutions(use_onednn: bool):
    """Functions compiled inside lower their convolutions to oneDNN or not (the lowering reads
    the setting when it runs; a compiled function keeps what it got)."""
    active = onednn.settings["active"]
    onednn.settings["active"] = use_onednn and onednn.is_installed()
    try:
        yield
    finally:
        onednn.settings["active"] = active


def jax_train_runner(name: str, variant: str, batch: int, rng: np.random.Generator):
    """A warmed-up, blocking jaxprune train step of the zoo model, its model and variables,
    and the compiler options of the variant."""
    conv_impl, stock_compiler, use_onednn = TRAIN_VARIANTS[variant]
    model = build_model(name, NUM_CLASSES, conv_impl=conv_impl)
    options = ops.stock_cpu_compiler_options() if stock_compiler else None
    # A fresh function per variant: its own compilation, with its own lowering.
    step_fn = jax.jit(lambda s, b: train.train_step.__wrapped__(s, b), compiler_options=options)
    shape = torch_zoo.IMAGE_SHAPES[name]
    images = jnp.asarray(rng.normal(size=(batch, *shape)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, NUM_CLASSES, batch), jnp.int32)
    state = train.create_train_state(
        model, optax.sgd(0.01, momentum=0.9), jax.random.key(0), images[:1]
    )
    box = {"state": state, "batch": {"image": images, "label": labels}}

    def step():
        box["state"], metrics = step_fn(box["state"], box["batch"])
        jax.block_until_ready(metrics)

    with convolutions(use_onednn):
        for _ in range(3):
            step()
    return step, model, box["state"].variables(), options, use_onednn


def train_and_inference(config: BenchConfig, have_torch: bool) -> tuple[list, dict]:
    """Train-step and inference rows of every model in `config.train_models`."""
    rows, details = [], {"train": {}, "inference": {}}
    rng = np.random.default_rng(0)
    for name in config.train_models:
        runners, predictors = {}, {b: {} for b in config.inference_batches}
        for impl in ("auto", *config.extra_variants):
            step, model, variables, options, use_onednn = jax_train_runner(
                name, impl, config.batch, rng
            )
            runners[f"jaxprune {impl}"] = step
            if impl in INFERENCE_VARIANTS:
                predict = jax.jit(
                    lambda v, x, model=model: model.apply(v, x, train=False),
                    compiler_options=options,
                )
                for size in config.inference_batches:
                    x = jnp.asarray(rng.normal(size=(size, *torch_zoo.IMAGE_SHAPES[name])))
                    x = x.astype(jnp.float32)

                    def call(x=x, predict=predict, variables=variables):
                        jax.block_until_ready(predict(variables, x))

                    with convolutions(use_onednn):
                        call()
                    key = "jaxprune" if impl == "auto" else f"jaxprune {impl}"
                    predictors[size][key] = call
        if have_torch:
            runners["torch"] = torch_zoo.train_step_runner(name, config.batch, rng)
            model = torch_zoo.torch_model(name)
            for size in config.inference_batches:
                images = torch_zoo.torch_images(name, size, rng)
                predictors[size]["torch"] = torch_zoo.predictor(model, images)
        timing = take_turns(runners, config.rounds, config.per_round)
        details["train"][name] = timing
        torch_ms = timing.get("torch", {}).get("median_ms")
        for impl in ("auto", *config.extra_variants):
            ms = timing[f"jaxprune {impl}"]["median_ms"]
            label = f"train step ms, b{config.batch}" + ("" if impl == "auto" else f", {impl}")
            rows.append(
                _row(label, name, ms, torch_ms, "PyTorch", _div(ms, torch_ms), "jaxprune/torch")
            )
        details["inference"][name] = {}
        for size in config.inference_batches:
            # Batch-1 calls are short: time more of them so the medians settle.
            repeats = config.per_round * (10 if size == 1 else 1)
            timing = take_turns(predictors[size], config.rounds, repeats)
            details["inference"][name][str(size)] = timing
            per_s = {key: size / (row["median_ms"] / 1e3) for key, row in timing.items()}
            for key in sorted(k for k in per_s if k.startswith("jaxprune")):
                variant = key.removeprefix("jaxprune")
                rows.append(
                    _row(
                        f"inference images/s, b{size}" + (f",{variant}" if variant else ""),
                        name,
                        per_s[key],
                        per_s.get("torch"),
                        "PyTorch",
                        _div(per_s[key], per_s.get("torch")),
                        "jaxprune/torch",
                    )
                )
        print(f"  train + inference: {name} done (cpu pressure {cpu_pressure()})", flush=True)
    return rows, details


# ---------------------------------------------------------------------------------------------
# Criteria: the oracle and Taylor (measured by experiments/bench_criteria.py's functions)
# ---------------------------------------------------------------------------------------------


def criteria_rows(config: BenchConfig) -> tuple[list, dict]:
    """The exact oracle against the per-channel loop, and Taylor against a train step."""
    name = config.criteria_model
    model = build_model(name, NUM_CLASSES)
    x, y, source = bench_criteria.images(max(config.oracle_images, config.batch))
    if x.shape[1:] != torch_zoo.IMAGE_SHAPES[name]:
        raise ValueError(f"criteria_model {name!r} does not take 28x28x1 images; use vgg_small.")
    variables = random_variables(model, x[:1], gain=np.sqrt(2.0))
    graph = channel_graph(model.apply, variables, x[:1])
    n = config.oracle_images
    oracle = bench_criteria.bench_oracle(
        model, variables, graph, x[:n], y[:n], ["auto"], config.loop_sample
    )
    taylor = bench_criteria.bench_taylor(
        model, variables, graph, x[: config.batch], y[: config.batch]
    )
    loop_s = sum(group["loop_s"] for group in oracle["groups"])
    oracle_s = sum(group["auto_s"] for group in oracle["groups"])
    rows = [
        _row(
            f"oracle s, all channels, {n} images",
            name,
            oracle_s,
            loop_s,
            "one masked forward per channel",
            loop_s / oracle_s,
            "speed-up",
        ),
        _row(
            f"taylor pass ms, b{config.batch}",
            name,
            1e3 * taylor["taylor_s"],
            1e3 * taylor["train_step_s"],
            "jaxprune train step",
            taylor["ratio"],
            "taylor/step",
        ),
    ]
    print(f"  oracle + taylor done (cpu pressure {cpu_pressure()})", flush=True)
    return rows, {"data": source, "oracle": oracle, "taylor": taylor}


# ---------------------------------------------------------------------------------------------
# Pruning core: graph + surgery, and pruned speed-up
# ---------------------------------------------------------------------------------------------


def core_rows(config: BenchConfig, have_tp: bool) -> tuple[list, dict]:
    """Graph + surgery against Torch-Pruning, and the pruned speed-up against the MACs ratio."""
    name = config.surgery_model
    shape = (1, *torch_zoo.IMAGE_SHAPES[name])
    ours = core.graph_and_surgery(name, shape, NUM_CLASSES, config.repeats)
    theirs = core.torch_pruning_step(name, max(1, config.repeats // 3)) if have_tp else None
    peer_s = theirs["total_s"] if theirs else None
    rows = [
        _row(
            f"graph + surgery s, 50% L1{label}",
            name,
            ours[key],
            peer_s,
            "Torch-Pruning graph + step",
            _div(ours[key], peer_s),
            "jaxprune/torch",
        )
        for key, label in (
            ("total_s", ", prune verify=True (default)"),
            ("total_no_verify_s", ", verify=False"),
            ("first_total_s", ", first call in process, verify=True"),
        )
    ]
    details: dict[str, Any] = {"surgery": {"jaxprune": ours, "torch_pruning": theirs}}
    details["speedup"] = {"jaxprune": [], "torch_pruning": []}
    for model_name in config.speedup_models:
        runs = [("jaxprune", core.jax_speedup)]
        if have_tp:
            runs.append(("torch_pruning", core.torch_speedup))
        for library, measure in runs:
            result = measure(model_name, config.repeats, config.inference_batches)
            details["speedup"][library].append(result)
            for batch in config.inference_batches:
                speedup = result[f"speedup_b{batch}"]
                rows.append(
                    _row(
                        f"pruned 50% speed-up, b{batch}"
                        + ("" if library == "jaxprune" else " (Torch-Pruning)"),
                        model_name,
                        speedup,
                        result["macs_ratio"],
                        "MACs ratio",
                        speedup / result["macs_ratio"],
                        "speed-up/MACs ratio",
                    )
                )
    print(f"  graph, surgery and speed-up done (cpu pressure {cpu_pressure()})", flush=True)
    return rows, details


# ---------------------------------------------------------------------------------------------
# The run and its table
# ---------------------------------------------------------------------------------------------


def run(config: BenchConfig) -> dict[str, Any]:
    """Measures every row of `config` in this process.

    Args:
      config: what to measure (`BenchConfig()` for the full run, `QUICK` for a smoke run).

    Returns:
      ``{"rows": [...], "details": {...}, "peers": {...}, "skipped": [...], ...}``; each row
      has the keys `ROW_KEYS` (peer cells None when the peer is absent).
    """
    found = torch_zoo.peers() if config.use_peers else {"torch": False, "torch_pruning": False}
    skipped = []
    if not found["torch"]:
        skipped.append("PyTorch not installed: its columns are empty (pip install '.[compare]')")
    if not found["torch_pruning"]:
        skipped.append(
            "torch_pruning not installed: its columns are empty (pip install '.[compare]')"
        )
    for message in skipped:
        print(message, flush=True)
    if found["torch"]:
        torch_zoo.setup_torch()
    have_tp = found["torch"] and found["torch_pruning"]
    result: dict[str, Any] = {
        "config": dataclasses.asdict(config),
        "peers": found,
        "skipped": skipped,
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
        "cpu_pressure_before": cpu_pressure(),
        "rows": [],
        "details": {},
    }
    for rows, details in (
        train_and_inference(config, found["torch"]),
        criteria_rows(config),
        core_rows(config, have_tp),
    ):
        result["rows"] += rows
        result["details"].update(details)
    result["cpu_pressure_after"] = cpu_pressure()
    return result


def _cell(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The rows as a markdown table (an empty peer cell is ``-``)."""
    lines = [
        "| measure | model | jaxprune | reference | reference is | ratio | ratio is |",
        "|---|---|---:|---:|---|---:|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['measure']} | {row['model']} | {_cell(row['jaxprune'])} "
            f"| {_cell(row['reference'])} | {row['reference_is']} | {_cell(row['ratio'])} "
            f"| {row['ratio_is']} |"
        )
    return "\n".join(lines) + "\n"


def write_results(result: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    """Writes ``bench.md`` (the table) and ``bench.json`` (everything) into `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    table, record = out_dir / "bench.md", out_dir / "bench.json"
    notes = "".join(f"\n{message}\n" for message in result["skipped"])
    header = (
        f"# jaxprune benchmarks\n\n`{result['command']}` on {result['machine']['cpus']} CPUs, "
        f"jax {result['machine']['jax']}; CPU pressure {result['cpu_pressure_before']} -> "
        f"{result['cpu_pressure_after']} (% of time some task waited for a CPU).\n{notes}\n"
    )
    table.write_text(header + markdown_table(result["rows"]))
    record.write_text(json.dumps(result, indent=2) + "\n")
    return table, record


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run (seconds)")
    parser.add_argument("--no-peers", action="store_true", help="skip PyTorch / Torch-Pruning")
    parser.add_argument(
        "--malloc",
        choices=("tuned", "inherit"),
        default="tuned",
        help="re-run with jaxprune.ops.GLIBC_TUNABLES (default) or keep the environment",
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder of bench.{md,json}")
    args = parser.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    if args.malloc == "tuned" and not ops.has_tuned_malloc():
        # glibc reads its tunables at process start: re-execute once with them set.
        command = [sys.executable, "-m", "experiments.bench", *argv]
        os.execve(sys.executable, command, ops.tuned_environ())
    enable_compilation_cache()
    config = QUICK if args.quick else BenchConfig()
    config = dataclasses.replace(config, use_peers=not args.no_peers)
    result = run(config)
    result["command"] = " ".join(["python -m experiments.bench", *argv])
    result["machine"] = {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "jax": jax.__version__,
        "torch": _version("torch"),
        "torch_pruning": _version("torch_pruning"),
    }
    print()
    print(markdown_table(result["rows"]))
    table, record = write_results(result, args.out)
    print(f"wrote {table} and {record}")


def _version(package: str) -> str | None:
    try:
        return __import__(package).__version__
    except ImportError:
        return None


if __name__ == "__main__":
    main()
