"""Does a filter's functionality descriptor measure what the filter does? VGG-small / Fashion-MNIST.

Command (images are kept in the workdir, so a rerun only measures):

    flock /tmp/jaxprune-heavy.lock python experiments/functional_descriptor.py \\
        [--workdir workdirs/functional_descriptor] [--sweep]

Writes experiments/results/functional/descriptor.md (tables), descriptor.json (every number,
per filter where it is per filter) and descriptor.png/.pdf; with --sweep also sweep.md and
sweep.json (the selection). README.md there discusses them.

Two measurements per conv layer of the shipped VGG-small (jaxprune/pretrained/
vgg_small_fashion_mnist.msgpack), for a descriptor d computed from activation-maximisation
images made with seed s:

(a) stability: the fraction of filters f whose descriptors from two seeds are each other's best
    match among all filters of the layer (`mutual_best_matches`: cos(d_f^s, d_f^t) above
    cos(d_f^s, d_g^t) and cos(d_g^s, d_f^t) for every other filter g). Target: 90%.
(b) agreement: the Spearman correlation, over the pairs of filters, between the descriptor's
    cosine similarity and the filters' response similarity on real images (`response_similarity`:
    the Pearson correlation of two filters' maps at the gate point over the images and
    positions).

Selection (--sweep) and report are kept apart. The sweep makes images with seeds 10 and 11 for
each candidate setting and measures (a) on that pair and (b) against the first 1000 validation
images; the rule is: among the candidates whose stability is at least 90% in every layer, the
one with the highest agreement averaged over layers. The report makes images with seeds 0, 1, 2
and gives (a) as mean and standard deviation over the three seed pairs, (b) as mean and standard
deviation over the three seeds against validation images 1000-1999 (never used by the sweep),
and (b) once more against the first 1000 test images as a final check. Nothing here uses the
test split for a choice.

Cut from a paper-scale setting, to fit this 2-core CPU: one model; 1000 real images per
reference (the reference's split-half Spearman is 0.98-0.999 per layer, see the results page);
3 seeds for the report and 2 for the selection; ascents of at most 128 steps.

Result (experiments/results/functional/descriptor.md; the sweep took 52 minutes and the report
17, with other jobs sharing the 2 cores): the sweep chose image+responses (14 cells) of 64-step
centre pre-activation images. On seeds 0-2 it is stable for 96-100% of each layer's filters
(the old pixels: 26-53%) and agrees with real-data response similarity at 0.52-0.87 (old:
0.06-0.30). The smooth-noise control agrees at 0.56-0.90: the responses, not the
visualisation, make a descriptor measure function.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import time
from pathlib import Path

from jaxprune.runtime import enable_compilation_cache

RESULTS = Path(__file__).resolve().parent / "results" / "functional"
BASE = (
    Path(__file__).resolve().parent.parent / "jaxprune/pretrained/vgg_small_fashion_mnist.msgpack"
)
INPUT_SHAPE = (28, 28, 1)
# Seeds of the report and of the selection (disjoint).
SEEDS = (0, 1, 2)
SELECTION_SEEDS = (10, 11)
# Real images of the reference similarity: selection and report use different validation images.
SELECTION_IMAGES = (0, 1000)
REPORT_IMAGES = (1000, 2000)
TEST_IMAGES = 1000
TARGET_STABILITY = 0.9
# The noise control's blur (pixels).
NOISE_SIGMA = 1.5
NOISE = "smooth-noise"


def image_settings() -> dict:
    """The activation-maximisation settings compared (every field that differs is spelled out)."""
    from jaxprune.criteria.functionality import VisualizationConfig

    old = VisualizationConfig(objective="mean", preactivation=False)
    centre = dataclasses.replace(old, objective="center", preactivation=True)
    return {
        # The method's default until now: 64 steps of 0.05, the channel mean at the gate point.
        "mean-gate-64": old,
        # What experiments/functional_vgg_small.py used: 32 steps of 0.1.
        "mean-gate-32": dataclasses.replace(old, steps=32, step_size=0.1),
        # Pre-activation objective alone.
        "mean-pre-64": dataclasses.replace(old, preactivation=True),
        # Centre objective alone.
        "center-gate-64": dataclasses.replace(old, objective="center"),
        # Both, at three lengths, and with rotation and scale per step.
        "center-pre-32": dataclasses.replace(centre, steps=32, step_size=0.1),
        "center-pre-64": centre,
        "center-pre-128": dataclasses.replace(centre, steps=128),
        "center-pre-128-rs": dataclasses.replace(centre, steps=128, scale=0.1, rotation=10.0),
    }


# (image setting, descriptor kind, response resolution); the first is the old descriptor.
OLD = ("mean-gate-64", "pixels", None)
OLD_EXPERIMENT = ("mean-gate-32", "pixels", None)
# The new descriptor is the sweep's choice, read from sweep.json; the report refuses to run
# without it, so no number is ever reported for a descriptor nobody selected.
SWEEP_FILE = RESULTS / "sweep.json"


def ablations(new: tuple) -> tuple:
    """Shown beside the new descriptor in the report: what each part contributes, and a
    control."""
    setting, _, resolution = new
    resolution = resolution or 7
    return (
        (setting, "pixels", None),
        (setting, "spectrum", None),
        (setting, "responses", resolution),
        (setting, "responses-other-layers", resolution),
        ("mean-gate-64", "spectrum", None),
        ("mean-gate-64", "image+responses", resolution),
        # Control: the same responses to as many seeded smooth-noise probes, no visualisation.
        (NOISE, "responses", resolution),
    )


def chosen_descriptor() -> tuple:
    if not SWEEP_FILE.is_file():
        raise SystemExit(f"{SWEEP_FILE} is missing: run with --sweep first to choose a descriptor")
    chosen = json.loads(SWEEP_FILE.read_text())["chosen"]
    if chosen is None:
        raise SystemExit(
            f"no candidate in {SWEEP_FILE} reached {TARGET_STABILITY:.0%} stability in every "
            "layer; see sweep.md"
        )
    return tuple(chosen)


SWEEP_KINDS = (
    ("pixels", None),
    ("spectrum", None),
    ("responses", 7),
    ("responses", 14),
    ("responses", None),
    ("image+responses", 7),
    ("image+responses", 14),
    ("image+responses", None),
)


def load():
    import jax.numpy as jnp

    from jaxprune import checkpoint
    from jaxprune.graph import channel_graph
    from jaxprune.methods.selection import select_groups

    model, variables, _ = checkpoint.load_model_file(BASE)
    graph = channel_graph(model.apply, variables, jnp.zeros((1, *INPUT_SHAPE), jnp.float32))
    return model, variables, graph, list(select_groups(graph, "conv"))


def real_images(split: str, start: int, stop: int):
    import numpy as np

    from jaxprune import data

    dataset = data.load(data.DataConfig(name="fashion_mnist"))
    batches = data.preprocessed_batches(dataset, split, 500, stop)
    return np.concatenate([np.asarray(b["image"]) for b in batches])[start:stop]


def references(model, variables, graph, groups, images) -> dict:
    from jaxprune.criteria.functionality import response_similarity

    return {g: response_similarity(model.apply, graph, variables, g, images) for g in groups}


def images_for(model, variables, graph, groups, name: str, seed: int, workdir: Path):
    """Per group, the images of one setting and seed, made once and kept in the workdir."""
    import numpy as np

    from jaxprune.criteria.functionality import maximization_images

    config = dataclasses.replace(image_settings()[name], seed=seed)
    store = workdir / f"images_{name}_seed{seed}.npz"
    if store.is_file():
        with np.load(store) as saved:
            if json.loads(str(saved["config"])) == dataclasses.asdict(config):
                return {g: saved[g] for g in groups}, float(saved["seconds"])
    began = time.perf_counter()
    found = {
        g: np.asarray(maximization_images(model.apply, graph, variables, g, INPUT_SHAPE, config))
        for g in groups
    }
    seconds = time.perf_counter() - began
    np.savez(store, config=json.dumps(dataclasses.asdict(config)), seconds=seconds, **found)
    print(f"images {name} seed {seed}: {seconds:.0f} s", flush=True)
    return found, seconds


def noise_probes(count: int, seed: int):
    """Control probes without any visualisation: white noise blurred with a Gaussian of 1.5
    pixels, then scaled to unit standard deviation over the set (the scale of the standardised
    input data)."""
    import numpy as np
    import scipy.ndimage

    rng = np.random.default_rng(seed)
    noise = rng.normal(size=(count, *INPUT_SHAPE))
    noise = scipy.ndimage.gaussian_filter(noise, (0, NOISE_SIGMA, NOISE_SIGMA, 0), mode="wrap")
    return (noise / noise.std()).astype(np.float32)


def probe_maps(model, variables, graph, groups, images: dict) -> dict:
    """Every layer's maps on the probes (every layer's images of one seed), and for the control
    on the probes of the other layers only."""
    import numpy as np

    from jaxprune.criteria.functionality import response_maps

    probes = np.concatenate([images[h] for h in groups])
    maps = response_maps(model.apply, graph, variables, groups, probes)
    owner = np.concatenate([np.full(len(images[h]), h) for h in groups])
    return {"all": maps, "owner": owner}


def describe(images: dict, maps: dict, groups, kind: str, resolution) -> dict:
    """Per group, the descriptors of one kind from the images and the maps on the probes."""
    from jaxprune.criteria.functionality import filter_descriptors

    found = {}
    for g in groups:
        responses, name = maps["all"][g], kind
        if kind == "responses-other-layers":
            # Control: no probe is an image of this layer, so no filter sees its own image.
            responses, name = responses[maps["owner"] != g], "responses"
        found[g] = filter_descriptors(images[g], name, responses=responses, resolution=resolution)
    return found


def measure(descriptors: dict, refs: dict, groups) -> dict:
    """Per group: stability and own-descriptor cosine per seed pair, agreement per seed and
    reference."""
    import numpy as np

    from jaxprune.criteria.functionality import (
        cosine_similarity,
        mutual_best_matches,
        similarity_agreement,
    )

    seeds = sorted(descriptors)
    out = {}
    for g in groups:
        pairs = list(itertools.combinations(seeds, 2))
        stable, own, reproduced = [], [], []
        for s, t in pairs:
            a, b = descriptors[s][g], descriptors[t][g]
            stable.append(mutual_best_matches(a, b))
            reproduced.append(similarity_agreement(cosine_similarity(a), cosine_similarity(b)))
            own.append(own_cosine(a, b))
        agreement = {
            ref: [
                similarity_agreement(cosine_similarity(descriptors[s][g]), refs[ref][g])
                for s in seeds
            ]
            for ref in refs
        }
        out[g] = {
            "pairs": [list(p) for p in pairs],
            "stability": [float(np.mean(x)) for x in stable],
            "stable_filters": [np.flatnonzero(x).tolist() for x in stable],
            "own_cosine": [float(np.mean(x)) for x in own],
            "similarity_reproducibility": reproduced,
            "agreement": agreement,
        }
    return out


def own_cosine(a, b):
    """Per filter (row), the cosine of its two descriptors."""
    import numpy as np

    def unit(d):
        d = np.asarray(d)
        return d / np.maximum(np.linalg.norm(d, axis=1, keepdims=True), 1e-12)

    return np.sum(unit(a) * unit(b), axis=1)


def mean_sd(values) -> tuple[float, float]:
    import numpy as np

    values = np.asarray(values, np.float64)
    return float(values.mean()), float(values.std(ddof=1)) if values.size > 1 else 0.0


def label(candidate) -> str:
    setting, kind, resolution = candidate
    res = "" if resolution is None and kind in ("pixels", "spectrum") else f", cells {resolution}"
    return f"{kind} of {setting}{res}"


def sweep(model, variables, graph, groups, workdir: Path) -> dict:
    """The selection: every setting x descriptor on seeds 10, 11 and validation images 0-999."""
    import numpy as np

    refs = {
        "validation": references(
            model, variables, graph, groups, real_images("validation", *SELECTION_IMAGES)
        )
    }
    rows = []
    for name in image_settings():
        images = {
            s: images_for(model, variables, graph, groups, name, s, workdir)[0]
            for s in SELECTION_SEEDS
        }
        maps = {s: probe_maps(model, variables, graph, groups, images[s]) for s in images}
        for kind, resolution in SWEEP_KINDS:
            described = {
                s: describe(images[s], maps[s], groups, kind, resolution) for s in SELECTION_SEEDS
            }
            result = measure(described, refs, groups)
            rows.append(
                {
                    "candidate": [name, kind, resolution],
                    "stability": {g: result[g]["stability"][0] for g in groups},
                    "agreement": {
                        g: float(np.mean(result[g]["agreement"]["validation"])) for g in groups
                    },
                }
            )
    for row in rows:
        row["min_stability"] = min(row["stability"].values())
        row["mean_agreement"] = float(np.mean(list(row["agreement"].values())))
        row["eligible"] = row["min_stability"] >= TARGET_STABILITY
    eligible = [r for r in rows if r["eligible"]]
    chosen = max(eligible, key=lambda r: r["mean_agreement"]) if eligible else None
    return {"rows": rows, "chosen": chosen["candidate"] if chosen else None}


def write_sweep(result: dict, groups, path: Path) -> None:
    lines = [
        "# Descriptor selection (seeds 10 and 11, validation images 0-999)",
        "",
        "Each cell: stability (fraction of filters whose two seeds' descriptors are mutual best "
        "matches) / agreement (Spearman of the descriptor's similarity with the response "
        "similarity on validation images, mean of the two seeds). Rule: the highest mean "
        f"agreement among candidates stable for at least {TARGET_STABILITY:.0%} of the filters "
        "of every layer.",
        "",
        "| setting | descriptor | " + " | ".join(groups) + " | min stability | mean agreement |",
        "|---|---|" + "---|" * (len(groups) + 2),
    ]
    for row in result["rows"]:
        setting, kind, resolution = row["candidate"]
        kind_text = (
            kind
            if resolution is None and kind in ("pixels", "spectrum")
            else f"{kind} ({resolution or 'all'} cells)"
        )
        mark = " **chosen**" if row["candidate"] == result["chosen"] else ""
        cells = " | ".join(f"{row['stability'][g]:.2f} / {row['agreement'][g]:.2f}" for g in groups)
        lines.append(
            f"| {setting} | {kind_text}{mark} | {cells} | {row['min_stability']:.2f} | "
            f"{row['mean_agreement']:.3f} |"
        )
    path.write_text("\n".join(lines) + "\n")


def report(model, variables, graph, groups, workdir: Path) -> dict:
    """Old and new descriptors (and the ablations) on seeds 0, 1, 2."""
    import numpy as np

    from jaxprune.criteria.functionality import response_maps, similarity_agreement

    refs = {
        "validation": references(
            model, variables, graph, groups, real_images("validation", *REPORT_IMAGES)
        ),
        "test": references(model, variables, graph, groups, real_images("test", 0, TEST_IMAGES)),
    }
    selection = references(
        model, variables, graph, groups, real_images("validation", *SELECTION_IMAGES)
    )
    reliability = {g: similarity_agreement(selection[g], refs["validation"][g]) for g in groups}
    new = chosen_descriptor()
    candidates = [OLD, OLD_EXPERIMENT, new, *ablations(new)]
    seconds, results = {}, {}
    images, maps = {}, {}
    for setting in dict.fromkeys(c[0] for c in candidates):
        if setting == NOISE:
            continue
        seconds[setting] = []
        for s in SEEDS:
            found, took = images_for(model, variables, graph, groups, setting, s, workdir)
            images[setting, s] = found
            maps[setting, s] = probe_maps(model, variables, graph, groups, found)
            seconds[setting].append(took)
    probes = sum(graph[g].size for g in groups)
    for s in SEEDS:
        noise = noise_probes(probes, s)
        maps[NOISE, s] = {"all": response_maps(model.apply, graph, variables, groups, noise)}
        images[NOISE, s] = {g: np.zeros((graph[g].size, *INPUT_SHAPE), np.float32) for g in groups}
    for candidate in candidates:
        setting, kind, resolution = candidate
        described = {
            s: describe(images[setting, s], maps[setting, s], groups, kind, resolution)
            for s in SEEDS
        }
        results[label(candidate)] = {
            "candidate": list(candidate),
            "layers": measure(described, refs, groups),
        }
    return {
        "new": list(new),
        "seeds": list(SEEDS),
        "sizes": {g: graph[g].size for g in groups},
        "settings": {k: dataclasses.asdict(v) for k, v in image_settings().items()},
        "reference_reliability": reliability,
        "image_seconds": seconds,
        "results": results,
    }


def cell(values, digits: int = 2, percent: bool = False) -> str:
    mean, sd = mean_sd(values)
    if percent:
        return f"{100 * mean:.0f} ± {100 * sd:.0f}%"
    return f"{mean:.{digits}f} ± {sd:.{digits}f}"


def write_report(result: dict, groups, path: Path) -> None:
    import numpy as np

    results = result["results"]
    old, old32, new = label(OLD), label(OLD_EXPERIMENT), label(tuple(result["new"]))
    minutes = {k: sum(v) / len(v) / 60 for k, v in result["image_seconds"].items()}
    lines = [
        "# Does the functionality descriptor measure function? VGG-small / Fashion-MNIST",
        "",
        f"Command and settings: experiments/functional_descriptor.py. Seeds {list(SEEDS)}; "
        "mean ± standard deviation over the three seed pairs (stability) or the three seeds "
        f"(agreement). Agreement against validation images {REPORT_IMAGES[0]}-"
        f"{REPORT_IMAGES[1] - 1} (not used by the selection) and, as a final check, the first "
        f"{TEST_IMAGES} test images. Runtime {result['seconds'] / 60:.1f} min; images per seed "
        + ", ".join(f"{k} {v:.1f} min" for k, v in minutes.items())
        + ".",
        "",
        f"- old: {old} (the method's default until now)",
        f"- old (32 steps): {old32} (what functional_vgg_small.py used)",
        f"- new: {new}",
        "",
        "Reference reliability (agreement of the response similarity on validation images "
        f"{SELECTION_IMAGES[0]}-{SELECTION_IMAGES[1] - 1} with that on "
        f"{REPORT_IMAGES[0]}-{REPORT_IMAGES[1] - 1}): "
        + ", ".join(f"{g} {result['reference_reliability'][g]:.3f}" for g in groups)
        + ".",
        "",
        "## Stability: a filter's descriptors from two seeds are each other's best match",
        "",
        "| layer | filters | old | old (32 steps) | new |",
        "|---|---|---|---|---|",
    ]
    for g in groups:
        n = result["sizes"][g]
        lines.append(
            f"| {g} | {n} | "
            + " | ".join(
                cell(results[k]["layers"][g]["stability"], percent=True) for k in (old, old32, new)
            )
            + " |"
        )
    noise = label(ablations(tuple(result["new"]))[-1])
    lines += [
        "",
        "## Agreement: Spearman of descriptor similarity with response similarity on real images",
        "",
        "Control: the new descriptor's response part on as many seeded smooth-noise probes "
        "(no visualisation at all).",
        "",
        "| layer | old (validation) | old, 32 steps (validation) | new (validation) "
        "| control: noise probes (validation) | old (test) | new (test) |",
        "|---|---|---|---|---|---|---|",
    ]
    for g in groups:
        row = [
            cell(results[k]["layers"][g]["agreement"]["validation"])
            for k in (old, old32, new, noise)
        ] + [cell(results[k]["layers"][g]["agreement"]["test"]) for k in (old, new)]
        lines.append(f"| {g} | " + " | ".join(row) + " |")
    lines += [
        "",
        "## Reproducibility of the similarity matrix: Spearman between two seeds' matrices",
        "",
        "| layer | old | old (32 steps) | new | control: noise probes |",
        "|---|---|---|---|---|",
    ]
    for g in groups:
        lines.append(
            f"| {g} | "
            + " | ".join(
                cell(results[k]["layers"][g]["similarity_reproducibility"])
                for k in (old, old32, new, noise)
            )
            + " |"
        )
    lines += [
        "",
        "## Same filter, two seeds: mean cosine of its two descriptors",
        "",
        "| layer | old | old (32 steps) | new |",
        "|---|---|---|---|",
    ]
    for g in groups:
        lines.append(
            f"| {g} | "
            + " | ".join(cell(results[k]["layers"][g]["own_cosine"]) for k in (old, old32, new))
            + " |"
        )
    lines += [
        "",
        "## Every descriptor measured",
        "",
        "Means over seeds (or seed pairs): stability / validation agreement / reproducibility of "
        "the similarity matrix. The noise control's probes differ from seed to seed, so its "
        "descriptors' coordinates do not correspond across seeds and its stability is not "
        "meaningful (a fixed probe set would make it 100% by construction).",
        "",
        "| descriptor | " + " | ".join(groups) + " | mean |",
        "|---|" + "---|" * (len(groups) + 1),
    ]
    for name, entry in results.items():
        layers = entry["layers"]
        stab = [float(np.mean(layers[g]["stability"])) for g in groups]
        agree = [float(np.mean(layers[g]["agreement"]["validation"])) for g in groups]
        rep = [float(np.mean(layers[g]["similarity_reproducibility"])) for g in groups]
        lines.append(
            f"| {name} | "
            + " | ".join(
                f"{a:.2f} / {b:.2f} / {c:.2f}" for a, b, c in zip(stab, agree, rep, strict=True)
            )
            + f" | {np.mean(stab):.2f} / {np.mean(agree):.3f} / {np.mean(rep):.2f} |"
        )
    path.write_text("\n".join(lines) + "\n")


def plot_report(result: dict, groups, path: Path) -> None:
    import numpy as np

    from jaxprune.figures import new_figure, save_figure

    results = result["results"]
    shown = [
        (label(OLD), "old"),
        (label(OLD_EXPERIMENT), "old, 32 steps"),
        (label(tuple(result["new"])), "new"),
    ]
    figure = new_figure(9.0, 3.4)
    x = np.arange(len(groups))
    width = 0.8 / len(shown)
    for k, (title, key, ylabel) in enumerate(
        [
            ("stability (mutual best match across seeds)", "stability", "fraction of filters"),
            ("agreement with real-data response similarity", "agreement", "Spearman"),
        ]
    ):
        ax = figure.add_subplot(1, 2, k + 1)
        for j, (name, text) in enumerate(shown):
            layers = results[name]["layers"]
            values = [
                layers[g][key] if key == "stability" else layers[g][key]["validation"]
                for g in groups
            ]
            stats = [mean_sd(v) for v in values]
            ax.bar(
                x + (j - (len(shown) - 1) / 2) * width,
                [m for m, _ in stats],
                width,
                yerr=[s for _, s in stats],
                label=text,
                capsize=2,
            )
        if key == "stability":
            ax.axhline(TARGET_STABILITY, color="grey", linestyle=":", label="target 90%")
        ax.set_xticks(x, groups)
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=9)
        ax.set_ylim(0, 1.05)
        ax.legend(fontsize=7)
    save_figure(figure, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="workdirs/functional_descriptor")
    parser.add_argument("--sweep", action="store_true", help="also run the selection sweep")
    args = parser.parse_args()
    enable_compilation_cache()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    model, variables, graph, groups = load()
    if args.sweep:
        began = time.perf_counter()
        chosen = sweep(model, variables, graph, groups, workdir)
        chosen["seconds"] = time.perf_counter() - began
        (RESULTS / "sweep.json").write_text(json.dumps(chosen, indent=1))
        write_sweep(chosen, groups, RESULTS / "sweep.md")
        print((RESULTS / "sweep.md").read_text())
    began = time.perf_counter()
    result = report(model, variables, graph, groups, workdir)
    result["seconds"] = time.perf_counter() - began
    (RESULTS / "descriptor.json").write_text(json.dumps(result, indent=1))
    write_report(result, groups, RESULTS / "descriptor.md")
    plot_report(result, groups, RESULTS / "descriptor.png")
    print((RESULTS / "descriptor.md").read_text())


if __name__ == "__main__":
    main()
