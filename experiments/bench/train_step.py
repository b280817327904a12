"""Training-step and inference speed of the zoo on a CPU: jaxprune's variants against PyTorch.

Command (5.5 minutes on a 2-core CPU; ``--allocator inherit`` halves it):

    python -m experiments.bench.train_step        # prints tables, writes
                                                  # results/bench_train_step.json

What it measures, for LeNet-5 and VGG-small on 28x28x1 and ResNet-20 on 32x32x3:

* the train step (forward, softmax cross-entropy, backward, SGD with momentum 0.9) at batch
  128, ``jaxprune.train.train_step`` on the zoo models, in these variants:

  - ``stock``: `jax.lax.conv_general_dilated`, `flax.linen.max_pool`, default compiler;
  - ``gemm-conv``: the weight gradient as shifted matrix products
    (`jaxprune.ops.conv_general_dilated_gemm`);
  - ``pool``: `jaxprune.ops.max_pool` (reshape + max) for the pooling layers;
  - ``no-ynn``: compiled with `jaxprune.ops.cpu_compiler_options` (XLA's Eigen convolutions
    instead of YNNPACK fusions);
  - ``pool+no-ynn`` and ``gemm+pool``: the promising combinations;

  ResNet-20 has no max pooling, so it skips the pool variants;
* inference throughput (``train=False``) at batch 1 and 128 of the variants whose forward
  pass differs (the gemm ones have the stock forward pass);
* the same networks in PyTorch when it is installed (``pip install torch==2.13.0``), in the
  ``channels_last`` memory format, which matches JAX's NHWC layout (PyTorch's default NCHW
  was about 1.2x slower here). Without PyTorch its columns are skipped with a message.

Every variant of a model is compiled first, then the variants take turns, a few steps each,
for several rounds: the machine is shared, and taking turns exposes every variant to the same
load, so the ratios (median over median, from one run) stay meaningful when the absolute
times drift. Each run also records the CPU pressure (/proc/pressure/cpu) around it.

The whole set runs twice, in fresh processes: with the environment as it is (``inherit``)
and with glibc's malloc tuned by `jaxprune.ops.GLIBC_TUNABLES` (``tuned``), which stops
XLA:CPU from page-faulting its temporary buffers at every step; PyTorch runs under the same
settings in each process.

Result (2-core AMD EPYC, jax 0.10.2, torch 2.13.0, idle machine: CPU pressure < 7%; two runs
a few minutes apart; train step ms at batch 128, median; x = ratio to PyTorch in the same run):

    allocator  model       jax stock        best jax variant                    torch
    inherit    lenet5      20.4 / 23.1      pool+no-ynn  13.8 / 15.7            7.2 / 15.0
    inherit    vgg_small   360 / 333        pool+no-ynn  266 / 236 (x1.55/1.48) 172 / 159
    inherit    resnet20    685 / 715        no-ynn       674 / 685 (x2.98/3.03) 226 / 226
    tuned      lenet5      21.7 / 19.9      pool+no-ynn  16.2 / 14.5            9.1 / 6.9
    tuned      vgg_small   271 / 260        pool+no-ynn  204 / 216 (x1.48/1.69) 138 / 128
    tuned      resnet20    557 / 639        gemm-conv    476 / 574 (x2.28/2.57) 209 / 223

So the step is 1.5x (VGG-small: 333 -> 216 ms) and 1.25x (ResNet-20: 715 -> 571 ms) faster
than stock, but still 1.5-1.7x (VGG-small) and 2.3-3x (ResNet-20) slower than PyTorch. Under
load (other processes on the cores) ``no-ynn`` and ``gemm-conv`` turned into losses of
1.1-1.3x, while ``pool`` and the tuned malloc stayed gains. Inference: JAX matches or beats
PyTorch at batch 1 (VGG-small 1.2-1.4k vs 1.1k images/s, ResNet-20 0.7-0.9k vs 0.4-0.6k) and
trails it at batch 128 on LeNet-5 (11-20k vs 29-48k) and ResNet-20 (1.1-1.4k vs 1.6-1.9k).
results/bench_train_step.json holds the second run.

The variants are selected without editing the zoo: the convolution by a flax method
interceptor that sets ``conv_general_dilated`` on every ``nn.Conv`` while the model is
traced, the pooling by standing in for ``flax.linen.max_pool`` during tracing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments.bench import torch_zoo
from experiments.bench.timing import cpu_pressure, take_turns
from jaxprune import ops, train
from jaxprune.models import build_model
from jaxprune.runtime import enable_compilation_cache

RESULTS = Path(__file__).resolve().parent.parent / "results"
MODELS = ("lenet5", "vgg_small", "resnet20")
IMAGE_SHAPES = torch_zoo.IMAGE_SHAPES
GEMM = ops.conv_general_dilated_gemm
# name -> (conv function or None for stock, use jaxprune.ops.max_pool, use cpu_compiler_options)
JAX_VARIANTS = {
    "stock": (None, False, False),
    "gemm-conv": (GEMM, False, False),
    "pool": (None, True, False),
    "no-ynn": (None, False, True),
    "pool+no-ynn": (None, True, True),
    "gemm+pool": (GEMM, True, False),
}
HAS_MAX_POOL = {"lenet5", "vgg_small"}  # elsewhere the pool variants equal their twins
NUM_CLASSES = torch_zoo.NUM_CLASSES


# ---------------------------------------------------------------------------------------------
# JAX variants
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _pool_standin(enabled: bool) -> Iterator[None]:
    """Makes `flax.linen.max_pool` resolve to `jaxprune.ops.max_pool` inside the block."""
    if not enabled:
        yield
        return
    original = nn.max_pool
    nn.max_pool = ops.max_pool
    try:
        yield
    finally:
        nn.max_pool = original


def with_ops(apply_fn: Callable[..., Any], conv: Callable | None, pool: bool) -> Callable:
    """Wraps a flax apply function so that its convs use `conv` and its pools `ops.max_pool`.

    The wrapper is a new function object, so `jax.jit` (which keys on the static apply_fn of
    the train state) compiles each variant separately.
    """

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if conv is None or not isinstance(module, nn.Conv) or context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        previous = module.conv_general_dilated
        # The field is read while the module is traced; restore it right after.
        object.__setattr__(module, "conv_general_dilated", conv)
        try:
            return next_fun(*args, **kwargs)
        finally:
            object.__setattr__(module, "conv_general_dilated", previous)

    def apply(*args, **kwargs):
        with _pool_standin(pool), nn.intercept_methods(interceptor):
            return apply_fn(*args, **kwargs)

    return apply


def variants_of(name: str) -> list[str]:
    """The JAX variants worth timing for a model (pool variants only where it pools)."""
    return [v for v, (_, pool, _) in JAX_VARIANTS.items() if not pool or name in HAS_MAX_POOL]


def jax_runners(name: str, batch: int, rng: np.random.Generator) -> dict[str, Any]:
    """Compiled train-step and inference callables of every JAX variant of one model."""
    model = build_model(name, NUM_CLASSES)
    images = jnp.asarray(rng.normal(size=(batch, *IMAGE_SHAPES[name])), jnp.float32)
    labels = jnp.asarray(rng.integers(0, NUM_CLASSES, batch), jnp.int32)
    base = train.create_train_state(
        model, optax.sgd(0.01, momentum=0.9), jax.random.key(0), images[:1]
    )
    steps, losses, infer = {}, {}, {}
    for variant in variants_of(name):
        conv, pool, no_ynn = JAX_VARIANTS[variant]
        options = ops.cpu_compiler_options() if no_ynn else None
        train_step = jax.jit(train.train_step.__wrapped__, compiler_options=options)
        apply_fn = with_ops(model.apply, conv, pool)
        box = {"state": base.replace(apply_fn=apply_fn)}
        batch_dict = {"image": images, "label": labels}
        for _ in range(3):  # compile, then steps with warm caches
            box["state"], metrics = train_step(box["state"], batch_dict)
        losses[variant] = float(metrics["loss"])

        def step(box=box, batch_dict=batch_dict, train_step=train_step):
            box["state"], metrics = train_step(box["state"], batch_dict)
            jax.block_until_ready(metrics)

        steps[variant] = step
        if conv is None:  # the gemm variants have the stock forward pass
            predict = jax.jit(
                lambda v, x, apply_fn=apply_fn: apply_fn(v, x, train=False),
                compiler_options=options,
            )
            variables = box["state"].variables()
            infer[variant] = (predict, variables)
    return {"steps": steps, "losses": losses, "infer": infer, "images": images}


# ---------------------------------------------------------------------------------------------
# One full measurement in this process
# ---------------------------------------------------------------------------------------------


def measure(models: list[str], batch: int, rounds: int, per_round: int, use_torch: bool) -> dict:
    """Runs every measurement in this process and returns the results as a dict."""
    have_torch = False
    if use_torch:
        try:
            torch_zoo.setup_torch()
            have_torch = True
        except ImportError:
            print("PyTorch is not installed: its columns are skipped (pip install torch==2.13.0)")
    rng = np.random.default_rng(0)
    out: dict[str, Any] = {
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "cpu_pressure_before": cpu_pressure(),
        "torch": have_torch,
        "train": {},
        "inference": {},
    }
    for name in models:
        runs = jax_runners(name, batch, rng)
        runners = {f"jax {v}": runs["steps"][v] for v in variants_of(name)}
        tw = None
        if have_torch:
            twin = torch_zoo.torch_model(name)
            tw = {
                "step": torch_zoo.train_step_runner(name, batch, rng),
                "predictor": lambda size, twin=twin, name=name: torch_zoo.predictor(
                    twin, torch_zoo.torch_images(name, size, rng)
                ),
            }
            runners["torch"] = tw["step"]
        timing = take_turns(runners, rounds, per_round)
        if tw is not None:
            for key in runners:
                timing[key]["vs_torch"] = timing[key]["median_ms"] / timing["torch"]["median_ms"]
        for variant in variants_of(name):
            timing[f"jax {variant}"]["loss_after_3_steps"] = runs["losses"][variant]
            timing[f"jax {variant}"]["vs_stock"] = (
                timing[f"jax {variant}"]["median_ms"] / timing["jax stock"]["median_ms"]
            )
        out["train"][name] = timing
        out["inference"][name] = {}
        for size in (1, batch):
            predictors = {}
            for variant, (predict, variables) in runs["infer"].items():
                x = runs["images"][:size]
                jax.block_until_ready(predict(variables, x))  # compile

                def call(predict=predict, variables=variables, x=x):
                    jax.block_until_ready(predict(variables, x))

                predictors[f"jax {variant}"] = call
            if tw is not None:
                predictors["torch"] = tw["predictor"](size)
            # Batch-1 calls are short: time more of them so the medians settle.
            repeats = per_round * (10 if size == 1 else 1)
            timing = take_turns(predictors, rounds, repeats)
            for row in timing.values():
                row["images_per_s"] = size / (row["median_ms"] / 1e3)
            out["inference"][name][str(size)] = timing
        print(f"  {name} done (cpu pressure {cpu_pressure()})", flush=True)
    out["cpu_pressure_after"] = cpu_pressure()
    return out


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def print_tables(label: str, result: dict) -> None:
    """Prints the train-step and inference tables of one environment."""
    print(f"\n== {label}: GLIBC_TUNABLES={result['glibc_tunables'] or '(unset)'}")
    print(
        f"   cpu pressure avg10 {result['cpu_pressure_before']} -> "
        f"{result['cpu_pressure_after']} (% of time some task waited for a CPU)"
    )
    print(f"\ntrain step, batch {result['batch']} (ms: median / min / cpu-median; ratios)")
    for name, timing in result["train"].items():
        for key, row in timing.items():
            ratios = f"  x{row['vs_stock']:.2f} of stock" if "vs_stock" in row else ""
            if "vs_torch" in row:
                ratios += f"  x{row['vs_torch']:.2f} of torch"
            print(
                f"  {name:10s} {key:15s} {row['median_ms']:8.1f} {row['min_ms']:8.1f} "
                f"{row['cpu_median_ms']:8.1f}{ratios}"
            )
    print("\ninference throughput (images/s, from the median call)")
    for name, sizes in result["inference"].items():
        for size, timing in sizes.items():
            cells = "  ".join(f"{key} {row['images_per_s']:9.1f}" for key, row in timing.items())
            print(f"  {name:10s} batch {size:>4s}  {cells}")


def run_child(allocator: str, argv: list[str]) -> dict:
    """Runs this script's measurement in a fresh process with the chosen malloc settings."""
    env = ops.tuned_environ() if allocator == "tuned" else dict(os.environ)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "result.json"
        cmd = [
            sys.executable,
            "-m",
            "experiments.bench.train_step",
            *argv,
            "--child-out",
            str(path),
        ]
        subprocess.run(cmd, env=env, check=True)
        return json.loads(path.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3, help="turns each variant takes")
    parser.add_argument("--per-round", type=int, default=2, help="timed steps per turn")
    parser.add_argument(
        "--allocator",
        choices=("both", "inherit", "tuned"),
        default="both",
        help="malloc settings: this environment, jaxprune.ops.GLIBC_TUNABLES, or both",
    )
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch columns")
    parser.add_argument("--out", type=Path, default=RESULTS / "bench_train_step.json")
    parser.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    models = [m for m in args.models.split(",") if m]
    unknown = sorted(set(models) - set(MODELS))
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {', '.join(MODELS)}")
    enable_compilation_cache()

    if args.child_out is not None:  # one measurement, in this process
        result = measure(models, args.batch, args.rounds, args.per_round, not args.no_torch)
        result["batch"] = args.batch
        args.child_out.write_text(json.dumps(result))
        return

    passthrough = [
        f"--models={','.join(models)}",
        f"--batch={args.batch}",
        f"--rounds={args.rounds}",
        f"--per-round={args.per_round}",
        *(["--no-torch"] if args.no_torch else []),
    ]
    allocators = ("inherit", "tuned") if args.allocator == "both" else (args.allocator,)
    results = {}
    for allocator in allocators:
        print(f"measuring with allocator={allocator} ...", flush=True)
        results[allocator] = run_child(allocator, passthrough)
        print_tables(allocator, results[allocator])
    report = {
        "command": " ".join(["python -m experiments.bench.train_step", *sys.argv[1:]]),
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "processor": platform.processor(),
            "jax": jax.__version__,
            "note": "shared machine: compare ratios within one environment, not absolute ms",
        },
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
