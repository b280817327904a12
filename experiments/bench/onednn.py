"""oneDNN convolutions (`jaxprune.ops.onednn`) against XLA:CPU's and PyTorch's, per pass and per
train step.

Command (build the library first: ``python -m jaxprune.ops.onednn_build``):

    python -m experiments.bench.onednn      # prints the tables, writes
                                            # results/bench/onednn.{md,json}

What it measures, in one process (the runners take turns, so the ratios stay meaningful on a
shared machine), with glibc's malloc tuned (`jaxprune.ops.tuned_environ`; the script
re-executes itself once unless ``--allocator inherit``):

* each 3x3 convolution of VGG-small at batch 128: forward, input gradient and weight gradient
  (like ``conv_profile.py``), XLA's own lowering (jaxprune's default XLA:CPU options), the
  oneDNN lowering and PyTorch (channels_last). The 1-channel layer's forward stays the shifted
  sum of `jaxprune.ops.lowering` in both JAX columns;
* how oneDNN uses the two cores, on the 28x28 32->32 layer: batch slices on XLA's pool (the
  default), one OpenMP thread, and an OpenMP team of ``OMP_NUM_THREADS`` (the default: one per
  core);
* the train step (``jaxprune.train.train_step``, SGD with momentum, batch 128) of LeNet-5,
  VGG-small and ResNet-20: XLA, oneDNN and the PyTorch twin, and the loss after three steps
  from the same state in both JAX variants.

Result (2-core Intel Xeon with AVX-512, jax 0.10.2, oneDNN 2.6.3, torch 2.13.0, tuned malloc,
idle: CPU pressure < 1%; results/bench/onednn.{md,json}):

    per pass, six VGG-small convs summed   xla 133.8   onednn 93.4 ms   (onednn / xla 0.70)
    weight gradients                       onednn / xla 0.30-0.88, the largest gain
    train step, batch 128 (ms)   xla     onednn   onednn/xla
      lenet5                      21.8     16.5     0.76
      vgg_small                  247.6    211.8     0.86
      resnet20                   440.2    218.3     0.50

Losses after three steps agree to 2e-6. Threading (28x28 32->32): slices on XLA's pool (the
default) 7.5 / 9.3 / 8.7 ms for the three passes, one OpenMP thread 12.4 / 16.2 / 13.0, an
OpenMP team of two 12.8 / 12.9 / 13.4. The PyTorch column of this script (and every time after
its threading section) runs slower than in ``make bench`` (VGG-small's PyTorch step 210 ms
here, 90 ms there); the cause is not found (OpenMP teams of two runtimes in one process are the
suspect), so take ratios to PyTorch from ``make bench`` (experiments/results/bench/bench.md),
which also times the default against XLA's convolutions.

The two JAX variants are compiled side by side: the lowering is chosen when a function is
compiled (`jaxprune.ops.onednn.settings`), and each variant is checked to call (or not call)
oneDNN in its compiled program.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from experiments.bench import torch_zoo
from experiments.bench.conv_profile import VGG_SMALL_CONVS
from experiments.bench.timing import cpu_pressure, take_turns
from jaxprune import ops, train
from jaxprune.models import build_model
from jaxprune.ops import onednn

RESULTS = Path(__file__).resolve().parent.parent / "results" / "bench"
MODELS = ("lenet5", "vgg_small", "resnet20")
PASSES = ("forward", "input grad", "weight grad")
DN = ("NHWC", "HWIO", "NHWC")
# name -> (OpenMP threads of an unsliced call, batch slices: None = one per XLA pool thread)
THREADING = {
    "sliced on XLA's pool": (1, None),
    "1 OpenMP thread": (1, 1),
    "OpenMP default team": (0, 1),
}


def compiled(fn: Callable, args: tuple, use_onednn: bool) -> Callable:
    """`fn` jitted with or without the oneDNN lowering, checked in its compiled program."""
    onednn.settings["active"] = use_onednn
    try:
        jitted = jax.jit(lambda *a: fn(*a))  # a fresh function: its own compilation
        text = jitted.lower(*args).as_text()
        jax.block_until_ready(jitted(*args))
    finally:
        onednn.settings["active"] = True
    # (with the lowering, a pass it leaves to XLA, like the 1-channel forward, calls none)
    if not use_onednn and any(name in text for name in onednn.TARGETS.values()):
        raise RuntimeError("the XLA variant calls oneDNN")
    return jitted


def pass_functions(size: int, c_in: int, c_out: int, rng: np.random.Generator) -> tuple:
    """The three passes of one SAME 3x3 convolution and their arguments."""
    x = jnp.asarray(rng.normal(size=(128, size, size, c_in)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(3, 3, c_in, c_out)), jnp.float32)
    dy = jnp.asarray(rng.normal(size=(128, size, size, c_out)), jnp.float32)

    def conv(x, w):
        return lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=DN)

    fns = {
        "forward": lambda x, w, dy: conv(x, w),
        "input grad": lambda x, w, dy: jax.vjp(lambda x: conv(x, w), x)[1](dy)[0],
        "weight grad": lambda x, w, dy: jax.vjp(lambda w: conv(x, w), w)[1](dy)[0],
    }
    return fns, (x, w, dy)


def torch_passes(size: int, c_in: int, c_out: int, batch: int = 128) -> dict:
    """The same passes in PyTorch, channels_last."""
    import torch
    import torch.nn.functional as F  # noqa: N812

    last = torch.channels_last
    x = torch.randn(batch, c_in, size, size).contiguous(memory_format=last)
    w = torch.randn(c_out, c_in, 3, 3).contiguous(memory_format=last)
    dy = torch.randn(batch, c_out, size, size).contiguous(memory_format=last)
    return {
        "forward": lambda: F.conv2d(x, w, padding=1),
        "input grad": lambda: torch.nn.grad.conv2d_input(x.shape, w, dy, padding=1),
        "weight grad": lambda: torch.nn.grad.conv2d_weight(x, w.shape, dy, padding=1),
    }


def blocking(fn: Callable, args: tuple, threading: tuple[int, int | None] | None = None):
    """A runner: one blocking call (with oneDNN's threading set first, when given)."""

    def run():
        if threading is not None:
            onednn.set_threads(*threading)
        jax.block_until_ready(fn(*args))

    return run


def measure_layers(rounds: int, per_round: int, have_torch: bool) -> list[dict]:
    """Median ms of each pass of each VGG-small convolution: xla, onednn, torch."""
    rng = np.random.default_rng(0)
    layers = []
    for size, c_in, c_out in VGG_SMALL_CONVS:
        fns, args = pass_functions(size, c_in, c_out, rng)
        runners = {}
        for name, fn in fns.items():
            runners[f"xla {name}"] = blocking(compiled(fn, args, False), args)
            runners[f"onednn {name}"] = blocking(compiled(fn, args, True), args)
        if have_torch:
            for name, fn in torch_passes(size, c_in, c_out).items():
                runners[f"torch {name}"] = fn
        for run in runners.values():
            run()
        timing = take_turns(runners, rounds, per_round)
        layers.append(
            {"layer": f"{size}x{size} {c_in}->{c_out}"}
            | {name: row["median_ms"] for name, row in timing.items()}
        )
        print(f"  {layers[-1]['layer']} done (cpu pressure {cpu_pressure()})", flush=True)
    return layers


def measure_threading(rounds: int, per_round: int) -> dict[str, dict[str, float]]:
    """Median ms of the 28x28 32->32 passes under each oneDNN threading of `THREADING`."""
    fns, args = pass_functions(28, 32, 32, np.random.default_rng(1))
    runners = {}
    for name, fn in fns.items():
        runners[f"xla {name}"] = blocking(compiled(fn, args, False), args)
        jitted = compiled(fn, args, True)
        for label, threading in THREADING.items():
            runners[f"{label} {name}"] = blocking(jitted, args, threading)
    for run in runners.values():
        run()
    timing = take_turns(runners, rounds, per_round)
    onednn.set_threads()
    out: dict[str, dict[str, float]] = {}
    for label in ("xla", *THREADING):
        out[label] = {name: timing[f"{label} {name}"]["median_ms"] for name in PASSES}
    return out


def step_runner(name: str, use_onednn: bool, batch: int) -> tuple[Callable[[], None], float]:
    """A blocking train step of a zoo model (warmed up) and its loss after three steps."""
    rng = np.random.default_rng(0)
    model = build_model(name, torch_zoo.NUM_CLASSES)
    shape = torch_zoo.IMAGE_SHAPES[name]
    images = jnp.asarray(rng.normal(size=(batch, *shape)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, torch_zoo.NUM_CLASSES, batch), jnp.int32)
    state = train.create_train_state(
        model, optax.sgd(0.01, momentum=0.9), jax.random.key(0), images[:1]
    )
    batch_dict = {"image": images, "label": labels}
    step = compiled(train.train_step.__wrapped__, (state, batch_dict), use_onednn)
    box: dict[str, Any] = {"state": state}
    for _ in range(3):
        box["state"], metrics = step(box["state"], batch_dict)
    loss = float(metrics["loss"])

    def run():
        box["state"], metrics = step(box["state"], batch_dict)
        jax.block_until_ready(metrics)

    return run, loss


def measure_steps(rounds: int, per_round: int, have_torch: bool, batch: int) -> dict[str, Any]:
    """Median ms of the train step of each model: xla, onednn, torch; and the JAX losses."""
    out = {}
    for name in MODELS:
        xla, xla_loss = step_runner(name, False, batch)
        dnn, dnn_loss = step_runner(name, True, batch)
        runners = {"xla": xla, "onednn": dnn}
        if have_torch:
            runners["torch"] = torch_zoo.train_step_runner(name, batch, np.random.default_rng(0))
        timing = take_turns(runners, rounds, per_round)
        out[name] = {key: row["median_ms"] for key, row in timing.items()} | {
            "loss_after_3_steps": {"xla": xla_loss, "onednn": dnn_loss}
        }
        print(f"  {name} done (cpu pressure {cpu_pressure()})", flush=True)
    return out


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a and b else "-"


def report(record: dict) -> str:
    """The markdown tables of a measurement."""
    layers, steps, threads = record["layers"], record["steps"], record["threading"]
    lines = [
        f"oneDNN {record['onednn']} vs XLA:CPU (jax {record['jax']}) vs PyTorch "
        f"{record['torch'] or '(absent)'}; batch {record['batch']}; ms, median of "
        f"{record['rounds']}x{record['per_round']} turns; cpu pressure (avg10 %) "
        f"{record['cpu_pressure_before']} -> {record['cpu_pressure_after']}.",
        "",
        "Per pass, VGG-small convolutions (1->32 forward: the shifted sum in both JAX columns)",
        "",
        "| layer | pass | xla | onednn | torch | onednn / xla | onednn / torch |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    totals: dict[str, float] = {}
    for layer in layers:
        for name in PASSES:
            row = [layer.get(f"{lib} {name}") for lib in ("xla", "onednn", "torch")]
            for lib, value in zip(("xla", "onednn", "torch"), row, strict=True):
                if value is not None:
                    totals[lib] = totals.get(lib, 0.0) + value
            cells = " | ".join("-" if v is None else f"{v:.1f}" for v in row)
            lines.append(
                f"| {layer['layer']} | {name} | {cells} | {ratio(row[1], row[0])} | "
                f"{ratio(row[1], row[2])} |"
            )
    total = [totals.get(lib) for lib in ("xla", "onednn", "torch")]
    cells = " | ".join("-" if v is None else f"{v:.1f}" for v in total)
    lines.append(
        f"| all | all three | {cells} | {ratio(total[1], total[0])} | {ratio(total[1], total[2])} |"
    )
    lines += [
        "",
        "oneDNN threading, 28x28 32->32 (OpenMP default team: OMP_NUM_THREADS="
        f"{record['omp_num_threads'] or 'unset (one per core)'})",
        "",
        "| variant | " + " | ".join(PASSES) + " |",
        "|---|" + "---:|" * len(PASSES),
    ]
    for label, row in threads.items():
        lines.append(f"| {label} | " + " | ".join(f"{row[p]:.1f}" for p in PASSES) + " |")
    lines += [
        "",
        "Train step",
        "",
        "| model | xla | onednn | torch | onednn / xla | onednn / torch | loss xla | loss onednn |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in steps.items():
        torch_ms = row.get("torch")
        losses = row["loss_after_3_steps"]
        lines.append(
            f"| {name} | {row['xla']:.1f} | {row['onednn']:.1f} | "
            f"{'-' if torch_ms is None else f'{torch_ms:.1f}'} | "
            f"{ratio(row['onednn'], row['xla'])} | {ratio(row['onednn'], torch_ms)} | "
            f"{losses['xla']:.6f} | {losses['onednn']:.6f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--per-round", type=int, default=2)
    parser.add_argument("--allocator", choices=("tuned", "inherit"), default="tuned")
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.allocator == "tuned" and not ops.has_tuned_malloc():
        # glibc reads its tunables at start-up: run again with them.
        os.execve(
            sys.executable,
            [sys.executable, "-m", "experiments.bench.onednn", *sys.argv[1:]],
            ops.tuned_environ(),
        )
    if not onednn.use_onednn_lowering():
        sys.exit(f"the oneDNN lowering is unavailable: run {onednn.BUILD_COMMAND}")
    have_torch = not args.no_torch and torch_zoo.peers()["torch"]
    torch_version = None
    if have_torch:
        import torch

        torch_zoo.setup_torch()
        torch_version = torch.__version__
    record: dict[str, Any] = {
        "jax": jax.__version__,
        "onednn": onednn.onednn_version(),
        "torch": torch_version,
        "batch": args.batch,
        "rounds": args.rounds,
        "per_round": args.per_round,
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS", ""),
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform()},
        "cpu_pressure_before": cpu_pressure(),
    }
    record["layers"] = measure_layers(args.rounds, args.per_round, have_torch)
    record["threading"] = measure_threading(args.rounds, args.per_round)
    print("  threading done", flush=True)
    record["steps"] = measure_steps(args.rounds, args.per_round, have_torch, args.batch)
    record["cpu_pressure_after"] = cpu_pressure()
    table = report(record)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "onednn.md").write_text(table)
    (args.out / "onednn.json").write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
