"""Multi-label and regression targets, read from the records `probekit.data` has checked.

**Multi-label** rows say which of L labels apply, in one of two forms:

- one column per label (``data.label_fields: [hate, violence, ...]``), each cell ``0``/``1``,
  ``true``/``false`` or ``null`` (unknown: the label is *missing* for that row, and that cell adds
  nothing to the loss, its gradient or the metrics). In CSV an empty cell is unknown;
- a list of the label names that apply (``"labels": ["hate", "violence"]``, ``[]`` for none) in
  ``data.label_field``, every other label then known to be absent; in CSV, names joined by ``|``.

A row's target is a tuple of L floats: ``1.0``, ``0.0`` or ``nan`` (unknown). The labels, and
their order, are ``data.label_fields``, or ``data.label_map``, or the names found, sorted.

**Regression** rows hold a number in ``data.label_field`` (a CSV cell that parses as one); a
row's target is a float.

Every problem is a `probekit.data.DataError` naming ``file:line`` and the field.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from probekit.errors import DataError, did_you_mean

if TYPE_CHECKING:
    from probekit.data import DataSpec, _Source

UNKNOWN = math.nan
"""A multi-label cell whose value the data does not give."""

_TRUE = {"1", "true"}
_FALSE = {"0", "false"}


def _error(message: str) -> Exception:
    return DataError(message)


def _cell(value: Any, where: str, field: str) -> float:
    """One multi-label cell: 1.0, 0.0, or `UNKNOWN` for null (an empty CSV cell)."""
    if value is None:
        return UNKNOWN
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    if isinstance(value, (int, float)) and value in (0, 1):
        return float(value)
    if isinstance(value, str):
        text = value.strip().lower()
        if not text:
            return UNKNOWN
        if text in _TRUE or text in _FALSE:
            return 1.0 if text in _TRUE else 0.0
    raise _error(f"{where}: field {field!r}: {value!r} is not 0, 1, true, false or null (unknown)")


def _names(value: Any, where: str, field: str, csv: bool) -> list[str]:
    """The label names a row lists."""
    if csv and isinstance(value, str):
        return [name.strip() for name in value.split("|") if name.strip()]
    if value is None:
        raise _error(
            f"{where}: field {field!r} is null; give the list of labels that apply ([] for none), "
            "or one column per label with data.label_fields for unknown values"
        )
    if not isinstance(value, list) or not all(isinstance(name, str) and name for name in value):
        raise _error(
            f"{where}: field {field!r}: expected a list of label names, got {_short(value)} (or set "
            "data.label_fields to the columns that hold one label each)"
        )
    return list(value)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def multilabel_targets(
    sources: Sequence[_Source], spec: DataSpec
) -> tuple[list[list[tuple[float, ...]]], dict[str, int]]:
    """Each source's rows as tuples of L cells, and the label map (label name -> column)."""
    if spec.label_fields is not None:
        fields = list(spec.label_fields)
        rows = [
            [
                tuple(_cell(cell, source.where(i), field) for cell, field in zip(cells, fields, strict=True))
                for i, cells in enumerate(source.labels)
            ]
            for source in sources
        ]
        return rows, {name: index for index, name in enumerate(fields)}
    field = spec.label_field
    lists = [
        [_names(raw, source.where(i), field, source.fmt == "csv") for i, raw in enumerate(source.labels)]
        for source in sources
    ]
    if spec.label_map is not None:
        label_map = dict(spec.label_map)
        for source, names in zip(sources, lists, strict=True):
            for i, row in enumerate(names):
                for name in row:
                    if name not in label_map:
                        hint = did_you_mean(name, list(label_map))
                        raise _error(
                            f"{source.where(i)}: field {field!r}: label {name!r} is not in data.label_map"
                            + (f"; {hint}" if hint else "")
                        )
    else:
        found = sorted({name for names in lists for row in names for name in row})
        if not found:
            raise _error(f"{sources[0].path}: field {field!r}: no row names a label; nothing to learn")
        label_map = {name: index for index, name in enumerate(found)}
    order = sorted(label_map, key=label_map.__getitem__)
    rows = [[tuple(1.0 if name in set(row) else 0.0 for name in order) for row in names] for names in lists]
    return rows, label_map


def regression_targets(sources: Sequence[_Source], spec: DataSpec) -> list[list[float]]:
    """Each source's targets as floats."""
    field = spec.label_field
    out: list[list[float]] = []
    for source in sources:
        values: list[float] = []
        for i, raw in enumerate(source.labels):
            value: Any = raw
            if isinstance(raw, str):
                try:
                    value = float(raw.strip())
                except ValueError:
                    value = raw
            if value is None:
                raise _error(f"{source.where(i)}: field {field!r} is null; every record needs a target")
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise _error(f"{source.where(i)}: field {field!r}: target {_short(raw)} is not a number")
            if not math.isfinite(value) or abs(value) > 1e30:
                raise _error(f"{source.where(i)}: field {field!r}: target {raw!r} is not a finite number")
            values.append(float(value))
        out.append(values)
    return out


def check_multilabel_train(rows: Sequence[tuple[float, ...]], label_map: dict[str, int], where: str) -> None:
    """Every label needs a known positive and a known negative row in train."""
    for name, column in label_map.items():
        cells = [row[column] for row in rows]
        for wanted, word in ((1.0, "positive"), (0.0, "negative")):
            if wanted not in cells:
                raise _error(
                    f"{where}: label {name!r} has no known {word} row in train; every label needs both"
                )


def check_regression_train(values: Sequence[float], where: str) -> None:
    if len(set(values)) < 2:
        raise _error(f"{where}: every train target is {values[0]!r}; a regression needs varying targets")


def multilabel_stats(
    rows: Sequence[tuple[float, ...]], label_map: dict[str, int]
) -> dict[int, dict[str, int]]:
    """Per label column: positive, negative and unknown rows."""
    stats: dict[int, dict[str, int]] = {}
    for column in label_map.values():
        cells = [row[column] for row in rows]
        positive = sum(1 for c in cells if c == 1.0)
        negative = sum(1 for c in cells if c == 0.0)
        stats[column] = {
            "positive": positive,
            "negative": negative,
            "unknown": len(cells) - positive - negative,
        }
    return stats


def regression_stats(values: Sequence[float]) -> dict[str, float]:
    """Mean, standard deviation (population), min and max of a split's targets."""
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
    return {"mean": mean, "std": std, "min": min(values), "max": max(values)}
