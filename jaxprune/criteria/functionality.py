"""Filter functionality by visualisation (Qin et al., BMVC 2019, arXiv 1810.07322).

A filter's *functionality* is what it responds to. Following Qin et al., it is read off an
activation-maximisation image: gradient ascent on the input, from a seeded noise image, to
maximise the filter's mean activation

    J_f(x) = mean_{n, h, w} a_f(x)[n, h, w] - l2_weight * mean(x^2) - tv_weight * TV(x)

where a_f is channel f of the layer's group read at its gate point (where the next layer reads
it: after BatchNorm, the nonlinearity and any pooling), TV(x) is the mean absolute difference
of neighbouring pixels, and each step moves x by `step_size` times the gradient divided by its
root mean square (so the step size is in input units, whatever the scale of the activations).
Each step sees the image shifted by a random jitter, and a light Gaussian blur is applied every
`blur_every` steps, both to keep the image free of high-frequency noise.

Every filter of a layer starts from the *same* noise image and sees the *same* jitter sequence,
so two filters get different images only because they compute different things (two identical
filters get identical images). All filters of a layer are computed at once: the ascent of one
filter is `jax.vmap`-ed over the filter index (in chunks of `chunk_size` filters to bound
memory), which equals running them one at a time.

A filter that is flat at the start image (a ReLU filter silent on it) gets no gradient, and
its image is shaped by the penalties, jitter and blur alone, the same for every such filter;
`responsive_filters` finds those, so that their identical images are not read as identical
functions.

Similarity of two filters is the cosine similarity of their image descriptors: by default the
raw pixels of each image after standardisation (zero mean, unit variance per image, which makes
the cosine a Pearson correlation and ignores brightness and contrast).

This module holds no registry criterion: functionality is a pairwise relation between filters,
not a per-channel score, so it does not fit `jaxprune.criteria.score`. The method that prunes by
it is `jaxprune.methods.functional`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune.gates import gate_points, gated_call
from jaxprune.graph import ChannelGraph, GatePoint

NORMALIZATIONS = ("standardize", "l2", "none")
DESCRIPTORS = ("pixels", "pooled")


@dataclasses.dataclass(frozen=True)
class VisualizationConfig:
    """How activation-maximisation images are made (the knobs the paper leaves open)."""

    # Gradient-ascent steps per image.
    steps: int = 64
    # Step length in input units: each step adds step_size * g / rms(g) to the image.
    step_size: float = 0.05
    # Weight of the L2 penalty mean(x^2) (keeps the image bounded).
    l2_weight: float = 0.05
    # Weight of the total-variation penalty (mean |x[i+1] - x[i]| over both image axes).
    tv_weight: float = 0.5
    # Each step sees the image rolled by up to this many pixels along each axis (0: no jitter).
    jitter: int = 1
    # Blur the image with a 3x3 Gaussian every this many steps (0: never).
    blur_every: int = 8
    # Standard deviation (pixels) of that Gaussian.
    blur_sigma: float = 0.5
    # Standard deviation of the initial noise image (in input units).
    init_scale: float = 0.1
    # Seed of the initial image and the jitter sequence (shared by all filters of a layer).
    seed: int = 0
    # Filters per vmapped chunk (None: all filters of a layer at once).
    chunk_size: int | None = None


def check_visualization(config: VisualizationConfig) -> None:
    """Raises ValueError naming a bad field of a `VisualizationConfig` and what it needs."""
    if config.steps < 1:
        raise ValueError(f"visualization.steps must be >= 1, got {config.steps}.")
    if config.step_size <= 0:
        raise ValueError(f"visualization.step_size must be > 0, got {config.step_size}.")
    if config.l2_weight < 0 or config.tv_weight < 0:
        raise ValueError(
            f"visualization l2_weight and tv_weight must be >= 0, got {config.l2_weight} and "
            f"{config.tv_weight}."
        )
    if config.jitter < 0 or config.blur_every < 0 or config.blur_sigma < 0:
        raise ValueError("visualization jitter, blur_every and blur_sigma must be >= 0.")
    if config.chunk_size is not None and config.chunk_size < 1:
        raise ValueError(f"visualization.chunk_size must be >= 1 or None, got {config.chunk_size}.")


def channel_means(values: Iterable[jax.Array], points: Iterable[GatePoint], size: int) -> jax.Array:
    """The mean of every channel of a group over all other axes, averaged over its gate points.

    Args:
      values: the group's value at each of its gate points (as `gated_call(capture=True)`
        returns them).
      points: the matching gate points.
      size: the number of channels of the group.

    Returns:
      A vector of `size` means.
    """
    total = jnp.zeros((size,), jnp.float32)
    count = 0
    for value, point in zip(values, points, strict=True):
        axis = point.axis % value.ndim
        other = tuple(a for a in range(value.ndim) if a != axis)
        per_index = jnp.mean(value.astype(jnp.float32), axis=other)
        if point.channel_of_index is not None:
            # An axis that interleaves several groups: average each channel's own indices.
            owner = np.asarray(point.channel_of_index)
            mine = owner >= 0
            sums = jax.ops.segment_sum(per_index[mine], owner[mine], num_segments=size)
            per_index = sums / np.maximum(np.bincount(owner[mine], minlength=size), 1)
        total = total + per_index
        count += 1
    return total / count


def _gaussian_blur(image: jax.Array, sigma: float) -> jax.Array:
    """A 3x3 Gaussian blur of one HWC image, each channel on its own, edges replicated."""
    taps = np.exp(-(np.arange(-1, 2) ** 2) / (2.0 * max(sigma, 1e-6) ** 2))
    taps = taps / taps.sum()
    padded = jnp.pad(image, ((1, 1), (1, 1), (0, 0)), mode="edge")
    rows = sum(taps[k] * padded[k : k + image.shape[0]] for k in range(3))
    return sum(taps[k] * rows[:, k : k + image.shape[1]] for k in range(3))


def _total_variation(image: jax.Array) -> jax.Array:
    return jnp.mean(jnp.abs(jnp.diff(image, axis=0))) + jnp.mean(jnp.abs(jnp.diff(image, axis=1)))


def _filter_means(
    apply_fn: Callable[..., Any],
    graph: ChannelGraph,
    group: str,
    points: tuple[GatePoint, ...],
    apply_kwargs: Mapping[str, Any],
) -> Callable[[Any, jax.Array], jax.Array]:
    """(variables, one image) -> the mean activation of every filter of `group` on it."""
    size = graph[group].size

    def means(variables: Any, image: jax.Array) -> jax.Array:
        _, captured = gated_call(
            apply_fn, graph, variables, image[None], capture=True, **apply_kwargs
        )
        return channel_means(captured[group], points, size)

    return means


def _ascent_fn(
    apply_fn: Callable[..., Any],
    graph: ChannelGraph,
    group: str,
    points: tuple[GatePoint, ...],
    config: VisualizationConfig,
    apply_kwargs: Mapping[str, Any],
) -> Callable[[Any, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]:
    """(variables, start image, filter index) -> (final image, objective at every step)."""
    means = _filter_means(apply_fn, graph, group, points, apply_kwargs)

    def objective(variables, image, shift, index):
        rolled = jnp.roll(image, shift, axis=(0, 1))
        act = means(variables, rolled)[index]
        penalty = config.l2_weight * jnp.mean(image**2) + config.tv_weight * _total_variation(image)
        return act - penalty, act

    grad_fn = jax.grad(objective, argnums=1, has_aux=True)
    key = jax.random.key(config.seed)

    def ascend(variables: Any, start: jax.Array, index: jax.Array):
        def step(image, t):
            # The same jitter for every filter: it depends on the seed and the step only.
            shift = jax.random.randint(
                jax.random.fold_in(key, t), (2,), -config.jitter, config.jitter + 1
            )
            grad, act = grad_fn(variables, image, shift, index)
            rms = jnp.sqrt(jnp.mean(grad**2)) + 1e-12
            image = image + config.step_size * grad / rms
            if config.blur_every > 0:
                blurred = _gaussian_blur(image, config.blur_sigma)
                image = jnp.where((t + 1) % config.blur_every == 0, blurred, image)
            return image, act

        return jax.lax.scan(step, start, jnp.arange(config.steps))

    return ascend


def start_image(input_shape: tuple[int, ...], config: VisualizationConfig) -> jax.Array:
    """The seeded noise image every filter's ascent starts from (one example, no batch axis)."""
    noise = jax.random.normal(jax.random.key(config.seed), input_shape, jnp.float32)
    return config.init_scale * noise


def maximization_images(
    apply_fn: Callable[..., Any],
    graph: ChannelGraph,
    variables: Any,
    group: str,
    input_shape: tuple[int, ...],
    config: VisualizationConfig = VisualizationConfig(),
    *,
    filters: Iterable[int] | None = None,
    apply_kwargs: Mapping[str, Any] | None = None,
    with_objective: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Activation-maximisation images of the filters of one channel group, all at once.

    Args:
      apply_fn: the model function the graph was built from.
      graph: its channel graph.
      variables: the model variables.
      group: the channel group (layer) whose filters are visualised.
      input_shape: one input example's shape without the batch axis, e.g. (28, 28, 1); the
        images live in the model's (preprocessed) input space.
      config: steps, step size, penalties, jitter, blur, seed, chunking.
      filters: the filter indices to visualise (default: every filter of the group).
      apply_kwargs: keyword arguments of `apply_fn` (default ``{"train": False}``).
      with_objective: also return the mean activation the ascent reached at every step.

    Returns:
      Images of shape (filters, *input_shape); with `with_objective`, also an array
      (filters, steps) of the target filter's mean activation before each step.

    Raises:
      ValueError: a bad config, an unknown group or filter index, or an input shape that is
        not one example (H, W, C).
    """
    check_visualization(config)
    if len(input_shape) != 3:
        raise ValueError(
            f"input_shape must be one example's (height, width, channels), got {input_shape}; "
            "leave out the batch axis."
        )
    size = graph[group].size
    indices = np.arange(size) if filters is None else np.asarray(list(filters), np.int32)
    if indices.ndim != 1 or indices.size == 0 or indices.min() < 0 or indices.max() >= size:
        raise ValueError(
            f"filters must be a non-empty list of indices in [0, {size}) for group {group!r}, "
            f"got {indices.tolist()}."
        )
    kwargs = dict(apply_kwargs) if apply_kwargs is not None else {"train": False}
    example = jnp.zeros((1, *input_shape), jnp.float32)
    points = gate_points(apply_fn, graph, variables, example, **kwargs)[group]
    ascend = _ascent_fn(apply_fn, graph, group, points, config, kwargs)
    start = start_image(tuple(input_shape), config)

    @jax.jit
    def run(variables: Any, start: jax.Array, indices: jax.Array):
        per_filter = jax.vmap(ascend, in_axes=(None, None, 0))
        if config.chunk_size is None or config.chunk_size >= indices.shape[0]:
            return per_filter(variables, start, indices)
        return jax.lax.map(
            lambda i: ascend(variables, start, i), indices, batch_size=config.chunk_size
        )

    images, objective = run(variables, start, jnp.asarray(indices, jnp.int32))
    return (images, objective) if with_objective else images


def responsive_filters(
    apply_fn: Callable[..., Any],
    graph: ChannelGraph,
    variables: Any,
    group: str,
    images: jax.Array | np.ndarray,
    config: VisualizationConfig = VisualizationConfig(),
    *,
    apply_kwargs: Mapping[str, Any] | None = None,
) -> np.ndarray:
    """Which filters their own activation-maximisation image drives above the start image.

    A filter whose activation is flat at the start image (a ReLU filter silent on it) gets no
    gradient, so its ascent is moved only by the penalties, jitter and blur, which are the same
    for every filter: all such filters end with one identical image that says nothing about
    what they compute. This tells them apart from filters whose image shows their function.

    Args:
      apply_fn, graph, variables: the model, its graph and variables.
      group: the channel group.
      images: (filters, H, W, C) the group's images, image i of filter i (as
        `maximization_images` returns them for every filter).
      config: the settings the images were made with (their start image).
      apply_kwargs: keyword arguments of `apply_fn` (default ``{"train": False}``).

    Returns:
      bool (filters,): True where the filter's mean activation on its own image exceeds its
      mean activation on the start image (by more than 1e-6 relative).

    Raises:
      ValueError: images that are not one per filter of the group.
    """
    size = graph[group].size
    images = jnp.asarray(images, jnp.float32)
    if images.ndim != 4 or images.shape[0] != size:
        raise ValueError(
            f"images must be (filters, H, W, C) with one image per filter of {group!r} "
            f"({size}), got shape {images.shape}."
        )
    kwargs = dict(apply_kwargs) if apply_kwargs is not None else {"train": False}
    points = gate_points(apply_fn, graph, variables, images[:1], **kwargs)[group]
    means = _filter_means(apply_fn, graph, group, points, kwargs)
    start = start_image(tuple(images.shape[1:]), config)

    @jax.jit
    def gains(variables: Any, start: jax.Array, images: jax.Array) -> jax.Array:
        before = means(variables, start)
        own = jax.lax.map(
            lambda pair: means(variables, pair[0])[pair[1]],
            (images, jnp.arange(size)),
            batch_size=config.chunk_size or size,
        )
        return own - before - 1e-6 * jnp.maximum(1.0, jnp.abs(before))

    return np.asarray(gains(variables, start, images)) > 0


def response_patterns(
    apply_fn: Callable[..., Any],
    graph: ChannelGraph,
    variables: Any,
    group: str,
    images: jax.Array | np.ndarray,
    *,
    batch_size: int = 128,
    apply_kwargs: Mapping[str, Any] | None = None,
) -> np.ndarray:
    """Each filter's mean response pattern: its activation map averaged over real images.

    Args:
      apply_fn, graph, variables: the model, its graph and variables.
      group: the channel group whose filters are read.
      images: preprocessed real images [N, H, W, C].
      batch_size: images per forward pass.
      apply_kwargs: keyword arguments of `apply_fn` (default ``{"train": False}``).

    Returns:
      float32 array (filters, h, w): the mean over the images of each filter's map at the
      group's (first) gate point.

    Raises:
      ValueError: no images, or a group that is not read as a spatial NHWC map.
    """
    images = np.asarray(images, np.float32)
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"images must be a non-empty [N, H, W, C] array, got {images.shape}.")
    kwargs = dict(apply_kwargs) if apply_kwargs is not None else {"train": False}
    point = gate_points(apply_fn, graph, variables, images[:1], **kwargs)[group][0]
    if len(point.shape) != 4 or point.axis % 4 != 3 or point.channel_of_index is not None:
        raise ValueError(
            f"Group {group!r} is read as shape {point.shape} (channel axis {point.axis}); "
            "response patterns need an NHWC map with the group's channels last (a conv layer)."
        )

    @jax.jit
    def summed(variables: Any, batch: jax.Array) -> jax.Array:
        _, captured = gated_call(apply_fn, graph, variables, batch, capture=True, **kwargs)
        return jnp.sum(captured[group][0].astype(jnp.float32), axis=0)

    total = None
    for start in range(0, images.shape[0], batch_size):
        part = np.asarray(summed(variables, jnp.asarray(images[start : start + batch_size])))
        total = part if total is None else total + part
    return np.moveaxis(total / images.shape[0], -1, 0).astype(np.float32)


def normalize_images(images: jax.Array | np.ndarray, mode: str = "standardize") -> np.ndarray:
    """Normalises every image (leading axis) before images are compared.

    Args:
      images: (filters, ...) images.
      mode: "standardize" (zero mean, unit standard deviation per image), "l2" (unit L2 norm
        per image) or "none".

    Returns:
      float64 array of the same shape.

    Raises:
      ValueError: an unknown mode.
    """
    x = np.asarray(images, np.float64)
    flat = x.reshape(x.shape[0], -1)
    if mode == "standardize":
        flat = flat - flat.mean(axis=1, keepdims=True)
        flat = flat / np.maximum(flat.std(axis=1, keepdims=True), 1e-12)
    elif mode == "l2":
        flat = flat / np.maximum(np.linalg.norm(flat, axis=1, keepdims=True), 1e-12)
    elif mode != "none":
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {mode!r}.")
    return flat.reshape(x.shape)


def image_descriptors(
    images: jax.Array | np.ndarray, kind: str = "pixels", normalization: str = "standardize"
) -> np.ndarray:
    """One descriptor vector per image: what functionality similarity compares.

    Args:
      images: (filters, H, W, C) images.
      kind: "pixels" (the normalised image itself) or "pooled" (2x2 average pooling of it,
        less sensitive to one-pixel shifts).
      normalization: see `normalize_images`.

    Returns:
      float64 array (filters, descriptor length).

    Raises:
      ValueError: an unknown kind, or images that are not (filters, H, W, C).
    """
    x = normalize_images(images, normalization)
    if x.ndim != 4:
        raise ValueError(f"images must be (filters, H, W, C), got shape {x.shape}.")
    if kind == "pooled":
        n, h, w, c = x.shape
        x = x[:, : h - h % 2, : w - w % 2].reshape(n, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))
    elif kind != "pixels":
        raise ValueError(f"descriptor must be one of {DESCRIPTORS}, got {kind!r}.")
    return x.reshape(x.shape[0], -1)


def cosine_similarity(descriptors: jax.Array | np.ndarray) -> np.ndarray:
    """Pairwise cosine similarity of descriptor rows: S[i, j] = <d_i, d_j> / (|d_i| |d_j|).

    A zero row has similarity 0 to everything (and 1 to itself).

    Args:
      descriptors: (n, d) array.

    Returns:
      float64 (n, n) symmetric matrix with ones on the diagonal.
    """
    d = np.asarray(descriptors, np.float64)
    if d.ndim != 2:
        raise ValueError(f"descriptors must be (n, d), got shape {d.shape}.")
    norms = np.linalg.norm(d, axis=1)
    unit = d / np.maximum(norms, 1e-12)[:, None]
    similarity = np.clip(unit @ unit.T, -1.0, 1.0)
    np.fill_diagonal(similarity, 1.0)
    return similarity
