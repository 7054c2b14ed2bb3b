"""`TrainState`: where a run stands, in named fields, and its JSON round trip.

With each callback's state (`probekit.training.callbacks`) and the weights, optimizer,
scheduler and RNG states it is enough to continue a run bit for bit. The JSON keys are those of
the training-state checkpoints written since resume exists (``state.json``; its schema is
`probekit.state.TrainState`), so unfinished runs of earlier versions still resume.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class TrainState:
    """The position of a run and its running sums.

    The fields always say where to continue: after an epoch ends, ``epoch`` is the next one and
    ``window`` 0.
    """

    epoch: int = 1
    """The epoch in progress (1-based)."""
    window: int = 0
    """Accumulation windows (optimiser steps, skipped ones included) of ``epoch`` done."""
    step: int = 0
    """Optimiser steps taken in all (steps the fp16 grad scaler skipped are not counted)."""
    skipped: int = 0
    """Steps the fp16 grad scaler skipped in all."""
    epoch_skipped: int = 0
    """Steps the fp16 grad scaler skipped in ``epoch``."""
    loss_sum: float = 0.0
    """This process's summed training loss of ``epoch`` (label-smoothed), over ``seen`` rows."""
    correct: int = 0
    seen: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    """One row per finished epoch, as ``metrics.jsonl`` holds them."""
    stopped_early: bool = False
    in_a_row: int = 0
    """Steps skipped by the fp16 grad scaler in a row (not saved: a resumed run counts anew)."""

    def next_epoch(self) -> None:
        """Move to the start of the next epoch: its sums and skip count start at zero."""
        self.epoch, self.window = self.epoch + 1, 0
        self.loss_sum, self.correct, self.seen, self.epoch_skipped = 0.0, 0, 0, 0

    def to_json(self, totals: tuple[float, int, int] | None = None) -> dict[str, Any]:
        """The state as ``state.json`` holds it. ``totals``: the running sums over every process
        (this process's own by default)."""
        loss, correct, seen = totals if totals is not None else (self.loss_sum, self.correct, self.seen)
        return {
            "epoch": self.epoch,
            "window": self.window,
            "step": self.step,
            "skipped_steps": [self.skipped, self.epoch_skipped],
            "stopped_early": self.stopped_early,
            "accumulators": [float(loss), int(correct), int(seen)],
            "history": [dict(row) for row in self.history],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], *, sums: bool = True) -> TrainState:
        """The state ``to_json`` gave; ``sums=False`` starts the running sums at zero (a process
        other than the main one: the saved sums are over every process and the main one carries
        them on)."""
        skipped, epoch_skipped = data["skipped_steps"]
        loss, correct, seen = data["accumulators"] if sums else (0.0, 0, 0)
        return cls(
            epoch=int(data["epoch"]),
            window=int(data["window"]),
            step=int(data["step"]),
            skipped=int(skipped),
            epoch_skipped=int(epoch_skipped),
            loss_sum=float(loss),
            correct=int(correct),
            seen=int(seen),
            history=[dict(row) for row in data["history"]],
            stopped_early=bool(data["stopped_early"]),
        )
