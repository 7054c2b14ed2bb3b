# ruff: noqa: F811  (pytest fixtures imported by name)
"""What ``predict`` says of a text, per task, and the array ``predict_proba(as_array=True)`` gives a
scikit-learn user: probes built in code (random heads), so every decision path is exercised
without training."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

import probekit
from probekit import Probe
from probekit.config import task_of
from tests.engine_fixtures import bert_dir  # noqa: F401  (fixture)

TEXTS = ["the cat sat", "a bomb in the park", "poison the tea", "we like tea and the park", "bomb"]


def built(bert_dir: Path, labels: list[Any], threshold: Any = None, **overrides: Any) -> Probe:
    from transformers import AutoModel, AutoTokenizer

    config = probekit.preset("safety8k", model={"max_length": 16}, **overrides)
    probe = probekit.build(config, AutoModel.from_pretrained(bert_dir))
    probe.attach(
        tokenizer=AutoTokenizer.from_pretrained(bert_dir),
        label_names=labels,
        threshold=threshold,
        task=task_of(config),
    )
    return probe.eval()


def test_a_binary_row_has_the_label_its_probability_and_every_class(bert_dir: Path) -> None:
    probe = built(bert_dir, ["safe", "unsafe"])
    positive = np.asarray(probe.predict_proba(TEXTS))
    probe.attach(threshold=float(np.median(positive)))  # both labels occur
    rows = probe.predict(TEXTS)
    assert {row["label"] for row in rows} == {"safe", "unsafe"}
    for row, p in zip(rows, positive, strict=True):
        assert set(row) == {"text", "label", "probability", "confidence", "probabilities"}
        assert row["label"] == ("unsafe" if p >= probe.threshold else "safe")
        assert row["probability"] == pytest.approx(p, abs=1e-6)
        assert row["probabilities"] == pytest.approx({"safe": 1 - p, "unsafe": p}, abs=1e-6)
        assert row["confidence"] == pytest.approx(row["probabilities"][row["label"]], abs=1e-12)
    array = probe.predict_proba(TEXTS, as_array=True)
    assert isinstance(array, np.ndarray) and array.shape == (len(TEXTS), 2)
    np.testing.assert_allclose(array[:, 1], positive, atol=1e-6)
    np.testing.assert_allclose(array.sum(axis=1), 1.0, atol=1e-6)
    assert probe.predict_proba(TEXTS[1], as_array=True).shape == (1, 2)
    assert probe.predict_proba([], as_array=True).shape == (0, 2)


def test_a_multiclass_row_and_array(bert_dir: Path) -> None:
    names = ["safe", "violence", "weapons"]
    probe = built(bert_dir, names, task={"kind": "multiclass"}, head={"num_classes": 3})
    array = probe.predict_proba(TEXTS, as_array=True)
    assert array.shape == (len(TEXTS), 3)
    np.testing.assert_allclose(array.sum(axis=1), 1.0, atol=1e-6)
    for row, probs in zip(probe.predict(TEXTS), array, strict=True):
        assert row["label"] == names[int(probs.argmax())]
        assert row["confidence"] == pytest.approx(float(probs.max()), abs=1e-6)
        assert row["confidence"] == max(row["probabilities"].values())
        assert list(row["probabilities"]) == names
    np.testing.assert_allclose(array, np.asarray(probe.predict_proba(TEXTS)), atol=0)
    assert probe.predict_proba([], as_array=True).shape == (0, 3)


def test_multilabel_and_regression_arrays_have_scikit_learns_shapes(bert_dir: Path) -> None:
    flags = built(
        bert_dir,
        ["poison", "bomb"],
        threshold=[0.5, 0.5],
        task={"kind": "multilabel"},
        head={"num_classes": 2},
        data={"label_fields": ["poison", "bomb"]},
    )
    array = flags.predict_proba(TEXTS, as_array=True)
    assert array.shape == (len(TEXTS), 2) and ((array > 0) & (array < 1)).all()
    rows = flags.predict(TEXTS)
    np.testing.assert_allclose(array, [list(r["probabilities"].values()) for r in rows], atol=1e-6)

    values = built(
        bert_dir, [], task={"kind": "regression"}, head={"num_classes": 1}, train={"monitor": "mae"}
    )
    array = values.predict_proba(TEXTS, as_array=True)
    assert array.shape == (len(TEXTS),)
    np.testing.assert_allclose(array, [r["value"] for r in values.predict(TEXTS)], atol=1e-6)
    assert values.predict_proba([], as_array=True).shape == (0,)
