"""An exported probe (`probekit export`): ONNX Runtime and the tokenizer, no torch.

An export folder holds ``model.onnx`` (token ids and attention mask in, the task's scores out:
see `OUTPUT_MEANING`), optionally ``model.int8.onnx`` (dynamically quantised weights), the
tokenizer's files (``tokenizer.json`` is what is read here) and ``probe.json``, the manifest:
task, labels, threshold, how texts are tokenised and padded, the files' SHA-256 and the export's
own check against PyTorch. An export folder is untrusted input like a run folder: the manifest is
validated whole, the files it names must lie inside the folder and match their checksums.

`ExportedProbe` reads one and answers as `probekit.Probe` does (``predict``, ``predict_proba``
with the same shapes and dicts); this module imports neither torch nor transformers, only
``onnxruntime``, ``tokenizers`` and numpy (`tests/test_export.py` runs it with torch blocked).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from probekit.errors import UserError
from probekit.hashing import sha256_file

FORMAT = "probekit-onnx"
"""``probe.json``'s ``format`` in an export folder (a run's says ``probekit-checkpoint``)."""

FORMAT_VERSION = 1

MODEL_FILES = {"fp32": "model.onnx", "int8": "model.int8.onnx"}
"""The graph file of each precision an export may hold."""

OUTPUT_MEANING = {
    "binary": "the positive class's probability per text: (rows,)",
    "multiclass": "every class's probability per text, by class index: (rows, classes)",
    "multilabel": "every label's probability per text, by label index: (rows, labels)",
    "regression": "the predicted value per text: (rows,)",
}
"""What the graph's ``scores`` output holds, per task target."""


class ExportCheck(BaseModel):
    """What the export compared with PyTorch before it finished."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    texts: int = Field(ge=1)
    padding_sides: list[Literal["left", "right"]]
    tolerance: float = Field(gt=0)
    max_abs_diff: float = Field(ge=0)
    int8_max_abs_diff: float | None = Field(default=None, ge=0)


class ExportManifest(BaseModel):
    """``probe.json`` of an export folder, validated whole before anything else is read."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    format: Literal["probekit-onnx"]
    format_version: Literal[1]
    task: dict[str, Any]
    """The task spec as the run's config held it (``kind`` and its settings)."""
    threshold_rule: dict[str, Any]
    """The run's ``threshold`` block (how the threshold was chosen)."""
    target: Literal["binary", "multiclass", "multilabel", "regression"]
    label_map: dict[str, int]
    label_names: list[Any]
    data: dict[str, Any]
    """What reading inputs needs of the run's ``data`` block: ``text_field``, ``max_text_chars``."""
    threshold: float | list[float]
    max_length: int = Field(ge=1, le=1_000_000)
    padding_side: Literal["left", "right"]
    truncation_side: Literal["left", "right"]
    pad_id: int = Field(ge=0)
    inputs: list[Literal["input_ids", "attention_mask"]]
    output: Literal["scores"]
    output_meaning: str
    files: dict[str, str]
    """File name -> SHA-256 of every file the export wrote (graphs and tokenizer files)."""
    check: ExportCheck
    source: dict[str, Any]
    """Where the probe came from: the run folder, the backbone, the pooler and head kinds."""
    versions: dict[str, str]


def is_export(folder: str | Path) -> bool:
    """Whether ``folder`` holds an export's ``probe.json`` (not a run's)."""
    path = Path(folder) / "probe.json"
    try:
        if not path.is_file() or path.stat().st_size > 16 << 20:
            return False
        return bool(json.loads(path.read_text(encoding="utf-8")).get("format") == FORMAT)
    except (OSError, ValueError, AttributeError):
        return False


def read_manifest(folder: str | Path) -> ExportManifest:
    """The validated ``probe.json`` of an export folder, its files checked against their sums.

    Raises:
        UserError: a missing or damaged folder, manifest or file, in one line naming it.
    """
    root = Path(folder)
    path = root / "probe.json"
    if not root.is_dir():
        raise UserError(f"{root}: no such file or folder")
    try:
        if path.stat().st_size > 16 << 20:
            raise UserError(f"{path}: larger than 16 MiB; not an export's probe.json")
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(
            f"{path}: no such file; not an export folder (write one with probekit export)"
        ) from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise UserError(f"{path}: not readable JSON ({' '.join(str(exc).split())[:200]})") from None
    try:
        manifest = ExportManifest.model_validate(raw)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"]) or "(top level)"
        raise UserError(f"{path}: {where}: {error['msg']}") from None
    real = root.resolve()
    for name, expected in manifest.files.items():
        file = (root / name).resolve()
        if file.parent != real or name in ("", ".", ".."):
            raise UserError(f"{path}: files: {name!r} is not a file of the export folder; refused")
        if not file.is_file():
            raise UserError(f"{root / name}: missing (probe.json lists it)")
        if sha256_file(file) != expected:
            raise UserError(f"{root / name}: its SHA-256 does not match probe.json; the file was changed")
    if MODEL_FILES["fp32"] not in manifest.files or "tokenizer.json" not in manifest.files:
        raise UserError(f"{path}: files: an export holds model.onnx and tokenizer.json")
    return manifest


class ExportedProbe:
    """A probe read from an export folder, run by ONNX Runtime; answers as `probekit.Probe` does.

    Args:
        folder: the export folder (`probekit export RUN --out DIR`).
        precision: ``fp32`` (``model.onnx``) or ``int8`` (``model.int8.onnx``, when the export
            was quantised).
        threads: ONNX Runtime's intra-op threads (default: its own choice, all cores).
        manifest: what `read_manifest` returned for ``folder`` just before, so its files are not
            hashed twice.
    """

    def __init__(
        self,
        folder: str | Path,
        *,
        precision: Literal["fp32", "int8"] = "fp32",
        threads: int | None = None,
        manifest: ExportManifest | None = None,
    ) -> None:
        import onnxruntime as ort
        from tokenizers import Tokenizer

        from probekit.config import ThresholdSpec
        from probekit.registry import TASKS

        self.folder = Path(folder)
        self.manifest = manifest = read_manifest(self.folder) if manifest is None else manifest
        graph = MODEL_FILES[precision]
        if graph not in manifest.files:
            raise UserError(f"{self.folder}: has no {graph}; export it with --quantize int8 for int8")
        self.precision = precision
        try:
            spec = TASKS.get(str(manifest.task.get("kind"))).model_validate(manifest.task)
            rule = ThresholdSpec.model_validate(manifest.threshold_rule)
            self.task = spec.build(rule).bind(
                [name for name, _ in sorted(manifest.label_map.items(), key=lambda kv: kv[1])]
            )
        except (UserError, ValidationError, ValueError) as exc:
            first = " ".join(str(exc).split())[:300]
            raise UserError(f"{self.folder / 'probe.json'}: task: {first}") from None
        self.label_names = list(manifest.label_names)
        self.threshold = manifest.threshold
        self.max_length = manifest.max_length
        self.padding_side = manifest.padding_side
        self.pad_id = manifest.pad_id
        self.tokenizer = Tokenizer.from_file(str(self.folder / "tokenizer.json"))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(manifest.max_length, direction=manifest.truncation_side)
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(
            str(self.folder / graph), options, providers=["CPUExecutionProvider"]
        )

    def __repr__(self) -> str:
        target = self.manifest.target
        return f"ExportedProbe({str(self.folder)!r}, precision={self.precision!r}, task={target!r})"

    # -- the one inference path -------------------------------------------------------------------
    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, special tokens added, truncated to ``max_length``."""
        return [encoding.ids for encoding in self.tokenizer.encode_batch(list(texts))]

    def scores(
        self,
        ids: Sequence[Sequence[int]],
        batch_size: int = 64,
        max_tokens: int | None = 4096,
        padding_side: Literal["left", "right"] | None = None,
    ) -> np.ndarray:
        """The graph's scores of token-id rows, in row order: batches of rows sorted by length,
        at most ``batch_size`` rows and ``max_tokens`` padded tokens each (one row at least)."""
        side = padding_side or self.padding_side
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        parts: list[tuple[list[int], np.ndarray]] = []
        start = 0
        while start < len(order):
            end = start + 1
            while end < len(order) and end - start < batch_size:
                if max_tokens is not None and (end - start + 1) * len(ids[order[end]]) > max_tokens:
                    break
                end += 1
            rows = order[start:end]
            width = max(len(ids[i]) for i in rows)
            tokens = np.full((len(rows), width), self.pad_id, dtype=np.int64)
            mask = np.zeros((len(rows), width), dtype=np.int64)
            for r, i in enumerate(rows):
                n = len(ids[i])
                span = slice(width - n, width) if side == "left" else slice(0, n)
                tokens[r, span] = ids[i]
                mask[r, span] = 1
            (out,) = self.session.run(["scores"], {"input_ids": tokens, "attention_mask": mask})
            parts.append((rows, np.asarray(out, dtype=np.float64)))
            start = end
        if not parts:
            return np.zeros((0, *self._trailing()), dtype=np.float64)
        result = np.zeros((len(ids), *parts[0][1].shape[1:]), dtype=np.float64)
        for rows, out in parts:
            result[rows] = out
        return result

    def _trailing(self) -> tuple[int, ...]:
        if self.manifest.target in ("binary", "regression"):
            return ()
        return (len(self.label_names),)

    def predict_proba(
        self,
        texts: str | Sequence[str],
        batch_size: int = 64,
        max_tokens: int | None = 4096,
        *,
        as_array: bool = False,
    ) -> Any:
        """As `probekit.Probe.predict_proba`: one score for one string, a list for a sequence, or
        with ``as_array=True`` scikit-learn's ``predict_proba`` shape."""
        from probekit.data import check_texts

        items, single = check_texts(texts)
        values = self.scores(self.encode(items), batch_size, max_tokens)
        if as_array:
            return self.task.probability_matrix(values)
        listed: list[Any] = values.tolist()
        return listed[0] if single else listed

    def predict(
        self, texts: str | Sequence[str], batch_size: int = 64, max_tokens: int | None = 4096
    ) -> dict[str, Any] | list[dict[str, Any]]:
        """As `probekit.Probe.predict`: one dict per text (label, probabilities...)."""
        from probekit.data import check_texts

        items, single = check_texts(texts)
        probs = self.predict_proba(items, batch_size, max_tokens)
        rows = self.task.predictions(items, probs, self.threshold, self.label_names)
        return rows[0] if single else rows


def max_difference(reference: np.ndarray, other: np.ndarray) -> float:
    """The largest ``|reference - other|``, relative to the value where it exceeds 1 (a regression
    probe's values may be large); ``inf`` when the shapes differ or a value is not finite."""
    a, b = np.asarray(reference, dtype=np.float64), np.asarray(other, dtype=np.float64)
    if a.shape != b.shape:
        return math.inf
    if a.size == 0:
        return 0.0
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return math.inf
    return float(np.max(np.abs(a - b) / np.maximum(1.0, np.abs(a))))


def default_threads() -> int | None:
    """``PROBEKIT_ONNX_THREADS`` as an int, else None (ONNX Runtime's default)."""
    value = os.environ.get("PROBEKIT_ONNX_THREADS")
    return int(value) if value and value.isdigit() and int(value) > 0 else None


def manifest_json(manifest: Mapping[str, Any]) -> str:
    """The manifest as ``probe.json`` holds it (validated first)."""
    return ExportManifest.model_validate(manifest).model_dump_json(indent=2) + "\n"
