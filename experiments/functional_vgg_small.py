"""Functionality-oriented pruning of VGG-small on Fashion-MNIST: the three analyses of Qin et al.

Command (resumes from its workdir; the images of each model and seed are stored there):

    flock /tmp/jaxprune-heavy.lock python experiments/functional_vgg_small.py \\
        [--workdir workdirs/functional_vgg_small]

Needs experiments/results/functional/sweep.json (`experiments/functional_descriptor.py
--sweep`): the activation-maximisation setting and the descriptor chosen there, on validation
images, for measuring what a filter does. Starts from the shipped base
(jaxprune/pretrained/vgg_small_fashion_mnist.msgpack) and writes experiments/results/functional/:
tables.md (the tables), results.json, small_l1_filters.png, accuracy_vs_flops.png and
defection.png; README.md there discusses them.

Seeds 0, 1, 2 seed the activation-maximisation images (and, in analysis 3, the fine-tuning's
data order); every number is given as mean ± standard deviation over them. Data: Taylor reads
validation images 0-1023; accuracies are measured on validation images 1024-3071 (the numbers
read for any comparison) and, as final numbers only, on the first 2000 test images. Masked
models throughout (a masked model equals the pruned one, a tested invariant).

1. Small-L1 filters with clear functionality: in every conv layer, among the quarter of filters
   with the smallest L1 norm, the two whose own image drives them hardest (objective reached,
   averaged over the seeds); the accuracy lost when each alone is removed (no retraining).
2. Functionality-oriented pruning against L1 and Taylor at equal FLOPs, no retraining. Every
   level keeps the same number of filters per conv layer for every method: a ratio of every
   layer (10%, 25%, 40%, 50% removed; clusters cut at the kept count) or the clusters of a
   similarity threshold (0.6, 0.4, 0.3; the baselines keep as many). One representative per
   cluster, by Taylor (Molchanov et al. 2017; the abstract of Qin et al. names no criterion)
   or closest to the centroid.
3. Functionality defection: VGG-small pruned by L1 (50% of every conv layer), fine-tuned for
   one epoch; for each surviving filter, the cosine of its descriptors before and after
   (images from two different seeds), and the correlation of its response maps on 500
   validation images before and after (what it does on real data). Control: the same, not
   fine-tuned model described from the same two seeds.

Result (experiments/results/functional/tables.md, README.md there; 5.3 minutes on the 2-core
CPU): functional pruning keeps less accuracy than Taylor alone and than L1 at every level where
the pruned model is still useful (10% of every layer: 81.75 ± 1.50% against Taylor 90.38% and
L1 88.38%, base 91.75%, validation); defection holds: after fine-tuning, the surviving filters'
descriptors move further than two seeds apart in every layer, and their responses on real
images correlate 0.98 (conv1) down to 0.28 (conv6) with those before.

Cut from the paper's setting, to fit a 2-core CPU: one small model on Fashion-MNIST (the paper
uses VGG-16 and ResNet on CIFAR/ImageNet); no retraining in analyses 1 and 2; analysis 3
fine-tunes one epoch on a fixed 5000-image training subset (SGD, learning rate 0.01, cosine).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from jaxprune.runtime import enable_compilation_cache

sys.path.insert(0, str(Path(__file__).resolve().parent))
from functional_descriptor import (  # noqa: E402
    chosen_descriptor,
    image_settings,
    mean_sd,
    own_cosine,
)

RESULTS = Path(__file__).resolve().parent / "results" / "functional"
BASE = (
    Path(__file__).resolve().parent.parent / "jaxprune/pretrained/vgg_small_fashion_mnist.msgpack"
)
SEEDS = (0, 1, 2)
RATIOS = (0.1, 0.25, 0.4, 0.5)
THRESHOLDS = (0.6, 0.4, 0.3)
TAYLOR_IMAGES = (0, 1024)
VALIDATION_IMAGES = (1024, 3072)
TEST_EXAMPLES = 2000
RESPONSE_IMAGES = 500
FINETUNE_EXAMPLES = 5000
INPUT_SHAPE = (28, 28, 1)
METHODS = ("l1", "taylor", "functional (taylor)", "functional (centroid)")


def chosen() -> tuple:
    """(visualisation config, descriptor kind, resolution) chosen by the descriptor sweep."""
    setting, kind, resolution = chosen_descriptor()
    return image_settings()[setting], kind, resolution


def images_with_objective(apply_fn, graph, variables, groups, store: Path, config):
    """Per group (images, objective reached), computed once and kept in `store` (npz, checked
    against the settings)."""
    import numpy as np

    from jaxprune.criteria.functionality import maximization_images

    settings = json.dumps(dataclasses.asdict(config))
    found = {}
    if store.is_file():
        with np.load(store) as saved:
            if str(saved["config"]) == settings:
                found = {k: saved[k] for k in saved.files if k != "config"}
    for group in groups:
        if f"{group}/images" in found:
            continue
        images, objective = maximization_images(
            apply_fn, graph, variables, group, INPUT_SHAPE, config, with_objective=True
        )
        found[f"{group}/images"] = np.asarray(images)
        found[f"{group}/objective"] = np.asarray(objective)[:, -1]
        np.savez(store, config=settings, **found)
    return {g: found[f"{g}/images"] for g in groups}, {g: found[f"{g}/objective"] for g in groups}


def descriptors_of(apply_fn, graph, variables, images: dict, kind: str, resolution) -> dict:
    """Every group's descriptors, probing with every group's images (as the method does)."""
    from jaxprune.criteria.functionality import RESPONSE_DESCRIPTORS, filter_descriptors
    from jaxprune.methods.functional import probe_responses

    responses = {}
    if kind in RESPONSE_DESCRIPTORS:
        responses = probe_responses(apply_fn, graph, variables, images)
    return {
        g: filter_descriptors(images[g], kind, responses=responses.get(g), resolution=resolution)
        for g in images
    }


def masked_accuracy(apply_fn, graph, variables, batches):
    """A function masks -> accuracy on `batches`, compiled once."""
    import jax
    import jax.numpy as jnp

    from jaxprune.gates import gated_call

    @jax.jit
    def correct(masks, image, label):
        logits = gated_call(apply_fn, graph, variables, image, masks)
        return jnp.sum(jnp.argmax(logits, -1) == label)

    total = sum(len(b["label"]) for b in batches)

    def accuracy(masks):
        return float(sum(int(correct(masks, b["image"], b["label"])) for b in batches) / total)

    return accuracy


def top_k(scores, k):
    import numpy as np

    return np.sort(np.argsort(-np.asarray(scores), kind="stable")[:k])


def pct(values) -> str:
    mean, sd = mean_sd(values)
    return f"{100 * mean:.2f} ± {100 * sd:.2f}%"


def small_l1_analysis(graph, groups, objectives, l1, accuracy) -> list[dict]:
    """Per layer, the two smallest-L1-quarter filters their own images drive hardest (objective
    averaged over the seeds), and the accuracy lost when each alone is removed."""
    import numpy as np

    from jaxprune.surgery import keep_to_masks

    sizes = graph.sizes
    base = {split: fn({}) for split, fn in accuracy.items()}
    rows = []
    for group in groups:
        reached = np.stack([objectives[s][group] for s in SEEDS])
        mean = reached.mean(0)
        order = np.argsort(l1[group], kind="stable")
        small = order[: max(2, sizes[group] // 4)]
        for f in small[np.argsort(-mean[small], kind="stable")[:2]]:
            masks = keep_to_masks(graph, {group: np.setdiff1d(np.arange(sizes[group]), [f])})
            rows.append(
                {
                    "group": group,
                    "filter": int(f),
                    "l1_rank": int(np.nonzero(order == f)[0][0]) + 1,
                    "filters": sizes[group],
                    "objective": reached[:, f].tolist(),
                    "objective_layer_median": float(np.median(mean)),
                    "drop": {split: base[split] - fn(masks) for split, fn in accuracy.items()},
                }
            )
    return rows


def equal_flops_analysis(model, variables, graph, groups, images, scores, accuracy, chosen_):
    """Every level and seed: the four methods' accuracies at the same per-layer counts."""
    import numpy as np

    from jaxprune.cost import count
    from jaxprune.methods.functional import ClusteringConfig, FunctionalConfig, functional_layers
    from jaxprune.surgery import keep_to_masks, prune

    visualization, kind, resolution = chosen_
    x = np.zeros((1, *INPUT_SHAPE), np.float32)
    full_flops = count(model.apply, variables, x).flops
    rows = []
    for level_kind, level in [("ratio", r) for r in RATIOS] + [
        ("threshold", t) for t in THRESHOLDS
    ]:
        for seed in SEEDS:
            clustering = ClusteringConfig(descriptor=kind, resolution=resolution)
            if level_kind == "threshold":
                clustering = dataclasses.replace(clustering, threshold=level)
            config = FunctionalConfig(
                ratio=level if level_kind == "ratio" else None,
                clustering=clustering,
                visualization=dataclasses.replace(visualization, seed=seed),
                seed=seed,
            )
            by_taylor = functional_layers(
                model.apply, graph, variables, images[seed], scores["taylor"], config
            )
            by_centroid = functional_layers(
                model.apply, graph, variables, images[seed], None,
                dataclasses.replace(config, representative="centroid"),
            )  # fmt: skip
            counts = {g: len(by_taylor[g].keep) for g in groups}
            keeps = {
                "l1": {g: top_k(scores["l1"][g], counts[g]) for g in groups},
                "taylor": {g: top_k(scores["taylor"][g], counts[g]) for g in groups},
                "functional (taylor)": {g: by_taylor[g].keep for g in groups},
                "functional (centroid)": {g: by_centroid[g].keep for g in groups},
            }
            pruned = prune(variables, graph, keeps["l1"])
            flops = count(pruned.apply_fn, pruned.variables, x).flops / full_flops
            for method, keep in keeps.items():
                assert all(len(keep[g]) == counts[g] for g in groups), method
                masks = keep_to_masks(graph, keep)
                rows.append(
                    {
                        "level": f"{level_kind} {level}",
                        "seed": seed,
                        "method": method,
                        "kept": counts,
                        "filters_removed": 1
                        - sum(counts.values()) / sum(graph.sizes[g] for g in groups),
                        "flops_left": flops,
                        "accuracy": {split: fn(masks) for split, fn in accuracy.items()},
                        "unresponsive": {g: int(np.sum(~by_taylor[g].responsive)) for g in groups},
                    }
                )
        print(f"  level {level_kind} {level} done", flush=True)
    return rows


def map_correlation(a, b):
    """Per filter, the Pearson correlation of its maps (N, h, w, filters) in two models."""
    import numpy as np

    a = np.asarray(a, np.float64).reshape(-1, a.shape[-1])
    b = np.asarray(b, np.float64).reshape(-1, b.shape[-1])
    a, b = a - a.mean(0), b - b.mean(0)
    scale = np.sqrt((a * a).sum(0) * (b * b).sum(0))
    return np.where(scale > 0, (a * b).sum(0) / np.maximum(scale, 1e-300), 0.0)


def defection_analysis(model, variables, graph, groups, scores, dataset, workdir, chosen_):
    import numpy as np

    from jaxprune import data, train
    from jaxprune.criteria.functionality import response_maps
    from jaxprune.fit import FitConfig, fit
    from jaxprune.graph import channel_graph
    from jaxprune.methods.contract import DatasetData
    from jaxprune.methods.functional import FunctionalConfig, kept_count
    from jaxprune.model import Model
    from jaxprune.run import RunDir, fingerprint
    from jaxprune.surgery import prune

    visualization, kind, resolution = chosen_
    sizes = graph.sizes
    half = FunctionalConfig(ratio=0.5)
    keep = {g: top_k(scores["l1"][g], kept_count(sizes[g], half)) for g in groups}
    pruned = prune(variables, graph, keep)
    x = np.zeros((1, *INPUT_SHAPE), np.float32)
    small = Model.linen(model, x, variables=variables).with_apply_fn(pruned.apply_fn)
    small_graph = channel_graph(small.apply_fn, pruned.variables, x, **small.eval_kwargs)
    before = pruned.variables
    subset = data.load(dataclasses.replace(dataset.config, train_examples=FINETUNE_EXAMPLES))
    real = np.concatenate(
        [b["image"] for b in data.preprocessed_batches(dataset, "validation", 500, 500)]
    )
    maps_before = response_maps(small.apply_fn, small_graph, before, groups, real)

    def describe(variables_, seed, name):
        config = dataclasses.replace(visualization, seed=seed)
        images, _ = images_with_objective(
            small.apply_fn, small_graph, variables_, groups, workdir / f"{name}.npz", config
        )
        return descriptors_of(small.apply_fn, small_graph, variables_, images, kind, resolution)

    described_before = {s: describe(before, s, f"l1_before_seed{s}") for s in SEEDS}
    per_seed, accuracies = [], []
    for seed in SEEDS:
        identity = {"keep": {g: k.tolist() for g, k in keep.items()}, "seed": seed,
                    "variables": fingerprint(before)}  # fmt: skip
        name = f"l1_finetune_seed{seed}"
        with RunDir.open(workdir / name, kind="finetune", identity=identity) as run:
            after, _ = fit(
                small, before, DatasetData(subset, seed=seed), FitConfig(epochs=1, seed=seed),
                run=run, progress=False,
            )  # fmt: skip
        # Before and after are described from different seeds, like the control: images from
        # one seed share their start, which alone keeps them alike.
        other = SEEDS[(SEEDS.index(seed) + 1) % len(SEEDS)]
        described_after = describe(after, other, f"l1_after_seed{seed}_images{other}")
        maps_after = response_maps(small.apply_fn, small_graph, after, groups, real)
        per_seed.append(
            {
                g: {
                    "before_after": own_cosine(
                        described_before[seed][g], described_after[g]
                    ).tolist(),
                    "control_other_seed": own_cosine(
                        described_before[seed][g], described_before[other][g]
                    ).tolist(),
                    "real_response_correlation": map_correlation(
                        maps_before[g], maps_after[g]
                    ).tolist(),
                }
                for g in groups
            }
        )

        def evaluate(variables_, split, count):
            batches = data.preprocessed_batches(dataset, split, 500, count)
            return train.evaluate(small, variables_, batches)["accuracy"]

        accuracies.append(
            {
                "before": {"test": evaluate(before, "test", TEST_EXAMPLES)},
                "after": {"test": evaluate(after, "test", TEST_EXAMPLES)},
            }
        )
        print(f"  defection seed {seed} done", flush=True)
    return {"filters": {g: keep[g].tolist() for g in groups}, "seeds": per_seed,
            "accuracy": accuracies}  # fmt: skip


def plot_small_l1(rows, images, path: Path) -> None:
    from jaxprune.figures import new_figure, save_figure

    figure = new_figure(1.9 * len(rows) // 2, 5.4)
    for k, row in enumerate(rows):
        ax = figure.add_subplot(2, len(rows) // 2, (k % 2) * (len(rows) // 2) + k // 2 + 1)
        ax.imshow(images[SEEDS[0]][row["group"]][row["filter"]][..., 0], cmap="gray")
        ax.set_title(
            f"{row['group']} #{row['filter']}\nL1 rank {row['l1_rank']}/{row['filters']}\n"
            f"drop {100 * row['drop']['validation']:.2f}%",
            fontsize=7,
        )
        ax.axis("off")
    figure.suptitle("Small-L1 filters their own image drives hardest (seed 0's images)")
    save_figure(figure, path)


def level_summary(rows, split: str) -> dict:
    """(level, method) -> accuracies over the seeds, and level -> FLOPs left over the seeds."""
    accuracy, flops = {}, {}
    for r in rows:
        accuracy.setdefault((r["level"], r["method"]), []).append(r["accuracy"][split])
        if r["method"] == "l1":
            flops.setdefault(r["level"], []).append(r["flops_left"])
    return {"accuracy": accuracy, "flops": flops}


def plot_equal_flops(rows, base: float, path: Path) -> None:
    from jaxprune.figures import new_figure, save_figure

    summary = level_summary(rows, "validation")
    figure = new_figure(5.8, 4.0)
    ax = figure.add_subplot(1, 1, 1)
    levels = sorted(summary["flops"], key=lambda lv: -mean_sd(summary["flops"][lv])[0])
    for method in METHODS:
        stats = [mean_sd(summary["accuracy"][lv, method]) for lv in levels]
        ax.errorbar(
            [100 * (1 - mean_sd(summary["flops"][lv])[0]) for lv in levels],
            [100 * m for m, _ in stats],
            yerr=[100 * s for _, s in stats],
            marker="o",
            capsize=2,
            label=method,
        )
    ax.axhline(100 * base, color="grey", linestyle=":", label="base")
    ax.set_xlabel("FLOPs removed (%)")
    ax.set_ylabel("validation accuracy, no retraining (%)")
    ax.set_title("VGG-small / Fashion-MNIST: equal FLOPs, no retraining (3 seeds)", fontsize=9)
    ax.legend(fontsize=7)
    save_figure(figure, path)


def plot_defection(report: dict, groups, path: Path) -> None:
    import numpy as np

    from jaxprune.figures import new_figure, save_figure

    figure = new_figure(7.5, 3.8)
    ax = figure.add_subplot(1, 1, 1)
    keys = (
        ("before_after", "descriptor, before / after fine-tuning"),
        ("control_other_seed", "control: descriptor, two seeds, no fine-tuning"),
        ("real_response_correlation", "responses on real images, before / after"),
    )
    x = np.arange(len(groups))
    for j, (key, text) in enumerate(keys):
        stats = [
            mean_sd([np.mean(seed[g][key]) for seed in report["defection"]["seeds"]])
            for g in groups
        ]
        ax.bar(x + (j - 1) * 0.27, [m for m, _ in stats], 0.27, yerr=[s for _, s in stats],
               capsize=2, label=text)  # fmt: skip
    ax.set_xticks(x, groups)
    ax.set_ylabel("mean over surviving filters")
    ax.set_ylim(0, 1.05)
    ax.set_title("Functionality defection: L1-pruned VGG-small, 1 epoch of fine-tuning", fontsize=9)
    ax.legend(fontsize=7)
    save_figure(figure, path)


def write_tables(report: dict, groups, path: Path) -> None:
    import numpy as np

    base = report["base_accuracy"]
    lines = [
        "# Functionality-oriented pruning, VGG-small / Fashion-MNIST (3 seeds)",
        "",
        f"Base: {100 * base['validation']:.2f}% on validation images "
        f"{VALIDATION_IMAGES[0]}-{VALIDATION_IMAGES[1] - 1}, {100 * base['test']:.2f}% on the "
        f"first {TEST_EXAMPLES} test images. Descriptor: {report['descriptor']['kind']} "
        f"(resolution {report['descriptor']['resolution']}) of the images of setting "
        f"{report['descriptor']['setting']}, chosen by experiments/functional_descriptor.py "
        f"--sweep. Seeds {list(SEEDS)}: mean ± standard deviation. Command and settings: "
        f"experiments/functional_vgg_small.py. Runtime {report['seconds'] / 60:.1f} min.",
        "",
        "## 1. Small-L1 filters with clear functionality",
        "",
        "| layer | filter | L1 rank (1 = smallest) | objective reached (layer median) "
        "| validation drop when removed | test drop |",
        "|---|---|---|---|---|---|",
    ]
    for r in report["small_l1"]:
        m, s = mean_sd(r["objective"])
        lines.append(
            f"| {r['group']} | {r['filter']} | {r['l1_rank']} / {r['filters']} | "
            f"{m:.2f} ± {s:.2f} ({r['objective_layer_median']:.2f}) | "
            f"{100 * r['drop']['validation']:.2f}% | {100 * r['drop']['test']:.2f}% |"
        )
    rows = report["equal_flops"]
    silent = {}
    for r in rows:
        if r["method"] == "l1":
            for g, n in r["unresponsive"].items():
                silent.setdefault(g, set()).add(n)
    lines += [
        "",
        "## 2. Equal FLOPs, no retraining",
        "",
        "Filters their own image does not drive (each its own cluster), per layer over the "
        "seeds: " + ", ".join(f"{g} {sorted(v)}" for g, v in silent.items()) + ".",
        "",
    ]
    for split in ("validation", "test"):
        summary = level_summary(rows, split)
        title = "Validation accuracy" if split == "validation" else "Test accuracy (final)"
        lines += [
            f"{title}:",
            "",
            "| level | FLOPs left | " + " | ".join(METHODS) + " | functional (taylor) − taylor |",
            "|---|---|" + "---|" * (len(METHODS) + 1),
        ]
        for level in dict.fromkeys(r["level"] for r in rows):
            fm, fs = mean_sd(summary["flops"][level])
            cells = [pct(summary["accuracy"][level, m]) for m in METHODS]
            difference = np.subtract(
                summary["accuracy"][level, "functional (taylor)"],
                summary["accuracy"][level, "taylor"],
            )
            wins = int(np.sum(difference > 0))
            lines.append(
                f"| {level} | {100 * fm:.1f} ± {100 * fs:.1f}% | "
                + " | ".join(cells)
                + f" | {pct(difference)} (ahead in {wins}/{len(SEEDS)}) |"
            )
        lines.append("")
    defection = report["defection"]
    lines += [
        "## 3. Functionality defection after fine-tuning an L1-pruned model",
        "",
        "Test accuracy before fine-tuning "
        + pct([a["before"]["test"] for a in defection["accuracy"]])
        + ", after "
        + pct([a["after"]["test"] for a in defection["accuracy"]])
        + ".",
        "",
        "Per layer, the mean over its surviving filters (then mean ± sd over the seeds) of: the "
        "cosine of a filter's descriptors before and after fine-tuning (images from seeds s and "
        "s+1); the control, its descriptors from the same two seeds of the model without "
        "fine-tuning; and the correlation "
        "of its response maps on 500 validation images before and after (what it does on real "
        "data). Defection shows as before/after below the control.",
        "",
        "| layer | surviving | descriptor before/after | control: two seeds "
        "| filters below the control's 10th percentile | real-data responses before/after |",
        "|---|---|---|---|---|---|",
    ]
    for g in groups:
        seeds = defection["seeds"]
        below = [
            int(np.sum(np.asarray(s[g]["before_after"])
                       < np.percentile(s[g]["control_other_seed"], 10)))
            for s in seeds
        ]  # fmt: skip

        def stat(key, seeds=seeds, g=g):
            m, s = mean_sd([np.mean(seed[g][key]) for seed in seeds])
            return f"{m:.3f} ± {s:.3f}"

        lines.append(
            f"| {g} | {len(defection['filters'][g])} | {stat('before_after')} | "
            f"{stat('control_other_seed')} | {np.mean(below):.1f} | "
            f"{stat('real_response_correlation')} |"
        )
    path.write_text("\n".join(lines) + "\n")


def run(workdir: Path) -> dict:
    import numpy as np

    from jaxprune import checkpoint, criteria, data
    from jaxprune.graph import channel_graph
    from jaxprune.methods.selection import select_groups

    chosen_ = chosen()  # before any slow work: the sweep must have run
    visualization, kind, resolution = chosen_
    began = time.perf_counter()
    workdir.mkdir(parents=True, exist_ok=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    model, variables, _ = checkpoint.load_model_file(BASE)
    dataset = data.load(data.DataConfig(name="fashion_mnist"))
    graph = channel_graph(model.apply, variables, np.zeros((1, *INPUT_SHAPE), np.float32))
    groups = list(select_groups(graph, "conv"))
    images, objectives = {}, {}
    for seed in SEEDS:
        config = dataclasses.replace(visualization, seed=seed)
        images[seed], objectives[seed] = images_with_objective(
            model.apply, graph, variables, groups, workdir / f"base_seed{seed}.npz", config
        )
    print(f"base images: {time.perf_counter() - began:.0f} s", flush=True)

    def batches(split, start, stop):
        found = list(data.preprocessed_batches(dataset, split, 512, stop))
        joined = {k: np.concatenate([b[k] for b in found])[start:stop] for k in found[0]}
        return [{k: v[i : i + 512] for k, v in joined.items()} for i in range(0, stop - start, 512)]

    accuracy = {
        "validation": masked_accuracy(
            model.apply, graph, variables, batches("validation", *VALIDATION_IMAGES)
        ),
        "test": masked_accuracy(model.apply, graph, variables, batches("test", 0, TEST_EXAMPLES)),
    }
    base_accuracy = {split: fn({}) for split, fn in accuracy.items()}
    context = criteria.ScoringContext(model.apply, graph)
    scores = {
        "l1": criteria.score("l1", context, variables),
        "taylor": criteria.score(
            "taylor", context, variables, batches("validation", *TAYLOR_IMAGES)
        ),
    }
    small_l1 = small_l1_analysis(graph, groups, objectives, scores["l1"], accuracy)
    plot_small_l1(small_l1, images, RESULTS / "small_l1_filters.png")
    print(f"analysis 1: {time.perf_counter() - began:.0f} s", flush=True)
    equal = equal_flops_analysis(model, variables, graph, groups, images, scores, accuracy, chosen_)
    plot_equal_flops(equal, base_accuracy["validation"], RESULTS / "accuracy_vs_flops.png")
    print(f"analysis 2: {time.perf_counter() - began:.0f} s", flush=True)
    defection = defection_analysis(
        model, variables, graph, groups, scores, dataset, workdir, chosen_
    )
    setting = chosen_descriptor()[0]
    report = {
        "descriptor": {"setting": setting, "kind": kind, "resolution": resolution},
        "visualization": dataclasses.asdict(visualization),
        "seeds": list(SEEDS),
        "base_accuracy": base_accuracy,
        "small_l1": small_l1,
        "equal_flops": equal,
        "defection": defection,
        "seconds": time.perf_counter() - began,
    }
    plot_defection(report, groups, RESULTS / "defection.png")
    (RESULTS / "results.json").write_text(json.dumps(report, indent=1, default=float))
    write_tables(report, groups, RESULTS / "tables.md")
    print((RESULTS / "tables.md").read_text())
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="workdirs/functional_vgg_small")
    args = parser.parse_args()
    enable_compilation_cache()
    run(Path(args.workdir))


if __name__ == "__main__":
    main()
