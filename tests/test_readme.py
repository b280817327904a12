"""The README's "Prune your own Flax model" section runs as written."""

import pathlib
import re

import jax.numpy as jnp
import numpy as np
import pytest

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def section_blocks(title: str) -> list[str]:
    text = README.read_text()
    start = text.index(f"## {title}")
    end = text.find("\n## ", start + 1)
    return re.findall(r"```python\n(.*?)```", text[start:end], flags=re.S)


@pytest.mark.slow
def test_prune_your_own_model_section_runs():
    linen, nnx_block, masks_block = section_blocks("Prune your own Flax model")
    scope: dict = {}
    exec(compile(linen, "README.md (linen)", "exec"), scope)
    assert scope["logits"].shape == (8, 10)
    assert scope["pruned"].variables["params"]["Conv_1"]["kernel"].shape == (3, 3, 16, 40)
    np.testing.assert_allclose(scope["again"], scope["logits"], atol=1e-5)
    assert not jnp.allclose(
        scope["params"]["Conv_0"]["kernel"], scope["pruned"].variables["params"]["Conv_0"]["kernel"]
    )
    exec(compile(masks_block, "README.md (masks)", "exec"), scope)
    np.testing.assert_allclose(
        scope["logits"], scope["pruned"].apply_fn(scope["pruned"].variables, scope["x"]), atol=1e-5
    )
    scope = {}
    exec(compile(nnx_block, "README.md (nnx)", "exec"), scope)
    assert scope["small"].conv2.in_features == 8 and scope["small"].conv2.out_features == 16
