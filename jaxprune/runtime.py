"""Process-level JAX settings that a run opts into (nothing here runs on import)."""

from __future__ import annotations

import gc
import os
from pathlib import Path

import jax

DEFAULT_CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "jaxprune"


def enable_compilation_cache(cache_dir: str | os.PathLike | None = None) -> Path:
    """Turns on JAX's persistent compilation cache.

    The first step of a process then costs ~2 s instead of ~11 s on a CPU, because XLA
    programs compiled by an earlier run are read back from disk.

    Args:
      cache_dir: where compiled programs are kept; defaults to `$JAXPRUNE_CACHE_DIR`, else
        `~/.cache/jaxprune/xla`.

    Returns:
      The directory in use.
    """
    path = Path(cache_dir or os.environ.get("JAXPRUNE_CACHE_DIR") or DEFAULT_CACHE_DIR / "xla")
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    # Cache everything that took real compile time; tiny programs are cheaper to rebuild.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


def memory_map_use() -> tuple[int, int] | None:
    """This process's memory mappings and the kernel's limit on them (Linux), else None."""
    try:
        with open("/proc/self/maps", "rb") as maps:
            count = sum(1 for _ in maps)
        limit = int(Path("/proc/sys/vm/max_map_count").read_text())
    except (OSError, ValueError):
        return None
    return count, limit


def release_compiled_programs_if_crowded(fraction: float = 0.5) -> bool:
    """Drops JAX's compiled programs when the process nears its limit on memory mappings.

    Every XLA CPU executable keeps a few memory mappings for its code until JAX's caches drop
    it. A long process that compiles thousands of programs (a pruning run compiles new ones at
    every width; a test session compiles everything) reaches Linux's `vm.max_map_count`
    (65530 by default), and the next compile then crashes the process with a segmentation
    fault instead of raising. Long loops call this at step boundaries; a dropped program costs
    one recompile (or a read from the persistent compilation cache) when it is used again.

    Args:
      fraction: release once the mappings exceed this share of the limit.

    Returns:
      Whether the caches were cleared.
    """
    use = memory_map_use()
    if use is None or use[0] < fraction * use[1]:
        return False
    jax.clear_caches()
    gc.collect()
    return True


def initialize_distributed() -> tuple[int, int]:
    """Joins a run of several processes (hosts) through JAX's own runtime.

    Call it first, before any computation, in every process. With `JAX_COORDINATOR_ADDRESS`,
    `JAXPRUNE_NUM_PROCESSES` and `JAXPRUNE_PROCESS_ID` set (e.g. several processes on one
    machine), those are used; otherwise `jax.distributed.initialize` detects the cluster
    (SLURM, Cloud TPU pods, Open MPI, Kubernetes). On CPUs the collectives go through gloo.
    Afterwards `jaxprune.sharding` meshes span every process's devices.

    Returns:
      (this process's index, the number of processes).
    """
    if not jax.distributed.is_initialized():
        # Collectives between CPU devices of different processes (no effect on accelerators).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        count = os.environ.get("JAXPRUNE_NUM_PROCESSES")
        index = os.environ.get("JAXPRUNE_PROCESS_ID")
        if count is not None and index is not None:
            jax.distributed.initialize(num_processes=int(count), process_id=int(index))
        else:
            jax.distributed.initialize()
    return jax.process_index(), jax.process_count()


def is_main_process() -> bool:
    """Whether this process writes the run's files and prints (process 0 of a multi-process
    run; the only process otherwise)."""
    return jax.process_index() == 0


def sync_processes(name: str) -> None:
    """Waits until every process of a multi-process run has reached this point (no-op with one
    process); e.g. before the others read a file the first process wrote."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
