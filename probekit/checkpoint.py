"""Checkpoints: safetensors for the weights training changed, JSON for everything else.

A checkpoint never holds the frozen backbone: ``probe.json`` names the base model (id, revision,
where it was loaded from) and ``probe.safetensors`` holds only the pooler, the head and the
backbone parameters the freezing plan left trainable. Nothing is unpickled on load.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import platform
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from probekit._version import __version__
from probekit.errors import PluginError, UserError

FORMAT = "probekit-checkpoint"
FORMAT_VERSION = 1
WEIGHTS = "probe.safetensors"
META = "probe.json"
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt")
"""Suffixes of pickled checkpoints (PyTorch, Lightning): refused by name, never loaded."""


def trainable_parameters(probe: Any) -> dict[str, torch.nn.Parameter]:
    """The parameters training can change: pooler, head and trainable backbone parameters."""
    return {
        name: param
        for name, param in probe.named_parameters()
        if not name.startswith("backbone.") or name.removeprefix("backbone.") in probe.plan.trainable
    }


def trainable_state(probe: Any, *, keep: bool = True) -> dict[str, torch.Tensor]:
    """Whole CPU copies of `trainable_parameters`. Sharded parameters are gathered one at a time,
    so every process of the run must call it; a process that only takes part in the gathering
    passes ``keep=False`` and gets an empty dict (it never holds more than one whole tensor)."""
    from probekit.distributed import gathered

    return gathered({name: p.detach() for name, p in trainable_parameters(probe).items()}, keep=keep)


def sha256_file(path: Path) -> str:
    """The sha256 hex digest of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def versions() -> dict[str, str]:
    """Versions of probekit and the libraries that shape a checkpoint."""
    found = {"probekit": __version__, "python": platform.python_version(), "torch": torch.__version__}
    for dist in ("transformers", "accelerate", "safetensors", "tokenizers"):
        try:
            found[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def components(config: dict[str, Any]) -> list[dict[str, Any]]:
    """Where each component kind of a config comes from (built-in, or which plugin distribution)."""
    from probekit.config import FAMILY_FIELDS

    found = []
    blocks = [(field, config.get(field, {})) for field in FAMILY_FIELDS]
    token = config.get("pooler", {}).get("token_pooler")
    if isinstance(token, dict):
        blocks.append(("pooler", token))
    for field, block in blocks:
        registry = FAMILY_FIELDS[field]
        kind = block.get("kind")
        if isinstance(kind, str) and kind in registry:
            entry = registry.entry(kind)
            found.append(
                {
                    "family": registry.family,
                    "kind": kind,
                    "source": entry.source,
                    "distribution": entry.distribution,
                }
            )
    return found


def _require_plugins(meta: dict[str, Any], where: Path) -> None:
    """Refuse, naming the package to install, a run whose plugin kinds are not available here."""
    from probekit.registry import REGISTRIES

    by_family = {registry.family: registry for registry in REGISTRIES.values()}
    for component in meta.get("components", []):
        dist, kind = component.get("distribution"), component.get("kind")
        registry = by_family.get(component.get("family", ""))
        if dist is None or registry is None or kind in registry:
            continue
        raise PluginError(
            f"{where}: this run uses the {registry.family} kind {kind!r} from the package {dist}, "
            + _why_missing(registry.unavailable().get(kind), dist, kind)
        )


def _why_missing(reason: str | None, dist: str, kind: str) -> str:
    """Why a recorded plugin kind is not registered: failed, switched off, or not installed."""
    from probekit.registry import ENV_BLOCK, ENV_DISABLE_AUTOLOAD, last_report

    if reason:
        return f"which failed to load: {reason}"
    report = last_report()
    if report is not None and report.disabled:
        return f"but plugin autoload is disabled by {ENV_DISABLE_AUTOLOAD}; unset it to load {dist}"
    if report is not None and any(f":{kind} (" in b or f"({dist} " in b for b in report.blocked):
        return f"which is installed but blocked by {ENV_BLOCK}"
    return f"which is not installed: pip install {dist}"


def save_checkpoint(
    probe: Any,
    folder: Path,
    *,
    config: dict[str, Any],
    label_map: dict[str, int],
    label_names: list[Any],
    threshold: float,
    backbone: dict[str, Any],
    weights: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``probe.safetensors`` and ``probe.json`` into ``folder``; return the JSON's path.
    ``weights``: the probe's `trainable_state`, when already gathered."""
    folder.mkdir(parents=True, exist_ok=True)
    state = trainable_state(probe) if weights is None else weights
    weights_file = folder / WEIGHTS
    save_file(state, str(weights_file), metadata={"format": FORMAT})
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": config,
        "label_map": label_map,
        "label_names": label_names,
        "threshold": threshold,
        "backbone": backbone,
        "components": components(config),
        "weights": {"file": WEIGHTS, "sha256": sha256_file(weights_file), "tensors": len(state)},
        "versions": versions(),
    }
    path = folder / META
    path.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return path


def read_meta(run_dir: str | Path) -> tuple[Path, dict[str, Any]]:
    """Find and read ``probe.json`` in a run folder (or its ``checkpoint`` subfolder)."""
    root = Path(run_dir)
    for folder in (root, root / "checkpoint"):
        if (folder / META).is_file():
            try:
                meta = json.loads((folder / META).read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as exc:
                raise UserError(f"{folder / META}: unreadable checkpoint description: {exc}") from None
            if not isinstance(meta, dict) or meta.get("format") != FORMAT:
                raise UserError(f"{folder / META}: not a probekit checkpoint")
            return folder, meta
    if not root.exists():
        raise UserError(f"{root}: no such run folder")
    if root.is_file():
        kind = "a pickle file" if root.suffix.lower() in PICKLE_SUFFIXES else "a file"
        raise UserError(
            f"{root}: {kind}, not a probekit run folder; probekit never unpickles checkpoints, it "
            f"reads a run folder holding {META} and {WEIGHTS} (safetensors)"
        )
    raise UserError(f"{root}: no {META} here or in {root / 'checkpoint'}; is this a probekit run folder?")


def load_probe(run_dir: str | Path) -> Any:
    """Rebuild the probe of a run: base model from its reference, trained weights from safetensors."""
    from probekit.config import validate
    from probekit.hub import load_backbone
    from probekit.probe import Probe
    from probekit.registry import discover

    folder, meta = read_meta(run_dir)
    discover()
    _require_plugins(meta, folder / META)
    config = validate(meta["config"], label=str(folder / META))
    weights = folder / meta.get("weights", {}).get("file", WEIGHTS)
    if not weights.is_file():
        raise UserError(f"{weights}: missing checkpoint weights")
    expected = meta.get("weights", {}).get("sha256")
    if expected and sha256_file(weights) != expected:
        raise UserError(f"{weights}: checksum does not match {META}; the file is damaged or was replaced")
    loaded = load_backbone(config.model)
    probe = Probe.from_config(config, loaded.model)
    state = load_file(str(weights))
    wanted = trainable_parameters(probe)
    if set(state) != set(wanted):
        missing, extra = sorted(set(wanted) - set(state)), sorted(set(state) - set(wanted))
        raise UserError(
            f"{weights}: tensors do not match the probe (missing {missing[:3]}, unexpected {extra[:3]})"
        )
    with torch.no_grad():
        params = dict(probe.named_parameters())
        for name, tensor in state.items():
            # A one-element tensor may differ in shape only: scalar_mix's scale was 0-dim in
            # earlier checkpoints and is (1,) now.
            single = tensor.numel() == params[name].numel() == 1
            if params[name].shape != tensor.shape and not single:
                raise UserError(
                    f"{weights}: {name} has shape {tuple(tensor.shape)}, expected {tuple(params[name].shape)}"
                )
            params[name].copy_(tensor.reshape(params[name].shape))
    probe.tokenizer = loaded.tokenizer
    probe.max_length = config.model.max_length
    probe.threshold = float(meta["threshold"])
    probe.label_names = list(meta.get("label_names") or [0, 1])
    probe.eval()
    return probe
