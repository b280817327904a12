"""oneDNN convolutions on CPU: an XLA:CPU lowering of ``conv_general_dilated`` to oneDNN.

XLA:CPU's three convolution passes (forward, input gradient, weight gradient) ran 1.5-2.4x
slower than PyTorch's oneDNN kernels on the benchmark machine
(``experiments/results/bench/conv_profile.md``). This module lowers the convolutions it
recognises to custom calls into ``libjaxprune_onednn.so`` (``onednn_conv.cc``, built by
``python -m jaxprune.ops.onednn_build``), which runs oneDNN's primitives; the timings are in
``experiments/results/bench/onednn.md``.

As with `jaxprune.ops.lowering`, the model's program keeps its ``conv_general_dilated``: only
the CPU lowering changes, so the channel graph, gates and autodiff are untouched. JAX's
gradient of a convolution is two more ``conv_general_dilated`` equations, recognised by their
dimension numbers:

* forward (NHWC input, kernel with spatial axes first, NHWC output, no ``lhs_dilation``):
  oneDNN's forward convolution. The input gradient of a stride-1 convolution has this form
  too (reversed kernel, feature axes swapped) and is computed as one;
* input gradient of a strided convolution (same layout, ``lhs_dilation`` = the strides, unit
  window strides): oneDNN's backward-data primitive on the kernel reversed back (XLA cancels
  the two reversals);
* weight gradient (input and cotangent with batch and feature axes swapped, HWIO output,
  ``batch_group_count`` = the feature groups): oneDNN's backward-weights primitive, with the
  strides and the dilation swapped back.

Everything else (other dtypes than float32, other dimension numbers, padding outside
``[0, dilated kernel - 1]``, empty arrays, and every convolution of a program lowered for
``jax.export``, which must run without this library) goes to the lowering that was installed
before,
and so do the one-channel convolutions that `jaxprune.ops.lowering` handles when it is in
front of this one. `use_onednn_lowering` installs the rule for this process (not the default;
``JAXPRUNE_ONEDNN=0`` keeps it off even when asked for).
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax import lax
from jax.interpreters import mlir

from jaxprune.ops import lowering
from jaxprune.ops.onednn_build import BUILD_COMMAND, LIBRARY, is_stale

# Set to 0 to keep XLA's convolutions even where use_onednn_lowering is called.
OPT_OUT_ENV = "JAXPRUNE_ONEDNN"
TARGETS = {
    "forward": "jaxprune_onednn_conv_forward",
    "backward_data": "jaxprune_onednn_conv_backward_data",
    "backward_weights": "jaxprune_onednn_conv_backward_weights",
}
_SYMBOLS = {
    "forward": "JaxpruneOnednnConvForward",
    "backward_data": "JaxpruneOnednnConvBackwardData",
    "backward_weights": "JaxpruneOnednnConvBackwardWeights",
}
_NHWC = (0, 3, 1, 2)
# The weight gradient's dimension numbers: channels as the batch, batch as the features.
_WGRAD_LHS = (3, 0, 1, 2)
_WGRAD_OUT = (2, 3, 0, 1)
# Read when a function is lowered (compiled), so a benchmark can compile variants side by side
# in one process; a jitted function keeps what it was compiled with. "active": False lowers
# to the previous rule. "blocked_activations": oneDNN picks its own (blocked) activation
# layouts, with reorders around each call, instead of computing on the NHWC buffers directly.
# "min_positions": convolutions whose output has fewer positions (batch x height x width) stay
# with XLA, where a oneDNN call's fixed cost (buffers, weight reorder, dispatch) outweighs its
# faster kernel (measured on VGG-small at batch 1; see experiments/results/bench/bench.md).
settings = {"active": True, "blocked_activations": False, "min_positions": 2048}
_lock = threading.Lock()
_state: dict[str, Any] = {}


def _load() -> ctypes.CDLL | None:
    """Loads the library and registers its FFI targets once; None when it is not built."""
    with _lock:
        if "library" in _state:
            return _state["library"]
        library = None
        # A library older than its source may lack what this module calls: not loaded (the
        # install script rebuilds it).
        if LIBRARY.exists() and not is_stale(LIBRARY):
            try:
                library = ctypes.CDLL(str(LIBRARY))
                library.JaxpruneOnednnVersion.restype = ctypes.c_int64
                library.JaxpruneOnednnSetCacheCapacity.argtypes = [ctypes.c_int64]
                for kind, target in TARGETS.items():
                    handler = jax.ffi.pycapsule(getattr(library, _SYMBOLS[kind]))
                    jax.ffi.register_ffi_target(target, handler, platform="cpu")
            except (OSError, AttributeError):  # built against another oneDNN, or broken
                library = None
        _state["library"] = library
        return library


def available() -> bool:
    """Whether the oneDNN library is built and loads (then the lowering can be installed)."""
    return _load() is not None


def onednn_version() -> str | None:
    """The oneDNN version the library runs with (``"2.6.3"``), or None when not available."""
    library = _load()
    if library is None:
        return None
    code = int(library.JaxpruneOnednnVersion())
    return f"{code // 10000}.{code // 100 % 100}.{code % 100}"


def set_threads(threads: int = 1, chunks: int | None = None) -> bool:
    """Sets how oneDNN's convolutions use the cores, for the calls that follow.

    oneDNN's OpenMP threads run beside XLA's pool. On the loaded 2-core benchmark machine an
    OpenMP team of two was in some runs 2x slower than one thread (24 against 12.5 ms for
    a 28x28 32->32 forward at batch 128: its barriers wait for a descheduled member), in
    others as fast. So by default the batch is cut into one slice per thread of XLA's pool,
    and the slices run side by side there, one OpenMP thread each, which never
    oversubscribes the cores (``experiments/results/bench/onednn.md`` has the measurements).

    Args:
      threads: OpenMP threads of a call whose batch is not sliced; 0 for OpenMP's default
        (``OMP_NUM_THREADS``, else the number of cores).
      chunks: batch slices per call; None for one per thread of XLA's pool, 1 for no slicing.

    Returns:
      False when the library is not available (nothing to set).
    """
    library = _load()
    if library is None:
        return False
    slices = 0 if chunks is None else max(chunks, 1)
    library.JaxpruneOnednnSetThreads(ctypes.c_int(max(threads, 0)), ctypes.c_int(slices))
    return True


def set_cache_capacity(capacity: int = 256) -> bool:
    """Sets how many oneDNN primitives the library keeps (at least 1; default 256).

    Each primitive holds JIT-compiled code in memory mappings of its own, and a long pruning
    run meets new shapes at every step, so the least recently used primitive goes when the
    cache is full (it is made again if its shape comes back). A call running an evicted
    primitive keeps it until it ends.

    Returns:
      False when the library is not available.
    """
    library = _load()
    if library is None:
        return False
    library.JaxpruneOnednnSetCacheCapacity(ctypes.c_int64(max(int(capacity), 1)))
    return True


def _row_major_strides(shape: Sequence[int]) -> list[int]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return strides[::-1]


def _high_padding(exact: int, stride: int) -> int | None:
    """oneDNN's high padding for a gradient whose exact value may be negative (a crop).

    A crop smaller than the stride only drops positions that no window reaches, so 0 gives
    the same output size; a larger one cannot be expressed.
    """
    if exact >= 0:
        return exact
    return 0 if -exact < stride else None


def plan(lhs: Any, rhs: Any, out: Any, **params: Any) -> tuple[str, np.ndarray, bool] | None:
    """How a ``conv_general_dilated`` equation maps to a oneDNN primitive, if it does.

    Args:
      lhs: the first operand's abstract value (shape and dtype).
      rhs: the second operand's.
      out: the result's.
      **params: the equation's parameters.

    Returns:
      ``(kind, problem, reverse)``: the key of `TARGETS`, the handler's ``problem`` attribute
      (layout in ``onednn_conv.cc``) and whether the kernel's spatial axes must be reversed
      first; None for a convolution this module leaves to XLA.
    """
    if any(len(a.shape) != 4 or a.dtype != np.float32 for a in (lhs, rhs, out)):
        return None
    if any(size == 0 for a in (lhs, rhs, out) for size in a.shape):
        return None
    preferred = params.get("preferred_element_type")
    if preferred is not None and np.dtype(preferred) != np.float32:
        return None
    dn = params["dimension_numbers"]
    specs = (tuple(dn.lhs_spec), tuple(dn.rhs_spec), tuple(dn.out_spec))
    window_strides = tuple(params["window_strides"])
    lhs_dilation = tuple(params.get("lhs_dilation") or (1, 1))
    rhs_dilation = tuple(params.get("rhs_dilation") or (1, 1))
    padding = tuple(tuple(int(p) for p in pair) for pair in params["padding"])
    features = params.get("feature_group_count", 1)
    batches = params.get("batch_group_count", 1)

    if specs[0] == _NHWC and specs[2] == _NHWC and specs[1][2:] == (0, 1) and batches == 1:
        out_dim, in_dim = specs[1][:2]
        n, ih, iw, ic = lhs.shape
        _, oh, ow, oc = out.shape
        kh, kw = rhs.shape[:2]
        st = _row_major_strides(rhs.shape)
        if lhs_dilation == (1, 1):
            # forward: lhs is the input, out the output
            if oc % features:
                return None
            strides, dilation, pads = window_strides, rhs_dilation, padding
            weights = ((oc // features) * st[out_dim], st[out_dim], st[in_dim])
            kind, reverse = "forward", False
        elif window_strides == (1, 1):
            # input gradient of a strided convolution: lhs is the cotangent, out the input's
            # gradient, the kernel reversed with its feature axes swapped
            n, ih, iw, ic, oh, ow, oc = n, oh, ow, oc, ih, iw, ic
            if oc % features or ic % features:
                return None
            strides, dilation = lhs_dilation, rhs_dilation
            pads = []
            for (low, high), k, d in zip(padding, (kh, kw), dilation, strict=True):
                extent = (k - 1) * d + 1
                pads.append((extent - 1 - low, extent - 1 - high))
            weights = ((ic // features) * st[out_dim], st[in_dim], st[out_dim])
            kind, reverse = "backward_data", True
        else:
            return None
    elif specs == (_WGRAD_LHS, _WGRAD_LHS, _WGRAD_OUT) and features == 1:
        # weight gradient: lhs is the input, rhs the output's cotangent, out HWIO
        if lhs_dilation != (1, 1):
            return None
        n, ih, iw, ic = lhs.shape
        _, oh, ow, oc = rhs.shape
        kh, kw = out.shape[:2]
        if ic % batches or oc % batches or out.shape[2] * batches != ic:
            return None
        features = batches
        strides, dilation = rhs_dilation, window_strides
        pads = []
        for (low, _), k, d, o, i, s in zip(
            padding, (kh, kw), dilation, (oh, ow), (ih, iw), strides, strict=True
        ):
            pads.append((low, (o - 1) * s + (k - 1) * d + 1 - i - low))
        st = _row_major_strides(out.shape)
        weights = ((oc // features) * st[3], st[3], st[2])
        kind, reverse = "backward_weights", False
    else:
        return None

    if kind != "forward":
        clamped = []
        for (low, high), s in zip(pads, strides, strict=True):
            high = _high_padding(high, s)
            if high is None:
                return None
            clamped.append((low, high))
        pads = clamped
    for (low, high), k, d in zip(pads, (kh, kw), dilation, strict=True):
        if not (0 <= low <= (k - 1) * d and 0 <= high <= (k - 1) * d):
            return None
    problem = np.array(
        [n, ic, ih, iw, oc, oh, ow, kh, kw, features]
        + [*strides, *(d - 1 for d in dilation)]
        + [pads[0][0], pads[1][0], pads[0][1], pads[1][1]]
        + [*weights, st[0], st[1]]
        + [int(settings["blocked_activations"])],
        dtype=np.int64,
    )
    return kind, problem, reverse


def _positions(problem: np.ndarray) -> int:
    """Output positions of the forward convolution a problem describes (n x oh x ow)."""
    return int(problem[0] * problem[5] * problem[6])


def _rule(ctx: Any, lhs: Any, rhs: Any, **params: Any) -> Any:
    lhs_aval, rhs_aval = ctx.avals_in
    previous = _state["previous"]
    # off, exported (a serialised program must not call this process's library), or one input
    # channel (the shifted sum of jaxprune.ops.lowering): the previous rule
    parameters = getattr(ctx.module_context, "lowering_parameters", None)
    exporting = getattr(parameters, "for_export", False)
    if not settings["active"] or exporting or lowering.handles(lhs_aval, rhs_aval, **params):
        return previous(ctx, lhs, rhs, **params)
    planned = plan(lhs_aval, rhs_aval, ctx.avals_out[0], **params)
    if planned is not None and _positions(planned[1]) < settings["min_positions"]:
        planned = None
    if planned is None:
        return previous(ctx, lhs, rhs, **params)
    kind, problem, reverse = planned
    if reverse:
        rhs = _state["hlo"].reverse(rhs, mlir.dense_int_array([0, 1]))
    return jax.ffi.ffi_lowering(TARGETS[kind])(ctx, lhs, rhs, problem=problem)


def enabled_by_environment() -> bool:
    """False when ``JAXPRUNE_ONEDNN=0`` (or empty) turns the lowering off for this process."""
    return os.environ.get(OPT_OUT_ENV, "1") not in ("", "0")


def use_onednn_lowering() -> bool:
    """Installs the oneDNN lowering for ``conv_general_dilated`` on CPU (once).

    Functions compiled before the call keep their lowering.

    Returns:
      True when the rule is installed (now or before); False when the library is not built
      (``python -m jaxprune.ops.onednn_build``), ``JAXPRUNE_ONEDNN=0`` turns it off, or this
      JAX does not expose the lowering to fall back to; then nothing changes.
    """
    if "previous" in _state:
        return True
    if not enabled_by_environment() or not available():
        return False
    previous = lowering.current_cpu_rule()
    try:
        from jax._src.lib.mlir.dialects import hlo
    except ImportError:
        previous = None
    if previous is None:  # another JAX: keep its lowering
        return False
    _state["hlo"] = hlo
    _state["previous"] = previous
    mlir.register_lowering(lax.conv_general_dilated_p, _rule, platform="cpu")
    return True


def is_installed() -> bool:
    """Whether `use_onednn_lowering` installed the rule in this process."""
    return "previous" in _state


__all__ = [
    "BUILD_COMMAND",
    "OPT_OUT_ENV",
    "TARGETS",
    "available",
    "enabled_by_environment",
    "is_installed",
    "onednn_version",
    "plan",
    "set_cache_capacity",
    "set_threads",
    "use_onednn_lowering",
]
