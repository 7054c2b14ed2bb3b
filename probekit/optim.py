"""Optimiser spec and parameter groups derived from the freezing plan.

Groups: ``head`` (pooler + head) at ``lr_head`` and ``body`` (trainable backbone parameters) at
``lr_body``, each split into a decayed part and a part without weight decay. Parameters of one
dimension or less (biases, norm weights, scalar-mix weights) never get weight decay.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from probekit.blocks import OptimizerSpec as OptimizerSpec

if TYPE_CHECKING:
    from probekit.probe import Probe


def no_weight_decay(name: str, param: nn.Parameter) -> bool:
    """True for biases, norm weights and other parameters of at most one dimension."""
    return param.ndim <= 1 or name.endswith(".bias")


@dataclass(frozen=True)
class ParamGroup:
    """One optimiser group, with the parameter names it holds (for printing and tests)."""

    name: str
    lr: float
    weight_decay: float
    names: tuple[str, ...]
    params: tuple[nn.Parameter, ...]

    def as_torch(self) -> dict[str, Any]:
        return {
            "params": list(self.params),
            "lr": self.lr,
            "weight_decay": self.weight_decay,
            "name": self.name,
        }


def decay_groups(
    part: str, lr: float, named: Iterable[tuple[str, nn.Parameter]], weight_decay: float
) -> list[ParamGroup]:
    """``named`` parameters as the groups ``{part}/decay`` (at ``weight_decay``) and
    ``{part}/no_decay`` (see `no_weight_decay`), both at ``lr``; an empty group is dropped."""
    named = list(named)
    groups: list[ParamGroup] = []
    for suffix, decay in (("decay", weight_decay), ("no_decay", 0.0)):
        chosen = [(n, p) for n, p in named if no_weight_decay(n, p) == (suffix == "no_decay")]
        if chosen:
            names, params = zip(*chosen, strict=True)
            groups.append(ParamGroup(f"{part}/{suffix}", lr, decay, tuple(names), tuple(params)))
    return groups


def param_groups(probe: Probe, spec: OptimizerSpec) -> list[ParamGroup]:
    """Trainable parameters of ``probe`` split into head/body x decay/no-decay; empty groups dropped.

    Backbone parameters are taken from the probe's freezing plan, so frozen parameters never
    reach the optimiser even if someone flipped ``requires_grad`` by hand.
    """
    trainable_body = probe.plan.trainable
    head = [(f"pooler.{n}", p) for n, p in probe.pooler.named_parameters()] + [
        (f"head.{n}", p) for n, p in probe.head.named_parameters()
    ]
    body = [(f"backbone.{n}", p) for n, p in probe.backbone.named_parameters() if n in trainable_body]
    return decay_groups("head", spec.lr_head, head, spec.weight_decay) + decay_groups(
        "body", spec.lr_body, body, spec.weight_decay
    )


def adamw(groups: Iterable[ParamGroup], spec: OptimizerSpec, *, fused: bool = False) -> torch.optim.AdamW:
    """AdamW over ``groups`` with the spec's betas and eps; ``fused``: torch's one-kernel update
    (see `fused_update`), else its default (a few multi-tensor kernels)."""
    return torch.optim.AdamW(
        [g.as_torch() for g in groups],
        lr=spec.lr_head,
        betas=spec.betas,
        eps=spec.eps,
        fused=True if fused else None,
    )


def fused_update(device: torch.device, precision: str, sharded: bool) -> bool:
    """Whether AdamW runs fused: on CUDA, where one kernel per step reads each trainable value's
    weight, gradient and moments once (the step of billions of trainable values is memory-bound).
    Not with fp16, whose grad scaler counts a skipped step only when the optimiser's own step is
    not called (a fused step is always called and skips inside), nor on sharded parameters."""
    return device.type == "cuda" and precision != "fp16" and not sharded


def build_optimizer(probe: Probe, spec: OptimizerSpec, *, fused: bool = False) -> torch.optim.AdamW:
    """AdamW over `param_groups`."""
    return adamw(param_groups(probe, spec), spec, fused=fused)
