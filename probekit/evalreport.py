"""``probekit eval``'s metrics as text (`probekit.evaluate.evaluate_file`'s result).

Numbers: integers (counts) as integers, other numbers with four decimals, an undefined metric
(``nan``) as ``n/a``. After one line per headline metric come, where the result holds them: the
table per class (or label), a multi-class confusion matrix, a binary probe's confusion counts,
the bootstrap intervals (``auroc 0.9123 [0.8801, 0.9402]``) and the metrics per group with the
worst groups.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

NESTED = frozenset(
    {
        "per_class",
        "per_label",
        "confusion_matrix",
        "class_names",
        "label_names",
        "confusion",
        "intervals",
        "bootstrap",
        "groups",
    }
)
"""Entries of the result shown as their own sections, not as a line each."""

GROUP_SKIPPED = frozenset({"threshold", "binary_threshold", "binary_n", "target_mean", "target_std"})
"""Headline entries the per-group table leaves out (the same in every group, or not a metric)."""

GROUP_COUNTS = frozenset({"n", "positives", "binary_positives"})
"""Columns of the per-group table that come first."""

SHORT = {
    "positives": "pos",
    "accuracy": "acc",
    "precision": "prec",
    "recall_at_1pct_fpr": "r@1%fpr",
    "recall_at_5pct_fpr": "r@5%fpr",
    "binary_recall_at_1pct_fpr": "bin_r@1%fpr",
    "binary_recall_at_5pct_fpr": "bin_r@5%fpr",
}
"""Column heads of the per-group table."""


def number(value: Any) -> str:
    """An integer as such, a finite float with four decimals, anything undefined as ``n/a``."""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    return f"{value:.4f}" if isinstance(value, float) and math.isfinite(value) else "n/a"


def _cell(value: Any) -> str:
    return number(value) if isinstance(value, (int, float)) else str(value)


def report_lines(metrics: Mapping[str, Any]) -> list[str]:
    """The whole report; see the module notes."""
    shown = {k: v for k, v in metrics.items() if k not in NESTED}
    width = max(20, *(len(key) + 1 for key in shown))
    lines = [f"{key:<{width}} {_cell(value)}" for key, value in shown.items()]
    lines += _class_table(metrics)
    lines += _matrix(metrics)
    lines += confusion_lines(metrics)
    lines += interval_lines(metrics)
    lines += group_lines(metrics)
    return lines


def _class_table(metrics: Mapping[str, Any]) -> list[str]:
    table: dict[str, dict[str, Any]] = metrics.get("per_class") or metrics.get("per_label") or {}
    if not table:
        return []
    first = max(12, *(len(name) for name in table)) + 1
    columns = {c: max(10, len(c) + 1) for c in next(iter(table.values()))}
    counts = {"support", "known"}
    head = "class" if "per_class" in metrics else "label"
    lines = ["", f"{head:<{first}}" + "".join(f"{c:>{w}}" for c, w in columns.items())]
    for name, row in table.items():
        cells = "".join(
            f"{int(row[c]):>{w}}" if c in counts else f"{number(row.get(c)):>{w}}" for c, w in columns.items()
        )
        lines.append(f"{name:<{first}}{cells}")
    return lines


def _matrix(metrics: Mapping[str, Any]) -> list[str]:
    matrix = metrics.get("confusion_matrix")
    if not matrix:
        return []
    names = [str(n) for n in metrics.get("class_names") or range(len(matrix))]
    first, cell = max(len(n) for n in names) + 1, max(6, *(len(n) + 1 for n in names))
    lines = ["", "confusion matrix (rows: true, columns: predicted)"]
    lines.append(" " * first + "".join(f"{n:>{cell}}" for n in names))
    lines += [f"{names[i]:<{first}}" + "".join(f"{c:>{cell}}" for c in row) for i, row in enumerate(matrix)]
    return lines


def confusion_lines(metrics: Mapping[str, Any]) -> list[str]:
    """A binary probe's counts at its threshold: rows the true class, columns the decision."""
    counts = metrics.get("confusion")
    if not counts:
        return []
    cells = [[f"TP {counts['tp']}", f"FN {counts['fn']}"], [f"FP {counts['fp']}", f"TN {counts['tn']}"]]
    cell = max(14, *(len(c) + 2 for row in cells for c in row))
    return [
        "",
        f"confusion at threshold {number(metrics.get('threshold'))}",
        f"{'':<10}" + f"{'predicted 1':>{cell}}" + f"{'predicted 0':>{cell}}",
        f"{'true 1':<10}" + "".join(f"{c:>{cell}}" for c in cells[0]),
        f"{'true 0':<10}" + "".join(f"{c:>{cell}}" for c in cells[1]),
    ]


def interval_lines(metrics: Mapping[str, Any]) -> list[str]:
    """``metric point [lo, hi]`` per bootstrap interval (``n/a`` where undefined)."""
    intervals: Mapping[str, Sequence[float] | None] = metrics.get("intervals") or {}
    if not intervals:
        return []
    settings = metrics.get("bootstrap") or {}
    level = round(100 * float(settings.get("level", 0.95)))
    lines = [
        "",
        f"{level}% bootstrap intervals ({settings.get('resamples')} resamples of the rows, "
        f"seed {settings.get('seed')})",
    ]
    width = max(20, *(len(key) + 1 for key in intervals))
    for key, bounds in intervals.items():
        point = number(metrics.get(key))
        shown = f"{point} [{number(bounds[0])}, {number(bounds[1])}]" if bounds and point != "n/a" else point
        lines.append(f"{key:<{width}} {shown}")
    return lines


def group_lines(metrics: Mapping[str, Any]) -> list[str]:
    """Every headline metric per group (a table), then the worst groups by the ranking metric."""
    groups = metrics.get("groups")
    if not groups:
        return []
    by_value: Mapping[str, Mapping[str, Any]] = groups["by_value"]
    numbers = [
        key
        for key, value in next(iter(by_value.values())).items()
        if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in GROUP_SKIPPED
    ]
    columns = sorted(numbers, key=lambda key: key not in GROUP_COUNTS)  # the counts first
    first = max(12, *(len(name) + 1 for name in by_value))
    widths = {key: max(8, len(SHORT.get(key, key)) + 1) for key in columns}
    lines = [
        "",
        f"by {groups['field']} ({len(by_value)} groups)",
        f"{'group':<{first}}" + "".join(f"{SHORT.get(k, k):>{w}}" for k, w in widths.items()),
    ]
    for name, row in by_value.items():
        lines.append(f"{name:<{first}}" + "".join(f"{number(row.get(k)):>{w}}" for k, w in widths.items()))
    metric = groups["metric"]
    lines += ["", f"worst groups by {metric}"]
    worst: list[Mapping[str, Any]] = groups["worst"]
    if not worst:
        return [*lines, f"none: {metric} is n/a in every group"]
    lines.append(f"{'group':<{first}}{'n':>8}{metric:>{max(10, len(metric) + 2)}}")
    lines += [
        f"{row['group']:<{first}}{row['n']:>8}{number(row[metric]):>{max(10, len(metric) + 2)}}"
        for row in worst
    ]
    undefined = sum(1 for row in by_value.values() if number(row.get(metric)) == "n/a")
    if undefined:
        lines.append(f"({undefined} group{'s' if undefined > 1 else ''} with {metric} n/a left out)")
    return lines
