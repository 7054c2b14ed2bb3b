"""The frozen-prefix activation cache: run frozen blocks once per example, not once per epoch.

When the embeddings and the bottom ``k`` blocks are frozen they are deterministic (probekit keeps
frozen modules in eval mode, so no dropout), and their output for an example never changes. The
trainer then computes it once and trains from it:

* ``prefix``: some pooled layers lie above the frozen prefix. The hidden state at its top (the
  input of the first trainable block), plus any pooled layer below it, is stored per token; each
  step replays the prefix from the cache and runs only the trainable blocks.
* ``layers``: every pooled layer lies inside the frozen prefix but the pooler has parameters
  (an attention pooler): the pooled layers are stored per token; each step runs pooler and head.
* ``pooled``: everything the pooler reads is frozen and the pooler has no parameters: the pooled
  features are stored, one vector per example; an epoch costs only the head.

Storage is host memory when the cache fits ``train.cache.max_memory_gb``, a memory-mapped file
otherwise (in ``train.cache.dir``, or a temporary folder removed after the run). With
``train.cache.dir`` set, caches persist there under a key made of everything their values depend
on (model, revision, configuration and a fingerprint of the frozen weights, the cached layers or
pooler, dtype and precision, tokenizer settings and the token ids of every row), so a later run
reuses a matching cache and can never read a stale one.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from probekit.blocks import CacheSpec as CacheSpec

if TYPE_CHECKING:
    from probekit.distributed import Group
    from probekit.probe import Probe

CACHE_FORMAT = 1
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# -- what to cache -----------------------------------------------------------------------------
@dataclass(frozen=True)
class CachePlan:
    """What the cache holds for a probe, and how training reads it."""

    mode: Literal["prefix", "layers", "pooled"]
    layers: tuple[int, ...]
    """Hidden-state indices stored per token (``pooled``: the layers the features pool)."""
    boundary: int
    """``prefix`` mode: blocks ``0 .. boundary-1`` are replayed from the cache; otherwise 0."""

    def describe(self) -> str:
        if self.mode == "pooled":
            return f"pooled features of hidden states {list(self.layers)}; each epoch runs only the head"
        if self.mode == "layers":
            return f"hidden states {list(self.layers)} per token; each epoch runs only the pooler and head"
        return (
            f"hidden states {list(self.layers)} per token; blocks 0-{self.boundary - 1} run once, "
            "each epoch runs only the blocks above them"
        )


def frozen_prefix(probe: Probe) -> int:
    """How many bottom blocks are frozen together with the embeddings (0 if the embeddings train)."""
    plan = probe.plan
    if not plan.embeddings_frozen:
        return 0
    frozen = set(plan.frozen_blocks)
    count = 0
    while count < plan.num_blocks and count in frozen:
        count += 1
    return count


def is_static(module: nn.Module) -> bool:
    """True when ``module`` computes a fixed function: no parameters and no active dropout (its
    output for an input can be computed once and reused)."""
    return not any(True for _ in module.parameters()) and not any(
        isinstance(m, nn.Dropout) and m.p > 0 for m in module.modules()
    )


def plan_cache(probe: Probe, *, pooled: bool = True) -> tuple[CachePlan | None, str]:
    """The cache plan for ``probe``, or None with the reason there is nothing to cache;
    ``pooled=False`` (token-level training reads every token) keeps per-token states instead
    of pooled features."""
    prefix = frozen_prefix(probe)
    if prefix == 0:
        what = "block 0 trains" if probe.plan.embeddings_frozen else "the embeddings train"
        return None, f"no frozen prefix ({what})"
    layout = probe.layout
    top = max(probe.layers)
    reach = min(prefix, top)
    if top == layout.num_blocks:
        # The last hidden state is the model's output (after the final norm of decoders): it is
        # cacheable only when that norm is frozen too.
        outside = any(
            layout.block_of(name) is None and not layout.is_embedding(name) for name in probe.plan.trainable
        )
        if outside or prefix < layout.num_blocks:
            reach = min(prefix, layout.num_blocks - 1)
    if reach >= top:
        mode: Literal["pooled", "layers"] = "pooled" if pooled and is_static(probe.pooler) else "layers"
        return CachePlan(mode, probe.layers, 0), "every pooled layer is frozen"
    layers = tuple(sorted({reach, *(i for i in probe.layers if i < reach)}))
    return CachePlan("prefix", layers, reach), f"blocks 0-{reach - 1} and the embeddings are frozen"


def storage_dtype(spec: CacheSpec, precision: str) -> torch.dtype:
    """The dtype cached values are stored in: the spec's, or the frozen blocks' compute dtype."""
    if spec.dtype != "auto":
        return DTYPES[spec.dtype]
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)


# -- the key -----------------------------------------------------------------------------------
def weights_fingerprint(module: nn.Module, names: Iterable[str]) -> str:
    """A hash of the named parameters' shapes, dtypes and an evenly spaced sample of their values
    (sharded parameters are gathered one at a time: every process must call it)."""
    from probekit.distributed import full

    params = dict(module.named_parameters())
    digest = hashlib.sha256()
    for name in sorted(names):
        tensor = full(params[name].detach())
        flat = tensor.reshape(-1)
        step = max(1, flat.numel() // 4096)
        sample = flat[::step][:4096].float().cpu().numpy()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        digest.update(sample.tobytes())
    return digest.hexdigest()


def tokens_fingerprint(rows: Sequence[Sequence[int]]) -> str:
    """A hash of the token ids of every row, in order."""
    digest = hashlib.sha256()
    lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    digest.update(lengths.tobytes())
    for row in rows:
        digest.update(np.asarray(row, dtype=np.int64).tobytes())
    return digest.hexdigest()


def cache_facts(
    probe: Probe,
    plan: CachePlan,
    *,
    model: Mapping[str, Any],
    tokenizer: Mapping[str, Any],
    dtype: torch.dtype,
    precision: str,
) -> dict[str, Any]:
    """What every split's cached values depend on apart from its rows (computed once per run:
    the frozen-weights fingerprint reads every frozen tensor)."""
    from transformers import __version__ as transformers_version

    config = getattr(probe.backbone, "config", None)
    config_dict = config.to_dict() if config is not None and hasattr(config, "to_dict") else {}
    config_dict = {k: v for k, v in config_dict.items() if k not in {"_name_or_path", "transformers_version"}}
    return {
        "format": CACHE_FORMAT,
        "model": dict(model),
        "model_config": config_dict,
        "frozen_weights": weights_fingerprint(probe.backbone, probe.plan.frozen),
        "mode": plan.mode,
        "layers": list(plan.layers),
        "pooler": probe.pooler_spec.model_dump(mode="json") if plan.mode == "pooled" else None,
        "dtype": str(dtype),
        "precision": precision,
        "tokenizer": dict(tokenizer),
        "transformers": transformers_version,
    }


def cache_key(
    facts: Mapping[str, Any], rows: Sequence[Sequence[int]], reads: Sequence[Sequence[int]] | None = None
) -> tuple[str, dict[str, Any]]:
    """The key of one split's cache: `cache_facts` plus the token ids of its rows (and, for pooled
    features, which tokens the pooler read); also returns the facts it hashes (kept in the
    cache's metadata)."""
    parts = {**facts, "tokens": tokens_fingerprint(rows), "rows": len(rows)}
    if reads is not None and facts.get("mode") == "pooled":
        parts["reads"] = tokens_fingerprint(reads)
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest(), parts


# -- storage -----------------------------------------------------------------------------------
_DATA = "activations.bin"
_META = "cache.json"


@dataclass
class SplitCache:
    """Cached activations of one split, indexed by row.

    Per-token modes hold one buffer ``(total_tokens, len(layers), hidden)`` with the real tokens
    of every row back to back (no padding is stored) and ``offsets`` into it; ``pooled`` mode holds
    ``(rows, features)``.
    """

    plan: CachePlan
    data: Tensor
    offsets: list[int]
    location: str
    """``memory``, a cache folder, or a temporary folder (then removed by `close`)."""
    reused: bool = False
    _temporary: Path | None = field(default=None, repr=False)

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    def batch(self, indices: Sequence[int], width: int, left: bool) -> Tensor:
        """``pooled``: features ``(b, d)``; otherwise ``(b, width, len(layers), hidden)``, each row
        padded with zeros on the side the token ids are padded on."""
        if self.plan.mode == "pooled":
            return self.data[torch.as_tensor(list(indices), dtype=torch.long)]
        out = self.data.new_zeros((len(indices), width, *self.data.shape[1:]))
        for b, i in enumerate(indices):
            start, end = self.offsets[i], self.offsets[i + 1]
            length = end - start
            cols = slice(width - length, width) if left else slice(0, length)
            out[b, cols] = self.data[start:end]
        return out

    def close(self) -> None:
        """Release the buffer; a temporary memory-mapped file is deleted."""
        self.data = torch.empty(0)
        if self._temporary is not None:
            shutil.rmtree(self._temporary, ignore_errors=True)
            self._temporary = None


def _mapped(path: Path, shape: tuple[int, ...], dtype: torch.dtype, *, create: bool) -> Tensor:
    numel = math.prod(shape)
    size = numel * torch.empty((), dtype=dtype).element_size()
    if create:
        with path.open("wb") as handle:
            handle.truncate(size)
    elif path.stat().st_size != size:
        raise ValueError(f"{path}: {path.stat().st_size} bytes, expected {size}")
    return torch.from_file(str(path), shared=True, size=numel, dtype=dtype).view(shape)


def _load(folder: Path, key: str) -> SplitCache | None:
    """A complete cache in ``folder`` with this exact key, or None."""
    try:
        meta = json.loads((folder / _META).read_text(encoding="utf-8"))
        if meta.get("key") != key or meta.get("format") != CACHE_FORMAT:
            return None
        plan = CachePlan(meta["mode"], tuple(meta["layers"]), int(meta["boundary"]))
        data = _mapped(folder / _DATA, tuple(meta["shape"]), DTYPES[meta["dtype"]], create=False)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return SplitCache(plan, data, list(meta["offsets"]), str(folder), reused=True)


ComputeBatch = Callable[[Sequence[int]], Tensor]
"""Rows -> activations ``(b, width, len(layers), hidden)`` (right-padded) or features ``(b, d)``."""


def build_split_cache(
    plan: CachePlan,
    lengths: Sequence[int],
    batches: Iterable[Sequence[int]],
    compute: ComputeBatch,
    *,
    width: int,
    dtype: torch.dtype,
    spec: CacheSpec,
    key: str,
    facts: Mapping[str, Any],
    name: str,
    group: Group | None = None,
) -> SplitCache:
    """Fill (or reuse) the cache of one split.

    Args:
        plan: what to store.
        lengths: tokens per row.
        batches: row indices in the order to compute them (longest first is fastest).
        compute: the frozen forward pass for a batch of rows, right-padded.
        width: hidden size (per-token modes) or feature width (``pooled``).
        dtype: storage dtype.
        spec: storage settings.
        key: the cache key (see `cache_key`); the folder name when ``spec.dir`` is set.
        facts: what the key hashes, written to the cache's metadata.
        name: the split name, for the folder name.
        group: the processes of a multi-process run. ``batches`` is then this process's share;
            the shares are merged so every process holds every row. Only the main process
            writes to ``spec.dir``; the others keep their copy in memory or a temporary file.
    """
    sharded = group is not None and group.active
    main = group is None or group.is_main
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)
    if plan.mode == "pooled":
        shape: tuple[int, ...] = (len(lengths), width)
    else:
        shape = (offsets[-1], len(plan.layers), width)
    size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    temporary: Path | None = None
    final: Path | None = None
    if spec.dir is not None:
        root = Path(spec.dir).expanduser()
        final = root / f"{name}-{key[:24]}"
        found = _load(final, key)
        if sharded and group is not None and group.max_flags(int(found is None))[0]:
            if found is not None:  # another process must build it: build it together
                found.close()
            found = None
        if found is not None:
            return found
    persistent = final is not None and main
    folder: Path | None
    if persistent and final is not None:
        final.parent.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
    elif size > spec.max_memory_gb * 1024**3:
        folder = temporary = Path(tempfile.mkdtemp(prefix="probekit-cache-"))
    else:
        folder = None
    try:
        data = (
            _mapped(folder / _DATA, shape, dtype, create=True)
            if folder is not None
            else (torch.zeros if sharded else torch.empty)(shape, dtype=dtype)
        )
        for rows in batches:
            values = compute(rows).to("cpu", dtype)
            if plan.mode == "pooled":
                data[torch.as_tensor(list(rows), dtype=torch.long)] = values
                continue
            for b, i in enumerate(rows):
                data[offsets[i] : offsets[i + 1]] = values[b, : lengths[i]]
        if sharded and group is not None:
            group.merge(data)  # each process filled its rows; zeros elsewhere
        if not persistent or final is None or folder is None:
            location = "memory" if folder is None else f"{folder} (temporary)"
            return SplitCache(plan, data, offsets, location, _temporary=temporary)
        meta = {
            "format": CACHE_FORMAT,
            "key": key,
            "mode": plan.mode,
            "layers": list(plan.layers),
            "boundary": plan.boundary,
            "shape": list(shape),
            "dtype": next(k for k, v in DTYPES.items() if v == dtype),
            "offsets": offsets,
            "facts": dict(facts),
        }
        (folder / _META).write_text(json.dumps(meta, default=str), encoding="utf-8")
        del data
        if final.exists():  # an incomplete or different-key leftover under our name
            shutil.rmtree(final, ignore_errors=True)
        folder.replace(final)
        folder = None
        loaded = _load(final, key)
        if loaded is None:
            raise OSError(f"{final}: the cache just written cannot be read back")
        loaded.reused = False
        return loaded
    except BaseException:
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
        raise
