"""Every method of the results report on one dataset: the numbers behind ``docs/results.md``.

    python benchmarks/results.py [--data DIR] [--out DIR] [--methods LIST] [--model NAME]

``--data`` is a folder with ``train.jsonl``, ``val.jsonl`` and ``test.jsonl`` (``text``, ``label``
and optionally ``source`` per line); by default the public safety mix in ``../shared/data``.
Every method is judged the same way: the decision threshold is chosen on val (highest F1, as a
probekit run does), and `probekit.metrics.compute_metrics` gives accuracy, F1, AUROC, AUPRC,
recall at 1% and 5% FPR and ECE on val and test.

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
"""

from __future__ import annotations

import argparse
import json
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


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def read_split(data: Path, split: str) -> tuple[list[str], np.ndarray, list[str]]:
    """Texts, labels (0/1) and sources of one split file."""
    rows = [json.loads(line) for line in (data / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()]
    rows = [r for r in rows if r]
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
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

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


def base_config(data: Path, model: str | None, *assignments: str) -> Any:
    import probekit

    probekit.discover()
    return probekit.compose_config(
        preset="safety8k", model=model, data=str(data), assignments=["train.cpu=true", *assignments]
    )


def run_training(
    data: Path, model: str | None, out: Path, name: str, assignments: list[str]
) -> dict[str, Any]:
    """``probekit train`` on the safety8k preset with ``assignments``; metrics from its run folder."""
    from probekit.training import train

    run = out / "runs" / name
    result = train(base_config(data, model, *assignments), out=run, overwrite=True, log=log, progress=False)
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


def run_sweep(data: Path, model: str | None, out: Path, assignments: list[str]) -> dict[str, Any]:
    """``probekit sweep`` on the safety8k preset; its table, candidates and plot."""
    from probekit.sweep import sweep

    folder = out / "runs" / "sweep"
    config = base_config(data, model, *assignments)
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder with train/val/test.jsonl")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "results", help="where the results go")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {', '.join(METHODS)}")
    parser.add_argument("--model", default=None, help="backbone (default: safety8k's embedded MiniLM)")
    parser.add_argument("--finetune-epochs", type=int, default=3)
    parser.add_argument(
        "--epochs", type=int, default=None, help="train.epochs for every method (smoke tests)"
    )
    args = parser.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    for split in ("train", "val", "test"):
        if not (args.data / f"{split}.jsonl").is_file():
            parser.error(f"{args.data / f'{split}.jsonl'} not found")
    args.out.mkdir(parents=True, exist_ok=True)
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
            outcome = run_sweep(args.data, args.model, args.out, epochs)
        elif method == "probe":
            outcome = run_training(args.data, args.model, args.out, method, ["freezer.kind=all", *epochs])
        elif method == "safety8k":
            outcome = run_training(args.data, args.model, args.out, method, epochs)
        else:
            finetune = epochs or [f"train.epochs={args.finetune_epochs}"]
            outcome = run_training(args.data, args.model, args.out, method, ["freezer.kind=none", *finetune])
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
    (args.out / "results.json").write_text(
        json.dumps(results, indent=2, default=float) + "\n", encoding="utf-8"
    )
    table = markdown(results)
    (args.out / "results.md").write_text("\n".join(table) + "\n", encoding="utf-8")
    print("\n".join(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
