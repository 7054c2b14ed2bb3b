"""The ``multiclass`` task end to end: the loss and its class weights (properties), the data rules,
a run that trains, is killed and resumes bit-identical, reloads and predicts, the cache, two
processes, ``eval``, ``predict`` and the sweep; and the errors a user meets, each exit 2."""

from __future__ import annotations

import json
import math
import random
import re
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from probekit import Probe
from probekit.config import LossSpec, ThresholdSpec, compose_config
from probekit.data import DataError, DataSpec, load_data
from probekit.errors import ConfigError, UserError
from probekit.multiclass_metrics import multiclass_metrics
from probekit.tasks.base import Scores, weighted_cross_entropy
from probekit.tasks.multiclass import MulticlassTask
from tests.engine_fixtures import (  # noqa: F401  (fixtures)
    FAST,
    NEUTRAL,
    ToyData,
    bert_dir,
    quiet_train,
    run_cli,
    write_jsonl,
)

CLASSES = ("none", "poison", "bomb")
"""The toy classes: a text holds the word of its class (none: neither word)."""


def make_rows(n: int, seed: int, counts: tuple[int, ...] = (1, 1, 1)) -> list[dict[str, Any]]:
    """``n`` distinct rows cycling through the classes in the proportions ``counts``."""
    rng = random.Random(seed)
    cycle = [c for c, k in zip(CLASSES, counts, strict=True) for _ in range(k)]
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    while len(rows) < n:
        name = cycle[len(rows) % len(cycle)]
        words = rng.choices(NEUTRAL, k=rng.randint(2, 5))
        if name != "none":
            words.insert(rng.randint(0, len(words)), name)
        text = " ".join(words)
        if text not in seen:
            seen.add(text)
            rows.append({"text": text, "label": name})
    return rows


@pytest.fixture(scope="module")
def three(tmp_path_factory: pytest.TempPathFactory) -> ToyData:
    """96 train / 48 val / 48 test rows of three classes, twice as many ``none`` as each other."""
    folder = tmp_path_factory.mktemp("three")
    rows = make_rows(192, seed=3, counts=(2, 1, 1))
    splits = {"train": rows[:96], "val": rows[96:144], "test": rows[144:]}
    for name, split in splits.items():
        write_jsonl(folder / f"{name}.jsonl", split)
    return ToyData(folder, splits)


MULTICLASS = ("task.kind=multiclass", "task.negative_class=none", "head.num_classes=3")


def config_for(model: Path, data: ToyData, *extra: str, test: bool = True) -> Any:
    return compose_config(
        preset="safety8k",
        assignments=[f"model.name={model}", *data.assignments(test=test), *FAST, *MULTICLASS, *extra],
    )


# -- the loss ------------------------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 12),
    classes=st.integers(2, 6),
    smoothing=st.sampled_from([0.0, 0.1, 0.3]),
    seed=st.integers(0, 2**16),
    k=st.integers(1, 4),
)
def test_a_class_weight_of_k_equals_k_copies_of_its_rows(
    rows: int, classes: int, smoothing: float, seed: int, k: int
) -> None:
    """Loss and gradient, with or without label smoothing: the documented composition."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, classes, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, classes, (rows,), generator=gen)
    weighted_class = int(labels[0])
    weights = torch.ones(classes, dtype=torch.float64)
    weights[weighted_class] = k

    a = logits.clone().requires_grad_(True)
    weighted = weighted_cross_entropy(a, labels, smoothing=smoothing, weights=weights)
    weighted.backward()

    repeat = torch.where(labels == weighted_class, k, 1)
    b = logits.clone().requires_grad_(True)
    copies = weighted_cross_entropy(
        b.repeat_interleave(repeat, 0), labels.repeat_interleave(repeat), smoothing=smoothing
    )
    copies.backward()

    torch.testing.assert_close(weighted, copies)
    assert a.grad is not None and b.grad is not None
    torch.testing.assert_close(a.grad, b.grad)


def test_no_weights_is_exactly_torch_cross_entropy() -> None:
    """The binary task's loss is unchanged when no class weight is set (bit for bit)."""
    logits, labels = torch.randn(7, 2), torch.tensor([0, 1, 1, 0, 1, 0, 0])
    expected = torch.nn.functional.cross_entropy(logits, labels, label_smoothing=0.1, reduction="sum")
    assert torch.equal(weighted_cross_entropy(logits, labels, smoothing=0.1), expected)


@settings(max_examples=30, deadline=None)
@given(
    rows=st.integers(1, 20), classes=st.integers(2, 16), scale=st.floats(0.01, 60), seed=st.integers(0, 999)
)
def test_probabilities_lie_in_0_1_and_sum_to_1(rows: int, classes: int, scale: float, seed: int) -> None:
    logits = torch.randn(rows, classes, generator=torch.Generator().manual_seed(seed)) * scale
    probs = MulticlassTask(ThresholdSpec()).scores(logits)
    assert probs.shape == (rows, classes)
    assert bool(((probs >= 0) & (probs <= 1)).all())
    torch.testing.assert_close(probs.sum(-1), torch.ones(rows))


def test_balanced_weights_follow_scikit_learn() -> None:
    from sklearn.utils.class_weight import compute_class_weight  # type: ignore[import-untyped]

    labels = [0] * 6 + [1] * 3 + [2]
    got = LossSpec(class_weights="balanced").resolve({"a": 0, "b": 1, "c": 2}, labels)
    expected = compute_class_weight("balanced", classes=np.arange(3), y=np.asarray(labels))
    assert got == pytest.approx(tuple(expected))
    assert LossSpec(class_weights={"c": 4.0}).resolve({"a": 0, "b": 1, "c": 2}, labels) == (1.0, 1.0, 4.0)
    assert LossSpec().resolve({"a": 0, "b": 1}, [0, 1]) is None
    with pytest.raises(ConfigError, match=r"loss.class_weights: 'bom' is not a label.*did you mean 'bomb'"):
        LossSpec(class_weights={"bom": 2.0}).resolve({"none": 0, "bomb": 1}, [0, 1])


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), classes=st.integers(2, 8))
def test_the_guard_threshold_maximises_f1_of_the_binary_view_on_val(seed: int, classes: int) -> None:
    """With a negative class, the threshold is the binary rule on 1 - p(negative)."""
    from probekit.metrics import choose_threshold

    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, 40)
    labels[:2] = [0, 1]
    probs = rng.dirichlet(np.ones(classes), 40)
    task = MulticlassTask(ThresholdSpec(), "c0").bind([f"c{i}" for i in range(classes)])
    threshold = task.choose_threshold(Scores(labels, probs, 0.0))
    assert threshold == choose_threshold(labels != 0, np.clip(1 - probs[:, 0], 0, 1), rule="max_f1")
    assert (
        MulticlassTask(ThresholdSpec()).bind(["a", "b"]).choose_threshold(Scores(labels, probs, 0.0)) == 0.5
    )


# -- data ----------------------------------------------------------------------------------------
def test_string_labels_get_a_sorted_label_map_and_names_in_the_report(three: ToyData) -> None:
    data = load_data(
        DataSpec(train=str(three.path("train")), val=str(three.path("val"))), target="multiclass"
    )
    assert data.label_map == {"bomb": 0, "none": 1, "poison": 2}
    assert (
        data.report.lines()[0]
        == "train: 96 rows; per class bomb: 24 (25.0%), none: 48 (50.0%), poison: 24 (25.0%)"
    )
    # A binary read never guesses which string is positive.
    with pytest.raises(DataError, match=r"pass data\.label_map"):
        load_data(DataSpec(train=str(three.path("train")), val=str(three.path("val"))))


def test_a_class_missing_from_val_is_a_note_and_from_train_an_error(tmp_path: Path) -> None:
    rows = make_rows(60, seed=1)
    train_rows, val_rows = rows[:45], [r for r in rows[45:] if r["label"] != "bomb"]
    write_jsonl(tmp_path / "train.jsonl", train_rows)
    write_jsonl(tmp_path / "val.jsonl", val_rows)
    data = load_data(DataSpec(path=str(tmp_path)), target="multiclass")
    assert "note: val has no rows of class bomb" in data.report.lines()
    with pytest.raises(DataError, match="val has no rows of class"):  # binary: both classes in val
        load_data(DataSpec(path=str(tmp_path), label_map={"none": 0, "poison": 1, "bomb": 2}))
    write_jsonl(tmp_path / "train.jsonl", [r for r in train_rows if r["label"] != "poison"])
    write_jsonl(tmp_path / "val.jsonl", rows[45:])
    with pytest.raises(
        DataError, match=r"train.jsonl: field 'label': train has no rows of class 2 \('poison'\)"
    ):
        load_data(DataSpec(path=str(tmp_path)), target="multiclass")


def test_a_label_outside_the_map_is_named_by_file_and_line(three: ToyData, tmp_path: Path) -> None:
    write_jsonl(tmp_path / "val.jsonl", [*three.rows["val"][:5], {"text": "odd one", "label": "bomn"}])
    spec = DataSpec(
        train=str(three.path("train")),
        val=str(tmp_path / "val.jsonl"),
        label_map={"none": 0, "poison": 1, "bomb": 2},
    )
    with pytest.raises(
        DataError, match=r"val.jsonl:6: field 'label': label 'bomn' is not in data.label_map.*'bomb'"
    ):
        load_data(spec, target="multiclass")


# -- a run ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def finished(bert_dir: Path, three: ToyData, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    out = tmp_path_factory.mktemp("multiclass") / "run"
    quiet_train(config_for(bert_dir, three, "loss.class_weights=balanced"), out)
    return out


def test_a_run_reports_every_metric_and_its_weights_and_reloads_to_the_same_scores(
    finished: Path, three: ToyData
) -> None:
    report = json.loads((finished / "report.json").read_text())
    assert report["task"] == {"kind": "multiclass", "negative_class": "none", "top_k": 3}
    # balanced on 48 none / 24 poison / 24 bomb: rows / (3 x rows of the class)
    assert report["loss"]["class_weights"] == pytest.approx({"bomb": 4 / 3, "none": 2 / 3, "poison": 4 / 3})
    assert any(
        "class weights balanced: bomb 1.33, none 0.667, poison 1.33" in line for line in report["plan"]
    )
    test = report["metrics"]["test"]
    assert set(test["per_class"]) == {"bomb", "none", "poison"}
    assert np.asarray(test["confusion_matrix"]).sum() == 48
    assert report["threshold_rule"] == "max_f1" and report["threshold"] == test["binary_threshold"]
    assert sorted(p.name for p in (finished / "plots").iterdir()) == [
        "binary_pr.png",
        "binary_roc.png",
        "confusion.png",
        "history.png",
        "per_class.png",
        "pr_per_class.png",
        "reliability.png",
    ]
    # The reloaded probe gives the probabilities that made the report's test metrics.
    probe = Probe.from_pretrained(finished)
    probs = np.asarray(probe.predict_proba(three.texts("test")))
    assert probs.shape == (48, 3)
    labels = np.asarray([["bomb", "none", "poison"].index(v) for v in three.labels("test")])
    again = multiclass_metrics(
        labels, probs, ["bomb", "none", "poison"], negative=1, threshold=report["threshold"]
    )
    for key in ("accuracy", "f1", "auroc", "binary_auroc", "binary_recall_at_1pct_fpr"):
        assert again[key] == pytest.approx(test[key], abs=1e-6), key
    row = probe.predict("the bomb is in the park")
    assert set(row) == {"text", "label", "confidence", "probabilities", "score", "flagged"}
    assert row["label"] == max(row["probabilities"], key=row["probabilities"].get)
    assert sum(row["probabilities"].values()) == pytest.approx(1.0, abs=1e-6)
    assert row["score"] == pytest.approx(1 - row["probabilities"]["none"], abs=1e-6)
    assert row["flagged"] == (row["score"] >= report["threshold"])


def test_eval_json_and_predict_from_the_command_line(
    finished: Path, three: ToyData, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_cli(capsys, "eval", str(finished), "--data", str(three.path("test")), "--json")
    assert code == 0, err
    metrics = json.loads(out)
    assert metrics["per_class"]["bomb"]["support"] == 12 and metrics["class_names"] == [
        "bomb",
        "none",
        "poison",
    ]
    code, out, err = run_cli(capsys, "eval", str(finished), "--data", str(three.path("test")))
    assert code == 0, err
    assert "confusion matrix (rows: true, columns: predicted)" in out and "\nbomb " in out
    code, out, err = run_cli(capsys, "predict", str(finished), "we like tea", "a poison bird")
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["text"] for r in rows] == ["we like tea", "a poison bird"]
    assert all(set(r["probabilities"]) == {"bomb", "none", "poison"} for r in rows)


def test_killed_and_resumed_is_bit_identical(
    bert_dir: Path,  # noqa: F811
    three: ToyData,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The best epoch's val probabilities (N x 3) travel in the training-state checkpoint."""
    from tests.test_resume import assert_identical, stop_at_micro_batch

    config = config_for(
        bert_dir, three, "train.epochs=3", "train.grad_accum=2", "train.checkpoint_every_steps=1", test=False
    )
    reference, out = tmp_path / "reference", tmp_path / "run"
    quiet_train(config, reference)
    stop_at_micro_batch(config, out, monkeypatch, 14, 96)  # epoch 2, after a best epoch 1
    quiet_train(config, out, resume=True)
    assert_identical(out, reference)
    assert (
        json.loads((out / "report.json").read_text())["metrics"]
        == json.loads((reference / "report.json").read_text())["metrics"]
    )


def test_cache_on_equals_cache_off(bert_dir: Path, three: ToyData, tmp_path: Path) -> None:  # noqa: F811
    cached = quiet_train(config_for(bert_dir, three, "head.dropout=0"), tmp_path / "on")
    plain = quiet_train(
        config_for(bert_dir, three, "head.dropout=0", "train.cache.enabled=false"), tmp_path / "off"
    )
    a, b = (
        load_file(tmp_path / "on/checkpoint/probe.safetensors"),
        load_file(tmp_path / "off/checkpoint/probe.safetensors"),
    )
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-5, msg=name)
    assert cached.metrics["test"]["f1"] == pytest.approx(plain.metrics["test"]["f1"], abs=1e-6)


@pytest.mark.slow
def test_two_processes_equal_one(bert_dir: Path, three: ToyData, tmp_path: Path) -> None:  # noqa: F811
    from tests.engine_fixtures import save_tiny_bert
    from tests.test_distributed import finish, launch

    model = save_tiny_bert(tmp_path / "quiet", dropout=0.0)
    sets = [
        *three.assignments(),
        *FAST,
        *MULTICLASS,
        "head.dropout=0",
        "train.batch_size=9",
        "train.grad_accum=4",
    ]
    argv = ["train", "--model", str(model), *(f"--set={s}" for s in sets)]
    one = tmp_path / "one"
    quiet_train(compose_config(preset="safety8k", assignments=[f"model.name={model}", *sets]), one)
    finish(launch("torchrun", [*argv, "--out", str(tmp_path / "two")]), tmp_path)
    a, b = (
        load_file(one / "checkpoint/probe.safetensors"),
        load_file(tmp_path / "two/checkpoint/probe.safetensors"),
    )
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6, msg=name)
    ra, rb = (json.loads((p / "report.json").read_text())["metrics"]["test"] for p in (one, tmp_path / "two"))
    assert rb["confusion_matrix"] == ra["confusion_matrix"] and rb["n"] == 48
    assert rb["f1"] == pytest.approx(ra["f1"], abs=1e-6)


def test_the_sweep_ranks_layers_by_macro_metrics(
    bert_dir: Path,  # noqa: F811
    three: ToyData,
    tmp_path: Path,
) -> None:
    from probekit.sweep import sweep

    config = config_for(bert_dir, three, "train.epochs=1")
    result = sweep(
        config, out=tmp_path / "sweep", layers=[0, 4], combos=False, log=lambda _l: None, progress=False
    )
    assert [c.name for c in result.candidates] == ["layer 0", "layer 4"]
    header = result.table()[0]
    assert (
        "val f1" in header
        and "val bin auroc" in header
        and "r@1%fpr |" not in header.replace("bin r@1%fpr", "")
    )
    assert set(result.best.metrics["test"]["per_class"]) == {"bomb", "none", "poison"}


# -- what a user gets wrong ----------------------------------------------------------------------
def test_user_errors_exit_2_with_one_line(
    bert_dir: Path,  # noqa: F811
    three: ToyData,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    base = ["train", "--model", str(bert_dir), *(f"--set={s}" for s in (*three.assignments(), *FAST))]
    cases = {
        "task.negative_class: 'nnone' is not a label of the data": [
            *MULTICLASS[:1],
            "task.negative_class=nnone",
            "head.num_classes=3",
        ],
        "head.num_classes=2 but the data has 3 classes": ["task.kind=multiclass"],
        "loss.class_weights: 'bomm' is not a label": [*MULTICLASS, 'loss.class_weights={"bomm": 2}'],
        "needs 2 (for more, set task.kind=multiclass": ['data.label_map={"none": 0, "poison": 1, "bomb": 2}'],
        "class_weights": [*MULTICLASS, "loss.class_weights={bomb: -1}"],
    }
    for expected, extra in cases.items():
        code, _, err = run_cli(capsys, *base, *(f"--set={s}" for s in extra), "--out", str(tmp_path / "x"))
        assert code == 2, (expected, err)
        assert expected in err and "Traceback" not in err, err
        assert not (tmp_path / "x").exists()


def test_class_counts_of_the_toy_data(three: ToyData) -> None:
    """The fixture's own promise, which the weights test above relies on."""
    assert Counter(three.labels("train")) == {"none": 48, "poison": 24, "bomb": 24}


def test_classes_are_named_as_the_label_map_keys_them(tmp_path: Path) -> None:
    """Integer and boolean labels: ``--set task.negative_class=0`` and ``{0: 2}`` weights work."""
    from probekit.config import load_config

    config = load_config(
        {"task": {"kind": "multiclass", "negative_class": 0}, "loss": {"class_weights": {1: 2.0}}}
    )
    assert config.task.negative_class == "0"  # type: ignore[attr-defined]
    assert config.loss.class_weights == {"1": 2.0}
    assert load_config({"loss": {"class_weights": {True: 3}}}).loss.class_weights == {"true": 3}
    task = MulticlassTask(ThresholdSpec(), "0").bind(["0", "1", "2"])
    assert task.negative == 0
    rows = task.predictions(["x"], [[0.2, 0.5, 0.3]], 0.5, [0, 1, 2])
    assert rows[0]["label"] == 1 and rows[0]["probabilities"] == {"0": 0.2, "1": 0.5, "2": 0.3}


def test_non_finite_probabilities_are_refused_not_passed_as_safe() -> None:
    task = MulticlassTask(ThresholdSpec(), "safe").bind(["cyber", "fraud", "safe"])
    with pytest.raises(UserError, match=r"texts\[1\]: the probe gave non-finite probabilities"):
        task.predictions(["a", "b"], [[0.2, 0.3, 0.5], [math.nan] * 3], 0.3, ["cyber", "fraud", "safe"])


def test_a_val_split_without_the_negative_class_is_refused(three: ToyData, tmp_path: Path) -> None:
    write_jsonl(tmp_path / "val.jsonl", [r for r in three.rows["val"] if r["label"] != "none"])
    data = load_data(
        DataSpec(train=str(three.path("train")), val=str(tmp_path / "val.jsonl")), target="multiclass"
    )
    task = MulticlassTask(ThresholdSpec(), "none").bind(["bomb", "none", "poison"])
    with pytest.raises(
        UserError, match=r"val has no row of 'none'; task.negative_class='none' chooses its threshold"
    ):
        task.check(data, 3)


def test_a_run_folder_whose_head_does_not_fit_its_labels_is_refused(finished: Path, tmp_path: Path) -> None:
    """An edited probe.json (5 outputs for 3 labels, or an unknown negative class): one line, exit 2."""
    import shutil

    from tests.test_run_trust import edit_meta  # re-seals the checksums, as an attacker would

    for edit, expected in (
        (
            lambda m: m["config"]["head"].update(num_classes=5),
            "config.head.num_classes: a head of 5 outputs for 3 labels",
        ),
        (
            lambda m: m["config"]["task"].update(negative_class="nope"),
            "config.task.negative_class: 'nope' is not a label",
        ),
    ):
        run = tmp_path / "run"
        shutil.rmtree(run, ignore_errors=True)
        shutil.copytree(finished, run)
        edit_meta(run, edit)
        with pytest.raises(UserError, match=re.escape(expected)):
            Probe.from_pretrained(run)


def test_saved_val_probabilities_of_another_width_do_not_fit_the_run() -> None:
    """A training-state checkpoint whose best-epoch val scores are not (val rows, classes)."""
    from probekit.state import Saved, check_fits

    saved = Saved(Path("ckpt"), {"bestval.probs": torch.full((4, 5), 0.2)}, {})
    problem = check_fits(saved, {}, None, (4, 3))
    assert problem == "bestval.probs has shape (4, 5), the task's val scores (4, 3)"
