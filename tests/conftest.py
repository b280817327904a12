"""Shared test setup: a persistent compilation cache, so repeated runs compile once."""

from jaxprune.runtime import enable_compilation_cache

enable_compilation_cache()
