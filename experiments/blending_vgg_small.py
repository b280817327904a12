"""Blending pruning criteria (He et al. 2021) on VGG-small / Fashion-MNIST, against each
criterion alone and against a random search with the same number of evaluations.

He et al., "Blending Pruning Criteria for Convolutional Neural Networks" (ICANN 2021, arXiv
2107.05033; the README's BibTeX has the authors). Only the abstract was available here: the claim is
that a blend of criteria, clustered and calibrated by an evolutionary search, prunes better than
the criteria alone. Every algorithmic specific below (pool, Spearman clustering at 0.7, rank
normalisation, the genetic operators, fitness = accuracy before fine-tuning) is our choice.

Command:

    flock /tmp/jaxprune-heavy.lock python experiments/blending_vgg_small.py \\
        [--seeds 0,1,2] [--finetune-examples 0] [--workdir workdirs/blending_vgg_small]

Starts from the shipped base (jaxprune/pretrained/vgg_small_fashion_mnist.msgpack, 92.31% test
accuracy) and removes 50% of every convolution's kernels. Per seed:

* the blend: the 12 criteria of `PAPER_POOL` scored on the first 1024 validation images,
  clustered per layer, calibration factors searched by the genetic algorithm (population 16,
  12 generations: 192 evaluations) with fitness = accuracy of the pruned, not fine-tuned
  network on the first 500 validation images;
* the control: the same search space, start (the equal-factor genome) and 192 evaluations,
  drawn uniformly at random (`EvolutionConfig(strategy="random")`);
* each of the 12 criteria alone and the equal-factor blend, at the same ratio;
* every one of the 15 fine-tuned with the same budget: one epoch over the whole training split
  (55,000 images, 430 steps of 128; SGD, momentum 0.9, weight decay 5e-4, cosine from 0.01).

The seed sets the search's random stream, the fine-tuning's data order and dropout. The single
criteria's scores read fixed images, so their accuracies before fine-tuning are the same in
every seed (spread 0). Choices are made on validation: the fitness images are the first 500 of
the validation split, and the "held-out validation" column is the other 4500. Test accuracy is
on the whole test split (10000 images) and is used for nothing but the table.

What was cut for this 2-core CPU (the paper's population, generations, fitness images and
fine-tuning schedule are not known from the abstract): population 16, 12 generations, 500
fitness images, one epoch of fine-tuning, 3 seeds. `--finetune-examples N` fine-tunes on a
fixed subset of N training images instead (quicker, smaller budget).

Writes experiments/results/blending/: results.md (the tables, with mean and spread over seeds
and the verdicts), results.json (settings, per-seed runs, factors, clusters, search histories),
similarity.png, fitness.png and comparison.png.

Result (35 minutes for the three seeds on the 2-core CPU, other jobs light; base 92.31%; 25.8%
of the FLOPs left; test accuracy, mean ± sd over seeds 0, 1, 2; table in results.md):

    pruning                   not fine-tuned    fine-tuned (1 epoch)
    blend (EA)                51.57 ± 2.88      91.16 ± 0.16
    blend (random search)     47.18 ± 0.64      91.19 ± 0.08
    apoz (best single before) 38.56             90.95 ± 0.05
    fermat (best single after) 10.00            91.23 ± 0.04
    the other singles         10.0 - 35.6       90.17 - 91.18

Verdicts, seed by seed: the searched blend beats every single criterion before fine-tuning
(3/3 seeds, by 9.7-14.7 points: apoz is the best single there) and so does the genetic search
beat random search with the same 192 evaluations, on the fitness images (3/3) and on the 4500
held-out validation images (3/3, +1.0, +6.3, +7.3 points). After one epoch of fine-tuning every
method ends within about one point (90.2-91.2%): the blend does not beat the best single
(fermat: +0.06, +0.00, -0.27 points) nor random search (+0.21, -0.07, -0.22). So the search
finds much better masks by the quantity it optimises, and that advantage does not survive
fine-tuning on this model and budget. The He et al. claim as we can read it from the abstract
(better pruning by a blend) holds before fine-tuning only.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from jaxprune.runtime import enable_compilation_cache

RESULTS = Path(__file__).resolve().parent / "results" / "blending"
BASE = (
    Path(__file__).resolve().parent.parent / "jaxprune/pretrained/vgg_small_fashion_mnist.msgpack"
)
SEARCHES = {"blend (EA)": "genetic", "blend (random search)": "random"}
FORMAT = "blending-vgg-small/2"


def blending_config(seed: int = 0, strategy: str = "genetic"):
    """The settings of the blend; `strategy` "random" gives the equal-evaluation control."""
    from jaxprune.fit import FitConfig
    from jaxprune.methods.blending import BlendingConfig
    from jaxprune.methods.evolution import EvolutionConfig

    return BlendingConfig(
        criterion="all",
        ratio=0.5,
        evolution=EvolutionConfig(population=16, generations=12, strategy=strategy),
        score_examples=1024,
        fitness_examples=500,
        batch_size=250,
        chunk_size=8,
        finetune=FitConfig(epochs=1, seed=seed),
        seed=seed,
    )


class PruneData:
    """Validation from the whole split, training from the fine-tuning's images, in the seed's
    order."""

    def __init__(self, dataset, finetune_dataset, seed: int) -> None:
        from jaxprune.methods.contract import DatasetData

        self.validation_data = DatasetData(dataset, batch_size=250)
        self.train_data = DatasetData(finetune_dataset, batch_size=128, seed=seed)

    def train(self, epoch):
        return self.train_data.train(epoch)

    def validation(self):
        return self.validation_data.validation()


def _reuse_pool_scores(source: Path, target: Path) -> None:
    """Every run scores the same pool on the same images: later runs read the first run's
    scores (the file carries its identity, so a run with other inputs rescored anyway)."""
    import shutil

    from jaxprune.methods.blending import POOL_SCORES_FILE

    if (source / POOL_SCORES_FILE).is_file() and not (target / POOL_SCORES_FILE).is_file():
        target.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source / POOL_SCORES_FILE, target / POOL_SCORES_FILE)


def run(workdir: Path, seeds: list[int], finetune_examples: int) -> dict:
    """Runs every seed not stored yet; returns everything stored."""
    import jax.numpy as jnp
    import numpy as np

    from jaxprune import checkpoint, cost, data, train
    from jaxprune.checkpoint import json_default
    from jaxprune.criteria import normalize_rank
    from jaxprune.fit import fit
    from jaxprune.graph import channel_graph
    from jaxprune.methods.blending import (
        PAPER_POOL,
        POOL_SCORES_FILE,
        blending_prune,
        select_groups_config,
    )
    from jaxprune.methods.selection import keep_from_scores
    from jaxprune.model import Model
    from jaxprune.run import RunDir, read_json
    from jaxprune.surgery import prune

    module, variables, base_meta = checkpoint.load_model_file(BASE)
    dataset = data.load(data.DataConfig(name="fashion_mnist"))
    subset = data.DataConfig(name="fashion_mnist", train_examples=finetune_examples or None)
    finetune_dataset = data.load(subset) if finetune_examples else dataset
    x = jnp.zeros((1, *dataset.image_shape))
    model = Model.linen(module, x, variables=variables)
    graph = channel_graph(model.apply_fn, variables, x, **model.eval_kwargs)
    selection = select_groups_config(blending_config())
    fitness_batches = list(data.preprocessed_batches(dataset, "validation", 500, 500))
    held_out = list(data.preprocessed_batches(dataset, "validation", 500))[1:]
    test = list(data.preprocessed_batches(dataset, "test", 500))
    before = cost.count(model.apply_fn, variables, x, **model.eval_kwargs).flops

    def accuracy(small, small_variables, batches) -> float:
        return train.evaluate(small, small_variables, batches)["accuracy"]

    def measured(small, small_variables) -> dict:
        after = cost.count(small.apply_fn, small_variables, x, **model.eval_kwargs).flops
        return {
            "fitness_accuracy": accuracy(small, small_variables, fitness_batches),
            "held_out_validation": accuracy(small, small_variables, held_out),
            "test": accuracy(small, small_variables, test),
            "flops_left": after / before,
        }

    settings = {"seeds_format": FORMAT, "finetune_examples": finetune_examples}
    results_file = RESULTS / "results.json"
    stored = json.loads(results_file.read_text()) if results_file.is_file() else {}
    if stored.get("settings") != settings:
        stored = {"settings": settings, "seeds": {}}
    stored["config"] = dataclasses.asdict(blending_config())
    stored["base_test_accuracy"] = base_meta["result"]["test"]["accuracy"]
    first_search = workdir / f"seed{seeds[0]}" / "genetic"
    for seed in seeds:
        if str(seed) in stored["seeds"]:
            continue
        began = time.perf_counter()
        prune_data = PruneData(dataset, finetune_dataset, seed)
        runs, searches = {}, {}
        for label, strategy in SEARCHES.items():
            config = blending_config(seed, strategy)
            search_dir = workdir / f"seed{seed}" / strategy
            _reuse_pool_scores(first_search, search_dir)
            result = blending_prune(model, variables, prune_data, config, workdir=str(search_dir))
            pruned = prune(variables, graph, result.keep)
            runs[label] = measured(model.with_apply_fn(pruned.apply_fn), pruned.variables)
            runs[label]["test_finetuned"] = accuracy(result.model, result.variables, test)
            method = result.summary["method"]
            searches[label] = {
                "factors": method["factors"],
                "best": method["best"],
                "history": list(result.history),
                "clusters": method["clusters"],
            }
            print(f"seed {seed} {label}: {runs[label]}", flush=True)
        stored_pool = read_json(first_search / POOL_SCORES_FILE)["value"]
        pool = {n: {g: np.asarray(v) for g, v in per.items()} for n, per in stored_pool.items()}
        candidates = {name: pool[name] for name in PAPER_POOL}
        # The equal-factor blend of the clusters' representatives (both searches' start).
        clusters = searches["blend (EA)"]["clusters"]
        candidates["blend (equal factors)"] = {
            group: sum(
                normalize_rank({group: pool[c][group]})[group] for c in layer["representatives"]
            )
            for group, layer in clusters.items()
        }
        finetune = blending_config(seed).finetune
        for name, scores in candidates.items():
            pruned = prune(variables, graph, keep_from_scores(graph, scores, selection))
            small = model.with_apply_fn(pruned.apply_fn)
            runs[name] = measured(small, pruned.variables)
            with RunDir.open(
                workdir / f"seed{seed}" / "single" / name.replace(" ", "_"),
                kind="finetune",
                identity={"criterion": name, "seed": seed, "examples": finetune_examples},
            ) as finetune_run:
                tuned, _ = fit(small, pruned.variables, prune_data, finetune, run=finetune_run)
            runs[name]["test_finetuned"] = accuracy(small, tuned, test)
            print(f"seed {seed} {name}: {runs[name]}", flush=True)
        stored["seeds"][str(seed)] = {
            "runs": runs,
            "searches": searches,
            "wall_s": time.perf_counter() - began,
        }
        RESULTS.mkdir(parents=True, exist_ok=True)
        results_file.write_text(json.dumps(stored, indent=1, default=json_default))
    return stored


COLUMNS = {
    "fitness_accuracy": "fitness images (500 val.)",
    "held_out_validation": "held-out val. (4500)",
    "test": "test, not fine-tuned",
    "test_finetuned": "test, fine-tuned",
}


def spread(stored: dict, name: str, column: str) -> tuple[float, float, int]:
    """Mean, sample standard deviation and count over seeds, in percent."""
    import numpy as np

    values = [100 * s["runs"][name][column] for s in stored["seeds"].values()]
    deviation = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return float(np.mean(values)), deviation, len(values)


def _cell(stored: dict, name: str, column: str) -> str:
    mean, deviation, _ = spread(stored, name, column)
    return f"{mean:.2f} ± {deviation:.2f}"


def verdicts(stored: dict) -> list[tuple[str, str, str]]:
    """(claim, measurement, verdict) rows, each decided per seed."""
    seeds = list(stored["seeds"].values())
    singles = [n for n in seeds[0]["runs"] if not n.startswith("blend")]
    rows = []
    for column, when in (("test", "before fine-tuning"), ("test_finetuned", "after fine-tuning")):
        margins = []
        for entry in seeds:
            runs = entry["runs"]
            best = max(singles, key=lambda n: runs[n][column])
            margins.append((100 * (runs["blend (EA)"][column] - runs[best][column]), best))
        wins = sum(m > 0 for m, _ in margins)
        rows.append(
            (
                f"The searched blend beats every single criterion {when} (test accuracy)",
                "blend minus best single per seed: "
                + ", ".join(f"{m:+.2f} ({b})" for m, b in margins),
                _verdict(wins, len(margins)),
            )
        )
    for column, when in (("fitness_accuracy", "on the fitness images"),
                         ("held_out_validation", "on held-out validation"),
                         ("test_finetuned", "after fine-tuning (test)")):  # fmt: skip
        margins = [
            100 * (e["runs"]["blend (EA)"][column] - e["runs"]["blend (random search)"][column])
            for e in seeds
        ]
        wins = sum(m > 0 for m in margins)
        rows.append(
            (
                f"(control) The genetic search beats random search with 192 evaluations {when}",
                "EA minus random per seed: " + ", ".join(f"{m:+.2f}" for m in margins),
                _verdict(wins, len(margins)),
            )
        )
    return rows


def _verdict(wins: int, seeds: int) -> str:
    word = "holds" if wins == seeds else "mixed" if wins else "does not hold"
    return f"{word} ({wins}/{seeds} seeds)"


def results_markdown(stored: dict) -> str:
    """The text of results.md: the table with its spread over seeds, then the verdicts."""
    seeds = list(stored["seeds"].values())
    names = list(seeds[0]["runs"])
    order = sorted(names, key=lambda n: -spread(stored, n, "test")[0])
    n_seeds = len(seeds)
    examples = stored["settings"]["finetune_examples"] or 55000
    lines = [
        f"Base test accuracy {100 * stored['base_test_accuracy']:.2f}%; 50% of every conv's "
        f"kernels removed ({100 * seeds[0]['runs']['blend (EA)']['flops_left']:.1f}% of the "
        f"FLOPs left); mean ± standard deviation over {n_seeds} seeds "
        f"({', '.join(stored['seeds'])}); fine-tuning: one epoch over {examples} training "
        f"images for every row; {sum(s['wall_s'] for s in seeds) / 60:.0f} min in all.",
        "",
        "| pruning | " + " | ".join(COLUMNS.values()) + " |",
        "|---|" + "---:|" * len(COLUMNS),
    ]
    for name in order:
        lines.append(f"| {name} | " + " | ".join(_cell(stored, name, c) for c in COLUMNS) + " |")
    lines += ["", "| claim | our measurement | verdict |", "|---|---|---|"]
    lines += [f"| {c} | {m} | {v} |" for c, m, v in verdicts(stored)]
    return "\n".join(lines) + "\n"


def plot_similarity(clusters: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    groups = list(clusters)
    columns = 3
    rows = -(-len(groups) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(5.2 * columns, 4.8 * rows))
    for axis, group in zip(np.ravel(axes), groups, strict=False):
        layer = clusters[group]
        names = layer["criteria"]
        image = axis.imshow(np.asarray(layer["similarity"]), vmin=-1, vmax=1, cmap="RdBu_r")
        axis.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
        axis.set_yticks(range(len(names)), names, fontsize=7)
        label = "; ".join(
            "{" + ", ".join(c) + "}" if len(c) > 1 else c[0] for c in layer["clusters"]
        )
        axis.set_title(f"{group}: {len(layer['clusters'])} clusters", fontsize=9)
        axis.set_xlabel("\n".join(_wrap(label, 70)), fontsize=6)
        fig.colorbar(image, ax=axis, fraction=0.046)
    for axis in np.ravel(axes)[len(groups) :]:
        axis.axis("off")
    fig.suptitle("Spearman similarity of the 12 criteria per layer (VGG-small / Fashion-MNIST)")
    fig.tight_layout()
    fig.savefig(RESULTS / "similarity.png", dpi=200)
    fig.savefig(RESULTS / "similarity.pdf")
    plt.close(fig)


def _wrap(text: str, width: int) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width)


def plot_fitness(stored: dict) -> None:
    """Best-so-far fitness per generation of both searches, one line per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(7, 4.5))
    colours = {"blend (EA)": "tab:blue", "blend (random search)": "tab:orange"}
    for seed, entry in stored["seeds"].items():
        for label, search in entry["searches"].items():
            history = search["history"]
            axis.plot(
                [r["generation"] for r in history],
                [100 * r["best_so_far"] for r in history],
                color=colours[label],
                marker=".",
                alpha=0.8,
                label=f"{label}, seed {seed}",
            )
    runs = next(iter(stored["seeds"].values()))["runs"]
    single = max(
        (n for n in runs if not n.startswith("blend")), key=lambda n: runs[n]["fitness_accuracy"]
    )
    axis.axhline(100 * runs[single]["fitness_accuracy"], color="gray", linestyle=":",
                 label=f"best single criterion ({single})")  # fmt: skip
    axis.axhline(100 * runs["blend (equal factors)"]["fitness_accuracy"], color="black",
                 linestyle="-.", linewidth=0.8, label="equal-factor blend")  # fmt: skip
    axis.set_xlabel("generation (16 evaluations each)")
    axis.set_ylabel("best fitness so far: accuracy on 500 validation images (%)")
    axis.set_title("Calibration factors: genetic vs random search (50% of kernels removed)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / "fitness.png", dpi=200)
    fig.savefig(RESULTS / "fitness.pdf")
    plt.close(fig)


def plot_comparison(stored: dict) -> None:
    """Test accuracy before and after fine-tuning, mean and standard deviation over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = list(next(iter(stored["seeds"].values()))["runs"])
    order = sorted(names, key=lambda n: -spread(stored, n, "test_finetuned")[0])
    x = np.arange(len(order))
    fig, axis = plt.subplots(figsize=(11, 4.5))
    for offset, column, label in ((-0.2, "test", "no fine-tuning"),
                                  (0.2, "test_finetuned", "after one epoch")):  # fmt: skip
        means, deviations = zip(*[spread(stored, n, column)[:2] for n in order], strict=True)
        axis.bar(x + offset, means, 0.4, yerr=deviations, capsize=2, label=label)
    axis.axhline(100 * stored["base_test_accuracy"], color="gray", linestyle="--", linewidth=1,
                 label="base model")  # fmt: skip
    axis.set_xticks(x, order, rotation=45, ha="right", fontsize=8)
    axis.set_ylabel(f"test accuracy (%), mean ± sd over {len(stored['seeds'])} seeds")
    axis.set_title("VGG-small, 50% of every conv's kernels removed: blends vs single criteria")
    axis.legend(fontsize=8)
    axis.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(RESULTS / "comparison.png", dpi=200)
    fig.savefig(RESULTS / "comparison.pdf")
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="workdirs/blending_vgg_small")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    parser.add_argument(
        "--finetune-examples",
        type=int,
        default=0,
        help="fine-tune on a fixed subset of this many training images (0: all 55000)",
    )
    args = parser.parse_args()
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        parser.error(f"--seeds takes comma-separated integers, got {args.seeds!r}")
    if args.finetune_examples < 0:
        parser.error("--finetune-examples must be >= 0 (0: the whole training split)")
    enable_compilation_cache()
    stored = run(Path(args.workdir), seeds, args.finetune_examples)
    markdown = results_markdown(stored)
    (RESULTS / "results.md").write_text(markdown)
    print(markdown)
    plot_similarity(next(iter(stored["seeds"].values()))["searches"]["blend (EA)"]["clusters"])
    plot_fitness(stored)
    plot_comparison(stored)


if __name__ == "__main__":
    main()
