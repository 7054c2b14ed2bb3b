"""Inference speed of a trained probe: PyTorch, ONNX Runtime (fp32 and int8) and the baselines.

For each ``--run`` (a run folder of ``probekit train``), in one process and on the same texts:

* the run is exported (``probekit.export.export_onnx``, with ``quantize="int8"``) into ``--out``;
* throughput, texts/s at batch 1, 8 and 64 (batch 1 over the first ``--batch1-texts`` texts), of
  every path, tokenisation and post-processing included:

  - ``torch``: `probekit.Probe.predict_proba` (length-sorted batches, inference mode);
  - ``onnx``, ``onnx-int8``: `probekit.exported.ExportedProbe.predict_proba` (tokenizers + ONNX
    Runtime; no torch on that path);
  - ``hf-pipeline``: ``transformers.pipeline("text-classification")`` on
    ``AutoModelForSequenceClassification`` of the same backbone with as many labels (its own
    classifier on the last layer's [CLS]: the same backbone cost, not the same probabilities);
  - ``st+head``: ``sentence_transformers.SentenceTransformer.encode`` (masked mean of the last
    layer) and the probe's own head on it (same probabilities only when the probe pools the last
    layer with a masked mean; otherwise the speed alone is comparable);

* warm single-text latency, p50 and p99 over ``--latency-calls`` calls of one text each;
* the largest |probability difference| from ``torch`` on every text, and the task's metrics on
  the labelled texts of ``--data`` (accuracy, AUROC) per probekit path with the delta from torch;
* ``probekit predict`` end to end, as a new process (start-up and loading included), for 1 and
  for 1,000 texts, with the run folder (torch) and with the export (ONNX).

It prints Markdown tables, writes ``inference.json`` and ``inference.png`` (texts/s per path
and batch size) to ``--out``. Nothing is downloaded: the backbone is the run's, read from where
the run loads it (the embedded MiniLM for the shipped presets).

    python benchmarks/inference.py --run runs/demo --data ../shared/data/safety-mix/test.jsonl
    python benchmarks/inference.py --run runs/demo --run runs/hazards \\
        --data ../shared/data/safety-mix/test.jsonl --data ../shared/data/hazards/test.jsonl

``--data`` is given once per ``--run`` (or once for all). ``--threads N`` sets torch's and ONNX
Runtime's threads (default: every core for both).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BATCHES = (1, 8, 64)


def read_rows(path: Path, limit: int | None) -> tuple[list[str], list[Any]]:
    """``text`` and ``label`` of each JSON line of ``path`` (the first ``limit``)."""
    texts, labels = [], []
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                row = json.loads(line)
                texts.append(row["text"])
                labels.append(row.get("label"))
            if limit is not None and len(texts) >= limit:
                break
    return texts, labels


def timed(call: Callable[[], Any], repeat: int = 1) -> float:
    """The best wall time of ``repeat`` calls, in seconds."""
    best = float("inf")
    for _ in range(repeat):
        began = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - began)
    return best


def latency(call: Callable[[str], Any], texts: Sequence[str], calls: int) -> tuple[float, float]:
    """p50 and p99 in milliseconds of ``calls`` single-text calls (after 5 warm-up calls)."""
    for text in texts[:5]:
        call(text)
    samples = []
    for i in range(calls):
        began = time.perf_counter()
        call(texts[i % len(texts)])
        samples.append((time.perf_counter() - began) * 1000)
    samples.sort()
    return statistics.median(samples), samples[min(len(samples) - 1, int(0.99 * len(samples)))]


class Paths:
    """Every way of scoring texts, built once (warm), each ``scores(texts, batch) -> ndarray``."""

    def __init__(self, run: Path, export: Path, threads: int | None) -> None:
        import torch

        from probekit.exported import ExportedProbe
        from probekit.probe import Probe

        self.probe = Probe.from_pretrained(run).eval()
        self.onnx = ExportedProbe(export, threads=threads)
        self.int8 = ExportedProbe(export, precision="int8", threads=threads)
        self.task = self.probe._task()
        self.location = self._backbone_location()
        self.paths: dict[str, Callable[[Sequence[str], int], np.ndarray]] = {
            "torch": lambda t, b: np.asarray(
                self.probe.predict_proba(list(t), batch_size=b), dtype=np.float64
            ),
            "onnx": lambda t, b: np.asarray(self.onnx.predict_proba(list(t), batch_size=b), dtype=np.float64),
            "onnx-int8": lambda t, b: np.asarray(
                self.int8.predict_proba(list(t), batch_size=b), dtype=np.float64
            ),
        }
        self.comparable = {"torch": True, "onnx": True, "onnx-int8": True}
        self._pipeline(torch)
        self._sentence_transformers(torch)

    def _backbone_location(self) -> str:
        from probekit.hub import resolve_location

        assert self.probe.probe_config is not None
        return resolve_location(self.probe.probe_config.model)[0]

    def _pipeline(self, torch: Any) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

        labels = max(2, len(self.probe.label_names))
        model = AutoModelForSequenceClassification.from_pretrained(self.location, num_labels=labels)
        tokenizer = AutoTokenizer.from_pretrained(self.location)
        pipe = pipeline("text-classification", model=model.eval(), tokenizer=tokenizer, device=-1, top_k=None)
        length = self.probe.max_length

        def scores(texts: Sequence[str], batch: int) -> np.ndarray:
            with torch.inference_mode():
                out = pipe(list(texts), batch_size=batch, truncation=True, max_length=length)
            return np.asarray([[c["score"] for c in row] for row in out])

        self.paths["hf-pipeline"] = scores
        self.comparable["hf-pipeline"] = False

    def _sentence_transformers(self, torch: Any) -> None:
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError:
            print("st+head: skipped (pip install -e '.[bench]' for sentence-transformers)", file=sys.stderr)
            return
        encoder = SentenceTransformer(self.location, device="cpu")
        encoder.max_seq_length = self.probe.max_length
        head, task = self.probe.head, self.task
        width = (
            getattr(encoder, "get_embedding_dimension", None) or encoder.get_sentence_embedding_dimension
        )()
        if head_width(head) != width:
            print(
                f"st+head: skipped (the head reads {head_width(head)} features, ST gives {width})",
                file=sys.stderr,
            )
            return
        spec = self.probe.pooler_spec
        self.comparable["st+head"] = spec.kind == "masked_mean" and self.probe.layers == (
            self.probe.layout.num_blocks,
        )

        def scores(texts: Sequence[str], batch: int) -> np.ndarray:
            with torch.inference_mode():
                features = encoder.encode(
                    list(texts), batch_size=batch, convert_to_tensor=True, normalize_embeddings=False
                )
                return task.scores(head(features.float())).double().numpy()

        self.paths["st+head"] = scores


def head_width(head: Any) -> int:
    """The number of features the head's first layer reads."""
    import torch

    for module in head.modules():
        if isinstance(module, torch.nn.Linear):
            return int(module.in_features)
        if isinstance(module, torch.nn.LayerNorm):
            return int(module.normalized_shape[0])
    return -1


def metrics_of(paths: Paths, labels: Sequence[Any], scores: np.ndarray) -> dict[str, float]:
    """Accuracy and AUROC (macro for several classes) of ``scores`` at the probe's threshold."""
    from probekit.tasks.base import Scores

    lookup = {k.lower(): v for k, v in paths.onnx.manifest.label_map.items()}
    known = [i for i, label in enumerate(labels) if label is not None and str(label).lower() in lookup]
    if not known:
        return {}
    y = np.asarray([lookup[str(labels[i]).lower()] for i in known])
    found = paths.task.metrics(Scores(y, scores[known], 0.0), paths.probe.threshold)
    return {key: float(found[key]) for key in ("accuracy", "auroc", "binary_auroc") if key in found}


def cli_seconds(target: Path, texts: Sequence[str], count: int) -> float:
    """Wall time of ``probekit predict TARGET --input FILE`` over ``count`` texts (a new process)."""
    with tempfile.TemporaryDirectory() as folder:
        inputs = Path(folder) / "texts.txt"
        inputs.write_text("".join(texts[i % len(texts)].replace("\n", " ") + "\n" for i in range(count)))
        began = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-m", "probekit", "predict", str(target), "--input", str(inputs)],
            capture_output=True,
            text=True,
            check=False,
        )
        seconds = time.perf_counter() - began
    if done.returncode != 0:
        raise SystemExit(f"probekit predict {target} failed: {done.stderr.strip()[-500:]}")
    return seconds


def bench_run(run: Path, data: Path, args: argparse.Namespace) -> dict[str, Any]:
    from probekit.export import export_onnx

    export = args.out / f"{run.name}-onnx"
    began = time.perf_counter()
    exported = export_onnx(
        run, export, quantize="int8", overwrite=True, log=lambda line: print(line, file=sys.stderr)
    )
    export_seconds = time.perf_counter() - began
    texts, labels = read_rows(data, args.texts)
    paths = Paths(run, export, args.threads)
    report: dict[str, Any] = {
        "run": str(run),
        "data": str(data),
        "texts": len(texts),
        "target": paths.task.target,
        "export_seconds": export_seconds,
        "export_check": {"fp32": exported.max_abs_diff, "int8": exported.int8_max_abs_diff},
        "paths": {},
    }
    reference = paths.paths["torch"](texts, 64)
    for name, scores in paths.paths.items():
        print(f"{run.name}: {name} ...", file=sys.stderr)
        scores(texts[:16], 8)  # warm
        throughput = {}
        for batch in BATCHES:
            rows = texts[: args.batch1_texts] if batch == 1 else texts
            throughput[batch] = len(rows) / timed(
                lambda rows=rows, batch=batch, scores=scores: scores(rows, batch)
            )
        p50, p99 = latency(lambda text, scores=scores: scores([text], 1), texts, args.latency_calls)
        entry: dict[str, Any] = {"texts_per_s": throughput, "latency_ms": {"p50": p50, "p99": p99}}
        if paths.comparable.get(name):
            values = reference if name == "torch" else scores(texts, 64)
            entry["max_abs_diff"] = float(np.max(np.abs(values - reference))) if name != "torch" else 0.0
            entry["metrics"] = metrics_of(paths, labels, values)
        report["paths"][name] = entry
    if not args.no_cli:
        report["cli_seconds"] = {
            f"{backend} {count}": cli_seconds(target, texts, count)
            for backend, target in (("torch", run), ("onnx", export))
            for count in (1, 1000)
        }
    return report


def table(report: dict[str, Any]) -> list[str]:
    """The run's results as Markdown: throughput and latency, ratios to the HF pipeline."""
    paths = report["paths"]
    base = paths.get("hf-pipeline", {}).get("texts_per_s", {})
    torch_metrics = paths["torch"].get("metrics", {})
    data = Path(report["data"])
    lines = [
        f"### {Path(report['run']).name} ({report['target']}, {report['texts']} texts of "
        f"{data.parent.name}/{data.name})",
        "",
        "| path | texts/s b1 | b8 | b64 | x HF pipeline b64 | p50 ms | p99 ms | max abs diff "
        "| accuracy (delta) | AUROC (delta) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, entry in paths.items():
        tps = entry["texts_per_s"]
        ratio = f"{tps[64] / base[64]:.2f}x" if base.get(64) else "-"
        diff = f"{entry['max_abs_diff']:.2g}" if "max_abs_diff" in entry else "n/a"
        found = entry.get("metrics", {})
        cells = []
        for key in ("accuracy", "auroc"):
            if key in found:
                delta = found[key] - torch_metrics.get(key, found[key])
                cells.append(f"{found[key]:.4f} ({delta:+.4f})")
            else:
                cells.append("n/a")
        lines.append(
            f"| {name} | {tps[1]:.1f} | {tps[8]:.1f} | {tps[64]:.1f} | {ratio} | "
            f"{entry['latency_ms']['p50']:.1f} | {entry['latency_ms']['p99']:.1f} | {diff} | "
            f"{cells[0]} | {cells[1]} |"
        )
    if "cli_seconds" in report:
        lines += ["", "| `probekit predict` (new process) | 1 text | 1,000 texts |", "| --- | --- | --- |"]
        for backend in ("torch", "onnx"):
            c = report["cli_seconds"]
            lines.append(f"| {backend} | {c[f'{backend} 1']:.2f} s | {c[f'{backend} 1000']:.2f} s |")
    lines += [
        "",
        f"export: {report['export_seconds']:.1f} s; check fp32 {report['export_check']['fp32']:.2g}, "
        f"int8 {report['export_check']['int8']:.2g}",
    ]
    return lines


def plot(reports: Sequence[dict[str, Any]], path: Path) -> None:
    """Texts/s per path and batch size, one panel per run."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5 * len(reports), 4.2))
    axes = fig.subplots(1, len(reports), squeeze=False)[0]
    for ax, report in zip(axes, reports, strict=True):
        names = list(report["paths"])
        width = 0.8 / len(BATCHES)
        for j, batch in enumerate(BATCHES):
            values = [report["paths"][n]["texts_per_s"][batch] for n in names]
            ax.bar([i + (j - 1) * width for i in range(len(names))], values, width, label=f"batch {batch}")
        ax.set_xticks(range(len(names)), names, rotation=20)
        ax.set_ylabel("texts/s (higher is better)")
        ax.set_title(f"{Path(report['run']).name}: {report['texts']} texts, {os.cpu_count()} CPU cores")
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, action="append", required=True, help="A run folder (repeatable).")
    parser.add_argument(
        "--data", type=Path, action="append", required=True, help="Labelled JSONL per run (or one)."
    )
    parser.add_argument("--texts", type=int, default=None, help="Use the first N texts (default all).")
    parser.add_argument("--batch1-texts", type=int, default=64, help="Texts timed at batch 1.")
    parser.add_argument("--latency-calls", type=int, default=200)
    parser.add_argument("--threads", type=int, default=None, help="torch and ONNX Runtime threads.")
    parser.add_argument("--no-cli", action="store_true", help="Skip the probekit predict processes.")
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "probekit-inference")
    args = parser.parse_args(argv)
    if len(args.data) not in (1, len(args.run)):
        parser.error("give --data once, or once per --run")
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    datas = args.data if len(args.data) == len(args.run) else args.data * len(args.run)
    reports = [bench_run(run, data, args) for run, data in zip(args.run, datas, strict=True)]
    for report in reports:
        print("\n".join(table(report)) + "\n")
    (args.out / "inference.json").write_text(json.dumps(reports, indent=2) + "\n")
    plot(reports, args.out / "inference.png")
    print(f"wrote {args.out / 'inference.json'} and {args.out / 'inference.png'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
