# ruff: noqa: F811  (pytest fixtures imported by name)
"""Data given as Python objects (`probekit.memory`): every form reads exactly as the same rows in
a file would, errors name the object and the row, and a run records where its data came from."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from probekit.data import DataError, Dataset, DataSpec, load_data
from tests.engine_fixtures import ToyData, bert_dir, make_config, toy_data  # noqa: F401  (fixtures)

pd = pytest.importorskip("pandas")
datasets = pytest.importorskip("datasets")

TEXTS = [f"prompt {i}: how do I {'build a bomb' if i % 3 == 0 else 'bake bread'}?" for i in range(30)]
LABELS = [int(i % 3 == 0) for i in range(30)]


def _write_jsonl(path: Path, texts: list[str], labels: list[Any]) -> Path:
    path.write_text(
        "".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in zip(texts, labels, strict=True))
    )
    return path


def _same(a: Dataset, b: Dataset) -> None:
    for one, other in zip(a.splits(), b.splits(), strict=True):
        assert (one.name, one.texts, one.labels) == (other.name, other.texts, other.labels)
    assert a.label_map == b.label_map and a.report.class_balance == b.report.class_balance


def _forms(texts: list[str], labels: list[Any]) -> dict[str, Any]:
    frame = pd.DataFrame({"text": texts, "label": labels})
    return {
        "records": [{"text": t, "label": y} for t, y in zip(texts, labels, strict=True)],
        "columns": {"text": texts, "label": labels},
        "pair": (texts, labels),
        "numpy columns": {"text": np.array(texts, dtype=object), "label": np.array(labels)},
        "dataframe": frame,
        "series pair": (frame["text"], frame["label"]),
        "hf dataset": datasets.Dataset.from_pandas(frame),
    }


@pytest.mark.parametrize("form", list(_forms(TEXTS, LABELS)))
def test_one_object_splits_exactly_as_the_same_rows_in_a_file(form: str, tmp_path: Path) -> None:
    spec = DataSpec(val_fraction=0.2, test_fraction=0.2, split_seed=3)
    from_file = load_data(
        spec.model_copy(update={"path": str(_write_jsonl(tmp_path / "d.jsonl", TEXTS, LABELS))})
    )
    _same(load_data(spec, data=_forms(TEXTS, LABELS)[form]), from_file)


@pytest.mark.parametrize("val_key", ["val", "validation"])
def test_a_mapping_of_splits_reads_as_separate_files(val_key: str, tmp_path: Path) -> None:
    frame = pd.DataFrame({"text": TEXTS, "label": LABELS})
    parts = {"train": frame.iloc[:20], val_key: frame.iloc[20:26], "test": frame.iloc[26:]}
    files = {
        name: _write_jsonl(tmp_path / f"{name}.jsonl", TEXTS[a:b], LABELS[a:b])
        for name, (a, b) in {"train": (0, 20), "val": (20, 26), "test": (26, 30)}.items()
    }
    spec = DataSpec()
    from_files = load_data(spec.model_copy(update={k: str(v) for k, v in files.items()}))
    _same(load_data(spec, data=parts), from_files)
    hf = datasets.DatasetDict(
        {k: datasets.Dataset.from_pandas(v, preserve_index=False) for k, v in parts.items()}
    )
    _same(load_data(spec, data=hf), from_files)
    assert load_data(spec, data=hf).val.source == f"data[{val_key!r}]"


def test_a_save_to_disk_folder_reads_from_data_path(tmp_path: Path) -> None:
    frame = pd.DataFrame({"text": TEXTS, "label": ["unsafe" if y else "safe" for y in LABELS]})
    saved = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_pandas(frame.iloc[:24]),
            "validation": datasets.Dataset.from_pandas(frame.iloc[24:]),
        }
    )
    saved.save_to_disk(tmp_path / "saved")
    spec = DataSpec(path=str(tmp_path / "saved"), label_map={"safe": 0, "unsafe": 1})
    data = load_data(spec)
    assert data.train.texts == tuple(TEXTS[:24]) and data.val.labels == tuple(LABELS[24:])
    assert data.train.source == f"{tmp_path / 'saved'}['train']"
    one = datasets.Dataset.from_pandas(frame)
    one.save_to_disk(tmp_path / "one")
    assert (
        len(load_data(spec.model_copy(update={"path": str(tmp_path / "one")})).train) > 0
    )  # split like a file


def test_label_kinds_and_missing_cells_match_the_file_readers(tmp_path: Path) -> None:
    # multi-class names, multi-label columns with unknown cells (None and NaN), regression numbers
    names = ["cooking", "weapons", "drugs"]
    frame = pd.DataFrame(
        {
            "text": TEXTS,
            "category": [names[i % 3] for i in range(30)],
            "violent": [float(i % 2) if i % 5 else math.nan for i in range(30)],
            "illegal": pd.array([i % 3 == 0 for i in range(30)], dtype="boolean"),
            "score": np.linspace(-1.0, 2.0, 30),
        }
    )
    frame.loc[4, "illegal"] = pd.NA
    multiclass = load_data(DataSpec(label_field="category"), target="multiclass", data=frame)
    assert multiclass.label_map == {"cooking": 0, "drugs": 1, "weapons": 2}
    multilabel = load_data(DataSpec(label_fields=["violent", "illegal"]), target="multilabel", data=frame)
    rows = dict(
        zip(
            multilabel.train.texts + multilabel.val.texts,
            multilabel.train.labels + multilabel.val.labels,
            strict=True,
        )
    )
    assert math.isnan(rows[TEXTS[10]][0]) and rows[TEXTS[10]][1] == 0.0  # NaN: unknown
    if TEXTS[4] in rows:
        assert math.isnan(rows[TEXTS[4]][1])  # pandas.NA: unknown
    regression = load_data(DataSpec(label_field="score"), target="regression", data=frame)
    assert all(type(v) is float for v in regression.train.labels)
    pair = load_data(
        DataSpec(label_fields=["violent", "illegal"]),
        target="multilabel",
        data=(TEXTS, [[1, None] if i % 2 else [0, int(i % 4 == 0)] for i in range(30)]),
    )
    assert pair.num_classes == 2


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            {"train": TEXTS, "dev": TEXTS},
            "data: unknown split 'dev' (splits: train, val or validation, test)",
        ),
        ({"train": (TEXTS, LABELS)}, "data: no val split (given: 'train')"),
        (
            {"train": (TEXTS, LABELS), "val": (TEXTS, LABELS), "validation": (TEXTS, LABELS)},
            "both 'val' and 'validation'",
        ),
        ((TEXTS, LABELS[:-1]), "data: (texts, labels) of different lengths: 30 texts, 29 labels"),
        ({"text": TEXTS, "label": LABELS[:3]}, "data: columns of different lengths (text 30, label 3)"),
        ({"text": TEXTS, "label": 1}, "data: column 'label' is a int, not a list of values"),
        (TEXTS, "data: row 0 is a text, not a record"),
        (42, "data: cannot read data of type int"),
        ([], "data: no rows"),
        (
            {"train": [{"text": "a", "label": 0}], "val": [{"text": "b", "lable": 1}]},
            "data['val']: row 0: no field 'label' in this record (fields: 'text', 'lable'); "
            "did you mean 'lable'?",
        ),
        ([{"text": "a", "label": 0}, {"text": None, "label": 1}], "data: row 1: field 'text' is null"),
        ([{"text": "a", "label": 0}, {"text": "b", "label": math.nan}], "data: row 1: field 'label' is null"),
        (
            [{"text": "a", "label": 0}, {"text": "b", "label": 0.5}],
            "data: row 1: field 'label': label 0.5 is not a class index",
        ),
    ],
)
def test_bad_objects_get_one_line_naming_the_row(data: Any, message: str) -> None:
    with pytest.raises(DataError) as caught:
        load_data(DataSpec(), data=data)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_a_dataframe_row_is_named_by_its_index_label() -> None:
    frame = pd.DataFrame({"text": TEXTS, "label": [float(y) for y in LABELS]})
    frame.loc[27, "label"] = math.nan
    with pytest.raises(DataError, match=r"^data\['val'\]: row 27: field 'label' is null"):
        load_data(DataSpec(), data={"train": frame.iloc[:20], "val": frame.iloc[20:]})


@settings(max_examples=30, deadline=None)
@given(
    st.lists(
        st.tuples(st.text(alphabet="abc xyz", min_size=1, max_size=12).filter(str.strip), st.integers(0, 1)),
        min_size=8,
        max_size=40,
    )
)
def test_any_rows_read_the_same_from_every_form(rows: list[tuple[str, int]]) -> None:
    texts, labels = [t for t, _ in rows], [y for _, y in rows]
    spec = DataSpec(val_fraction=0.25, test_fraction=0.0)
    outcomes = []
    for data in _forms(texts, labels).values():
        try:
            outcomes.append(load_data(spec, data=data))
        except DataError as exc:
            outcomes.append(str(exc))
    first = outcomes[0]
    for other in outcomes[1:]:
        if isinstance(first, str):
            assert other == first
        else:
            assert not isinstance(other, str)
            _same(other, first)


def test_a_run_records_that_its_data_came_as_objects(
    bert_dir: Path, toy_data: ToyData, tmp_path: Path
) -> None:
    from probekit.training import train

    config = make_config(bert_dir, toy_data)
    frames = {split: pd.DataFrame(toy_data.rows[split]) for split in ("train", "val", "test")}
    result = train(config, data=frames, out=tmp_path / "run", log=lambda _l: None, progress=False)
    import yaml

    stored = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["data"]
    assert (
        stored["in_memory"] == "train: DataFrame, 96 rows, val: DataFrame, 48 rows, test: DataFrame, 48 rows"
    )
    assert stored["train"] is None and stored["path"] is None
    from_files = train(config, out=tmp_path / "files", log=lambda _l: None, progress=False)
    assert result.metrics == from_files.metrics  # the same rows train the same probe
    with pytest.raises(
        DataError, match=r"^data.in_memory: this config's data came as Python objects \(train: DataFrame"
    ):
        load_data(DataSpec(**stored))
