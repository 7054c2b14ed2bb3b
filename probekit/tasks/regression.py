"""``regression``: a number per text (a severity, a toxicity score, a rating).

The head has one output (``head.num_classes: 1``). With ``standardize`` (the default) the probe
learns the target standardised by the train split's mean and standard deviation. Both are found
when training starts and stored in the saved config's ``task`` block (``target_mean``,
``target_std``), so a reloaded probe predicts in the data's own units. The loss is the summed
squared error (``mse``) or Huber loss (``huber``, with ``huber_delta`` in standardised units).
Label smoothing and class weights do not apply.

The metrics are `probekit.regression_metrics.regression_metrics`: MAE, RMSE, R², Pearson and
Spearman. There is no threshold. ``predict`` gives ``{"text", "value"}``. The running train
"accuracy" of the epoch lines is the share of rows predicted within half a standard deviation
of their target.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from probekit.errors import UserError
from probekit.registry import TASKS
from probekit.spec import TaskSpec
from probekit.tasks.base import Scores, Task, refuse_non_finite

if TYPE_CHECKING:
    from torch import Tensor

    from probekit.config import ThresholdSpec
    from probekit.data import Dataset


class RegressionTask(Task):
    """Regression of one number; see the module notes."""

    kind = "regression"
    target = "regression"
    monitors = ("loss", "mae", "rmse", "r2", "pearson", "spearman")

    def __init__(
        self,
        threshold: ThresholdSpec | None = None,
        loss: str = "mse",
        huber_delta: float = 1.0,
        standardize: bool = True,
        mean: float | None = None,
        std: float | None = None,
    ) -> None:
        self.threshold = threshold
        self.loss_kind = loss
        self.huber_delta = huber_delta
        self.standardize = standardize
        self.mean = mean if standardize and mean is not None else 0.0
        self.std = std if standardize and std is not None else 1.0

    def describe_loss(self, smoothing: float) -> str:
        kind = "squared error" if self.loss_kind == "mse" else f"Huber (delta {self.huber_delta:g})"
        scale = (
            f" of the target standardised (mean {self.mean:.4g}, std {self.std:.4g})"
            if self.standardize
            else ""
        )
        return kind + scale

    def num_outputs(self, num_labels: int) -> int:
        return 1

    def blank_label(self, num_outputs: int) -> Any:
        return 0.0

    def check(self, dataset: Dataset, num_classes: int) -> None:
        if num_classes != 1:
            raise UserError(
                f"head.num_classes={num_classes}; a regression has one output: set head.num_classes=1"
            )

    def fit(self, dataset: Dataset) -> RegressionTask:
        import numpy as np

        if not self.standardize:
            return self
        values = np.asarray(dataset.train.labels, dtype=np.float64)
        std = float(values.std())
        return RegressionTask(
            self.threshold,
            self.loss_kind,
            self.huber_delta,
            True,
            float(values.mean()),
            std if std > 0 else 1.0,
        )

    def stored(self) -> dict[str, Any]:
        return {"target_mean": self.mean, "target_std": self.std} if self.standardize else {}

    def _standard(self, labels: Tensor) -> Tensor:
        return (labels - self.mean) / self.std

    def loss(
        self, logits: Tensor, labels: Tensor, *, smoothing: float = 0.0, weights: Tensor | None = None
    ) -> Tensor:
        import torch.nn.functional as F

        predicted, wanted = logits[:, 0], self._standard(labels.to(logits.dtype))
        if self.loss_kind == "huber":
            return F.huber_loss(predicted, wanted, delta=self.huber_delta, reduction="sum")
        return F.mse_loss(predicted, wanted, reduction="sum")

    def correct(self, logits: Tensor, labels: Tensor) -> int:
        return int(((logits[:, 0] - self._standard(labels.to(logits.dtype))).abs() <= 0.5).sum())

    def scores(self, logits: Tensor) -> Tensor:
        return logits[:, 0] * self.std + self.mean

    def metrics(self, scores: Scores, threshold: Any = None) -> dict[str, Any]:
        from probekit.regression_metrics import regression_metrics

        return dict(regression_metrics(scores.labels, scores.scores))

    def epoch_metrics(self, scores: Scores) -> dict[str, float]:
        return {k: v for k, v in self.metrics(scores).items() if k in self.monitors}

    def epoch_line(self, metrics: Mapping[str, float]) -> str:
        return f"mae {metrics['mae']:.4f} rmse {metrics['rmse']:.4f} r2 {metrics['r2']:.4f}"

    def choose_threshold(self, scores: Scores) -> float:
        return 0.5  # unused: a regression has no decision threshold

    def threshold_rule(self) -> str:
        return "none (a regression predicts a number)"

    def threshold_rule_id(self) -> str:
        return "none"

    def summary_line(self, split: str, metrics: Mapping[str, Any]) -> str:
        m = metrics
        return (
            f"{split:<5} mae {m['mae']:.4f}  rmse {m['rmse']:.4f}  r2 {m['r2']:.4f}  "
            f"pearson {m['pearson']:.4f}  spearman {m['spearman']:.4f}"
        )

    def predictions(
        self, texts: Sequence[str], scores: Sequence[Any], threshold: Any, label_names: Sequence[Any]
    ) -> list[dict[str, Any]]:
        import numpy as np

        values = np.asarray(scores, dtype=np.float64).reshape(len(texts))
        refuse_non_finite(values, "a non-finite value")
        return [{"text": text, "value": float(value)} for text, value in zip(texts, values, strict=True)]

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
        from probekit.plots_extra import write_regression_plots

        return write_regression_plots(folder, list(history), scores.labels, scores.scores)


@TASKS.register
class RegressionTaskSpec(TaskSpec):
    """A number per text (``head.num_classes: 1``): MSE or Huber on the (standardised) target."""

    kind: Literal["regression"] = "regression"
    loss: Literal["mse", "huber"] = Field(default="mse", description="Squared error, or Huber loss.")
    huber_delta: float = Field(
        default=1.0, gt=0.0, le=1e6, description="Huber's delta, in standardised units."
    )
    standardize: bool = Field(
        default=True,
        description="Learn the target standardised by train's mean and std (stored with the probe).",
    )
    target_mean: float | None = Field(
        default=None,
        ge=-1e30,
        le=1e30,
        description="Set by training (with standardize): train's target mean.",
    )
    target_std: float | None = Field(
        default=None, gt=0.0, le=1e30, description="Set by training (with standardize): train's target std."
    )

    def build(self, threshold: Any) -> RegressionTask:
        return RegressionTask(
            threshold, self.loss, self.huber_delta, self.standardize, self.target_mean, self.target_std
        )
