"""Shared helpers of the core tests: build a model, pick random keeps, compare outputs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune.models.widths import widths_from_params


def init(model, x, seed: int = 0):
    """Initialises a model and perturbs its batch statistics so eval mode is not trivial."""
    variables = model.init(jax.random.key(seed), x)
    variables = dict(variables)
    if "batch_stats" in variables:
        rng = np.random.default_rng(seed)
        variables["batch_stats"] = jax.tree_util.tree_map_with_path(
            lambda p, v: jnp.asarray(
                rng.uniform(0.5, 1.5, v.shape)
                if p[-1].key == "var"
                else rng.normal(0, 0.1, v.shape),
                v.dtype,
            ),
            variables["batch_stats"],
        )
    return variables


def random_keep(graph, seed: int) -> dict[str, np.ndarray]:
    """A random non-empty subset of every group's channels."""
    rng = np.random.default_rng(seed)
    keep = {}
    for g in graph.groups:
        n = int(rng.integers(1, g.size + 1))
        keep[g.name] = np.sort(rng.choice(g.size, n, replace=False))
    return keep


def rebuild(model, pruned_variables):
    """The same module class built from the pruned parameters' width spec."""
    widths = widths_from_params(pruned_variables["params"])
    return model.clone(widths=tuple(sorted(widths.items())))


def load_experiment(name: str):
    """An experiment script of experiments/ as a module (they are not a package)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "experiments" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def simulated_devices_env(devices: int, **extra: str) -> dict[str, str]:
    """The environment of a CPU process with `devices` simulated XLA devices."""
    import os

    return dict(
        os.environ,
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        JAX_PLATFORMS="cpu",
        **extra,
    )
