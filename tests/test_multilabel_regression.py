"""The ``multilabel`` (with unknown labels) and ``regression`` tasks end to end: the masked loss
(properties), the data forms and their errors, runs that are killed and resume bit-identical,
reload and predict, the cache, ``eval``, ``predict`` and the sweep."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from probekit import Probe
from probekit.config import ThresholdSpec, compose_config
from probekit.data import DataError, DataSpec, load_data
from probekit.errors import UserError
from probekit.multilabel_metrics import multilabel_metrics
from probekit.tasks.base import Scores
from probekit.tasks.multilabel import MultilabelTask, masked_bce
from tests.engine_fixtures import (  # noqa: F401  (fixtures)
    FAST,
    NEUTRAL,
    ToyData,
    bert_dir,
    quiet_train,
    run_cli,
    write_jsonl,
)

LABELS = ("poison", "bomb")


def multilabel_rows(n: int, seed: int, unknown: float = 0.2) -> list[dict[str, Any]]:
    """Rows with a column per label (1 when the text holds the word); some ``bomb`` cells null."""
    rng = random.Random(seed)
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    while len(rows) < n:
        words = rng.choices(NEUTRAL, k=rng.randint(2, 5))
        cells = {}
        for word in LABELS:
            cells[word] = int(rng.random() < 0.4)
            if cells[word]:
                words.insert(rng.randint(0, len(words)), word)
        text = " ".join(words)
        if text in seen:
            continue
        seen.add(text)
        row: dict[str, Any] = {"text": text, **cells}
        if rng.random() < unknown:
            row["bomb"] = None
        rows.append(row)
    return rows


def regression_rows(n: int, seed: int) -> list[dict[str, Any]]:
    """Rows whose target grows with the number of ``bomb`` words."""
    rng = random.Random(seed)
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    while len(rows) < n:
        words = rng.choices(NEUTRAL, k=rng.randint(2, 5))
        count = rng.randint(0, 3)
        for _ in range(count):
            words.insert(rng.randint(0, len(words)), "bomb")
        text = " ".join(words)
        if text not in seen:
            seen.add(text)
            rows.append({"text": text, "label": 10 + 5 * count + rng.random()})
    return rows


def toy(folder: Path, rows: list[dict[str, Any]]) -> ToyData:
    splits = {"train": rows[:96], "val": rows[96:144], "test": rows[144:]}
    for name, split in splits.items():
        write_jsonl(folder / f"{name}.jsonl", split)
    return ToyData(folder, splits)


@pytest.fixture(scope="module")
def flags(tmp_path_factory: pytest.TempPathFactory) -> ToyData:
    return toy(tmp_path_factory.mktemp("flags"), multilabel_rows(192, seed=5))


@pytest.fixture(scope="module")
def scores(tmp_path_factory: pytest.TempPathFactory) -> ToyData:
    return toy(tmp_path_factory.mktemp("scores"), regression_rows(192, seed=6))


MULTILABEL = ("task.kind=multilabel", "head.num_classes=2", 'data.label_fields=["poison", "bomb"]')
REGRESSION = ("task.kind=regression", "head.num_classes=1", "train.monitor=mae")


def config_for(model: Path, data: ToyData, task: tuple[str, ...], *extra: str, test: bool = True) -> Any:
    return compose_config(
        preset="safety8k",
        assignments=[f"model.name={model}", *data.assignments(test=test), *FAST, *task, *extra],
    )


# -- the masked loss -----------------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 10),
    labels=st.integers(1, 6),
    seed=st.integers(0, 2**16),
    smoothing=st.sampled_from([0.0, 0.1]),
    weighted=st.booleans(),
)
def test_an_unknown_label_adds_nothing_to_the_loss_or_its_gradient(
    rows: int, labels: int, seed: int, smoothing: float, weighted: bool
) -> None:
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, labels, generator=gen, dtype=torch.float64)
    targets = torch.randint(0, 2, (rows, labels), generator=gen).double()
    unknown = torch.rand(rows, labels, generator=gen) < 0.4
    masked = torch.where(unknown, torch.full_like(targets, math.nan), targets)
    pos_weight = torch.rand(labels, generator=gen, dtype=torch.float64) * 3 + 0.1 if weighted else None

    a = logits.clone().requires_grad_(True)
    loss = masked_bce(a, masked, smoothing=smoothing, pos_weight=pos_weight)
    loss.backward()
    assert a.grad is not None and torch.isfinite(loss) and bool(torch.isfinite(a.grad).all())
    # zero gradient on every unknown cell
    assert bool((a.grad[unknown] == 0).all())
    # the same loss as the known cells alone, whatever the unknown cells' targets were
    known_only = sum(
        masked_bce(
            logits[i : i + 1, j : j + 1],
            targets[i : i + 1, j : j + 1],
            smoothing=smoothing,
            pos_weight=None if pos_weight is None else pos_weight[j : j + 1],
        )
        for i in range(rows)
        for j in range(labels)
        if not unknown[i, j]
    )
    torch.testing.assert_close(loss.detach(), torch.as_tensor(known_only, dtype=torch.float64))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_masked_labels_leave_the_metrics_unchanged(seed: int) -> None:
    """Whatever the scores of unknown cells, the metrics are those of the known cells."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, (30, 3)).astype(float)
    labels[:2] = [[0, 1, 0], [1, 0, 1]]
    labels[rng.random((30, 3)) < 0.3] = np.nan
    labels[:2] = [[0, 1, 0], [1, 0, 1]]
    probs = rng.random((30, 3))
    other = np.where(np.isnan(labels), rng.random((30, 3)), probs)
    a = multilabel_metrics(labels, probs, ["a", "b", "c"])
    b = multilabel_metrics(labels, other, ["a", "b", "c"])
    assert json.dumps(a, default=str) == json.dumps(b, default=str)


def test_per_label_thresholds_maximise_f1_on_the_known_val_rows() -> None:
    from sklearn.metrics import f1_score  # type: ignore[import-untyped]

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, (60, 2)).astype(float)
    labels[rng.random((60, 2)) < 0.25] = np.nan
    probs = np.clip(np.nan_to_num(labels, nan=0.5) * 0.3 + rng.random((60, 2)) * 0.7, 0, 1)
    cuts = MultilabelTask(ThresholdSpec()).bind(["a", "b"]).choose_threshold(Scores(labels, probs, 0.0))
    for j, cut in enumerate(cuts):
        known = ~np.isnan(labels[:, j])
        y, p = labels[known, j].astype(int), probs[known, j]
        best = max(f1_score(y, p >= t, zero_division=0) for t in np.unique(p))
        assert f1_score(y, p >= cut, zero_division=0) == pytest.approx(best)


# -- data ----------------------------------------------------------------------------------------
def test_multilabel_data_forms_and_their_errors(tmp_path: Path, flags: ToyData) -> None:
    data = load_data(DataSpec(path=str(flags.folder), label_fields=["poison", "bomb"]), target="multilabel")
    assert data.label_map == {"poison": 0, "bomb": 1}
    assert math.isnan(next(row for row in data.train.labels if math.isnan(row[1]))[1])
    assert data.report.lines()[0].startswith(
        "train: 96 rows; per label (positive+/negative-/unknown?) poison "
    )
    # lists of names: labels sorted from the data, absent names known to be 0
    listed = [
        {"text": f"row {i}", "labels": [n for k, n in enumerate(LABELS) if (i >> k) & 1]} for i in range(40)
    ]
    write_jsonl(tmp_path / "lists" / "train.jsonl", listed[:30])
    write_jsonl(tmp_path / "lists" / "val.jsonl", listed[30:])
    data = load_data(DataSpec(path=str(tmp_path / "lists"), label_field="labels"), target="multilabel")
    assert data.label_map == {"bomb": 0, "poison": 1} and data.train.labels[3] == (1.0, 1.0)
    cases = {
        "train.jsonl:2: field 'labels' is null; give the list of labels that apply": [
            {"text": "a", "labels": ["bomb"]},
            {"text": "b", "labels": None},
        ],
        "train.jsonl:1: field 'labels': label 'bmb' is not in data.label_map; did you mean 'bomb'": [
            {"text": "a", "labels": ["bmb"]},
        ],
    }
    for expected, rows in cases.items():
        write_jsonl(tmp_path / "bad" / "train.jsonl", rows)
        write_jsonl(tmp_path / "bad" / "val.jsonl", listed[30:])
        spec = DataSpec(path=str(tmp_path / "bad"), label_field="labels", label_map={"bomb": 0, "poison": 1})
        with pytest.raises(DataError, match=expected.replace("(", r"\(").replace(")", r"\)")):
            load_data(spec, target="multilabel")
    # a label column missing in one file
    write_jsonl(tmp_path / "cols" / "train.jsonl", flags.rows["train"])
    write_jsonl(
        tmp_path / "cols" / "val.jsonl",
        [{"text": r["text"], "poison": r["poison"]} for r in flags.rows["val"]],
    )
    with pytest.raises(
        DataError, match=r"val.jsonl:1: no field 'bomb' in this record .*data.label_fields names it"
    ):
        load_data(DataSpec(path=str(tmp_path / "cols"), label_fields=["poison", "bomb"]), target="multilabel")
    # a label with no known positive in train
    write_jsonl(tmp_path / "cols" / "train.jsonl", [{**r, "bomb": 0} for r in flags.rows["train"]])
    write_jsonl(tmp_path / "cols" / "val.jsonl", flags.rows["val"])
    with pytest.raises(DataError, match="label 'bomb' has no known positive row in train"):
        load_data(DataSpec(path=str(tmp_path / "cols"), label_fields=["poison", "bomb"]), target="multilabel")
    with pytest.raises(
        DataError, match=r"train.jsonl:1: field 'bomb': 'yes' is not 0, 1, true, false or null"
    ):
        write_jsonl(tmp_path / "cols" / "train.jsonl", [{**flags.rows["train"][0], "bomb": "yes"}])
        load_data(DataSpec(path=str(tmp_path / "cols"), label_fields=["poison", "bomb"]), target="multilabel")


def test_regression_targets_and_their_errors(tmp_path: Path, scores: ToyData) -> None:
    data = load_data(DataSpec(path=str(scores.folder)), target="regression")
    assert data.label_map == {} and isinstance(data.train.labels[0], float)
    assert data.report.lines()[0].startswith("train: target mean ")
    for value, expected in (
        (None, "is null; every record needs a target"),
        ("high", "target 'high' is not a number"),
        (True, "target True is not a number"),
    ):
        write_jsonl(tmp_path / "train.jsonl", [scores.rows["train"][0], {"text": "x y", "label": value}])
        write_jsonl(tmp_path / "val.jsonl", scores.rows["val"])
        with pytest.raises(DataError, match=rf"train.jsonl:2: field 'label'.*{expected}"):
            load_data(DataSpec(path=str(tmp_path)), target="regression")
    csv = tmp_path / "one.csv"
    csv.write_text("text,label\n" + "".join(f"row {i},{i % 7}.5\n" for i in range(40)), encoding="utf-8")
    split = load_data(DataSpec(path=str(csv)), target="regression")
    assert len(split.train) + len(split.val) + len(split.test or ()) == 40


# -- runs ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def flags_run(bert_dir: Path, flags: ToyData, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    out = tmp_path_factory.mktemp("flags-run") / "run"
    quiet_train(config_for(bert_dir, flags, MULTILABEL, "loss.class_weights=balanced"), out)
    return out


@pytest.fixture(scope="module")
def scores_run(bert_dir: Path, scores: ToyData, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    out = tmp_path_factory.mktemp("scores-run") / "run"
    quiet_train(config_for(bert_dir, scores, REGRESSION, "train.epochs=3"), out)
    return out


def test_a_multilabel_run_reports_reloads_and_predicts(
    flags_run: Path, flags: ToyData, capsys: pytest.CaptureFixture[str]
) -> None:
    report = json.loads((flags_run / "report.json").read_text())
    assert report["threshold_rule"] == "per_label:max_f1" and len(report["threshold"]) == 2
    assert set(report["loss"]["class_weights"]) == {"poison", "bomb"}  # pos_weight per label
    test = report["metrics"]["test"]
    assert set(test["per_label"]) == {"poison", "bomb"} and 0 < test["known_fraction"] < 1
    probe = Probe.from_pretrained(flags_run)
    assert probe.threshold == report["threshold"]
    probs = np.asarray(probe.predict_proba(flags.texts("test")))
    labels = np.asarray(
        [[np.nan if r[n] is None else r[n] for n in LABELS] for r in flags.rows["test"]], dtype=float
    )
    again = multilabel_metrics(labels, probs, list(LABELS), thresholds=report["threshold"])
    for key in ("f1", "f1_micro", "auroc", "hamming_loss", "subset_accuracy"):
        assert again[key] == pytest.approx(test[key], abs=1e-6), key
    row = probe.predict("a bomb in the park")
    assert set(row) == {"text", "labels", "probabilities"} and set(row["probabilities"]) == set(LABELS)
    assert row["labels"] == [
        n for n, cut in zip(LABELS, report["threshold"], strict=True) if row["probabilities"][n] >= cut
    ]
    code, out, err = run_cli(capsys, "eval", str(flags_run), "--data", str(flags.path("test")), "--json")
    assert code == 0, err
    assert json.loads(out)["per_label"]["bomb"]["known"] < 48
    assert sorted(p.name for p in (flags_run / "plots").iterdir()) == [
        "history.png",
        "per_label.png",
        "per_label_ranking.png",
    ]


def test_a_regression_run_stores_its_scaling_and_predicts_in_the_datas_units(
    scores_run: Path, scores: ToyData, capsys: pytest.CaptureFixture[str]
) -> None:
    report = json.loads((scores_run / "report.json").read_text())
    train_targets = np.asarray([r["label"] for r in scores.rows["train"]])
    assert report["task"]["target_mean"] == pytest.approx(train_targets.mean())
    assert report["task"]["target_std"] == pytest.approx(train_targets.std())
    assert report["threshold_rule"] == "none"
    meta = json.loads((scores_run / "checkpoint" / "probe.json").read_text())
    assert meta["config"]["task"]["target_mean"] == report["task"]["target_mean"]
    probe = Probe.from_pretrained(scores_run)
    values = np.asarray(probe.predict_proba(scores.texts("test")))
    from probekit.regression_metrics import regression_metrics

    again = regression_metrics([r["label"] for r in scores.rows["test"]], values)
    for key in ("mae", "rmse", "r2", "pearson", "spearman"):
        assert again[key] == pytest.approx(report["metrics"]["test"][key], abs=1e-4), key
    assert 5 < float(values.mean()) < 40  # in the data's units, not standardised
    code, out, err = run_cli(capsys, "predict", str(scores_run), "we like tea")
    assert code == 0, err
    assert set(json.loads(out)) == {"text", "value"}


@pytest.mark.parametrize("task", ["multilabel", "regression"])
def test_killed_and_resumed_is_bit_identical(
    task: str,
    bert_dir: Path,  # noqa: F811
    flags: ToyData,
    scores: ToyData,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tests.test_resume import assert_identical, stop_at_micro_batch

    data, assignments = (flags, MULTILABEL) if task == "multilabel" else (scores, REGRESSION)
    config = config_for(
        bert_dir,
        data,
        assignments,
        "train.epochs=3",
        "train.grad_accum=2",
        "train.checkpoint_every_steps=1",
        test=False,
    )
    reference, out = tmp_path / "reference", tmp_path / "run"
    quiet_train(config, reference)
    stop_at_micro_batch(config, out, monkeypatch, 14, 96)
    quiet_train(config, out, resume=True)
    assert_identical(out, reference)


@pytest.mark.parametrize("task", ["multilabel", "regression"])
def test_cache_on_equals_cache_off(
    task: str,
    bert_dir: Path,  # noqa: F811
    flags: ToyData,
    scores: ToyData,
    tmp_path: Path,
) -> None:
    data, assignments = (flags, MULTILABEL) if task == "multilabel" else (scores, REGRESSION)
    quiet_train(config_for(bert_dir, data, assignments, "head.dropout=0"), tmp_path / "on")
    quiet_train(
        config_for(bert_dir, data, assignments, "head.dropout=0", "train.cache.enabled=false"),
        tmp_path / "off",
    )
    a, b = (load_file(tmp_path / name / "checkpoint/probe.safetensors") for name in ("on", "off"))
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-5, msg=name)


@pytest.mark.parametrize("task", ["multilabel", "regression"])
def test_the_sweep_works_for_the_task(
    task: str,
    bert_dir: Path,  # noqa: F811
    flags: ToyData,
    scores: ToyData,
    tmp_path: Path,
) -> None:
    from probekit.sweep import sweep

    data, assignments = (flags, MULTILABEL) if task == "multilabel" else (scores, REGRESSION)
    config = config_for(bert_dir, data, assignments, "train.epochs=1")
    result = sweep(
        config, out=tmp_path / "sweep", layers=[0, 4], combos=False, log=lambda _l: None, progress=False
    )
    assert [c.name for c in result.candidates] == ["layer 0", "layer 4"]
    assert ("val f1" in result.table()[0]) == (task == "multilabel")


@pytest.mark.slow
def test_two_processes_equal_one_for_multilabel(bert_dir: Path, flags: ToyData, tmp_path: Path) -> None:  # noqa: F811
    from tests.engine_fixtures import save_tiny_bert
    from tests.test_distributed import finish, launch

    model = save_tiny_bert(tmp_path / "quiet", dropout=0.0)
    sets = [
        *flags.assignments(),
        *FAST,
        *MULTILABEL,
        "head.dropout=0",
        "train.batch_size=9",
        "train.grad_accum=4",
    ]
    quiet_train(
        compose_config(preset="safety8k", assignments=[f"model.name={model}", *sets]), tmp_path / "one"
    )
    argv = ["train", "--model", str(model), *(f"--set={s}" for s in sets), "--out", str(tmp_path / "two")]
    finish(launch("torchrun", argv), tmp_path)
    a, b = (load_file(tmp_path / n / "checkpoint/probe.safetensors") for n in ("one", "two"))
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6, msg=name)
    ra, rb = (
        json.loads((tmp_path / n / "report.json").read_text())["metrics"]["test"] for n in ("one", "two")
    )
    assert rb["n"] == 48 and rb["f1"] == pytest.approx(ra["f1"], abs=1e-6)


def test_user_errors_exit_2_with_one_line(
    bert_dir: Path,  # noqa: F811
    flags: ToyData,
    scores: ToyData,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    cases = {
        "train.monitor=auroc: task.kind=regression reports loss, mae, rmse, r2, pearson, spearman": (
            scores,
            [*REGRESSION[:2]],
        ),
        "head.num_classes=2; a regression has one output": (
            scores,
            ["task.kind=regression", "train.monitor=loss"],
        ),
        "loss.class_weights: a regression has no classes to weigh": (
            scores,
            [*REGRESSION, "loss.class_weights=balanced"],
        ),
        "head.num_classes=3 but the data has 2 labels": (flags, [*MULTILABEL, "head.num_classes=3"]),
    }
    for expected, (data, extra) in cases.items():
        argv = [
            "train",
            "--model",
            str(bert_dir),
            *(f"--set={s}" for s in (*data.assignments(), *FAST, *extra)),
        ]
        code, _, err = run_cli(capsys, *argv, "--out", str(tmp_path / "x"))
        assert code == 2 and expected in err and "Traceback" not in err, (expected, err)
        assert not (tmp_path / "x").exists()


def test_non_finite_outputs_are_refused() -> None:
    from probekit.tasks.regression import RegressionTask

    with pytest.raises(UserError, match=r"texts\[0\]: the probe gave a non-finite value"):
        RegressionTask().predictions(["a"], [math.nan], 0.5, [])
    with pytest.raises(UserError, match=r"texts\[0\]: the probe gave non-finite probabilities"):
        MultilabelTask(ThresholdSpec()).predictions(["a"], [[math.nan, 0.2]], [0.5, 0.5], ["x", "y"])
