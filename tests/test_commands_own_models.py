"""Every subcommand on a model the library never saw: a linen CNN with hard-coded widths and an
NNX CNN, each given as ``--model FILE.py:NAME``."""

from __future__ import annotations

import json
import textwrap

import pytest
from test_prune_methods import DATA, TINY, check_run

from jaxprune.cli import main

LINEN_MODEL = textwrap.dedent(
    """
    import functools

    import flax.linen as nn
    import jax
    import jax.numpy as jnp


    class Net(nn.Module):
        def setup(self):
            conv = functools.partial(nn.Conv, kernel_size=(3, 3), padding="SAME")
            self.stem = conv(10)
            self.norm = nn.GroupNorm(num_groups=5)
            self.body = conv(16, strides=(2, 2))
            self.head = nn.Dense(10)

        def __call__(self, x, train: bool = False):
            x = nn.relu(self.norm(self.stem(x)))
            x = nn.relu(self.body(x))
            return self.head(x.mean(axis=(1, 2)))


    def build(input_shape):
        module = Net()
        return module, module.init(jax.random.key(1), jnp.zeros((1, *input_shape)))
    """
)
NNX_MODEL = textwrap.dedent(
    """
    import jax.numpy as jnp
    from flax import nnx


    class Net(nnx.Module):
        def __init__(self, rngs):
            self.conv1 = nnx.Conv(1, 8, kernel_size=(3, 3), rngs=rngs)
            self.bn1 = nnx.BatchNorm(8, rngs=rngs)
            self.conv2 = nnx.Conv(8, 12, kernel_size=(3, 3), strides=(2, 2), rngs=rngs)
            self.out = nnx.Linear(12, 10, rngs=rngs)

        def __call__(self, x):
            x = nnx.relu(self.bn1(self.conv1(x)))
            x = nnx.relu(self.conv2(x))
            return self.out(jnp.mean(x, axis=(1, 2)))


    def build(input_shape):
        return Net(nnx.Rngs(0))
    """
)
STYLES = {"linen": LINEN_MODEL, "nnx": NNX_MODEL}


@pytest.fixture(scope="module", params=sorted(STYLES))
def spec(request, tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("models") / f"{request.param}_net.py"
    path.write_text(STYLES[request.param])
    return f"{path}:build"


@pytest.mark.slow
def test_graph_lists_the_groups_of_your_model(spec, capsys):
    assert main(["graph", f"--model={spec}"]) == 0
    out = capsys.readouterr().out
    if "linen" in spec:
        assert "stem" in out and "body" in out
    else:
        assert "conv1" in out and "conv2" in out


@pytest.mark.slow
def test_oneshot_prune_runs_your_model(spec, tmp_path):
    argv = [
        "prune",
        "--method=oneshot",
        f"--model={spec}",
        f"--workdir={tmp_path}",
        "--no-progress",
        *DATA,
        *TINY["oneshot"],
    ]
    assert main(argv) == 0
    report = check_run(tmp_path, "oneshot", spec)
    if "linen" in spec:  # GroupNorm of 5 groups: the stem loses whole groups of 2 channels
        assert len(report["keep"]["stem"]) % 2 == 0


@pytest.mark.slow
@pytest.mark.parametrize("method", ["iterative", "progressive", "blending", "functional"])
def test_every_method_prunes_your_model(spec, method, tmp_path):
    argv = [
        "prune",
        f"--method={method}",
        f"--model={spec}",
        f"--workdir={tmp_path}",
        "--no-progress",
        *DATA,
        *TINY[method],
    ]
    assert main(argv) == 0
    check_run(tmp_path, method, spec)


@pytest.mark.slow
def test_score_and_inspect_read_your_model(spec, tmp_path):
    workdir = tmp_path / "score"
    argv = ["score", f"--model={spec}", "--examples=64", "--criteria", "l1", "taylor"]
    assert main([*argv, f"--workdir={workdir}"]) == 0
    report = json.loads(next(workdir.rglob("*.json")).read_text())
    assert report
    out = tmp_path / "inspect"
    argv = ["inspect", f"--model={spec}", "--layer=all", "--images=2", f"--out={out}"]
    assert main([*argv, "--score-examples=32"]) == 0
    assert (out / "index.html").is_file()
    assert len(list(out.glob("*.html"))) == 3  # two conv layers and the index


@pytest.mark.slow
def test_the_demo_runs_your_model(spec, tmp_path, capsys):
    argv = ["demo", f"--model={spec}", f"--workdir={tmp_path}", "--method=oneshot"]
    small = ["--finetune-examples=256", "--eval-examples=128", "--finetune-epochs=1"]
    assert main([*argv, *small, "--no-timing"]) == 0
    assert "oneshot pruning" in capsys.readouterr().out
    results = json.loads((tmp_path / "results.json").read_text())
    assert results
    check_run(tmp_path, "oneshot", spec)
