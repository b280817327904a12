"""jaxprune.inspect: looking at kernels, and choosing which to remove.

* `activation_maps` / `all_activation_maps`: each kernel's maps at its layer's gate point.
* `kernel_filters`: each kernel's 3-D filter.
* `macs_per_kernel`: the MACs one kernel of a layer costs (what removing it saves).
* `kernel_page` / `write_kernel_page`: the self-contained kernel-selection page (Osaku et al.'s
  subjective criterion: a person clicks kernels and exports a selection file);
  `selection_file_names`: the names a waiting run reads that file under.
* `standin_removals` / `standin_selection`: a scripted stand-in for that person, labelled as one.
* `selection`: the selection file format (`read_selection`, `write_selection`, ...), with the
  model's fingerprint (`model_fingerprint`).
* `functionality`: activation-maximisation images grouped by cluster, as labelled figures.
"""

from jaxprune.inspect.filters import kernel_filters
from jaxprune.inspect.macs import macs_per_kernel
from jaxprune.inspect.maps import activation_maps, all_activation_maps
from jaxprune.inspect.page import (
    PageConfig,
    kernel_page,
    page_file_name,
    selection_file_names,
    write_kernel_page,
)
from jaxprune.inspect.selection import model_fingerprint
from jaxprune.inspect.standin import removals_from_maps, standin_removals, standin_selection

__all__ = [
    "PageConfig",
    "activation_maps",
    "all_activation_maps",
    "kernel_filters",
    "kernel_page",
    "macs_per_kernel",
    "model_fingerprint",
    "page_file_name",
    "removals_from_maps",
    "selection_file_names",
    "standin_removals",
    "standin_selection",
    "write_kernel_page",
]
