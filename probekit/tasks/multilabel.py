"""``multilabel``: L labels that may co-occur, one sigmoid each, some of them unknown per row.

A row's target is L cells, ``1``, ``0`` or unknown (``nan``; `probekit.targets`). The loss is
binary cross-entropy per known cell (label smoothing pulls targets towards 0.5 by
``smoothing / 2``), each positive cell weighted by its label's ``pos_weight``
(``loss.class_weights``: ``balanced`` is negatives / positives in train). An unknown cell adds
exactly nothing to the loss, its gradient or any metric. The scores are the ``(rows, L)``
sigmoid probabilities.

Each label gets its own threshold, chosen on its known val rows by the config's ``threshold``
rule (max F1, or a target FPR per label) and stored with the probe; ``predict`` says which
labels are on. The metrics are `probekit.multilabel_metrics.multilabel_metrics`: per label
precision, recall, F1, AUROC, AUPRC and recall at 1% FPR; macro and micro F1, macro AUROC and
AUPRC, subset accuracy and Hamming loss.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from probekit.errors import UserError
from probekit.registry import TASKS
from probekit.spec import TaskSpec
from probekit.tasks.base import Scores, Task, refuse_non_finite

if TYPE_CHECKING:
    from torch import Tensor

    from probekit.config import ThresholdSpec
    from probekit.data import Dataset

EPOCH_EXCLUDED = ("n", "known_fraction")


def masked_bce(
    logits: Tensor, targets: Tensor, *, smoothing: float = 0.0, pos_weight: Tensor | None = None
) -> Tensor:
    """Summed binary cross-entropy over the known cells of ``targets`` (``nan``: unknown).

    An unknown cell's target is replaced by 0 before the loss and its term multiplied by 0, so it
    contributes nothing, not even a ``nan``, to the sum or to the gradient."""
    import torch
    import torch.nn.functional as F

    known = ~torch.isnan(targets)
    filled = torch.where(known, targets, torch.zeros_like(targets))
    if smoothing:
        filled = filled * (1 - smoothing) + 0.5 * smoothing
    terms = F.binary_cross_entropy_with_logits(
        logits,
        filled,
        pos_weight=None if pos_weight is None else pos_weight.to(logits.dtype),
        reduction="none",
    )
    return (terms * known.to(terms.dtype)).sum()


class MultilabelTask(Task):
    """Multi-label classification with unknown labels; see the module notes."""

    kind = "multilabel"
    target = "multilabel"
    monitors = ("loss", "f1", "auroc", "auprc")

    def __init__(self, threshold: ThresholdSpec, label_names: Sequence[str] = ()) -> None:
        self.threshold = threshold
        self.label_names = tuple(label_names)
        self.thresholds: tuple[float, ...] = ()

    def bind(self, label_names: Sequence[Any]) -> MultilabelTask:
        return MultilabelTask(self.threshold, [str(name) for name in label_names])

    def check(self, dataset: Dataset, num_classes: int) -> None:
        if dataset.num_classes != num_classes:
            raise UserError(
                f"head.num_classes={num_classes} but the data has {dataset.num_classes} labels "
                f"({', '.join(sorted(dataset.label_map, key=dataset.label_map.__getitem__))}); "
                f"set head.num_classes={dataset.num_classes}"
            )

    def describe_loss(self, smoothing: float) -> str:
        return f"binary cross-entropy per known label (unknown ones masked), label smoothing {smoothing:g}"

    def blank_label(self, num_outputs: int) -> Any:
        return (math.nan,) * num_outputs

    def loss(
        self, logits: Tensor, labels: Tensor, *, smoothing: float = 0.0, weights: Tensor | None = None
    ) -> Tensor:
        return masked_bce(logits, labels, smoothing=smoothing, pos_weight=weights)

    def correct(self, logits: Tensor, labels: Tensor) -> int:
        """Rows whose every known label is right at 0.5 (the running train subset accuracy)."""
        import torch

        known = ~torch.isnan(labels)
        right = ((logits >= 0) == (labels == 1)) | ~known
        return int(right.all(dim=-1).sum())

    def scores(self, logits: Tensor) -> Tensor:
        import torch

        return torch.sigmoid(logits)

    def _names(self, width: int) -> list[str]:
        names = list(self.label_names)
        return names if len(names) == width else [str(i) for i in range(width)]

    def _thresholds(self, threshold: Any, width: int) -> list[float]:
        if isinstance(threshold, (list, tuple)) and len(threshold) == width:
            return [float(t) for t in threshold]
        return [0.5] * width

    def metrics(self, scores: Scores, threshold: Any = None) -> dict[str, Any]:
        import numpy as np

        from probekit.multilabel_metrics import multilabel_metrics

        width = int(np.asarray(scores.scores).shape[1])
        return multilabel_metrics(
            scores.labels, scores.scores, self._names(width), thresholds=self._thresholds(threshold, width)
        )

    def epoch_metrics(self, scores: Scores) -> dict[str, float]:
        from probekit.metrics import headline

        return {k: v for k, v in headline(self.metrics(scores)).items() if k not in EPOCH_EXCLUDED}

    def epoch_line(self, metrics: Mapping[str, float]) -> str:
        return (
            f"macro-f1 {metrics['f1']:.4f} micro-f1 {metrics['f1_micro']:.4f} auroc {metrics['auroc']:.4f} "
            f"subset-acc {metrics['subset_accuracy']:.4f}"
        )

    def choose_threshold(self, scores: Scores) -> Any:
        from probekit.multilabel_metrics import choose_thresholds

        fpr = self.threshold.target_fpr
        rule: Literal["max_f1", "target_fpr"] = "max_f1" if fpr is None else "target_fpr"
        return choose_thresholds(scores.labels, scores.scores, rule=rule, target_fpr=fpr)

    def threshold_rule(self) -> str:
        return f"one per label: {self.threshold.describe()} on its known val rows"

    def threshold_rule_id(self) -> str:
        return f"per_label:{self.threshold.rule_id()}"

    def summary_line(self, split: str, metrics: Mapping[str, Any]) -> str:
        m = metrics
        return (
            f"{split:<5} macro-f1 {m['f1']:.4f}  micro-f1 {m['f1_micro']:.4f}  auroc {m['auroc']:.4f}  "
            f"auprc {m['auprc']:.4f}  subset-acc {m['subset_accuracy']:.4f}  hamming {m['hamming_loss']:.4f}"
        )

    def predictions(
        self, texts: Sequence[str], scores: Sequence[Any], threshold: Any, label_names: Sequence[Any]
    ) -> list[dict[str, Any]]:
        import numpy as np

        probs = np.asarray(scores, dtype=np.float64).reshape(len(texts), -1)
        width = probs.shape[1]
        names = [str(name) for name in label_names] if len(label_names) == width else self._names(width)
        cuts = self._thresholds(threshold, width)
        refuse_non_finite(probs, "non-finite probabilities")
        return [
            {
                "text": text,
                "labels": [name for name, p, cut in zip(names, row, cuts, strict=True) if p >= cut],
                "probabilities": {name: float(p) for name, p in zip(names, row, strict=True)},
            }
            for text, row in zip(texts, probs, strict=True)
        ]

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
        import numpy as np

        from probekit.plots_extra import write_multilabel_plots

        width = int(np.asarray(scores.scores).shape[1])
        return write_multilabel_plots(
            folder,
            list(history),
            scores.labels,
            scores.scores,
            [str(name) for name in class_names],
            self._thresholds(threshold, width),
        )


@TASKS.register
class MultilabelTaskSpec(TaskSpec):
    """L labels that may co-occur (``head.num_classes`` = L), some unknown per row: a sigmoid per
    label, masked binary cross-entropy, a threshold per label chosen on val."""

    kind: Literal["multilabel"] = "multilabel"

    def build(self, threshold: Any) -> MultilabelTask:
        return MultilabelTask(threshold)
