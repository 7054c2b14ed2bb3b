"""Tasks: everything that depends on the kind of target a probe predicts.

A task is chosen by the config (``task: {kind: binary}``, the default) from the ``tasks``
registry family, like poolers and heads: a `probekit.spec.TaskSpec` that builds a
`probekit.tasks.base.Task`. The training loop, the evaluation, the sweep, the outputs and
``Probe.predict`` call the task; none of them branches on its kind.
"""

from probekit.tasks.base import Scores, Task
from probekit.tasks.binary import BinaryTask, BinaryTaskSpec
from probekit.tasks.multiclass import MulticlassTask, MulticlassTaskSpec
from probekit.tasks.multilabel import MultilabelTask, MultilabelTaskSpec
from probekit.tasks.regression import RegressionTask, RegressionTaskSpec

__all__ = [
    "BinaryTask",
    "BinaryTaskSpec",
    "MulticlassTask",
    "MulticlassTaskSpec",
    "MultilabelTask",
    "MultilabelTaskSpec",
    "RegressionTask",
    "RegressionTaskSpec",
    "Scores",
    "Task",
]
