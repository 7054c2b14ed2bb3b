"""Evaluation metrics of a regression probe: errors, explained variance and correlations.

Targets and predictions are 1-D arrays of finite floats, one pair per example. Error numbers
come from scikit-learn (`mean_absolute_error`, `mean_squared_error`, `r2_score`), correlations
from SciPy (`pearsonr`, `spearmanr`); conventions follow `probekit.metrics`: `UserError` for bad
input, `nan` for metrics the data leave undefined (and no warning about them).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import numpy.typing as npt
from scipy.stats import pearsonr, spearmanr  # type: ignore[import-untyped]
from sklearn.metrics import (  # type: ignore[import-untyped]
    mean_absolute_error,
    mean_squared_error,
    r2_score,
)

from probekit.errors import UserError

REGRESSION_KEYS = ("mae", "rmse", "r2", "pearson", "spearman", "n", "target_mean", "target_std")
"""The keys of `regression_metrics`'s result, in order."""


def regression_inputs(
    targets: npt.ArrayLike, predictions: npt.ArrayLike
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Check and convert regression targets and predictions to flat numpy arrays.

    Args:
        targets: one true value per example, finite numbers.
        predictions: one predicted value per example, finite numbers.

    Returns:
        `(targets, predictions)` as 1-D `float64` arrays of the same length.

    Raises:
        UserError: non-numeric input, arrays that are not 1-D, different lengths, no examples,
            or a value that is not finite (the message names the first one).
    """
    try:
        y = np.asarray(targets, dtype=np.float64)
        p = np.asarray(predictions, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise UserError(f"targets and predictions must be numeric arrays: {exc}") from None
    if y.ndim != 1 or p.ndim != 1:
        raise UserError(f"targets and predictions must be 1-D; got shapes {y.shape} and {p.shape}")
    if y.shape != p.shape:
        raise UserError(f"targets and predictions differ in length: {y.shape[0]} and {p.shape[0]}")
    if y.size == 0:
        raise UserError("no examples to evaluate: targets and predictions are empty")
    for name, values in (("targets", y), ("predictions", p)):
        bad = np.flatnonzero(~np.isfinite(values))
        if bad.size:
            more = f" (and {bad.size - 1} more)" if bad.size > 1 else ""
            raise UserError(f"{name}[{int(bad[0])}] is {values[bad[0]]!r}; values must be finite{more}")
    return y, p


def _constant(values: npt.NDArray[np.float64]) -> bool:
    return bool(np.all(values == values[0]))


def _correlation(method: str, y: npt.NDArray[np.float64], p: npt.NDArray[np.float64]) -> float:
    """Pearson's or Spearman's correlation; `nan` when undefined (N < 2 or a constant side)."""
    if y.size < 2 or _constant(y) or _constant(p):
        return math.nan
    with warnings.catch_warnings():
        # near-constant inputs: SciPy warns that the result may be inaccurate
        warnings.simplefilter("ignore")
        result = pearsonr(y, p) if method == "pearson" else spearmanr(y, p)
    value = float(result.statistic)
    return value if math.isfinite(value) else math.nan


def regression_metrics(targets: npt.ArrayLike, predictions: npt.ArrayLike) -> dict[str, float]:
    """Metrics of a regression: errors, R², correlations and the spread of the targets.

    The result holds, all as floats (also `REGRESSION_KEYS`):

    - `mae`: mean absolute error; `rmse`: root mean squared error.
    - `r2`: coefficient of determination (`r2_score`), `1 - SS_res / SS_tot`; `nan` when
      `N < 2` or the targets are constant (`SS_tot = 0`).
    - `pearson`, `spearman`: Pearson's and Spearman's correlation of predictions and targets
      (`scipy.stats.pearsonr`, `spearmanr`); `nan` when `N < 2` or either side is constant.
    - `n`: the number of examples.
    - `target_mean`, `target_std`: mean and population standard deviation (`ddof=0`) of the
      targets.

    Args:
        targets: the true values.
        predictions: the predicted values.

    Returns:
        The metrics, keyed as listed above.

    Raises:
        UserError: bad inputs (see `regression_inputs`).
    """
    y, p = regression_inputs(targets, predictions)
    undefined = y.size < 2 or _constant(y)
    return {
        "mae": float(mean_absolute_error(y, p)),
        "rmse": float(math.sqrt(mean_squared_error(y, p))),
        "r2": math.nan if undefined else float(r2_score(y, p)),
        "pearson": _correlation("pearson", y, p),
        "spearman": _correlation("spearman", y, p),
        "n": float(y.size),
        "target_mean": float(np.mean(y)),
        "target_std": float(np.std(y)),
    }
