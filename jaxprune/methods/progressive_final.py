"""The last step of progressive simplification: fresh dense layers, then fine-tuning.

After the last convolution is simplified, the authors' code (oPPR, ``final_retrain.py``)
rebuilds the network with *every* dense layer re-initialised (Glorot-uniform kernels, zero
biases, as Keras draws them) and fine-tunes the whole network on the labels: SGD with Nesterov
momentum 0.9 at a fixed 1e-5, batch 8, 50 epochs. `reinit_dense` draws those layers; the
fine-tuning runs through `jaxprune.fit.fit` with the model's own training call (dropout and
BatchNorm statistics as in any training), resuming mid-way from the run directory.

Differences from oPPR, kept on purpose: the epochs are a setting (oPPR: 50); we keep the last
epoch's weights, while oPPR keeps the epoch of lowest training loss; the data order is the
run's, while oPPR does not shuffle.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jaxprune import train
from jaxprune.fit import FitConfig, fit
from jaxprune.methods.progressive_retrain import EpochData, Network
from jaxprune.run import RunDir

PyTree = Any
REINIT = ("dense", "head", "none")


def dense_layers(params: Mapping[str, Any]) -> list[str]:
    """The "/"-joined paths of every dense layer in `params`: nodes holding a 2-D ``kernel``.

    Args:
      params: the ``"params"`` collection (linen, or an NNX state's linen-like view).

    Returns:
      The paths, sorted.
    """
    found = []

    def visit(node: Any, path: tuple[str, ...]) -> None:
        if not isinstance(node, Mapping):
            return
        kernel = node.get("kernel")
        if kernel is not None and not isinstance(kernel, Mapping) and jnp.ndim(kernel) == 2:
            found.append("/".join(path))
        for key, child in node.items():
            if isinstance(child, Mapping):
                visit(child, (*path, str(key)))

    visit(params, ())
    return sorted(found)


def reinit_dense(variables: PyTree, seed: int, layers: Sequence[str] | None = None) -> PyTree:
    """The variables with dense layers re-drawn: Glorot-uniform kernels, zero biases.

    Glorot (Xavier) uniform draws each weight from U(-a, a), ``a = sqrt(6 / (fan_in +
    fan_out))``: Keras's default and what oPPR's final step uses for every dense layer.

    Args:
      variables: the model's variables.
      seed: the seed of the draws (each layer folds in its position in `layers`).
      layers: the params paths of the layers, "/"-separated (e.g. ``("head",)``); None: every
        dense layer (`dense_layers`, the paper's choice).

    Returns:
      New variables; every other leaf is the same object as before.

    Raises:
      ValueError: a path that is not a dense layer, or a model without one.
    """
    params = variables["params"]
    found = dense_layers(params)
    chosen = found if layers is None else list(layers)
    for path in chosen:
        if path not in found:
            raise ValueError(
                f"No dense layer {path!r} in the params (dense layers: {found}); set "
                "ProgressiveConfig.head_layer to the path of the logits layer."
            )
    if not chosen:
        raise ValueError("The model has no dense layer (a 2-D kernel) to re-initialise.")
    initializer = jax.nn.initializers.glorot_uniform()
    fresh = {}
    for index, path in enumerate(chosen):
        node = _at(params, path)
        kernel = node["kernel"]
        key = jax.random.fold_in(jax.random.key(seed), index)
        layer = {**node, "kernel": initializer(key, kernel.shape, kernel.dtype)}
        if "bias" in node:
            layer["bias"] = jnp.zeros_like(node["bias"])
        fresh[path] = layer
    return {**variables, "params": _replaced(params, fresh, ())}


def final_finetune(
    network: Network,
    data: EpochData,
    *,
    epochs: int,
    learning_rate: float,
    momentum: float,
    nesterov: bool,
    reinit: str,
    head_layer: str,
    seed: int,
    run: RunDir | None = None,
    checkpoint_every: int = 200,
    progress: bool = False,
) -> tuple[PyTree, dict[str, Any]]:
    """Re-initialises dense layers, then fine-tunes every layer on the labels.

    Args:
      network: the simplified model.
      data: the training images of the fine-tuning (`progressive_retrain.epoch_data`).
      epochs: passes over them (oPPR: 50).
      learning_rate: a fixed SGD learning rate (oPPR: 1e-5).
      momentum, nesterov: SGD momentum (oPPR: Nesterov, 0.9).
      reinit: "dense" (every dense layer, oPPR), "head" (only `head_layer`, ours) or "none".
      head_layer: the params path of the logits layer, for "head".
      seed: seed of the re-initialisation and of the training call's random streams.
      run: the run directory; the fine-tuning checkpoints as ``checkpoints/finetune`` and
        resumes from it.
      checkpoint_every: steps between two of its checkpoints.
      progress: show a progress bar.

    Returns:
      (variables, {"reinit", "reinitialised", "epochs", "updates", "epoch_loss"}).

    Raises:
      ValueError: an unknown `reinit`; `jaxprune.fit.DivergenceError`: the loss diverged.
    """
    if reinit not in REINIT:
        raise ValueError(f"reinit={reinit!r}; choose one of {REINIT}.")
    variables = network.variables
    layers: list[str] = []
    if reinit != "none":
        layers = dense_layers(variables["params"]) if reinit == "dense" else [head_layer]
        variables = reinit_dense(variables, seed, layers)
    optimizer = train.OptimizerConfig(
        name="sgd",
        learning_rate=learning_rate,
        momentum=momentum,
        nesterov=nesterov and momentum > 0,
        schedule="constant",
    )
    config = FitConfig(
        epochs=epochs, optimizer=optimizer, seed=seed, checkpoint_every=checkpoint_every
    )
    variables, history = fit(
        network.model,
        variables,
        data,
        config,
        run=run,
        name="finetune",
        progress=progress,
        label="final fine-tuning",
    )
    return variables, {
        "reinit": reinit,
        "reinitialised": layers,
        "epochs": epochs,
        "updates": int(history[-1]["step"]) if history else 0,
        "epoch_loss": [float(h["loss"]) for h in history],
    }


def _at(tree: Mapping[str, Any], path: str) -> Mapping[str, Any]:
    node: Any = tree
    for part in path.split("/"):
        node = node[part]
    return node


def _replaced(node: Mapping[str, Any], fresh: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    here = "/".join(path)
    if here in fresh:
        return fresh[here]
    if not any(p == here or p.startswith(here + "/") or not here for p in fresh):
        return node
    return {
        key: _replaced(child, fresh, (*path, str(key))) if isinstance(child, Mapping) else child
        for key, child in node.items()
    }
