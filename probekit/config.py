"""The top-level config: one discriminated union per family, assembled from the registries.

`config_model` builds the pydantic model after built-ins (and, when `discover` ran,
plugins) are registered, so a plugin's spec validates, dumps with all its fields and appears in
the JSON schema. The result is cached until a registry changes.
"""

from __future__ import annotations

import copy
import json
import typing
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    SerializeAsAny,
    Tag,
    ValidationError,
    create_model,
    field_validator,
)

from probekit import jsonio
from probekit.blocks import CacheSpec, DistributedSpec, ModelSpec, OptimizerSpec
from probekit.data import DataSpec
from probekit.errors import ConfigError, did_you_mean
from probekit.freezers.all import FreezeAllSpec
from probekit.heads.linear import LinearHeadSpec
from probekit.poolers.masked_mean import MaskedMeanSpec
from probekit.registry import FREEZERS, HEADS, POOLERS, PRESETS, SCHEDULERS, TASKS, Registry, last_report
from probekit.schedulers.cosine import CosineSpec
from probekit.spec import (
    FreezerSpec,
    HeadSpec,
    PoolerSpec,
    SchedulerSpec,
    TaskSpec,
    TokenPoolerSpec,
    label_key,
)
from probekit.tasks.base import Task
from probekit.tasks.binary import BinaryTaskSpec

FAMILY_FIELDS: dict[str, Registry[Any]] = {
    "task": TASKS,
    "pooler": POOLERS,
    "head": HEADS,
    "freezer": FREEZERS,
    "scheduler": SCHEDULERS,
}
"""Top-level config field -> the registry whose kinds it accepts."""

_NESTED_FIELDS: dict[str, Registry[Any]] = {"token_pooler": POOLERS}


TRACKERS = ("tensorboard", "mlflow", "wandb", "comet_ml", "aim", "clearml", "dvclive")
"""The experiment trackers ``train.report_to`` may name (Accelerate's names)."""


class TrainSpec(BaseModel):
    """How training runs: batches, epochs, precision, loss, stopping."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    epochs: int = Field(default=10, ge=1, le=1_000_000, description="Maximum number of epochs.")
    batch_size: int = Field(
        default=8,
        ge=1,
        le=1_000_000,
        description="Examples per micro-step on one device. The effective batch, batch_size x "
        "grad_accum, is what every optimiser step averages over, whatever the process count.",
    )
    grad_accum: int = Field(
        default=4,
        ge=1,
        le=1_000_000,
        description="Micro-steps per optimiser step in a single process; with N processes it is "
        "divided by N (or the per-device batch is, when it cannot be), keeping the effective batch.",
    )
    eval_batch_size: int = Field(
        default=64, ge=1, le=1_000_000, description="Examples per batch in evaluation."
    )
    eval_max_tokens: int | None = Field(
        default=4096,
        ge=1,
        le=1 << 40,
        description="Evaluation and caching batches hold at most this many padded tokens (fewer "
        "rows when rows are long), which bounds peak memory; null: eval_batch_size rows always.",
    )
    label_smoothing: float = Field(default=0.1, ge=0.0, lt=1.0)
    max_grad_norm: float | None = Field(default=1.0, gt=0.0, description="Gradient clipping; null: none.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        default="auto", description="auto: bf16 autocast on CUDA devices with bf16 support, fp32 elsewhere."
    )
    patience: int = Field(
        default=5, ge=1, le=1_000_000, description="Epochs without val improvement before stopping."
    )
    monitor: Literal[
        "auroc", "accuracy", "f1", "auprc", "loss", "r2", "mae", "rmse", "pearson", "spearman"
    ] = Field(
        default="auroc",
        description="Validation metric that decides the best epoch (loss, mae, rmse: lower is better); "
        "the task must report it (regression: loss, mae, rmse, r2, pearson, spearman).",
    )
    seed: int = Field(
        default=0,
        ge=0,
        le=2**32 - 1,
        description="Seeds weights of the head, data order and dropout (0 .. 2^32-1).",
    )
    cpu: bool = Field(default=False, description="Train on the CPU even when a GPU is present.")
    deterministic: bool = Field(
        default=False,
        description="Deterministic kernels only (torch.use_deterministic_algorithms, cuDNN "
        "autotuning off, cuBLAS given a fixed workspace): a GPU run repeats, and resumes, bit for "
        "bit, at some cost in speed; an operation with no deterministic kernel on the device stops "
        "the run with its name. CPU runs are deterministic either way.",
    )
    bucket_batches: int = Field(
        default=50,
        ge=1,
        le=1_000_000,
        description="Length bucketing: shuffled rows are cut into buckets of this many batches, "
        "each sorted by length before batching, so a batch pads little; 1: plain random batches.",
    )
    checkpoint_every_steps: int | None = Field(
        default=50,
        ge=1,
        le=1 << 40,
        description="Write a training-state checkpoint every this many optimiser steps (and after "
        "every epoch), so a stopped run continues with --resume; null: after epochs only.",
    )
    resumable: bool = Field(
        default=True,
        description="Write training-state checkpoints (trainable weights and optimiser state; "
        "--dry-run prints their size). false: none are written, which saves their time and disk "
        "when the trainable part is large, and a stopped run cannot be resumed.",
    )
    report_to: list[str] = Field(
        default_factory=list,
        description="Experiment trackers (through Accelerate) that also get the per-step and per-epoch "
        f"scalars: any of {', '.join(TRACKERS)}; each needs its package installed. Empty: none "
        "(steps.jsonl in the run folder has them anyway).",
    )
    cache: CacheSpec = Field(default_factory=CacheSpec, description="The frozen-prefix activation cache.")
    distributed: DistributedSpec = Field(
        default_factory=DistributedSpec, description="Multi-process training (torchrun, accelerate launch)."
    )

    @field_validator("report_to", mode="before")
    @classmethod
    def _trackers(cls, value: Any) -> Any:
        """Known tracker names, each once (``a,b`` in one string: a list of both)."""
        names = [n.strip() for n in value.split(",") if n.strip()] if isinstance(value, str) else value
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ValueError(f"expected a list of tracker names ({', '.join(TRACKERS)})")
        for name in names:
            if name not in TRACKERS:
                hint = did_you_mean(name, TRACKERS)
                raise ValueError(
                    f"unknown tracker {name!r}; known: {', '.join(TRACKERS)}" + (f"; {hint}" if hint else "")
                )
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"{', '.join(repeated)} named more than once")
        return names


MAX_CLASS_WEIGHT = 1e6
"""The largest weight ``loss.class_weights`` may give a class."""


class LossSpec(BaseModel):
    """How rows weigh in the training loss (label smoothing is ``train.label_smoothing``)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    class_weights: Literal["none", "balanced"] | dict[str, float] = Field(
        default="none",
        description="none: every row weighs 1; balanced: a row of class c weighs "
        "rows / (classes x rows of c) in train (scikit-learn's rule); {label: weight}: the "
        "weight of each named label, 1 for the others. A weight multiplies the row's whole "
        "(smoothed) loss: k on a class trains as k copies of its rows would.",
    )
    token_level: bool = Field(
        default=False,
        description="Train on every token the pooler reads, each carrying its row's label (the "
        "pooler applied to that token alone, then the head), with each row's loss the mean over its "
        "tokens, so long rows do not outweigh short ones. Evaluation and prediction still pool the "
        "row. Off: one loss per row.",
    )

    @field_validator("class_weights", mode="before")
    @classmethod
    def _check(cls, value: Any) -> Any:
        """One message for any bad value (not one per member of the union)."""
        if isinstance(value, str):
            if value not in ("none", "balanced"):
                hint = did_you_mean(value, ["none", "balanced"])
                raise ValueError(
                    f"{value!r} is none, balanced or a mapping {{label: weight}}"
                    + (f"; {hint}" if hint else "")
                )
            return value
        if not isinstance(value, dict):
            raise ValueError(
                f"expected none, balanced or a mapping {{label: weight}}, got {type(value).__name__}"
            )
        value = {label_key(name): weight for name, weight in value.items()}
        if not value:
            raise ValueError("an empty mapping; give {label: weight} or none")
        if len(value) > 100_000:
            raise ValueError(f"{len(value)} labels; at most 100000")
        for name, weight in value.items():
            number = isinstance(weight, (int, float)) and not isinstance(weight, bool)
            if not number or not 0 < weight <= MAX_CLASS_WEIGHT:  # nan fails too
                raise ValueError(f"{name!r}: weight {weight!r} is not a number in (0, {MAX_CLASS_WEIGHT:g}]")
        return value

    def resolve(
        self, label_map: Mapping[str, int], train_labels: Sequence[Any], target: str = "binary"
    ) -> tuple[float, ...] | None:
        """One weight per class index, or None for ``none`` (an unweighted loss).

        Raises:
            ConfigError: a label of the mapping that the data does not have (did-you-mean), or
                ``balanced`` with a class that has no train rows.
        """
        spec = self.class_weights
        if spec == "none":
            return None
        if target == "regression":
            raise ConfigError("loss.class_weights: a regression has no classes to weigh; leave it none")
        num_classes = max(label_map.values()) + 1
        if spec == "balanced" and target == "multilabel":
            return _balanced_positive_weights(label_map, train_labels)
        if spec == "balanced":
            counts = Counter(train_labels)
            empty = [name for name, index in label_map.items() if not counts[index]]
            if empty:
                raise ConfigError(f"loss.class_weights=balanced: no train rows of class {empty[0]!r}")
            total = len(train_labels)
            return tuple(total / (num_classes * counts[index]) for index in range(num_classes))
        assert isinstance(spec, dict)
        weights = [1.0] * num_classes
        for name, weight in spec.items():
            if name not in label_map:
                hint = did_you_mean(name, list(label_map))
                raise ConfigError(
                    f"loss.class_weights: {name!r} is not a label of the data (labels: "
                    f"{', '.join(list(label_map)[:20])})" + (f"; {hint}" if hint else "")
                )
            weights[label_map[name]] = float(weight)
        return tuple(weights)


def _balanced_positive_weights(label_map: Mapping[str, int], rows: Sequence[Any]) -> tuple[float, ...]:
    """Multi-label ``balanced``: each label's positive rows weigh negatives / positives (known
    rows of train), the ``pos_weight`` of a binary cross-entropy."""
    weights = []
    for column in sorted(label_map.values()):
        cells = [row[column] for row in rows]
        positives, negatives = cells.count(1.0), cells.count(0.0)
        weights.append(negatives / positives if positives and negatives else 1.0)
    return tuple(weights)


class ThresholdSpec(BaseModel):
    """How the decision threshold is chosen on the validation split."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    target_fpr: float | None = Field(
        default=None,
        gt=0.0,
        lt=1.0,
        description="null: the threshold maximising val F1; a number: the lowest threshold "
        "with val FPR <= it.",
    )

    def choose(self, labels: Any, scores: Any) -> float:
        """The threshold this rule picks on validation labels and positive-class scores."""
        from probekit.metrics import choose_threshold

        fpr = self.target_fpr
        return choose_threshold(
            labels, scores, rule="max_f1" if fpr is None else "target_fpr", target_fpr=fpr
        )

    def describe(self) -> str:
        """The rule in words."""
        return "max val F1" if self.target_fpr is None else f"lowest with val FPR <= {self.target_fpr}"

    def rule_id(self) -> str:
        """The rule as reports record it: ``max_f1`` or ``target_fpr=<budget>``."""
        return "max_f1" if self.target_fpr is None else f"target_fpr={self.target_fpr}"


class ProbeConfig(BaseModel):
    """Everything needed to build and train a probe on a backbone.

    Validate raw data with `load_config` (or ``config_model().model_validate``), which knows
    every registered kind; this class is the static type those models derive from.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    task: SerializeAsAny[TaskSpec] = Field(default_factory=BinaryTaskSpec)
    pooler: SerializeAsAny[PoolerSpec] = Field(default_factory=MaskedMeanSpec)
    head: SerializeAsAny[HeadSpec] = Field(default_factory=LinearHeadSpec)
    freezer: SerializeAsAny[FreezerSpec] = Field(default_factory=FreezeAllSpec)
    scheduler: SerializeAsAny[SchedulerSpec] = Field(default_factory=CosineSpec)
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec)
    train: TrainSpec = Field(default_factory=TrainSpec)
    loss: LossSpec = Field(default_factory=LossSpec)
    threshold: ThresholdSpec = Field(default_factory=ThresholdSpec)
    model: ModelSpec = Field(default_factory=ModelSpec)
    data: DataSpec = Field(default_factory=DataSpec)

    def replace(self, **overrides: Mapping[str, Any]) -> ProbeConfig:
        """This config with ``overrides`` merged in, validated exactly as ``--set`` is: sections
        as keyword arguments, fields as nested mappings, e.g.
        ``config.replace(train={"epochs": 3}, optimizer={"lr_head": 1e-3})``.

        Sections merge field by field; a new ``kind`` in a family block replaces the block (the
        old kind's fields do not leak in); mapping-valued settings (``data.label_map``,
        ``loss.class_weights``) are replaced whole. An unknown section or field is refused
        with a did-you-mean.

        Raises:
            ConfigError: one located line per problem.
        """
        merged = merge_overrides(self.model_dump(mode="json"), overrides)
        return validate(merged, label="config with overrides")


WHOLE_MAPPINGS = frozenset({"data.label_map", "loss.class_weights"})
"""Mapping-valued settings that an override replaces whole rather than merges."""


def merge_overrides(data: Mapping[str, Any], overrides: Mapping[str, Any], path: str = "") -> dict[str, Any]:
    """``data`` (a config as plain data) with ``overrides`` merged in (see `ProbeConfig.replace`);
    unknown names are left for validation to refuse with a did-you-mean."""
    result = copy.deepcopy(dict(data))
    for key, value in overrides.items():
        here = f"{path}.{key}" if path else str(key)
        current = result.get(key)
        if isinstance(value, Mapping) and isinstance(current, Mapping) and here not in WHOLE_MAPPINGS:
            if "kind" in value and value["kind"] != current.get("kind"):
                current = {"kind": value["kind"]}
            result[key] = merge_overrides(current, value, here)
        else:
            result[key] = copy.deepcopy(value)
    return result


_cache: tuple[tuple[int, ...], type[ProbeConfig]] | None = None


def _union(registry: Registry[Any]) -> Any:
    """The registry's spec classes as a union tagged by ``kind`` (one class too: a family with a
    single kind still refuses an unknown kind by name and shows a discriminator in the schema)."""
    members = tuple(Annotated[entry.obj, Tag(entry.kind)] for entry in registry.entries())
    return Annotated[Union[members], Discriminator("kind")]  # noqa: UP007  (a runtime tuple)


def config_model() -> type[ProbeConfig]:
    """The config model for the kinds registered now (cached until a registry changes)."""
    global _cache
    key = tuple(reg.version for reg in FAMILY_FIELDS.values())
    if _cache is not None and _cache[0] == key:
        return _cache[1]
    fields: dict[str, Any] = {}
    for name, registry in FAMILY_FIELDS.items():
        default = ProbeConfig.model_fields[name].default_factory
        fields[name] = (_union(registry), Field(default_factory=default))  # type: ignore[arg-type]
    model = create_model("ProbeConfig", __base__=ProbeConfig, __module__=__name__, **fields)
    model.__doc__ = ProbeConfig.__doc__
    _cache = (key, model)
    return model


def json_schema() -> dict[str, Any]:
    """The JSON schema of the full config, every registered kind included.

    ``multilayer.token_pooler`` is validated against the registry at load time; the schema
    shows it as the discriminated union of the registered single-layer poolers.
    """
    schema = config_model().model_json_schema()
    defs: dict[str, Any] = schema.get("$defs", {})
    token_refs = {
        entry.kind: f"#/$defs/{entry.obj.__name__}"
        for entry in POOLERS.entries()
        if issubclass(entry.obj, TokenPoolerSpec)
        and defs.get(entry.obj.__name__, {}).get("properties", {}).get("kind", {}).get("const") == entry.kind
    }
    for definition in defs.values():
        prop = definition.get("properties", {}).get("token_pooler")
        if prop is not None:
            definition["properties"]["token_pooler"] = {
                **{k: v for k, v in prop.items() if k in {"description", "default", "title"}},
                "oneOf": [{"$ref": ref} for ref in token_refs.values()],
                "discriminator": {"propertyName": "kind", "mapping": token_refs},
            }
    return schema


# -- loading and dumping -----------------------------------------------------------------------
MAX_CONFIG_BYTES = 1 << 20
"""A config file (or mapping dumped as JSON) larger than this is refused before it is parsed."""
MAX_ASSIGNMENT_CHARS = 1 << 16
"""One ``--set`` assignment longer than this is refused before it is parsed."""


MAX_CONFIG_NODES = 100_000
"""A config whose YAML expands (aliases included) to more values than this is refused."""

_MERGE_TAG = "tag:yaml.org,2002:merge"


class _UniqueKeyLoader(yaml.SafeLoader):
    """The safe loader, refusing a key written twice in one mapping (PyYAML keeps the last one);
    keys brought in by a ``<<`` merge may still be overridden, as YAML means them to be."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == _MERGE_TAG:
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                first = seen.setdefault(key, line)
            except TypeError:  # an unhashable key: the base class reports it
                continue
            if first is not line:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice (first on line {first})", key_node.start_mark
                )
        return super().construct_mapping(node, deep=deep)


def _check_expansion(node: yaml.Node, source: str) -> None:
    """Refuse a document whose aliases expand it past `MAX_CONFIG_NODES` values (a few lines of
    nested aliases can stand for billions of them)."""
    count, stack = 0, [node]
    while stack:
        current = stack.pop()
        count += 1
        if count > MAX_CONFIG_NODES:
            raise ConfigError(
                f"{source}: expands to more than {MAX_CONFIG_NODES:,} values (nested aliases?); "
                "a config is never this large"
            )
        if isinstance(current, yaml.MappingNode):
            for key, value in current.value:
                stack += (key, value)
        elif isinstance(current, yaml.SequenceNode):
            stack += current.value


def _parse_text(text: str, source: str, *, is_json: bool) -> tuple[Any, yaml.Node | None]:
    """Parse JSON (json module) or YAML (safe loader) once, refusing duplicate keys; return the
    data and, for YAML, its node tree (line numbers for errors; JSON composes one on demand)."""
    if is_json:
        try:
            return json.loads(text, object_pairs_hook=jsonio.unique_keys), None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{source}:{exc.lineno}: not valid JSON: {exc.msg}") from None
        except (ValueError, RecursionError) as exc:  # an integer past the digit limit, deep nesting
            raise ConfigError(f"{source}: not valid JSON: {_first_line(exc)}") from None
    loader = _UniqueKeyLoader(text)
    try:
        node = loader.get_single_node()
        if node is not None:
            _check_expansion(node, source)
        data = None if node is None else loader.construct_document(node)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark is not None else source
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{where}: not valid YAML: {problem}") from None
    except (ValueError, RecursionError) as exc:
        raise ConfigError(f"{source}: not valid YAML: {_first_line(exc)}") from None
    finally:
        loader.dispose()
    return data, node


def _first_line(exc: BaseException) -> str:
    """What went wrong while parsing, in the user's terms."""
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    text = str(exc).strip()
    if "integer string conversion" in text:
        return "an integer of more than 4300 digits"
    return text.splitlines()[0][:200] if text else type(exc).__name__


def _compose_json(text: str) -> yaml.Node | None:
    """The YAML node tree of JSON text, for the line numbers of validation errors."""
    try:
        return yaml.compose(text, Loader=yaml.SafeLoader)
    except (yaml.YAMLError, ValueError, RecursionError):
        return None


def read_config_file(path: str | Path) -> tuple[dict[str, Any], yaml.Node | None]:
    """Read a ``.json``, ``.yaml`` or ``.yml`` config file (safe loader only, at most
    `MAX_CONFIG_BYTES`, no key twice in one mapping)."""
    path = Path(path)
    if path.suffix.lower() not in {".json", ".yaml", ".yml"}:
        raise ConfigError(f"{path}: config files must end in .json, .yaml or .yml")
    try:
        if path.is_dir():
            raise ConfigError(f"{path}: is a folder; give a config file")
        with path.open("rb") as handle:
            raw = handle.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(
            f"{path}: larger than {MAX_CONFIG_BYTES // 1024} KiB; a config describes one run and is "
            "never this large"
        )
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte offset {exc.start})") from None
    is_json = path.suffix.lower() == ".json"
    data, node = _parse_text(text, str(path), is_json=is_json)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}:1: a config must be a mapping, got {type(data).__name__}")
    if is_json:
        node = _compose_json(text)
    return data, node


def load_config(source: Mapping[str, Any] | str | Path | None = None) -> ProbeConfig:
    """Validate a config given as a mapping or a JSON/YAML file path; errors name their place.

    Raises:
        ConfigError: one line per problem, each naming file:line (for files), the field path,
            the allowed kinds and a did-you-mean where one is close.
    """
    node = None
    label = "config"
    if source is None:
        data: dict[str, Any] = {}
    elif isinstance(source, Mapping):
        data = dict(source)
    else:
        data, node = read_config_file(source)
        label = str(source)
    return validate(data, label=label, node=node)


def validate(data: Mapping[str, Any], *, label: str = "config", node: yaml.Node | None = None) -> ProbeConfig:
    """Validate ``data`` against `config_model`, turning errors into one located line each."""
    model = config_model()
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        described = [_describe(error, model, data, label, node) for error in exc.errors()]
        ordered = sorted(dict.fromkeys(described), key=lambda item: item[0])
        raise ConfigError("\n".join(text for _, text in ordered)) from None


def task_of(config: ProbeConfig) -> Task:
    """The `probekit.tasks.Task` a config describes (its ``task`` with its ``threshold`` rule)."""
    return config.task.build(config.threshold)


def preset(name: str, **overrides: Mapping[str, Any]) -> ProbeConfig:
    """The validated config of a registered preset, with typed ``overrides`` merged in as
    `ProbeConfig.replace` merges them: ``preset("safety8k", train={"epochs": 3})``."""
    config = validate(PRESETS.get(name).config, label=f"preset {name}")
    return config.replace(**overrides) if overrides else config


def apply_overrides(data: Mapping[str, Any], assignments: Sequence[str]) -> dict[str, Any]:
    """Apply ``a.b=value`` assignments to config data (as ``--set`` does) and return new data.

    Each assignment splits on its first ``=``; the value is parsed as JSON, falling back to the
    plain string (``--set model.name=bert-base-uncased``). A path that names no field of the
    config is refused with a did-you-mean. Changing a family block's ``kind`` replaces that
    block by ``{"kind": value}``, so fields of the old kind do not leak into the new one;
    setting the kind it already has changes nothing.

    Raises:
        ConfigError: malformed assignment or unknown path.
    """
    model = config_model()
    result: dict[str, Any] = copy.deepcopy(dict(data))
    for assignment in assignments:
        if len(assignment) > MAX_ASSIGNMENT_CHARS:
            raise ConfigError(
                f"--set {assignment[:40]!r}...: {len(assignment)} characters; one assignment holds at "
                f"most {MAX_ASSIGNMENT_CHARS} (put large settings in a --config file)"
            )
        key, sep, raw = assignment.partition("=")
        path = key.strip().split(".")
        if not sep or not all(path):
            raise ConfigError(f"--set {assignment!r}: expected a.b=value")
        try:
            value: Any = json.loads(raw, object_pairs_hook=jsonio.unique_keys)
        except json.JSONDecodeError:
            value = raw
        except (ValueError, RecursionError) as exc:  # an integer past the digit limit, deep nesting
            raise ConfigError(f"--set {key}: {_first_line(exc)}") from None
        parent: dict[str, Any] = result
        for depth, part in enumerate(path[:-1]):
            allowed = _fields_at(model, path[:depth], result)
            if part not in allowed:
                raise ConfigError(_unknown_path(key, part, allowed))
            child = parent.get(part)
            if not isinstance(child, dict):
                child = {} if child is None else child
                if not isinstance(child, dict):
                    raise ConfigError(f"--set {key}: {'.'.join(path[: depth + 1])} is not a block of fields")
                parent[part] = child
            parent = child
        leaf = path[-1]
        family_block = (len(path) == 2 and path[0] in FAMILY_FIELDS) or (
            len(path) > 2 and path[-2] in _NESTED_FIELDS
        )
        if leaf == "kind" and family_block:
            if parent.get("kind") != value:  # a new kind starts from its own defaults
                parent.clear()
                parent["kind"] = value
            continue
        allowed = _fields_at(model, path[:-1], result)
        if leaf not in allowed:
            raise ConfigError(_unknown_path(key, leaf, allowed))
        parent[leaf] = value
    return result


def _unknown_path(key: str, part: str, allowed: list[str]) -> str:
    hint = did_you_mean(part, allowed)
    return (
        f"--set {key}: no field {part!r}"
        + (f"; {hint}" if hint else "")
        + (f" (fields there: {', '.join(allowed)})" if allowed else "")
    )


def compose_config(
    *,
    preset: str | None = None,
    config: str | Path | Mapping[str, Any] | None = None,
    model: str | None = None,
    data: str | None = None,
    assignments: Sequence[str] = (),
) -> ProbeConfig:
    """The config a ``probekit train`` command line describes.

    Starts from ``config`` (a file or mapping) or ``preset`` (``safety8k`` when neither is
    given), then applies ``model`` (``model.name``), ``data`` (``data.path``) and the ``--set``
    assignments, in that order, and validates the result.
    """
    if preset is not None and config is not None:
        raise ConfigError("give --preset or --config, not both")
    if config is not None:
        base = load_config(config)
        label = str(config) if not isinstance(config, Mapping) else "config"
    else:
        name = preset or "safety8k"
        label = f"preset {name}"
        base = validate(PRESETS.get(name).config, label=label)
    for option, value, what in (
        ("--model", model, "a Hugging Face model id or a local folder"),
        ("--data", data, "a data file or a folder of train/val/test files"),
    ):
        if value is not None and not value.strip():
            raise ConfigError(f"{option}: empty; name {what}")
    extra = [
        *([f"model.name={json.dumps(model)}"] if model is not None else []),
        *([f"data.path={json.dumps(data)}"] if data is not None else []),
    ]
    merged = apply_overrides(base.model_dump(mode="json"), [*extra, *assignments])
    return validate(merged, label=f"{label} with --set" if assignments else label)


def dump_config(config: ProbeConfig, fmt: str = "yaml") -> str:
    """Serialise ``config`` as ``yaml`` or ``json`` text that `load_config` reads back."""
    data = config.model_dump(mode="json")
    if fmt == "json":
        return json.dumps(data, indent=2) + "\n"
    if fmt == "yaml":
        return yaml.safe_dump(data, sort_keys=False)
    raise ValueError(f"unknown format {fmt!r}; use 'yaml' or 'json'")


# -- error messages ----------------------------------------------------------------------------
def _strip_tags(loc: tuple[Any, ...], data: Any) -> list[Any]:
    """Drop pydantic's union-tag entries (the ``kind`` value pydantic inserts) from ``loc``."""
    path: list[Any] = []
    current: Any = data
    for item in loc:
        if (
            isinstance(current, Mapping)
            and isinstance(item, str)
            and item not in current
            and item == current.get("kind")
        ):
            continue
        path.append(item)
        if isinstance(current, Mapping):
            current = current.get(item)
        elif isinstance(current, (list, tuple)) and isinstance(item, int) and 0 <= item < len(current):
            current = current[item]
        else:
            current = None
    return path


def _format_path(path: list[Any]) -> str:
    text = ""
    for item in path:
        text += f"[{item}]" if isinstance(item, int) else (f".{item}" if text else str(item))
    return text or "(top level)"


def _registry_for(path: list[Any]) -> Registry[Any] | None:
    for item in reversed(path):
        if isinstance(item, str) and item != "kind":
            return FAMILY_FIELDS.get(item) or _NESTED_FIELDS.get(item)
    return None


def _fields_at(model: type[BaseModel], path: list[Any], data: Any) -> list[str]:
    """Field names allowed in the mapping at ``path`` (for did-you-mean on unknown keys)."""
    current: type[BaseModel] | None = model
    value: Any = data
    for item in path:
        if current is None or not isinstance(value, Mapping):
            return []
        value = value.get(item)
        registry = FAMILY_FIELDS.get(item) or _NESTED_FIELDS.get(item)
        if registry is not None and isinstance(value, Mapping):
            kind = value.get("kind")
            current = registry.get(kind) if isinstance(kind, str) and kind in registry else None
            continue
        info = current.model_fields.get(item)
        annotation = info.annotation if info is not None else None
        current = _block_model(annotation)
    return list(current.model_fields) if current is not None else []


def _block_model(annotation: Any) -> type[BaseModel] | None:
    """The model class of a block field: ``Spec`` or an optional ``Spec | None`` (``data.chat``)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    models = [
        arg for arg in typing.get_args(annotation) if isinstance(arg, type) and issubclass(arg, BaseModel)
    ]
    others = [arg for arg in typing.get_args(annotation) if arg is not type(None) and arg not in models]
    return models[0] if len(models) == 1 and not others else None


def _line(node: yaml.Node | None, path: list[Any]) -> int | None:
    """1-based line of the value (or key) at ``path`` in a composed YAML/JSON document."""
    if node is None:
        return None
    line = node.start_mark.line + 1
    for item in path:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if key.value == item:
                    node = value
                    line = key.start_mark.line + 1
                    break
            else:
                return line
        elif isinstance(node, yaml.SequenceNode) and isinstance(item, int) and item < len(node.value):
            node = node.value[item]
            line = node.start_mark.line + 1
        else:
            return line
    return line


def _describe(
    error: Any, model: type[BaseModel], data: Any, label: str, node: yaml.Node | None
) -> tuple[int, str]:
    """The error's line (0 when unknown) and its one-line message."""
    path = _strip_tags(tuple(error["loc"]), data)
    kind = error["type"]
    message = str(error["msg"])
    if kind == "extra_forbidden":
        name = str(path[-1]) if path else ""
        allowed = _fields_at(model, path[:-1], data)
        hint = did_you_mean(name, allowed)
        message = (
            f"unknown field {name!r}"
            + (f"; {hint}" if hint else "")
            + (f" (allowed: {', '.join(allowed)})" if allowed else "")
        )
    elif kind in {"union_tag_invalid", "union_tag_not_found"}:
        registry = _registry_for(path)
        tag = str(error.get("ctx", {}).get("tag", "")) if kind == "union_tag_invalid" else ""
        path = [*path, "kind"]
        if registry is not None:
            unavailable = registry.unavailable()
            if tag in unavailable:
                message = f"{registry.family} kind {tag!r} is unavailable: {unavailable[tag]}"
            else:
                hint = did_you_mean(tag, registry.kinds()) if tag else ""
                head = f"unknown {registry.family} kind {tag!r}" if tag else f"missing {registry.family} kind"
                message = (
                    head + (f"; {hint}" if hint else "") + f" (allowed kinds: {', '.join(registry.kinds())})"
                )
                if last_report() is None:
                    message += "; plugin kinds load when probekit.discover() is called"
    elif kind.startswith("value_error") or kind == "assertion_error":
        message = message.removeprefix("Value error, ")
    line = _line(node, path)
    where = label if line is None else f"{label}:{line}"
    return (line or 0, f"{where}: {_format_path(path)}: {message}")
