"""Evaluating a trained run on a labelled file, and reading texts to predict."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple, cast

import numpy as np

from probekit.data import FORMAT_SUFFIXES, DataError, Target, read_records, read_split
from probekit.errors import UserError, did_you_mean

COUNT_KEYS = frozenset({"n", "positives", "binary_n", "binary_positives", "support", "known"})
"""Metrics that count rows: integers in an evaluation's result (the metric functions give floats)."""


class Evaluation(NamedTuple):
    """What `evaluate_file` returns: the metrics, and where the metrics and the per-row
    predictions were written (None where they could not be)."""

    metrics: dict[str, Any]
    written: Path | None
    predictions: Path | None


def evaluate_file(
    run: str | Path,
    data: str | Path,
    trust_remote_code: bool = False,
    *,
    by: str | None = None,
    threshold: float | None = None,
    resamples: int = 1000,
    seed: int = 0,
) -> Evaluation:
    """Metrics of the run's probe on a labelled file, at the run's threshold (or ``threshold``).

    The file is read once, with the run's text and label fields (or conversations, for a chat
    run), format and label map. The run folder is untrusted input and is validated whole (see
    `probekit.pretrained.load_probe`; ``trust_remote_code`` as there). The result holds the
    task's metrics (counts as integers) and ``data``; for a binary probe ``confusion`` (``tp``,
    ``fp``, ``fn``, ``tn`` at the threshold); with ``resamples > 0`` ``intervals`` (metric ->
    ``[lo, hi]``, the 95% percentile bootstrap over rows with ``seed``, `probekit.bootstrap`;
    null where undefined) and ``bootstrap`` (its settings); with ``by`` ``groups``: every metric
    per value of that field of the raw records and the worst groups (`probekit.groups`).

    The metrics are written to ``RUN/eval/<file stem>.json`` as valid JSON (an undefined metric,
    ``nan`` here, is written ``null``), and one row per input row to ``RUN/eval/<file
    stem>.predictions.jsonl`` (`prediction_rows`). Either path is None when it could not be
    written (a read-only run folder, an ``eval/`` that leads out of the run folder): one warning
    (logger ``probekit``) says why.

    Raises:
        UserError: as `probekit eval` reports it: a bad file, run or option (``--by`` naming no
            field of the file, a ``--threshold`` outside [0, 1] or on a probe without one, a
            negative ``--resamples``).
    """
    from probekit import jsonio
    from probekit.checkpoint import read_run
    from probekit.config import task_of
    from probekit.groups import group_values, per_group, ranking_metric, worst
    from probekit.pretrained import load_run
    from probekit.probe import Probe
    from probekit.runfiles import save_json_inside
    from probekit.tasks.base import Scores

    described = read_run(run)
    path, spec = Path(data), described.config.data
    task = task_of(described.config)
    _check_options(task, threshold, resamples, seed)
    records = read_records(path, spec.format, max_text_chars=spec.max_text_chars)
    groups = None if by is None else group_values(path, records, by)
    target = cast("Target", task.target)  # a task's target is one of data.Target's names
    split = read_split(path, spec, described.meta.label_map, "eval", target, records=records)
    probe, _ = load_run(run, trust_remote_code, cls=Probe)
    assert probe.task is not None
    scores = np.asarray(probe.predict_proba(split.texts), dtype=np.float64)
    labels = np.asarray(
        split.labels, dtype=np.float64 if task.target in ("multilabel", "regression") else np.int64
    )
    used = probe.threshold if threshold is None else threshold
    bound = probe.task

    def measure(rows: np.ndarray) -> dict[str, Any]:
        found = _counted(bound.metrics(Scores(labels[rows], scores[rows], 0.0), used))
        if bound.target == "binary":
            found["confusion"] = confusion(labels[rows], scores[rows], float(used))  # type: ignore[arg-type]
        return found

    metrics = measure(np.arange(len(labels)))
    confusion_counts = metrics.pop("confusion", None)
    metrics["data"] = str(path)
    if confusion_counts is not None:
        metrics["confusion"] = confusion_counts
    if resamples:
        metrics.update(_intervals(bound, labels, scores, metrics, resamples, seed))
    if groups is not None:
        by_group = per_group(groups, measure)
        metric = ranking_metric(described.config.train.monitor, metrics)
        assert by is not None
        metrics["groups"] = {
            "field": by,
            "metric": metric,
            "worst": worst(by_group, metric),
            "by_value": by_group,
        }
    written = save_json_inside(Path(run), "eval", f"{path.stem}.json", metrics, "metrics")
    if written is None:  # the same reason keeps the predictions out: one warning is enough
        return Evaluation(metrics, None, None)
    rows = prediction_rows(probe, split.texts, scores, split.labels, used, [_row_id(r) for r in records])
    lines = "".join(jsonio.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    return Evaluation(metrics, written, _save_predictions(Path(run), f"{path.stem}.predictions.jsonl", lines))


def _check_options(task: Any, threshold: float | None, resamples: int, seed: int) -> None:
    if threshold is not None:
        guarded = task.target == "multiclass" and getattr(task, "negative_class", None) is not None
        if task.target != "binary" and not guarded:
            raise UserError(
                f"--threshold {threshold:g}: a {task.kind} probe has no probability threshold to override "
                "(a binary probe has one; a multi-class one with task.negative_class too)"
            )
        if not (math.isfinite(threshold) and 0.0 <= threshold <= 1.0):
            raise UserError(f"--threshold {threshold:g}: expected a probability in [0, 1]")
    check_bootstrap(resamples, seed)


def check_bootstrap(resamples: int, seed: int) -> None:
    """``--resamples`` within 0 .. `MAX_RESAMPLES` and ``--seed`` within 0 .. 2^32-1."""
    if resamples < 0 or resamples > MAX_RESAMPLES:
        raise UserError(f"--resamples {resamples}: expected 0 (no intervals) to {MAX_RESAMPLES}")
    if not 0 <= seed < 2**32:
        raise UserError(f"--seed {seed}: expected an integer in 0 .. 2^32-1")


MAX_RESAMPLES = 100_000
"""The most bootstrap resamples ``--resamples`` takes."""


def _counted(metrics: dict[str, Any]) -> dict[str, Any]:
    """``metrics`` with every count (`COUNT_KEYS`, at any depth) an integer."""
    return {
        key: int(value)
        if key in COUNT_KEYS and isinstance(value, float) and math.isfinite(value)
        else _counted(value)
        if isinstance(value, dict)
        else value
        for key, value in metrics.items()
    }


def confusion(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, int]:
    """Binary counts at ``threshold`` (flagged when the score reaches it): tp, fp, fn, tn."""
    flagged, positive = scores >= threshold, labels == 1
    return {
        "tp": int(np.sum(flagged & positive)),
        "fp": int(np.sum(flagged & ~positive)),
        "fn": int(np.sum(~flagged & positive)),
        "tn": int(np.sum(~flagged & ~positive)),
    }


def metric_resamples(
    task: Any, labels: np.ndarray, scores: np.ndarray, resamples: int, seed: int
) -> dict[str, np.ndarray]:
    """Metric key -> its value in each bootstrap resample of the rows (`probekit.bootstrap`), for
    the metrics that get an interval: a binary probe's ranking metrics; a multi-class probe's
    macro AUROC and, with ``task.negative_class``, its guard view's (``binary_*``); none for
    other tasks. The resamples depend only on ``seed``, the row count and ``resamples``, so two
    probes scored on the same rows are resampled alike (a paired comparison)."""
    from probekit.bootstrap import BINARY_KEYS, binary_resamples, macro_auroc_resamples

    if task.target == "binary":
        drawn = binary_resamples(labels, scores, resamples, seed)
        return {key: drawn[key] for key in BINARY_KEYS}
    if task.target != "multiclass":
        return {}
    out = {"auroc": macro_auroc_resamples(labels, scores, resamples, seed)}
    if getattr(task, "negative", None) is not None:
        from probekit.multiclass_metrics import derived_binary

        drawn = binary_resamples(*derived_binary(labels, scores, task.negative), resamples, seed)
        out.update({f"binary_{key}": drawn[key] for key in BINARY_KEYS})
    return out


def _intervals(
    task: Any, labels: np.ndarray, scores: np.ndarray, metrics: dict[str, Any], resamples: int, seed: int
) -> dict[str, Any]:
    """``intervals`` and ``bootstrap`` (its settings) of the metrics `metric_resamples` covers."""
    from probekit.bootstrap import LEVEL, percentile_interval

    drawn = metric_resamples(task, labels, scores, resamples, seed)
    if not drawn:
        return {}
    intervals = {key: percentile_interval(values, metrics[key]) for key, values in drawn.items()}
    return {"intervals": intervals, "bootstrap": {"resamples": resamples, "seed": seed, "level": LEVEL}}


def _row_id(numbered: tuple[int, dict[str, Any]]) -> Any:
    """A row's ``id`` field, else its line number (JSONL, CSV) or row number (parquet), from 1."""
    number, record = numbered
    return record["id"] if "id" in record and record["id"] is not None else number


def prediction_rows(
    probe: Any,
    texts: Sequence[str],
    scores: np.ndarray,
    labels: Sequence[Any],
    threshold: Any,
    ids: Sequence[Any],
) -> list[dict[str, Any]]:
    """One row per text: ``id``, ``text``, ``label`` (the true one), the task's scores as
    ``predict`` gives them (binary: ``probability``, ``confidence``, ``probabilities`` by label;
    multi-class: ``confidence``, ``probabilities``, and with a negative class ``score`` and
    ``flagged``; multi-label: ``probabilities``; regression: ``value``) and ``decision`` (the
    predicted label at ``threshold``; multi-label: the list of predicted labels; none for a
    regression)."""
    task = probe.task
    names = list(probe.label_names)
    given = scores.tolist() if task.target == "binary" else scores
    rows = task.predictions(list(texts), given, threshold, names)
    out: list[dict[str, Any]] = []
    for row_id, text, label, row in zip(ids, texts, labels, rows, strict=True):
        decision = row.pop("labels" if task.target == "multilabel" else "label", None)
        row.pop("text", None)
        shown: dict[str, Any] = {
            "id": row_id,
            "text": str(text),
            "label": _true_label(task.target, label, names),
        }
        shown.update(row)
        if task.target != "regression":
            shown["decision"] = decision
        out.append(shown)
    return out


def _true_label(target: str, label: Any, names: list[Any]) -> Any:
    if target == "regression":
        return float(label)
    if target == "multilabel":
        keys = (
            [str(name) for name in names] if len(names) == len(label) else [str(i) for i in range(len(label))]
        )
        return {key: None if math.isnan(cell) else int(cell) for key, cell in zip(keys, label, strict=True)}
    return names[int(label)] if names and int(label) < len(names) else int(label)


def _save_predictions(root: Path, name: str, text: str) -> Path | None:
    from probekit.runfiles import write_inside

    try:
        return write_inside(root, "eval", name, text.encode("utf-8"))
    except (OSError, ValueError) as exc:
        reason = (exc.strerror or type(exc).__name__) if isinstance(exc, OSError) else str(exc)
        logging.getLogger("probekit").warning(
            "%s: could not write the predictions there (%s); they are not saved", root / "eval" / name, reason
        )
        return None


def read_texts(path: str | Path, run: str | Path) -> list[str]:
    """The texts of `read_inputs`."""
    return read_inputs(path, run)[0]


def input_spec(run: str | Path, data: Any = None) -> Any:
    """The `probekit.data.DataSpec` inputs of ``run`` are read by: its stored config's ``data``
    block, or ``data`` (an export folder's manifest holds it: torch is then never imported)."""
    from probekit.data import stored_data_spec

    if data is None:
        from probekit.checkpoint import read_meta  # torch: not on an export's path

        folder, meta = read_meta(run)
        data = (meta.get("config") or {}).get("data")
    else:
        folder = Path(run)
    return stored_data_spec(data, label=str(folder / "probe.json"))


def read_inputs(
    path: str | Path, run: str | Path, keep: Sequence[str] = (), spec: Any = None
) -> tuple[list[str], list[dict[str, Any]]]:
    """Texts from ``--input`` and, per row, the fields to pass through to the output: the row's
    ``id`` when it has one, and each field of ``keep`` (every row must hold it). Data files
    (``.jsonl``, ``.json``, ``.ndjson``, ``.csv``, ``.parquet``) give their rows' text field
    (the run's ``data.text_field``), or for a run that reads conversations (``data.chat``) each
    row's conversation; any other file one text per line (blank lines skipped; a chat run reads
    each as a user's prompt).

    Every text is checked, never coerced: a field that is not a string, an empty or invisible-only
    text, or one longer than the run's ``data.max_text_chars`` raises `DataError` naming
    ``file:line`` (``file: row N`` for parquet); so does a row without a ``keep`` field, and
    ``keep`` with a plain text file (its lines have no fields). ``spec``: the `input_spec` of
    ``run`` when the caller has it already.
    """
    from probekit.data import (
        check_data_file,
        conversation_from_record,
        field_text,
        read_text_lines,
    )

    path = Path(path)
    spec = input_spec(run) if spec is None else spec
    field, max_chars = spec.text_field, spec.max_text_chars
    check_data_file(path)  # a missing file or a folder is named as such, whatever its suffix
    if path.suffix.lower() not in FORMAT_SUFFIXES:
        if keep:
            raise DataError(
                f"{path}: --keep {','.join(keep)} needs a data file (.jsonl, .csv, .parquet); "
                "a plain text file's lines have no fields"
            )
        lines = read_text_lines(path, max_chars)
        return lines, [{} for _ in lines]
    parquet = path.suffix.lower() == ".parquet"
    texts: list[str] = []
    extras: list[dict[str, Any]] = []
    for line, record in read_records(path, max_text_chars=max_chars):
        where = f"{path}: row {line}" if parquet else f"{path}:{line}"
        kept: dict[str, Any] = {"id": record["id"]} if "id" in record else {}
        for name in keep:
            if name not in record:
                hint = did_you_mean(name, [str(k) for k in record])
                raise DataError(
                    f"{where}: no field {name!r} to keep (found: {', '.join(map(str, record))})"
                    + (f"; {hint}" if hint else "")
                )
            kept[name] = record[name]
        extras.append(kept)
        if spec.chat is not None:
            texts.append(conversation_from_record(record, where, spec.chat, max_chars))
            continue
        if field not in record:
            raise DataError(f"{where}: no field {field!r} (found: {', '.join(map(str, record))})")
        texts.append(field_text(record[field], where, field, max_chars))
    return texts, extras
