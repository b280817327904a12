"""Shared test setup: a persistent compilation cache, so repeated runs compile once, and a
session that never reaches the kernel's limit on memory mappings (one test session compiles
thousands of XLA programs; see `jaxprune.runtime.release_compiled_programs_if_crowded`)."""

import pytest

from jaxprune.runtime import enable_compilation_cache, release_compiled_programs_if_crowded

enable_compilation_cache()


@pytest.fixture(autouse=True)
def _bounded_compiled_programs():
    yield
    release_compiled_programs_if_crowded(fraction=0.3)
