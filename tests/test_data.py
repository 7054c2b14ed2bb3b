"""Data loading: formats, located errors, labels, folders, the stratified split and its report.

Every file here is written by the test itself (``tmp_path``); no shared data is read.
"""

from __future__ import annotations

import json
import sys
import tempfile
import types
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from probekit.data import DataError, DataReport, Dataset, DataSpec, Split, load_data, read_records
from probekit.errors import EXIT_BAD_INPUT, UserError


# -- helpers --------------------------------------------------------------------------------------
def write_jsonl(path: Path, records: Sequence[Any]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


def write_parquet(path: Path, records: Sequence[dict[str, Any]]) -> Path:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.Table.from_pylist(list(records)), path)
    return path


def rows(*sizes: int, prefix: str = "t") -> list[dict[str, Any]]:
    """``sizes[c]`` records of class ``c``, interleaved, each with a distinct text."""
    out: list[dict[str, Any]] = []
    counts = [0] * len(sizes)
    while any(counts[c] < sizes[c] for c in range(len(sizes))):
        for c, size in enumerate(sizes):
            if counts[c] < size:
                out.append({"text": f"{prefix} {c} {counts[c]}", "label": c})
                counts[c] += 1
    return out


def error(spec: DataSpec) -> str:
    """The message `load_data` raises for ``spec``, checked to be one line."""
    with pytest.raises(DataError) as info:
        load_data(spec)
    message = str(info.value)
    assert "\n" not in message
    return message


def pairs(data: Dataset) -> Counter[tuple[str, int]]:
    return Counter(
        (text, label)
        for split in data.splits()
        for text, label in zip(split.texts, split.labels, strict=True)
    )


# -- the spec ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        (
            {"path": "a.jsonl", "train": "t.jsonl", "val": "v.jsonl"},
            "give either path or train/val, not both",
        ),
        ({"path": "a.jsonl", "test": "t.jsonl"}, "give either path or test"),
        ({"train": "t.jsonl"}, "train given without val"),
        ({"val": "v.jsonl"}, "val given without train"),
        ({"test": "x.jsonl"}, "test given without train and val"),
        ({"val_fraction": -0.1}, "val_fraction"),
        ({"test_fraction": 1.0}, "test_fraction"),
        ({"val_fraction": 0.5, "test_fraction": 0.5}, "must be below 1"),
        ({"label_map": {"a": 0, "b": 2}}, "without gaps"),
        ({"label_map": {"a": -1, "b": 0}}, "class indices start at 0"),
        ({"label_map": {"a": 0}}, "single class"),
        ({"label_map": {}}, "label_map is empty"),
        ({"label_map": {"a": 0, "b": 1, "c": 1}}, r"class 1 several names \('b', 'c'\)"),
        ({"text_field": "x", "label_field": "x"}, "must differ"),
        ({"text_field": ""}, "text_field"),
        ({"path": ""}, "path"),
        ({"format": "xml"}, "format"),
        ({"paths": "a.jsonl"}, "paths"),
    ],
)
def test_spec_validation(fields: dict[str, Any], needle: str) -> None:
    with pytest.raises(ValidationError, match=needle):
        DataSpec(**fields)


def test_spec_defaults_frozen_and_round_trip() -> None:
    spec = DataSpec(path="a.csv", label_map={"safe": 0, "unsafe": 1, "harmful": 2})
    assert (spec.text_field, spec.label_field, spec.format) == ("text", "label", "auto")
    assert (spec.val_fraction, spec.test_fraction, spec.split_seed) == (0.1, 0.1, 0)
    assert DataSpec.model_validate_json(spec.model_dump_json()) == spec
    with pytest.raises(ValidationError):
        spec.path = "b.csv"
    assert DataSpec(train="t.csv", val="v.csv").test is None


def test_data_error_is_a_user_error() -> None:
    assert issubclass(DataError, UserError)
    assert DataError("x").exit_code == EXIT_BAD_INPUT


# -- JSONL ------------------------------------------------------------------------------------------
def test_jsonl_loads_with_bom_crlf_and_blank_lines(tmp_path: Path) -> None:
    body = "\r\n".join(json.dumps(record) for record in rows(10, 10)) + "\r\n\r\n"
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b"\r\n  \r\n" + body.encode())
    data = load_data(DataSpec(path=str(path)))
    assert data.label_map == {"0": 0, "1": 1}
    assert data.num_classes == 2
    assert sum(len(split) for split in data.splits()) == 20
    assert pairs(data) == Counter((r["text"], r["label"]) for r in rows(10, 10))
    records = read_records(path)
    assert records[0] == (3, {"text": "t 0 0", "label": 0})  # BOM stripped, two blank lines counted


def test_jsonl_line_numbers_count_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a", "label": 0}\n\n\n{"text": "", "label": 1}\n', encoding="utf-8")
    assert error(DataSpec(path=str(path))) == f"{path}:4: field 'text' is empty (got '')"


def test_jsonl_truncated_line(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(
        '{"text": "a", "label": 0}\n{"text": "b", "label": 1}\n{"text": "c", "lab', encoding="utf-8"
    )
    message = error(DataSpec(path=str(path)))
    assert message.startswith(f"{path}:3: not valid JSON: ")


@pytest.mark.parametrize(
    ("line", "kind"),
    [
        ("[1, 2]", "an array"),
        ("42", "a number"),
        ('"hi"', "a string"),
        ("null", "null"),
        ("true", "a boolean"),
    ],
)
def test_jsonl_line_not_an_object(tmp_path: Path, line: str, kind: str) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a", "label": 0}\n' + line + "\n", encoding="utf-8")
    assert error(DataSpec(path=str(path))).startswith(f"{path}:2: expected a JSON object, got {kind}")


def test_jsonl_invalid_utf8_names_line_and_byte_offset(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    first = b'{"text": "a", "label": 0}\n'
    path.write_bytes(first + b'{"text": "caf\xe9!", "label": 1}\n')
    offset = len(first) + len(b'{"text": "caf')
    message = error(DataSpec(path=str(path)))
    assert message.startswith(f"{path}:2: not valid UTF-8: byte 0xe9 at byte offset {offset}")


def test_jsonl_utf16_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_bytes('{"text": "a", "label": 0}\n'.encode("utf-16"))
    assert "UTF-16" in error(DataSpec(path=str(path)))


@pytest.mark.parametrize("content", [b"", b"\n\r\n   \n", b"\xef\xbb\xbf"])
def test_jsonl_empty_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "d.jsonl"
    path.write_bytes(content)
    assert error(DataSpec(path=str(path))) == f"{path}: empty file"


@pytest.mark.parametrize("suffix", [".json", ".ndjson", ".JSONL"])
def test_jsonl_suffixes(tmp_path: Path, suffix: str) -> None:
    path = write_jsonl(tmp_path / f"d{suffix}", rows(5, 5))
    assert len(read_records(path)) == 10


def test_unknown_suffix_and_format_override(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.txt", rows(5, 5))
    message = error(DataSpec(path=str(path)))
    assert message.startswith(f"{path}: cannot tell the format from suffix '.txt'")
    assert "data.format" in message
    data = load_data(DataSpec(path=str(path), format="jsonl"))
    assert sum(len(split) for split in data.splits()) == 10
    with pytest.raises(DataError, match="unknown data format 'xml'"):
        read_records(path, "xml")


# -- CSV --------------------------------------------------------------------------------------------
def test_csv_bom_crlf_quoted_newlines(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    lines = ["text,label", '"hello, ""world""\r\nsecond line",1', "plain,0"]
    lines += [f"row {i},{i % 2}" for i in range(12)]
    path.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode() + b"\r\n")
    records = read_records(path)
    assert records[0] == (2, {"text": 'hello, "world"\r\nsecond line', "label": "1"})
    assert records[1] == (4, {"text": "plain", "label": "0"})  # the quoted record spans lines 2-3
    data = load_data(DataSpec(path=str(path)))
    assert data.label_map == {"0": 0, "1": 1}
    assert ('hello, "world"\r\nsecond line', 1) in pairs(data)


def test_csv_line_numbers_after_a_multiline_record(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text('text,label\n"a\nb\nc",0\nx,1\n   ,1\n', encoding="utf-8", newline="")
    assert error(DataSpec(path=str(path))) == f"{path}:6: field 'text' is empty (got '   ')"


def test_csv_header_only(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("text,label\r\n", encoding="utf-8")
    assert error(DataSpec(path=str(path))) == f"{path}:1: no rows below the header ('text', 'label')"


@pytest.mark.parametrize("content", [b"", b"\r\n\r\n", b"\xef\xbb\xbf"])
def test_csv_empty_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "d.csv"
    path.write_bytes(content)
    assert error(DataSpec(path=str(path))) == f"{path}: empty file"


def test_csv_wrong_field_count(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("text,label\na,0\nb, with comma,1\n", encoding="utf-8")
    message = error(DataSpec(path=str(path)))
    assert message.startswith(f"{path}:3: row has 3 fields but the header (line 1) has 2 ('text', 'label')")


def test_csv_unterminated_quote_names_the_record_start(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text('text,label\na,0\n"never closed,1\nb,0\nc,1\n', encoding="utf-8")
    assert error(DataSpec(path=str(path))).startswith(f"{path}:3: not valid CSV: ")


def test_csv_repeated_column(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("text,label,text\na,0,b\n", encoding="utf-8")
    assert error(DataSpec(path=str(path))) == f"{path}:1: column 'text' appears more than once in the header"


def test_csv_invalid_utf8(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_bytes(b"text,label\na,0\n\xff,1\n")
    assert error(DataSpec(path=str(path))) == (
        f"{path}:3: not valid UTF-8: byte 0xff at byte offset 15 (invalid start byte)"
    )


def test_csv_labels_strings_booleans_and_label_map_keys(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("text,label\n" + "".join(f"r{i},{'unsafe' if i % 2 else 'safe'}\n" for i in range(10)))
    data = load_data(DataSpec(path=str(path), label_map={"safe": 0, "unsafe": 1}))
    assert {(text, label) for text, label in pairs(data)} == {(f"r{i}", i % 2) for i in range(10)}
    path.write_text("text,label\n" + "".join(f"r{i},{'True' if i % 2 else 'false'}\n" for i in range(10)))
    assert load_data(DataSpec(path=str(path))).label_map == {"false": 0, "true": 1}
    path.write_text("text,label\n" + "".join(f"r{i},{i % 2}\n" for i in range(10)))
    assert load_data(DataSpec(path=str(path), label_map={"no": 0, "yes": 1})).label_map == {"no": 0, "yes": 1}
    path.write_text("text,label\na,0\nb,\n")
    assert error(DataSpec(path=str(path))) == f"{path}:3: field 'label' is null; every record needs a label"


# -- parquet ----------------------------------------------------------------------------------------
def test_parquet_loads_and_numbers_rows(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "d.parquet", rows(6, 6))
    records = read_records(path)
    assert records[0] == (1, {"text": "t 0 0", "label": 0})
    data = load_data(DataSpec(path=str(path)))
    assert pairs(data) == Counter((r["text"], r["label"]) for r in rows(6, 6))


def test_parquet_strings_and_booleans(tmp_path: Path) -> None:
    named = [{"text": f"r{i}", "label": "bad" if i % 2 else "good"} for i in range(10)]
    path = write_parquet(tmp_path / "d.parquet", named)
    assert load_data(DataSpec(path=str(path), label_map={"good": 0, "bad": 1})).num_classes == 2
    flags = [{"text": f"r{i}", "label": bool(i % 2)} for i in range(10)]
    path = write_parquet(tmp_path / "b.parquet", flags)
    assert load_data(DataSpec(path=str(path))).label_map == {"false": 0, "true": 1}


def test_parquet_errors_name_the_row(tmp_path: Path) -> None:
    records: list[dict[str, Any]] = [*rows(2, 2), {"text": None, "label": 1}]
    path = write_parquet(tmp_path / "d.parquet", records)
    assert (
        error(DataSpec(path=str(path))) == f"{path}: row 5: field 'text' is null; every record needs a text"
    )
    path = write_parquet(tmp_path / "p.parquet", [{"prompt": "a", "label": 0}])
    message = error(DataSpec(path=str(path)))
    assert message.startswith(f"{path}: row 1: no field 'text' in this record (fields: 'prompt', 'label')")


def test_parquet_not_parquet(tmp_path: Path) -> None:
    pytest.importorskip("pyarrow")
    path = tmp_path / "d.parquet"
    path.write_bytes(b"this is not parquet at all")
    assert error(DataSpec(path=str(path))).startswith(f"{path}: not a readable parquet file: ")


def test_parquet_without_pyarrow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "d.parquet"
    path.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    assert error(DataSpec(path=str(path))) == f"{path}: reading parquet needs pyarrow: pip install pyarrow"


# -- text and label fields ----------------------------------------------------------------------------
def test_missing_text_field_lists_the_fields(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": 0}, {"Text": "b", "label": 1, "id": 7}])
    assert error(DataSpec(path=str(path))) == (
        f"{path}:2: no field 'text' in this record (fields: 'Text', 'label', 'id'); did you mean 'Text'?; "
        "set data.text_field to the field that holds the text"
    )


def test_missing_label_field_lists_the_fields(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "class": 0}])
    message = error(DataSpec(path=str(path)))
    assert message.startswith(f"{path}:1: no field 'label' in this record (fields: 'text', 'class')")
    assert "data.label_field" in message


def test_custom_field_names(tmp_path: Path) -> None:
    records = [{"prompt": r["text"], "y": r["label"]} for r in rows(5, 5)]
    path = write_jsonl(tmp_path / "d.jsonl", records)
    data = load_data(DataSpec(path=str(path), text_field="prompt", label_field="y"))
    assert pairs(data) == Counter((r["text"], r["label"]) for r in rows(5, 5))


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        (None, "field 'text' is null"),
        ("", "field 'text' is empty (got '')"),
        (" \t\n ", "field 'text' is empty (got ' \\t\\n ')"),
        (12, "field 'text' must be a string, got a number 12"),
        (["a"], "field 'text' must be a string, got an array ['a']"),
    ],
)
def test_bad_text(tmp_path: Path, text: Any, needle: str) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": 0}, {"text": text, "label": 1}])
    assert error(DataSpec(path=str(path))).startswith(f"{path}:2: {needle}")


# -- labels -----------------------------------------------------------------------------------------
def test_integer_labels_three_classes(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", rows(10, 10, 10))
    data = load_data(DataSpec(path=str(path)))
    assert data.label_map == {"0": 0, "1": 1, "2": 2}
    assert data.num_classes == 3


def test_boolean_labels(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": f"r{i}", "label": bool(i % 2)} for i in range(10)])
    data = load_data(DataSpec(path=str(path)))
    assert data.label_map == {"false": 0, "true": 1}
    assert {(text, label) for text, label in pairs(data)} == {(f"r{i}", i % 2) for i in range(10)}


def test_string_labels_through_label_map(tmp_path: Path) -> None:
    names = ["safe", "unsafe", "harmful"]
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": f"r{i}", "label": names[i % 3]} for i in range(30)])
    label_map = {"harmful": 2, "safe": 0, "unsafe": 1}
    data = load_data(DataSpec(path=str(path), label_map=label_map))
    assert data.label_map == label_map
    assert data.num_classes == 3
    assert {(text, label) for text, label in pairs(data)} == {(f"r{i}", i % 3) for i in range(30)}


def test_integer_labels_with_a_label_map_keep_it(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", rows(5, 5))
    data = load_data(DataSpec(path=str(path), label_map={"safe": 0, "unsafe": 1}))
    assert data.label_map == {"safe": 0, "unsafe": 1}


def test_integral_floats_are_class_indices(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": f"r{i}", "label": float(i % 2)} for i in range(10)])
    assert load_data(DataSpec(path=str(path))).label_map == {"0": 0, "1": 1}


def test_unknown_string_label_lists_the_keys(tmp_path: Path) -> None:
    records = [{"text": "a", "label": "safe"}, {"text": "b", "label": "usafe"}]
    path = write_jsonl(tmp_path / "d.jsonl", records)
    assert error(DataSpec(path=str(path), label_map={"safe": 0, "unsafe": 1})) == (
        f"{path}:2: field 'label': label 'usafe' is not in data.label_map (keys: 'safe', 'unsafe'); "
        "did you mean 'unsafe'?"
    )


def test_string_labels_need_a_label_map(tmp_path: Path) -> None:
    records = [{"text": "a", "label": "1"}, {"text": "b", "label": "0"}]
    path = write_jsonl(tmp_path / "d.jsonl", records)
    assert error(DataSpec(path=str(path))) == (
        f"{path}:1: field 'label': labels are strings ('0', '1'); pass data.label_map to give each a "
        "class index, e.g. {'0': 0, '1': 1}"
    )


def test_mixed_label_types_name_the_first_other_line(tmp_path: Path) -> None:
    records: list[dict[str, Any]] = [
        {"text": "a", "label": 0},
        {"text": "b", "label": 1},
        {"text": "c", "label": "unsafe"},
    ]
    path = write_jsonl(tmp_path / "d.jsonl", records)
    assert error(DataSpec(path=str(path), label_map={"safe": 0, "unsafe": 1})) == (
        f"{path}:3: field 'label': string label 'unsafe', but the first label ({path}:1) is an integer; "
        "use one label type throughout"
    )
    records[2]["label"] = True
    write_jsonl(path, records)
    assert error(DataSpec(path=str(path))).startswith(f"{path}:3: field 'label': boolean label True")


def test_mixed_label_types_across_files(tmp_path: Path) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", rows(3, 3))
    val = write_jsonl(tmp_path / "val.jsonl", [{"text": "x", "label": "a"}])
    message = error(DataSpec(train=str(train), val=str(val), label_map={"a": 0, "b": 1}))
    assert message.startswith(f"{val}:1: field 'label': string label 'a', but the first label ({train}:1)")


def test_integer_outside_the_label_map(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [*rows(3, 3), {"text": "z", "label": 2}])
    assert error(DataSpec(path=str(path), label_map={"safe": 0, "unsafe": 1})) == (
        f"{path}:7: field 'label': label 2 is outside 0..1 (data.label_map has 2 classes)"
    )


def test_negative_and_gapped_integers(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [*rows(3, 3), {"text": "z", "label": -1}])
    assert error(DataSpec(path=str(path))).startswith(f"{path}:7: field 'label': label -1 is negative")
    path = write_jsonl(tmp_path / "g.jsonl", [{"text": "a", "label": 0}, {"text": "b", "label": 2}])
    assert error(DataSpec(path=str(path))) == (
        f"{path}:2: field 'label': label 2 but no row has label 1; class indices must run 0..K-1 without "
        "gaps (or pass data.label_map)"
    )


@pytest.mark.parametrize(
    ("label", "needle"),
    [
        (None, "field 'label' is null"),
        ("", "field 'label' is empty"),
        (0.5, "field 'label': label 0.5 is not a class index"),
        ([1], "field 'label': a label must be an integer, boolean or string, got an array [1]"),
    ],
)
def test_bad_label_values(tmp_path: Path, label: Any, needle: str) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": 0}, {"text": "b", "label": label}])
    assert error(DataSpec(path=str(path))).startswith(f"{path}:2: {needle}")


def test_single_class(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", rows(8))
    assert error(DataSpec(path=str(path))) == (
        f"{path}: field 'label': every row has class 0 ('0'); a classifier needs at least two classes"
    )
    path = write_jsonl(tmp_path / "s.jsonl", [{"text": f"r{i}", "label": "unsafe"} for i in range(5)])
    message = error(DataSpec(path=str(path), label_map={"safe": 0, "unsafe": 1}))
    assert "every row has class 1 ('unsafe')" in message


def test_class_absent_from_train_or_val_files(tmp_path: Path) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", rows(5))
    val = write_jsonl(tmp_path / "val.jsonl", rows(2, 2))
    assert error(DataSpec(train=str(train), val=str(val))) == (
        f"{train}: field 'label': train has no rows of class 1 ('1'); every class needs rows in train and val"
    )
    write_jsonl(train, rows(5, 5))
    write_jsonl(val, rows(3))
    assert error(DataSpec(train=str(train), val=str(val))).startswith(
        f"{val}: field 'label': val has no rows of class 1 ('1')"
    )


def test_class_too_small_to_split_and_class_without_rows(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [*rows(10), {"text": "lonely", "label": 1}])
    assert error(DataSpec(path=str(path))) == (
        f"{path}: field 'label': val has no rows of class 1 ('1'): {path} has only 1 row of it; "
        "a split needs at least 2 per class (train and val)"
    )
    path = write_jsonl(tmp_path / "e.jsonl", rows(5, 5))
    message = error(DataSpec(path=str(path), label_map={"a": 0, "b": 1, "c": 2}))
    assert message == f"{path}: field 'label': train has no rows of class 2 ('c'): no row of {path} has it"


# -- folders and files ------------------------------------------------------------------------------
def test_folder_with_train_val_test(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "train.jsonl", rows(4, 4, prefix="tr"))
    (tmp_path / "val.csv").write_text("text,label\nv0,0\nv1,1\n")
    write_jsonl(tmp_path / "test.jsonl", rows(1, 1, prefix="te"))
    (tmp_path / "README.md").write_text("notes")
    data = load_data(DataSpec(path=str(tmp_path)))
    assert (data.train.source, data.val.source) == (str(tmp_path / "train.jsonl"), str(tmp_path / "val.csv"))
    assert data.test is not None
    assert data.test.texts == ("te 0 0", "te 1 0")
    assert data.val.labels == (0, 1)
    assert [split.name for split in data.splits()] == ["train", "val", "test"]


def test_folder_without_test(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "train.jsonl", rows(2, 2))
    write_jsonl(tmp_path / "val.jsonl", rows(1, 1))
    data = load_data(DataSpec(path=str(tmp_path)))
    assert data.test is None
    assert set(data.report.class_balance) == {"train", "val"}
    assert set(data.report.shared_duplicates) == {"train/val"}


def test_folder_missing_val_lists_what_it_found(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "train.jsonl", rows(2, 2))
    (tmp_path / "valid.jsonl").write_text("")
    (tmp_path / "val.txt").write_text("")
    message = error(DataSpec(path=str(tmp_path)))
    assert message.startswith(f"{tmp_path}: no val file; a data folder holds train.*, val.*")
    assert message.endswith("found: train.jsonl, val.txt, valid.jsonl")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert error(DataSpec(path=str(empty))).endswith("found: nothing")


def test_folder_with_two_train_files(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "train.jsonl", rows(2, 2))
    (tmp_path / "train.csv").write_text("text,label\na,0\nb,1\n")
    write_jsonl(tmp_path / "val.jsonl", rows(1, 1))
    message = error(DataSpec(path=str(tmp_path)))
    assert message == f"{tmp_path}: more than one train file (train.csv, train.jsonl); keep one"
    (tmp_path / "val.csv").write_text("text,label\nc,0\nd,1\n")
    data = load_data(DataSpec(path=str(tmp_path), format="csv"))  # an explicit format picks the .csv files
    assert data.train.texts == ("a", "b")


def test_separate_files(tmp_path: Path) -> None:
    train = write_jsonl(tmp_path / "a.jsonl", rows(5, 5))
    val = write_jsonl(tmp_path / "b.jsonl", rows(2, 2, prefix="v"))
    test = write_parquet(tmp_path / "c.parquet", rows(2, 2, prefix="x"))
    data = load_data(DataSpec(train=str(train), val=str(val), test=str(test)))
    assert data.train.texts == tuple(r["text"] for r in rows(5, 5))
    assert data.test is not None
    assert (data.train.source, data.test.source) == (str(train), str(test))
    assert load_data(DataSpec(train=str(train), val=str(val))).test is None


def test_missing_file_and_directory(tmp_path: Path) -> None:
    missing = tmp_path / "nope.jsonl"
    assert error(DataSpec(path=str(missing))) == f"{missing}: no such file or folder"
    val = write_jsonl(tmp_path / "v.jsonl", rows(1, 1))
    assert error(DataSpec(train=str(missing), val=str(val))) == f"{missing}: no such file or folder"
    folder = tmp_path / "train.jsonl.d"
    folder.mkdir()
    assert error(DataSpec(train=str(folder), val=str(val), format="jsonl")) == (
        f"{folder}: is a folder; give one data file (a folder holding train.*, val.* and test.* files "
        "is for train --data)"
    )
    assert error(DataSpec(path=str(missing / "x.jsonl"))) == f"{missing / 'x.jsonl'}: no such file or folder"


def test_unreadable_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", rows(3, 3))

    def deny(self: Path) -> bytes:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", deny)
    assert error(DataSpec(path=str(path))) == f"{path}: cannot read: Permission denied"


# -- the split --------------------------------------------------------------------------------------
def test_same_seed_same_split_other_seed_other_split(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", rows(60, 40))
    first = load_data(DataSpec(path=str(path), split_seed=3))
    again = load_data(DataSpec(path=str(path), split_seed=3))
    other = load_data(DataSpec(path=str(path), split_seed=4))
    assert first == again
    assert first.val.texts != other.val.texts
    assert first.train.source == f"{path} (split seed 3)"


def test_stratification_and_no_row_lost(tmp_path: Path) -> None:
    records = rows(70, 25, 5)
    path = write_jsonl(tmp_path / "d.jsonl", records)
    data = load_data(DataSpec(path=str(path), val_fraction=0.15, test_fraction=0.2))
    assert pairs(data) == Counter((r["text"], r["label"]) for r in records)
    assert data.test is not None
    for split, fraction in ((data.val, 0.15), (data.test, 0.2)):
        counts = Counter(split.labels)
        for label, size in enumerate((70, 25, 5)):
            assert abs(counts[label] - fraction * size) <= 1
    order = {r["text"]: i for i, r in enumerate(records)}
    for split in data.splits():  # each split keeps the file's order
        assert [order[text] for text in split.texts] == sorted(order[text] for text in split.texts)


def test_small_classes_get_val_and_test_rows(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", rows(3, 2))
    data = load_data(DataSpec(path=str(path)))
    assert data.test is not None
    assert (Counter(data.train.labels), Counter(data.val.labels), Counter(data.test.labels)) == (
        Counter({0: 1, 1: 1}),
        Counter({0: 1, 1: 1}),
        Counter({0: 1}),
    )


def test_test_fraction_zero_and_val_fraction_zero(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", rows(20, 20))
    data = load_data(DataSpec(path=str(path), test_fraction=0.0, val_fraction=0.25))
    assert data.test is None
    assert (len(data.train), len(data.val)) == (30, 10)
    assert error(DataSpec(path=str(path), val_fraction=0.0)).startswith(f"{path}: data.val_fraction is 0")


@given(
    sizes=st.lists(st.integers(2, 40), min_size=2, max_size=4),
    val_fraction=st.floats(0.05, 0.4),
    test_fraction=st.one_of(st.just(0.0), st.floats(0.05, 0.4)),
    seed=st.integers(0, 2**32),
)
def test_split_property(sizes: list[int], val_fraction: float, test_fraction: float, seed: int) -> None:
    records = rows(*sizes)
    spec_fields: dict[str, Any] = {
        "val_fraction": val_fraction,
        "test_fraction": test_fraction,
        "split_seed": seed,
    }
    with tempfile.TemporaryDirectory() as folder:
        path = write_jsonl(Path(folder) / "d.jsonl", records)
        data = load_data(DataSpec(path=str(path), **spec_fields))
        assert load_data(DataSpec(path=str(path), **spec_fields)) == data
    assert pairs(data) == Counter((r["text"], r["label"]) for r in records)
    assert data.num_classes == len(sizes)
    assert (data.test is None) == (test_fraction == 0.0 or max(sizes) < 3)
    for split, fraction in ((data.val, val_fraction), (data.test, test_fraction)):
        counts = Counter(split.labels) if split is not None else Counter()
        for label, size in enumerate(sizes):
            assert abs(counts[label] - fraction * size) < 1
            if size >= 3 and fraction > 0:
                assert counts[label] >= 1
    for label in range(len(sizes)):
        assert label in data.train.labels
        assert label in data.val.labels
    assert data.report.class_balance["train"] == {c: data.train.labels.count(c) for c in range(len(sizes))}


# -- the report -------------------------------------------------------------------------------------
def test_report_counts_shared_duplicates(tmp_path: Path) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", [*rows(3, 3), {"text": "  Hello\tWORLD ", "label": 0}])
    val = write_jsonl(tmp_path / "val.jsonl", [*rows(1, 1), {"text": "hello world", "label": 1}])
    test = write_jsonl(
        tmp_path / "test.jsonl", [{"text": "HELLO  world", "label": 0}, {"text": "x", "label": 0}]
    )
    data = load_data(DataSpec(train=str(train), val=str(val), test=str(test)))
    report = data.report
    assert isinstance(report, DataReport)
    assert report.shared_duplicates == {"train/val": 3, "train/test": 1, "val/test": 1}
    assert report.class_balance == {"train": {0: 4, 1: 3}, "val": {0: 1, 1: 2}, "test": {0: 2, 1: 0}}
    lines = report.lines()
    assert lines[0] == "train: 7 rows; per class 0: 4 (57.1%), 1: 3 (42.9%)"
    assert (
        "texts shared between splits (case and whitespace folded): train/val 3, train/test 1, val/test 1"
        in lines
    )
    assert any(line.startswith("warning: 1 text appears in both train and test") for line in lines)
    assert "note: test has no rows of class 1" in lines


def test_report_of_a_clean_split(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", rows(20, 20))
    report = load_data(DataSpec(path=str(path))).report
    assert report.shared_duplicates == {"train/val": 0, "train/test": 0, "val/test": 0}
    assert not any(line.startswith(("warning", "note")) for line in report.lines())


# -- the demo dataset -------------------------------------------------------------------------------
def test_demo_dataset_is_split_like_one_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    demo = write_jsonl(tmp_path / "demo.jsonl", [{**r, "topic": "misc"} for r in rows(30, 30)])
    module = types.ModuleType("probekit.datasets")
    module.DEMO_SAFETY = demo  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "probekit.datasets", module)
    data = load_data(DataSpec(split_seed=1))
    assert data.train.source == f"{demo} (split seed 1)"
    assert data.label_map == {"0": 0, "1": 1}
    assert pairs(data) == Counter((r["text"], r["label"]) for r in rows(30, 30))


def test_demo_dataset_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "probekit.datasets", None)
    assert "the demo dataset (probekit.datasets) is not installed" in error(DataSpec())


def test_shipped_demo_dataset_loads() -> None:
    datasets = pytest.importorskip("probekit.datasets")
    if not Path(datasets.DEMO_SAFETY).is_file():
        pytest.skip("the shipped demo dataset is not there yet")
    data = load_data(DataSpec())
    assert data.label_map == {"0": 0, "1": 1}
    assert data.test is not None
    assert all(isinstance(split, Split) for split in data.splits())


# -- issue #13: bounded labels, repeated keys, invisible texts, record size, missing paths -----------
HUGE = 1_000_000_000_000


def test_a_huge_label_is_a_gap_and_nothing_is_allocated_by_its_value(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [*rows(3, 3), {"text": "z", "label": HUGE}])
    assert error(DataSpec(path=str(path))) == (
        f"{path}:7: field 'label': label {HUGE} but no row has label 2; class indices must run 0..K-1 "
        "without gaps (or pass data.label_map)"
    )
    path = write_jsonl(tmp_path / "two.jsonl", [{"text": "a", "label": 0}, {"text": "b", "label": HUGE}])
    assert error(DataSpec(path=str(path))).startswith(
        f"{path}:2: field 'label': label {HUGE} but no row has label 1"
    )
    # through a label map: outside its classes
    path = write_jsonl(tmp_path / "m.jsonl", [*rows(3, 3), {"text": "z", "label": HUGE}])
    assert error(DataSpec(path=str(path), label_map={"a": 0, "b": 1})) == (
        f"{path}:7: field 'label': label {HUGE} is outside 0..1 (data.label_map has 2 classes)"
    )


@pytest.mark.parametrize(
    ("label_map", "needle"),
    [
        ({"a": 0, "b": HUGE}, f"missing 1; label 'b' maps to {HUGE}"),
        ({"a": 0, "b": 1, "c": HUGE}, f"missing 2; label 'c' maps to {HUGE}"),
        ({"a": HUGE, "b": 0, "c": 2}, "missing 1; label 'c' maps to 2"),
        ({"a": 0, "b": 2**62, "c": 2**63}, f"missing 1; label 'b' maps to {2**62}"),
    ],
)
def test_a_huge_index_in_label_map_is_a_gap(label_map: dict[str, int], needle: str) -> None:
    with pytest.raises(ValidationError) as info:
        DataSpec(label_map=label_map)
    assert "without gaps" in str(info.value)
    assert needle in str(info.value)


def test_many_labels_in_a_gapped_label_map_are_capped() -> None:
    label_map = {f"l{i}": i for i in range(40)} | {"far": HUGE}
    with pytest.raises(ValidationError) as info:
        DataSpec(label_map=label_map)
    assert "... (41 in all) (missing 40; label 'far' maps to" in str(info.value)


@pytest.mark.parametrize(
    ("line", "key"),
    [
        ('{"text": "a", "label": 0, "text": "b"}', "text"),
        ('{"text": "a", "label": 0, "label": 1}', "label"),
        ('{"text": "a", "label": 0, "meta": {"id": 1, "id": 2}}', "id"),
        ('{"text": "a", "label": 0, "meta": [{"k": 1, "k": 1}]}', "k"),
    ],
)
def test_jsonl_repeated_key_is_refused(tmp_path: Path, line: str, key: str) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "ok", "label": 1}\n' + line + "\n", encoding="utf-8")
    assert error(DataSpec(path=str(path))) == f"{path}:2: key {key!r} appears twice in this record"
    with pytest.raises(DataError, match="appears twice"):
        read_records(path)


def test_parquet_repeated_column_is_refused(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "d.parquet"
    table = pa.Table.from_arrays(
        [pa.array(["a", "b"]), pa.array([0, 1]), pa.array(["c", "d"])], names=["text", "label", "text"]
    )
    pq.write_table(table, path)
    assert error(DataSpec(path=str(path))) == (
        f"{path}: column 'text' appears more than once (columns: 'text', 'label', 'text')"
    )


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("\u200b", "U+200B ZERO WIDTH SPACE"),
        ("\ufeff", "U+FEFF ZERO WIDTH NO-BREAK SPACE"),
        ("\u2060\u2060", "U+2060 WORD JOINER"),
        ("\u202e", "U+202E RIGHT-TO-LEFT OVERRIDE"),
        ("\x00", "U+0000"),
        ("\u200b \x00", "U+200B ZERO WIDTH SPACE, U+0020 SPACE, U+0000"),
        ("\u3164\u115f", "U+3164 HANGUL FILLER"),
        ("\ue000", "U+E000"),  # private use
        ("\U000e0041", "U+E0041 TAG LATIN CAPITAL LETTER A"),
        ("\u2800", "U+2800 BRAILLE PATTERN BLANK"),
        ("\ufe0f\u034f", "U+FE0F VARIATION SELECTOR-16, U+034F COMBINING GRAPHEME JOINER"),
    ],
)
def test_texts_of_only_invisible_characters_are_refused_like_empty_ones(
    tmp_path: Path, text: str, named: str
) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": 0}, {"text": text, "label": 1}])
    message = error(DataSpec(path=str(path)))
    assert message.startswith(f"{path}:2: field 'text' has only invisible characters ({named}")


def test_invisible_characters_among_visible_ones_are_kept(tmp_path: Path) -> None:
    texts = ["zero\u200bwidth", "\ufeffbom first", "a\x00b", "rtl \u202eevil", "\u3000wide space", "x"]
    records = [{"text": text, "label": i % 2} for i, text in enumerate(texts)]
    path = write_jsonl(tmp_path / "d.jsonl", records)
    data = load_data(DataSpec(path=str(path), val_fraction=0.3, test_fraction=0.0))
    assert sorted(text for split in data.splits() for text in split.texts) == sorted(texts)


def test_the_invisible_listing_is_capped() -> None:
    from probekit.data import text_problem

    text = " ".join(chr(code) for code in (*range(0x200B, 0x2010), *range(0x2060, 0x2065))) * 1000
    problem = text_problem(text)
    assert problem is not None
    assert problem.startswith("has only invisible characters (U+200B ZERO WIDTH SPACE, U+0020 SPACE, ")
    assert problem.endswith(", ... (11 distinct))")
    assert len(problem) < 200


def test_a_lone_surrogate_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a", "label": 0}\n{"text": "ab\\udc80c", "label": 1}\n', encoding="utf-8")
    assert error(DataSpec(path=str(path))) == (
        f"{path}:2: field 'text' holds a lone surrogate U+DC80 at character 3, which is not valid Unicode"
    )


def test_max_text_chars_field() -> None:
    assert DataSpec().max_text_chars == 1_000_000
    assert DataSpec.model_fields["max_text_chars"].description
    for bad in (0, -1, 2**31):
        with pytest.raises(ValidationError, match="max_text_chars"):
            DataSpec(max_text_chars=bad)
    assert DataSpec(max_text_chars=2**31 - 1).max_text_chars == 2**31 - 1


def test_a_text_longer_than_max_text_chars_is_refused_in_every_format(tmp_path: Path) -> None:
    records = [*rows(3, 3), {"text": "x" * 41, "label": 1}]
    path = write_jsonl(tmp_path / "d.jsonl", records)
    assert error(DataSpec(path=str(path), max_text_chars=40)) == (
        f"{path}:7: field 'text' holds 41 characters; data.max_text_chars is 40; "
        "shorten the text or raise data.max_text_chars"
    )
    assert load_data(DataSpec(path=str(path), max_text_chars=41)).num_classes == 2
    csv_path = tmp_path / "d.csv"
    csv_path.write_text(
        "text,label\n" + "".join(f"{r['text']},{r['label']}\n" for r in records), encoding="utf-8"
    )
    assert error(DataSpec(path=str(csv_path), max_text_chars=40)).startswith(
        f"{csv_path}:8: field 'text' holds 41 characters; data.max_text_chars is 40"
    )
    parquet = write_parquet(tmp_path / "d.parquet", records)
    assert error(DataSpec(path=str(parquet), max_text_chars=40)).startswith(
        f"{parquet}: row 7: field 'text' holds 41 characters"
    )


def test_a_jsonl_line_past_the_bound_is_refused_before_it_is_parsed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import probekit.data

    limit = 4 * 10 + 64 * 1024
    path = tmp_path / "d.jsonl"
    big = json.dumps({"text": "y" * limit, "label": 1})
    path.write_text('{"text": "a", "label": 0}\n' + big + "\n", encoding="utf-8")
    parsed: list[int] = []
    real = json.loads

    def spy(text: str, **kwargs: Any) -> Any:
        parsed.append(len(text))
        return real(text, **kwargs)

    monkeypatch.setattr(probekit.data.json, "loads", spy)
    assert error(DataSpec(path=str(path), max_text_chars=10)) == (
        f"{path}:2: line holds {len(big)} bytes; a record may hold at most {limit} (4 bytes per character "
        "of data.max_text_chars=10, plus 64 KiB); shorten the text or raise data.max_text_chars"
    )
    assert max(parsed) < 100  # the first line only


def test_csv_fields_up_to_max_text_chars_are_read_and_the_csv_limit_is_put_back(tmp_path: Path) -> None:
    import csv

    before = csv.field_size_limit()
    long_text = "w " * 100_000  # 200,000 characters: past the csv module's default limit
    path = tmp_path / "d.csv"
    path.write_text(f"text,label\n{long_text},0\nshort,1\nb,0\nc,1\n", encoding="utf-8")
    records = read_records(path, max_text_chars=300_000)
    assert records[0][1]["text"] == long_text
    assert csv.field_size_limit() == before
    message = error(DataSpec(path=str(path), max_text_chars=150_000))
    assert message.startswith(f"{path}:2: a field holds more than 150000 characters; data.max_text_chars is")
    assert csv.field_size_limit() == before


def test_missing_paths_and_folders_are_named_before_the_suffix(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    assert error(DataSpec(path=str(missing))) == f"{missing}: no such file or folder"
    val = write_jsonl(tmp_path / "v.jsonl", rows(1, 1))
    assert error(DataSpec(train=str(missing), val=str(val))) == f"{missing}: no such file or folder"
    folder = tmp_path / "splits"
    folder.mkdir()
    message = error(DataSpec(train=str(folder), val=str(val)))
    assert message.startswith(f"{folder}: is a folder; give one data file")
    assert "train --data" in message
    with pytest.raises(DataError, match="no such file"):
        read_records(missing)
    with pytest.raises(DataError, match="is a folder"):
        read_records(folder)


def test_read_split_names_missing_files_and_folders(tmp_path: Path) -> None:
    from probekit.data import read_split

    spec = DataSpec()
    with pytest.raises(DataError, match=r"nowhere: no such file or folder$"):
        read_split(tmp_path / "nowhere", spec, {"0": 0, "1": 1})
    with pytest.raises(DataError, match="is a folder; give one data file"):
        read_split(tmp_path, spec, {"0": 0, "1": 1})


def test_text_lines_skip_blank_lines_and_refuse_invisible_ones(tmp_path: Path) -> None:
    import io

    from probekit.data import read_text_lines, stream_text_lines

    path = tmp_path / "t.txt"
    path.write_bytes(b"\xef\xbb\xbfone\r\n\n   \r\ntwo \xe2\x80\xa8 still two\rthree\n")
    assert read_text_lines(path) == ["one", "two \u2028 still two", "three"]
    path.write_text("one\n\n\u200b\u200b\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"^{path}:3: has only invisible characters \(U\+200B"):
        read_text_lines(path)
    path.write_text("one\n" + "z" * 11 + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"^{path}:2: holds 11 characters; data.max_text_chars is 10"):
        read_text_lines(path, max_text_chars=10)
    assert stream_text_lines(io.StringIO("a\n\n \t\nb\r\n")) == ["a", "b"]
    with pytest.raises(DataError, match=r"^<stdin>:3: has only invisible characters \(U\+FEFF"):
        stream_text_lines(io.StringIO("a\n\n\ufeff\n"))

    class Stream(io.StringIO):
        asked: ClassVar[list[int]] = []

        def readline(self, size: int | None = -1, /) -> str:
            self.asked.append(-1 if size is None else size)
            return super().readline(size)

    stream = Stream("ok\n" + "q" * 1000 + "\n")
    with pytest.raises(DataError, match=r"^<stdin>:2: line holds more than 10 characters"):
        stream_text_lines(stream, max_text_chars=10)
    assert max(stream.asked) == 12  # never the whole line


def test_a_hub_dataset_id_says_how_to_load_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    message = error(DataSpec(path="allenai/wildguardmix"))
    assert message.startswith("allenai/wildguardmix: no such file or folder; 'allenai/wildguardmix' looks")
    assert "datasets.load_dataset('allenai/wildguardmix')" in message and "data=" in message
    assert error(DataSpec(path="data/train.jsonl")) == "data/train.jsonl: no such file or folder"
    assert error(DataSpec(path=str(tmp_path / "a" / "b"))).endswith("no such file or folder")
