"""Choosing the kernels of one layer in progressive simplification (Osaku et al. 2021).

Three ways to choose, each giving indices in the layer's current width:

* a registered criterion (`score_layer`): the paper's *objective* criterion is
  "oracle_loss", the loss with each kernel removed alone, all kernels of the layer in one
  compiled call; the lowest scores go (`lowest`). The paper's baselines are "l1" and "apoz";
* ``"subjective"``: a person's choice, replayed from a selection file
  (`jaxprune.methods.selection_file`) or asked for through a `Chooser`; `waiting_chooser` is the
  kernel-page hand-off (write the layer's page, wait for the person's exported file);
* ``"standin"``: a scripted rule in place of the person (`jaxprune.methods.standin`), labelled
  as such.

How many go is p (`removal_count`). The objective criterion's scores are a sample estimate:
`split_half_reliability` measures how well two disjoint halves of the images agree on them.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from jaxprune import criteria
from jaxprune.criteria.rank_correlation import spearman
from jaxprune.criteria.reliability import spearman_brown, split_halves
from jaxprune.graph import ChannelGraph
from jaxprune.methods import selection_file, standin
from jaxprune.methods.progressive_retrain import Network
from jaxprune.model import Model

Batch = Mapping[str, Any]
ROUNDINGS = ("floor", "nearest")
# Criteria whose scores are means over images: the halves' scores average into the whole's.
_MEANS_OVER_IMAGES = ("oracle_loss",)


def removal_count(
    p: float | int,
    size: int,
    *,
    rounding: str = "floor",
    min_channels: int = 1,
) -> int:
    """How many kernels a layer of `size` loses for p.

    Args:
      p: an int is a count; a float a fraction of the layer's kernels.
      size: the layer's current number of kernels.
      rounding: how a fraction becomes a count: "floor" (the authors' code, ``int(p * n)``:
        5% of 64 kernels is 3, of 16 kernels none) or "nearest" (ours before, Python's round).
      min_channels: no layer keeps fewer kernels than this.

    Returns:
      The count, in [0, size - min_channels].

    Raises:
      ValueError: an unknown rounding.
    """
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding={rounding!r}; choose one of {ROUNDINGS}.")
    if isinstance(p, int):
        wanted = p
    elif rounding == "floor":
        # A tiny tolerance so that 0.05 * 60 (2.9999999999999996 in floating point) is 3.
        wanted = math.floor(float(p) * size + 1e-9)
    else:
        wanted = int(round(float(p) * size))
    return max(0, min(wanted, size - min_channels))


def lowest(scores: np.ndarray, count: int, block: int = 1) -> np.ndarray:
    """The indices of the `count` lowest scores, sorted; ties go to the lower index.

    A layer normalised in blocks of `block` channels (GroupNorm) loses whole blocks, ranked by
    the mean score of their channels: ``count / block`` of them rounded half up, at least one
    when `count` > 0, and never the last block.

    Args:
      scores: one score per kernel (higher = more relevant).
      count: how many to take.
      block: the layer's block size (`ChannelGroup.block`).

    Returns:
      Sorted int64 indices of the least relevant kernels.

    Raises:
      ValueError: NaN scores, or scores that are not whole blocks.
    """
    values = np.asarray(scores, np.float64)
    if np.isnan(values).any():
        raise ValueError("The kernel scores contain NaN; check the criterion and the data.")
    if block == 1:
        return np.sort(np.argsort(values, kind="stable")[:count]).astype(np.int64)
    if values.size % block:
        raise ValueError(f"{values.size} kernel scores are not whole blocks of {block}.")
    n_blocks = values.size // block
    taken = 0 if count <= 0 else min(max(1, int(count / block + 0.5)), n_blocks - 1)
    order = np.argsort(values.reshape(n_blocks, block).mean(axis=1), kind="stable")[:taken]
    return np.sort((order[:, None] * block + np.arange(block)).reshape(-1)).astype(np.int64)


def check_whole_blocks(removed: np.ndarray, block: int, group: str) -> None:
    """Refuses a selection that splits a block of a layer normalised in blocks (GroupNorm).

    Raises:
      ValueError: naming the layer, its block size and the first split block.
    """
    if block == 1:
        return
    removed = np.asarray(removed, np.int64)
    counts = np.bincount(removed // block) if removed.size else np.zeros(0, np.int64)
    split = np.nonzero((counts > 0) & (counts < block))[0]
    if split.size:
        first = int(split[0])
        raise ValueError(
            f"Layer {group!r} is normalised in blocks of {block} kernels (GroupNorm) and the "
            f"selection splits block {first} (kernels {first * block}-{first * block + block - 1})"
            ": select whole blocks."
        )


def score_layer(
    network: Network,
    group: str,
    batches: Sequence[Batch],
    criterion: str = "oracle_loss",
    options: Mapping[str, Any] | None = None,
    *,
    seed: int = 0,
) -> np.ndarray:
    """One score per kernel of `group` by a registered criterion (higher = more relevant).

    Criteria that can be restricted to one group (the oracles) score only that group.

    Args:
      network: the model as it is before this layer is simplified.
      group: the layer scored.
      batches: the batches the criterion reads.
      criterion: a registered criterion name.
      options: its keyword options.
      seed: the seed of a seeded criterion ("random"), added to its own ``seed`` option.

    Returns:
      The scores, shape (kernels of `group`,).

    Raises:
      ValueError: the criterion gives no scores for `group`.
    """
    options = dict(options or {})
    accepted = inspect.signature(criteria.CRITERIA[criterion]).parameters
    if "groups" in accepted:
        options.setdefault("groups", (group,))
    if "seed" in accepted:
        options["seed"] = int(options.get("seed", 0)) + seed
    context = criteria.ScoringContext(
        network.model.apply_fn, network.graph, apply_kwargs=network.model.eval_kwargs
    )
    scores = criteria.score(criterion, context, network.variables, list(batches), **options)
    if group not in scores:
        raise ValueError(
            f"Criterion {criterion!r} gives no scores for layer {group!r}; choose a criterion "
            "that applies to convolutions."
        )
    return np.asarray(scores[group], np.float64)


def split_half_reliability(
    network: Network,
    group: str,
    batches: Sequence[Batch],
    criterion: str = "oracle_loss",
    options: Mapping[str, Any] | None = None,
) -> dict[str, float]:
    """How well two disjoint halves of the images agree on a criterion's kernel ranking.

    The images are cut into two halves of equal size; the criterion scores the layer on each;
    r is Spearman's correlation between the two score vectors, and the Spearman-Brown formula
    ``2r / (1 + r)`` estimates the reliability of the scores on all the images. A reliability
    near 1 means the ranking is a property of the layer, not of the images drawn; near 0 it is
    noise. (Our measurement; the paper reads its whole training set and reports none.)

    Args:
      network: the model.
      group: the layer.
      batches: the images (at least two).
      criterion: a registered criterion that reads batches.
      options: its options.

    Returns:
      ``{"spearman": r, "spearman_brown": 2r / (1 + r), "examples_per_half": n}`` (NaN when a
      half gives constant scores).

    Raises:
      ValueError: fewer than two images, or fewer than two kernels.
    """
    return _halves(network, group, batches, criterion, options)[1]


def _halves(
    network: Network,
    group: str,
    batches: Sequence[Batch],
    criterion: str,
    options: Mapping[str, Any] | None,
    seed: int = 0,
) -> tuple[tuple[np.ndarray, np.ndarray, int], dict[str, float]]:
    """The criterion on each half, and the reliability of its ranking."""
    first, second = split_halves(batches)
    per_half = sum(len(b["image"]) for b in first)
    if per_half < 1:
        raise ValueError("split_half_reliability needs at least two images.")
    a = score_layer(network, group, first, criterion, options, seed=seed)
    b = score_layer(network, group, second, criterion, options, seed=seed)
    r = spearman(a, b)
    reliability = {
        "spearman": float(r),
        "spearman_brown": float(spearman_brown(r)),
        "examples_per_half": per_half,
    }
    return (a, b, per_half), reliability


def score_layer_with_reliability(
    network: Network,
    group: str,
    batches: Sequence[Batch],
    criterion: str = "oracle_loss",
    options: Mapping[str, Any] | None = None,
    *,
    seed: int = 0,
) -> tuple[np.ndarray, dict[str, float]]:
    """`score_layer` and `split_half_reliability` together.

    The objective criterion is a mean over images, so on an even number of images its scores
    on all of them are the mean of the halves' scores: the reliability then costs nothing
    extra. Any other criterion is scored on all the images as well (three passes).

    Args:
      network, group, batches, criterion, options, seed: as `score_layer`.

    Returns:
      (the scores on all the images, the reliability record).
    """
    (a, b, per_half), reliability = _halves(network, group, batches, criterion, options, seed)
    total = sum(np.shape(batch["image"])[0] for batch in batches)
    if criterion in _MEANS_OVER_IMAGES and total == 2 * per_half:
        return (a + b) / 2.0, reliability
    return score_layer(network, group, batches, criterion, options, seed=seed), reliability


# ---------------------------------------------------------------------------------------------
# Who chooses: a person (through a chooser), a selection file, the stand-in
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LayerView:
    """One layer as a chooser sees it, before its kernels are removed.

    Attributes:
      group: the layer (its group name).
      index: its position among the simplified layers.
      count: how many kernels p means for it (the suggestion a page shows).
      model: how to call the model as it is now (the pruned program after earlier layers).
      variables: its variables.
      graph: its channel graph (current widths).
      images: sample images to show.
      batches: the batches the criterion reads (for an objective score next to each kernel).
      fingerprint: the run's base model fingerprint, which a selection made now records.
      accepted: the fingerprints a selection may carry (the base model's and the current one's).
    """

    group: str
    index: int
    count: int
    model: Model
    variables: Any
    graph: ChannelGraph
    images: Any
    batches: tuple[Batch, ...]
    fingerprint: str
    accepted: tuple[str, ...]

    @property
    def size(self) -> int:
        """The layer's current number of kernels."""
        return self.graph[self.group].size

    def objective_scores(self) -> np.ndarray:
        """Each kernel's objective score (loss increase when removed alone, "oracle_loss")."""
        return score_layer(
            Network(self.model, self.variables, self.graph), self.group, self.batches
        )


# (layer) -> (indices to remove in its current width, who chose: "person" or "stand-in:...").
Chooser = Callable[[LayerView], tuple[Sequence[int], str]]


class PageWriter(Protocol):
    """Writes a layer's kernel-selection page (the inspect layer's `write_kernel_page`)."""

    def __call__(self, path: Path, view: LayerView, save_to: Path) -> Any: ...


@dataclasses.dataclass(frozen=True)
class SelectionPage:
    """The kernel page as a waiting run uses it; the inspect layer supplies it.

    Attributes:
      write: writes the page of a layer to a path, telling the person to save the choice to
        `save_to`.
      page_name: the page's file name for a group ("conv1" -> "conv1.html").
      answer_names: the names the person's file may have, the asked one first (the page's
        download gets the second by default).
    """

    write: PageWriter
    page_name: Callable[[str], str]
    answer_names: Callable[[str], Sequence[str]]


def waiting_chooser(
    folder: str | Path,
    page: SelectionPage,
    *,
    poll_seconds: float = 1.0,
    timeout_s: float | None = None,
) -> Chooser:
    """The subjective criterion's hand-off: show the layer on its page and wait for a person.

    For each layer: if `folder` already holds the layer's answer (a rerun), it is used;
    otherwise the page is written to ``folder/<page name>`` and the run waits for
    ``folder/<answer name>`` (either of `page.answer_names`), a whole file
    (`selection_file.wait_for_file`). The answer must fit the layer and carry the base or the
    current model's fingerprint.

    Args:
      folder: where pages and answers go (a run's ``workdir/selection``).
      page: how to write the page and name the files.
      poll_seconds: seconds between two looks for the answer.
      timeout_s: how long to wait; None: forever.

    Returns:
      A `Chooser` for `progressive_prune(..., choose=...)`.
    """
    folder = Path(folder).resolve()

    def choose(view: LayerView) -> tuple[np.ndarray, str]:
        folder.mkdir(parents=True, exist_ok=True)
        answers = [folder / name for name in page.answer_names(view.group)]
        answer = next((path for path in answers if selection_file.file_complete(path)), None)
        if answer is None:
            where = folder / page.page_name(view.group)
            page.write(where, view, answers[0])
            others = " or ".join(path.name for path in answers[1:])
            print(
                f"Choose the kernels of layer {view.group!r} on {where}; waiting for "
                f"{answers[0]}" + (f" (or {others} in that folder)" if others else ""),
                flush=True,
            )
            answer = selection_file.wait_for_file(
                answers, poll_seconds=poll_seconds, timeout_s=timeout_s
            )
        return selection_file.read_layer(answer, view.group, view.size, fingerprints=view.accepted)

    return choose


def subjective_removals(
    view: LayerView, selection: str, choose: Chooser | None
) -> tuple[np.ndarray, str]:
    """A person's choice for a layer: from the selection file, else from `choose`.

    Args:
      view: the layer.
      selection: a selection file or directory ("" for none).
      choose: who to ask when the file has no choice for the layer.

    Returns:
      (sorted indices to remove in the layer's current width, who chose).

    Raises:
      SelectionError: the file's choice does not fit, or there is nobody to ask.
    """
    if selection:
        layers = selection_file.read_selection(selection)
        if view.group in layers:
            selection_file.check_against(
                {view.group: layers[view.group]},
                {view.group: view.size},
                fingerprints=view.accepted,
            )
            return layers[view.group]["remove"], layers[view.group]["chosen_by"]
    if choose is None:
        raise selection_file.SelectionError(
            f"The selection {selection or '(none)'} has no choice for layer {view.group!r}; add "
            "it with the page of `jaxprune inspect`, or pass choose= (e.g. a waiting_chooser "
            "that writes each layer's page and waits for the person's file)."
        )
    removed, chosen_by = choose(view)
    return checked_choice(view, removed), str(chosen_by)


def standin_removals(view: LayerView) -> tuple[np.ndarray, str]:
    """The scripted stand-in's choice of `view.count` kernels (`jaxprune.methods.standin`)."""
    maps = standin.layer_maps(
        view.model.apply_fn,
        view.variables,
        view.graph,
        view.group,
        view.images,
        view.model.eval_kwargs,
    )
    return standin.removals_from_maps(maps, view.count), standin.CHOSEN_BY


def checked_choice(view: LayerView, removed: Sequence[int]) -> np.ndarray:
    """A chooser's answer as sorted int64 indices, refused unless it fits the layer.

    Raises:
      SelectionError: indices that are not integers in range, repeated, or all of the layer.
    """
    document = selection_file.selection_document(
        {view.group: list(np.asarray(removed).reshape(-1).tolist())}, {view.group: view.size}
    )
    return np.asarray(document["layers"][view.group]["remove"], np.int64)
