"""``multiclass``: N classes, softmax, cross-entropy with label smoothing, the argmax decision.

The scores of a split are its ``(rows, N)`` class probabilities; the metrics are
`probekit.multiclass_metrics.multiclass_metrics` (scikit-learn underneath): accuracy, macro /
micro / weighted F1, macro one-vs-rest AUROC and AUPRC, top-k accuracy, top-label ECE, per-class
precision, recall, F1, AUROC and AUPRC, and the N x N confusion matrix.

With ``negative_class`` (``safe``, say) one probe is both a categoriser and a guard: the report
adds the derived binary view "any other class vs the negative class", scored
``1 - p(negative)``, with the binary metrics (``binary_auroc``, ``binary_recall_at_1pct_fpr``...)
and a threshold chosen on val by the config's ``threshold`` rule, exactly as a binary probe's.
``predict`` then says, per text, the argmax label, every class's probability, that score and
whether it crosses the threshold (``flagged``). Without ``negative_class`` there is no
threshold: the decision is the argmax, and the report records the rule as ``argmax``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, field_validator

from probekit.errors import ConfigError, UserError, did_you_mean
from probekit.registry import TASKS
from probekit.spec import TaskSpec, label_key
from probekit.tasks.base import CrossEntropyTask, Scores, refuse_non_finite

if TYPE_CHECKING:
    from torch import Tensor

    from probekit.config import ThresholdSpec
    from probekit.data import Dataset

EPOCH_EXCLUDED = ("n", "binary_threshold", "binary_n", "binary_positives")
"""Headline keys that ``metrics.jsonl`` leaves out (constant within a run)."""


class MulticlassTask(CrossEntropyTask):
    """Multi-class classification; see the module notes."""

    kind = "multiclass"
    target = "multiclass"

    def __init__(
        self,
        threshold: ThresholdSpec,
        negative_class: str | None = None,
        top_k: int = 3,
        class_names: Sequence[str] = (),
    ) -> None:
        self.threshold = threshold
        self.negative_class = negative_class
        self.top_k = top_k
        self.class_names = tuple(class_names)
        self.negative: int | None = None
        if negative_class is not None and self.class_names:
            self.negative = self.class_names.index(negative_class)

    def bind(self, label_names: Sequence[Any]) -> MulticlassTask:
        names = [str(name) for name in label_names]  # the label map's keys
        wanted = self.negative_class
        if wanted is not None and wanted not in names:
            hint = did_you_mean(wanted, names)
            raise ConfigError(
                f"task.negative_class: {wanted!r} is not a label of the data (labels: "
                f"{', '.join(names[:20])}{', ...' if len(names) > 20 else ''})"
                + (f"; {hint}" if hint else "")
            )
        return MulticlassTask(self.threshold, wanted, self.top_k, names)

    def check(self, dataset: Dataset, num_classes: int) -> None:
        if dataset.num_classes != num_classes:
            raise UserError(
                f"head.num_classes={num_classes} but the data has {dataset.num_classes} classes "
                f"({', '.join(sorted(dataset.label_map, key=dataset.label_map.__getitem__))}); "
                f"set head.num_classes={dataset.num_classes}"
            )
        if self.negative is not None:  # the guard threshold is chosen on val: it needs both sides
            negatives = sum(label == self.negative for label in dataset.val.labels)
            if negatives in (0, len(dataset.val)):
                side = f"no row of {self.negative_class!r}" if not negatives else "only rows of it"
                raise UserError(
                    f"{dataset.val.source}: val has {side}; task.negative_class={self.negative_class!r} "
                    "chooses its threshold on val, which needs rows of it and of the other classes"
                )

    def scores(self, logits: Tensor) -> Tensor:
        import torch

        return torch.softmax(logits, dim=-1)

    def _names(self, scores: Scores) -> list[str]:
        import numpy as np

        width = int(np.asarray(scores.scores).shape[-1]) if np.asarray(scores.scores).ndim == 2 else 0
        names = list(self.class_names)
        return names if len(names) == width else [str(index) for index in range(width)]

    def metrics(self, scores: Scores, threshold: Any = None) -> dict[str, Any]:
        from probekit.multiclass_metrics import multiclass_metrics

        return multiclass_metrics(
            scores.labels,
            scores.scores,
            self._names(scores),
            negative=self.negative,
            threshold=0.5 if threshold is None else threshold,
            top_k=self.top_k,
        )

    def epoch_metrics(self, scores: Scores) -> dict[str, float]:
        from probekit.metrics import headline

        return {k: v for k, v in headline(self.metrics(scores)).items() if k not in EPOCH_EXCLUDED}

    def epoch_line(self, metrics: Mapping[str, float]) -> str:
        line = f"acc {metrics['accuracy']:.4f} macro-f1 {metrics['f1']:.4f} auroc {metrics['auroc']:.4f}"
        if "binary_auroc" in metrics:
            line += f" vs-{self.negative_class} auroc {metrics['binary_auroc']:.4f}"
        return line

    def choose_threshold(self, scores: Scores) -> float:
        if self.negative is None:
            return 0.5
        from probekit.multiclass_metrics import derived_binary

        labels, score = derived_binary(scores.labels, scores.scores, self.negative)
        return self.threshold.choose(labels, score)

    def threshold_rule(self) -> str:
        if self.negative_class is None:
            return "none: the decision is the argmax (task.negative_class adds a guard threshold)"
        return f"{self.threshold.describe()}, on the binary view any class vs {self.negative_class!r}"

    def threshold_rule_id(self) -> str:
        return "argmax" if self.negative_class is None else self.threshold.rule_id()

    def summary_line(self, split: str, metrics: Mapping[str, Any]) -> str:
        m = metrics
        line = (
            f"{split:<5} accuracy {m['accuracy']:.4f}  macro-f1 {m['f1']:.4f}  auroc {m['auroc']:.4f}  "
            f"auprc {m['auprc']:.4f}  ece {m['ece']:.4f}"
        )
        if "binary_auroc" in m:
            line += (
                f"  | vs {self.negative_class}: auroc {m['binary_auroc']:.4f}  "
                f"recall@1%fpr {m['binary_recall_at_1pct_fpr']:.4f}"
            )
        return line

    def predictions(
        self, texts: Sequence[str], scores: Sequence[Any], threshold: Any, label_names: Sequence[Any]
    ) -> list[dict[str, Any]]:
        import numpy as np

        probs = np.asarray(scores, dtype=np.float64).reshape(len(texts), -1)
        names = list(label_names) or list(range(probs.shape[1]))
        keys = list(self.class_names) if len(self.class_names) == len(names) else [str(n) for n in names]
        if len(names) != probs.shape[1]:
            raise UserError(
                f"the probe gives {probs.shape[1]} probabilities per text for {len(names)} labels"
            )
        refuse_non_finite(probs, "non-finite probabilities")
        rows: list[dict[str, Any]] = []
        for text, row in zip(texts, probs, strict=True):
            out: dict[str, Any] = {
                "text": text,
                "label": names[int(row.argmax())],
                "confidence": float(row.max()),
                "probabilities": {key: float(p) for key, p in zip(keys, row, strict=True)},
            }
            if self.negative is not None:
                score = min(1.0, max(0.0, 1.0 - float(row[self.negative])))
                out["score"] = score
                out["flagged"] = score >= threshold
            rows.append(out)
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
        from probekit.plots_multiclass import write_multiclass_plots

        return write_multiclass_plots(
            folder,
            list(history),
            scores.labels,
            scores.scores,
            [str(name) for name in class_names],
            negative=self.negative,
            threshold=threshold,
        )


@TASKS.register
class MulticlassTaskSpec(TaskSpec):
    """N classes (``head.num_classes`` of them): softmax, cross-entropy, argmax; with
    ``negative_class`` also the binary view "any other class vs it" and its threshold."""

    kind: Literal["multiclass"] = "multiclass"
    negative_class: str | None = Field(
        default=None,
        min_length=1,
        max_length=200,
        description="The label of the harmless class (e.g. safe): the report adds the binary view "
        "'any other class vs it' (score 1 - p(it)) with a threshold chosen by the threshold rule.",
    )
    top_k: int = Field(default=3, ge=1, le=1000, description="k of the top-k accuracy (at most classes - 1).")

    @field_validator("negative_class", mode="before")
    @classmethod
    def _as_label_key(cls, value: Any) -> Any:
        return label_key(value)

    def build(self, threshold: Any) -> MulticlassTask:
        return MulticlassTask(threshold, self.negative_class, self.top_k)
