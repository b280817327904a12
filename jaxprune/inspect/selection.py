"""Kernel selection files, as the page and `jaxprune inspect` write them.

The format lives in `jaxprune.methods.selection_file` (a progressive run reads it, and methods
do not import the inspect layer); this module re-exports it under its old name.
"""

from jaxprune.methods.selection_file import (
    FORMAT,
    SHORT_FINGERPRINT,
    SelectionError,
    check_against,
    model_fingerprint,
    read_layer,
    read_selection,
    selection_document,
    write_selection,
)

__all__ = [
    "FORMAT",
    "SHORT_FINGERPRINT",
    "SelectionError",
    "check_against",
    "model_fingerprint",
    "read_layer",
    "read_selection",
    "selection_document",
    "write_selection",
]
