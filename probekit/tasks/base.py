"""The `Task` contract: what the loop, the evaluation and ``predict`` ask of a kind of target."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from torch import Tensor

if TYPE_CHECKING:
    from probekit.data import Dataset


@dataclass(frozen=True)
class Scores:
    """A split's outputs in row order: its labels, the task's scores per row (for a binary task
    the probability of the positive class) and the mean unsmoothed loss."""

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

    @abstractmethod
    def check(self, dataset: Dataset, num_classes: int) -> None:
        """Refuse (``UserError``) data or a head this task cannot train."""

    @abstractmethod
    def loss(self, logits: Tensor, labels: Tensor, *, smoothing: float = 0.0) -> Tensor:
        """The summed loss of a batch (the loop divides by the examples of the window)."""

    @abstractmethod
    def correct(self, logits: Tensor, labels: Tensor) -> int:
        """How many rows of a batch the logits get right (the running train accuracy)."""

    @abstractmethod
    def scores(self, logits: Tensor) -> Tensor:
        """Per-row scores from logits, on the logits' device (what metrics and thresholds use)."""

    @abstractmethod
    def metrics(self, scores: Scores, threshold: float | None = None) -> dict[str, float]:
        """Metrics of a split at ``threshold`` (the task's default decision rule when None)."""

    @abstractmethod
    def epoch_metrics(self, scores: Scores) -> dict[str, float]:
        """The validation metrics of one epoch, as ``metrics.jsonl`` holds them (without ``val_``)."""

    @abstractmethod
    def epoch_line(self, metrics: Mapping[str, float]) -> str:
        """The metrics part of an epoch's log line."""

    @abstractmethod
    def monitor(self, metric: str, scores: Scores, metrics: Mapping[str, float]) -> float:
        """The value of ``train.monitor`` for a split (``loss`` or one of its metrics)."""

    @abstractmethod
    def choose_threshold(self, scores: Scores) -> float:
        """The decision threshold the config's rule picks on validation scores."""

    @abstractmethod
    def threshold_rule(self) -> str:
        """The rule in words, for the plan."""

    @abstractmethod
    def threshold_rule_id(self) -> str:
        """The rule as reports record it."""

    @abstractmethod
    def summary_line(self, split: str, metrics: Mapping[str, float]) -> str:
        """A split's headline metrics, for the run's summary."""

    @abstractmethod
    def predictions(
        self, texts: Sequence[str], scores: Sequence[float], threshold: float, label_names: Sequence[Any]
    ) -> list[dict[str, Any]]:
        """What ``predict`` returns per text."""

    @abstractmethod
    def write_plots(
        self,
        folder: Path,
        history: Sequence[Mapping[str, Any]],
        scores: Scores,
        threshold: float,
        class_names: Sequence[str],
    ) -> list[Path]:
        """The report's plots of a run, into ``folder``."""
