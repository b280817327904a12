"""Runs a tiny blending search for tests/test_blending.py (kill-and-resume and device tests).

Usage: python tests/blending_run.py WORKDIR DELAY_S

LeNet-5 on 128 Fashion-MNIST validation images, a pool of five criteria (weights and APoZ:
quick to compile), a population of 8 over 6 generations, no fine-tuning. Every generation's
fitness evaluation starts DELAY_S seconds late, so the test can kill the process (SIGKILL)
between generation checkpoints; the delay changes no result. The result goes to
WORKDIR/result.json (history without timings, factors, best, keep, device count) and the
timings to WORKDIR/seconds.json (they tell a resumed generation from a recomputed one).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from jaxprune.runtime import enable_compilation_cache

BASE = Path(__file__).resolve().parent.parent / "jaxprune/pretrained/lenet5_fashion_mnist.msgpack"


def config():
    from jaxprune.methods.blending import BlendingConfig
    from jaxprune.methods.evolution import EvolutionConfig

    return BlendingConfig(
        criterion="l1,l2,fpgm,fermat,apoz",
        ratio=0.5,
        evolution=EvolutionConfig(population=8, generations=6),
        batch_size=64,
        chunk_size=4,
        finetune=None,
    )


def main(workdir: str, delay_s: float) -> None:
    enable_compilation_cache()
    import jax

    from jaxprune import checkpoint, data
    from jaxprune.methods import blending
    from jaxprune.model import Model

    evaluate = blending.population_fitness

    def delayed(*args, **kwargs):
        time.sleep(delay_s)
        return evaluate(*args, **kwargs)

    blending.population_fitness = delayed  # this process only
    module, variables, _ = checkpoint.load_model_file(BASE)
    dataset = data.load(data.DataConfig(validation_examples=128, test_examples=128))
    batches = list(data.preprocessed_batches(dataset, "validation", 64, 128))
    model = Model.linen(module, batches[0]["image"][:1], variables=variables)
    result = blending.blending_prune(
        model, variables, batches, config(), workdir=workdir, progress=False
    )
    Path(workdir, "outcome.json").write_text(
        json.dumps(
            {
                "devices": jax.device_count(),
                "history": [{k: v for k, v in r.items() if k != "seconds"} for r in result.history],
                "factors": result.summary["method"]["factors"],
                "best": result.summary["method"]["best"],
                "keep": {k: v.tolist() for k, v in result.keep.items()},
            }
        )
    )
    Path(workdir, "seconds.json").write_text(json.dumps([r["seconds"] for r in result.history]))


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]))
