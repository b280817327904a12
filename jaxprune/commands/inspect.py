"""`jaxprune inspect`: write the kernel-selection pages of a model file's conv layers.

    jaxprune inspect                                  # the shipped VGG-small, its first conv layer
    jaxprune inspect --layer conv3 --images 12 --out workdirs/inspect
    jaxprune inspect --layer all --standin 4          # every conv layer, with a stand-in's choice

For each chosen layer the output folder receives ``<layer>.html`` (`jaxprune.inspect.page`: open
it in a browser, click kernels to remove, export the selection) and, with ``--standin COUNT``,
``standin_<layer>.json``: the choice of the scripted stand-in for a person
(`jaxprune.inspect.standin`), labelled as such. ``index.html`` links everything. The sample
images are the first validation images of the dataset the model was trained on; the objective
scores (``--scores``, by default the loss after removing each kernel alone) are computed on the
first ``--score-examples`` of them.
"""

from __future__ import annotations

import argparse
import dataclasses
import html
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from jaxprune.commands.config import DefaultsHelpFormatter
from jaxprune.commands.model_spec import add_model_arguments
from jaxprune.inspect.page import PageConfig, page_file_name, write_kernel_page
from jaxprune.inspect.selection import write_selection
from jaxprune.inspect.standin import standin_selection
from jaxprune.sharding import to_host

ORACLE_NAMES = ("oracle_loss", "oracle_abs")


@dataclasses.dataclass(frozen=True)
class InspectConfig:
    """What `run_inspect` writes."""

    # A zoo model (its shipped weights, or --variables) or your own as FILE.py:NAME.
    model: str = "vgg_small"
    # The model's variables: a model file or an orbax checkpoint ("": the zoo's shipped ones).
    variables: str = ""
    # The dataset (a zoo model file's own training data when it names one).
    dataset: str = "fashion_mnist"
    # A conv group name; "": the first conv group; "all": every conv group.
    layer: str = ""
    # Sample validation images shown per kernel.
    images: int = 8
    # Registry name of the criterion shown as each kernel's score; "none": no scores.
    scores: str = "oracle_loss"
    # Validation examples the scores are computed on.
    score_examples: int = 256
    # p, the fraction of each layer a progressive run removes: the page shows the count it
    # means and offers to select that many of the lowest scores (the paper's 5%).
    ratio: float = 0.05
    # Examples per batch when scoring.
    batch_size: int = 128
    # Output folder.
    out: str = "workdirs/inspect"
    # If set, also write the stand-in's selection of this many kernels per layer.
    standin: int | None = None
    # Also write the functionality report (`jaxprune.inspect.functionality`) and link it.
    functionality: bool = False
    # Prepared TFDS data (None: the default data dir).
    data_dir: str | None = None
    # A progress bar over the layers' pages.
    progress: bool = True


def run_inspect(config: InspectConfig) -> dict[str, Path]:
    """Writes the pages (and stand-in selections, and the index) of `config`.

    Args:
      config: the model file, layers, images, scores and output folder.

    Returns:
      Name -> path of every file written: ``"page:<layer>"``, ``"standin:<layer>"``,
      ``"functionality:<name>"`` and ``"index"``.

    Raises:
      FileNotFoundError: no such model file.
      ValueError: an unknown or dense layer, too few images, a stand-in count a layer cannot
        give, or an unknown criterion.
    """
    from jaxprune.commands.score import ScoreConfig, load_scoring_setup

    if config.images < 1:
        raise ValueError(f"--images must be at least 1, got {config.images}.")
    if not 0.0 <= config.ratio < 1.0:
        raise ValueError(f"--ratio must be in [0, 1), got {config.ratio}.")
    if config.standin is not None and config.standin < 0:
        raise ValueError(f"--standin must be a count >= 0, got {config.standin}.")
    scoring = config.scores.lower() != "none"
    if scoring:
        _check_criterion(config.scores)
    examples = max(config.images, config.score_examples if scoring else 0)
    setup = load_scoring_setup(
        ScoreConfig(
            model=config.model,
            variables=config.variables,
            dataset=config.dataset,
            examples=examples,
            batch_size=min(config.batch_size, examples),
            data_dir=config.data_dir,
        )
    )
    apply_fn, graph = setup.context.apply_fn, setup.context.graph
    groups = _chosen_groups(graph, config.layer)
    if config.standin is not None:
        too_small = {g: graph[g].size for g in groups if graph[g].size <= config.standin}
        if too_small:
            raise ValueError(
                f"--standin {config.standin} would remove every kernel of {too_small}; give "
                "fewer than each layer's kernel count."
            )
    images = np.concatenate([to_host(b["image"]) for b in setup.batches])[: config.images]
    scores = _scores(config, setup, groups) if scoring else {}
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    title_base = f"{setup.label} on {setup.dataset.config.name}"
    written: dict[str, Path] = {}
    layers = []
    for group in tqdm(groups, desc="pages", unit="layer", disable=not config.progress):
        written[f"page:{group}"] = _write_page(
            out,
            apply_fn,
            setup.variables,
            graph,
            group,
            images,
            scores.get(group),
            title_base,
            config.scores,
            config.ratio,
        )
        row = {"group": group, "kernels": graph[group].size, "page": page_file_name(group)}
        if config.standin is not None:
            document = standin_selection(
                apply_fn, setup.variables, graph, group, images, config.standin
            )
            path = write_selection(
                out / f"standin_{Path(page_file_name(group)).stem}.json", document
            )
            written[f"standin:{group}"] = path
            row["standin"] = path.name
            row["standin_remove"] = document["layers"][group]["remove"]
        layers.append(row)
    extras: dict[str, Path] = {}
    if config.functionality:
        # Imported only when asked: the report is its own module with its own cost.
        from jaxprune.inspect.functionality import write_functionality_report

        report = write_functionality_report(
            apply_fn,
            setup.variables,
            graph,
            out / "functionality",
            groups=groups,
            images=images,
        )
        extras = {name: Path(path) for name, path in report.items()}
        written.update({f"functionality:{name}": path for name, path in extras.items()})
    written["index"] = _write_index(
        out, title_base, layers, extras, scores_name=config.scores if scoring else None
    )
    return written


def _chosen_groups(graph: Any, layer: str) -> list[str]:
    convs = [g.name for g in graph.groups if g.kind == "conv"]
    if not convs:
        raise ValueError(
            "This model has no prunable conv layer; the kernel page shows conv layers."
        )
    if layer in ("", None):
        return convs[:1]
    if layer == "all":
        return convs
    if layer not in convs:
        raise ValueError(
            f"--layer {layer!r} is not a prunable conv layer; choose one of {convs} or 'all'."
        )
    return [layer]


def _check_criterion(name: str) -> None:
    from jaxprune.criteria import CRITERIA

    if name not in CRITERIA:
        raise ValueError(
            f"--scores {name!r} is not a registered criterion; use one of {sorted(CRITERIA)} "
            "or 'none'."
        )


def _scores(config: InspectConfig, setup: Any, groups: list[str]) -> dict[str, np.ndarray]:
    from jaxprune.criteria import score

    name = config.scores
    options = {"groups": tuple(groups)} if name in ORACLE_NAMES else {}
    scores = score(name, setup.context, setup.variables, setup.batches, **options)
    return {g: scores[g] for g in groups if g in scores}


def _write_page(
    out: Path,
    apply_fn: Any,
    variables: Any,
    graph: Any,
    group: str,
    images: np.ndarray,
    scores: np.ndarray | None,
    title_base: str,
    score_name: str,
    ratio: float,
) -> Path:
    return write_kernel_page(
        out / page_file_name(group),
        apply_fn,
        variables,
        graph,
        group,
        images,
        scores=scores,
        title=f"{group}: kernels of {title_base}",
        config=PageConfig(score_name=score_name, ratio=ratio),
    )


def _write_index(
    out: Path,
    title: str,
    layers: list[dict[str, Any]],
    extras: dict[str, Path],
    *,
    scores_name: str | None,
) -> Path:
    rows = []
    for row in layers:
        standin = (
            f'<a href="{html.escape(row["standin"])}">{html.escape(row["standin"])}</a> '
            f"(removes {row['standin_remove']})"
            if "standin" in row
            else ""
        )
        rows.append(
            f'<tr><td><a href="{html.escape(row["page"])}">{html.escape(row["group"])}</a></td>'
            f"<td>{row['kernels']}</td><td>{standin}</td></tr>"
        )
    links = []
    for name, path in extras.items():
        where = path.resolve()
        target = where.relative_to(out.resolve()) if where.is_relative_to(out.resolve()) else where
        links.append(f'<li><a href="{html.escape(str(target))}">{html.escape(name)}</a></li>')
    functionality = f"<h2>Functionality report</h2><ul>{''.join(links)}</ul>" if links else ""
    scores = f"Scores: {html.escape(scores_name)}." if scores_name else "No scores."
    text = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body {{ font: 14px/1.4 system-ui, sans-serif; margin: 16px; }}
td, th {{ padding: 2px 12px; text-align: left; }}</style></head>
<body><h1>Kernel pages: {html.escape(title)}</h1>
<p>One page per layer: click kernels to remove, then export the selection (each page says
where the file goes). {scores}
Stand-in files are a script's choice (dead kernels first, then duplicates), not a person's.</p>
<table><tr><th>layer</th><th>kernels</th><th>stand-in selection</th></tr>
{"".join(rows)}
</table>{functionality}</body></html>
"""
    path = out / "index.html"
    path.write_text(text, encoding="utf-8")
    return path


def _from_args(args: argparse.Namespace) -> int:
    config = InspectConfig(
        model=args.model,
        variables=args.variables or "",
        dataset=args.dataset,
        layer=args.layer or "",
        images=args.images,
        scores=args.scores,
        score_examples=args.score_examples,
        ratio=args.ratio,
        batch_size=args.batch_size,
        out=args.out,
        standin=args.standin,
        functionality=args.functionality,
        data_dir=args.data_dir,
        progress=not args.no_progress,
    )
    written = run_inspect(config)
    for name, path in written.items():
        print(f"{name}: {path}")
    print(f"open {written['index']} in a browser")
    return 0


def add_command(subparsers: Any) -> argparse.ArgumentParser:
    """Registers ``jaxprune inspect`` on the CLI's subparsers (its handler is ``args.func``).

    Args:
      subparsers: the object `argparse.ArgumentParser.add_subparsers` returned.

    Returns:
      The new subparser.
    """
    defaults = InspectConfig()
    parser = subparsers.add_parser(
        "inspect",
        help="write kernel-selection pages (activation maps, filters, scores) of conv layers",
        description=(
            "Writes a self-contained HTML page per conv layer: every kernel's activation maps "
            "over sample validation images, its filter and its objective score. Click kernels "
            "to remove and export a selection file for `jaxprune prune --method progressive "
            "--criterion subjective --selection FILE`."
        ),
        formatter_class=DefaultsHelpFormatter,
    )
    add_model_arguments(parser)
    parser.add_argument(
        "--layer",
        default=None,
        metavar="GROUP",
        help="a conv layer (default: the first); 'all': one page per conv layer",
    )
    parser.add_argument(
        "--images", type=int, default=defaults.images, help="sample validation images per kernel"
    )
    parser.add_argument(
        "--scores",
        default=defaults.scores,
        metavar="CRITERION",
        help="criterion shown as each kernel's score (default: oracle_loss, the objective "
        "criterion); 'none' to skip",
    )
    parser.add_argument(
        "--score-examples",
        type=int,
        default=defaults.score_examples,
        help="validation examples the scores are computed on",
    )
    parser.add_argument(
        "--ratio",
        type=float,
        default=defaults.ratio,
        metavar="P",
        help="p, the fraction of each layer to remove: the page shows the count it means and "
        "offers to select that many of the lowest scores (default: the paper's 0.05)",
    )
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--out", default=defaults.out, help="output folder")
    parser.add_argument(
        "--standin",
        type=int,
        default=None,
        metavar="COUNT",
        help="also write a scripted stand-in's selection of COUNT kernels per layer",
    )
    parser.add_argument(
        "--functionality",
        action="store_true",
        help="also write the functionality report and link it from index.html",
    )
    parser.add_argument("--data-dir", default=None, help="prepared TFDS data dir")
    parser.add_argument(
        "--no-progress", action="store_true", help="no progress bar (e.g. in log files)"
    )
    parser.set_defaults(func=_from_args)
    return parser
