"""Optimiser parameter groups follow the freezing plan: head/body x decay/no_decay."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import probekit
from probekit.freezers import BottomFreezeSpec
from probekit.heads import LinearHeadSpec
from probekit.optim import OptimizerSpec, ParamGroup, build_optimizer, param_groups
from probekit.poolers import MaskedMeanSpec, MultiLayerSpec
from probekit.probe import Probe
from tests.backbones import make_backbone, make_batch

Factory = Callable[..., Any]
GROUP_NAMES = ["head/decay", "head/no_decay", "body/decay", "body/no_decay"]
OPTIM_FAMILIES = ["bert", "distilbert", "gpt2", "llama", "gemma"]


def _safety8k(family: str, num_layers: int = 8) -> Probe:
    return probekit.build(probekit.preset("safety8k"), make_backbone(family, num_layers, 16))


@pytest.fixture(scope="module", params=OPTIM_FAMILIES)
def probe(request: pytest.FixtureRequest) -> Probe:
    return _safety8k(request.param)


@pytest.fixture(scope="module")
def groups(probe: Probe) -> dict[str, ParamGroup]:
    result = param_groups(probe, probekit.preset("safety8k").optimizer)
    return {g.name: g for g in result}


def _norm_weights(module: nn.Module, prefix: str) -> set[str]:
    """Names of the weights of every LayerNorm / RMSNorm-like module under ``module``."""
    names = set()
    for name, sub in module.named_modules():
        if isinstance(sub, nn.LayerNorm) or "norm" in type(sub).__name__.lower():
            for pname, _ in sub.named_parameters(recurse=False):
                names.add(f"{prefix}{name}.{pname}" if name else f"{prefix}{pname}")
    return names


def test_safety8k_optimizer_spec() -> None:
    spec = probekit.preset("safety8k").optimizer
    assert spec == OptimizerSpec(lr_head=2e-4, lr_body=2e-5, weight_decay=0.1)


def test_groups_have_the_preset_rates(probe: Probe) -> None:
    groups = param_groups(probe, probekit.preset("safety8k").optimizer)
    assert [g.name for g in groups] == GROUP_NAMES
    for g in groups:
        part, decay = g.name.split("/")
        assert g.lr == (2e-4 if part == "head" else 2e-5)
        assert g.weight_decay == (0.1 if decay == "decay" else 0.0)
        assert len(g.names) == len(g.params) > 0
        assert all(name.startswith("head." if part == "head" else "backbone.") for name in g.names)


def test_groups_name_their_parameters(probe: Probe, groups: dict[str, ParamGroup]) -> None:
    named = dict(probe.named_parameters())
    for g in groups.values():
        for name, param in zip(g.names, g.params, strict=True):
            assert named[name] is param


def test_no_frozen_parameter_in_any_group(probe: Probe, groups: dict[str, ParamGroup]) -> None:
    frozen = {id(p) for n, p in probe.backbone.named_parameters() if n in probe.plan.frozen}
    assert frozen  # safety8k freezes something on 8 blocks
    for g in groups.values():
        assert all(p.requires_grad for p in g.params)
        assert not frozen.intersection(id(p) for p in g.params)
        assert not {f"backbone.{n}" for n in probe.plan.frozen}.intersection(g.names)


def test_every_trainable_parameter_in_exactly_one_group(probe: Probe, groups: dict[str, ParamGroup]) -> None:
    seen: dict[int, int] = {}
    for g in groups.values():
        for p in g.params:
            seen[id(p)] = seen.get(id(p), 0) + 1
    trainable = {id(p) for p in probe.parameters() if p.requires_grad}
    assert set(seen) == trainable
    assert set(seen.values()) == {1}
    body = {f"backbone.{n}" for n in probe.plan.trainable}
    assert set(groups["body/decay"].names) | set(groups["body/no_decay"].names) == body
    head = {n for n, _ in probe.named_parameters() if n.startswith(("head.", "pooler."))}
    assert set(groups["head/decay"].names) | set(groups["head/no_decay"].names) == head


def test_biases_and_norm_weights_get_no_decay(probe: Probe, groups: dict[str, ParamGroup]) -> None:
    no_decay = set(groups["head/no_decay"].names) | set(groups["body/no_decay"].names)
    decay = set(groups["head/decay"].names) | set(groups["body/decay"].names)
    trainable = {n for n, p in probe.named_parameters() if p.requires_grad}
    biases = {n for n in trainable if n.endswith(".bias")}
    norms = _norm_weights(probe, "") & trainable
    assert "head.0.weight" in norms  # the LayerNorm of the safety8k head
    assert norms - {"head.0.weight"}  # and norms of the trainable blocks
    assert biases | norms <= no_decay
    assert not (biases | norms) & decay
    # matrices decay
    matrices = {n for n, p in probe.named_parameters() if p.requires_grad and p.ndim >= 2}
    assert matrices == decay
    assert {"head.1.weight", "head.4.weight"} <= decay


def test_hand_flipped_requires_grad_does_not_leak_into_groups() -> None:
    probe = _safety8k("llama", 8)
    frozen_name = next(iter(sorted(probe.plan.frozen)))
    dict(probe.backbone.named_parameters())[frozen_name].requires_grad_(True)
    names = {n for g in param_groups(probe, OptimizerSpec()) for n in g.names}
    assert f"backbone.{frozen_name}" not in names


def test_fully_frozen_backbone_has_only_head_groups(backbone_factory: Factory) -> None:
    probe = probekit.build(
        {"freezer": {"kind": "all"}, "head": {"kind": "mlp"}}, backbone_factory("bert", 2, 16, fresh=True)
    )
    groups = param_groups(probe, OptimizerSpec())
    assert [g.name for g in groups] == ["head/decay", "head/no_decay"]


def test_scalar_mix_weights_get_no_decay(backbone_factory: Factory) -> None:
    backbone = backbone_factory("gpt2", 3, 16, fresh=True)
    probe = Probe(backbone, MultiLayerSpec(combine="scalar_mix"), LinearHeadSpec())
    groups = {g.name: g for g in param_groups(probe, OptimizerSpec(lr_head=1e-3))}
    assert {"pooler.mix_logits", "pooler.mix_scale"} <= set(groups["head/no_decay"].names)
    assert groups["head/no_decay"].lr == 1e-3


@settings(max_examples=10)
@given(
    family=st.sampled_from(OPTIM_FAMILIES),
    num_layers=st.integers(1, 5),
    count=st.integers(0, 5),
    lr_head=st.floats(1e-6, 1.0),
    lr_body=st.floats(1e-6, 1.0),
    weight_decay=st.floats(0.0, 1.0),
)
def test_groups_partition_trainable_parameters(
    family: str, num_layers: int, count: int, lr_head: float, lr_body: float, weight_decay: float
) -> None:
    backbone = make_backbone(family, num_layers, 16)
    probe = Probe(
        backbone, MaskedMeanSpec(), LinearHeadSpec(), BottomFreezeSpec(count=min(count, num_layers))
    )
    spec = OptimizerSpec(lr_head=lr_head, lr_body=lr_body, weight_decay=weight_decay)
    groups = param_groups(probe, spec)
    all_names = [n for g in groups for n in g.names]
    assert len(all_names) == len(set(all_names))
    assert set(all_names) == {n for n, p in probe.named_parameters() if p.requires_grad}
    for g in groups:
        assert g.params  # empty groups are dropped
        assert g.lr == (lr_head if g.name.startswith("head/") else lr_body)
        assert g.weight_decay == (weight_decay if g.name.endswith("/decay") else 0.0)


# -- build_optimizer -------------------------------------------------------------------------------
def test_build_optimizer_is_adamw_with_the_groups(probe: Probe, groups: dict[str, ParamGroup]) -> None:
    spec = probekit.preset("safety8k").optimizer
    optimizer = build_optimizer(probe, spec)
    assert type(optimizer) is torch.optim.AdamW
    assert [g["name"] for g in optimizer.param_groups] == GROUP_NAMES
    for torch_group in optimizer.param_groups:
        ours = groups[torch_group["name"]]
        assert torch_group["lr"] == ours.lr
        assert torch_group["weight_decay"] == ours.weight_decay
        assert [id(p) for p in torch_group["params"]] == [id(p) for p in ours.params]
        assert torch_group["betas"] == spec.betas
        assert torch_group["eps"] == spec.eps


def test_one_step_changes_only_trainable_parameters() -> None:
    torch.manual_seed(0)
    probe = _safety8k("llama", 8)  # frozen 0-4 and embeddings, trainable 5-7 and the final norm
    assert probe.plan.frozen_blocks == (0, 1, 2, 3, 4)
    optimizer = build_optimizer(probe, probekit.preset("safety8k").optimizer)
    before = {n: p.detach().clone() for n, p in probe.named_parameters()}
    ids, mask = make_batch(batch=4, tokens=6)
    labels = torch.tensor([0, 1, 0, 1])
    probe.train()
    loss = nn.functional.cross_entropy(probe(ids, mask), labels)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    trainable = {n for n, p in probe.named_parameters() if p.requires_grad}
    assert trainable == {f"backbone.{n}" for n in probe.plan.trainable} | {
        n for n, _ in probe.named_parameters() if n.startswith("head.")
    }
    for name, param in probe.named_parameters():
        if name in trainable:
            assert not torch.equal(param, before[name]), f"{name} did not move"
        else:
            assert torch.equal(param, before[name]), f"frozen {name} changed"
            assert param.grad is None


def test_adamw_is_fused_on_cuda_except_under_fp16_or_sharding() -> None:
    from probekit.optim import fused_update

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert fused_update(cuda, "bf16", sharded=False) and fused_update(cuda, "fp32", sharded=False)
    assert not fused_update(cuda, "fp16", sharded=False)  # the grad scaler counts skipped steps
    assert not fused_update(cuda, "bf16", sharded=True)
    assert not fused_update(cpu, "fp32", sharded=False)  # CPU runs keep their numbers
