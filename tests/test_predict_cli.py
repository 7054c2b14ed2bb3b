"""``probekit predict`` as a pipeline step: input ids and asked-for fields passed through, CSV
output, and a hint when it waits on a terminal's standard input."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import pytest

from probekit import Probe
from tests import engine_fixtures
from tests.engine_fixtures import ToyData, run_cli, tiny_binary_run, write_jsonl

bert_dir = engine_fixtures.bert_dir
toy_data = engine_fixtures.toy_data
single_thread = engine_fixtures.single_thread


@pytest.fixture(scope="module")
def run(bert_dir: Path, toy_data: ToyData, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny binary run (1 epoch, linear head): a middling probe."""
    return tiny_binary_run(bert_dir, toy_data, tmp_path_factory.mktemp("predict-run"))


@pytest.fixture
def inputs(tmp_path: Path, toy_data: ToyData) -> Path:
    rows = [
        {**row, "id": f"r{i}", "source": ["web", "chat"][i % 2]}
        for i, row in enumerate(toy_data.rows["test"][:6])
    ]
    return write_jsonl(tmp_path / "in.jsonl", rows)


def test_ids_and_kept_fields_pass_through(
    run: Path, inputs: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_cli(capsys, "predict", run, "--input", inputs, "--keep", "source,label")
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    source = [json.loads(line) for line in inputs.read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in rows] == [s["id"] for s in source]
    assert [r["source"] for r in rows] == [s["source"] for s in source]
    assert [r["input_label"] for r in rows] == [s["label"] for s in source]  # 'label' is the prediction's
    assert list(rows[0])[:3] == ["id", "source", "input_label"]
    probs = Probe.from_pretrained(run).predict_proba([s["text"] for s in source])
    assert [r["probability"] for r in rows] == pytest.approx(probs, abs=1e-6)


def test_csv_output(run: Path, inputs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(capsys, "predict", run, "--input", inputs, "--format", "csv")
    assert code == 0, err
    table = list(csv.DictReader(io.StringIO(out)))
    assert len(table) == 6
    assert {"id", "text", "label", "probability", "confidence"} <= set(table[0])
    names = [k for k in table[0] if k.startswith("probabilities.")]
    assert len(names) == 2
    for row in table:
        assert sum(float(row[n]) for n in names) == pytest.approx(1.0, abs=1e-6)
        assert float(row[names[1]]) == pytest.approx(float(row["probability"]), abs=1e-6)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--format", "xml"), "--format 'xml': expected jsonl or csv"),
        (("--keep", "nope"), "no field 'nope' to keep"),
        (("--keep", "sorce"), "did you mean 'source'"),
        (("--keep", "a,,b"), "expected field names separated by commas"),
    ],
)
def test_bad_options_are_one_line(
    run: Path, inputs: Path, capsys: pytest.CaptureFixture[str], args: tuple[str, ...], message: str
) -> None:
    code, _, err = run_cli(capsys, "predict", run, "--input", inputs, *args)
    assert code == 2 and message in err and err.strip().count("\n") == 0


def test_keep_needs_a_data_file(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lines = tmp_path / "texts.txt"
    lines.write_text("the cat sat\nthe dog ran\n", encoding="utf-8")
    code, _, err = run_cli(capsys, "predict", run, "--input", lines, "--keep", "id")
    assert code == 2 and "needs a data file" in err
    code, _, err = run_cli(capsys, "predict", run, "the cat sat", "--keep", "id")
    assert code == 2 and "give --input FILE" in err


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("terminal", [True, False])
def test_a_terminal_stdin_gets_a_hint(
    run: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, terminal: bool
) -> None:
    stdin: Any = (_Terminal if terminal else io.StringIO)("the cat sat on the mat\n")
    monkeypatch.setattr("sys.stdin", stdin)
    code, out, err = run_cli(capsys, "predict", run)
    assert code == 0, err
    assert len(out.splitlines()) == 1
    assert ("reading texts from the terminal, one per line; end with Ctrl-D" in err) is terminal
