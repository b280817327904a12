"""How closely each criterion ranks channels like the oracle: Spearman rho per layer and pooled.

Molchanov et al. (ICLR 2017, Table 1) judge a criterion by the Spearman rank correlation of its
scores with the absolute oracle (`oracle_abs`: ``|C(without c) - C|``), computed

- per layer: within each channel group, then averaged over the groups ("per layer");
- over all layers pooled, on the raw scores ("all layers");
- over all layers pooled after per-layer L2 normalisation of both the criterion and the oracle
  ("all layers, L2"), the form a global ranking uses; the paper does not say whether the oracle
  was normalised too, so the report also gives the pooled value with only the criterion
  normalised and the oracle raw ("L2 crit").

Beside every table, the oracle's own split-half reliability per layer (`reliability`): the
oracle is scored on the two halves of the images and the halves' rankings are correlated. It
caps what any criterion can reach against this oracle (about ``sqrt`` of the Spearman-Brown
reliability); a criterion near that ceiling is as good as the measurement can show.

`criteria_report` scores the criteria and the oracle on the same batches and returns a `Report`
(a printable table, CSV, JSON); `compare_scores` does the same from scores already computed, and
`write_report` writes the files and a per-layer heatmap (PNG and PDF). The `jaxprune score` command
(`jaxprune.commands.score`) runs it on a model and the validation split::

  context = ScoringContext(model.apply, channel_graph(model.apply, variables, x))
  report = criteria_report(context, variables, batches, ["taylor", "l1", "activation_mean"])
  print(report.table())
  report["taylor"].mean_per_layer

A criterion that leaves some groups out (BatchNorm criteria on groups without BatchNorm) is
judged on the groups it scores, and the table says how many those are. A correlation with a
group whose scores are all equal is undefined (NaN); the per-layer mean skips such groups.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import textwrap
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm.auto import tqdm

from jaxprune.criteria.base import Batch, Scores, ScoringContext, iter_batches
from jaxprune.criteria.rank_correlation import spearman
from jaxprune.criteria.registry import CRITERIA
from jaxprune.criteria.reliability import SPLITTABLE, SplitHalf, oracle_by_halves
from jaxprune.criteria.scoring import score
from jaxprune.criteria.transforms import normalize_l2

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# The reference rankings themselves: never judged against each other by default.
ORACLES = ("oracle_abs", "oracle_loss")
SCOPES = ("conv", "all")
# Output files of `write_report`, inside the workdir.
CSV_NAME = "criteria_quality.csv"
JSON_NAME = "criteria_quality.json"
PNG_NAME = "criteria_quality.png"

# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CriterionQuality:
    """One criterion against the oracle.

    Attributes:
      name: the criterion's name.
      per_layer: per group it scores, rho with the oracle (NaN when either is constant there).
      mean_per_layer: the mean of the defined per-layer values.
      all_layers: rho over the pooled raw scores of its groups.
      all_layers_l2: rho over the pooled scores after per-layer L2 normalisation of both.
      all_layers_l2_criterion: rho over the pooled scores after per-layer L2 normalisation of
        the criterion only (the oracle's raw scores).
      seconds: wall time of scoring (compilation included), when it was measured.
    """

    name: str
    per_layer: Mapping[str, float]
    mean_per_layer: float
    all_layers: float
    all_layers_l2: float
    all_layers_l2_criterion: float = math.nan
    seconds: float | None = None

    @property
    def groups(self) -> tuple[str, ...]:
        """The groups this criterion was judged on."""
        return tuple(self.per_layer)


@dataclasses.dataclass(frozen=True)
class Report:
    """Every criterion against the oracle, over the same groups and data.

    Attributes:
      oracle: the reference ranking's name.
      sizes: per judged group, its channel count (in graph order).
      rows: one `CriterionQuality` per criterion, in the order asked.
      scores: per criterion (and the oracle), the scores of the judged groups.
      examples: how many examples were scored (None when unknown).
      oracle_seconds: wall time of the oracle, when measured.
      oracle_reliability: the oracle's split-half reliability per layer, when it was scored in
        halves (`criteria_report` with at least two batches).
    """

    oracle: str
    sizes: Mapping[str, int]
    rows: tuple[CriterionQuality, ...]
    scores: Mapping[str, Scores]
    examples: int | None = None
    oracle_seconds: float | None = None
    oracle_reliability: SplitHalf | None = None

    @property
    def groups(self) -> tuple[str, ...]:
        """The judged groups, in graph order."""
        return tuple(self.sizes)

    @property
    def names(self) -> tuple[str, ...]:
        """The criteria, in report order."""
        return tuple(row.name for row in self.rows)

    def __getitem__(self, name: str) -> CriterionQuality:
        for row in self.rows:
            if row.name == name:
                return row
        raise KeyError(f"No criterion {name!r} in this report; it has {list(self.names)}.")

    def table(self) -> str:
        """The report as a fixed-width text table, with a legend."""
        width = max([9, *(len(n) for n in self.names)])
        cell = {g: max(7, len(g) + 1) for g in self.groups}
        head = f"{'criterion':<{width}}"
        for group in self.groups:
            head += f"{group:>{cell[group]}}"
        head += f"{'mean':>7}{'all':>7}{'all L2':>7}{'L2 crit':>8}{'layers':>7}{'s':>6}"
        lines = [head, "-" * len(head)]
        for row in self.rows:
            line = f"{row.name:<{width}}"
            for group in self.groups:
                line += f"{_cell(row.per_layer.get(group), group in row.per_layer):>{cell[group]}}"
            line += f"{_cell(row.mean_per_layer):>7}{_cell(row.all_layers):>7}"
            line += f"{_cell(row.all_layers_l2):>7}{_cell(row.all_layers_l2_criterion):>8}"
            line += f"{f'{len(row.groups)}/{len(self.groups)}':>7}"
            line += f"{'' if row.seconds is None else f'{row.seconds:.1f}':>6}"
            lines.append(line)
        sizes = ", ".join(f"{g} {n}" for g, n in self.sizes.items())
        seen = "" if self.examples is None else f", {self.examples} examples"
        notes = [
            f"Spearman rank correlation with {self.oracle}{seen}; channels per group: {sizes}.",
            "mean: mean of the per-layer values; all: all layers pooled, raw scores; all L2: all "
            "layers pooled after per-layer L2 normalisation of both; L2 crit: pooled after "
            "normalising the criterion only (the oracle raw).",
            "layers: groups the criterion scores (a '-' cell: it does not score that group, and "
            "its pooled values cover only the groups it scores); nan: constant scores in a group.",
        ]
        if self.oracle_seconds is not None:
            notes.append(
                f"s: seconds to score (with compilation); the oracle took "
                f"{self.oracle_seconds:.1f} s."
            )
        legend = [""] + [line for note in notes for line in textwrap.wrap(note, 96)]
        return "\n".join(lines + legend + self._reliability_lines(width))

    def _reliability_lines(self, width: int) -> list[str]:
        """The oracle's split-half reliability, whole-sample reliability and ceiling per layer,
        aligned under the table's layer columns (`width`: the criterion column's)."""
        if self.oracle_reliability is None:
            return []
        reliability = self.oracle_reliability
        lines = [""]
        for label, values in (
            ("halves", reliability.per_layer),
            ("whole", reliability.whole),
            ("ceiling", reliability.ceiling),
        ):
            line = f"{label:<{width}}"
            for group in self.groups:
                line += f"{_cell(values.get(group)):>{max(7, len(group) + 1)}}"
            lines.append(line)
        a, b = reliability.examples
        note = (
            f"Reliability of {self.oracle} itself: halves = Spearman between the oracle on "
            f"two halves of the data ({a} and {b} examples); whole = its Spearman-Brown "
            f"reliability on all {a + b}; ceiling = sqrt(whole), about the highest rho a "
            "perfect criterion reaches against this oracle. Use more images while the ceiling "
            "is low."
        )
        return lines + [""] + textwrap.wrap(note, 96)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready description: the correlations, the group sizes and every score."""
        return {
            "oracle": self.oracle,
            "examples": self.examples,
            "oracle_seconds": self.oracle_seconds,
            "oracle_reliability": (
                None if self.oracle_reliability is None else self.oracle_reliability.to_dict()
            ),
            "groups": dict(self.sizes),
            "criteria": [
                {
                    "name": row.name,
                    "groups": list(row.groups),
                    "per_layer": {g: _json_float(v) for g, v in row.per_layer.items()},
                    "mean_per_layer": _json_float(row.mean_per_layer),
                    "all_layers": _json_float(row.all_layers),
                    "all_layers_l2": _json_float(row.all_layers_l2),
                    "all_layers_l2_criterion": _json_float(row.all_layers_l2_criterion),
                    "seconds": row.seconds,
                }
                for row in self.rows
            ],
            "scores": {
                name: {g: [float(v) for v in s] for g, s in by_group.items()}
                for name, by_group in self.scores.items()
            },
        }

    def to_csv(self) -> str:
        """One CSV row per criterion: per-layer values, the three summaries, groups, seconds."""
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(
            [
                "criterion",
                *self.groups,
                "mean_per_layer",
                "all_layers",
                "all_layers_l2",
                "all_layers_l2_criterion",
                "groups_scored",
                "seconds",
            ]
        )
        for row in self.rows:
            writer.writerow(
                [
                    row.name,
                    *(_csv_float(row.per_layer.get(g)) for g in self.groups),
                    _csv_float(row.mean_per_layer),
                    _csv_float(row.all_layers),
                    _csv_float(row.all_layers_l2),
                    _csv_float(row.all_layers_l2_criterion),
                    len(row.groups),
                    "" if row.seconds is None else f"{row.seconds:.2f}",
                ]
            )
        return buffer.getvalue()


def _cell(value: float | None, present: bool = True) -> str:
    if not present or value is None:
        return "-"
    return "nan" if math.isnan(value) else f"{value:.3f}"


def _csv_float(value: float | None) -> str:
    if value is None:
        return ""
    return "nan" if math.isnan(value) else f"{value:.6f}"


def _json_float(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


def _pooled(scores: Mapping[str, np.ndarray], groups: Sequence[str]) -> np.ndarray:
    return np.concatenate([np.asarray(scores[g], np.float64) for g in groups])


def _checked(name: str, scores: Mapping[str, Any], sizes: Mapping[str, int]) -> Scores:
    """The scores of the judged groups a criterion covers, checked for shape and NaN."""
    kept = {}
    for group, size in sizes.items():
        if group not in scores:
            continue
        values = np.asarray(scores[group], np.float64).reshape(-1)
        if values.shape != (size,):
            raise ValueError(
                f"{name!r} gives {values.size} scores for group {group!r}, which has {size} "
                "channels; a criterion must give one score per channel."
            )
        if np.isnan(values).any():
            raise ValueError(
                f"{name!r} gives NaN scores in group {group!r}; fix the criterion (or its data) "
                "before judging it."
            )
        kept[group] = values
    return kept


def compare_scores(
    scores: Mapping[str, Mapping[str, Any]],
    oracle_scores: Mapping[str, Any],
    sizes: Mapping[str, int],
    *,
    oracle: str = "oracle_abs",
    examples: int | None = None,
    seconds: Mapping[str, float] | None = None,
    oracle_seconds: float | None = None,
    oracle_reliability: SplitHalf | None = None,
) -> Report:
    """Judges scores already computed against the oracle's (pure; no model involved).

    Args:
      scores: per criterion name, its ``{group: scores}``.
      oracle_scores: the oracle's ``{group: scores}``; it must cover every judged group.
      sizes: the judged groups and their channel counts, in the order to report them.
      oracle: the oracle's name, for the table.
      examples: how many examples were scored, for the table.
      seconds: per criterion, the time it took to score.
      oracle_seconds: the time the oracle took.
      oracle_reliability: the oracle's split-half reliability, when measured.

    Returns:
      The report, rows in the order of `scores`.

    Raises:
      ValueError: no groups, the oracle misses a group, or scores of the wrong shape or with
        NaN. (A criterion that scores none of the groups gets a row of NaN.)
    """
    if not sizes:
        raise ValueError("No groups to judge: pass the channel groups to compare (sizes).")
    reference = _checked(oracle, oracle_scores, sizes)
    missing = [g for g in sizes if g not in reference]
    if missing:
        raise ValueError(
            f"The oracle {oracle!r} has no scores for groups {missing}; score it on every "
            "judged group."
        )
    seconds = seconds or {}
    rows, kept_scores = [], {}
    for name, by_group in scores.items():
        mine = _checked(name, by_group, sizes)
        rows.append(_quality(name, mine, reference, seconds.get(name)))
        kept_scores[name] = mine
    kept_scores[oracle] = reference
    return Report(
        oracle=oracle,
        sizes=dict(sizes),
        rows=tuple(rows),
        scores=kept_scores,
        examples=examples,
        oracle_seconds=oracle_seconds,
        oracle_reliability=oracle_reliability,
    )


def _rho(a: np.ndarray, b: np.ndarray) -> float:
    return spearman(a, b) if a.size >= 2 else math.nan


def _quality(name: str, mine: Scores, reference: Scores, seconds: float | None) -> CriterionQuality:
    """Judges one criterion on the groups it scores."""
    groups = list(mine)
    per_layer = {g: _rho(mine[g], reference[g]) for g in groups}
    defined = [v for v in per_layer.values() if not math.isnan(v)]
    if not groups:
        return CriterionQuality(name, {}, math.nan, math.nan, math.nan, seconds=seconds)
    mine_l2 = normalize_l2(mine)
    reference_l2 = normalize_l2({g: reference[g] for g in groups})
    return CriterionQuality(
        name=name,
        per_layer=per_layer,
        mean_per_layer=float(np.mean(defined)) if defined else math.nan,
        all_layers=_rho(_pooled(mine, groups), _pooled(reference, groups)),
        all_layers_l2=_rho(_pooled(mine_l2, groups), _pooled(reference_l2, groups)),
        all_layers_l2_criterion=_rho(_pooled(mine_l2, groups), _pooled(reference, groups)),
        seconds=seconds,
    )


def default_criteria() -> tuple[str, ...]:
    """Every registered criterion except the oracles, in registry order."""
    return tuple(name for name in CRITERIA if name not in ORACLES)


def judged_groups(context: ScoringContext, scope: str = "conv") -> dict[str, int]:
    """The groups a report judges: those produced by convolutions, or all ("all").

    Raises:
      ValueError: an unknown scope, or no group in it.
    """
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}.")
    sizes = {g.name: g.size for g in context.graph.groups if scope == "all" or g.kind == "conv"}
    if not sizes:
        raise ValueError(
            f"The model has no {'convolution ' if scope == 'conv' else ''}channel groups to "
            "judge; use scope='all' for a model without convolutions."
        )
    return sizes


def criteria_report(
    context: ScoringContext,
    variables: Any,
    batches: Iterable[Batch] | Batch,
    criteria_names: Sequence[str],
    *,
    oracle: str = "oracle_abs",
    scope: str = "conv",
    options: Mapping[str, Mapping[str, Any]] | None = None,
    progress: bool = False,
    on_scored: Callable[[CriterionQuality], None] | None = None,
) -> Report:
    """Scores each criterion and the oracle on the same batches, and compares their rankings.

    Args:
      context: the model, its graph and the loss.
      variables: the model variables.
      batches: one batch or an iterable of batches ({"image", "label"}); they are held in
        memory, since every criterion reads them all.
      criteria_names: registry names of the criteria to judge (see `default_criteria`).
      oracle: the registry name of the reference ranking ("oracle_abs", as in the paper).
      scope: "conv" judges the groups produced by convolutions; "all" adds dense layers.
      options: per criterion name (or the oracle's), keyword options of its constructor,
        e.g. ``{"random": {"seed": 1}, "oracle_abs": {"batch_size": 4}}``.
      progress: a progress bar over the oracle and the criteria (with a total and an ETA).
      on_scored: called with each criterion's judgement as soon as it is scored (e.g. to log
        it while the others are still running).

    Returns:
      The report.

    Raises:
      ValueError: no criteria, a repeated name, an unknown scope, no batches, or bad scores.
      KeyError: an unknown criterion name.
    """
    names = list(criteria_names)
    if not names:
        raise ValueError(f"Name at least one criterion to judge, e.g. {list(default_criteria())}.")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"Criteria {repeated} are named more than once; name each once.")
    unknown = [n for n in [*names, oracle] if n not in CRITERIA]
    if unknown:
        raise KeyError(f"Unknown criteria {unknown}; known: {', '.join(CRITERIA)}.")
    options = dict(options or {})
    sizes = judged_groups(context, scope)
    held = list(iter_batches(batches))
    if not held:
        raise ValueError("criteria_report needs at least one batch of validation data.")
    examples = int(sum(np.shape(b["label"])[0] for b in held))

    oracle_options = dict(options.get(oracle, {}))
    if oracle in ORACLES:
        # The built-in oracles can skip groups not judged (the dense layers under scope="conv").
        oracle_options.setdefault("groups", tuple(sizes))
    bar = tqdm(total=1 + len(names), desc="scoring", unit="criterion", disable=not progress)
    bar.set_postfix_str(oracle)
    start = time.perf_counter()
    reliability = None
    if oracle in SPLITTABLE and len(held) >= 2:
        # The same cost as one pass, and the report can say how far the oracle itself is
        # reproducible.
        oracle_scores, reliability = oracle_by_halves(
            oracle, context, variables, held, **oracle_options
        )
    else:
        oracle_scores = score(oracle, context, variables, held, **oracle_options)
    oracle_seconds = time.perf_counter() - start
    bar.update()

    scores, seconds = {}, {}
    for name in names:
        bar.set_postfix_str(name)
        start = time.perf_counter()
        scores[name] = score(name, context, variables, held, **options.get(name, {}))
        seconds[name] = time.perf_counter() - start
        if on_scored is not None:
            mine = _checked(name, scores[name], sizes)
            on_scored(_quality(name, mine, _checked(oracle, oracle_scores, sizes), seconds[name]))
        bar.update()
    bar.close()
    return compare_scores(
        scores,
        oracle_scores,
        sizes,
        oracle=oracle,
        examples=examples,
        seconds=seconds,
        oracle_seconds=oracle_seconds,
        oracle_reliability=reliability,
    )


# ---------------------------------------------------------------------------------------------
# Files: CSV, JSON, and a per-layer heatmap
# ---------------------------------------------------------------------------------------------


def plot_report(report: Report, path: str | Path, *, title: str = "") -> dict[str, Path]:
    """Writes `report_figure` as PNG and PDF (`jaxprune.figures.save_figure`).

    Args:
      report: the report.
      path: the PNG to write; the PDF goes next to it.
      title: a title line (e.g. the model and data).

    Returns:
      {"png": path, "pdf": path}.
    """
    from jaxprune.figures import save_figure

    return save_figure(report_figure(report, title=title), path)


def report_figure(report: Report, *, title: str = "") -> Figure:
    """A heatmap of rho per criterion (rows) and layer (columns), plus the three summaries.

    Cells a criterion does not score are grey ("n/a"); cells where rho is undefined (constant
    scores in that layer) are grey too ("const."). A criterion that scores none of the judged
    layers gets no row; a note under the map names it.

    Args:
      report: the report.
      title: a title line (e.g. the model and data).

    Returns:
      The figure.
    """
    import matplotlib

    from jaxprune.figures import new_figure

    rows = [row for row in report.rows if row.groups]
    left_out = [row.name for row in report.rows if not row.groups]
    columns = [*report.groups, "mean", "all", "all L2", "L2 crit"]
    grid = np.full((len(rows), len(columns)), np.nan)
    for i, row in enumerate(rows):
        for j, group in enumerate(report.groups):
            grid[i, j] = row.per_layer.get(group, np.nan)
        grid[i, len(report.groups) :] = (
            row.mean_per_layer,
            row.all_layers,
            row.all_layers_l2,
            row.all_layers_l2_criterion,
        )
    height = 1.9 + 0.3 * max(1, len(rows)) + (0.3 if left_out else 0.0)
    figure = new_figure(2.4 + 0.62 * len(columns), height)
    ax = figure.add_subplot()
    seen = "" if report.examples is None else f", {report.examples} examples"
    heading = f"Spearman rank correlation with {report.oracle}{seen}"
    ax.set_title((title + "\n" if title else "") + heading, fontsize=10)
    if not rows:
        ax.text(0.5, 0.5, "no criterion scores a judged layer", ha="center", va="center")
        ax.set_axis_off()
        return figure
    cmap = matplotlib.colormaps["RdBu_r"].with_extremes(bad="0.85")
    image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=-1, vmax=1, aspect="auto")
    for i, row in enumerate(rows):
        for j in range(len(columns)):
            scored = j >= len(report.groups) or report.groups[j] in row.per_layer
            value = grid[i, j]
            text = "n/a" if not scored else "const." if np.isnan(value) else f"{value:.2f}"
            shade = "white" if np.isfinite(value) and abs(value) > 0.6 else "black"
            ax.text(j, i, text, ha="center", va="center", fontsize=7, color=shade)
    ax.axvline(len(report.groups) - 0.5, color="black", linewidth=1.5)
    ax.set_xticks(range(len(columns)), columns, rotation=45, ha="right")
    ax.set_yticks(range(len(rows)), [row.name for row in rows])
    ax.set_xlabel("layer (channel group) | summary over layers")
    ax.set_ylabel("criterion")
    bar = figure.colorbar(image, ax=ax, pad=0.02)
    bar.set_label("Spearman \u03c1 (unitless, -1 to 1)")
    notes = ["grey: n/a = the criterion does not score that layer; const. = constant scores"]
    if left_out:
        notes.append(f"not shown (score no judged layer): {', '.join(left_out)}")
    figure.supxlabel("\n".join(notes), fontsize=7, color="0.3", x=0.01, ha="left")
    return figure


def write_report(
    report: Report,
    workdir: str | Path,
    *,
    title: str = "",
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Path]:
    """Writes the CSV, the JSON (with `extra` under "run") and the PNG into `workdir`.

    Args:
      report: the report.
      workdir: the folder (created when missing).
      title: the plot's title line.
      extra: JSON-ready facts about the run (model file, data, timing).

    Returns:
      {"csv": path, "json": path, "png": path, "pdf": path}.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    paths = {"csv": workdir / CSV_NAME, "json": workdir / JSON_NAME, "png": workdir / PNG_NAME}
    paths["csv"].write_text(report.to_csv())
    document = {"run": dict(extra or {}), **report.to_dict()}
    paths["json"].write_text(json.dumps(document, indent=1) + "\n")
    paths.update(plot_report(report, paths["png"], title=title))
    return paths
