"""Every method of the results report on one dataset: the numbers behind ``docs/results.md``.

    python benchmarks/results.py [--data DIR] [--out DIR] [--methods LIST] [--model NAME]
                                 [--task auto|binary|multiclass|multilabel|regression]
                                 [--label-fields A,B,C] [--preset NAME] [--negative-class NAME]

``--data`` is a folder with ``train.jsonl``, ``val.jsonl`` and ``test.jsonl`` (``text``, ``label``
and optionally ``source`` per line); by default the public safety mix in ``../shared/data``.
``--task auto`` (the default) reads the labels: ``--label-fields`` (one 0/1/null column per label)
or labels that are lists of names make a multi-label dataset; numbers that are not all integers
a regression; more than two distinct values, or labels that are not integers (``safe``,
``vcr``...), a multi-class dataset; otherwise it is binary.

Binary: every method is judged the same way: the decision threshold is chosen on val (highest
F1, as a probekit run does), and `probekit.metrics.compute_metrics` gives accuracy, F1, AUROC,
AUPRC, recall at 1% and 5% FPR and ECE on val and test.

Methods (``--methods``, comma-separated, default all, run in this order):

  tfidf     TF-IDF of word 1-2 grams + logistic regression (scikit-learn), C chosen on val AUROC.
  sweep     ``probekit sweep``: the spec's head on every hidden state of the frozen backbone and on
            the best 2, best 3 and all layers combined; its table and per-layer plot.
  probe     probe-only: ``safety8k`` with every block frozen (``freezer.kind=all``), the MLP head on
            the mean-pooled last three layers, trained from cached features.
  safety8k  the shipped recipe as is (bottom 62.5% of the blocks frozen, the rest fine-tuned).
  finetune  full fine-tuning: ``safety8k`` with nothing frozen (``freezer.kind=none``),
            ``--finetune-epochs`` epochs (default 3).

For the best probekit run it also reports the operating point at 1% FPR on val (what
``--set threshold.target_fpr=0.01`` saves with a run) and how it holds on test, and the test
errors per ``source`` (where the probe fails).

Writes ``results.json`` (everything), ``results.md`` (the tables, also printed) and ``layers.png``
(the sweep's plot) into ``--out`` (default ``runs/results``), with every run folder under
``--out/runs``; progress goes to stderr.

Multi-class: classes are the sorted labels (probekit's order), ``--negative-class`` (default
``safe`` when it is a label) the harmless one, ``--preset`` the probekit recipe (default
``hazards13``; ``head.num_classes`` and ``task.negative_class`` are set from the data). Every
method is judged by `probekit.multiclass_metrics.multiclass_metrics` on val and test, with the
derived binary view "any class vs the negative class" (score ``1 - p(negative)``) and its
threshold chosen on val by highest F1. Methods (default all; ``probe`` and ``finetune`` are
binary only):

  tfidf     TF-IDF of word 1-2 grams + logistic regression (``class_weight="balanced"``), C chosen
            on val macro F1 over 0.1..100.
  sweep     ``probekit sweep`` of the preset, backbone frozen, as for binary data.
  preset    the preset trained as is.

Writes ``results.json``, ``results.md`` (a summary table per method; F1 and AUPRC per class and
method on test; the test confusion matrix of the best method by val macro F1; the sweep's table),
``confusion_<method>.png`` for each method (test) and ``layers.png`` (with the sweep). The
probekit methods' metrics are their run's (report.json, the sweep's candidates), not recomputed.

Multi-label: labels and cells are read by `probekit.data.load_data` (``--label-fields``: a column
per label, ``null`` = unknown; or a list of names per row in ``label``), in probekit's order.
Every method is judged by `probekit.multilabel_metrics.multilabel_metrics` on val and test, at
per-label thresholds chosen on val (highest F1, unknown cells left out). Methods (default all):

  tfidf     TF-IDF of word 1-2 grams + one logistic regression per label (balanced class weights,
            trained on the rows where that label is known); C chosen on val macro F1 over 0.1..100.
  sweep     ``probekit sweep`` of the probe's config, backbone frozen.
  probe     a probekit run: ``--preset`` (default ``safety8k``) with ``task.kind=multilabel``,
            ``head.num_classes`` = the labels, balanced class weights, best epoch by val macro F1.

Writes ``results.json``, ``results.md`` (a summary table per method; F1 and AUPRC per label and
method on test; the sweep's candidates) and ``layers.png`` (with the sweep).

Regression: the number in ``label`` (`probekit.data.load_data`); every method judged by
`probekit.regression_metrics.regression_metrics` (MAE, RMSE, R², Pearson, Spearman) on val and
test. Methods (default all): ``tfidf`` (TF-IDF + ridge regression, alpha chosen on val MAE),
``sweep`` and ``probe`` (``--preset`` with ``task.kind=regression``, ``head.num_classes=1``, best
epoch by val MAE). Writes ``results.json``, ``results.md`` (the table per method and split; the
sweep's candidates), ``layers.png`` and ``regression_<method>.png`` (predicted vs true on test,
`probekit.plots_extra.plot_regression`) of the best method by val MAE among those whose
predictions the script holds (``tfidf``; ``probe`` through its saved run): a sweep's candidates
keep no predictions.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Literal

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "safety-mix"
METHODS = ("tfidf", "sweep", "probe", "safety8k", "finetune")
TABLE = (
    ("accuracy", "acc"),
    ("f1", "F1"),
    ("auroc", "AUROC"),
    ("auprc", "AUPRC"),
    ("recall_at_1pct_fpr", "R@1%FPR"),
    ("recall_at_5pct_fpr", "R@5%FPR"),
    ("ece", "ECE"),
)
NAMES = {
    "tfidf": "TF-IDF + logistic regression",
    "probe": "probe-only (all blocks frozen, MLP on the last 3 layers)",
    "safety8k": "safety8k recipe (bottom 62.5% of the blocks frozen)",
    "finetune": "full fine-tuning (no block frozen)",
}
TASKS = ("auto", "binary", "multiclass", "multilabel", "regression")
MULTICLASS_METHODS = ("tfidf", "sweep", "preset")
MULTICLASS_TABLE = (
    ("accuracy", "acc"),
    ("f1", "macro F1"),
    ("auroc", "macro AUROC"),
    ("binary_auroc", "bin AUROC"),
    ("binary_recall_at_1pct_fpr", "bin R@1%FPR"),
    ("ece", "ECE"),
)
TFIDF_C = (0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)
"""The C grid of the multi-class and multi-label TF-IDF baselines (chosen on val macro F1)."""
TARGET_METHODS = ("tfidf", "sweep", "probe")
"""The methods of multi-label and regression data, in order."""
MULTILABEL_TABLE = (
    ("f1", "macro F1"),
    ("f1_micro", "micro F1"),
    ("auroc", "macro AUROC"),
    ("auprc", "macro AUPRC"),
    ("recall_at_1pct_fpr", "macro R@1%FPR"),
    ("subset_accuracy", "subset acc"),
    ("hamming_loss", "Hamming loss"),
    ("known_fraction", "known"),
)
REGRESSION_TABLE = (
    ("mae", "MAE"),
    ("rmse", "RMSE"),
    ("r2", "R²"),
    ("pearson", "Pearson"),
    ("spearman", "Spearman"),
)
RIDGE_ALPHA = (0.01, 0.1, 1.0, 10.0, 100.0)
"""The alpha grid of the regression TF-IDF baseline (chosen on val MAE)."""


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def read_rows(data: Path, split: str) -> list[dict[str, Any]]:
    """The records of one split file."""
    rows = [json.loads(line) for line in (data / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()]
    return [r for r in rows if r]


def read_split(data: Path, split: str) -> tuple[list[str], np.ndarray, list[str]]:
    """Texts, labels (0/1) and sources of one split file."""
    rows = read_rows(data, split)
    labels = np.asarray([int(r["label"]) for r in rows], dtype=np.int64)
    return [str(r["text"]) for r in rows], labels, [str(r.get("source", "?")) for r in rows]


def scored(labels: dict[str, np.ndarray], probs: dict[str, np.ndarray]) -> dict[str, Any]:
    """Metrics on val and test at the val threshold of highest F1 (probekit's default rule)."""
    from probekit.metrics import choose_threshold, compute_metrics

    threshold = choose_threshold(labels["val"], probs["val"], rule="max_f1")
    return {
        "threshold": threshold,
        "metrics": {s: compute_metrics(labels[s], probs[s], threshold) for s in ("val", "test")},
    }


# -- methods ---------------------------------------------------------------------------------------
def run_tfidf(data: Path) -> dict[str, Any]:
    """TF-IDF (word 1-2 grams, sublinear tf) + logistic regression; C chosen on val AUROC."""
    from sklearn.feature_extraction.text import TfidfVectorizer  # type: ignore[import-untyped]
    from sklearn.linear_model import LogisticRegression  # type: ignore[import-untyped]
    from sklearn.metrics import roc_auc_score  # type: ignore[import-untyped]

    texts, labels = {}, {}
    for split in ("train", "val", "test"):
        texts[split], labels[split], _ = read_split(data, split)
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True)
    train = vectorizer.fit_transform(texts["train"])
    best: tuple[float, float, Any] | None = None
    for c in (0.25, 1.0, 4.0, 16.0, 64.0):
        model = LogisticRegression(C=c, max_iter=5000).fit(train, labels["train"])
        auroc = float(
            roc_auc_score(labels["val"], model.predict_proba(vectorizer.transform(texts["val"]))[:, 1])
        )
        log(f"tfidf: C={c:g} val AUROC {auroc:.4f}")
        if best is None or auroc > best[0]:
            best = (auroc, c, model)
    assert best is not None
    model = best[2]
    probs = {s: model.predict_proba(vectorizer.transform(texts[s]))[:, 1] for s in ("val", "test")}
    return {"C": best[1], "features": len(vectorizer.vocabulary_), **scored(labels, probs)}


def base_config(data: Path, model: str | None, *assignments: str, preset: str = "safety8k") -> Any:
    import probekit

    probekit.discover()
    return probekit.compose_config(
        preset=preset, model=model, data=str(data), assignments=["train.cpu=true", *assignments]
    )


def run_training(
    data: Path, model: str | None, out: Path, name: str, assignments: list[str], preset: str = "safety8k"
) -> dict[str, Any]:
    """``probekit train`` on ``preset`` with ``assignments``; metrics from its run (those of its
    report.json)."""
    from probekit.training import train

    run = out / "runs" / name
    config = base_config(data, model, *assignments, preset=preset)
    result = train(config, out=run, overwrite=True, log=log, progress=False)
    report = json.loads((run / "report.json").read_text(encoding="utf-8"))
    return {
        "run": str(run),
        "set": assignments,
        "threshold": result.threshold,
        "metrics": {s: result.metrics[s] for s in ("val", "test")},
        "best_epoch": result.best_epoch,
        "epochs_run": result.epochs_run,
        "seconds": round(result.seconds, 1),
        "activation_cache": report["activation_cache"],
    }


def run_sweep(
    data: Path, model: str | None, out: Path, assignments: list[str], preset: str = "safety8k"
) -> dict[str, Any]:
    """``probekit sweep`` on ``preset``; its table, candidates and plot."""
    from probekit.sweep import sweep

    folder = out / "runs" / "sweep"
    config = base_config(data, model, *assignments, preset=preset)
    result = sweep(config, out=folder, overwrite=True, log=log, progress=False)
    shutil.copyfile(folder / "layers.png", out / "layers.png")
    return {
        "run": str(folder),
        "layers": list(result.layers),
        "combine": result.combine,
        "candidates": [c.as_json() for c in result.candidates],
        "best": result.best.name,
        "table": result.table(),
        "seconds": {"features": round(result.feature_seconds, 1), "probes": round(result.probe_seconds, 1)},
    }


# -- analysis of a trained run ---------------------------------------------------------------------
def operating_point(run: Path, data: Path, target_fpr: float) -> dict[str, Any]:
    """The threshold ``threshold.target_fpr`` would choose on val, and the FPR and recall it gives
    on val and on test; with the per-source test errors at the run's own threshold."""
    from probekit.metrics import choose_threshold
    from probekit.probe import Probe

    probe = Probe.from_pretrained(run)
    splits = {s: read_split(data, s) for s in ("val", "test")}
    probs = {s: np.asarray(probe.predict_proba(splits[s][0])) for s in splits}
    labels = {s: splits[s][1] for s in splits}
    threshold = choose_threshold(labels["val"], probs["val"], rule="target_fpr", target_fpr=target_fpr)

    def rates(split: str, at: float) -> dict[str, float]:
        y, p = labels[split], probs[split]
        flagged = p >= at
        return {
            "fpr": float((flagged & (y == 0)).sum() / max((y == 0).sum(), 1)),
            "recall": float((flagged & (y == 1)).sum() / max((y == 1).sum(), 1)),
        }

    if isinstance(probe.threshold, list):
        raise SystemExit(f"{run}: not a binary probe (one threshold per label)")
    own = float(probe.threshold)
    y, p, sources = labels["test"], probs["test"], splits["test"][2]
    wrong = (p >= own) != (y == 1)
    per_source: dict[str, dict[str, Any]] = {}
    for name, count in sorted(Counter(sources).items()):
        rows = np.asarray([s == name for s in sources])
        per_source[name] = {
            "rows": count,
            "label": "harmful" if (y[rows] == 1).all() else "benign" if (y[rows] == 0).all() else "mixed",
            "errors": int((wrong & rows).sum()),
            "missed_harmful": int((wrong & rows & (y == 1)).sum()),
            "flagged_benign": int((wrong & rows & (y == 0)).sum()),
        }
    return {
        "target_fpr": target_fpr,
        "threshold": threshold,
        "val": rates("val", threshold),
        "test": rates("test", threshold),
        "run_threshold": own,
        "test_errors_per_source": per_source,
    }


# -- report ----------------------------------------------------------------------------------------
def markdown(results: dict[str, Any]) -> list[str]:
    lines = ["| method | split | " + " | ".join(col for _, col in TABLE) + " |"]
    lines.append("| --- | --- | " + " | ".join("---:" for _ in TABLE) + " |")
    rows: list[tuple[str, dict[str, Any]]] = [
        (NAMES[m], results["methods"][m]["metrics"])
        for m in METHODS
        if m in results["methods"] and m != "sweep"
    ]
    if "sweep" in results["methods"]:
        sweep = results["methods"]["sweep"]
        best = next(c for c in sweep["candidates"] if c["name"] == sweep["best"])
        rows.insert(1, (f"sweep best: {best['name']} (frozen, MLP)", best["metrics"]))
    for name, metrics in rows:
        for split in ("val", "test"):
            cells = [f"{metrics[split][key]:.3f}" for key, _ in TABLE]
            lines.append(f"| {name} | {split} | " + " | ".join(cells) + " |")
    if "sweep" in results["methods"]:
        lines += ["", "Sweep, every candidate:", "", *results["methods"]["sweep"]["table"]]
    point = results.get("operating_point")
    if point:
        lines += [
            "",
            f"Operating point of {point['method']} at val FPR <= {point['target_fpr']:.0%}: "
            f"threshold {point['threshold']:.4f}; "
            f"val FPR {point['val']['fpr']:.4f} recall {point['val']['recall']:.4f}; "
            f"test FPR {point['test']['fpr']:.4f} recall {point['test']['recall']:.4f}",
            "",
            f"Test errors per source at the run's threshold {point['run_threshold']:.4f}:",
            "",
            "| source | label | rows | errors | error rate |",
            "| --- | --- | ---: | ---: | ---: |",
        ]
        for name, row in sorted(
            point["test_errors_per_source"].items(), key=lambda kv: -kv[1]["errors"] / kv[1]["rows"]
        ):
            rate = row["errors"] / row["rows"]
            lines.append(f"| {name} | {row['label']} | {row['rows']} | {row['errors']} | {rate:.1%} |")
    return lines


# -- multi-class ---------------------------------------------------------------------------------
def distinct_labels(data: Path) -> list[Any]:
    """The distinct labels of all splits, sorted (probekit's class order)."""
    values = {row["label"] for split in ("train", "val", "test") for row in read_rows(data, split)}
    if str in {type(v) for v in values} and not all(isinstance(v, str) for v in values):
        raise SystemExit(f"labels mix strings and numbers ({', '.join(sorted(map(repr, values))[:6])})")
    return sorted(values)


def detect_task(labels: list[Any], task: str) -> str:
    """``task`` unless ``auto``; auto, from the labels (all of them or the distinct ones):
    ``multilabel`` when one is a list (of label names), ``regression`` when they are numbers
    (not booleans) and not all integers, ``multiclass`` when there are more than two or they are
    not integers (``0``/``1``, ``true``/``false``), ``binary`` otherwise."""
    if task != "auto":
        return task
    if any(isinstance(v, list) for v in labels):
        return "multilabel"
    numbers = [v for v in labels if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if (
        labels
        and len(numbers) == len(labels)
        and not all(isinstance(v, int) or float(v).is_integer() for v in numbers)
    ):
        return "regression"
    try:
        [int(v) for v in labels]
    except ValueError:
        return "multiclass"
    return "multiclass" if len(set(labels)) > 2 else "binary"


def read_classes(data: Path, classes: list[Any]) -> tuple[dict[str, list[str]], dict[str, np.ndarray]]:
    """Texts and class indices (positions in ``classes``) of every split."""
    index = {value: i for i, value in enumerate(classes)}
    texts, labels = {}, {}
    for split in ("train", "val", "test"):
        rows = read_rows(data, split)
        texts[split] = [str(r["text"]) for r in rows]
        labels[split] = np.asarray([index[r["label"]] for r in rows], dtype=np.int64)
    return texts, labels


def multiclass_scored(
    labels: dict[str, np.ndarray], probs: dict[str, np.ndarray], names: list[str], negative: int | None
) -> dict[str, Any]:
    """`multiclass_metrics` on val and test; the binary view's threshold chosen on val by highest
    F1 (probekit's default rule), 0.5 without a negative class."""
    from probekit.metrics import choose_threshold
    from probekit.multiclass_metrics import derived_binary, multiclass_metrics

    threshold = 0.5
    if negative is not None:
        binary, scores = derived_binary(labels["val"], probs["val"], negative)
        threshold = choose_threshold(binary, scores, rule="max_f1")
    return {
        "threshold": threshold,
        "metrics": {
            s: multiclass_metrics(labels[s], probs[s], names, negative=negative, threshold=threshold)
            for s in ("val", "test")
        },
    }


def run_tfidf_multiclass(data: Path, classes: list[Any], negative: int | None) -> dict[str, Any]:
    """TF-IDF (word 1-2 grams, sublinear tf) + multinomial logistic regression with balanced class
    weights; C chosen on val macro F1 (the smallest C on a tie)."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score

    texts, labels = read_classes(data, classes)
    k = len(classes)
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True)
    train = vectorizer.fit_transform(texts["train"])
    val = vectorizer.transform(texts["val"])
    best: tuple[float, float, Any] | None = None
    for c in TFIDF_C:
        model = LogisticRegression(C=c, class_weight="balanced", max_iter=5000).fit(train, labels["train"])
        predicted = model.predict_proba(val).argmax(axis=1)
        f1 = float(
            f1_score(labels["val"], predicted, labels=list(range(k)), average="macro", zero_division=0)
        )
        log(f"tfidf: C={c:g} val macro F1 {f1:.4f}")
        if best is None or f1 > best[0]:
            best = (f1, c, model)
    assert best is not None
    model = best[2]
    probs = {s: model.predict_proba(vectorizer.transform(texts[s])) for s in ("val", "test")}
    names = [str(c) for c in classes]
    return {
        "C": best[1],
        "features": len(vectorizer.vocabulary_),
        **multiclass_scored(labels, probs, names, negative),
    }


def method_metrics(outcome: dict[str, Any]) -> dict[str, Any]:
    """A method's metrics per split: a sweep's are its best candidate's."""
    if "candidates" in outcome:
        return next(c for c in outcome["candidates"] if c["name"] == outcome["best"])["metrics"]  # type: ignore[no-any-return]
    return outcome["metrics"]  # type: ignore[no-any-return]


def plot_confusion(metrics: dict[str, Any], path: Path) -> None:
    """`plot_confusion_matrix` of a split from its confusion matrix: one row per counted example,
    its probabilities one-hot on the predicted class (the plot reads only the argmax), so every
    method's plot comes from the metrics it reported."""
    from probekit.plots_multiclass import plot_confusion_matrix

    counts = np.asarray(metrics["confusion_matrix"], dtype=np.int64)
    true, predicted = np.nonzero(counts)
    repeats = counts[true, predicted]
    probs = np.eye(counts.shape[0])[np.repeat(predicted, repeats)]
    plot_confusion_matrix(np.repeat(true, repeats), probs, metrics["class_names"], path)


def run_multiclass(args: argparse.Namespace, methods: list[str], classes: list[Any]) -> dict[str, Any]:
    """Every requested multi-class method; the confusion plot of each; the best by val macro F1."""
    names = [str(c) for c in classes]
    negative = names.index(args.negative_class) if args.negative_class is not None else None
    preset = args.preset or "hazards13"
    setup = [
        f"head.num_classes={len(names)}",
        f"task.negative_class={json.dumps(args.negative_class)}",
        *([] if args.epochs is None else [f"train.epochs={args.epochs}"]),
    ]
    results: dict[str, Any] = {
        "data": str(args.data),
        "task": "multiclass",
        "preset": preset,
        "class_names": names,
        "negative_class": args.negative_class,
        "methods": {},
    }
    for method in MULTICLASS_METHODS:
        if method not in methods:
            continue
        log(f"== {method}")
        began = time.perf_counter()
        if method == "tfidf":
            outcome = run_tfidf_multiclass(args.data, classes, negative)
        elif method == "sweep":
            outcome = run_sweep(args.data, args.model, args.out, setup, preset)
        else:
            outcome = run_training(args.data, args.model, args.out, method, setup, preset)
        outcome["wall_s"] = round(time.perf_counter() - began, 1)
        results["methods"][method] = outcome
        test = method_metrics(outcome)["test"]
        plot_confusion(test, args.out / f"confusion_{method}.png")
        log(f"== {method} done in {outcome['wall_s']} s; test macro F1 {test['f1']:.4f}")
    if results["methods"]:
        results["best"] = max(
            results["methods"], key=lambda m: method_metrics(results["methods"][m])["val"]["f1"]
        )
    return results


def number(value: Any, digits: int = 3) -> str:
    """A metric as text; ``n/a`` where undefined (nan) or absent."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def markdown_multiclass(results: dict[str, Any]) -> list[str]:
    """The summary table, F1 and AUPRC per class and method, the best method's confusion matrix."""
    methods = results["methods"]
    labels = {
        "tfidf": NAMES["tfidf"],
        "sweep": f"sweep best: {methods['sweep']['best']} (backbone frozen)" if "sweep" in methods else "",
        "preset": f"{results['preset']} preset (as shipped)",
    }
    negative = results["negative_class"]
    lines = [
        f"Multi-class: {len(results['class_names'])} classes"
        + (f"; bin = the derived binary view, any class vs {negative!r}" if negative else ""),
        "",
        "| method | split | " + " | ".join(col for _, col in MULTICLASS_TABLE) + " |",
        "| --- | --- | " + " | ".join("---:" for _ in MULTICLASS_TABLE) + " |",
    ]
    for method in methods:
        metrics = method_metrics(methods[method])
        for split in ("val", "test"):
            cells = [number(metrics[split].get(key)) for key, _ in MULTICLASS_TABLE]
            lines.append(f"| {labels[method]} | {split} | " + " | ".join(cells) + " |")
    lines += ["", "Per class on test, F1 and AUPRC of each method:", ""]
    header = ["class", "n"] + [f"{m} {col}" for m in methods for col in ("F1", "AUPRC")]
    lines += ["| " + " | ".join(header) + " |", "| --- | " + " | ".join("---:" for _ in header[1:]) + " |"]
    for name in results["class_names"]:
        rows = [method_metrics(methods[m])["test"]["per_class"][name] for m in methods]
        cells = [number(row[key]) for row in rows for key in ("f1", "auprc")]
        lines.append(f"| {name} | {int(rows[0]['support'])} | " + " | ".join(cells) + " |")
    best = results.get("best")
    if best:
        test = method_metrics(methods[best])["test"]
        names = test["class_names"]
        lines += [
            "",
            f"Confusion matrix of {labels[best]} (best by val macro F1) on test, counts "
            "(rows: true class, columns: predicted):",
            "",
            "| true \\ predicted | " + " | ".join(names) + " |",
            "| --- | " + " | ".join("---:" for _ in names) + " |",
        ]
        for name, row in zip(names, test["confusion_matrix"], strict=True):
            lines.append(f"| {name} | " + " | ".join(str(v) for v in row) + " |")
    if "sweep" in methods:
        lines += ["", "Sweep, every candidate:", "", *methods["sweep"]["table"]]
    return lines


# -- multi-label and regression ----------------------------------------------------------------------
Targets = tuple[dict[str, list[str]], dict[str, np.ndarray], list[str]]
"""Texts and targets per split, and the label names (multi-label; none for a regression)."""


def label_values(data: Path) -> list[Any]:
    """The ``label`` of every row of every split (``None`` where a row has none)."""
    return [row.get("label") for split in ("train", "val", "test") for row in read_rows(data, split)]


def load_targets(data: Path, task: str, fields: list[str] | None) -> Targets:
    """Texts, targets and label names of every split, read by `probekit.data.load_data` as a
    probekit run reads them: multi-label ``(rows, L)`` cells of 1, 0 or nan (unknown), the labels
    in probekit's order; regression ``(rows,)`` numbers and no names."""
    from probekit.data import DataSpec, load_data

    target: Literal["multilabel", "regression"] = "multilabel" if task == "multilabel" else "regression"
    dataset = load_data(DataSpec(path=str(data), label_fields=fields), target=target)
    if dataset.test is None:
        raise SystemExit(f"{data / 'test.jsonl'}: no rows")
    names = sorted(dataset.label_map, key=dataset.label_map.__getitem__)
    texts = {split.name: list(split.texts) for split in dataset.splits()}
    labels = {split.name: np.asarray(split.labels, dtype=np.float64) for split in dataset.splits()}
    return texts, labels, names


def tfidf_features(texts: dict[str, list[str]]) -> tuple[int, dict[str, Any]]:
    """The TF-IDF vocabulary size and features (word 1-2 grams, sublinear tf, fit on train) per split."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    vectorizer = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True)
    features = {"train": vectorizer.fit_transform(texts["train"])}
    features.update({s: vectorizer.transform(texts[s]) for s in ("val", "test")})
    return len(vectorizer.vocabulary_), features


def fit_per_label(features: Any, labels: np.ndarray, c: float) -> list[Any]:
    """One logistic regression (balanced class weights) per label, on the rows where it is known."""
    from sklearn.linear_model import LogisticRegression

    models = []
    for column in labels.T:
        known = np.flatnonzero(~np.isnan(column))
        model = LogisticRegression(C=c, class_weight="balanced", max_iter=5000)
        models.append(model.fit(features[known], column[known].astype(np.int64)))
    return models


def per_label_probs(models: list[Any], features: Any) -> np.ndarray:
    """The ``(rows, L)`` probabilities of the per-label models."""
    return np.stack([model.predict_proba(features)[:, 1] for model in models], axis=1)


def run_tfidf_multilabel(
    texts: dict[str, list[str]], labels: dict[str, np.ndarray], names: list[str]
) -> dict[str, Any]:
    """TF-IDF + a logistic regression per label; C chosen on val macro F1 (the smallest C on a tie)
    at the per-label thresholds of highest val F1, the rule the final model is judged at."""
    from probekit.multilabel_metrics import choose_thresholds, multilabel_metrics

    vocabulary, features = tfidf_features(texts)
    best: tuple[float, float, list[Any], list[float]] | None = None
    for c in TFIDF_C:
        models = fit_per_label(features["train"], labels["train"], c)
        probs = per_label_probs(models, features["val"])
        thresholds = choose_thresholds(labels["val"], probs, rule="max_f1")
        f1 = float(multilabel_metrics(labels["val"], probs, names, thresholds)["f1"])
        log(f"tfidf: C={c:g} val macro F1 {f1:.4f}")
        if best is None or f1 > best[0]:
            best = (f1, c, models, thresholds)
    assert best is not None
    _, c, models, thresholds = best
    scores = {s: per_label_probs(models, features[s]) for s in ("val", "test")}
    return {
        "C": c,
        "features": vocabulary,
        "threshold": thresholds,
        "metrics": {s: multilabel_metrics(labels[s], scores[s], names, thresholds) for s in ("val", "test")},
    }


def run_tfidf_regression(
    texts: dict[str, list[str]], targets: dict[str, np.ndarray]
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """TF-IDF + ridge regression, alpha chosen on val MAE (the smallest on a tie); the outcome and
    the predictions on val and test."""
    from sklearn.linear_model import Ridge
    from sklearn.metrics import mean_absolute_error

    from probekit.regression_metrics import regression_metrics

    vocabulary, features = tfidf_features(texts)
    best: tuple[float, float, Any] | None = None
    for alpha in RIDGE_ALPHA:
        model = Ridge(alpha=alpha).fit(features["train"], targets["train"])
        mae = float(mean_absolute_error(targets["val"], model.predict(features["val"])))
        log(f"tfidf: alpha={alpha:g} val MAE {mae:.4f}")
        if best is None or mae < best[0]:
            best = (mae, alpha, model)
    assert best is not None
    predicted = {s: np.asarray(best[2].predict(features[s]), dtype=np.float64) for s in ("val", "test")}
    outcome = {
        "alpha": best[1],
        "features": vocabulary,
        "metrics": {s: regression_metrics(targets[s], predicted[s]) for s in ("val", "test")},
    }
    return outcome, predicted


def target_setup(task: str, names: list[str], fields: list[str] | None, epochs: int | None) -> list[str]:
    """The ``--set`` assignments of the probekit methods on multi-label or regression data."""
    if task == "multilabel":
        setup = [
            "task.kind=multilabel",
            f"head.num_classes={len(names)}",
            "loss.class_weights=balanced",
            "train.monitor=f1",
            *([] if fields is None else [f"data.label_fields={json.dumps(fields)}"]),
        ]
    else:
        setup = ["task.kind=regression", "head.num_classes=1", "train.monitor=mae"]
    return setup + ([] if epochs is None else [f"train.epochs={epochs}"])


def best_method(methods: dict[str, Any], key: str, lower: bool) -> str:
    """The method of the best val ``key`` (lowest with ``lower``); an undefined value ranks last."""

    def rank(method: str) -> float:
        value = method_metrics(methods[method])["val"].get(key)
        if value is None or math.isnan(value):
            return -math.inf
        return -float(value) if lower else float(value)

    return max(methods, key=rank)


def plot_best_regression(
    results: dict[str, Any], texts: list[str], targets: np.ndarray, held: dict[str, np.ndarray], out: Path
) -> None:
    """``regression_<method>.png``: predicted vs true on test of the best method by val MAE among
    those whose test predictions are at hand (``held``; the probe's from its saved run)."""
    from probekit.plots_extra import plot_regression
    from probekit.probe import Probe

    methods = results["methods"]
    candidates = {m: methods[m] for m in methods if m in held or m == "probe"}
    if not candidates:
        return
    chosen = best_method(candidates, "mae", lower=True)
    if chosen not in held:
        probe = Probe.from_pretrained(methods[chosen]["run"])
        held[chosen] = np.asarray(probe.predict_proba(texts), dtype=np.float64)
    plot_regression(targets, held[chosen], out / f"regression_{chosen}.png")
    results["plotted"] = chosen


def run_targets(args: argparse.Namespace, methods: list[str], task: str) -> dict[str, Any]:
    """Every requested multi-label or regression method; the best by val macro F1 (multi-label)
    or val MAE (regression); for a regression the plot of the best method it can draw."""
    fields: list[str] | None = args.label_fields
    texts, labels, names = load_targets(args.data, task, fields)
    preset = args.preset or "safety8k"
    setup = target_setup(task, names, fields, args.epochs)
    key, shown = ("f1", "macro F1") if task == "multilabel" else ("mae", "MAE")
    results: dict[str, Any] = {"data": str(args.data), "task": task, "preset": preset, "set": setup}
    if task == "multilabel":
        results["label_names"] = names
    results["methods"] = {}
    held: dict[str, np.ndarray] = {}
    for method in TARGET_METHODS:
        if method not in methods:
            continue
        log(f"== {method}")
        began = time.perf_counter()
        if method == "tfidf" and task == "multilabel":
            outcome = run_tfidf_multilabel(texts, labels, names)
        elif method == "tfidf":
            outcome, predicted = run_tfidf_regression(texts, labels)
            held["tfidf"] = predicted["test"]
        elif method == "sweep":
            outcome = run_sweep(args.data, args.model, args.out, setup, preset)
        else:
            outcome = run_training(args.data, args.model, args.out, method, setup, preset)
            if task == "regression":
                outcome.pop("threshold")  # a regression has none
        outcome["wall_s"] = round(time.perf_counter() - began, 1)
        results["methods"][method] = outcome
        test = method_metrics(outcome)["test"]
        log(f"== {method} done in {outcome['wall_s']} s; test {shown} {number(test[key], 4)}")
    if results["methods"]:
        results["best"] = best_method(results["methods"], key, lower=task == "regression")
    if task == "regression":
        plot_best_regression(results, texts["test"], labels["test"], held, args.out)
    return results


def target_method_names(results: dict[str, Any]) -> dict[str, str]:
    """The table name of each multi-label or regression method."""
    methods = results["methods"]
    return {
        "tfidf": "TF-IDF + logistic regression per label"
        if results["task"] == "multilabel"
        else "TF-IDF + ridge regression",
        "sweep": f"sweep best: {methods['sweep']['best']} (backbone frozen)" if "sweep" in methods else "",
        "probe": f"{results['preset']} probe (task.kind={results['task']})",
    }


def summary_table(results: dict[str, Any], columns: tuple[tuple[str, str], ...]) -> list[str]:
    """One row per method and split (val, test) with ``columns``."""
    methods, names = results["methods"], target_method_names(results)
    lines = [
        "| method | split | " + " | ".join(col for _, col in columns) + " |",
        "| --- | --- | " + " | ".join("---:" for _ in columns) + " |",
    ]
    for method in methods:
        metrics = method_metrics(methods[method])
        for split in ("val", "test"):
            cells = [number(metrics[split].get(key)) for key, _ in columns]
            lines.append(f"| {names[method]} | {split} | " + " | ".join(cells) + " |")
    return lines


def candidate_table(sweep: dict[str, Any], columns: tuple[tuple[str, str], ...]) -> list[str]:
    """The sweep's candidates with ``columns`` on val and test; the best one marked."""
    header = ["candidate", "layers"] + [f"{s} {col}" for s in ("val", "test") for _, col in columns]
    header.append("epochs")
    lines = [
        "| " + " | ".join(header) + " |",
        "| --- | --- | " + " | ".join("---:" for _ in header[2:]) + " |",
    ]
    for c in sweep["candidates"]:
        name = f"{c['name']} (best)" if c["name"] == sweep["best"] else c["name"]
        members = "+".join(map(str, c["layers"])) + (f" ({c['combine']})" if c["combine"] else "")
        cells = [number(c["metrics"][s].get(key)) for s in ("val", "test") for key, _ in columns]
        lines.append(
            "| " + " | ".join([name, members, *cells, f"{c['best_epoch']}/{c['epochs_run']}"]) + " |"
        )
    return lines


def markdown_multilabel(results: dict[str, Any]) -> list[str]:
    """The summary table, F1 and AUPRC per label and method on test, the sweep's candidates."""
    methods, labels = results["methods"], results["label_names"]
    lines = [
        f"Multi-label: {len(labels)} labels ({', '.join(labels)}); per-label thresholds chosen on val "
        "(highest F1); unknown cells left out of every metric",
        "",
        *summary_table(results, MULTILABEL_TABLE),
    ]
    if methods:
        lines += ["", "Per label on test, F1 and AUPRC of each method (known: rows, +: positives):", ""]
        header = ["label", "known", "+"] + [f"{m} {col}" for m in methods for col in ("F1", "AUPRC")]
        lines += [
            "| " + " | ".join(header) + " |",
            "| --- | " + " | ".join("---:" for _ in header[1:]) + " |",
        ]
        for name in labels:
            rows = [method_metrics(methods[m])["test"]["per_label"][name] for m in methods]
            cells = [number(row[key]) for row in rows for key in ("f1", "auprc")]
            counts = f"{int(rows[0]['known'])} | {int(rows[0]['support'])}"
            lines.append(f"| {name} | {counts} | " + " | ".join(cells) + " |")
        lines += ["", f"Best by val macro F1: {target_method_names(results)[results['best']]}"]
    if "sweep" in methods:
        columns = (("f1", "macro F1"), ("auroc", "macro AUROC"), ("auprc", "macro AUPRC"))
        lines += ["", "Sweep, every candidate:", "", *candidate_table(methods["sweep"], columns)]
    return lines


def markdown_regression(results: dict[str, Any]) -> list[str]:
    """The table of every method and split, the best method and its plot, the sweep's candidates."""
    methods, names = results["methods"], target_method_names(results)
    lines = ["Regression: MAE and RMSE in the target's units"]
    if methods:
        test = method_metrics(next(iter(methods.values())))["test"]
        if "target_mean" in test:
            lines[0] += f"; test targets mean {test['target_mean']:.4g}, std {test['target_std']:.4g}"
    lines += ["", *summary_table(results, REGRESSION_TABLE)]
    if methods:
        lines += ["", f"Best by val MAE: {names[results['best']]}"]
    plotted = results.get("plotted")
    if plotted:
        note = "" if plotted == results["best"] else " (the sweep's candidates keep no predictions)"
        lines.append(f"Predicted vs true on test of {names[plotted]}{note}: regression_{plotted}.png")
    if "sweep" in methods:
        columns = (("mae", "MAE"), ("rmse", "RMSE"), ("r2", "R²"))
        lines += ["", "Sweep, every candidate:", "", *candidate_table(methods["sweep"], columns)]
    return lines


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder with train/val/test.jsonl")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "results", help="where the results go")
    parser.add_argument(
        "--methods",
        default=None,
        help=f"comma list; binary: {', '.join(METHODS)}; multi-class: {', '.join(MULTICLASS_METHODS)}; "
        f"multi-label and regression: {', '.join(TARGET_METHODS)}; default: all of the task's",
    )
    parser.add_argument("--model", default=None, help="backbone (default: the preset's embedded MiniLM)")
    parser.add_argument("--finetune-epochs", type=int, default=3)
    parser.add_argument(
        "--epochs", type=int, default=None, help="train.epochs for every method (smoke tests)"
    )
    parser.add_argument(
        "--task",
        choices=TASKS,
        default="auto",
        help="auto: multilabel with --label-fields or list labels; regression when the labels are "
        "numbers, not all integers; multiclass when they take more than two values or are not integers",
    )
    parser.add_argument(
        "--label-fields",
        default=None,
        help="multi-label data with one column per label (0/1/null), comma-separated; implies multilabel",
    )
    parser.add_argument(
        "--preset",
        default=None,
        help="probekit preset (default: hazards13 multi-class, safety8k otherwise)",
    )
    parser.add_argument(
        "--negative-class",
        default=None,
        help="multi-class: the harmless label of the binary view (default: safe when it is a label)",
    )
    return parser


def check_task(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    """The task of the arguments and the data; ``args.label_fields`` becomes a list (or None)."""
    if args.label_fields is None and args.task != "auto":
        return str(args.task)
    if args.label_fields is None:
        values = label_values(args.data)
        if any(value is None for value in values):
            parser.error(
                "a row has no label (or a null one); for one 0/1/null column per label give --label-fields"
            )
        return detect_task(values, "auto")
    args.label_fields = [f.strip() for f in args.label_fields.split(",") if f.strip()]
    if not args.label_fields:
        parser.error("--label-fields: name the label columns, comma-separated")
    if args.task not in ("auto", "multilabel"):
        parser.error(f"--label-fields gives multi-label data; it does not go with --task {args.task}")
    return "multilabel"


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[str, list[str], list[Any]]:
    """The task, the methods and the labels of valid arguments (binary and multi-class: sorted;
    multi-label: the label names in probekit's order; regression: none); parser.error otherwise."""
    from probekit.errors import DataError

    for split in ("train", "val", "test"):
        if not (args.data / f"{split}.jsonl").is_file():
            parser.error(f"{args.data / f'{split}.jsonl'} not found")
    task = check_task(parser, args)
    known = {"binary": METHODS, "multiclass": MULTICLASS_METHODS}.get(task, TARGET_METHODS)
    methods = [m.strip() for m in (args.methods or ",".join(known)).split(",") if m.strip()]
    unknown = sorted(set(methods) - set(known))
    if unknown:
        parser.error(f"unknown {task} method(s) {', '.join(unknown)}; choose from {', '.join(known)}")
    if task in ("multilabel", "regression"):
        try:
            return task, methods, load_targets(args.data, task, args.label_fields)[2]
        except DataError as exc:
            parser.error(str(exc))
    classes = distinct_labels(args.data)
    if task == "multiclass":
        names = [str(c) for c in classes]
        if args.negative_class is None and "safe" in names:
            args.negative_class = "safe"
        if args.negative_class is not None and args.negative_class not in names:
            parser.error(f"--negative-class {args.negative_class!r} is not a label ({', '.join(names)})")
        train = {r["label"] for r in read_rows(args.data, "train")}
        if missing := [str(c) for c in classes if c not in train]:
            parser.error(f"class(es) {', '.join(missing)} have no train rows")
    return task, methods, classes


def run_binary(args: argparse.Namespace, methods: list[str]) -> dict[str, Any]:
    """Every requested binary method, and the operating point of the best probekit run."""
    preset = args.preset or "safety8k"
    epochs = [] if args.epochs is None else [f"train.epochs={args.epochs}"]
    results: dict[str, Any] = {"data": str(args.data), "methods": {}}
    for method in METHODS:
        if method not in methods:
            continue
        log(f"== {method}")
        began = time.perf_counter()
        if method == "tfidf":
            outcome = run_tfidf(args.data)
        elif method == "sweep":
            outcome = run_sweep(args.data, args.model, args.out, epochs, preset)
        elif method == "probe":
            outcome = run_training(
                args.data, args.model, args.out, method, ["freezer.kind=all", *epochs], preset
            )
        elif method == "safety8k":
            outcome = run_training(args.data, args.model, args.out, method, epochs, preset)
        else:
            finetune = epochs or [f"train.epochs={args.finetune_epochs}"]
            outcome = run_training(
                args.data, args.model, args.out, method, ["freezer.kind=none", *finetune], preset
            )
        outcome["wall_s"] = round(time.perf_counter() - began, 1)
        results["methods"][method] = outcome
        test = outcome["metrics"]["test"] if "metrics" in outcome else None
        log(
            f"== {method} done in {outcome['wall_s']} s"
            + (f"; test AUROC {test['auroc']:.4f}" if test else "")
        )
    trained = [m for m in ("safety8k", "probe", "finetune") if m in results["methods"]]
    if trained:
        chosen = max(trained, key=lambda m: results["methods"][m]["metrics"]["val"]["auroc"])
        point = operating_point(Path(results["methods"][chosen]["run"]), args.data, 0.01)
        results["operating_point"] = {"method": NAMES[chosen], **point}
    return results


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    task, methods, classes = check_args(parser, args)
    args.out.mkdir(parents=True, exist_ok=True)
    if task == "binary":
        results = run_binary(args, methods)
        text = json.dumps(results, indent=2, default=float)
        table = markdown(results)
    else:
        from probekit import jsonio

        if task == "multiclass":
            results = run_multiclass(args, methods, classes)
            table = markdown_multiclass(results)
        else:
            results = run_targets(args, methods, task)
            table = markdown_multilabel(results) if task == "multilabel" else markdown_regression(results)
        text = jsonio.dumps(results, indent=2, default=float)
    (args.out / "results.json").write_text(text + "\n", encoding="utf-8")
    (args.out / "results.md").write_text("\n".join(table) + "\n", encoding="utf-8")
    print("\n".join(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
