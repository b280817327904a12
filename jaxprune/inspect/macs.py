"""The MACs that go with one kernel of a group: what removing it saves, per example."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from jaxprune.cost import channel_cost, count
from jaxprune.graph import ChannelGraph


def macs_per_kernel(
    apply_fn: Callable[..., Any],
    variables: Any,
    graph: ChannelGraph,
    group: str,
    x: Any,
    **apply_kwargs: Any,
) -> float:
    """The multiply-accumulates per example that removing one kernel of `group` saves.

    ``sum_{p in producers} M_p / out_p + sum_{q in consumers} M_q * k_q / in_q``, with M a
    layer's MACs (`jaxprune.cost.count`), out_p its output channels, in_q its input features
    and k_q how many of them one channel feeds (1 for a conv, H * W for a dense layer after a
    flatten). A layer that both produces and consumes the group (a depthwise conv) counts once.
    Every term is linear in the group's width, so removing n kernels saves n times this.

    Args:
      apply_fn: the model function; variables: arrays or `jax.ShapeDtypeStruct`s; graph: the
        channel graph; group: the group's name.
      x: an example input (its shape matters, not its values).
      **apply_kwargs: passed to `apply_fn`; default ``train=False``.

    Returns:
      MACs per example (a float: a dense consumer's share may be fractional in principle).
    """
    report = count(apply_fn, variables, x, **{"train": False, **apply_kwargs})
    return channel_cost(report, graph[group], "macs")
