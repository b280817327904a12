"""Where the VGG-small train step spends its convolution time: each conv's three passes alone.

Command (25 s on the idle 2-core CPU):

    python -m experiments.bench.conv_profile    # prints a table, writes
                                                # results/bench/conv_profile.{md,json}

For each 3x3 convolution of VGG-small at batch 128 (28x28x1 input), the forward convolution,
the input gradient and the weight gradient are jitted and timed separately (median, the
runners taking turns): XLA's own (`jax.vjp` of `jax.lax.conv_general_dilated`, split into its
two cotangents), jaxprune's GEMM weight gradient (`jaxprune.ops.conv`, im2col + one matrix
product, channel-major input) and PyTorch's (``torch.nn.grad.conv2d_input`` /
``conv2d_weight``, channels_last) when PyTorch is installed.

It also splits the whole VGG-small step (``jaxprune.train.train_step``, ``conv_impl`` "xla" and
"gemm") into the forward pass alone, forward + backward (``jax.value_and_grad`` of the loss)
and the full step with the SGD update, so the convolutions' share of the step can be read off.

Result (2-core AMD EPYC, jax 0.10.2, torch 2.13.0, tuned malloc, idle; ms at batch 128, summed
over the six convolutions; results/bench/conv_profile.{md,json}):

    pass            XLA    GEMM (jaxprune.ops)   PyTorch   XLA / PyTorch
    forward         71.9                            38.6       1.86
    input grad      74.7                            48.7       1.53
    weight grad     90.3   104.6 (+5.1 transpose)   38.2       2.36
    all three      236.9                           125.5       1.89

    step parts: forward 78.8, forward + backward 231.1, train step 241.2 (gemm: 82.4 / 248.8 /
    243.6); PyTorch's whole step in the same hour: 124.

So the step is convolution time (the six convolutions' passes alone add up to 98% of it); BN,
ReLU, pooling, the dense layers and the update are the rest. Every pass of XLA:CPU's
convolution runs at about half the speed of PyTorch's on this AVX-512 CPU (the largest,
28x28 32->32: 95 GFLOP/s against 205), so layout work around the convolutions cannot reach
1.3x of PyTorch: the GEMM weight gradient (slower than XLA's alone, equal in the step) and the
Eigen path (``no-ynn``: 0.97x of the VGG-small step, 0.84x of ResNet-20's) are the levers left.
The PyTorch per-layer times are taken in the same process right after JAX calls; they add up
to its measured step, so they are not inflated by the JAX thread pool here.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from experiments.bench import torch_zoo
from experiments.bench.timing import take_turns
from jaxprune import train
from jaxprune.models import build_model
from jaxprune.ops import conv as gemm_conv
from jaxprune.runtime import enable_compilation_cache

RESULTS = Path(__file__).resolve().parent.parent / "results" / "bench"
# (spatial size, C_in, C_out) of VGG-small's convolutions on 28x28x1 (pools after 2, 4, 6).
VGG_SMALL_CONVS = [
    (28, 1, 32),
    (28, 32, 32),
    (14, 32, 64),
    (14, 64, 64),
    (7, 64, 128),
    (7, 128, 128),
]
DN = ("NHWC", "HWIO", "NHWC")


def jax_runners(batch: int, size: int, c_in: int, c_out: int, rng: np.random.Generator) -> dict:
    """Blocking callables of the three passes of one SAME 3x3 convolution, XLA and GEMM."""
    x = jnp.asarray(rng.normal(size=(batch, size, size, c_in)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(3, 3, c_in, c_out)), jnp.float32)
    dy = jnp.asarray(rng.normal(size=(batch, size, size, c_out)), jnp.float32)
    spec = gemm_conv._ConvSpec(strides=(1, 1), padding=((1, 1), (1, 1)), precision=None)

    def conv(x, w):
        return lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=DN)

    forward = jax.jit(conv)
    input_grad = jax.jit(lambda x, w, dy: jax.vjp(lambda x: conv(x, w), x)[1](dy)[0])
    weight_grad = jax.jit(lambda x, w, dy: jax.vjp(lambda w: conv(x, w), w)[1](dy)[0])
    x_cmajor = jax.block_until_ready(gemm_conv._channel_major(x))
    gemm_weight = jax.jit(lambda xc, dy: gemm_conv._weight_grad(xc, dy, w.shape, spec))
    np.testing.assert_allclose(
        gemm_weight(x_cmajor, dy), weight_grad(x, w, dy), rtol=2e-3, atol=2e-2
    )
    calls = {
        "xla forward": lambda: forward(x, w),
        "xla input grad": lambda: input_grad(x, w, dy),
        "xla weight grad": lambda: weight_grad(x, w, dy),
        "gemm weight grad": lambda: gemm_weight(x_cmajor, dy),
        "gemm channel-major copy": lambda: jax.jit(gemm_conv._channel_major)(x),
    }
    return {name: (lambda fn=fn: jax.block_until_ready(fn())) for name, fn in calls.items()}


def torch_runners(batch: int, size: int, c_in: int, c_out: int, rng: np.random.Generator):
    """The same three passes in PyTorch (channels_last)."""
    import torch
    import torch.nn.functional as F  # noqa: N812

    last = torch.channels_last
    x = torch.as_tensor(rng.normal(size=(batch, c_in, size, size)), dtype=torch.float32)
    x = x.contiguous(memory_format=last)
    w = torch.as_tensor(rng.normal(size=(c_out, c_in, 3, 3)), dtype=torch.float32)
    w = w.contiguous(memory_format=last)
    dy = torch.as_tensor(rng.normal(size=(batch, c_out, size, size)), dtype=torch.float32)
    dy = dy.contiguous(memory_format=last)
    return {
        "torch forward": lambda: F.conv2d(x, w, padding=1),
        "torch input grad": lambda: torch.nn.grad.conv2d_input(x.shape, w, dy, padding=1),
        "torch weight grad": lambda: torch.nn.grad.conv2d_weight(x, w.shape, dy, padding=1),
    }


def step_runners(batch: int, conv_impl: str, rng: np.random.Generator) -> dict:
    """Forward, forward + backward and the full train step of VGG-small, blocking."""
    model = build_model("vgg_small", torch_zoo.NUM_CLASSES, conv_impl=conv_impl)
    images = jnp.asarray(rng.normal(size=(batch, 28, 28, 1)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, torch_zoo.NUM_CLASSES, batch), jnp.int32)
    state = train.create_train_state(
        model, optax.sgd(0.01, momentum=0.9), jax.random.key(0), images[:1]
    )
    stats = state.variables()["batch_stats"]
    rngs = {"dropout": jax.random.key(1)}

    def loss(params):
        logits, _ = model.apply(
            {"params": params, "batch_stats": stats},
            images,
            train=True,
            mutable=["batch_stats"],
            rngs=rngs,
        )
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    forward = jax.jit(loss)
    backward = jax.jit(jax.value_and_grad(loss))
    batch_dict = {"image": images, "label": labels}
    calls = {
        "forward": lambda: forward(state.params),
        "forward + backward": lambda: backward(state.params),
        "train step": lambda: train.train_step(state, batch_dict),
    }
    return {
        f"{conv_impl} {name}": (lambda fn=fn: jax.block_until_ready(fn()))
        for name, fn in calls.items()
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--per-round", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    enable_compilation_cache()
    have_torch = torch_zoo.peers()["torch"]
    if have_torch:
        torch_zoo.setup_torch()
    else:
        print("PyTorch not installed: its columns are skipped")
    rng = np.random.default_rng(0)
    layers = []
    for size, c_in, c_out in VGG_SMALL_CONVS:
        runners = jax_runners(args.batch, size, c_in, c_out, rng)
        if have_torch:
            runners.update(torch_runners(args.batch, size, c_in, c_out, rng))
        for run in runners.values():
            run()  # compile / warm up
        timing = take_turns(runners, args.rounds, args.per_round)
        layers.append(
            {"layer": f"{size}x{size} {c_in}->{c_out}"}
            | {name: row["median_ms"] for name, row in timing.items()}
        )
        print(f"  {layers[-1]['layer']} done", flush=True)
    steps = {**step_runners(args.batch, "xla", rng), **step_runners(args.batch, "gemm", rng)}
    for run in steps.values():
        run()
    step_ms = {
        name: row["median_ms"]
        for name, row in take_turns(steps, args.rounds, args.per_round).items()
    }
    columns = [key for key in layers[0] if key != "layer"]
    totals = {key: sum(layer[key] for layer in layers) for key in columns}
    lines = [
        f"VGG-small convolutions, batch {args.batch}, ms (median)\n",
        "| layer | " + " | ".join(columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for layer in [*layers, {"layer": "total"} | totals]:
        lines.append(
            f"| {layer['layer']} | " + " | ".join(f"{layer[c]:.1f}" for c in columns) + " |"
        )
    lines += [
        "",
        f"VGG-small step, batch {args.batch}, ms (median)",
        "",
        "| part | ms |",
        "|---|---:|",
    ]
    lines += [f"| {name} | {ms:.1f} |" for name, ms in step_ms.items()]
    table = "\n".join(lines) + "\n"
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "conv_profile.md").write_text(table)
    record = {
        "batch": args.batch,
        "jax": jax.__version__,
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
        "layers": layers,
        "totals": totals,
        "step_ms": step_ms,
    }
    (args.out / "conv_profile.json").write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
