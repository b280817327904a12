"""One run directory for training and every method: identity, lock, checkpoints, files.

A run's workdir is owned by one process at a time (a lock file), and belongs to one run: its
*identity* (the kind of run, the config fields that change its result, and fingerprints of its
inputs: base variables, data) is written to ``run.json`` when the run starts. Running again in
the same workdir resumes when the identity is the same and is refused, with the changed fields
named, when it is not; nothing stale is ever reused.

Inside: ``checkpoints/`` (orbax, each step with a listing of its arrays and their SHA-256, so a
corrupted checkpoint is an error, never silently loaded), JSON files written atomically (write,
fsync, rename), artifacts that are reused only when the identity stored with them matches, and
``metrics.jsonl`` (truncated to the resumed step, so a resumed run's log equals an uninterrupted
run's).

Example:
  >>> with RunDir.open(workdir, kind="oneshot", identity={"config": asdict(config)}) as run:
  ...     step = run.latest_step()
  ...     run.save(step=1, state=tree, meta={"history": history})
  ...     run.write_json("result.json", summary)
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import os
from collections.abc import Collection, Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxprune import checkpoint as ckpt
from jaxprune.checkpoint import CheckpointError, json_default
from jaxprune.metrics import MetricsWriter
from jaxprune.runtime import is_main_process

RUN_FILE = "run.json"
LOCK_FILE = ".lock"


class RunMismatchError(CheckpointError):
    """The workdir holds another run; the message names what differs and what to do."""


class RunLockedError(CheckpointError):
    """Another process owns the workdir."""


def write_json_atomic(path: str | os.PathLike, value: Any) -> Path:
    """Writes JSON so that readers see the old file or the new one, never a partial one.

    The text goes to a temporary file in the same folder, is flushed to disk, then renamed over
    `path` (a rename is atomic on POSIX file systems). On any error (a full disk) the old file
    is left as it was and the temporary one removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("w") as f:
            json.dump(value, f, indent=2, default=json_default)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return path


def read_json(path: str | os.PathLike) -> Any:
    """The JSON at `path`, or None if there is none; a broken file is a `CheckpointError`."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(
            f"{path} is not valid JSON ({error}); it was damaged. Delete it (the run recomputes "
            "what it holds) or use another workdir."
        ) from error


def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as ``{"a.b": value}``."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _normalise(value: Any) -> Any:
    """The value as it reads back from JSON (tuples become lists, arrays lists)."""
    return json.loads(json.dumps(value, default=json_default))


def config_identity(config: Any, cosmetic: Collection[str] = ()) -> dict[str, Any]:
    """A config dataclass as identity: every field but the `cosmetic` ones (flattened names,
    such as "progress" or "optimizer.log_every"), which do not change a run's result."""
    values = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
    flat = flatten(_normalise(values))
    return {k: v for k, v in flat.items() if k not in cosmetic}


@dataclasses.dataclass
class RunDir:
    """An open run directory (use `RunDir.open`, as a context manager).

    Attributes:
      path: the workdir.
      kind: the kind of run ("train", "oneshot", "iterative", ...).
      identity: what the run is (flattened JSON values).
      resumed: whether the workdir already held this run.
    """

    path: Path
    kind: str
    identity: dict[str, Any]
    resumed: bool
    _lock: Any = None
    _sequences: dict[str, Checkpoints] = dataclasses.field(default_factory=dict)
    _writers: list[MetricsWriter] = dataclasses.field(default_factory=list)

    @classmethod
    @contextlib.contextmanager
    def open(
        cls,
        path: str | os.PathLike,
        *,
        kind: str,
        identity: Mapping[str, Any],
        fresh: bool = False,
    ) -> Iterator[RunDir]:
        """Opens `path` for the run `identity` of `kind`, locking it for this process.

        Args:
          path: the workdir (created if needed).
          kind: the kind of run.
          identity: what makes the run what it is (config fields, input fingerprints); JSON.
          fresh: refuse a workdir that already holds a run, instead of resuming it.

        Raises:
          RunLockedError: another process has the workdir.
          RunMismatchError: the workdir holds another run (the differences are named).
        """
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        # Several processes share one workdir: the first locks it and writes the run's files;
        # the others follow its view of whether the run resumes.
        main = is_main_process()
        lock, stored, failure = None, None, None
        if main:
            try:
                lock = _acquire(path)
                stored = read_json(path / RUN_FILE)
            except CheckpointError as error:  # locked or damaged: every process stops
                failure = error
        if jax.process_count() > 1:
            shared = _from_main_process(
                {"failure": [type(failure).__name__, str(failure)]} if failure else {"run": stored}
            )
            if "failure" in shared and failure is None:
                kind_name, message = shared["failure"]
                failure = _ERRORS.get(kind_name, CheckpointError)(message)
            stored = shared.get("run")
        if failure is not None:
            if lock is not None:
                _release(lock)
            raise failure
        run = None
        try:
            flat = flatten(_normalise(dict(identity)))
            if stored is None:
                if main:
                    write_json_atomic(path / RUN_FILE, {"kind": kind, "identity": flat})
                resumed = False
            else:
                _check_identity(path, stored, kind, flat)
                if fresh:
                    raise RunMismatchError(
                        f"{path} already holds this {kind} run and a fresh start was asked; "
                        "use another workdir, or resume it by leaving out the fresh option."
                    )
                resumed = True
            run = cls(path, kind, flat, resumed, lock)
            yield run
        finally:
            if run is not None:
                run.close()
            if lock is not None:
                _release(lock)

    @classmethod
    @contextlib.contextmanager
    def maybe(
        cls, path: str | os.PathLike | None, *, kind: str, identity: Mapping[str, Any]
    ) -> Iterator[RunDir | None]:
        """`open` when a workdir is given, else nothing (a run kept in memory only)."""
        if path is None:
            yield None
            return
        with cls.open(path, kind=kind, identity=identity) as run:
            yield run

    # -- checkpoints

    def checkpoints(self, name: str = "main") -> Checkpoints:
        """The run's checkpoint sequence `name` (``checkpoints/<name>/``): a run may hold
        several (e.g. one per fine-tuning)."""
        if name not in self._sequences:
            self._sequences[name] = Checkpoints(self.path / "checkpoints" / name)
        return self._sequences[name]

    # -- files

    def write_json(self, name: str, value: Any) -> Path:
        """Writes ``<workdir>/<name>`` atomically (by the first process of a multi-process
        run; the others compute the same value)."""
        if not is_main_process():
            return self.path / name
        return write_json_atomic(self.path / name, value)

    def read_json(self, name: str) -> Any:
        return read_json(self.path / name)

    def artifact(self, name: str, identity: Mapping[str, Any]) -> Any:
        """A JSON artifact stored with `save_artifact`, if its identity matches (else None:
        it belongs to another computation and is recomputed)."""
        try:
            stored = self.read_json(name)
        except CheckpointError:
            return None  # damaged: recompute
        if not isinstance(stored, Mapping) or stored.get("identity") != _normalise(identity):
            return None
        return stored.get("value")

    def save_artifact(self, name: str, identity: Mapping[str, Any], value: Any) -> None:
        self.write_json(name, {"identity": _normalise(identity), "value": value})

    def metrics(self, resumed_step: int | None = None) -> MetricsWriter:
        """The run's live metrics (``metrics.jsonl`` and TensorBoard), with what came after
        `resumed_step` dropped (None: a fresh start); close it when done."""
        writer = MetricsWriter(self.path, resumed_step=resumed_step, enabled=is_main_process())
        self._writers.append(writer)
        return writer

    def close(self) -> None:
        for sequence in self._sequences.values():
            sequence.close()
        self._sequences.clear()
        for writer in self._writers:
            writer.close()
        self._writers.clear()


class Checkpoints:
    """A sequence of checkpoints (orbax), each step with its arrays' listing and hashes."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._manager: Any = None

    @property
    def manager(self) -> Any:
        if self._manager is None:
            self._manager = ckpt.open_checkpoints(self.directory, max_to_keep=2, cleanup_tmp=True)
        return self._manager

    def latest_step(self) -> int | None:
        """The latest finished step, or None."""
        if not self.directory.exists():
            return None
        return self.manager.latest_step()

    def save(self, step: int, state: Any, meta: Mapping[str, Any] | None = None) -> None:
        """Checkpoints `state` (a tree of arrays) with a JSON `meta`, atomically, with the
        arrays' listing and hashes for `restore` to check."""
        listing = ckpt.array_listing(state, with_hashes=True)
        document = {"step": int(step), "arrays": listing, "meta": _normalise(dict(meta or {}))}
        self.manager.save(
            int(step),
            args=ckpt.ocp.args.Composite(
                state=ckpt.ocp.args.StandardSave(state),
                meta=ckpt.ocp.args.JsonSave(document),
            ),
        )
        self.manager.wait_until_finished()

    def meta(self, step: int) -> dict[str, Any]:
        """The JSON meta saved with step `step` (without reading its arrays)."""
        return dict(self._document(step)["meta"])

    def _document(self, step: int) -> dict[str, Any]:
        where = str(self.directory / str(step))
        try:
            return self.manager.restore(
                step, args=ckpt.ocp.args.Composite(meta=ckpt.ocp.args.JsonRestore())
            ).meta
        except Exception as error:  # orbax raises assorted types for damaged files
            raise CheckpointError(
                f"checkpoint {where} is damaged ({type(error).__name__}); delete it to fall "
                "back to an earlier one."
            ) from error

    def restore(self, step: int, target: Any) -> tuple[Any, dict[str, Any]]:
        """Step `step` read into `target`'s shapes and dtypes, and its meta.

        Raises:
          CheckpointError: arrays of other names, shapes or dtypes than `target`, arrays that
            differ from the hashes recorded when they were saved, or damaged files.
        """
        where = str(self.directory / str(step))
        document = self._document(step)
        ckpt.check_listing(where, document["arrays"], ckpt.array_listing(target, with_hashes=False))
        state = ckpt.restore_state(self.manager, step, target, where=where)
        ckpt.check_hashes(where, document["arrays"], state)
        return state, dict(document["meta"])

    def close(self) -> None:
        if self._manager is not None:
            self._manager.wait_until_finished()
            self._manager.close()
            self._manager = None


def _check_identity(path: Path, stored: Mapping[str, Any], kind: str, flat: dict) -> None:
    if stored.get("kind") != kind:
        raise RunMismatchError(
            f"{path} holds a {stored.get('kind')!r} run, not a {kind!r} one; use another workdir."
        )
    before = stored.get("identity", {})
    changed = _differences(before, flat)
    if changed:
        described = "; ".join(f"{k}: {_short(a)} -> {_short(b)}" for k, a, b in changed[:6])
        more = f" (and {len(changed) - 6} more)" if len(changed) > 6 else ""
        raise RunMismatchError(
            f"{path} holds another {kind} run: {described}{more}. Use another workdir for "
            "these settings, or set them back to resume that run."
        )


def _differences(before: Mapping[str, Any], after: Mapping[str, Any]) -> list[tuple]:
    """(name, before, after) of every changed field, shallowest first; a sub-config that
    appears or disappears (``finetune: {...} -> None``) is one difference, not one per field."""
    found: dict[str, tuple[Any, Any]] = {}
    for key in set(before) | set(after):
        if key in before and key in after:
            if before[key] != after[key]:
                found[key] = (before[key], after[key])
            continue
        other = after if key in before else before
        parts = key.split(".")
        prefix = next(
            (
                ".".join(parts[:n])
                for n in range(len(parts) - 1, 0, -1)
                if ".".join(parts[:n]) in other
            ),
            key,
        )
        found[prefix] = (_subtree(before, prefix), _subtree(after, prefix))
    ordered = sorted(found.items(), key=lambda item: (item[0].count("."), item[0]))
    return [(k, a, b) for k, (a, b) in ordered]


def _subtree(flat: Mapping[str, Any], prefix: str) -> Any:
    """The value at `prefix` of a flattened dict, rebuilt as a dict when it is one."""
    if prefix in flat:
        return flat[prefix]
    inner = {k[len(prefix) + 1 :]: v for k, v in flat.items() if k.startswith(prefix + ".")}
    return inner or None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 70 else text[:67] + "..."


_ERRORS = {
    "RunLockedError": RunLockedError,
    "RunMismatchError": RunMismatchError,
    "CheckpointError": CheckpointError,
}


def _from_main_process(stored: Any) -> Any:
    """The first process's reading of a JSON document, given to every process."""
    from jax.experimental import multihost_utils

    text = json.dumps(stored).encode()
    size = int(multihost_utils.broadcast_one_to_all(np.int64(len(text))))
    buffer = np.zeros(size, np.uint8)
    buffer[: len(text)] = np.frombuffer(text, np.uint8)[:size]
    shared = multihost_utils.broadcast_one_to_all(buffer)
    return json.loads(np.asarray(shared, np.uint8).tobytes().decode())


def _acquire(path: Path) -> Any:
    handle = (path / LOCK_FILE).open("a+")
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        handle.close()
        if error.errno in (errno.EAGAIN, errno.EACCES):
            raise RunLockedError(
                f"{path} is in use by another jaxprune process; wait for it to finish or use "
                "another workdir."
            ) from None
        raise
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def _release(handle: Any) -> None:
    with contextlib.suppress(OSError):
        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
    handle.close()


def fingerprint(tree: Any) -> str:
    """The identity fingerprint of an input (variables, a batch of data)."""
    return ckpt.tree_fingerprint(jax.device_get(tree))
