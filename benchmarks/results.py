"""Every method of the results report on one dataset: the numbers behind ``docs/results.md``.

    python benchmarks/results.py [--data DIR] [--out DIR] [--methods LIST] [--model NAME]
                                 [--task auto|binary|multiclass] [--preset NAME] [--negative-class NAME]

``--data`` is a folder with ``train.jsonl``, ``val.jsonl`` and ``test.jsonl`` (``text``, ``label``
and optionally ``source`` per line); by default the public safety mix in ``../shared/data``.
``--task auto`` (the default) reads the labels: more than two distinct values, or labels that
are not integers (``safe``, ``vcr``...), make a multi-class dataset; otherwise it is binary.

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
from typing import Any

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
TASKS = ("auto", "binary", "multiclass")
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
"""The C grid of the multi-class TF-IDF baseline (chosen on val macro F1)."""


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
    """``binary`` or ``multiclass``: ``task`` unless ``auto``; auto: multi-class when there are
    more than two labels or they are not integers (``0``/``1``, ``true``/``false``)."""
    if task != "auto":
        return task
    try:
        [int(v) for v in labels]
    except ValueError:
        return "multiclass"
    return "multiclass" if len(labels) > 2 else "binary"


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder with train/val/test.jsonl")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "results", help="where the results go")
    parser.add_argument(
        "--methods",
        default=None,
        help=f"comma list; binary: {', '.join(METHODS)}; multi-class: {', '.join(MULTICLASS_METHODS)} "
        "(probe and finetune are binary only); default: all of the task's",
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
        help="auto: multiclass when the labels take more than two values or are not integers",
    )
    parser.add_argument(
        "--preset", default=None, help="probekit preset (default: hazards13 multi-class, safety8k binary)"
    )
    parser.add_argument(
        "--negative-class",
        default=None,
        help="multi-class: the harmless label of the binary view (default: safe when it is a label)",
    )
    return parser


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[str, list[str], list[Any]]:
    """The task, the methods and the labels (sorted) of valid arguments; parser.error otherwise."""
    for split in ("train", "val", "test"):
        if not (args.data / f"{split}.jsonl").is_file():
            parser.error(f"{args.data / f'{split}.jsonl'} not found")
    classes = distinct_labels(args.data)
    task = detect_task(classes, args.task)
    known = METHODS if task == "binary" else MULTICLASS_METHODS
    methods = [m.strip() for m in (args.methods or ",".join(known)).split(",") if m.strip()]
    unknown = sorted(set(methods) - set(known))
    if unknown:
        parser.error(f"unknown {task} method(s) {', '.join(unknown)}; choose from {', '.join(known)}")
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

        results = run_multiclass(args, methods, classes)
        text = jsonio.dumps(results, indent=2, default=float)
        table = markdown_multiclass(results)
    (args.out / "results.json").write_text(text + "\n", encoding="utf-8")
    (args.out / "results.md").write_text("\n".join(table) + "\n", encoding="utf-8")
    print("\n".join(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
