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
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxprune.criteria.rank_correlation import spearman
from jaxprune.gates import gate_points, gated_call, points_for, program_args
from jaxprune.graph import ChannelGraph, GatePoint
from jaxprune.interpret import Interpreter, bind, frames_holding
from jaxprune.sharding import default_mesh, replicate, to_host
from jaxprune.trace import Const, TracedProgram, trace_apply

NORMALIZATIONS = ("standardize", "l2", "none")
# Descriptors of the images alone (`image_descriptors`).
DESCRIPTORS = ("pixels", "pooled", "spectrum")
# Descriptors that also run the model on probe images (`filter_descriptors`).
RESPONSE_DESCRIPTORS = ("responses", "image+responses")
OBJECTIVES = ("mean", "center")


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
    # What is maximised: "mean" (the filter's mean over its whole map) or "center" (the filter's
    # value at the centre position of its map, one unit with one receptive field).
    objective: str = "mean"
    # Read the filter before its nonlinearity and pooling (see `read_points`) rather than where
    # the next layer reads it.
    preactivation: bool = False
    # Each step also rescales the (jittered) image by a random factor in [1 / (1 + scale),
    # 1 + scale] about its centre (0: never).
    scale: float = 0.0
    # Each step also rotates the image by a random angle in [-rotation, rotation] degrees about
    # its centre (0: never).
    rotation: float = 0.0


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
    if config.objective not in OBJECTIVES:
        raise ValueError(
            f"visualization.objective must be one of {OBJECTIVES}, got {config.objective!r}."
        )
    if config.scale < 0 or config.rotation < 0:
        raise ValueError(
            f"visualization scale and rotation must be >= 0, got {config.scale} and "
            f"{config.rotation}."
        )


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


# Calls with their own derivative rules, run as they are (relu'(0) = 0) by `_Reader`.
_OPAQUE_CALLS = frozenset({"custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr"})


def _step_back(
    program: TracedProgram, producer: Mapping[int, Any], vid: int, axis: int
) -> int | None:
    """The value a rectifier or a max pooling turned into value `vid`, or None.

    `axis` is the channel axis counted from the end (negative). Recognised: ``max(v, c)`` with
    one scalar constant c (ReLU); ``reduce_window_max`` with a window of 1 on the channel axis;
    ``reduce_max`` over non-channel axes of a ``reshape`` that split the spatial axes of v
    (flax's max pooling of sizes that divide evenly), channels last.
    """
    eqn = producer.get(vid)
    if eqn is None:
        return None
    arrays = [i for i in eqn.inputs if not isinstance(i, Const)]
    constants = [i for i in eqn.inputs if isinstance(i, Const)]
    if len(arrays) != 1:
        return None
    source = arrays[0]
    if eqn.primitive == "max":
        if len(constants) == 1 and np.size(constants[0].value) == 1:
            return source
        return None
    if eqn.primitive == "reduce_window_max":
        window = eqn.params.get("window_dimensions", ())
        return source if len(window) >= -axis and window[axis] == 1 else None
    if eqn.primitive == "reduce_max" and axis == -1 and source in producer:
        split = producer[source]
        rank = len(program.shapes[source])
        if split.primitive != "reshape" or rank - 1 in eqn.params.get("axes", ()):
            return None
        before = [i for i in split.inputs if not isinstance(i, Const)]
        if len(before) == 1 and program.shapes[before[0]][-1] == program.shapes[source][-1]:
            return before[0]
    return None


def _walk_back(program: TracedProgram, point: GatePoint) -> GatePoint:
    """The value before the pooling and rectifiers that make `point`'s value (`read_points`)."""
    producer = {out: eqn for eqn in program.eqns for out in eqn.outputs}
    rank = len(point.shape)
    axis = point.axis % rank - rank
    vid = point.value_id
    while (previous := _step_back(program, producer, vid, axis)) is not None:
        shape = tuple(program.shapes[previous])
        if len(shape) != rank or shape[axis] != point.shape[axis]:
            break
        vid = previous
    return dataclasses.replace(point, value_id=vid, shape=tuple(program.shapes[vid]))


def read_points(
    program: TracedProgram, graph: ChannelGraph, preactivation: bool = False
) -> dict[str, tuple[GatePoint, ...]]:
    """Where each group's filters are read in one trace of the model.

    Args:
      program: the model traced on the input shape it will run at (`jaxprune.trace.trace_apply`).
      graph: its channel graph.
      preactivation: False: the gate points (where the next layer reads the channels: after
        normalisation, the nonlinearity and any pooling). True: from each gate point, walk back
        through max pooling (`reduce_window_max` with a window of 1 on the channel axis) and
        rectifiers (`max` with one scalar constant, e.g. ReLU) to the value they start from (for
        conv-BN-ReLU-pool, the BatchNorm output). A gate point with nothing to walk back
        through is read as it is.

    Returns:
      Per group, the read points (duplicates removed, in gate-point order).
    """
    points = points_for(program, graph)
    if not preactivation:
        return points
    found = {}
    for name, pts in points.items():
        seen: dict[int, GatePoint] = {}
        for point in pts:
            back = _walk_back(program, point)
            seen.setdefault(back.value_id, back)
        found[name] = tuple(seen.values())
    return found


class _Reader(Interpreter):
    """Runs a traced program and keeps the values of some ids (custom-derivative calls opaque,
    unless a wanted value is produced inside one)."""

    def __init__(self, program: TracedProgram, wanted: set[int]) -> None:
        super().__init__(program)
        self.wanted = wanted
        self.values: dict[int, jax.Array] = {}
        self.inline = frames_holding(program, set(), wanted)

    def on_value(self, vid: int | None, value: Any) -> Any:
        if vid is not None and vid in self.wanted:
            self.values[vid] = value
        return value

    def call(self, eqn: Any, invals: Sequence[Any], frame: tuple[int, ...]) -> list[Any]:
        if eqn.primitive.name in _OPAQUE_CALLS and frame not in self.inline:
            return bind(eqn, invals)
        return self.eval_call(eqn, invals, frame)


def _center_values(value: jax.Array, point: GatePoint, size: int) -> jax.Array:
    """Every channel's value at the middle index of each non-channel axis (batch 1 assumed)."""
    axis = point.axis % value.ndim
    index = tuple(slice(None) if a == axis else n // 2 for a, n in enumerate(value.shape))
    per_index = value[index].astype(jnp.float32)
    if point.channel_of_index is not None:
        owner = np.asarray(point.channel_of_index)
        mine = owner >= 0
        sums = jax.ops.segment_sum(per_index[mine], owner[mine], num_segments=size)
        per_index = sums / np.maximum(np.bincount(owner[mine], minlength=size), 1)
    return per_index


def _filter_reader(
    apply_fn: Callable[..., Any],
    graph: ChannelGraph,
    group: str,
    config: VisualizationConfig,
    apply_kwargs: Mapping[str, Any],
) -> Callable[[Any, jax.Array], jax.Array]:
    """(variables, one image) -> the objective's value for every filter of `group` on it."""
    size = graph[group].size

    def read(variables: Any, image: jax.Array) -> jax.Array:
        batch = image[None]
        program = trace_apply(apply_fn, variables, batch, **apply_kwargs)
        points = read_points(program, graph, config.preactivation)[group]
        reader = _Reader(program, {p.value_id for p in points})
        reader.run(program_args(variables, batch, apply_kwargs))
        values = [reader.values[p.value_id] for p in points]
        if config.objective == "mean":
            return channel_means(values, points, size)
        total = sum(_center_values(v, p, size) for v, p in zip(values, points, strict=True))
        return total / len(points)

    return read


def filter_objectives(
    apply_fn: Callable[..., Any],
    graph: ChannelGraph,
    variables: Any,
    group: str,
    images: jax.Array | np.ndarray,
    config: VisualizationConfig = VisualizationConfig(),
    *,
    batch_size: int = 256,
    apply_kwargs: Mapping[str, Any] | None = None,
) -> np.ndarray:
    """The ascent's objective (without penalties) of every filter of `group` on every image.

    Args:
      apply_fn, graph, variables: the model, its graph and variables.
      group: the channel group.
      images: (N, H, W, C) images in the model's input space.
      config: `objective` and `preactivation` say what is read (the other fields are unused).
      batch_size: images per compiled call.
      apply_kwargs: keyword arguments of `apply_fn` (default ``{"train": False}``).

    Returns:
      float32 (N, filters): entry [n, f] is filter f's objective on image n.
    """
    check_visualization(config)
    images = np.asarray(images, np.float32)
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"images must be a non-empty (N, H, W, C) array, got {images.shape}.")
    kwargs = dict(apply_kwargs) if apply_kwargs is not None else {"train": False}
    read = _filter_reader(apply_fn, graph, group, config, kwargs)
    run = jax.jit(jax.vmap(read, in_axes=(None, 0)))
    parts = [
        np.asarray(run(variables, jnp.asarray(images[k : k + batch_size])))
        for k in range(0, len(images), batch_size)
    ]
    return np.concatenate(parts).astype(np.float32)


def _affine_view(image: jax.Array, angle: jax.Array, factor: jax.Array) -> jax.Array:
    """An HWC image rotated by `angle` (radians) and magnified by `factor` about its centre.

    Output pixel p shows the input at ``c + R(-angle) (p - c) / factor`` (c the centre,
    ``(H - 1) / 2, (W - 1) / 2``), bilinear, positions outside the image take the nearest edge
    pixel. A quarter turn of a square image is `np.rot90`.
    """
    h, w = image.shape[:2]
    rows, cols = jnp.meshgrid(
        jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32), indexing="ij"
    )
    dy, dx = rows - (h - 1) / 2, cols - (w - 1) / 2
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    src_rows = (h - 1) / 2 + (cos * dy + sin * dx) / factor
    src_cols = (w - 1) / 2 + (-sin * dy + cos * dx) / factor
    channels = [
        jax.scipy.ndimage.map_coordinates(
            image[..., c], [src_rows, src_cols], order=1, mode="nearest"
        )
        for c in range(image.shape[-1])
    ]
    return jnp.stack(channels, axis=-1)


def _transform(image: jax.Array, key: jax.Array, config: VisualizationConfig) -> jax.Array:
    """One step's random view of an HWC image: rolled by the jitter, then rotated and rescaled
    about its centre (`_affine_view`). Depends on `key` only, not on the filter."""
    shift = jax.random.randint(key, (2,), -config.jitter, config.jitter + 1)
    image = jnp.roll(image, shift, axis=(0, 1))
    if config.rotation == 0 and config.scale == 0:
        return image
    angle_key, scale_key = jax.random.split(jax.random.fold_in(key, 1))
    angle = jnp.deg2rad(config.rotation * jax.random.uniform(angle_key, (), minval=-1.0))
    log_scale = float(np.log1p(config.scale))
    factor = jnp.exp(jax.random.uniform(scale_key, (), minval=-log_scale, maxval=log_scale))
    return _affine_view(image, angle, factor)


def _ascent_fn(
    apply_fn: Callable[..., Any],
    graph: ChannelGraph,
    group: str,
    config: VisualizationConfig,
    apply_kwargs: Mapping[str, Any],
) -> Callable[[Any, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]:
    """(variables, start image, filter index) -> (final image, objective at every step)."""
    read = _filter_reader(apply_fn, graph, group, config, apply_kwargs)

    def objective(variables, image, key, index):
        act = read(variables, _transform(image, key, config))[index]
        penalty = config.l2_weight * jnp.mean(image**2) + config.tv_weight * _total_variation(image)
        return act - penalty, act

    grad_fn = jax.grad(objective, argnums=1, has_aux=True)
    key = jax.random.key(config.seed)

    def ascend(variables: Any, start: jax.Array, index: jax.Array):
        def step(image, t):
            # The same view for every filter: it depends on the seed and the step only.
            grad, act = grad_fn(variables, image, jax.random.fold_in(key, t), index)
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
        With several devices (`jaxprune.sharding`), the filters are split over them.

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
    ascend = _ascent_fn(apply_fn, graph, group, config, kwargs)
    start = start_image(tuple(input_shape), config)

    @jax.jit
    def run(variables: Any, start: jax.Array, indices: jax.Array):
        per_filter = jax.vmap(ascend, in_axes=(None, None, 0))
        if config.chunk_size is None or config.chunk_size >= indices.shape[0]:
            return per_filter(variables, start, indices)
        return jax.lax.map(
            lambda i: ascend(variables, start, i), indices, batch_size=config.chunk_size
        )

    mesh = default_mesh()
    if mesh is None:
        images, objective = run(variables, start, jnp.asarray(indices, jnp.int32))
    else:
        # The filters are split over the devices (padded with repeats of the last one).
        padded = -(-indices.size // mesh.size) * mesh.size
        spread = np.concatenate([indices, np.repeat(indices[-1:], padded - indices.size)])
        spread = jax.device_put(spread.astype(np.int32), NamedSharding(mesh, P("data")))
        images, objective = to_host(run(*replicate((variables, start), mesh), spread))
        images, objective = (
            jnp.asarray(images[: indices.size]),
            jnp.asarray(objective[: indices.size]),
        )
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
    means = _filter_reader(apply_fn, graph, group, config, kwargs)
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
      kind: "pixels" (the normalised image itself), "pooled" (2x2 average pooling of it,
        less sensitive to one-pixel shifts) or "spectrum" (the magnitude of the 2-D discrete
        Fourier transform of each channel of the normalised image, ``|F[u, v, c]|`` with
        ``F = fft2(x[..., c])``: unchanged by circular shifts of the image).
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
    elif kind == "spectrum":
        x = np.abs(np.fft.fft2(x, axes=(1, 2)))
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


# ---------------------------------------------------------------------------------------------
# Functionality as responses, and how well a descriptor measures it


def _check_maps_point(point: GatePoint, group: str) -> None:
    # An NHWC map, or (N, C) when the group is gated after a global pooling (read as 1x1 maps).
    rank = len(point.shape)
    if rank not in (2, 4) or point.axis % rank != rank - 1 or point.channel_of_index is not None:
        raise ValueError(
            f"Group {group!r} is read as shape {point.shape} (channel axis {point.axis}); "
            "responses need an NHWC map (or pooled (N, C) values) with the group's channels "
            "last (a conv layer)."
        )


def _maps_reader(
    apply_fn: Callable[..., Any],
    graph: ChannelGraph,
    variables: Any,
    groups: Sequence[str],
    example: np.ndarray,
    apply_kwargs: Mapping[str, Any] | None,
) -> Callable[[Any, jax.Array], dict[str, jax.Array]]:
    """A jitted (variables, batch) -> {group: its NHWC map at its first gate point} (a group
    gated after a global pooling gives 1x1 maps)."""
    kwargs = dict(apply_kwargs) if apply_kwargs is not None else {"train": False}
    points = gate_points(apply_fn, graph, variables, example, **kwargs)
    for group in groups:
        _check_maps_point(points[group][0], group)

    @jax.jit
    def maps(variables: Any, batch: jax.Array) -> dict[str, jax.Array]:
        _, captured = gated_call(apply_fn, graph, variables, batch, capture=True, **kwargs)
        found = {g: captured[g][0].astype(jnp.float32) for g in groups}
        return {g: v if v.ndim == 4 else v[:, None, None, :] for g, v in found.items()}

    return maps


def response_maps(
    apply_fn: Callable[..., Any],
    graph: ChannelGraph,
    variables: Any,
    groups: Sequence[str],
    images: jax.Array | np.ndarray,
    *,
    batch_size: int = 256,
    apply_kwargs: Mapping[str, Any] | None = None,
) -> dict[str, np.ndarray]:
    """Every filter's map at its group's (first) gate point on every image, for several groups
    in one pass.

    Args:
      apply_fn, graph, variables: the model, its graph and variables.
      groups: conv groups (each read as an NHWC map with its channels last).
      images: (N, H, W, C) images in the model's input space.
      batch_size: images per forward pass.
      apply_kwargs: keyword arguments of `apply_fn` (default ``{"train": False}``).

    Returns:
      Per group, float32 (N, h, w, filters).

    Raises:
      ValueError: no images, or a group that is not read as an NHWC map.
    """
    images = np.asarray(images, np.float32)
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"images must be a non-empty (N, H, W, C) array, got {images.shape}.")
    groups = list(groups)
    maps = _maps_reader(apply_fn, graph, variables, groups, images[:1], apply_kwargs)
    parts = [
        jax.device_get(maps(variables, jnp.asarray(images[k : k + batch_size])))
        for k in range(0, len(images), batch_size)
    ]
    return {g: np.concatenate([np.asarray(p[g]) for p in parts]) for g in groups}


def cell_means(maps: np.ndarray, resolution: int | None) -> np.ndarray:
    """Average-pools (N, h, w, C) maps to at most `resolution` cells per spatial axis.

    An axis longer than `resolution` is cut into `resolution` runs of consecutive positions
    whose lengths differ by at most one (``np.array_split``), and each run is averaged; shorter
    axes are kept. None keeps the maps as they are.

    Args:
      maps: (N, h, w, C) array.
      resolution: the most cells per axis (>= 1), or None.

    Returns:
      float64 (N, min(h, resolution), min(w, resolution), C).
    """
    maps = np.asarray(maps, np.float64)
    if maps.ndim != 4:
        raise ValueError(f"maps must be (N, h, w, C), got shape {maps.shape}.")
    if resolution is None:
        return maps
    if resolution < 1:
        raise ValueError(f"resolution must be >= 1 or None, got {resolution}.")
    for axis in (1, 2):
        if maps.shape[axis] > resolution:
            runs = np.array_split(np.arange(maps.shape[axis]), resolution)
            maps = np.stack([maps.take(run, axis=axis).mean(axis=axis) for run in runs], axis)
    return maps


def response_descriptors(
    apply_fn: Callable[..., Any],
    graph: ChannelGraph,
    variables: Any,
    group: str,
    probes: jax.Array | np.ndarray,
    *,
    resolution: int | None = 7,
    batch_size: int = 256,
    apply_kwargs: Mapping[str, Any] | None = None,
) -> np.ndarray:
    """Each filter described by what it does: its responses to a fixed set of probe images.

    With ``A_f(x)`` filter f's (h, w) map at the group's gate point (where the next layer reads
    it: after BatchNorm, the nonlinearity and any pooling) on probe image x, and ``P_r`` the
    average pooling of a map to at most r x r cells (`cell_means`),

        r_f = vec_{k, i, j} P_r(A_f(x_k))[i, j],      d_f = r_f - mean(r_f),

    so the cosine of two descriptors is the Pearson correlation of the two filters' pooled
    responses over the probes and cells: filters that fire on the same probes at the same places
    are alike. The probes are the same for every filter; the default of the functional criterion
    is the activation-maximisation images of every conv filter of the model (all layers), made
    with one seed, so nothing but the model is needed. Using responses at all, the probe set,
    the pooling to `resolution` cells and the centring are choices of jaxprune (Qin et al. 2019
    compare the visualisations themselves), measured in experiments/functional_descriptor.py.

    Args:
      apply_fn, graph, variables: the model, its graph and variables.
      group: a conv group (read as an NHWC map with its channels last).
      probes: (P, H, W, C) images in the model's input space.
      resolution: the most cells per spatial axis (None: every position).
      batch_size: probes per forward pass.
      apply_kwargs: keyword arguments of `apply_fn` (default ``{"train": False}``).

    Returns:
      float64 (filters, P * cells): one centred descriptor per filter of the group.

    Raises:
      ValueError: no probes, or a group that is not read as an NHWC map.
    """
    maps = response_maps(
        apply_fn,
        graph,
        variables,
        [group],
        probes,
        batch_size=batch_size,
        apply_kwargs=apply_kwargs,
    )[group]
    return describe_responses(maps, resolution)


def describe_responses(maps: np.ndarray, resolution: int | None = 7) -> np.ndarray:
    """The response descriptors of `response_descriptors` from the maps themselves.

    Args:
      maps: (P, h, w, filters) the layer's maps on the probes (`response_maps`).
      resolution: the most cells per spatial axis (`cell_means`).

    Returns:
      float64 (filters, P * cells), each row centred.
    """
    pooled = cell_means(maps, resolution)
    descriptors = np.moveaxis(pooled, -1, 0).reshape(pooled.shape[-1], -1)
    return descriptors - descriptors.mean(axis=1, keepdims=True)


def response_similarity(
    apply_fn: Callable[..., Any],
    graph: ChannelGraph,
    variables: Any,
    group: str,
    images: jax.Array | np.ndarray,
    *,
    batch_size: int = 256,
    apply_kwargs: Mapping[str, Any] | None = None,
) -> np.ndarray:
    """How alike the filters of a group respond on real images: the reference a functionality
    descriptor is measured against.

    ``R[f, g]`` is the Pearson correlation of ``A_f`` and ``A_g`` (the filters' maps at the
    group's gate point) over all images n and positions (i, j) together. A filter that is
    constant on the images (e.g. never fires) has correlation 0 with every other filter.

    Args:
      apply_fn, graph, variables: the model, its graph and variables.
      group: a conv group (read as an NHWC map with its channels last).
      images: real images (N, H, W, C), preprocessed; validation images for any choice.
      batch_size: images per forward pass.
      apply_kwargs: keyword arguments of `apply_fn` (default ``{"train": False}``).

    Returns:
      float64 (filters, filters) symmetric, ones on the diagonal.
    """
    images = np.asarray(images, np.float32)
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"images must be a non-empty (N, H, W, C) array, got {images.shape}.")
    reader = _maps_reader(apply_fn, graph, variables, [group], images[:1], apply_kwargs)

    def maps(variables: Any, batch: jax.Array) -> jax.Array:
        return reader(variables, batch)[group]

    count, total, products = 0, None, None
    for k in range(0, len(images), batch_size):
        a = np.asarray(maps(variables, jnp.asarray(images[k : k + batch_size])), np.float64)
        a = a.reshape(-1, a.shape[-1])
        count += len(a)
        total = a.sum(0) if total is None else total + a.sum(0)
        products = a.T @ a if products is None else products + a.T @ a
    mean = total / count
    covariance = products / count - np.outer(mean, mean)
    std = np.sqrt(np.maximum(np.diag(covariance), 0.0))
    live = std > 1e-12 * max(1.0, float(np.max(np.abs(mean), initial=0.0)))
    scale = np.where(live, std, 1.0)
    correlation = np.where(np.outer(live, live), covariance / np.outer(scale, scale), 0.0)
    correlation = np.clip(correlation, -1.0, 1.0)
    np.fill_diagonal(correlation, 1.0)
    return correlation


def mutual_best_matches(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Which filters' two descriptors (e.g. from two seeds) are each other's best match.

    With ``C[i, j]`` the cosine of filter i's first descriptor and filter j's second, filter i
    is stable when ``C[i, i] > C[i, j]`` and ``C[i, i] > C[j, i]`` for every other filter j of
    the layer: its second descriptor is closer to its first than any other filter's is, and the
    other way round. Ties count as failures (two silent filters with one image are not stable).

    Args:
      first: (filters, d) descriptors from one run.
      second: (filters, d) descriptors of the same filters, in the same order, from another.

    Returns:
      bool (filters,).
    """
    a, b = np.asarray(first, np.float64), np.asarray(second, np.float64)
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(
            f"first and second must be (filters, d) of one shape, got {a.shape} and {b.shape}."
        )
    unit_a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    unit_b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    cross = unit_a @ unit_b.T
    own = np.diag(cross).copy()
    np.fill_diagonal(cross, -np.inf)
    return (own > cross.max(axis=1)) & (own > cross.max(axis=0))


def similarity_agreement(similarity: np.ndarray, reference: np.ndarray) -> float:
    """Spearman correlation of two filter-similarity matrices over the distinct pairs i < j.

    Args:
      similarity: (n, n) a descriptor's similarity (e.g. `cosine_similarity`).
      reference: (n, n) the similarity it should agree with (e.g. `response_similarity`).

    Returns:
      rho in [-1, 1] (`jaxprune.criteria.rank_correlation.spearman`, ties averaged).
    """
    s, r = np.asarray(similarity, np.float64), np.asarray(reference, np.float64)
    if s.ndim != 2 or s.shape != r.shape or s.shape[0] != s.shape[1] or s.shape[0] < 3:
        raise ValueError(
            f"similarity and reference must be square, of one shape, and at least 3 x 3; got "
            f"{s.shape} and {r.shape}."
        )
    upper = np.triu_indices(s.shape[0], 1)
    return spearman(s[upper], r[upper])


def filter_descriptors(
    images: jax.Array | np.ndarray,
    kind: str = "pixels",
    normalization: str = "standardize",
    *,
    apply_fn: Callable[..., Any] | None = None,
    graph: ChannelGraph | None = None,
    variables: Any = None,
    group: str | None = None,
    probes: jax.Array | np.ndarray | None = None,
    responses: np.ndarray | None = None,
    resolution: int | None = 7,
    apply_kwargs: Mapping[str, Any] | None = None,
) -> np.ndarray:
    """One descriptor per filter of a layer, of any kind: what functionality similarity compares.

    Kinds:

    * "pixels", "pooled", "spectrum": the filter's own activation-maximisation image
      (`image_descriptors`; no model needed);
    * "responses": the filter's pooled responses to the probe images (`response_descriptors`);
    * "image+responses": both, each scaled to unit length and concatenated,
      ``d_f = [p_f / |p_f|, r_f / |r_f|]`` with p_f the normalised pixels of its image and r_f
      its centred responses, so that ``cos(d_f, d_g) = (cos(p_f, p_g) + corr(r_f, r_g)) / 2``
      when neither part is zero. The equal weighting is a choice of jaxprune.

    Args:
      images: (filters, H, W, C) the layer's activation-maximisation images (image f of filter f).
      kind: one of `DESCRIPTORS` or `RESPONSE_DESCRIPTORS`.
      normalization: per-image normalisation of the image part (`normalize_images`).
      apply_fn, graph, variables, group: the model and the layer (response kinds only).
      probes: (P, H, W, C) probe images (response kinds only), e.g. every conv layer's
        activation-maximisation images concatenated.
      responses: instead of the model and probes, the layer's maps on the probes, (P, h, w,
        filters) as `response_maps` returns them.
      resolution: the response maps' most cells per axis (`cell_means`).
      apply_kwargs: keyword arguments of `apply_fn` (default ``{"train": False}``).

    Returns:
      float64 (filters, descriptor length).

    Raises:
      ValueError: an unknown kind, or a response kind without the model, layer and probes
        (or the responses).
    """
    if kind in DESCRIPTORS:
        return image_descriptors(images, kind, normalization)
    if kind not in RESPONSE_DESCRIPTORS:
        raise ValueError(
            f"descriptor must be one of {DESCRIPTORS + RESPONSE_DESCRIPTORS}, got {kind!r}."
        )
    if responses is None:
        if any(v is None for v in (apply_fn, graph, variables, group, probes)):
            raise ValueError(
                f"The {kind!r} descriptor runs the model: pass apply_fn, graph, variables, "
                "group and probes (or the layer's responses to the probes)."
            )
        responses = response_maps(
            apply_fn, graph, variables, [group], probes, apply_kwargs=apply_kwargs
        )[group]
    responses = describe_responses(responses, resolution)
    if len(responses) != len(images):
        raise ValueError(f"{len(images)} images for {len(responses)} filters' responses.")
    if kind == "responses":
        return responses
    pixels = image_descriptors(images, "pixels", normalization)

    def unit(d: np.ndarray) -> np.ndarray:
        return d / np.maximum(np.linalg.norm(d, axis=1, keepdims=True), 1e-12)

    return np.concatenate([unit(pixels), unit(responses)], axis=1)
