"""A dataset wrapper that slows training batches, so a kill test can stop a run mid-way."""

import time


class DelayedDataset:
    """Wraps a dataset; each training batch arrives `delay_s` seconds late."""

    def __init__(self, dataset, delay_s: float) -> None:
        self._dataset = dataset
        self._delay_s = delay_s

    def __getattr__(self, name):
        return getattr(self._dataset, name)

    def iterate(self, split, *args, **kwargs):
        for batch in self._dataset.iterate(split, *args, **kwargs):
            if split == "train":
                time.sleep(self._delay_s)
            yield batch
