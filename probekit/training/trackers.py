"""Per-step scalars: ``steps.jsonl`` in the run folder, and the experiment trackers of
``train.report_to`` (through Accelerate's tracker classes).

`StepsFile` writes one row per optimiser step (steps the fp16 grad scaler skipped have none)::

    {"step": 12, "epoch": 2, "loss": 0.41, "lr": {"head/decay": 0.0009, ...}, "grad_norm": 0.8}

``lr`` is each parameter group's learning rate after the step's schedule step (the one the next
step uses, as ``lr_head`` in ``metrics.jsonl``); ``grad_norm`` (before clipping) is there when
``train.max_grad_norm`` clips. A resumed run keeps the rows up to its checkpoint's step, then
goes on. The trackers get the same scalars per step (``train/loss``, ``lr/<group>``,
``train/grad_norm``) and the epoch's numbers per epoch (``train/accuracy``, ``train/epoch_loss``,
``val/<metric>``), the flattened config once, and are finished at the end of the fit (also after
an error). Only the main process writes; the tracker packages are imported when a tracker starts.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from probekit import jsonio
from probekit.errors import UserError
from probekit.training.callbacks import BUILTIN, Callback

if TYPE_CHECKING:
    from probekit.training.loop import Fit

STEPS_FILE = "steps.jsonl"
TRACKERS_DIR = "trackers"

PACKAGES: dict[str, tuple[tuple[str, ...], str]] = {
    "tensorboard": (("tensorboard", "tensorboardX"), "tensorboard"),
    "mlflow": (("mlflow",), "mlflow-skinny"),
    "wandb": (("wandb",), "wandb"),
    "comet_ml": (("comet_ml",), "comet-ml"),
    "aim": (("aim",), "'aim<4'"),
    "clearml": (("clearml",), "clearml"),
    "dvclive": (("dvclive",), "dvclive"),
}
"""Per tracker: the modules any of which it needs (as Accelerate checks), and what to install."""


def check_trackers(names: Sequence[str]) -> None:
    """A one-line `UserError` for the first tracker of ``names`` whose package is missing."""
    for name in names:
        modules, install = PACKAGES[name]
        if not any(importlib.util.find_spec(module) is not None for module in modules):
            raise UserError(
                f"train.report_to: {name} needs the {' or '.join(modules)} package, which is not "
                f"installed; pip install {install}"
            )


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` as ``{"a.b": 1}``; values a tracker takes (bool, int, float, str):
    lists and None become their JSON text."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{name}."))
        elif isinstance(value, bool | int | float | str):
            flat[name] = value
        else:
            flat[name] = json.dumps(value, default=str)
    return flat


def run_name(folder: Path) -> str:
    """The run's name: the output folder's, also while it is written as ``.NAME.partial-PID``."""
    name = folder.name
    if name.startswith(".") and ".partial-" in name:
        return name[1:].rsplit(".partial-", 1)[0]
    return name


def make_tracker(name: str, folder: Path) -> Any:
    """Accelerate's tracker ``name``, logging into ``folder/trackers`` where it keeps files."""
    from accelerate import tracking  # type: ignore[import-untyped]

    where, run = folder / TRACKERS_DIR, run_name(folder)
    where.mkdir(parents=True, exist_ok=True)
    if name == "tensorboard":
        return tracking.TensorBoardTracker("tensorboard", where)
    if name == "mlflow":
        import os

        import mlflow

        if not os.environ.get("MLFLOW_TRACKING_URI"):  # a file store in the run folder
            # MLflow 3 asks for this opt-in to write a file store (its default is a database).
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            mlflow.set_tracking_uri((where / "mlruns").as_uri())
        return tracking.MLflowTracker(experiment_name="probekit", run_name=run)
    if name == "wandb":
        return tracking.WandBTracker("probekit", name=run, dir=str(where))
    if name == "comet_ml":
        return tracking.CometMLTracker("probekit")
    if name == "aim":
        return tracking.AimTracker(run, str(where / "aim"))
    if name == "clearml":
        return tracking.ClearMLTracker(run)
    return tracking.DVCLiveTracker(run, dir=str(where / "dvclive"))


class StepsFile(Callback):
    """``steps.jsonl`` (one row per optimiser step) and the trackers of ``report_to``, in
    ``folder`` (None: a process that does not write)."""

    def __init__(self, folder: Path | None, report_to: Sequence[str] = ()) -> None:
        self.folder = folder
        self.path = None if folder is None else folder / STEPS_FILE
        self.report_to = tuple(report_to)
        self.trackers: list[Any] = []

    def on_fit_start(self, fit: Fit) -> None:
        if self.path is None or self.folder is None:
            return
        kept = []  # a resumed run: the rows up to its checkpoint
        if self.path.exists():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                except ValueError:  # a line cut short by a kill
                    continue
                if isinstance(row, dict) and row.get("step", 0) <= fit.state.step:
                    kept.append(line + "\n")
        self.path.write_text("".join(kept), encoding="utf-8")
        for name in self.report_to:
            tracker = make_tracker(name, self.folder)
            tracker.start()
            self.trackers.append(tracker)
            tracker.store_init_configuration(flatten(fit.plan.config.model_dump(mode="json")))

    def on_window_end(self, fit: Fit) -> None:
        if self.path is None or not fit.advanced:
            return
        groups = fit.optimizer.param_groups
        lrs = {str(g.get("name", i)): float(g["lr"]) for i, g in enumerate(groups)}
        row: dict[str, Any] = {"step": fit.state.step, "epoch": fit.state.epoch, "loss": fit.window_loss}
        row["lr"] = lrs
        if fit.grad_norm is not None:
            row["grad_norm"] = fit.grad_norm
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(jsonio.dumps(row) + "\n")
        scalars = {"train/loss": fit.window_loss, **{f"lr/{k}": v for k, v in lrs.items()}}
        if fit.grad_norm is not None:
            scalars["train/grad_norm"] = fit.grad_norm
        self.log(scalars, fit.state.step)

    def on_epoch_end(self, fit: Fit) -> None:
        row = fit.row
        scalars = {
            "train/accuracy": row["train_accuracy"],
            "train/epoch_loss": row["train_loss"],
            **{f"val/{k.removeprefix('val_')}": v for k, v in row.items() if k.startswith("val_")},
        }
        self.log({k: float(v) for k, v in scalars.items() if isinstance(v, int | float)}, row["step"])

    def on_fit_end(self, fit: Fit) -> None:
        trackers, self.trackers = self.trackers, []
        first: BaseException | None = None
        for tracker in trackers:  # every one, even when one of them raises
            try:
                tracker.finish()
            except BaseException as exc:
                first = first or exc
        if first is not None:
            raise first

    def log(self, scalars: dict[str, float], step: int) -> None:
        for tracker in self.trackers:
            tracker.log(scalars, step=step)


BUILTIN.add(StepsFile)
