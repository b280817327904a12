"""Random variables of a model's shapes without compiling its `init`.

Compiling `model.init` of a deep network costs seconds to tens of seconds on a CPU (XLA compiles
every initialiser); benchmarks and tests that only need realistic random weights fill the
shapes from `jax.eval_shape` with NumPy instead.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def random_variables(model: Any, x: Any, *, seed: int = 0, gain: float = 1.0) -> Any:
    """Variables of `model` for an input like `x`, drawn with NumPy.

    Kernels are normal with standard deviation ``gain / sqrt(fan_in)`` (gain sqrt(2) is He
    initialisation), 1-D parameters and running means normal(0, 1/1) scaled the same way with
    fan-in 1, running variances uniform in [0.5, 1.5] (so eval-mode batch norm is not trivial).

    Args:
      model: a flax.linen module.
      x: an example input (array or `jax.ShapeDtypeStruct`).
      seed: NumPy seed.
      gain: scale of the kernels' standard deviation.

    Returns:
      The variables pytree, as `model.init` would structure it.
    """
    rng = np.random.default_rng(seed)
    abstract = jax.eval_shape(model.init, jax.random.key(0), x)

    def fill(path, s):
        if getattr(path[-1], "key", None) == "var":
            return jnp.asarray(rng.uniform(0.5, 1.5, s.shape), s.dtype)
        fan_in = int(np.prod(s.shape[:-1])) if len(s.shape) > 1 else 1
        return jnp.asarray(rng.normal(0, gain / np.sqrt(fan_in), s.shape), s.dtype)

    return jax.tree_util.tree_map_with_path(fill, abstract)
