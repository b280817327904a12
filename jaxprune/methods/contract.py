"""What every pruning method takes and returns.

Every method has the same signature::

    result = name_prune(model, variables, data, config, *, workdir=None, progress=True)

* `model` is a `jaxprune.Model` (a linen or NNX module, or any apply function, with its example
  input and the keywords of its evaluation and training calls);
* `variables` are its trained variables (``{"params": ..., ...}``);
* `data` is anything `as_prune_data` accepts: an object with ``train(epoch)`` and
  ``validation()`` (the `PruneData` protocol), a `jaxprune.data.Dataset`, or a plain iterable
  of batches (dicts with ``"image"`` and ``"label"``, from tfds, grain or NumPy), which then
  serves for both;
* `config` is the method's frozen config dataclass;
* `workdir`, when given, is where the method checkpoints and from where it resumes.

It returns a `PruneResult`: the pruned model (its apply function is the pruned program, so no
rebuild of your module is needed), its variables, the kept channels of every group, a history
and a summary.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Protocol, runtime_checkable

import numpy as np

from jaxprune.graph import ChannelGraph
from jaxprune.model import Model

Batch = Mapping[str, Any]


@runtime_checkable
class PruneData(Protocol):
    """Data for a pruning method: training epochs and a fixed validation split.

    ``train(epoch)`` yields one epoch of training batches (deterministic for a given epoch, so
    a resumed run sees the same batches); ``validation()`` yields the batches that criteria,
    fitness functions and every choice of a method read (never the test split).
    """

    def train(self, epoch: int) -> Iterable[Batch]: ...

    def validation(self) -> Iterable[Batch]: ...


@dataclasses.dataclass(frozen=True)
class BatchList:
    """A fixed list of batches as `PruneData`: the same batches for training and validation.

    For methods that only score (one-shot criteria) or a quick experiment; a method that
    trains and also makes choices should be given separate splits (`Splits`).
    """

    batches: tuple[Batch, ...]

    def train(self, epoch: int) -> Iterator[Batch]:
        del epoch
        return iter(self.batches)

    def validation(self) -> Iterator[Batch]:
        return iter(self.batches)


@dataclasses.dataclass(frozen=True)
class Splits:
    """`PruneData` from two sources: ``train`` (a function of the epoch, or a re-iterable of
    batches used every epoch) and ``validation`` (a re-iterable of batches)."""

    train_batches: Callable[[int], Iterable[Batch]] | Iterable[Batch]
    validation_batches: Iterable[Batch]

    def train(self, epoch: int) -> Iterable[Batch]:
        if callable(self.train_batches):
            return self.train_batches(epoch)
        return self.train_batches

    def validation(self) -> Iterable[Batch]:
        return self.validation_batches


@dataclasses.dataclass(frozen=True)
class DatasetData:
    """A `jaxprune.data.Dataset` as `PruneData`: preprocessed batches of its splits."""

    dataset: Any
    batch_size: int = 128
    seed: int = 0

    def train(self, epoch: int) -> Iterator[Batch]:
        from jaxprune import data as data_lib

        batches = self.dataset.iterate(
            "train", self.batch_size, seed=self.seed, epoch=epoch, shuffle=True
        )
        for index, batch in enumerate(batches):
            key = data_lib.augmentation_key(self.seed, epoch, index)
            images, labels = self.dataset.preprocess(
                batch["image"], batch["label"], key, train=True
            )
            yield {"image": images, "label": labels}

    def validation(self) -> Iterator[Batch]:
        from jaxprune import data as data_lib

        return data_lib.preprocessed_batches(self.dataset, "validation", self.batch_size)


def as_prune_data(data: Any, *, batch_size: int = 128, seed: int = 0) -> PruneData:
    """Adapts what a user passes as data to `PruneData`.

    Args:
      data: a `PruneData`, a `jaxprune.data.Dataset`, or an iterable of batches (a list, or
        anything iterable more than once; a generator is read once and kept).
      batch_size, seed: for a `Dataset`.

    Raises:
      TypeError: anything else, with what is accepted.
    """
    if isinstance(data, PruneData):
        return data
    if hasattr(data, "iterate") and hasattr(data, "preprocess"):
        return DatasetData(data, batch_size, seed)
    if isinstance(data, Mapping):
        return BatchList((data,))
    if isinstance(data, Iterable):
        batches = tuple(data)
        for batch in batches[:1]:
            if not isinstance(batch, Mapping) or "image" not in batch:
                raise TypeError(
                    "Batches must be mappings with an 'image' (and 'label') array, got "
                    f"{type(batch).__name__}."
                )
        return BatchList(batches)
    raise TypeError(
        f"data must be an iterable of batches, a jaxprune.data.Dataset or an object with "
        f"train(epoch) and validation() methods; got {type(data).__name__}."
    )


@dataclasses.dataclass(frozen=True)
class PruneResult:
    """What a method returns.

    Attributes:
      method: the method's name.
      model: the pruned model: its apply function is the pruned program, so it runs with the
        same calls as the original and needs no module.
      variables: the pruned model's variables (after the method's own fine-tuning, if any).
      keep: per group of the original graph, the indices of the channels kept.
      graph: the original model's channel graph.
      history: the method's steps (layers, generations, iterations), one dict each.
      summary: cost and metrics before and after, and the method's own report.
    """

    method: str
    model: Model
    variables: Any
    keep: Mapping[str, np.ndarray]
    graph: ChannelGraph
    history: tuple[Mapping[str, Any], ...] = ()
    summary: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def apply_fn(self) -> Callable[..., Any]:
        """The pruned program: ``apply_fn(variables, x, **kwargs)``."""
        return self.model.apply_fn
