"""probekit: train probes, classifiers that read a pretrained transformer's hidden states.

Quick use:

```python
import probekit
from transformers import AutoModel

backbone = AutoModel.from_pretrained(path)
probe = probekit.build(probekit.preset("safety8k"), backbone)
logits = probe(input_ids, attention_mask)
```

Built-in components register on import; third-party ones load only when
`probekit.discover` is called.
"""

from __future__ import annotations

from probekit._startup import guard_start_up

guard_start_up()  # only in the `probekit` command's own process, before the imports below

from typing import TYPE_CHECKING, Any

import probekit.builtins  # noqa: F401  (registers the built-in components)
from probekit._lazy import lazy_attributes
from probekit._version import __version__
from probekit.config import (
    ProbeConfig,
    apply_overrides,
    compose_config,
    config_model,
    dump_config,
    json_schema,
    load_config,
    preset,
)
from probekit.registry import (
    FREEZERS,
    HEADS,
    POOLERS,
    PRESETS,
    REGISTRIES,
    SCHEDULERS,
    Entry,
    discover,
    isolated_registries,
)
from probekit.spec import BuildContext

if TYPE_CHECKING:
    from torch import nn

    from probekit.probe import Probe
    from probekit.training import RunResult, train

__all__ = [
    "FREEZERS",
    "HEADS",
    "POOLERS",
    "PRESETS",
    "REGISTRIES",
    "SCHEDULERS",
    "BuildContext",
    "Probe",
    "ProbeConfig",
    "RunResult",
    "__version__",
    "apply_overrides",
    "build",
    "components",
    "compose_config",
    "config_model",
    "discover",
    "dump_config",
    "isolated_registries",
    "json_schema",
    "load_config",
    "preset",
    "train",
]


def build(config: ProbeConfig | dict[str, Any], backbone: nn.Module) -> Probe:
    """Build the `Probe` a config describes on ``backbone``, freezing plan applied.

    ``config`` is a `ProbeConfig` (e.g. from `preset` or `load_config`) or a
    plain mapping, validated first.
    """
    from probekit.probe import Probe

    if not isinstance(config, ProbeConfig):
        config = load_config(config)
    return Probe.from_config(config, backbone)


def components() -> dict[str, list[Entry[Any]]]:
    """Every registered kind per family (``poolers``, ``heads``, ...), with where it came from."""
    return {family: registry.entries() for family, registry in REGISTRIES.items()}


_LAZY = {"Probe": "probekit.probe", "train": "probekit.training", "RunResult": "probekit.training"}
"""Names served on first use: importing probekit imports neither torch nor the training package
(nor transformers, Accelerate, scikit-learn or matplotlib), so that the ``probekit`` command
starts fast and configs validate without them."""


__getattr__ = lazy_attributes("probekit", _LAZY)
