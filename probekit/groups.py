"""Metrics per group of rows (``probekit eval --by FIELD``) and the worst groups.

A row's group is the value its raw record holds in the field (a string as is; a number, a
boolean or anything else as its JSON text); a record without the field, or with ``null`` there,
is in the group `MISSING`. The groups are ranked by one metric (`ranking_metric`); a group where
it is undefined (one class only: ``nan``) is left out of the ranking.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from probekit.errors import UserError, did_you_mean

MISSING = "(missing)"
"""The group of a record without the field (or with ``null`` in it)."""

WORST_SHOWN = 5
"""How many of the worst groups the ranking keeps."""

LOWER_IS_BETTER = frozenset({"loss", "mae", "rmse", "log_loss", "ece", "hamming_loss"})
"""Metrics where a lower value is better (the worst group has the highest)."""


def _group_of(record: Mapping[str, Any], field: str) -> str:
    value = record.get(field)
    if value is None:
        return MISSING
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)


def group_values(path: Path, records: Sequence[tuple[int, Mapping[str, Any]]], field: str) -> list[str]:
    """Each record's group by ``field``; a `UserError` naming the file and the fields it has
    when no record holds ``field``."""
    if not any(field in record for _, record in records):
        found = list(dict.fromkeys(str(key) for _, record in records for key in record))
        hint = did_you_mean(field, found)
        raise UserError(
            f"{path}: --by {field!r}: no row has this field (fields: {', '.join(found[:30])}"
            f"{', ...' if len(found) > 30 else ''})" + (f"; {hint}" if hint else "")
        )
    return [_group_of(record, field) for _, record in records]


def ranking_metric(monitor: str, metrics: Mapping[str, Any]) -> str:
    """The metric the groups are ranked by: the run's ``train.monitor`` when the metrics hold it
    (not ``loss``, which an evaluation does not compute), else ``auroc``, else the first number."""
    for key in (monitor, "auroc"):
        if isinstance(metrics.get(key), float):
            return key
    return next(key for key, value in metrics.items() if isinstance(value, float))


def per_group(
    groups: Sequence[str], compute: Callable[[np.ndarray], dict[str, Any]]
) -> dict[str, dict[str, Any]]:
    """``compute(row indices)`` for each group, the groups in sorted order."""
    members: dict[str, list[int]] = {}
    for index, name in enumerate(groups):
        members.setdefault(name, []).append(index)
    return {name: compute(np.asarray(members[name], dtype=np.int64)) for name in sorted(members)}


def worst(by_group: Mapping[str, Mapping[str, Any]], metric: str) -> list[dict[str, Any]]:
    """Up to `WORST_SHOWN` groups with ``metric`` defined, worst first (ties: the larger group
    first, then by name): ``{"group", "n", metric}`` each."""
    sign = 1.0 if metric in LOWER_IS_BETTER else -1.0  # badness: higher is worse
    ranked = sorted(
        (
            (sign * float(m[metric]), int(m.get("n", 0)), name)
            for name, m in by_group.items()
            if isinstance(m.get(metric), float) and not math.isnan(m[metric])
        ),
        key=lambda item: (-item[0], -item[1], item[2]),
    )
    return [{"group": name, "n": size, metric: sign * badness} for badness, size, name in ranked][
        :WORST_SHOWN
    ]
