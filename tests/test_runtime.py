"""The process-level safety valve on compiled programs."""

import sys

import jax
import jax.numpy as jnp
import pytest

from jaxprune.runtime import memory_map_use, release_compiled_programs_if_crowded

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="memory mappings are read from /proc"
)


def _compile_programs(count: int) -> None:
    for size in range(2, 2 + count):
        jax.jit(lambda x: jnp.tanh(x).sum() * x.shape[0])(jnp.ones((size, 3))).block_until_ready()


def test_compiled_programs_hold_memory_mappings_until_released():
    before, limit = memory_map_use()
    assert 0 < before < limit
    _compile_programs(40)
    crowded, _ = memory_map_use()
    # Every executable keeps mappings for its code; they add up in a long process.
    assert crowded >= before + 40
    assert not release_compiled_programs_if_crowded(fraction=1.0)
    # Nothing released: other memory may come and go meanwhile, but not the programs' share.
    assert memory_map_use()[0] > crowded - 40
    assert release_compiled_programs_if_crowded(fraction=0.0)
    released, _ = memory_map_use()
    assert released <= crowded - 40


def test_a_released_program_still_runs():
    double = jax.jit(lambda x: 2 * x)
    assert float(double(jnp.float32(3))) == 6.0
    assert release_compiled_programs_if_crowded(fraction=0.0)
    assert float(double(jnp.float32(4))) == 8.0
