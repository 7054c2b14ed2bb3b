"""What a finished run leaves: the result, the checkpoint folder, the report, the summary and
the plots (`write_outputs`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from probekit import jsonio
from probekit.checkpoint import class_keys, save_checkpoint
from probekit.config import dump_config
from probekit.tasks.base import Scores, Task, Threshold, show_threshold
from probekit.training.plan import TrainPlan

if TYPE_CHECKING:
    from probekit.probe import Probe


@dataclass
class RunResult:
    """What a run produced: where, which epoch won, and the metrics per split."""

    run_dir: Path
    best_epoch: int
    epochs_run: int
    stopped_early: bool
    threshold: Threshold
    metrics: dict[str, dict[str, Any]]
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    task: Task | None = field(default=None, repr=False)
    probe: Probe | None = field(default=None, repr=False)
    """The trained probe (best epoch's weights, threshold, label names, tokenizer and task
    attached, in eval mode, on the device it trained on): ``result.probe.predict("text")``."""

    def _threshold(self) -> str:
        rule = self.task.threshold_rule_id() if self.task is not None else ""
        return rule if rule in ("none", "argmax") else show_threshold(self.threshold)

    def summary(self) -> list[str]:
        """A short human summary: best epoch, threshold, headline metrics per split."""
        lines = [
            f"run: {self.run_dir}",
            f"best epoch {self.best_epoch} of {self.epochs_run}"
            + (" (stopped early)" if self.stopped_early else "")
            + f"; threshold {self._threshold()}; {self.seconds:.1f} s",
        ]
        if self.task is not None:
            lines += [self.task.summary_line(split, m) for split, m in self.metrics.items()]
        return lines


@dataclass
class RunFacts:
    """What the run learnt about itself while training, for the report."""

    cache_rows: dict[str, list[int]] = field(default_factory=dict)
    """Per split, the rows each process ran through the frozen blocks for the cache (by rank)."""
    sharded_parameters: list[int] = field(default_factory=list)
    """Under fsdp: the parameters each process holds, by rank."""
    strategy: str = "ddp"
    loss_scale: float | None = None


def write_config(folder: Path, plan: TrainPlan) -> None:
    """``config.yaml``: the run's complete config (written first: a stopped run has it too)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(dump_config(plan.config), encoding="utf-8")


def write_outputs(
    folder: Path,
    plan: TrainPlan,
    result: RunResult,
    scores: dict[str, Scores],
    weights: dict[str, torch.Tensor],
    facts: RunFacts,
) -> None:
    """The checkpoint (``checkpoint/``), ``report.json``, ``summary.txt`` and the plots, into
    ``folder``. ``weights``: the probe's trainable tensors, gathered."""
    probe = plan.probe
    config = plan.config.model_dump(mode="json")
    config["task"].update(plan.task.stored())  # what the task learnt from train (a target scaling)
    save_checkpoint(
        probe,
        folder / "checkpoint",
        weights=weights,
        config=config,
        label_map=plan.dataset.label_map,
        label_names=plan.label_names,
        threshold=result.threshold,
        backbone={
            "name": plan.backbone.name,
            "revision": plan.backbone.revision,
            "provenance": plan.backbone.provenance,
            "model_type": probe.layout.model_type,
            "num_blocks": probe.layout.num_blocks,
            "hidden_size": probe.layout.hidden_size,
        },
    )
    report = _report(plan, result, facts)
    (folder / "report.json").write_text(jsonio.dumps(report, indent=2) + "\n", encoding="utf-8")
    (folder / "summary.txt").write_text("\n".join(result.summary()[1:]) + "\n", encoding="utf-8")
    split = "test" if "test" in scores else "val"
    names = tuple(class_keys(plan.dataset.label_map))
    plan.task.write_plots(
        folder / "plots",
        result.history,
        scores[split],
        result.threshold,
        names,
        split=split,
        monitor=plan.config.train.monitor,
    )


def _report(plan: TrainPlan, result: RunResult, facts: RunFacts) -> dict[str, Any]:
    data, cache_plan = plan.dataset, plan.cache_plan
    return {
        "best_epoch": result.best_epoch,
        "epochs_run": result.epochs_run,
        "stopped_early": result.stopped_early,
        "threshold": result.threshold,
        "threshold_rule": plan.task.threshold_rule_id(),
        "task": {**plan.config.task.model_dump(mode="json"), **plan.task.stored()},
        "loss": {
            "label_smoothing": plan.config.train.label_smoothing,
            "class_weights": plan.weights_by_name(),
        },
        "metrics": result.metrics,
        "data": {
            "label_map": data.label_map,
            "class_balance": {
                k: {str(c): n for c, n in v.items()} for k, v in data.report.class_balance.items()
            },
            "shared_duplicates": data.report.shared_duplicates,
            "truncated": {name: enc.truncated for name, enc in plan.encoded.items()},
        },
        "batching": {
            "bucket_batches": plan.config.train.bucket_batches,
            "padding_fraction": plan.padding[0],
            "random_batches_padding_fraction": plan.padding[1],
        },
        "activation_cache": None
        if cache_plan is None
        else {
            "mode": cache_plan.mode,
            "layers": list(cache_plan.layers),
            "boundary": cache_plan.boundary,
            "rows_computed_per_process": facts.cache_rows,
        },
        "distributed": {
            "processes": plan.num_processes,
            "strategy": facts.strategy,
            "parameters_per_process": facts.sharded_parameters or None,
            "per_device_batch": plan.per_device_batch,
            "accumulation": plan.accumulation,
            "effective_batch": plan.effective_batch,
        },
        "numerics": {
            "precision": plan.precision.name,
            "skipped_steps": sum(int(row.get("skipped_steps", 0)) for row in result.history),
            "loss_scale": facts.loss_scale,
        },
        "plan": plan.describe(),
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
