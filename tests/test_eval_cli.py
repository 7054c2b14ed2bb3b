"""``probekit eval``: per-row predictions, metrics per group, bootstrap intervals, --threshold.

The command runs in-process on one tiny trained run (module scope); the bootstrap is also checked
against a hand-written reference (`probekit.metrics.compute_metrics` on each resample's rows).
"""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import probekit.plots
from probekit import Probe
from probekit.bootstrap import (
    BINARY_KEYS,
    binary_resamples,
    macro_auroc_resamples,
    percentile_interval,
    resample_indices,
)
from probekit.metrics import compute_metrics
from probekit.multiclass_metrics import multiclass_metrics
from tests import engine_fixtures
from tests.engine_fixtures import (
    ToyData,
    assert_one_line_error,
    quiet_train,
    read_jsonl,
    run_cli,
    tiny_binary_run,
    write_jsonl,
)

bert_dir = engine_fixtures.bert_dir
toy_data = engine_fixtures.toy_data
single_thread = engine_fixtures.single_thread

SOURCES = ("web", "forum", "chat")


@pytest.fixture(scope="module")
def run(bert_dir: Path, toy_data: ToyData, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny binary run (1 epoch, linear head): a middling probe."""
    return tiny_binary_run(bert_dir, toy_data, tmp_path_factory.mktemp("eval-run"))


@pytest.fixture(scope="module")
def rows(toy_data: ToyData) -> list[dict[str, Any]]:
    """Test and val rows with an ``id`` and a ``source``; the group ``mail`` holds negatives only."""
    found = [
        {**row, "id": f"r{i}", "source": SOURCES[i % 3]}
        for i, row in enumerate(toy_data.rows["test"] + toy_data.rows["val"])
    ]
    found += [
        {"text": "the cat sat on the mat", "label": 0, "id": "m1", "source": "mail"},
        {"text": "the dog ran in the park", "label": 0, "id": "m2", "source": "mail"},
    ]
    return found


@pytest.fixture(scope="module")
def data(rows: list[dict[str, Any]], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("eval-data") / "mixed.jsonl", rows)


@pytest.fixture(scope="module")
def evaluated(run: Path, data: Path) -> dict[str, Any]:
    """``eval --by source --json`` on the mixed file (default bootstrap), as printed."""
    import contextlib
    import io

    from probekit.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["eval", str(run), "--data", str(data), "--by", "source", "--json"]) == 0
    return json.loads(out.getvalue())  # type: ignore[no-any-return]


def probabilities(run: Path, texts: list[str]) -> np.ndarray:
    return np.asarray(Probe.from_pretrained(run).predict_proba(texts), dtype=np.float64)


# -- predictions.jsonl ------------------------------------------------------------------------------
def test_predictions_file_matches_predict_proba(
    run: Path, data: Path, rows: list[dict[str, Any]], evaluated: dict[str, Any]
) -> None:
    written = read_jsonl(run / "eval" / "mixed.predictions.jsonl")
    texts = [row["text"] for row in rows]
    probe = Probe.from_pretrained(run)
    names, threshold = list(probe.label_names), evaluated["threshold"]
    assert threshold == pytest.approx(probe.threshold)
    assert [r["id"] for r in written] == [row["id"] for row in rows]
    assert [r["text"] for r in written] == texts
    assert [r["label"] for r in written] == [names[row["label"]] for row in rows]
    expected = probabilities(run, texts)
    assert [r["probability"] for r in written] == pytest.approx(expected.tolist(), abs=1e-6)
    assert [r["decision"] for r in written] == [names[int(p >= threshold)] for p in expected]
    assert [r["decision"] for r in written] == [r["label"] for r in probe.predict(texts)]
    assert list(written[0]) == [
        "id",
        "text",
        "label",
        "probability",
        "confidence",
        "probabilities",
        "decision",
    ]


def test_a_csv_without_ids_numbers_its_rows_by_line(
    run: Path, rows: list[dict[str, Any]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "plain.csv"
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["text", "label", "source"])
        writer.writeheader()
        writer.writerows({"text": r["text"], "label": r["label"], "source": r["source"]} for r in rows[:10])
    code, out, err = run_cli(capsys, "eval", run, "--data", path, "--resamples", "0", "--by", "source")
    assert code == 0, err
    written = read_jsonl(run / "eval" / "plain.predictions.jsonl")
    assert [r["id"] for r in written] == list(range(2, 12))  # the header is line 1
    assert f"predictions written to {run / 'eval' / 'plain.predictions.jsonl'}" in out
    assert "bootstrap" not in out


# -- --by ---------------------------------------------------------------------------------------------
def test_by_source_equals_each_groups_own_evaluation(
    run: Path,
    rows: list[dict[str, Any]],
    evaluated: dict[str, Any],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    groups = evaluated["groups"]
    assert (groups["field"], groups["metric"]) == ("source", "auroc")
    assert list(groups["by_value"]) == ["chat", "forum", "mail", "web"]
    for name, metrics in groups["by_value"].items():
        path = write_jsonl(tmp_path / f"{name}.jsonl", [row for row in rows if row["source"] == name])
        code, out, err = run_cli(capsys, "eval", run, "--data", path, "--json", "--resamples", "0")
        assert code == 0, err
        alone = json.loads(out)
        alone.pop("data")
        assert metrics.pop("confusion") == alone.pop("confusion"), name
        assert metrics == pytest.approx(alone, abs=1e-6), name
    mail = groups["by_value"]["mail"]
    assert mail["auroc"] is None and mail["n"] == 2 and mail["positives"] == 0
    worst = groups["worst"]
    assert [w["group"] for w in worst] == sorted(
        ("chat", "forum", "web"), key=lambda g: groups["by_value"][g]["auroc"]
    )
    assert all(w["auroc"] == groups["by_value"][w["group"]]["auroc"] for w in worst)


def test_by_source_in_text(run: Path, data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(capsys, "eval", run, "--data", data, "--by", "source", "--resamples", "0")
    assert code == 0, err
    lines = out.splitlines()
    assert "by source (4 groups)" in lines and "worst groups by auroc" in lines
    [mail] = [line for line in lines if line.startswith("mail ")]
    assert re.fullmatch(r"mail +2 +0 .*n/a.*", mail), mail
    assert "(1 group with auroc n/a left out)" in lines
    assert "nan" not in out


def test_an_unknown_by_field_is_one_line_naming_the_file_and_fields(
    run: Path, data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_cli(capsys, "eval", run, "--data", data, "--by", "sorce")
    assert_one_line_error(
        code, out, err, str(data), "'sorce'", "fields: text, label, id, source", "did you mean 'source'?"
    )


# -- bootstrap intervals ----------------------------------------------------------------------------
def test_intervals_hold_the_point_and_follow_the_seed(
    run: Path, data: Path, evaluated: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    intervals = evaluated["intervals"]
    assert list(intervals) == list(BINARY_KEYS)
    assert evaluated["bootstrap"] == {"resamples": 1000, "seed": 0, "level": 0.95}
    for key in ("auroc", "auprc"):
        lo, hi = intervals[key]
        assert lo <= evaluated[key] <= hi, key
        assert hi - lo > 0.01  # a middling probe on ~100 rows is uncertain
    for bounds in intervals.values():
        assert 0.0 <= bounds[0] <= bounds[1] <= 1.0
    code, out, err = run_cli(capsys, "eval", run, "--data", data, "--json", "--by", "source")
    assert code == 0, err
    assert json.loads(out)["intervals"] == intervals  # the same seed: the same intervals
    code, out, err = run_cli(capsys, "eval", run, "--data", data, "--json", "--seed", "7")
    assert code == 0, err
    again = json.loads(out)
    assert again["bootstrap"]["seed"] == 7 and again["intervals"]["auroc"] != intervals["auroc"]
    assert again["auroc"] == evaluated["auroc"]


def test_text_output_prints_counts_as_integers_and_intervals(
    run: Path, data: Path, evaluated: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_cli(capsys, "eval", run, "--data", data, "--resamples", "200")
    assert code == 0, err
    lines = out.splitlines()
    assert f"n                    {len(read_jsonl(data))}" in lines
    assert re.search(r"^positives +\d+$", out, flags=re.M)
    assert re.search(r"^auroc +\d\.\d{4}$", out, flags=re.M)  # the headline line keeps its shape
    assert "95% bootstrap intervals (200 resamples of the rows, seed 0)" in lines
    assert re.search(r"^auroc +\d\.\d{4} \[\d\.\d{4}, \d\.\d{4}\]$", out, flags=re.M)
    counts = evaluated["confusion"]
    assert re.search(rf"^true 1 +TP {counts['tp']} +FN {counts['fn']}$", out, flags=re.M)
    assert re.search(rf"^true 0 +FP {counts['fp']} +TN {counts['tn']}$", out, flags=re.M)
    assert not re.search(
        r"\b\d+\.0000\b", "\n".join(line for line in lines if line.startswith(("n ", "pos")))
    )


def test_a_file_of_one_class_has_no_intervals(
    run: Path, rows: list[dict[str, Any]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_jsonl(tmp_path / "negatives.jsonl", [row for row in rows if row["label"] == 0])
    code, out, err = run_cli(capsys, "eval", run, "--data", path, "--json")
    assert code == 0, err
    found = json.loads(out)
    assert found["auroc"] is None and found["intervals"]["auroc"] is None
    code, out, err = run_cli(capsys, "eval", run, "--data", path)
    assert code == 0, err
    assert "auroc                n/a" in out.splitlines()
    assert "nan" not in out


# -- --threshold ----------------------------------------------------------------------------------------
def test_threshold_moves_the_decisions(
    run: Path, data: Path, rows: list[dict[str, Any]], capsys: pytest.CaptureFixture[str]
) -> None:
    scores = probabilities(run, [row["text"] for row in rows])
    labels = np.asarray([row["label"] for row in rows])
    for threshold in (0.0, float(np.median(scores)), 1.0):
        code, out, err = run_cli(
            capsys, "eval", run, "--data", data, "--json", "--resamples", "0", "--threshold", str(threshold)
        )
        assert code == 0, err
        found = json.loads(out)
        flagged = scores >= threshold
        assert found["threshold"] == threshold
        assert found["confusion"] == {
            "tp": int(np.sum(flagged & (labels == 1))),
            "fp": int(np.sum(flagged & (labels == 0))),
            "fn": int(np.sum(~flagged & (labels == 1))),
            "tn": int(np.sum(~flagged & (labels == 0))),
        }
        decisions = [r["decision"] for r in read_jsonl(run / "eval" / "mixed.predictions.jsonl")]
        names = list(Probe.from_pretrained(run).label_names)
        assert decisions == [names[int(f)] for f in flagged]
    assert found["confusion"]["tp"] + found["confusion"]["fp"] == int(np.sum(scores >= 1.0))


@pytest.mark.parametrize(
    ("option", "value", "fragment"),
    [
        ("--threshold", "1.5", "--threshold 1.5: expected a probability in [0, 1]"),
        ("--threshold", "-0.1", "--threshold -0.1: expected a probability in [0, 1]"),
        ("--threshold", "nan", "--threshold nan: expected a probability in [0, 1]"),
        ("--resamples", "-1", "--resamples -1: expected 0 (no intervals) to 100000"),
        ("--seed", "-3", "--seed -3: expected an integer in 0 .. 2^32-1"),
    ],
)
def test_bad_options_are_one_line_errors(
    run: Path, data: Path, option: str, value: str, fragment: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_cli(capsys, "eval", run, "--data", data, option, value)
    assert_one_line_error(code, out, err, fragment)


# -- the bootstrap itself ------------------------------------------------------------------------------
def reference(labels: np.ndarray, scores: np.ndarray, resamples: int, seed: int) -> dict[str, list[float]]:
    """The slow bootstrap: `compute_metrics` on the rows of each resample."""
    found: dict[str, list[float]] = {key: [] for key in BINARY_KEYS}
    for chunk in resample_indices(labels.size, resamples, seed):
        for rows in chunk:
            metrics = compute_metrics(labels[rows], scores[rows])
            for key in BINARY_KEYS:
                found[key].append(metrics[key])
    return found


@given(
    st.lists(st.tuples(st.integers(0, 1), st.integers(0, 8)), min_size=1, max_size=40),
    st.integers(0, 2**32 - 1),
)
def test_vectorised_bootstrap_equals_the_reference(pairs: list[tuple[int, int]], seed: int) -> None:
    labels = np.asarray([label for label, _ in pairs])
    scores = np.asarray([score / 8 for _, score in pairs])  # few distinct values: ties
    fast = binary_resamples(labels, scores, 30, seed)
    slow = reference(labels, scores, 30, seed)
    for key in BINARY_KEYS:
        np.testing.assert_allclose(fast[key], slow[key], atol=1e-12, equal_nan=True, err_msg=key)
        point = compute_metrics(labels, scores)[key]
        bounds = percentile_interval(fast[key], point)
        if bounds is not None:  # what a percentile interval guarantees: ordered, inside the draws
            defined = fast[key][np.isfinite(fast[key])]
            assert defined.min() <= bounds[0] <= bounds[1] <= defined.max()
        else:
            assert math.isnan(point) or np.isfinite(fast[key]).sum() < 2


def test_macro_auroc_resamples_equal_the_multiclass_metric() -> None:
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 3, 60)
    probs = rng.dirichlet([1.0, 1.0, 1.0], 60)
    fast = macro_auroc_resamples(labels, probs, 40, 5)
    slow = [
        multiclass_metrics(labels[rows], probs[rows], ["a", "b", "c"])["auroc"]
        for chunk in resample_indices(60, 40, 5)
        for rows in chunk
    ]
    np.testing.assert_allclose(fast, slow, atol=1e-12)


def test_intervals_narrow_with_more_rows() -> None:
    def width(n: int) -> float:
        rng = np.random.default_rng(n)
        labels = rng.integers(0, 2, n)
        scores = np.clip(0.5 + 0.25 * (labels - 0.5) + rng.normal(0, 0.2, n), 0, 1)
        bounds = percentile_interval(binary_resamples(labels, scores, 500, 0)["auroc"], 0.5)
        assert bounds is not None
        return bounds[1] - bounds[0]

    assert width(2000) < width(200) / 2 < width(50) / 2


# -- other tasks ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["multilabel", "regression"])
def test_multilabel_and_regression_runs_write_predictions_and_groups(
    kind: str, bert_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.test_multilabel_regression import (
        MULTILABEL,
        REGRESSION,
        config_for,
        multilabel_rows,
        regression_rows,
        toy,
    )

    made = multilabel_rows(192, seed=5) if kind == "multilabel" else regression_rows(192, seed=6)
    data = toy(tmp_path / "data", made)
    config = config_for(bert_dir, data, MULTILABEL if kind == "multilabel" else REGRESSION, "train.epochs=1")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(probekit.plots, "write_report_plots", lambda *a, **k: [])
        trained = quiet_train(config, tmp_path / "run").run_dir
    test_rows = [{**row, "source": SOURCES[i % 2]} for i, row in enumerate(data.rows["test"])]
    path = write_jsonl(tmp_path / "held.jsonl", test_rows)
    code, out, err = run_cli(capsys, "eval", trained, "--data", path, "--by", "source", "--json")
    assert code == 0, err
    found = json.loads(out)
    assert "intervals" not in found and isinstance(found["n"], int)
    assert set(found["groups"]["by_value"]) == {"web", "forum"}
    metric = found["groups"]["metric"]
    assert metric == ("mae" if kind == "regression" else "auroc")
    written = read_jsonl(trained / "eval" / "held.predictions.jsonl")
    assert [r["id"] for r in written] == list(range(1, len(test_rows) + 1))
    probe = Probe.from_pretrained(trained)
    expected = probe.predict([row["text"] for row in test_rows])
    if kind == "regression":
        assert [r["value"] for r in written] == pytest.approx([e["value"] for e in expected], abs=1e-5)
        assert [r["label"] for r in written] == pytest.approx([row["label"] for row in test_rows])
        assert "decision" not in written[0]
    else:
        assert [r["decision"] for r in written] == [e["labels"] for e in expected]
        assert written[0]["label"] == {name: test_rows[0][name] for name in ("poison", "bomb")} and set(
            written[0]["probabilities"]
        ) == {"poison", "bomb"}
    code, out, err = run_cli(capsys, "eval", trained, "--data", path, "--threshold", "0.5")
    assert_one_line_error(code, out, err, f"a {kind} probe has no probability threshold to override")
