"""``probekit export``: a trained probe as one ONNX graph, checked against PyTorch before it is kept.

The graph reads ``input_ids`` and ``attention_mask`` (``int64``, dynamic batch and sequence axes)
and returns the task's ``scores`` (`probekit.exported.OUTPUT_MEANING`): the backbone up to the
highest hidden state the pooler reads (the blocks above are not in the graph: the forward pass
stops there, as in PyTorch), the pooler and the head, and the task's output activation. Position
ids are derived from the attention mask inside the graph, so left- and right-padded batches read
alike, as `probekit.Probe` reads them.

The export writes into a hidden sibling folder and moves it into place only when complete, after
its check: the ONNX graph, run by ONNX Runtime on texts of varied lengths (one past
``max_length``) padded on either side, must give the PyTorch probe's scores within `TOLERANCE`,
or the export fails with the difference and leaves nothing. ``quantize="int8"`` adds
``model.int8.onnx`` (ONNX Runtime's dynamic quantisation of the weights to int8, per output
channel); its difference from PyTorch is measured and recorded, not held to `TOLERANCE`.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from probekit import jsonio
from probekit.backbone import accepts, capture
from probekit.errors import PluginError, UserError
from probekit.exported import (
    FORMAT,
    FORMAT_VERSION,
    MODEL_FILES,
    OUTPUT_MEANING,
    ExportedProbe,
    manifest_json,
    max_difference,
)
from probekit.hashing import sha256_file
from probekit.probe import Probe
from probekit.training.context import Log

TOLERANCE = 1e-4
"""The largest difference the export's check allows between ONNX Runtime and PyTorch (absolute,
relative above 1: see `probekit.exported.max_difference`)."""

OPSET = 17
"""The ONNX opset the graph is written in (ONNX Runtime 1.14 and later run it)."""

CHECK_TEXTS = (
    "Hi",
    "How do I reset my router password?",
    "Write a short poem about the sea at night, with rhymes.",
    "What is the capital of France?",
    "Explain step by step how vaccines train the immune system, for a ten year old.",
    "ok",
    "Tell me a joke about cats and dogs that is suitable for children at a school assembly.",
    "Summarise the plot of Hamlet in three sentences.",
)
"""Texts of varied lengths the check scores; a text longer than ``max_length`` is added."""


@dataclass(frozen=True)
class ExportResult:
    """What an export wrote and how close it came to PyTorch."""

    folder: Path
    files: dict[str, str]
    max_abs_diff: float
    int8_max_abs_diff: float | None
    seconds: float


class ProbeGraph(nn.Module):
    """The probe as the ONNX graph computes it: token ids and attention mask to the task's scores.

    The backbone's inputs are built without data-dependent Python branches (a traced graph keeps
    only the branch its example took): position ids always come from the attention mask where
    the backbone takes them, as `probekit.Probe` derives them for left-padded rows."""

    def __init__(self, probe: Probe) -> None:
        super().__init__()
        self.probe = probe
        self.task = probe._task()
        backbone = probe.backbone
        self.positions = probe._positions_from_mask
        self.no_cache = getattr(backbone.config, "use_cache", None) is not None and accepts(
            backbone, "use_cache"
        )

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        probe = self.probe
        inputs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self.no_cache:
            inputs["use_cache"] = False
        if self.positions:
            inputs["position_ids"] = (attention_mask.cumsum(dim=-1) - 1).clamp(min=0)
        captured = capture(probe.backbone, probe.layout, probe.layers, inputs)
        dtype = next(probe.head.parameters()).dtype
        hidden = tuple(captured[i].to(dtype) for i in probe.layers)
        pooled = probe.pooler(hidden if probe.pooler_spec.multi_layer else hidden[0], attention_mask)
        scores: Tensor = self.task.scores(probe.head(pooled)).float()
        return scores


def export_onnx(
    run: str | Path,
    out: str | Path,
    *,
    quantize: Literal["int8"] | None = None,
    overwrite: bool = False,
    trust_remote_code: bool = False,
    log: Log = print,
) -> ExportResult:
    """Export the probe of run folder ``run`` to the folder ``out`` (see the module notes).

    Raises:
        UserError: a run that is not exportable (a chat template or token positions, a slow
            tokenizer, a component that declares no export path), a non-empty ``out`` without
            ``overwrite``, or a graph that does not match PyTorch within `TOLERANCE`.
    """
    import time

    from probekit.rundir import RunFolder

    began = time.perf_counter()
    probe = Probe.from_pretrained(run, trust_remote_code=trust_remote_code)
    _exportable(probe, Path(run))
    out_dir = Path(out)
    folder = RunFolder.open(out_dir, overwrite=overwrite, inputs={"RUN": Path(run)}, log=log)
    try:
        partial = folder.create()
        files, worst, int8 = _export(probe, Path(run), partial, quantize, log)
        folder.publish()
    except BaseException:
        folder.abandon(log, keep=False)
        raise
    finally:
        folder.release()
    seconds = time.perf_counter() - began
    return ExportResult(out_dir, files, worst, int8, seconds)


def _exportable(probe: Probe, run: Path) -> None:
    """Refuse what the graph cannot compute, before anything is written."""
    from probekit.registry import POOLERS

    config = probe.probe_config
    data = config.data if config is not None else None
    if data is not None and data.chat is not None:
        raise UserError(
            f"{run}: data.chat: a chat probe renders its inputs with a chat template, which the ONNX "
            "graph does not; export covers probes that read plain text"
        )
    if data is not None and data.positions != "all":
        raise UserError(
            f"{run}: data.positions: this probe reads some token positions only; export covers probes "
            "that read every token (data.positions: all)"
        )
    if not getattr(probe.tokenizer, "is_fast", False):
        raise UserError(
            f"{run}: the backbone's tokenizer is not a fast (tokenizers) one, and an export runs with "
            "tokenizer.json alone"
        )
    specs = [probe.pooler_spec, getattr(probe.pooler_spec, "token_pooler", None), probe.head_spec]
    for spec in specs:
        if spec is None or getattr(type(spec), "exportable", True):
            continue
        family = "pooler" if spec is not probe.head_spec else "head"
        source = POOLERS.entry(spec.kind).source if spec.kind in POOLERS else type(spec).__module__
        raise PluginError(
            f"{family} {spec.kind!r} from {source} has no ONNX export path (its spec says exportable = "
            "False); this probe cannot be exported"
        )


def _export(
    probe: Probe, run: Path, folder: Path, quantize: Literal["int8"] | None, log: Log
) -> tuple[dict[str, str], float, float | None]:
    """Write the export into ``folder`` and check it; return its files' checksums and the largest
    differences from PyTorch (fp32, and int8 when quantised)."""
    probe.eval()
    graph = ProbeGraph(probe).eval()
    tokenizer = probe.tokenizer
    pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
    model_file = folder / MODEL_FILES["fp32"]
    example = _example(probe, pad_id)
    top, blocks = max(probe.layers), probe.layout.num_blocks
    log(
        f"export: tracing {type(probe.backbone).__name__} up to hidden state {top} of {blocks} "
        f"(blocks above it left out), pooler, head"
    )
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # tracer notes on Python values; the check below decides
            torch.onnx.export(
                graph,
                example,
                str(model_file),
                input_names=["input_ids", "attention_mask"],
                output_names=["scores"],
                dynamic_axes={
                    "input_ids": {0: "batch", 1: "tokens"},
                    "attention_mask": {0: "batch", 1: "tokens"},
                    "scores": {0: "batch"},
                },
                opset_version=OPSET,
                dynamo=False,
            )
    except Exception as exc:  # the tracer or the ONNX converter: name the parts, not a traceback
        first = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise UserError(f"{run}: cannot export this probe to ONNX ({_parts(probe)}): {first}") from None
    tokenizer.save_pretrained(str(folder))
    files = {path.name: sha256_file(path) for path in sorted(folder.iterdir()) if path.is_file()}
    if "tokenizer.json" not in files:
        raise UserError(f"{run}: the tokenizer wrote no tokenizer.json; an export needs a fast tokenizer")
    # written now for the check to read, again once the check and the int8 copy add to it
    manifest = _manifest(probe, run, files, pad_id)
    _write_manifest(folder, manifest)

    texts = _check_texts(probe)
    reference = np.asarray(probe.predict_proba(texts, as_array=False), dtype=np.float64)
    exported = ExportedProbe(folder)
    ids = exported.encode(texts)
    worst = 0.0
    sides: tuple[Literal["right", "left"], ...] = ("right", "left")
    for side in sides:
        for batch in (len(ids), 1):
            try:
                got = exported.scores(ids, batch_size=batch, padding_side=side)
            except Exception as exc:  # ONNX Runtime refused the graph on another shape
                first = " ".join(str(exc).split())[:300] or type(exc).__name__
                raise UserError(
                    f"{run}: the ONNX graph fails on the check texts ({side} padding, batch {batch}): "
                    f"{first}; nothing was exported ({_parts(probe)})"
                ) from None
            worst = max(worst, max_difference(reference, got))
    if not worst <= TOLERANCE:
        raise UserError(
            f"{run}: the ONNX graph's scores differ from PyTorch's by {worst:.3g} on the check texts "
            f"(allowed {TOLERANCE:g}); nothing was exported ({_parts(probe)})"
        )
    log(f"export: ONNX Runtime matches PyTorch within {worst:.2g} on {len(texts)} texts, both padding sides")
    int8 = None
    if quantize == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        int8_file = folder / MODEL_FILES["int8"]
        advice = _Drop("pre-processing before quantization")  # its optional shape-inference step
        logging.getLogger().addFilter(advice)
        try:
            # per channel: on MiniLM's safety probe it moved scores by at most 0.2 where per-tensor
            # scales moved them by 0.45 (AUROC 0.003 from fp32 against 0.03; docs/performance.md)
            quantize_dynamic(str(model_file), str(int8_file), weight_type=QuantType.QInt8, per_channel=True)
        finally:
            logging.getLogger().removeFilter(advice)
        files[int8_file.name] = sha256_file(int8_file)  # ``manifest["files"]`` is this dict
        manifest["check"]["max_abs_diff"] = worst
        _write_manifest(folder, manifest)
        int8 = max_difference(reference, ExportedProbe(folder, precision="int8").scores(ids))
        log(f"export: int8 copy differs from PyTorch by at most {int8:.3g} on the check texts")
    manifest["check"].update(max_abs_diff=worst, int8_max_abs_diff=int8)
    _write_manifest(folder, manifest)
    return files, worst, int8


def _write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    """``probe.json`` of the export folder, validated as `ExportedProbe` reads it."""
    (folder / "probe.json").write_text(manifest_json(manifest), encoding="utf-8")


class _Drop(logging.Filter):
    """Drops log records whose message holds ``text``."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def _example(probe: Probe, pad_id: int) -> tuple[Tensor, Tensor]:
    """Two rows, one padded: the traced path is the general one (a mask with zeros)."""
    ids = probe.reader().encode(["How do I reset my router password?", "Hi"]).ids
    width = max(len(row) for row in ids)
    tokens = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for r, row in enumerate(ids):
        tokens[r, : len(row)] = torch.tensor(row)
        mask[r, : len(row)] = 1
    return tokens, mask


def _check_texts(probe: Probe) -> list[str]:
    """`CHECK_TEXTS` and one text past ``max_length`` tokens (truncated alike on both sides)."""
    long = " ".join(CHECK_TEXTS[1:] * (1 + probe.max_length // 8))
    return [*CHECK_TEXTS, long]


def _parts(probe: Probe) -> str:
    """The backbone, pooler and head kinds, with the plugin each came from when not built in."""
    from probekit.registry import HEADS, POOLERS

    def named(spec: Any, registry: Any, family: str) -> str:
        entry = registry.entry(spec.kind) if spec.kind in registry else None
        origin = "" if entry is None or entry.builtin else f" from {entry.source}"
        return f"{family} {spec.kind!r}{origin}"

    inner = getattr(probe.pooler_spec, "token_pooler", None)
    parts = [f"backbone {probe.layout.model_type}", named(probe.pooler_spec, POOLERS, "pooler")]
    if inner is not None:
        parts.append(named(inner, POOLERS, "token pooler"))
    parts.append(named(probe.head_spec, HEADS, "head"))
    return ", ".join(parts)


def _manifest(probe: Probe, run: Path, files: dict[str, str], pad_id: int) -> dict[str, Any]:
    """The export's ``probe.json`` before its check: ``files`` is held, not copied, and the check's
    differences are 0 and None until `_export` measures them."""
    from probekit.checkpoint import read_run

    label_map = read_run(run).meta.label_map
    config = probe.probe_config
    assert config is not None  # a loaded run's probe has its config
    task = probe._task()
    tokenizer = probe.tokenizer
    versions = {"probekit": _version("probekit-lm"), "torch": torch.__version__}
    for package in ("transformers", "onnx", "onnxruntime", "tokenizers"):
        versions[package] = _version(package)
    threshold = probe.threshold
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "task": config.task.model_dump(mode="json"),
        "threshold_rule": config.threshold.model_dump(mode="json"),
        "target": task.target,
        "label_map": dict(label_map),
        "label_names": json.loads(jsonio.dumps(list(probe.label_names))),
        "data": {"text_field": config.data.text_field, "max_text_chars": config.data.max_text_chars},
        "threshold": list(threshold) if isinstance(threshold, Sequence) else float(threshold),
        "max_length": probe.max_length,
        "padding_side": getattr(tokenizer, "padding_side", "right"),
        "truncation_side": getattr(tokenizer, "truncation_side", "right"),
        "pad_id": pad_id,
        "inputs": ["input_ids", "attention_mask"],
        "output": "scores",
        "output_meaning": OUTPUT_MEANING[task.target],
        "files": files,
        "check": {
            "texts": len(CHECK_TEXTS) + 1,
            "padding_sides": ["right", "left"],
            "tolerance": TOLERANCE,
            "max_abs_diff": 0.0,
            "int8_max_abs_diff": None,
        },
        "source": {
            "run": str(run.resolve()),
            "model": config.model.name,
            "pooler": config.pooler.kind,
            "head": config.head.kind,
            "layers": list(probe.layers),
        },
        "versions": versions,
    }


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"
