"""Data given as Python objects: what `probekit.train(config, data=...)` and
`probekit.data.load_data(spec, data=...)` accept besides files.

One split (split like one file, by ``data.val_fraction``/``test_fraction``/``split_seed``) is any of:

- a list of records: ``[{"text": ..., "label": ...}, ...]``;
- columns: ``{"text": [...], "label": [...]}`` (lists, tuples, NumPy arrays or pandas Series of
  one length);
- ``(texts, labels)``: two sequences of one length, read as ``data.text_field`` and
  ``data.label_field``;
- a pandas ``DataFrame``;
- a Hugging Face ``datasets.Dataset``.

Several splits are a mapping of split name to one of these: ``train`` and ``val`` (or
``validation``, the Hugging Face name), optionally ``test``; a ``datasets.DatasetDict`` is one.
A folder written by ``DatasetDict.save_to_disk`` (or ``Dataset.save_to_disk``) is read the same
way when ``data.path`` names it (the CLI's ``--data``).

The records then go through the same checks as a file's, and errors name the object and the row
as Python counts it (a DataFrame's row by its integer index label, as ``df.loc`` finds it):
``data['train']: row 3: field 'label' is null; every record needs a label``.
NumPy scalars become Python numbers, and a missing value (``None``, NaN, ``pandas.NA``) is null:
an error for a text or a class label, an unknown cell for a multi-label column.

pandas and datasets are never imported here: an object is recognised by what it offers.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from probekit.errors import DataError, did_you_mean

if TYPE_CHECKING:
    from probekit.config import ProbeConfig
    from probekit.data import DataSpec

__all__ = ["bind", "describe", "is_saved_dataset", "records", "saved_dataset_records"]

SPLIT_NAMES = {"train": "train", "val": "val", "validation": "val", "test": "test"}
"""Keys of a split mapping -> the split they give (``validation`` is the Hugging Face name)."""

Records = list[tuple[int, dict[str, Any]]]
Named = tuple[str, Records]
"""The records of one split and what names it in messages (``data['train']``)."""


def bind(config: ProbeConfig, data: Any) -> tuple[ProbeConfig, Any]:
    """``config`` with its data section set for ``data``, and the objects `load_data` reads.

    A path (``str`` or ``os.PathLike``) becomes ``data.path``, a mapping of split name to paths
    becomes ``data.train``/``val``/``test``; both are then read from files (the objects returned
    are ``None``). Python objects clear the config's file sources and set ``data.in_memory`` to
    what they are, so the stored config never claims files (or the demo data) it was not trained on.
    """
    files = dict.fromkeys(("path", "train", "val", "test", "in_memory"))
    if data is None:
        return config, None
    if isinstance(data, (str, os.PathLike)):
        return config.replace(data={**files, "path": os.fspath(data)}), None
    if isinstance(data, Mapping) and data and all(isinstance(v, (str, os.PathLike)) for v in data.values()):
        splits = _split_keys(data, "data")
        paths = {split: os.fspath(data[key]) for split, key in splits.items()}
        return config.replace(data={**files, **paths}), None
    return config.replace(data={**files, "in_memory": describe(data)}), data


def describe(data: Any) -> str:
    """A short account of ``data`` for messages and the stored config (``DataFrame, 600 rows``)."""
    if _is_split_mapping(data):
        return ", ".join(f"{key}: {describe(value)}" for key, value in data.items())
    rows = _count(data)
    return _kind(data) if rows is None else f"{_kind(data)}, {rows} rows"


def _count(data: Any) -> int | None:
    """Rows of one split's object without reading it, or ``None`` when that is not plain."""
    try:
        if isinstance(data, tuple) and len(data) == 2 and all(_is_column(part) for part in data):
            return len(data[0])
        if isinstance(data, Mapping):
            return len(next(iter(data.values()))) if data else 0
        return len(data)
    except TypeError:
        return None


def records(data: Any, spec: DataSpec, name: str = "data") -> dict[str, Named] | Named:
    """The named records of ``data``: one per split for a split mapping, else one to split
    (`probekit.data` checks them as it checks a file's)."""
    if _is_split_mapping(data):
        splits = _split_keys(data, name)
        return {
            split: (f"{name}[{key!r}]", _records(data[key], f"{name}[{key!r}]", spec))
            for split, key in splits.items()
        }
    return name, _records(data, name, spec)


def is_saved_dataset(folder: Path) -> bool:
    """Whether ``folder`` was written by ``datasets``' ``save_to_disk``."""
    try:
        return (folder / "dataset_dict.json").is_file() or (
            (folder / "dataset_info.json").is_file() and (folder / "state.json").is_file()
        )
    except OSError:
        return False


def saved_dataset_records(folder: Path, spec: DataSpec) -> dict[str, Named] | Named:
    """The named records of a ``save_to_disk`` folder (a ``DatasetDict``'s splits, or one ``Dataset``)."""
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"{folder}: a Hugging Face datasets folder (written by save_to_disk); reading it needs "
            "the datasets package: pip install datasets"
        ) from None
    try:
        loaded = datasets.load_from_disk(os.fspath(folder))
    except Exception as exc:  # a damaged folder: any error of the reader, said in one line
        detail = " ".join(str(exc).split()) or type(exc).__name__
        raise DataError(f"{folder}: cannot read this datasets folder: {detail[:300]}") from None
    return records(loaded, spec, name=str(folder))


# -- recognising objects ---------------------------------------------------------------------------
def _kind(data: Any) -> str:
    if _is_frame(data):
        return "DataFrame"
    if _is_hf_dataset(data):
        return "Dataset"
    return type(data).__name__


def _is_frame(data: Any) -> bool:
    return type(data).__name__ == "DataFrame" and hasattr(data, "to_dict") and hasattr(data, "columns")


def _is_hf_dataset(data: Any) -> bool:
    return hasattr(data, "column_names") and hasattr(data, "to_dict") and hasattr(data, "num_rows")


def _is_split_mapping(data: Any) -> bool:
    return isinstance(data, Mapping) and any(isinstance(key, str) and key in SPLIT_NAMES for key in data)


def _split_keys(data: Mapping[Any, Any], name: str) -> dict[str, Any]:
    """Split -> the mapping's key for it; unknown, repeated or missing splits are errors."""
    found: dict[str, Any] = {}
    for key in data:
        split = SPLIT_NAMES.get(key) if isinstance(key, str) else None
        if split is None:
            hint = did_you_mean(str(key), list(SPLIT_NAMES))
            raise DataError(
                f"{name}: unknown split {key!r} (splits: train, val or validation, test)"
                + (f"; {hint}" if hint else "; validation data goes under 'val' or 'validation'")
            )
        if split in found:
            raise DataError(f"{name}: both {found[split]!r} and {key!r} give the {split} split; keep one")
        found[split] = key
    missing = [split for split in ("train", "val") if split not in found]
    if missing:
        raise DataError(
            f"{name}: no {' or '.join(missing)} split (given: {', '.join(repr(k) for k in data)}); "
            "give train and val (test is optional), or one object for probekit to split"
        )
    return {split: found[split] for split in ("train", "val", "test") if split in found}


def _is_column(value: Any) -> bool:
    """A list, tuple, 1-D NumPy array or pandas Series (not a string or a mapping)."""
    if isinstance(value, (list, tuple)):
        return True
    return hasattr(value, "tolist") and getattr(value, "ndim", None) == 1


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else list(value.tolist())


# -- objects -> records ----------------------------------------------------------------------------
def _records(data: Any, name: str, spec: DataSpec | None = None) -> Records:
    """``(row, record)`` pairs of one split's object, rows counted from 0, cells made plain."""
    if _is_frame(data):
        index = list(data.index)
        numbers = index if all(isinstance(i, int) for i in index) else range(len(index))
        return _numbered(zip(numbers, data.to_dict("records"), strict=True), name)
    rows: Iterable[Any]
    if _is_hf_dataset(data):
        rows = _columns_to_rows(data.to_dict(), name)
    elif isinstance(data, Mapping):
        rows = _columns_to_rows(data, name)
    elif isinstance(data, tuple) and len(data) == 2 and all(_is_column(part) for part in data):
        return _pair(data, name, spec)
    elif _is_column(data):
        rows = _as_list(data)
    else:
        raise DataError(
            f"{name}: cannot read data of type {type(data).__name__}; give records, columns, (texts, "
            "labels), a pandas DataFrame, a datasets.Dataset, a mapping of split name to one of "
            "these, or a file path"
        )
    return _numbered(enumerate(rows), name)


def _numbered(rows: Iterable[tuple[int, Any]], name: str) -> Records:
    """Checked records with plain cells; a row that is not a mapping is an error."""
    out: Records = []
    for index, row in rows:
        if not isinstance(row, Mapping):
            what = "a text" if isinstance(row, str) else f"a {type(row).__name__}"
            raise DataError(
                f"{name}: row {index} is {what}, not a record (a mapping of field to value); give "
                "records, columns or (texts, labels)"
            )
        out.append((index, {str(key): _plain(value) for key, value in row.items()}))
    if not out:
        raise DataError(f"{name}: no rows; every split needs at least one")
    return out


def _pair(data: tuple[Any, Any], name: str, spec: DataSpec | None) -> Records:
    """``(texts, labels)`` as records under ``spec``'s text and label fields (with
    ``data.label_fields``, each label is a row of one cell per column)."""
    texts, labels = _as_list(data[0]), _as_list(data[1])
    if len(texts) != len(labels):
        raise DataError(
            f"{name}: (texts, labels) of different lengths: {len(texts)} texts, {len(labels)} labels"
        )
    if not texts:
        raise DataError(f"{name}: no rows; every split needs at least one")
    text_field = spec.text_field if spec is not None else "text"
    out: Records = []
    for index, (text, label) in enumerate(zip(texts, labels, strict=True)):
        record = {text_field: _plain(text)}
        if spec is not None and spec.label_fields is not None:
            cells = _plain(label)
            if not isinstance(cells, list) or len(cells) != len(spec.label_fields):
                raise DataError(
                    f"{name}: row {index}: label {cells!r} is not a row of {len(spec.label_fields)} "
                    f"cells, one per data.label_fields column"
                )
            record.update(zip(spec.label_fields, cells, strict=True))
        else:
            record[spec.label_field if spec is not None else "label"] = _plain(label)
        out.append((index, record))
    return out


def _columns_to_rows(columns: Mapping[Any, Any], name: str) -> Iterator[dict[str, Any]]:
    """Rows of a mapping of field -> column (every column a sequence of one length)."""
    lengths: dict[str, int] = {}
    lists: dict[str, list[Any]] = {}
    for key, column in columns.items():
        if not _is_column(column):
            raise DataError(
                f"{name}: column {key!r} is a {type(column).__name__}, not a list of values; give "
                "columns as lists of one length (or records, or (texts, labels))"
            )
        lists[str(key)] = _as_list(column)
        lengths[str(key)] = len(lists[str(key)])
    if len(set(lengths.values())) > 1:
        shown = ", ".join(f"{key} {length}" for key, length in lengths.items())
        raise DataError(
            f"{name}: columns of different lengths ({shown}); every column needs one value per row"
        )
    size = next(iter(lengths.values()), 0)
    return ({key: values[index] for key, values in lists.items()} for index in range(size))


def _plain(value: Any) -> Any:
    """A cell as plain Python: NumPy scalars and arrays unwrapped, missing values ``None``."""
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        return None if math.isnan(value) else value
    if type(value).__name__ in {"NAType", "NaTType"}:
        return None
    if _is_column(value):
        return [_plain(item) for item in _as_list(value)]
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:
        return _plain(value.item())
    return value
