"""Functionality-oriented pruning of VGG-small on Fashion-MNIST: the three analyses of Qin et al.

Command (resumes from its workdir; the images of each model are stored there):

    flock /tmp/jaxprune-heavy.lock python experiments/functional_vgg_small.py \\
        [--workdir workdirs/functional_vgg_small]

Starts from the shipped base (jaxprune/pretrained/vgg_small_fashion_mnist.msgpack, 92.31% test
accuracy) and writes experiments/results/functional/: tables.md (the tables), results.json,
small_l1_filters.png, accuracy_vs_flops.png and defection.png; README.md there discusses them.

1. Small-L1 filters with clear functionality: in every conv layer, among the quarter of filters
   with the smallest L1 norm, the two whose activation-maximisation image drives them hardest
   (highest mean activation reached); their images, and the accuracy lost when each alone is
   removed (masked, no retraining).
2. Functionality-oriented pruning against L1 at equal FLOPs, no retraining. Every level keeps
   the same number of filters per conv layer for every method, so widths and FLOPs are equal:
   either a ratio of every layer (10%, 25%, 40%, 50% removed; functional = average-linkage
   clusters cut at the kept count) or the clusters of a similarity threshold (0.6, 0.4, 0.3;
   the baselines keep as many filters per layer). One representative per cluster, by Taylor
   (the default) or closest to the centroid; controls: L1 and Taylor alone.
3. Functionality defection: VGG-small pruned by L1 (50% of every conv layer), images of the
   surviving filters before and after a short fine-tuning, and the cosine similarity of each
   filter's two (standardised) images; as a control, the similarity of the same model's images
   from two seeds.

Cuts, to stay well within ~12 minutes on this 2-core CPU: images take 32 ascent steps of 0.1
(not the default 64 of 0.05); accuracies are on the first 2000 test images (masked models,
which equal the pruned ones); Taylor reads 1024 validation images; the fine-tuning of analysis 3
is one epoch over a fixed 5000-image training subset (SGD, learning rate 0.01, cosine).

Result (3.3 minutes from an empty workdir on the idle 2-core CPU, 79 s of it the base model's
images; 0.9 minutes resumed from a workdir that holds the images and the fine-tuning; base
91.90% on those 2000 test images):
1. Small-L1 filters can matter: conv2 #24 (L1 rank 2 of 32, a clear periodic pattern) costs
   1.15% accuracy when removed alone; the other eleven cost between -0.35% and +0.25%.
2. Filters their own image does not drive (silent at the start image: conv1 5, conv2 3, conv3 1,
   conv5 3, conv6 23; several of conv6's are among its most relevant by Taylor) each stay a
   cluster of their own. Functional (Taylor representatives) then ties Taylor alone at the
   lightest levels (10% of every layer, 81.9% FLOPs left: 90.10% against 90.15%; threshold
   0.6, 97.1% FLOPs left: 91.90% against 91.75%) and loses to it beyond (25% of every layer,
   56.8% FLOPs left: 69.10% against 83.35%; threshold 0.3, 54.5% left: 65.65% against 77.85%).
   It beats L1 at every level but 50% of every layer, where both are at chance (9.30% and
   9.50%). The paper's "68.88% fewer FLOPs with < 0.34% drop" is not reproduced: here 26%
   fewer FLOPs already cost 6.9 points without retraining. Centroid representatives are
   worse than Taylor.
3. After fine-tuning (9.50% -> 87.70%), mean before/after image similarity falls with depth:
   0.81, 0.59, 0.37, 0.26, 0.16, 0.13 (conv1..conv6). The control says how far that can be
   read: an unchanged filter's images from two seeds are only 0.42, 0.14, 0.31, 0.13, 0.29,
   0.24 alike (raw pixels are shift-sensitive). Before/after images share their start, so they
   stay closer than that in conv1-conv4; in conv5-conv6 they fall below the control, which is
   where the fine-tuning clearly changed what the surviving filters respond to.

These numbers were produced before the fine-tuning of analysis 3 went through
`jaxprune.fit.fit` on the pruned program (same settings) and before the clustering moved to
`jaxprune.methods.clustering` (same partitions); the script has not been rerun since.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from jaxprune.runtime import enable_compilation_cache

RESULTS = Path(__file__).resolve().parent / "results" / "functional"
BASE = (
    Path(__file__).resolve().parent.parent / "jaxprune/pretrained/vgg_small_fashion_mnist.msgpack"
)
RATIOS = (0.1, 0.25, 0.4, 0.5)
THRESHOLDS = (0.6, 0.4, 0.3)
TEST_EXAMPLES = 2000
FINETUNE_EXAMPLES = 5000
MODEL = "vgg_small"


def visualization():
    """The activation-maximisation settings of every analysis."""
    from jaxprune.criteria.functionality import VisualizationConfig

    return VisualizationConfig(steps=32, step_size=0.1)


def images_with_objective(apply_fn, graph, variables, groups, store: Path, config=None):
    """Per group (images, final mean activation), computed once and kept in `store` (npz)."""
    import numpy as np

    from jaxprune.criteria.functionality import maximization_images

    found = {}
    if store.is_file():
        with np.load(store) as saved:
            found = {k: saved[k] for k in saved.files}
    for group in groups:
        if f"{group}/images" in found:
            continue
        images, objective = maximization_images(
            apply_fn,
            graph,
            variables,
            group,
            (28, 28, 1),
            config or visualization(),
            with_objective=True,
        )
        found[f"{group}/images"] = np.asarray(images)
        found[f"{group}/activation"] = np.asarray(objective)[:, -1]
        np.savez(store, **found)
    return {g: (found[f"{g}/images"], found[f"{g}/activation"]) for g in groups}


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


def flops_left(model, variables, graph, keep) -> float:
    import jax.numpy as jnp

    from jaxprune import cost
    from jaxprune.surgery import prune

    x = jnp.zeros((1, 28, 28, 1), jnp.float32)
    pruned = prune(variables, graph, keep)
    small = model.clone(widths=tuple(sorted(pruned.widths.items())))
    return (
        cost.count(small.apply, pruned.variables, x).flops
        / cost.count(model.apply, variables, x).flops
    )


def small_l1_analysis(graph, groups, found, l1, accuracy, base_accuracy):
    import numpy as np

    from jaxprune.surgery import keep_to_masks

    sizes = graph.sizes
    rows = []
    for group in groups:
        _, activation = found[group]
        order = np.argsort(l1[group], kind="stable")
        small = order[: max(2, sizes[group] // 4)]
        clear = small[np.argsort(-activation[small], kind="stable")[:2]]
        for f in clear:
            keep = {group: np.setdiff1d(np.arange(sizes[group]), [f])}
            masks = keep_to_masks(graph, keep)
            rows.append(
                {
                    "group": group,
                    "filter": int(f),
                    "l1_rank": int(np.nonzero(order == f)[0][0]) + 1,
                    "filters": sizes[group],
                    "l1": float(l1[group][f]),
                    "activation": float(activation[f]),
                    "activation_median": float(np.median(activation)),
                    "accuracy_drop": base_accuracy - accuracy(masks),
                }
            )
    return rows


def plot_small_l1(rows, found, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(rows) // 2, figsize=(1.9 * len(rows) // 2, 5.4))
    for ax, row in zip(axes.T.ravel(), rows, strict=True):
        image = found[row["group"]][0][row["filter"]][..., 0]
        ax.imshow(image, cmap="gray")
        ax.set_title(
            f"{row['group']} #{row['filter']}\nL1 rank {row['l1_rank']}/{row['filters']}\n"
            f"drop {100 * row['accuracy_drop']:.2f}%",
            fontsize=7,
        )
        ax.axis("off")
    fig.suptitle("Small-L1 filters with clear functionality (activation-maximisation images)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def equal_flops_analysis(model, variables, graph, groups, found, scores, accuracy, sizes):
    import numpy as np

    from jaxprune.criteria.functionality import responsive_filters
    from jaxprune.methods.functional import (
        ClusteringConfig,
        FunctionalConfig,
        choose_representatives,
        layer_clusters,
    )
    from jaxprune.surgery import keep_to_masks

    responsive = {
        g: responsive_filters(model.apply, graph, variables, g, found[g][0], visualization())
        for g in groups
    }
    levels = [("ratio", r) for r in RATIOS] + [("threshold", t) for t in THRESHOLDS]
    rows = []
    for kind, level in levels:
        if kind == "ratio":
            config = FunctionalConfig(ratio=level)
        else:
            config = FunctionalConfig(clustering=ClusteringConfig(threshold=level))
        keeps = {"l1": {}, "taylor": {}, "functional (taylor)": {}, "functional (centroid)": {}}
        thresholds, counts = {}, {}
        for g in groups:
            descriptors, _, labels, thresholds[g] = layer_clusters(
                found[g][0], responsive[g], config
            )
            # With a threshold the clusters decide the count; the baselines keep as many.
            counts[g] = len(np.unique(labels))
            keeps["functional (taylor)"][g] = choose_representatives(
                labels, scores=scores["taylor"][g]
            )
            keeps["functional (centroid)"][g] = choose_representatives(
                labels, descriptors=descriptors
            )
            keeps["l1"][g] = top_k(scores["l1"][g], counts[g])
            keeps["taylor"][g] = top_k(scores["taylor"][g], counts[g])
        flops = flops_left(model, variables, graph, keeps["l1"])
        removed = 1 - sum(counts.values()) / sum(sizes[g] for g in groups)
        for method, keep in keeps.items():
            assert all(len(keep[g]) == counts[g] for g in groups)
            rows.append(
                {
                    "level": f"{kind} {level}",
                    "filters_removed": removed,
                    "kept": dict(counts),
                    "method": method,
                    "flops_left": flops,
                    "accuracy": accuracy(keep_to_masks(graph, keep)),
                    "thresholds": {
                        g: (float(t) if np.isfinite(t) else None) for g, t in thresholds.items()
                    },
                }
            )
    unresponsive = {g: int(np.sum(~r)) for g, r in responsive.items()}
    return rows, unresponsive


def plot_equal_flops(rows, base_accuracy, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = sorted((r for r in rows if r["method"] == method), key=lambda r: -r["flops_left"])
        ax.plot(
            [100 * (1 - r["flops_left"]) for r in mine],
            [100 * r["accuracy"] for r in mine],
            marker="o",
            label=method,
        )
    ax.axhline(100 * base_accuracy, color="grey", linestyle=":", label="base")
    ax.set_xlabel("FLOPs removed (%)")
    ax.set_ylabel("test accuracy, no retraining (%)")
    ax.set_title("VGG-small / Fashion-MNIST: equal FLOPs, no retraining")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def defection_analysis(model, variables, graph, groups, scores, dataset, workdir: Path):
    import jax.numpy as jnp
    import numpy as np

    from jaxprune import data, train
    from jaxprune.criteria.functionality import cosine_similarity, image_descriptors
    from jaxprune.fit import FitConfig, fit
    from jaxprune.graph import channel_graph
    from jaxprune.methods.contract import DatasetData
    from jaxprune.methods.functional import FunctionalConfig, kept_count
    from jaxprune.model import Model
    from jaxprune.run import RunDir, fingerprint
    from jaxprune.surgery import prune

    sizes = graph.sizes
    keep = {
        g: top_k(scores["l1"][g], kept_count(sizes[g], FunctionalConfig(ratio=0.5))) for g in groups
    }
    pruned = prune(variables, graph, keep)
    x = jnp.zeros((1, 28, 28, 1), jnp.float32)
    # The pruned program, called like the base model.
    small = Model.linen(model, x, variables=variables).with_apply_fn(pruned.apply_fn)
    before = pruned.variables
    # One epoch over a fixed training subset: SGD, momentum 0.9, weight decay 5e-4, cosine
    # from 0.01 (FitConfig's default optimizer).
    subset = data.load(dataclasses.replace(dataset.config, train_examples=FINETUNE_EXAMPLES))
    identity = {"keep": {g: k.tolist() for g, k in keep.items()}, "variables": fingerprint(before)}
    with RunDir.open(workdir / "l1_finetune", kind="finetune", identity=identity) as run:
        after, _ = fit(small, before, DatasetData(subset), FitConfig(epochs=1), run=run)
    small_graph = channel_graph(small.apply_fn, before, x, **small.eval_kwargs)
    found_before = images_with_objective(
        small.apply_fn, small_graph, before, groups, workdir / "images_l1_before.npz"
    )
    found_after = images_with_objective(
        small.apply_fn, small_graph, after, groups, workdir / "images_l1_after.npz"
    )
    # Control: the same model's images from another seed, i.e. how far images move by chance.
    found_seed = images_with_objective(
        small.apply_fn,
        small_graph,
        before,
        groups,
        workdir / "images_l1_before_seed1.npz",
        dataclasses.replace(visualization(), seed=1),
    )

    def paired(x, y):
        return np.array([cosine_similarity(np.stack([x[i], y[i]]))[0, 1] for i in range(len(x))])

    per_layer = {}
    for g in groups:
        a = image_descriptors(found_before[g][0])
        b = image_descriptors(found_after[g][0])
        similarity = paired(a, b)
        per_layer[g] = {
            "filters": [int(i) for i in keep[g]],
            "similarity": similarity.tolist(),
            "seed_similarity": paired(a, image_descriptors(found_seed[g][0])).tolist(),
        }

    def test_accuracy(small_variables) -> float:
        batches = data.preprocessed_batches(dataset, "test", 500, TEST_EXAMPLES)
        return train.evaluate(small, small_variables, batches)["accuracy"]

    accuracy = {"before": test_accuracy(before), "after": test_accuracy(after)}
    return per_layer, accuracy, found_before, found_after


def plot_defection(per_layer, found_before, found_after, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    groups = list(per_layer)
    fig = plt.figure(figsize=(11, 6.5))
    top = fig.add_subplot(2, 1, 1)
    top.boxplot([per_layer[g]["similarity"] for g in groups], tick_labels=groups)
    top.set_ylabel("cosine similarity before / after")
    top.set_title("Functionality defection: surviving filters of an L1-pruned VGG-small")
    # The least stable filter of each layer: its image before (left) and after (right).
    for k, g in enumerate(groups):
        i = int(np.argmin(per_layer[g]["similarity"]))
        for j, found in enumerate((found_before, found_after)):
            ax = fig.add_subplot(2, 2 * len(groups), 2 * len(groups) + 2 * k + j + 1)
            ax.imshow(found[g][0][i][..., 0], cmap="gray")
            ax.axis("off")
            label = "before" if j == 0 else "after"
            ax.set_title(
                f"{g} #{per_layer[g]['filters'][i]}\n{label}"
                + (f" {per_layer[g]['similarity'][i]:.2f}" if j else ""),
                fontsize=7,
            )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_tables(report: dict, path: Path) -> None:
    lines = ["# Functionality-oriented pruning, VGG-small / Fashion-MNIST", ""]
    lines += [
        f"Base: {100 * report['base_accuracy']:.2f}% on the first {TEST_EXAMPLES} test images. "
        f"Command and settings: experiments/functional_vgg_small.py. Runtime "
        f"{report['seconds'] / 60:.1f} min.",
        "",
        "## 1. Small-L1 filters with clear functionality",
        "",
        "| layer | filter | L1 rank (1 = smallest) | activation reached (layer median) "
        "| accuracy drop when removed |",
        "|---|---|---|---|---|",
    ]
    for r in report["small_l1"]:
        lines.append(
            f"| {r['group']} | {r['filter']} | {r['l1_rank']} / {r['filters']} | "
            f"{r['activation']:.2f} ({r['activation_median']:.2f}) | "
            f"{100 * r['accuracy_drop']:.2f}% |"
        )
    silent = ", ".join(f"{g} {n}" for g, n in report["unresponsive_filters"].items())
    lines += [
        "",
        "## 2. Equal FLOPs, no retraining",
        "",
        f"Filters their own image does not drive (never merged, each its own cluster): {silent}.",
        "",
        "| level | conv filters removed | FLOPs left | method | test accuracy | drop |",
        "|---|---|---|---|---|---|",
    ]
    for r in report["equal_flops"]:
        lines.append(
            f"| {r['level']} | {100 * r['filters_removed']:.1f}% | {100 * r['flops_left']:.1f}% | "
            f"{r['method']} | "
            f"{100 * r['accuracy']:.2f}% | {100 * (report['base_accuracy'] - r['accuracy']):.2f}% |"
        )
    lines += [
        "",
        "## 3. Functionality defection after fine-tuning an L1-pruned model",
        "",
        f"Accuracy before fine-tuning {100 * report['defection_accuracy']['before']:.2f}%, "
        f"after {100 * report['defection_accuracy']['after']:.2f}%.",
        "",
        "Similarity: cosine of each surviving filter's standardised image before and after "
        "fine-tuning. Control: the same (not fine-tuned) model's images from another seed.",
        "",
        "| layer | surviving filters | mean similarity | min | filters below 0.5 "
        "| control: mean | control: filters below 0.5 |",
        "|---|---|---|---|---|---|---|",
    ]
    for g, layer in report["defection"].items():
        s, c = layer["similarity"], layer["seed_similarity"]
        lines.append(
            f"| {g} | {len(s)} | {sum(s) / len(s):.3f} | {min(s):.3f} | "
            f"{sum(v < 0.5 for v in s)} | {sum(c) / len(c):.3f} | {sum(v < 0.5 for v in c)} |"
        )
    path.write_text("\n".join(lines) + "\n")


def run(workdir: Path) -> dict:
    import jax.numpy as jnp

    from jaxprune import checkpoint, criteria, data
    from jaxprune.graph import channel_graph
    from jaxprune.methods.oneshot import select_groups

    began = time.perf_counter()
    workdir.mkdir(parents=True, exist_ok=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    model, variables, _ = checkpoint.load_model_file(BASE)
    dataset = data.load(data.DataConfig(name="fashion_mnist"))
    graph = channel_graph(model.apply, variables, jnp.zeros((1, 28, 28, 1), jnp.float32))
    groups = select_groups(graph, "conv")
    sizes = graph.sizes
    found = images_with_objective(model.apply, graph, variables, groups, workdir / "images.npz")
    print(f"base images: {time.perf_counter() - began:.0f} s")

    test = list(data.preprocessed_batches(dataset, "test", 500, TEST_EXAMPLES))
    accuracy = masked_accuracy(model.apply, graph, variables, test)
    base_accuracy = accuracy({})
    context = criteria.ScoringContext(model.apply, graph)
    validation = list(data.preprocessed_batches(dataset, "validation", 128, 1024))
    scores = {
        "l1": criteria.score("l1", context, variables),
        "taylor": criteria.score("taylor", context, variables, validation),
    }
    small_l1 = small_l1_analysis(graph, groups, found, scores["l1"], accuracy, base_accuracy)
    plot_small_l1(small_l1, found, RESULTS / "small_l1_filters.png")
    print(f"analysis 1: {time.perf_counter() - began:.0f} s")
    equal, unresponsive = equal_flops_analysis(
        model, variables, graph, groups, found, scores, accuracy, sizes
    )
    plot_equal_flops(equal, base_accuracy, RESULTS / "accuracy_vs_flops.png")
    print(f"analysis 2: {time.perf_counter() - began:.0f} s")
    defection, defection_accuracy, before, after = defection_analysis(
        model, variables, graph, groups, scores, dataset, workdir
    )
    plot_defection(defection, before, after, RESULTS / "defection.png")
    report = {
        "visualization": dataclasses.asdict(visualization()),
        "test_examples": TEST_EXAMPLES,
        "base_accuracy": base_accuracy,
        "small_l1": small_l1,
        "equal_flops": equal,
        "unresponsive_filters": unresponsive,
        "defection": defection,
        "defection_accuracy": defection_accuracy,
        "seconds": time.perf_counter() - began,
    }
    (RESULTS / "results.json").write_text(json.dumps(report, indent=1, default=float))
    write_tables(report, RESULTS / "tables.md")
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
