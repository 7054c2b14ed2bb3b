"""``binary``: two classes, softmax over two logits, the positive class's probability as score.

The loss is cross-entropy with label smoothing; the scores are ``softmax(logits)[:, 1]``; the
metrics are `probekit.metrics.compute_metrics`; the threshold is chosen on validation scores by
`probekit.config.ThresholdSpec` (max F1, or the lowest threshold within an FPR budget);
``predict`` gives ``{"text", "label", "probability", "confidence", "probabilities"}``: the label
(positive when the probability reaches the threshold), the positive class's probability, the
predicted label's probability and both classes' probabilities by label.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from probekit.errors import UserError
from probekit.registry import TASKS
from probekit.spec import TaskSpec
from probekit.tasks.base import CrossEntropyTask, Scores

if TYPE_CHECKING:
    import numpy as np
    from torch import Tensor

    from probekit.config import ThresholdSpec
    from probekit.data import Dataset

EPOCH_EXCLUDED = ("threshold", "n", "positives")
"""Keys of `compute_metrics` that ``metrics.jsonl`` leaves out (constant within a run)."""


class BinaryTask(CrossEntropyTask):
    """Binary classification; see the module notes."""

    kind = "binary"
    target = "binary"

    def __init__(self, threshold: ThresholdSpec) -> None:
        self.threshold = threshold

    def check(self, dataset: Dataset, num_classes: int) -> None:
        if dataset.num_classes != 2 or num_classes != 2:
            raise UserError(
                f"head.num_classes={num_classes} and the data has {dataset.num_classes} classes; "
                "task.kind=binary needs 2 (for more, set task.kind=multiclass and head.num_classes)"
            )

    def scores(self, logits: Tensor) -> Tensor:
        import torch

        return torch.softmax(logits, dim=-1)[:, 1]

    def metrics(self, scores: Scores, threshold: Any = None) -> dict[str, float]:
        from probekit.metrics import compute_metrics

        return compute_metrics(scores.labels, scores.scores, 0.5 if threshold is None else threshold)

    def epoch_metrics(self, scores: Scores) -> dict[str, float]:
        return {k: v for k, v in self.metrics(scores).items() if k not in EPOCH_EXCLUDED}

    def epoch_line(self, metrics: Mapping[str, float]) -> str:
        return f"acc {metrics['accuracy']:.4f} auroc {metrics['auroc']:.4f}"

    def choose_threshold(self, scores: Scores) -> float:
        return self.threshold.choose(scores.labels, scores.scores)

    def threshold_rule(self) -> str:
        return self.threshold.describe()

    def threshold_rule_id(self) -> str:
        return self.threshold.rule_id()

    def summary_line(self, split: str, metrics: Mapping[str, float]) -> str:
        m = metrics
        return (
            f"{split:<5} accuracy {m['accuracy']:.4f}  f1 {m['f1']:.4f}  auroc {m['auroc']:.4f}  "
            f"auprc {m['auprc']:.4f}  recall@1%fpr {m['recall_at_1pct_fpr']:.4f}  ece {m['ece']:.4f}"
        )

    def probability_matrix(self, scores: np.ndarray) -> np.ndarray:
        """``(rows, 2)``: the negative class's probability, then the positive class's."""
        import numpy as np

        return np.stack([1.0 - scores, scores], axis=1)

    def predictions(
        self, texts: Sequence[str], scores: Sequence[Any], threshold: Any, label_names: Sequence[Any]
    ) -> list[dict[str, Any]]:
        names = list(label_names) or [0, 1]
        rows = []
        for text, p in zip(texts, scores, strict=True):
            positive = p >= threshold
            rows.append(
                {
                    "text": text,
                    "label": names[1] if positive else names[0],
                    "probability": p,
                    "confidence": p if positive else 1.0 - p,
                    "probabilities": {names[0]: 1.0 - p, names[1]: p},
                }
            )
        return rows

    def write_plots(
        self,
        folder: Path,
        history: Sequence[Mapping[str, Any]],
        scores: Scores,
        threshold: Any,
        class_names: Sequence[str],
        *,
        split: str | None = None,
        monitor: str | None = None,
    ) -> list[Path]:
        from probekit import plots

        return plots.write_report_plots(
            folder,
            list(history),
            scores.labels,
            scores.scores,
            threshold,
            tuple(class_names),
            split=split,
            monitor=monitor,
        )


@TASKS.register
class BinaryTaskSpec(TaskSpec):
    """Two classes (``label_map`` of two labels); today's recipe."""

    kind: Literal["binary"] = "binary"

    def build(self, threshold: Any) -> BinaryTask:
        return BinaryTask(threshold)
