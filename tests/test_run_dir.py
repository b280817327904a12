"""The run directory and the one training loop: identity, lock, atomic files, checkpoints that
refuse corruption, resume equal to an uninterrupted run, one divergence check."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from user_models import CompactHardCoded, init_linen

import jaxprune as jp
from jaxprune.checkpoint import CheckpointError
from jaxprune.fit import DivergenceError, FitConfig, fit
from jaxprune.methods.contract import as_prune_data
from jaxprune.model import Model
from jaxprune.run import RunDir, RunLockedError, RunMismatchError, write_json_atomic

# A failed array read leaves orbax's other reads to end later (see test_checkpoint.py).
pytestmark = [
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
    pytest.mark.filterwarnings("ignore:coroutine .* was never awaited:RuntimeWarning"),
]


def test_another_run_in_the_same_workdir_is_refused_with_the_changed_fields(tmp_path):
    identity = {"config": {"ratio": 0.5, "criterion": "l1"}, "variables": "abc"}
    with RunDir.open(tmp_path, kind="oneshot", identity=identity) as run:
        assert not run.resumed
    with RunDir.open(tmp_path, kind="oneshot", identity=identity) as run:
        assert run.resumed
    changed = {"config": {"ratio": 0.3, "criterion": "l1"}, "variables": "abc"}
    with pytest.raises(RunMismatchError, match=r"config.ratio: 0.5 -> 0.3"):
        with RunDir.open(tmp_path, kind="oneshot", identity=changed):
            pass
    with pytest.raises(RunMismatchError, match="holds a 'oneshot' run, not a 'iterative' one"):
        with RunDir.open(tmp_path, kind="iterative", identity=identity):
            pass


def test_a_second_opener_of_the_workdir_gets_a_clear_error(tmp_path):
    # The lock is an flock on the workdir's lock file: a second open of it (here in the same
    # process, as another process would) cannot take it while the first holds it.
    with RunDir.open(tmp_path, kind="x", identity={}):
        with pytest.raises(RunLockedError, match="in use by another jaxprune process"):
            with RunDir.open(tmp_path, kind="x", identity={}):
                pass
    with RunDir.open(tmp_path, kind="x", identity={}):  # free again
        pass


def test_json_is_written_atomically(tmp_path):
    path = tmp_path / "result.json"
    write_json_atomic(path, {"accuracy": 0.9})
    with pytest.raises(TypeError):
        write_json_atomic(path, {"bad": object()})  # fails half way through
    assert json.loads(path.read_text()) == {"accuracy": 0.9}
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]


def test_an_artifact_is_reused_only_for_its_own_identity(tmp_path):
    with RunDir.open(tmp_path, kind="x", identity={}) as run:
        run.save_artifact("scores.json", {"criterion": "l1", "variables": "v1"}, [1.0, 2.0])
        assert run.artifact("scores.json", {"criterion": "l1", "variables": "v1"}) == [1.0, 2.0]
        assert run.artifact("scores.json", {"criterion": "l2", "variables": "v1"}) is None
        (tmp_path / "scores.json").write_text("{ damaged")
        assert run.artifact("scores.json", {"criterion": "l1", "variables": "v1"}) is None


def test_a_corrupted_checkpoint_is_refused(tmp_path):
    tree = {"w": jnp.arange(1000.0), "b": jnp.ones(3)}
    with RunDir.open(tmp_path, kind="x", identity={}) as run:
        run.checkpoints().save(1, tree, {"note": "one"})
        restored, meta = run.checkpoints().restore(1, tree)
        np.testing.assert_array_equal(restored["w"], tree["w"])
        assert meta == {"note": "one"}
    step = tmp_path / "checkpoints" / "main" / "1"
    # A stored hash that no longer matches the arrays (as after a bit flip on disk).
    meta = next(p for p in (step / "meta").iterdir() if p.name == "metadata")
    document = json.loads(meta.read_text())
    document["arrays"]["w"]["sha256"] = "0" * 64
    meta.write_text(json.dumps(document))
    with RunDir.open(tmp_path, kind="x", identity={}) as run:
        with pytest.raises(CheckpointError, match="corrupted"):
            run.checkpoints().restore(1, tree)
    # Array files cut short.
    for p in (p for p in (step / "state").rglob("*") if p.is_file() and p.parent.name == "d"):
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    with RunDir.open(tmp_path, kind="x", identity={}) as run:
        with pytest.raises(CheckpointError, match="corrupted or incomplete"):
            run.checkpoints().restore(1, tree)


@pytest.fixture(scope="module")
def small_problem():
    module, variables, x, _ = init_linen(CompactHardCoded)
    model = Model.linen(module, x, variables=variables)
    graph = jp.channel_graph(model.apply_fn, variables, x, **model.eval_kwargs)
    pruned = jp.prune(variables, graph, {"Conv_0": np.arange(16), "Dense_0": np.arange(32)})
    rng = np.random.default_rng(0)
    batches = [
        {
            "image": rng.standard_normal((8, 16, 16, 3)).astype(np.float32),
            "label": rng.integers(0, 10, 8).astype(np.int32),
        }
        for _ in range(4)
    ]
    return model.with_apply_fn(pruned.apply_fn), pruned.variables, as_prune_data(batches)


class _Interrupt(Exception):
    pass


class _StopAfter:
    """Data whose iteration stops the run (like a kill) after `steps` batches in total."""

    steps_per_epoch = 4  # so that counting an epoch does not read (and use up) batches

    def __init__(self, data, steps):
        self.data, self.left = data, steps

    def train(self, epoch):
        for batch in self.data.train(epoch):
            if self.left == 0:
                raise _Interrupt()
            self.left -= 1
            yield batch

    def validation(self):
        return self.data.validation()


@pytest.mark.slow
def test_a_stopped_fit_resumes_and_ends_like_an_uninterrupted_one(tmp_path, small_problem):
    model, variables, data = small_problem
    config = FitConfig(epochs=2.5, checkpoint_every=3, seed=1)
    whole, history = fit(model, variables, data, config, progress=False)
    assert [h["step"] for h in history] == [4, 8, 10]
    with RunDir.open(tmp_path, kind="fit", identity={}) as run:
        with pytest.raises(_Interrupt):
            fit(model, variables, _StopAfter(data, 7), config, run=run, progress=False)
        assert run.checkpoints("fit").latest_step() == 6
    with RunDir.open(tmp_path, kind="fit", identity={}) as run:
        resumed, resumed_history = fit(model, variables, data, config, run=run, progress=False)
    assert resumed_history == history
    jax.tree_util.tree_map(np.testing.assert_array_equal, resumed, whole)


def test_divergence_stops_with_the_step_and_the_loss(tmp_path, small_problem):
    model, variables, data = small_problem
    bad = jax.tree_util.tree_map(lambda a: a * 1e30, variables)
    with RunDir.open(tmp_path, kind="fit", identity={}) as run:
        with pytest.raises(
            DivergenceError, match=r"diverged at step 1 \(loss .*gradient norm (nan|inf)"
        ):
            fit(model, bad, data, FitConfig(epochs=1), run=run, progress=False)
        assert run.checkpoints("fit").latest_step() is None
