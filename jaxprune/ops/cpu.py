"""Settings that make XLA:CPU training steps faster, measured on a 2-core x86 machine.

Two independent levers: the malloc settings of the process (`GLIBC_TUNABLES`) and the compiler
options of a jitted function (`cpu_compiler_options`).

Malloc.
XLA:CPU allocates the temporary buffers of every execution afresh. With glibc's default malloc,
buffers above the mmap threshold (at most 32 MiB) come straight from the kernel and are given
back on free, so each step page-faults its whole working set again: about 52,000 minor faults
(200 MiB) per VGG-small training step at batch 128, a large share of the step. Making malloc
keep its memory (one arena, no per-buffer mmap, no trimming) and back it with transparent huge
pages removes nearly all of them (about 35 faults per step).

glibc reads these tunables once, when the process starts, so they cannot be switched on from
Python: a launcher sets ``GLIBC_TUNABLES`` for the process it starts, e.g.::

    env GLIBC_TUNABLES="$(python -c 'import jaxprune.ops as o; print(o.GLIBC_TUNABLES)')" \\
        python train.py

or re-executes itself once with `tuned_environ` (see ``experiments/bench/train_step.py``).
The price is memory that stays with the process after a peak instead of returning to the
system. Other allocators and non-glibc systems ignore the variable.

Compiler options. jaxlib 0.10 hands convolutions and matrix products on CPU to YNNPACK fusions.
XLA's own (Eigen) convolutions spread better over the cores: measured with ``python -m
experiments.bench`` (2-core x86, jaxlib 0.10.2, batch 128, both in one process), the train step
without YNNPACK took 0.83x (LeNet-5), 0.85x (VGG-small) and 0.76x (ResNet-20) of the stock time,
with other processes on the cores for the first two (earlier idle runs: 0.76x, 0.97x, 0.84x);
the rows of ``experiments/bench/run_all.py`` compare it with the stock options. So it is the
default on CPU: importing `jaxprune.ops` (which the zoo and `jaxprune.train` do) calls
`use_cpu_defaults`, which adds ``--xla_cpu_experimental_ynn_fusion_type=`` to ``XLA_FLAGS``
for the process, when

* the jaxlib is one where it was measured (0.10.x: the option is experimental, and XLA aborts
  on a flag it does not know);
* ``XLA_FLAGS`` does not set that option already (a user's choice wins);
* ``JAXPRUNE_STOCK_XLA_CPU`` is unset or ``0`` (the opt-out: ``JAXPRUNE_STOCK_XLA_CPU=1``);
* no JAX backend has started yet (XLA reads its flags once; after that the call does nothing).

Unless opted out, it also installs `jaxprune.ops.lowering`'s CPU lowering of convolutions
that read one input channel (a shifted sum, 7x faster on LeNet-5's first layer) and, where its
library is built, `jaxprune.ops.onednn`'s lowering of the other convolutions and their
gradients to oneDNN (``experiments/results/bench/bench.md`` compares it with XLA's; opt out
with ``JAXPRUNE_ONEDNN=0``).

An ``xla_cpu_*`` flag changes only what XLA compiles for the CPU, so accelerators are never
affected. For one function, `cpu_compiler_options` gives the same choice as ``compiler_options``
of `jax.jit` and `stock_cpu_compiler_options` the stock one::

    step = jax.jit(train_step, compiler_options=cpu_compiler_options())

jaxlib 0.10.2 also links oneDNN, but its options (``xla_cpu_use_onednn``,
``xla_cpu_experimental_onednn_custom_call``) left the convolutions' times unchanged
(VGG-small's 28x28 32->32 layer, batch 128: forward 19.8 against 19.9 ms, weight gradient
24.6 against 23.4 ms), so they are not used.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping, MutableMapping
from typing import Any

import jax
import jax.numpy as jnp

from jaxprune.ops.lowering import use_single_channel_lowering

# one arena / no per-buffer mmap / never trim / huge pages for the heap (glibc >= 2.35).
GLIBC_TUNABLES = ":".join(
    [
        "glibc.malloc.arena_max=1",
        "glibc.malloc.mmap_max=0",
        "glibc.malloc.trim_threshold=68719476736",
        "glibc.malloc.hugetlb=1",
    ]
)


# XLA:CPU options (jaxlib 0.10.2): no YNNPACK fusions, so convolutions and dots use Eigen.
_YNN_OPTION = "xla_cpu_experimental_ynn_fusion_type"
_CPU_OPTIONS: Mapping[str, Any] = {_YNN_OPTION: ""}
# jaxlib 0.10's own default, to ask for it back in one function.
_STOCK_OPTIONS: Mapping[str, Any] = {
    _YNN_OPTION: "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"
}
# jaxlib versions on which the default was measured (and whose XLA knows the flag).
_MEASURED_JAXLIB = ("0.10.",)
# Set to 1 to keep XLA:CPU's stock options.
OPT_OUT_ENV = "JAXPRUNE_STOCK_XLA_CPU"


@functools.cache
def _compiler_accepts(items: tuple[tuple[str, Any], ...]) -> bool:
    """Whether this jaxlib knows every option (they are experimental and may be renamed)."""
    try:
        fn = jax.jit(lambda x: x + 1, compiler_options=dict(items))
        fn.lower(jnp.zeros((), jnp.float32)).compile()
    except Exception:  # jaxlib raises its own runtime error type for unknown options
        return False
    return True


def cpu_compiler_options(platform: str | None = None) -> dict[str, Any]:
    """Returns ``compiler_options`` for `jax.jit` that speed up convnet training on a CPU.

    Args:
      platform: the platform the function will run on; defaults to `jax.default_backend()`.

    Returns:
      The options for ``"cpu"`` when this jaxlib accepts them; ``{}`` for other platforms
      and for a jaxlib that does not know them, so the result is always safe to pass.

    Example:
      >>> step = jax.jit(lambda x: x * 2, compiler_options=cpu_compiler_options())
    """
    if (platform or jax.default_backend()) != "cpu":
        return {}
    items = tuple(sorted(_CPU_OPTIONS.items()))
    return dict(items) if _compiler_accepts(items) else {}


def stock_cpu_compiler_options(platform: str | None = None) -> dict[str, Any]:
    """``compiler_options`` for `jax.jit` that restore jaxlib's stock XLA:CPU choices (YNNPACK
    fusions) for one function, whatever the process default is.

    Args:
      platform: as for `cpu_compiler_options`.

    Returns:
      The options on a CPU with a jaxlib that accepts them, else ``{}``.
    """
    if (platform or jax.default_backend()) != "cpu":
        return {}
    items = tuple(sorted(_STOCK_OPTIONS.items()))
    return dict(items) if _compiler_accepts(items) else {}


def _backends_started() -> bool:
    try:
        from jax._src import xla_bridge

        return bool(xla_bridge.backends_are_initialized())
    except (ImportError, AttributeError):  # private API: assume started, so nothing is set
        return True


def use_cpu_defaults(environ: MutableMapping[str, str] | None = None) -> bool:
    """Makes XLA:CPU compile without YNNPACK fusions in this process (see the module docs),
    and lowers one-channel convolutions as shifted sums (`jaxprune.ops.lowering`).

    Args:
      environ: the environment to edit; defaults to `os.environ` (children inherit it).

    Returns:
      True when this call added the option; False when it left ``XLA_FLAGS`` alone (the flags
      name the option already, opted out, another jaxlib, or a backend already started).
    """
    env = os.environ if environ is None else environ
    if env.get(OPT_OUT_ENV, "0") not in ("", "0"):
        return False
    use_single_channel_lowering()
    # oneDNN's convolutions, in front of XLA's, where the library is built (a no-op when not,
    # or with JAXPRUNE_ONEDNN=0).
    from jaxprune.ops.onednn import use_onednn_lowering

    use_onednn_lowering()
    flags = env.get("XLA_FLAGS", "")
    if _YNN_OPTION in flags:
        return False
    if not jaxlib_version().startswith(_MEASURED_JAXLIB) or _backends_started():
        return False
    env["XLA_FLAGS"] = f"{flags} --{_YNN_OPTION}=".strip()
    return True


def jaxlib_version() -> str:
    """The installed jaxlib's version string."""
    import jaxlib

    return str(getattr(jaxlib, "__version__", ""))


def tuned_environ(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Returns a copy of an environment with the malloc tunables of this module added.

    A tunable the environment already sets in ``GLIBC_TUNABLES`` keeps its value; only the
    ones it does not name are added.

    Args:
      environ: the environment to extend; defaults to `os.environ`.

    Returns:
      A new dict, for `subprocess.run(..., env=...)` or `os.execve`.
    """
    env = dict(os.environ if environ is None else environ)
    existing = [item for item in env.get("GLIBC_TUNABLES", "").split(":") if item]
    named = {item.split("=", 1)[0] for item in existing}
    added = [item for item in GLIBC_TUNABLES.split(":") if item.split("=", 1)[0] not in named]
    env["GLIBC_TUNABLES"] = ":".join(existing + added)
    return env


def has_tuned_malloc(environ: Mapping[str, str] | None = None) -> bool:
    """Whether an environment already carries every tunable of `GLIBC_TUNABLES`.

    Args:
      environ: the environment to check; defaults to `os.environ`.

    Returns:
      True when each ``name=value`` of `GLIBC_TUNABLES` appears in its ``GLIBC_TUNABLES``.
    """
    env = os.environ if environ is None else environ
    present = set(env.get("GLIBC_TUNABLES", "").split(":"))
    return all(item in present for item in GLIBC_TUNABLES.split(":"))
