"""Layer sweep: which hidden states of a backbone carry the signal, and the config that uses them.

`sweep` loads the backbone and data a config names (with `probekit.training.prepare`, as
training does), runs the whole backbone frozen, in eval mode and without gradients, once over every split
(length-sorted batches, so padding is small), and pools every requested hidden state with the
spec's token pooler into one float32 array per split, ``[rows, layers, width]``. It then trains
the spec's head on each layer's features, and on a few combinations of layers, through the
training loop itself (`probekit.training.loop.fit`: the spec's length-bucketed micro-batches and
accumulation, optimiser, schedule, label smoothing, clipping and seed, in fp32, with the
`EarlyStopping` and `BestWeights` callbacks, and the task's threshold rule). Those probes cost
only the head: the sweep costs one pass of the backbone over the data plus small heads.

The pooler must compute a fixed function (no parameters, no dropout) since it runs once, before
any training: a single-layer pooler (``masked_mean``, ``cls``, ``last_token``, ``max``, or a
parameter-free plugin), or ``multilayer`` over one of them, whose ``token_pooler`` pools each
layer. A pooler with parameters (the ``attention`` plugin) is refused.

Combinations: the best 2 and the best 3 single layers by the monitored val metric
(``train.monitor``; ties go to the lower layer), and all requested layers; one that repeats an
earlier one's layers is dropped. A combination pools each layer and then combines the pooled
vectors as the spec's ``multilayer`` pooler does (its ``combine``: ``mean``, ``concat`` or a
learned ``scalar_mix``, trained with the head), or by ``concat`` when the spec's pooler reads a
single layer. The best candidate is the one with the best monitored val metric (ties go to the
earlier: single layers in layer order, then the combinations).

The run folder (written whole or not at all, like a training run's) holds ``sweep.json``,
``sweep.md``, ``layers.png`` and ``best.yaml``: the config with the pooler set to the best
candidate (``combine_at: pooled`` for a combination, which is what the sweep measured), ready for
``probekit train --config best.yaml``.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from probekit import jsonio
from probekit.backbone import resolve_layers
from probekit.batching import Encoded, inference_loader, progress_bar
from probekit.bootstrap import LEVEL
from probekit.cache import CachePlan, SplitCache, is_static
from probekit.config import ProbeConfig, dump_config, load_config
from probekit.distributed import launched_processes
from probekit.errors import DivergedError, UserError
from probekit.evaluate import check_bootstrap
from probekit.freezers.all import FreezeAllSpec
from probekit.inference import Runner, finish, forward, predict
from probekit.optim import adamw, decay_groups
from probekit.poolers.base import Pooler
from probekit.poolers.multilayer import Combine, MultiLayerPooler, MultiLayerSpec
from probekit.probe import Probe
from probekit.registry import POOLERS
from probekit.rundir import RunFolder, default_run_dir, explain_failure
from probekit.spec import BuildContext, PoolerSpec, TokenPoolerSpec
from probekit.tasks.base import Scores, Task, Threshold
from probekit.training.callbacks import LOWER_IS_BETTER, BestWeights, EarlyStopping, improves
from probekit.training.context import Log, RunContext, deterministic_algorithms
from probekit.training.loop import Parts, fit
from probekit.training.plan import TrainPlan, absolute_paths, input_paths, prepare
from probekit.training.state import TrainState

SWEEP_FILES = ("sweep.json", "sweep.md", "layers.png", "best.yaml")
"""The files a sweep writes into its run folder."""

TOP_SIZES = (2, 3)
"""Combinations of the best this many single layers (then all layers)."""


# -- pure helpers ------------------------------------------------------------------------------
def parse_layers(text: str) -> tuple[int, ...]:
    """Hidden-state indices from a comma list such as ``"0,3,6"`` or ``"-3,-2,-1"`` (``--layers``).

    Whether they exist is checked once the backbone is known (`probekit.backbone.resolve_layers`).

    Raises:
        UserError: an empty list, or an item that is not an integer.
    """
    items = [item.strip() for item in text.split(",")]
    layers: list[int] = []
    for item in items:
        try:
            layers.append(int(item))
        except ValueError:
            raise UserError(
                f"--layers {text!r}: {item!r} is not a layer index; give hidden-state indices "
                "separated by commas, e.g. 0,3,6 (0 = embeddings, -1 = last)"
            ) from None
    return tuple(layers)


def sweep_pooler(spec: PoolerSpec) -> tuple[TokenPoolerSpec, Combine]:
    """The single-layer pooler a sweep pools every layer with, and how it combines layers:
    ``multilayer``'s token pooler and ``combine``, or a single-layer pooler and ``concat``.

    Raises:
        UserError: a pooler that reads several layers and is not ``multilayer``.
    """
    if isinstance(spec, MultiLayerSpec):
        return spec.token_pooler, spec.combine
    if isinstance(spec, TokenPoolerSpec):
        return spec, "concat"
    raise UserError(
        f"pooler.kind={spec.kind!r}: a sweep pools each layer with a single-layer pooler; use one "
        f"({', '.join(_fixed_token_poolers())}) or multilayer over one of them"
    )


def _check_fixed(spec: TokenPoolerSpec, ctx: BuildContext, *, early: bool = False) -> None:
    """Refuse a pooler that is not a fixed function: it runs once, before any training. ``early``:
    a check on a stand-in backbone before anything loads (so a refusal does not wait for the
    model); a pooler that cannot be built for the stand-in is left to the check after loading.

    Raises:
        UserError: the pooler has parameters or dropout.
    """
    try:
        pooler = spec.build(ctx)
    except Exception:
        if early:
            return
        raise
    if not is_static(pooler):
        raise UserError(
            f"pooler {spec.kind!r} has parameters (or dropout); a sweep pools every layer once, "
            f"before training, so it needs a fixed pooler: {', '.join(_fixed_token_poolers())} "
            "(alone or as multilayer.token_pooler)"
        )


def _fixed_token_poolers() -> list[str]:
    """The built-in single-layer pooler kinds (each computes a fixed function)."""
    return [e.kind for e in POOLERS.entries() if e.builtin and issubclass(e.obj, TokenPoolerSpec)]


def _rank_key(value: float, lower_is_better: bool) -> float:
    """Sort key, best first; an undefined (nan) value sorts last."""
    if math.isnan(value):
        return math.inf
    return value if lower_is_better else -value


def choose_combinations(
    scores: Mapping[int, float], *, lower_is_better: bool = False
) -> list[tuple[str, tuple[int, ...]]]:
    """The layer combinations a sweep trains, from the single layers' monitored val scores.

    ``top 2`` and ``top 3`` hold the best 2 and 3 layers (ties: the lower layer first), ``all``
    every layer; each has at least two layers, and a combination with the same layers as an
    earlier one is dropped. Layers are listed in ascending order.

    Args:
        scores: hidden-state index -> the val score of the probe on that layer (nan: undefined,
            ranked last).
        lower_is_better: True when the score is a loss.
    """
    ranked = sorted(scores, key=lambda layer: (_rank_key(scores[layer], lower_is_better), layer))
    wanted = [(f"top {k}", ranked[:k]) for k in TOP_SIZES] + [("all", ranked)]
    chosen: list[tuple[str, tuple[int, ...]]] = []
    for label, layers in wanted:
        members = tuple(sorted(layers))
        if len(members) >= 2 and members not in {c for _, c in chosen}:
            chosen.append((label, members))
    return chosen


# -- the one pass over the backbone ------------------------------------------------------------
def pool_layers(
    probe: Probe,
    encoded: Encoded,
    layers: Sequence[int],
    runner: Runner,
    *,
    pad_id: int,
    padding_side: str = "right",
    batch_size: int = 64,
    max_tokens: int | None = 4096,
    desc: str = "features",
) -> np.ndarray:
    """Pooled features of every hidden state ``layers`` for every row: ``[rows, layers, width]``
    float32, rows in the split's order.

    The backbone runs once per batch through the one inference path
    (`probekit.inference.forward`: eval mode, no gradients, the run's autocast), up to the
    highest of ``layers``; each hidden state then goes through the probe's own pooling path (cast
    to the head's dtype, ``probe.pooler``, its output-shape check) as if it were the layer the
    probe reads, so layer ``i`` gets exactly what a probe pooling layer ``i`` computes. Batches
    are sorted by length (`probekit.batching.inference_loader`).
    """
    width = probe.pooler.output_dim(probe.layout.hidden_size)
    out = np.zeros((len(encoded), len(layers), width), dtype=np.float32)
    read = probe.layers[0]
    loader = inference_loader(encoded, pad_id, batch_size, padding_side=padding_side, max_tokens=max_tokens)
    probe.eval()
    for batch in progress_bar(loader, runner.progress, desc, total=len(loader)):
        hidden = forward(probe, batch, runner, output="hidden", layers=tuple(layers))
        ids, mask = batch.input_ids.to(runner.device), batch.attention_mask.to(runner.device)
        reads = None if batch.read_mask is None else batch.read_mask.to(runner.device)
        with torch.inference_mode(), runner.autocast():
            pooled = torch.stack(
                [
                    probe.features(ids, mask, cached={read: hidden[:, :, j]}, read_mask=reads)
                    for j in range(len(layers))
                ],
                dim=1,
            )
        out[batch.index.numpy()] = pooled.float().cpu().numpy()
    return out


# -- probes on cached features -----------------------------------------------------------------
class _Pooled(Pooler):
    """Stands in for the token pooler when the features are pooled already: ``(b, 1, w) -> (b, w)``."""

    def forward(self, hidden: Tensor, mask: Tensor) -> Tensor:
        return hidden[:, 0]

    def output_dim(self, hidden_size: int) -> int:
        return hidden_size


class FeatureProbe(nn.Module):
    """What a sweep candidate trains: the spec's head on pooled features ``(b, k, w)`` of ``k``
    layers; with ``combine`` they are first combined as a ``multilayer`` pooler with
    ``combine_at="pooled"`` does (the same module, so ``scalar_mix`` weights train too)."""

    def __init__(self, head: nn.Module, pooler: MultiLayerPooler | None = None) -> None:
        super().__init__()
        self.pooler = pooler
        self.head = head

    def forward(self, *_tokens: Any, features: Tensor, **_cached: Any) -> Tensor:
        """Logits from pooled features ``(b, k, w)`` (the batch's token ids are not read)."""
        if self.pooler is None:
            pooled = features[:, 0]
        else:
            mask = features.new_ones((features.shape[0], 1))
            pooled = self.pooler([part.unsqueeze(1) for part in features.unbind(1)], mask)
        logits: Tensor = self.head(pooled)
        return logits


@dataclass(frozen=True)
class Candidate:
    """One probe of the sweep: the hidden states it read, how it combined them, its results."""

    name: str
    """``layer 3``, or a combination: ``top 2``, ``top 3``, ``all``."""
    layers: tuple[int, ...]
    combine: Combine | None
    """How several layers were combined; None for a single layer."""
    metrics: dict[str, dict[str, float]]
    """Per split (``val``, ``test``): `compute_metrics` at the val threshold, plus ``loss``."""
    threshold: Threshold
    best_epoch: int
    epochs_run: int
    intervals: dict[str, dict[str, list[float] | None]] = field(default_factory=dict)
    """Per split: the 95% bootstrap interval ``[lo, hi]`` of each metric that has one (the
    ranking metrics, `probekit.evaluate.metric_resamples`; None where undefined)."""
    scores: dict[str, Scores] = field(default_factory=dict, repr=False, compare=False)
    """Per split (``val``, ``test``): the candidate's scores, in row order."""
    resampled: dict[str, np.ndarray] = field(default_factory=dict, repr=False, compare=False)
    """Metric -> its val value in each bootstrap resample (paired across candidates)."""

    def value(self, metric: str) -> float:
        """The val value of ``metric`` (``auroc``, ``accuracy``, ``f1``, ``auprc``, ``loss``...)."""
        return self.metrics["val"][metric]

    @property
    def members(self) -> str:
        """The layers as text: ``3``, or ``2+4 (concat)``."""
        text = "+".join(map(str, self.layers))
        return text if self.combine is None else f"{text} ({self.combine})"

    def as_json(self) -> dict[str, Any]:
        """The candidate as ``sweep.json`` holds it."""
        return {
            "name": self.name,
            "layers": list(self.layers),
            "combine": self.combine,
            "threshold": self.threshold,
            "best_epoch": self.best_epoch,
            "epochs_run": self.epochs_run,
            "metrics": self.metrics,
            "intervals": self.intervals,
        }

    def interval(self, metric: str, split: str = "val") -> list[float] | None:
        """The bootstrap interval of ``metric`` on ``split``, None when it has none."""
        return self.intervals.get(split, {}).get(metric)

    def with_intervals(self, task: Task, resamples: int, seed: int) -> Candidate:
        """This candidate with `intervals` on every split and its val `resampled`: ``resamples``
        bootstrap resamples of the rows drawn with ``seed`` (none when ``resamples`` is 0)."""
        from probekit.bootstrap import percentile_interval
        from probekit.evaluate import metric_resamples

        if resamples == 0:
            return self
        intervals, resampled = {}, {}
        for split, scored in self.scores.items():
            drawn = metric_resamples(task, scored.labels, scored.scores, resamples, seed)
            intervals[split] = {
                key: percentile_interval(values, self.metrics[split].get(key, math.nan))
                for key, values in drawn.items()
            }
            if split == "val":
                resampled = drawn
        return dataclasses.replace(self, intervals=intervals, resampled=resampled)


@dataclass(frozen=True)
class Comparison:
    """The sweep's winner against its runner-up on the monitored val metric, with the bootstrap:
    the runner-up's interval, and the paired interval of the difference (both probes scored on
    the same resamples of the val rows)."""

    metric: str
    winner: str
    runner_up: str
    winner_value: float
    runner_up_value: float
    runner_up_interval: list[float] | None
    difference_interval: list[float] | None

    @property
    def within(self) -> bool:
        """The winner's value lies inside the runner-up's interval: the val rows cannot tell the
        two apart."""
        band = self.runner_up_interval
        return band is not None and band[0] <= self.winner_value <= band[1]

    def line(self) -> str:
        """One sentence for the log and the summary."""
        level = "95%"
        value = _with_interval(self.runner_up_value, self.runner_up_interval)
        head = f"runner-up: {self.runner_up}, val {self.metric} {value}"
        if self.runner_up_interval is None:
            return f"{head}; no {level} interval (a resample lacks a class)"
        verdict = (
            f"the winner's {self.winner_value:.4f} is within the runner-up's {level} interval: these val "
            "rows do not separate them"
            if self.within
            else f"the winner's {self.winner_value:.4f} is outside the runner-up's {level} interval"
        )
        gap = self.winner_value - self.runner_up_value
        paired = (
            f"; paired difference {gap:+.4f} [{self.difference_interval[0]:+.4f}, "
            f"{self.difference_interval[1]:+.4f}]"
            if self.difference_interval is not None
            else ""
        )
        return f"{head}; {verdict}{paired}"

    def as_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "within": self.within}


def compare(candidates: Sequence[Candidate], best: Candidate, monitor: str) -> Comparison | None:
    """`Comparison` of ``best`` with the next best candidate by ``monitor``; None with one
    candidate, or when the monitored metric has no bootstrap (the loss, accuracy, F1)."""
    from probekit.bootstrap import percentile_interval

    others = [c for c in candidates if c is not best and monitor in c.resampled]
    if monitor not in best.resampled or not others:
        return None
    lower = monitor in LOWER_IS_BETTER
    runner_up, runner_value = others[0], None
    for candidate in others:
        if improves(monitor, candidate.value(monitor), runner_value):
            runner_up, runner_value = candidate, candidate.value(monitor)
    gap = best.value(monitor) - runner_up.value(monitor)
    paired = best.resampled[monitor] - runner_up.resampled[monitor]
    return Comparison(
        metric=monitor,
        winner=best.name,
        runner_up=runner_up.name,
        winner_value=best.value(monitor),
        runner_up_value=runner_up.value(monitor),
        runner_up_interval=runner_up.interval(monitor),
        difference_interval=percentile_interval(-paired if lower else paired, -gap if lower else gap),
    )


def _with_interval(value: float, interval: list[float] | None) -> str:
    """``0.9123 [0.8801, 0.9402]``, or the value alone."""
    return f"{value:.4f}" + (f" [{interval[0]:.4f}, {interval[1]:.4f}]" if interval is not None else "")


@dataclass(frozen=True)
class CandidatePlan:
    """What the training loop reads for one candidate (`probekit.training.loop.FitPlan`): the
    sweep's batch plan, with its features as a pooled activation cache."""

    config: ProbeConfig
    task: Task
    encoded: dict[str, Encoded]
    pad_id: int
    per_device_batch: int
    accumulation: int
    steps_per_epoch: int
    total_steps: int
    cache_plan: CachePlan
    data_fingerprint: dict[str, dict[str, Any]] = field(default_factory=dict)
    class_weights: tuple[float, ...] | None = None


def fit_candidate(
    name: str,
    layers: tuple[int, ...],
    features: Mapping[str, Tensor],
    plan: TrainPlan,
    ctx: RunContext,
    combine: Combine | None = None,
) -> Candidate:
    """Train the spec's head on cached features and evaluate it, as training would train it.

    ``features`` maps ``train``, ``val`` (and ``test``) to features ``(rows, k, w)`` of the ``k``
    ``layers``. The head is built through its spec with the seed set (`FeatureProbe`), with AdamW
    at the head's learning rate and weight decay (none on biases and norms) and the spec's
    schedule, and trained by the training loop itself (`probekit.training.loop.fit`) with
    `EarlyStopping` and `BestWeights`; the decision threshold is chosen on val by the task's rule
    and every split is evaluated there.

    Raises:
        DivergedError: a non-finite loss.
    """
    config, spec = plan.config, plan.config.train
    torch.manual_seed(spec.seed)
    width = features["train"].shape[2]
    pooler = None if combine is None else MultiLayerPooler(len(layers), combine, "pooled", _Pooled())
    in_dim = width if pooler is None else pooler.output_dim(width)
    model = FeatureProbe(config.head.build(plan.probe.context, in_dim), pooler).to(ctx.device)
    optimizer = adamw(
        decay_groups(
            "head", config.optimizer.lr_head, model.named_parameters(), config.optimizer.weight_decay
        ),
        config.optimizer,
    )
    scheduler = config.scheduler.build(optimizer, plan.total_steps, plan.steps_per_epoch)
    cache_plan = CachePlan("pooled", layers, 0)
    caches = {split: SplitCache(cache_plan, x, [], "memory") for split, x in features.items()}
    candidate = CandidatePlan(
        config,
        plan.task,
        plan.encoded,
        plan.pad_id,
        plan.per_device_batch,
        plan.accumulation,
        plan.steps_per_epoch,
        plan.total_steps,
        cache_plan,
        class_weights=plan.class_weights,
    )
    early, best = EarlyStopping(spec.monitor, spec.patience, spec.epochs), BestWeights(ctx.group)
    try:
        done = fit(
            ctx, candidate, Parts(model, model, optimizer, scheduler, caches), TrainState(), [early, best]
        )
    except DivergedError as exc:
        raise DivergedError(f"the probe on {name}: {exc}") from None
    runner = Runner(ctx.device, ctx.autocast)

    def scored(split: str) -> Scores:
        loader = inference_loader(
            plan.encoded[split], plan.pad_id, spec.eval_batch_size, cache=caches[split], max_tokens=None
        )
        return predict(model, loader, runner, plan.task, cache_plan=cache_plan)

    val = best.val if best.val is not None else scored("val")
    others = {
        split: (lambda split=split: scored(split)) for split in features if split not in ("train", "val")
    }
    finished = finish(plan.task, val, others)
    metrics = {
        split: {**finished.metrics[split], "loss": scores.loss} for split, scores in finished.scores.items()
    }
    return Candidate(
        name,
        layers,
        combine,
        metrics,
        finished.threshold,
        early.best_epoch,
        len(done.state.history),
        scores=dict(finished.scores),
    )


# -- results -----------------------------------------------------------------------------------
TABLE_METRICS = (
    ("accuracy", "acc"),
    ("f1", "f1"),
    ("auroc", "auroc"),
    ("auprc", "auprc"),
    ("recall_at_1pct_fpr", "r@1%fpr"),
    ("recall_at_5pct_fpr", "r@5%fpr"),
    ("binary_auroc", "bin auroc"),
    ("binary_recall_at_1pct_fpr", "bin r@1%fpr"),
    ("ece", "ece"),
)
"""Metrics of the sweep table, per split: key and column name; those the task reports (a
multi-class task: ``f1`` is macro F1, ``binary_*`` the view against its negative class)."""


@dataclass
class SweepResult:
    """What a sweep produced: the layers, every candidate, the best one, the cached features."""

    run_dir: Path
    layers: tuple[int, ...]
    candidates: list[Candidate]
    best: Candidate
    monitor: str
    combine: Combine
    """How the combinations combined their layers."""
    features: dict[str, np.ndarray] = field(repr=False)
    """Per split, the pooled features ``[rows, layers, width]`` (float32; layers in ``layers`` order)."""
    labels: dict[str, np.ndarray] = field(repr=False)
    """Per split, the class index of each row."""
    feature_seconds: float = 0.0
    """The pass of the backbone over every split."""
    probe_seconds: float = 0.0
    """Training and evaluating every candidate."""
    seconds: float = 0.0
    """The whole sweep, loading included."""
    comparison: Comparison | None = None
    """The winner against the runner-up, with bootstrap intervals (`compare`)."""
    bootstrap: dict[str, Any] = field(default_factory=dict)
    """The bootstrap's settings: ``resamples``, ``seed``, ``level`` (empty with none)."""

    def table(self) -> list[str]:
        """The candidates as a Markdown table (val metrics, then test metrics when there is a test
        split; the monitored metric with its bootstrap interval); the best candidate's name ends
        in ``(best)``."""
        splits = [s for s in ("val", "test") if s in self.best.metrics]
        shown = [(key, col) for key, col in TABLE_METRICS if key in self.best.metrics["val"]]
        header = ["candidate", "layers"] + [f"{s} {col}" for s in splits for _, col in shown]
        header.append("epochs")
        rows = [header, ["---"] * len(header)]
        for c in self.candidates:
            name = f"{c.name} (best)" if c is self.best else c.name
            cells = [
                _with_interval(c.metrics[s][key], c.interval(key, s) if key == self.monitor else None)
                for s in splits
                for key, _ in shown
            ]
            rows.append([name, c.members, *cells, f"{c.best_epoch}/{c.epochs_run}"])
        return ["| " + " | ".join(row) + " |" for row in rows]

    def summary(self) -> list[str]:
        """A short human summary: where, the best candidate, the time spent."""
        return [
            f"sweep: {self.run_dir}",
            f"best: {self.best.name} (hidden states {self.best.members}), val {self.monitor} "
            f"{_with_interval(self.best.value(self.monitor), self.best.interval(self.monitor))}; "
            f"config in {self.run_dir / 'best.yaml'}",
            *([self.comparison.line()] if self.comparison is not None else []),
            f"features {self.feature_seconds:.1f} s, probes {self.probe_seconds:.1f} s, "
            f"total {self.seconds:.1f} s",
        ]


def best_config(config: ProbeConfig, candidate: Candidate, token_pooler: TokenPoolerSpec) -> ProbeConfig:
    """``config`` with its pooler reading what ``candidate`` read: ``token_pooler`` on its layer,
    or ``multilayer`` over its layers (its ``combine``, ``combine_at: pooled``) with
    ``token_pooler`` inside. Everything else (freezer, head, optimiser...) is kept. Validated."""
    data = config.model_dump(mode="json")
    inner = {k: v for k, v in token_pooler.model_dump(mode="json").items() if k != "layer"}
    if candidate.combine is None:
        data["pooler"] = {**inner, "layer": candidate.layers[0]}
    else:
        data["pooler"] = {
            "kind": "multilayer",
            "layers": list(candidate.layers),
            "combine": candidate.combine,
            "combine_at": "pooled",
            "token_pooler": inner,
        }
    return load_config(data)


# -- the sweep ---------------------------------------------------------------------------------
def sweep(
    config: ProbeConfig,
    *,
    out: str | Path | None = None,
    overwrite: bool = False,
    layers: Sequence[int] | None = None,
    combos: bool = True,
    resamples: int = 1000,
    seed: int = 0,
    log: Log = print,
    progress: bool | None = None,
    name: str = "sweep",
    protect: Mapping[str, str | Path] | None = None,
) -> SweepResult:
    """Probe every requested hidden state of the config's backbone; write the sweep's run folder.

    Args:
        config: a validated config; its model, data, pooler (the token pooler used on every
            layer), head, optimiser, schedule and training settings are used, its freezer only
            in ``best.yaml`` (the sweep runs the backbone frozen).
        out: the run folder (default ``runs/<name>-<timestamp>``); must not exist or be empty
            unless ``overwrite``; written to a temporary sibling and moved into place when
            complete.
        overwrite: replace a non-empty ``out`` once the sweep is complete.
        layers: hidden-state indices (0 = embeddings, negative from the end); default: all.
        combos: also train the combinations (best 2, best 3, all layers).
        resamples: bootstrap resamples of the val and test rows for the intervals of the ranking
            metrics and the winner's comparison with the runner-up (0: none).
        seed: the seed of the resamples.
        log: where progress lines go.
        progress: show progress bars; default: when stderr is a terminal.
        name: prefix of the default run folder name.
        protect: more paths ``out`` must not be, hold or lie inside, as in `probekit.training.train`.

    Raises:
        UserError: a pooler with parameters or one that is not single-layer or ``multilayer``, a
            layer the backbone lacks, a non-empty ``out``, bad data or model.
    """
    started = time.perf_counter()
    if launched_processes() > 1:
        raise UserError("probekit sweep runs in one process; start it without torchrun or accelerate launch")
    check_bootstrap(resamples, seed)
    token_pooler, combine = sweep_pooler(config.pooler)
    _check_fixed(token_pooler, BuildContext(hidden_size=8, num_layers=1), early=True)
    out_dir = Path(out) if out is not None else default_run_dir(name)
    folder = RunFolder.open(
        out_dir, overwrite=overwrite, inputs=input_paths(config, dict(protect or {})), log=log
    )
    try:
        partial = folder.create()
        with deterministic_algorithms(config.train.deterministic):
            ctx = RunContext.start(config.train, log=log, progress=progress)
            result = _sweep(config, token_pooler, combine, layers, combos, (resamples, seed), partial, ctx)
        folder.publish()
    except BaseException as exc:
        folder.abandon(log, keep=False)
        error = explain_failure(exc, None)
        if error is exc:
            raise
        raise error from exc
    finally:
        folder.release()
    result.run_dir = out_dir
    result.seconds = time.perf_counter() - started
    for line in result.summary():
        log(line)
    return result


def _sweep(
    config: ProbeConfig,
    token_pooler: TokenPoolerSpec,
    combine: Combine,
    layers: Sequence[int] | None,
    combos: bool,
    bootstrap: tuple[int, int],
    folder: Path,
    ctx: RunContext,
) -> SweepResult:
    log = ctx.log
    # The pass reads the backbone frozen, with the token pooler (its layer is set per hidden state).
    reader = token_pooler.model_copy(update={"layer": -1})
    prepared = prepare(
        config.model_copy(update={"pooler": reader, "freezer": FreezeAllSpec()}), device=ctx.device
    )
    probe, spec = prepared.probe, config.train
    _check_fixed(token_pooler, probe.context)
    num_blocks = probe.layout.num_blocks
    # In layer order, whatever order --layers gave: the table, the ties and the plot follow it.
    chosen = tuple(
        sorted(
            resolve_layers(range(num_blocks + 1) if layers is None else layers, num_blocks, field="--layers")
        )
    )
    config.freezer.resolve(probe.backbone)  # best.yaml keeps the spec's freezer: it must fit
    rows = {split.name: len(split) for split in prepared.dataset.splits()}
    _log_plan(log, prepared, token_pooler, chosen, rows, combine if combos else None)

    begun = time.perf_counter()
    probe.to(prepared.device)
    runner = Runner(ctx.device, ctx.autocast, progress=ctx.progress)
    features = {
        split: pool_layers(
            probe,
            encoded,
            chosen,
            runner,
            pad_id=prepared.pad_id,
            padding_side=config.model.padding_side,
            batch_size=spec.eval_batch_size,
            max_tokens=spec.eval_max_tokens,
            desc=f"features {split}",
        )
        for split, encoded in prepared.encoded.items()
    }
    labels = {split: np.asarray(encoded.labels) for split, encoded in prepared.encoded.items()}
    feature_seconds = time.perf_counter() - begun
    size = sum(f.nbytes for f in features.values()) / 2**20
    log(
        f"features: {len(chosen)} hidden states x {features['train'].shape[2]} for {sum(rows.values())} "
        f"rows ({size:.1f} MiB) in {feature_seconds:.1f} s"
    )

    begun = time.perf_counter()
    tensors = {split: torch.from_numpy(x) for split, x in features.items()}
    # The candidates train on the spec's config (its head, optimiser, schedule...), quietly, in
    # fp32 whatever the backbone pass used: small heads gain nothing from autocast, and an fp16
    # grad scaler would need every candidate's optimiser prepared by Accelerate.
    plan = dataclasses.replace(prepared, config=absolute_paths(config))
    quiet = RunContext.start(
        config.train.model_copy(update={"precision": "fp32"}), log=lambda _line: None, progress=False
    )

    def run(label: str, members: tuple[int, ...], how: Combine | None) -> Candidate:
        positions = [chosen.index(layer) for layer in members]
        splits = {split: _select(x, positions) for split, x in tensors.items()}
        candidate = fit_candidate(label, members, splits, plan, quiet, how)
        log(
            f"{candidate.name} [{candidate.members}]: val {plan.task.epoch_line(candidate.metrics['val'])} "
            f"(best epoch {candidate.best_epoch} of {candidate.epochs_run})"
        )
        return candidate

    singles = [
        run(f"layer {layer}", (layer,), None) for layer in progress_bar(chosen, ctx.progress, "probes")
    ]
    lower = spec.monitor in LOWER_IS_BETTER
    combined = [
        run(label, members, combine)
        for label, members in (
            choose_combinations({c.layers[0]: c.value(spec.monitor) for c in singles}, lower_is_better=lower)
            if combos
            else []
        )
    ]
    resamples, seed = bootstrap
    candidates = [c.with_intervals(plan.task, resamples, seed) for c in singles + combined]
    best, best_value = candidates[0], None
    for candidate in candidates:
        if improves(spec.monitor, candidate.value(spec.monitor), best_value):
            best, best_value = candidate, candidate.value(spec.monitor)
    result = SweepResult(
        run_dir=folder,
        layers=chosen,
        candidates=candidates,
        best=best,
        monitor=spec.monitor,
        combine=combine,
        features=features,
        labels=labels,
        feature_seconds=feature_seconds,
        probe_seconds=time.perf_counter() - begun,
        comparison=compare(candidates, best, spec.monitor),
        bootstrap={"resamples": resamples, "seed": seed, "level": LEVEL} if resamples else {},
    )
    _write_outputs(result, plan, token_pooler, rows, folder)
    return result


def _log_plan(
    log: Log,
    prepared: TrainPlan,
    token_pooler: TokenPoolerSpec,
    chosen: tuple[int, ...],
    rows: dict[str, int],
    combine: Combine | None,
) -> None:
    """What the sweep will read and fit, before the backbone pass begins."""
    probe, spec = prepared.probe, prepared.config.train
    log(
        f"model: {prepared.backbone.name} ({prepared.backbone.provenance}); {probe.layout.model_type}, "
        f"{probe.layout.num_blocks} blocks, width {probe.layout.hidden_size}"
    )
    log(f"data: {prepared.data_origin()}; " + " / ".join(f"{k} {n}" for k, n in rows.items()) + " rows")
    log(
        f"sweep: {token_pooler.kind} pooling of hidden states {list(chosen)} (0 = embeddings), "
        f"backbone frozen, {prepared.precision} on {prepared.device}"
    )
    log(
        f"probes: {prepared.config.head.kind} head on each layer"
        + (f", then the best 2, best 3 and all layers combined by {combine}" if combine else "")
        + f"; best by val {spec.monitor}"
    )


def _select(features: Tensor, positions: list[int]) -> Tensor:
    """The ``positions`` of the layer axis; all of them in order without a copy."""
    return features if positions == list(range(features.shape[1])) else features[:, positions]


def layer_text(layers: Sequence[int]) -> str:
    """Layers as short text, runs of three or more as a range: ``3,7``, ``0-6``, ``1-3,5``."""
    parts: list[str] = []
    ordered = sorted(layers)
    start = 0
    for i in range(1, len(ordered) + 1):
        if i == len(ordered) or ordered[i] != ordered[i - 1] + 1:
            run = ordered[start:i]
            parts.append(f"{run[0]}-{run[-1]}" if len(run) > 2 else ",".join(map(str, run)))
            start = i
    return ",".join(parts)


def _tick(candidate: Candidate) -> str:
    """A combination's tick label in the plot: its name over its layers."""
    return f"{candidate.name}\n{layer_text(candidate.layers)}"


def _write_outputs(
    result: SweepResult, plan: TrainPlan, token_pooler: TokenPoolerSpec, rows: dict[str, int], folder: Path
) -> None:
    from probekit.plots import plot_layers

    best, config = result.best, plan.config
    report = {
        "model": plan.backbone.name,
        "rows": rows,
        "pooler": token_pooler.model_dump(mode="json"),
        "combine": result.combine,
        "layers": list(result.layers),
        "monitor": result.monitor,
        "threshold_rule": plan.task.threshold_rule_id(),
        "candidates": [c.as_json() for c in result.candidates],
        "best": best.as_json(),
        "bootstrap": result.bootstrap,
        "comparison": result.comparison.as_json() if result.comparison is not None else None,
        "seconds": {"features": result.feature_seconds, "probes": result.probe_seconds},
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    (folder / "sweep.json").write_text(jsonio.dumps(report, indent=2) + "\n", encoding="utf-8")
    (folder / "sweep.md").write_text("\n".join(result.table()) + "\n", encoding="utf-8")
    singles = [c for c in result.candidates if c.combine is None]
    combined = [c for c in result.candidates if c.combine is not None]
    plot_layers(
        [c.layers[0] for c in singles],
        [c.metrics["val"] for c in singles],
        folder / "layers.png",
        [(_tick(c), c.metrics["val"]) for c in combined],
        best=_tick(best) if best.combine is not None else str(best.layers[0]),
        intervals=[c.intervals.get("val", {}) for c in singles + combined],
        rows=rows.get("val"),
    )
    chosen = best_config(config, best, token_pooler)
    (folder / "best.yaml").write_text(dump_config(chosen), encoding="utf-8")
