"""First-order Taylor criteria: the change of the loss when a channel is removed, to first order.

* On the activations (Molchanov et al., ICLR 2017): removing channel c sets its activation a to
  zero, which changes the loss by about ``-a * dC/da``. The gradient comes from a zero probe at
  each gate point (`gates.activations_and_gradients`), so no weight gradient is computed. The
  loss differentiated is the *sum* of the per-example losses, so row n of the gradient is
  example n's own dC_n/da_n.
* On BatchNorm scales and shifts (Molchanov et al., "Importance Estimation for Neural Network
  Pruning", CVPR 2019): ``(sum g * w)^2`` with g the gradient of the batch loss.
* On the producer weights (the Taylor members of the pool of He et al., ICANN 2021):
  the L1 or L2 norm of ``W_c * dC/dW_c``.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune.criteria.base import (
    Criterion,
    Masks,
    Scores,
    ScoringContext,
    summed_criterion,
)
from jaxprune.criteria.layout import (
    batch_norm_members,
    channel_view,
    leaf_at,
    producer_kernel_paths,
    replace_leaves,
    spatial_axes,
)
from jaxprune.gates import activations_and_gradients, gate_points
from jaxprune.tree_paths import Path

TAYLOR_VARIANTS = ("mean_then_abs", "abs_then_mean", "signed_sum")


@functools.partial(jax.jit, static_argnames=("context",))
def _activation_taylor_batch(
    context: ScoringContext,
    variables: Any,
    image: jax.Array,
    label: jax.Array,
    masks: Masks | None,
) -> dict[str, dict[str, jax.Array]]:
    def summed_loss(output):
        return jnp.sum(context.example_losses(output, label))

    _, _, acts, grads = activations_and_gradients(
        context.apply_fn,
        context.graph,
        variables,
        image,
        summed_loss,
        masks,
        **context.apply_kwargs,
    )
    all_points = gate_points(
        context.apply_fn, context.graph, variables, image, **context.apply_kwargs
    )
    stats = {}
    for group in context.graph.groups:
        points = all_points[group.name]
        signed = jnp.zeros((image.shape[0], group.size))
        of_abs = jnp.zeros((image.shape[0], group.size))
        # Positions are summed at every point and divided by the first point's count M, so a
        # group read at maps of several sizes gets the first-order change of removing the
        # channel everywhere (times 1 / M), and a group read once the paper's spatial mean.
        first = channel_view(acts[group.name][0], points[0], group.size)
        positions = float(np.prod(first.shape[1:-1]))
        for a, g, point in zip(acts[group.name], grads[group.name], points, strict=True):
            product = channel_view(a, point, group.size) * channel_view(g, point, group.size)
            axes = spatial_axes(product)
            signed = signed + product.sum(axes) / positions
            of_abs = of_abs + jnp.abs(product).sum(axes) / positions
        stats[group.name] = {
            "mean_then_abs": jnp.abs(signed).sum(0),
            "abs_then_mean": of_abs.sum(0),
            "signed_sum": signed.sum(0),
            "count": jnp.asarray(image.shape[0], jnp.float32),
        }
    return stats


def taylor(*, variant: str = "mean_then_abs") -> Criterion:
    """First-order Taylor expansion on the activations (Molchanov et al., "Pruning
    Convolutional Neural Networks for Resource Efficient Inference", ICLR 2017, Eq. 8).

    With ``a[n, p, c]`` the activation of example n at position p and ``g = dC_n/da`` its
    gradient, the per-example term is ``t[n, c] = (1 / M) sum_points sum_p a[n, p, c] g[n, p, c]``
    with M the number of positions of the group's first gate point. For a group read at one
    point this is the paper's spatial mean of ``a g``; for a group read at several (a residual
    stage whose maps have different sizes) every position of every point counts once, so
    ``M t[n, c]`` is the derivative of example n's loss with respect to the channel's mask and
    ``-M t[n, c]`` the first-order change of that loss when channel c is removed everywhere.

    The variants place the absolute value differently (N examples over all batches):

    * ``"mean_then_abs"`` (default, Eq. 8): ``s_c = (1 / N) sum_n |t[n, c]|``.
    * ``"abs_then_mean"``: ``s_c = (1 / N) sum_n (1 / M) sum_points sum_p |a g|``.
    * ``"signed_sum"``: ``s_c = |(1 / N) sum_n t[n, c]|``, the first-order change of the mean
      loss over the data.

    All three are sums over examples, so any split into batches gives the same scores.

    Args:
      variant: one of "mean_then_abs", "abs_then_mean", "signed_sum".

    Returns:
      The criterion "taylor" (default variant) or "taylor_<variant>".
    """
    if variant not in TAYLOR_VARIANTS:
        raise ValueError(f"Unknown Taylor variant {variant!r}; choose one of {TAYLOR_VARIANTS}.")
    name = "taylor" if variant == "mean_then_abs" else f"taylor_{variant}"

    return summed_criterion(
        name,
        _activation_taylor_batch,
        lambda state, *_: {n: np.abs(st[variant] / st["count"]) for n, st in state.items()},
    )


def _all_batch_norm_members(graph: Any, which: str) -> dict[str, list]:
    return {g.name: batch_norm_members(graph, g, which) for g in graph.groups}


@functools.partial(jax.jit, static_argnames=("context", "which"))
def _batch_norm_taylor_batch(
    context: ScoringContext,
    variables: Any,
    image: jax.Array,
    label: jax.Array,
    masks: Masks | None,
    which: str,
) -> dict[str, jax.Array]:
    by_group = _all_batch_norm_members(context.graph, which)
    leaves = {p: leaf_at(variables, p) for members in by_group.values() for p, _ in members}

    def mean_loss(bn_leaves):
        output = context.output(replace_leaves(variables, bn_leaves), image, masks)
        return jnp.mean(context.example_losses(output, label))

    grads = jax.grad(mean_loss)(leaves)

    def own(value, positions):  # a BatchNorm after a concatenation: this group's channels
        return value if positions is None else jnp.take(value, jnp.asarray(positions))

    return {
        name: sum(own(grads[p] * leaves[p], pos) for p, pos in members) ** 2
        for name, members in by_group.items()
        if members
    }


def _batch_norm_taylor(which: str) -> Criterion:
    name = "taylor_bn_gamma" if which == "scale" else "taylor_bn_beta"

    def batch_stats(context, variables, image, label, masks) -> dict:
        per_batch = _batch_norm_taylor_batch(context, variables, image, label, masks, which)
        return {"sum": per_batch, "batches": np.float64(1.0)}

    return summed_criterion(
        name,
        batch_stats,
        lambda state, *_: {n: s / state["batches"] for n, s in state["sum"].items()},
    )


def taylor_bn_gamma() -> Criterion:
    """Taylor-FO on the BatchNorm scales (Molchanov et al., "Importance Estimation for Neural
    Network Pruning", CVPR 2019, Eq. 8 applied to gamma).

    For one batch, with C the mean loss of the batch and ``g_b = dC/dgamma_b`` for each
    BatchNorm layer b of the group: ``I_c = (sum_b g_b[c] * gamma_b[c])^2`` (the sum runs over
    the group's BatchNorm layers, several in a residual stage). The score is I_c averaged over
    the batches (so it depends on how the data is batched, as in the paper). Groups without
    BatchNorm are left out of the result.

    Returns:
      The criterion "taylor_bn_gamma".
    """
    return _batch_norm_taylor("scale")


def taylor_bn_beta() -> Criterion:
    """Taylor-FO on the BatchNorm shifts: as `taylor_bn_gamma` with beta in place of gamma,
    ``I_c = (sum_b dC/dbeta_b[c] * beta_b[c])^2`` averaged over batches.

    Returns:
      The criterion "taylor_bn_beta".
    """
    return _batch_norm_taylor("bias")


def _all_kernel_paths(graph: Any) -> list[Path]:
    return sorted({p for g in graph.groups for p, _ in producer_kernel_paths(g)})


@functools.partial(jax.jit, static_argnames=("context",))
def _kernel_gradient_batch(
    context: ScoringContext,
    variables: Any,
    image: jax.Array,
    label: jax.Array,
    masks: Masks | None,
) -> dict[str, Any]:
    kernels = {p: leaf_at(variables, p) for p in _all_kernel_paths(context.graph)}

    def summed_loss(k):
        output = context.output(replace_leaves(variables, k), image, masks)
        return jnp.sum(context.example_losses(output, label))

    return {
        "grad_sum": jax.grad(summed_loss)(kernels),
        "count": jnp.asarray(image.shape[0], jnp.float32),
    }


def _weight_taylor(order: int) -> Criterion:
    name = f"taylor_weight_l{order}"

    def finish(state: Any, context: ScoringContext, variables: Any, masks: Any) -> Scores:
        scores = {}
        for group in context.graph.groups:
            rows = []
            for path, axis in producer_kernel_paths(group):
                kernel = np.asarray(leaf_at(variables, path), np.float64)
                grad = state["grad_sum"][path] / state["count"]
                rows.append(np.moveaxis(kernel * grad, axis, 0).reshape(group.size, -1))
            product = np.concatenate(rows, axis=1)
            scores[group.name] = np.linalg.norm(product, ord=order, axis=1)
        return scores

    return summed_criterion(name, _kernel_gradient_batch, finish)


def taylor_weight_l1() -> Criterion:
    """L1 norm of the weights times their gradient (the weight Taylor criterion of the pool of
    He et al., "Blending Pruning Criteria for Convolutional Neural Networks", ICANN 2021).

    ``s_c = sum_i |W_c[i] * G_c[i]|`` with ``G = dC/dW`` the gradient of the mean loss over all
    the examples of all batches (accumulated as a sum, so any batching gives the same scores),
    over the producer kernels' slices for channel c, concatenated as for `l1`.

    Returns:
      The criterion "taylor_weight_l1".
    """
    return _weight_taylor(1)


def taylor_weight_l2() -> Criterion:
    """L2 norm of the weights times their gradient: ``s_c = ||W_c * G_c||_2``, with G as in
    `taylor_weight_l1`.

    Returns:
      The criterion "taylor_weight_l2".
    """
    return _weight_taylor(2)
