"""Base classes of every spec: one pydantic model per component kind.

A spec is plain, frozen, validated data (``extra="forbid"``) with a ``kind: Literal[...]`` field
and a method that builds the torch object it describes. Specs never hold tensors, so they dump
to JSON or YAML and load back unchanged.
"""

from __future__ import annotations

import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, ClassVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

if TYPE_CHECKING:
    from torch import nn
    from torch.optim import Optimizer
    from torch.optim.lr_scheduler import LambdaLR

    from probekit.freezers.plan import FreezePlan
    from probekit.poolers.base import Pooler
    from probekit.tasks.base import Task


@dataclass(frozen=True)
class BuildContext:
    """What a component may know about the backbone it is built for.

    ``num_layers`` counts transformer blocks; hidden states are indexed ``0..num_layers``
    (0 is the embedding output, ``i`` the output of block ``i - 1``; negative indices count from the end).
    """

    hidden_size: int
    num_layers: int
    model_type: str = "unknown"


def _path_text(value: str) -> str:
    if "\0" in value:
        raise ValueError("a path cannot hold a NUL character")
    if not value.strip():
        raise ValueError("an empty path; name a file or folder")
    return value


PathText = Annotated[str, Field(min_length=1, max_length=4096), AfterValidator(_path_text)]
"""A file or folder name in a spec: not empty or blank, no NUL, at most 4096 characters."""

MAX_LAYER_INDEX = 10_000
"""Hidden-state indices and block counts are bounded by this in specs (a backbone's own depth is
checked when it is built); no spec value reaches torch unbounded."""
MAX_WIDTH = 1 << 16
"""The widest layer a head may ask for, and the most classes."""


class Spec(BaseModel):
    """A component description: frozen, strict, and serialisable. Floats must be finite
    (``allow_inf_nan=False``), in every spec, plugins' included."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    kind: str

    @model_validator(mode="before")
    @classmethod
    def _concrete_only(cls, data: Any) -> Any:
        annotation = cls.model_fields["kind"].annotation
        if typing.get_origin(annotation) is not typing.Literal:
            raise ValueError(
                f"{cls.__name__} is a base class, not a kind; validate configs with "
                "probekit.load_config() so that `kind` picks the spec"
            )
        return data

    @classmethod
    def kind_name(cls) -> str:
        """The ``kind`` this spec class answers to (the single value of its ``Literal``)."""
        return spec_kind(cls)


def spec_kind(cls: type[BaseModel]) -> str:
    """Read the kind from a spec class's ``kind: Literal["name"]`` annotation.

    Raises:
        TypeError: when the class has no single-string ``Literal`` kind.
    """
    field_info = cls.model_fields.get("kind")
    args = typing.get_args(field_info.annotation) if field_info is not None else ()
    origin = typing.get_origin(field_info.annotation) if field_info is not None else None
    if origin is not typing.Literal or len(args) != 1 or not isinstance(args[0], str):
        raise TypeError(
            f"{cls.__module__}.{cls.__qualname__} must declare `kind: Literal['<name>'] = '<name>'`"
        )
    if field_info is not None and field_info.default != args[0]:
        raise TypeError(f"{cls.__module__}.{cls.__qualname__}: the default of `kind` must be {args[0]!r}")
    return args[0]


class PoolerSpec(Spec):
    """A pooler: hidden states of one or more layers plus an attention mask -> one vector per row.

    Class attributes describe the contract the pooler promises; ``probekit.testing`` checks them.
    """

    multi_layer: ClassVar[bool] = False
    """True when the pooler reads a tuple of layers, False when it reads one (b, t, h) tensor."""
    permutation_invariant: ClassVar[bool] = False
    """True when permuting the valid tokens of a row leaves its output unchanged."""

    def layer_indices(self) -> tuple[int, ...]:
        """Indices of the hidden states this pooler reads (negative counts from the last)."""
        raise NotImplementedError

    def is_permutation_invariant(self) -> bool:
        """Whether this configured pooler ignores the order of valid tokens."""
        return self.permutation_invariant

    def build(self, ctx: BuildContext) -> Pooler:
        """Return the pooling module for a backbone described by ``ctx``."""
        raise NotImplementedError


class TokenPoolerSpec(PoolerSpec):
    """A pooler over the tokens of a single layer (default: the last hidden state)."""

    layer: int = Field(
        default=-1,
        ge=-MAX_LAYER_INDEX,
        le=MAX_LAYER_INDEX,
        description="Hidden-state index read (0 = embeddings, -1 = last).",
    )

    def layer_indices(self) -> tuple[int, ...]:
        return (self.layer,)


class HeadSpec(Spec):
    """A classification head: pooled features of width ``in_dim`` -> ``num_classes`` logits."""

    num_classes: int = Field(
        default=2,
        ge=1,
        le=MAX_WIDTH,
        description="Number of outputs: classes (binary: 2), labels (multilabel), 1 (regression).",
    )

    def build(self, ctx: BuildContext, in_dim: int) -> nn.Module:
        """Return the head module for pooled features of width ``in_dim``."""
        raise NotImplementedError


class FreezerSpec(Spec):
    """A freezing policy, resolved against a backbone into an explicit `FreezePlan`."""

    def resolve(self, backbone: nn.Module) -> FreezePlan:
        """Return the plan: frozen and trainable blocks and exact parameter names."""
        raise NotImplementedError


def label_key(value: Any) -> Any:
    """A class named in a config as the label map keys it: ``true``/``false`` for booleans, the
    digits of an integer (``--set task.negative_class=0``); anything else unchanged."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    return value


class TaskSpec(Spec):
    """The kind of target a probe predicts (``task.kind``): it builds the `probekit.tasks.Task`
    that owns the label encoding, the loss, the output activation, the metrics, the decision
    rule, the plots and what ``predict`` returns."""

    def build(self, threshold: Any) -> Task:
        """Return the task; ``threshold`` is the config's `probekit.config.ThresholdSpec`."""
        raise NotImplementedError


class SchedulerSpec(Spec):
    """A learning-rate schedule: a multiplier of each group's base learning rate per optimiser step.

    Warmup is linear from near 0 to 1 and is given in at most one unit: optimiser steps, a
    fraction of all steps, or epochs.
    """

    warmup_steps: int | None = Field(default=None, ge=0, le=10**12)
    warmup_fraction: float | None = Field(default=None, ge=0.0, le=1.0)
    warmup_epochs: float | None = Field(default=None, ge=0.0, le=10**6)

    @model_validator(mode="after")
    def _one_warmup_unit(self) -> SchedulerSpec:
        given = [
            name
            for name in ("warmup_steps", "warmup_fraction", "warmup_epochs")
            if getattr(self, name) is not None
        ]
        if len(given) > 1:
            raise ValueError(f"give warmup in one unit only, got {' and '.join(given)}")
        return self

    def warmup_length(self, total_steps: int, steps_per_epoch: int) -> int:
        """Warmup in optimiser steps, clamped to ``[0, total_steps]``."""
        if self.warmup_steps is not None:
            steps = self.warmup_steps
        elif self.warmup_fraction is not None:
            steps = round(self.warmup_fraction * total_steps)
        elif self.warmup_epochs is not None:
            steps = round(self.warmup_epochs * steps_per_epoch)
        else:
            steps = 0
        return max(0, min(int(steps), total_steps))

    def decay(self, progress: float) -> float:
        """Multiplier after warmup at ``progress`` in [0, 1] of the decay phase."""
        raise NotImplementedError

    def lr_lambda(self, total_steps: int, steps_per_epoch: int = 1) -> Callable[[int], float]:
        """The multiplier for optimiser step ``s`` (0-based) of a run of ``total_steps`` steps.

        Warmup steps ``s < W`` get ``(s + 1) / W``; the decay phase then runs from just below 1
        to ``decay(1.0)`` at the final step ``total_steps - 1``; later steps stay there.
        """
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        warmup = self.warmup_length(total_steps, max(1, steps_per_epoch))
        decay_steps = total_steps - warmup

        def multiplier(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            if decay_steps <= 0:
                return self.decay(1.0)
            progress = min(1.0, (step - warmup + 1) / decay_steps)
            return self.decay(progress)

        return multiplier

    def build(self, optimizer: Optimizer, total_steps: int, steps_per_epoch: int = 1) -> LambdaLR:
        """Return a ``LambdaLR`` over ``optimizer`` following this schedule."""
        from torch.optim.lr_scheduler import LambdaLR

        return LambdaLR(optimizer, self.lr_lambda(total_steps, steps_per_epoch))


@dataclass(frozen=True)
class Preset:
    """A named, released configuration: plain data validated like a user config.

    A released preset never changes meaning; a new behaviour gets a new name.
    """

    kind: str
    description: str
    config: dict[str, Any] = field(default_factory=dict)
