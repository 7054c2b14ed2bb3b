"""Inference: the one path every forward pass without gradients takes.

`forward` runs one batch through a model for inference (on the run's device, under its
autocast, without autograd); `predict` runs a loader of batches and gives the task's `Scores`
in the split's row order, gathered from every process; `finish` chooses the decision threshold
on the best epoch's validation scores and evaluates the splits at it. The activation cache
build, the per-epoch validation, the end of a run, ``probekit eval``, ``probekit predict`` /
``Probe.predict`` and the sweep all go through `forward`.

It imports neither the probe nor the training package, so `probekit.probe.Probe` can use it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch import Tensor

from probekit.batching import Batch, progress_bar, with_fillers
from probekit.tasks.base import Scores, Task, Threshold

if TYPE_CHECKING:
    from torch.utils.data import DataLoader

    from probekit.cache import CachePlan
    from probekit.distributed import Group


@dataclass(frozen=True)
class Runner:
    """Where and how inference runs: the device, the autocast of the run's precision, the process
    group (several processes share the batches), and whether to show a progress bar."""

    device: torch.device
    autocast: Callable[[], AbstractContextManager[Any]] = nullcontext
    group: Group | None = None
    progress: bool = False


def no_grad(group: Group | None) -> Any:
    """No autograd for inference: ``inference_mode``, or plain ``no_grad`` for sharded models
    (FSDP's gathered parameters must stay usable by the training steps that follow)."""
    return torch.no_grad() if group is not None and group.sharded else torch.inference_mode()


def forward(
    model: Any,
    batch: Batch,
    runner: Runner,
    *,
    cache_plan: CachePlan | None = None,
    output: Literal["logits", "features", "hidden"] = "logits",
    layers: tuple[int, ...] | None = None,
) -> Tensor:
    """``model``'s output for one batch, without gradients: the logits (from the batch's cached
    activations when it has them), or what the activation cache stores (``features``, or the
    ``hidden`` states ``layers``)."""
    batch = batch.to(runner.device)
    with no_grad(runner.group), runner.autocast():
        if output == "logits":
            return model(**batch.inputs(cache_plan))  # type: ignore[no-any-return]
        reads = {} if batch.read_mask is None else {"read_mask": batch.read_mask}
        return model(batch.input_ids, batch.attention_mask, output=output, layers=layers, **reads)  # type: ignore[no-any-return]


def predict(
    model: Any,
    loader: DataLoader[Any],
    runner: Runner,
    task: Task,
    *,
    cache_plan: CachePlan | None = None,
    desc: str = "eval",
) -> Scores:
    """The task's scores and the labels of a loader's split in row order, and the mean
    (unsmoothed) loss, in eval mode whatever order the loader batches rows in.

    With several processes each one runs its share (`probekit.batching.inference_loader`)
    and every process gets the results of all of them."""
    model.eval()
    group = runner.group
    scores: list[Tensor] = []
    labels: list[Tensor] = []
    order: list[Tensor] = []
    loss_sum, count = 0.0, 0
    batches: Iterable[Batch] = loader
    if group is not None and group.sharded:  # every process runs as many forwards as the busiest
        batches = with_fillers(loader, group)
    for batch in progress_bar(batches, runner.progress, desc):
        logits = forward(model, batch, runner, cache_plan=cache_plan).float()
        if batch.filler:
            continue
        target = batch.labels.to(logits.device)
        with torch.inference_mode():
            loss_sum += float(task.loss(logits, target))
            scores.append(task.scores(logits).cpu())
        count += int(target.shape[0])
        labels.append(batch.labels)
        order.append(batch.index)
    if group is not None and group.active:
        shares = group.gather((scores, labels, order, loss_sum, count))
        scores = [t for share in shares for t in share[0]]
        labels = [t for share in shares for t in share[1]]
        order = [t for share in shares for t in share[2]]
        loss_sum, count = sum(share[3] for share in shares), sum(share[4] for share in shares)
    if not order:
        return Scores(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32), 0.0)
    rows = torch.cat(order).argsort()
    return Scores(torch.cat(labels)[rows].numpy(), torch.cat(scores)[rows].numpy(), loss_sum / max(count, 1))


@dataclass(frozen=True)
class Finished:
    """The decision threshold and every split's metrics and scores at it."""

    threshold: Threshold
    metrics: dict[str, dict[str, Any]]
    scores: dict[str, Scores]


def finish(task: Task, val: Scores, others: Mapping[str, Callable[[], Scores]]) -> Finished:
    """Choose the threshold on the best epoch's ``val`` scores by the task's rule, then evaluate
    ``val`` and each of ``others`` (split name -> how to score it, e.g. ``test``) at it."""
    threshold = task.choose_threshold(val)
    scores = {"val": val, **{name: score() for name, score in others.items()}}
    metrics = {name: task.metrics(split, threshold) for name, split in scores.items()}
    return Finished(threshold, metrics, scores)
