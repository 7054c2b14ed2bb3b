"""Evaluating a trained run on a labelled file, and reading texts to predict."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from probekit.checkpoint import read_meta
from probekit.data import FORMAT_SUFFIXES, DataError, DataSpec, read_records, read_split
from probekit.metrics import compute_metrics


def evaluate_file(run: str | Path, data: str | Path) -> tuple[dict[str, Any], Path]:
    """Metrics of the run's probe on a labelled file, at the run's threshold.

    The file uses the run's text and label fields and label map. The metrics are also written
    to ``RUN/eval/<file stem>.json``; returns the metrics and that path.
    """
    from probekit.probe import Probe

    _, meta = read_meta(run)
    spec = DataSpec.model_validate(meta["config"].get("data", {}))
    path = Path(data)
    split = read_split(path, spec, meta["label_map"])
    probe = Probe.from_pretrained(run)
    probs = np.asarray(probe.predict_proba(split.texts), dtype=np.float64)
    metrics: dict[str, Any] = compute_metrics(np.asarray(split.labels), probs, probe.threshold)
    metrics["data"] = str(path)
    out = Path(run) / "eval" / f"{path.stem}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    return metrics, out


def read_texts(path: str | Path, run: str | Path) -> list[str]:
    """Texts from ``--input``: data files (``.jsonl``, ``.json``, ``.ndjson``, ``.csv``, ``.parquet``)
    give their rows' text field (the run's ``data.text_field``); any other file one text per line."""
    path = Path(path)
    if path.suffix.lower() in FORMAT_SUFFIXES:
        _, meta = read_meta(run)
        field = meta["config"].get("data", {}).get("text_field", "text")
        texts = []
        for line, record in read_records(path):
            if field not in record:
                raise DataError(f"{path}:{line}: no field {field!r} (found: {', '.join(map(str, record))})")
            texts.append(str(record[field]))
        return texts
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read: {exc}") from None
    return [line for line in lines if line.strip()]
