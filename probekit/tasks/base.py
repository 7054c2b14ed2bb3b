"""The `Task` contract: what the loop, the evaluation and ``predict`` ask of a kind of target."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from probekit.errors import UserError

if TYPE_CHECKING:
    import numpy as np
    from torch import Tensor

    from probekit.data import Dataset


Threshold = float | list[float]
"""A task's decision threshold: one number, or one per label (a multi-label task)."""


def show_threshold(threshold: Threshold) -> str:
    """A threshold for a summary line: ``0.4321``, or ``per label 0.31 .. 0.77``."""
    if isinstance(threshold, list):
        return f"per label {min(threshold):.2f} .. {max(threshold):.2f}" if threshold else "none"
    return f"{threshold:.4f}"


def refuse_non_finite(scores: np.ndarray, what: str) -> None:
    """`probekit.errors.UserError` naming the first text whose score (a row of ``scores``) is not
    finite: ``predict`` never passes a nan on as an answer (a nan would fail every threshold)."""
    import numpy as np

    finite = np.isfinite(scores) if scores.ndim == 1 else np.isfinite(scores).all(axis=1)
    if not finite.all():
        bad = int(np.flatnonzero(~finite)[0])
        raise UserError(f"texts[{bad}]: the probe gave {what} (are its weights damaged?)")


@dataclass(frozen=True)
class Scores:
    """A split's outputs in row order: its labels, the task's scores per row (for a binary task
    the probability of the positive class, for a multi-class one the ``(rows, N)`` class
    probabilities) and the mean unsmoothed, unweighted loss."""

    labels: np.ndarray
    scores: np.ndarray
    loss: float

    def __len__(self) -> int:
        return len(self.labels)


class Task(ABC):
    """One kind of target (binary first): label checks, the loss, the output activation, the
    metrics, the decision rule, the plots and what ``predict`` returns.

    Tasks are stateless apart from their settings; the loop calls them, never the other way.
    """

    kind: str = ""
    """The task's ``kind`` in the registry."""

    target: str = "binary"
    """What the task reads from the labels (`probekit.data.load_data`'s ``target``): ``binary``
    (the strict rules: no guessed label map, every class in val), ``multiclass``,
    ``multilabel`` or ``regression``. A task plugin gets the strict rules unless it says."""

    monitors: tuple[str, ...] = ("loss", "auroc", "accuracy", "f1", "auprc")
    """The values of ``train.monitor`` this task reports."""

    def describe_loss(self, smoothing: float) -> str:
        """The loss in words, for the plan."""
        return f"cross-entropy, label smoothing {smoothing:g}"

    def num_outputs(self, num_labels: int) -> int:
        """The head outputs a probe of ``num_labels`` labels needs (one per class or label)."""
        return num_labels

    def blank_label(self, num_outputs: int) -> Any:
        """The label of a row to predict, which has none (its loss is not used)."""
        return 0

    def fit(self, dataset: Dataset) -> Task:
        """The task with whatever it learns from the training data (a regression's target
        scaling); most tasks learn nothing."""
        return self

    def stored(self) -> dict[str, Any]:
        """Settings `fit` learnt, stored into the saved config's ``task`` block so that a
        reloaded probe has them."""
        return {}

    @abstractmethod
    def check(self, dataset: Dataset, num_classes: int) -> None:
        """Refuse (``UserError``) data or a head this task cannot train."""

    def bind(self, label_names: Sequence[Any]) -> Task:
        """The task for a probe whose classes are ``label_names`` (the label map's keys, by
        index): where a setting names a class (``negative_class``), it is resolved here. Raises
        `probekit.errors.ConfigError` when it names none of them."""
        return self

    @abstractmethod
    def loss(
        self, logits: Tensor, labels: Tensor, *, smoothing: float = 0.0, weights: Tensor | None = None
    ) -> Tensor:
        """The summed loss of a batch (the loop divides by the examples of the window);
        ``weights``: one per class, see `weighted_cross_entropy`."""

    @abstractmethod
    def correct(self, logits: Tensor, labels: Tensor) -> int:
        """How many rows of a batch the logits get right (the running train accuracy)."""

    @abstractmethod
    def scores(self, logits: Tensor) -> Tensor:
        """Per-row scores from logits, on the logits' device (what metrics and thresholds use)."""

    @abstractmethod
    def metrics(self, scores: Scores, threshold: Threshold | None = None) -> dict[str, Any]:
        """Metrics of a split at ``threshold`` (the task's default decision rule when None)."""

    @abstractmethod
    def epoch_metrics(self, scores: Scores) -> dict[str, float]:
        """The validation metrics of one epoch, as ``metrics.jsonl`` holds them (without ``val_``)."""

    @abstractmethod
    def epoch_line(self, metrics: Mapping[str, float]) -> str:
        """The metrics part of an epoch's log line."""

    def monitor(self, metric: str, scores: Scores, metrics: Mapping[str, float]) -> float:
        """The value of ``train.monitor`` for a split (``loss`` or one of its metrics)."""
        return scores.loss if metric == "loss" else float(metrics[metric])

    @abstractmethod
    def choose_threshold(self, scores: Scores) -> Threshold:
        """The decision threshold the config's rule picks on validation scores."""

    @abstractmethod
    def threshold_rule(self) -> str:
        """The rule in words, for the plan."""

    @abstractmethod
    def threshold_rule_id(self) -> str:
        """The rule as reports record it."""

    @abstractmethod
    def summary_line(self, split: str, metrics: Mapping[str, Any]) -> str:
        """A split's headline metrics, for the run's summary."""

    def probability_matrix(self, scores: np.ndarray) -> np.ndarray:
        """The scores as scikit-learn's ``predict_proba`` shapes them: ``(rows, classes)`` class
        probabilities (``(rows, labels)`` for multi-label, ``(rows,)`` values for regression).
        The scores of a split already have that shape unless the task overrides this."""
        return scores

    @abstractmethod
    def predictions(
        self, texts: Sequence[str], scores: Sequence[Any], threshold: Threshold, label_names: Sequence[Any]
    ) -> list[dict[str, Any]]:
        """What ``predict`` returns per text."""

    @abstractmethod
    def write_plots(
        self,
        folder: Path,
        history: Sequence[Mapping[str, Any]],
        scores: Scores,
        threshold: Threshold,
        class_names: Sequence[str],
        *,
        split: str | None = None,
        monitor: str | None = None,
    ) -> list[Path]:
        """The report's plots of a run, into ``folder``; ``split`` names the split ``scores`` are
        of (in titles), ``monitor`` the run's monitored metric (in the training curves)."""


def weighted_cross_entropy(
    logits: Tensor, labels: Tensor, *, smoothing: float = 0.0, weights: Tensor | None = None
) -> Tensor:
    """Summed cross-entropy with label smoothing, each row's loss times its class's weight.

    The weight multiplies a row's whole smoothed loss, so a weight of ``k`` on a class equals
    ``k`` copies of each of its rows, loss and gradient, with or without smoothing. (PyTorch's
    own ``weight=`` argument weighs the smoothing terms by the class they point at instead,
    which breaks that equivalence.) Without weights it is exactly
    ``F.cross_entropy(..., reduction="sum")``.
    """
    import torch.nn.functional as F

    if weights is None:
        return F.cross_entropy(logits, labels, label_smoothing=smoothing, reduction="sum")
    rows = F.cross_entropy(logits, labels, label_smoothing=smoothing, reduction="none")
    return (rows * weights.to(rows.dtype)[labels]).sum()


class CrossEntropyTask(Task):
    """A task with one softmax over classes: `weighted_cross_entropy` and the argmax's hits
    (binary and multi-class)."""

    def loss(
        self, logits: Tensor, labels: Tensor, *, smoothing: float = 0.0, weights: Tensor | None = None
    ) -> Tensor:
        return weighted_cross_entropy(logits, labels, smoothing=smoothing, weights=weights)

    def correct(self, logits: Tensor, labels: Tensor) -> int:
        return int((logits.argmax(dim=-1) == labels).sum())
