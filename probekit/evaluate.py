"""Evaluating a trained run on a labelled file, and reading texts to predict."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from probekit.checkpoint import read_meta
from probekit.data import FORMAT_SUFFIXES, DataError, read_records, read_split


def evaluate_file(
    run: str | Path, data: str | Path, trust_remote_code: bool = False
) -> tuple[dict[str, Any], Path | None]:
    """Metrics of the run's probe on a labelled file, at the run's threshold.

    The file uses the run's text and label fields and label map. The run folder is untrusted
    input and is validated whole (see `probekit.pretrained.load_probe`; ``trust_remote_code``
    as there). The metrics are also written to ``RUN/eval/<file stem>.json``, as valid JSON (an
    undefined metric, ``nan`` here, is written ``null``). Returns the metrics and that path, or
    None when they could not be written there (a read-only run folder, an ``eval/`` that leads
    out of the run folder): one warning (logger ``probekit``) says why.
    """
    from probekit.checkpoint import read_run
    from probekit.pretrained import load_run
    from probekit.probe import Probe
    from probekit.runfiles import save_json_inside
    from probekit.tasks.base import Scores

    described = read_run(run)
    path = Path(data)
    from probekit.config import task_of

    target = task_of(described.config).target
    split = read_split(path, described.config.data, described.meta.label_map, target=target)  # type: ignore[arg-type]
    probe, _ = load_run(run, trust_remote_code, cls=Probe)
    scores = np.asarray(probe.predict_proba(split.texts), dtype=np.float64)
    labels = np.asarray(
        split.labels, dtype=np.float64 if target in ("multilabel", "regression") else np.int64
    )
    assert probe.task is not None
    metrics: dict[str, Any] = probe.task.metrics(Scores(labels, scores, 0.0), probe.threshold)
    metrics["data"] = str(path)
    return metrics, save_json_inside(Path(run), "eval", f"{path.stem}.json", metrics, "metrics")


def read_texts(path: str | Path, run: str | Path) -> list[str]:
    """Texts from ``--input``: data files (``.jsonl``, ``.json``, ``.ndjson``, ``.csv``, ``.parquet``)
    give their rows' text field (the run's ``data.text_field``), or for a run that reads
    conversations (``data.chat``) each row's conversation; any other file one text per line
    (blank lines skipped; a chat run reads each as a user's prompt).

    Every text is checked, never coerced: a field that is not a string, an empty or invisible-only
    text, or one longer than the run's ``data.max_text_chars`` raises `DataError` naming
    ``file:line`` (``file: row N`` for parquet).
    """
    from probekit.data import (
        check_data_file,
        conversation_from_record,
        field_text,
        read_text_lines,
        stored_data_spec,
    )

    path = Path(path)
    folder, meta = read_meta(run)
    spec = stored_data_spec((meta.get("config") or {}).get("data"), label=str(folder / "probe.json"))
    field, max_chars = spec.text_field, spec.max_text_chars
    check_data_file(path)  # a missing file or a folder is named as such, whatever its suffix
    if path.suffix.lower() not in FORMAT_SUFFIXES:
        return read_text_lines(path, max_chars)
    parquet = path.suffix.lower() == ".parquet"
    texts: list[str] = []
    for line, record in read_records(path, max_text_chars=max_chars):
        where = f"{path}: row {line}" if parquet else f"{path}:{line}"
        if spec.chat is not None:
            texts.append(conversation_from_record(record, where, spec.chat, max_chars))
            continue
        if field not in record:
            raise DataError(f"{where}: no field {field!r} (found: {', '.join(map(str, record))})")
        texts.append(field_text(record[field], where, field, max_chars))
    return texts
