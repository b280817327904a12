"""The pruning methods by name: what `jaxprune prune --method NAME` runs.

Every method has the contract of `methods.contract`::

    result = METHODS[name].prune(model, variables, data, config, workdir=..., progress=...)

with `config` an instance of ``METHODS[name].config`` (a frozen dataclass with one comment per
field and a ``check()`` that raises before any work).

Example:
  >>> spec = METHODS["oneshot"]
  >>> result = spec.prune(model, variables, batches, spec.config(criterion="fpgm", ratio=0.3))
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable, Mapping
from typing import Any

from jaxprune.methods.blending import BlendingConfig, blending_prune
from jaxprune.methods.contract import PruneResult
from jaxprune.methods.functional import FunctionalConfig, functional_prune
from jaxprune.methods.iterative import IterativeConfig, iterative_prune
from jaxprune.methods.oneshot import OneShotConfig, oneshot_prune
from jaxprune.methods.progressive import ProgressiveConfig, progressive_prune

__all__ = ["METHODS", "MethodSpec"]


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """One pruning method.

    Attributes:
      name: its registry name.
      prune: ``prune(model, variables, data, config, *, workdir=None, progress=True) ->
        PruneResult``.
      config: its config dataclass (every field has a default).
      description: one line: what it does and the paper it implements.
      batch_size_field: the config field that sets the batch size of its data when it is given
        a `jaxprune.data.Dataset` (None: the data's own batch size).
    """

    name: str
    prune: Callable[..., PruneResult]
    config: type
    description: str
    batch_size_field: str | None = None

    def batch_size(self, config: Any, default: int) -> int:
        """The batch size the method's data should have under `config`."""
        value = getattr(config, self.batch_size_field) if self.batch_size_field else None
        return int(value) if value else int(default)


METHODS: Mapping[str, MethodSpec] = types.MappingProxyType(
    {
        spec.name: spec
        for spec in (
            MethodSpec(
                "oneshot",
                oneshot_prune,
                OneShotConfig,
                "score every channel once with a criterion, remove the lowest, optionally "
                "fine-tune (the baselines: L1 of Li et al. 2017, APoZ, FPGM, HRank, ...)",
            ),
            MethodSpec(
                "iterative",
                iterative_prune,
                IterativeConfig,
                "remove k channels at a time by a global ranking, fine-tuning in between "
                "(Molchanov et al., ICLR 2017, arXiv 1611.06440)",
                batch_size_field="batch_size",
            ),
            MethodSpec(
                "progressive",
                progressive_prune,
                ProgressiveConfig,
                "simplify conv layers first to last, retraining layers 1..l+1 after each "
                "(Osaku et al., PRL 2021, arXiv 2101.04699)",
            ),
            MethodSpec(
                "blending",
                blending_prune,
                BlendingConfig,
                "blend a pool of criteria, calibrated per cluster by an evolutionary search "
                "(He et al., ICANN 2021, arXiv 2107.05033)",
                batch_size_field="batch_size",
            ),
            MethodSpec(
                "functional",
                functional_prune,
                FunctionalConfig,
                "keep one filter per cluster of repeated functionality (activation-"
                "maximisation images) (Qin et al., BMVC 2019, arXiv 1810.07322)",
                batch_size_field="batch_size",
            ),
        )
    }
)
