"""What a dataset feeds a model, known before any data is read."""

from __future__ import annotations

from jaxprune import data
from jaxprune.commands.config import UsageError


def data_shape(
    dataset: str, input_shape: str | None = None, num_classes: int | None = None
) -> tuple[tuple[int, ...], int]:
    """``(image shape (H, W, C), number of classes)`` of a dataset, or as given.

    Args:
      dataset: a dataset name (`jaxprune.data.DATASETS`).
      input_shape: ``"H,W,C"`` to use instead of the dataset's.
      num_classes: classes to use instead of the dataset's.

    Raises:
      UsageError: a malformed shape, or an unknown dataset without both given.
    """
    shape = None
    if input_shape:
        try:
            shape = tuple(int(s) for s in input_shape.split(","))
        except ValueError:
            raise UsageError(f"--input-shape {input_shape!r} must look like 28,28,1.") from None
    spec = data.DATASETS.get(dataset)
    if spec is None and (shape is None or num_classes is None):
        raise UsageError(
            f"--dataset {dataset!r} is unknown ({', '.join(data.DATASETS)}); or give "
            "--input-shape and --num-classes."
        )
    shape = shape or tuple(spec.image_shape)
    return shape, int(num_classes if num_classes is not None else spec.num_classes)
