"""Rebuilding a trained probe from its run folder (`probekit.probe.Probe.from_pretrained`).

The run folder is untrusted input: `probekit.checkpoint.read_run` validates ``probe.json``
whole; here the weights file is confined to the folder and checked (checksum, header, dtypes,
finite values), a run that asks for the model's own code is refused unless the caller allows
it, and the backbone loaded must be the one the run was trained on. The probe class comes in as
an argument, so this module never imports `probekit.probe` (no import ring).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from probekit.backbone import base_model, locate
from probekit.checkpoint import META, RunMeta, class_keys, read_run, sha256_file, trainable_parameters
from probekit.config import task_of
from probekit.errors import UserError
from probekit.hub import ModelSpec
from probekit.runfiles import escape_note, inside, load_safetensors, printable, shown
from probekit.spec import label_key

if TYPE_CHECKING:
    from probekit.probe import Probe

log = logging.getLogger("probekit")


def _check_weights(run: RunMeta) -> tuple[Path, dict[str, torch.Tensor]]:
    """The weights file of a run, confined to its folder, checked against its checksum, read with
    its header checked, holding as many finite floating-point tensors as ``probe.json`` says."""
    meta, where = run.meta, run.path
    weights = run.folder / meta.weights.file
    try:
        present = weights.is_file()
    except OSError:
        present = False
    if not present:
        raise UserError(f"{weights}: missing checkpoint weights")
    if not inside(weights, run.folder):
        raise UserError(f"{weights}: leads out of the run folder ({escape_note(weights)}); refused")
    expected = meta.checksums.weights if meta.checksums is not None else meta.weights.sha256
    if sha256_file(weights) != expected:
        raise UserError(f"{weights}: checksum does not match {META}; the file is damaged or was replaced")
    try:
        state = load_safetensors(weights)
    except ValueError as exc:
        raise UserError(f"{weights}: {exc}") from None
    if len(state) != meta.weights.tensors:
        raise UserError(
            f"{where}: weights.tensors: says {meta.weights.tensors}, but {weights.name} holds "
            f"{len(state)} tensors"
        )
    for name, tensor in state.items():
        if not tensor.is_floating_point():
            raise UserError(f"{weights}: {shown(name)} has dtype {tensor.dtype}; weights are floating point")
        if not bool(torch.isfinite(tensor).all()):
            raise UserError(f"{weights}: {shown(name)} holds non-finite values (nan or inf)")
    return weights, state


def _load_backbone(spec: ModelSpec, where: Path) -> Any:
    """`probekit.hub.load_backbone`, its errors naming ``probe.json``."""
    from probekit.hub import load_backbone

    name = spec.name
    try:
        return load_backbone(spec)
    except UserError as exc:
        if "needs its own code" in str(exc):
            raise UserError(
                f"{where}: config.model.name: {shown(name)} needs its own code to run; pass "
                "--trust-remote-code (trust_remote_code=True) only if you trust that code"
            ) from None
        raise UserError(f"{where}: config.{printable(str(exc))}") from None


def load_run(
    run_dir: str | Path, trust_remote_code: bool = False, *, cls: type[Probe]
) -> tuple[Probe, RunMeta]:
    """Rebuild the probe of a run as a ``cls`` (`probekit.probe.Probe`: see `load_probe`); return
    it and its validated ``probe.json``."""

    run = read_run(run_dir)
    where, meta, config = run.path, run.meta, run.config
    if config.model.trust_remote_code and not trust_remote_code:
        raise UserError(
            f"{where}: config.model.trust_remote_code: this run asks to run the model's own code, and "
            "a run folder cannot allow that; pass --trust-remote-code (trust_remote_code=True) only "
            f"if you trust {shown(config.model.name)}"
        )
    if meta.format_version == 1:
        log.warning(
            "%s: its config is not covered by a checksum (only the weights are), because it was "
            "written by an earlier probekit (format_version 1)",
            where,
        )
    try:
        task = task_of(config).bind(class_keys(meta.label_map))
    except UserError as exc:
        raise UserError(f"{where}: config.{printable(str(exc))}") from None
    outputs, labels = config.head.num_classes, len(meta.label_names)
    if outputs != task.num_outputs(labels):
        raise UserError(
            f"{where}: config.head.num_classes: a head of {outputs} outputs for {labels} labels (label_names)"
        )
    weights, state = _check_weights(run)
    spec = config.model.model_copy(update={"trust_remote_code": trust_remote_code})
    loaded = _load_backbone(spec, where)
    layout = locate(base_model(loaded.model))
    for field in ("model_type", "num_blocks", "hidden_size"):
        said, found = getattr(meta.backbone, field), getattr(layout, field)
        if said != found:
            raise UserError(
                f"{where}: backbone.{field}: the run was trained on a backbone with {field} {shown(said)}, "
                f"but {shown(config.model.name)} has {shown(found)}; it is not the run's backbone"
            )
    try:
        probe = cls.from_config(config, loaded.model)
    except UserError as exc:
        raise UserError(f"{where}: config: {printable(str(exc))}") from None
    except (RuntimeError, MemoryError, OverflowError, ValueError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{where}: config: cannot build the probe it describes: {printable(first)}") from None
    wanted = trainable_parameters(probe)
    if set(state) != set(wanted):
        missing, extra = sorted(set(wanted) - set(state)), sorted(set(state) - set(wanted))
        raise UserError(
            f"{weights}: tensors do not match the probe (missing {shown(missing[:3])}, "
            f"unexpected {shown(extra[:3])})"
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
    probe.attach(
        tokenizer=loaded.tokenizer,
        max_length=config.model.max_length,
        threshold=meta.threshold,
        label_names=list(meta.label_names),
        task=task,
    )
    probe.eval()
    return probe, run


def load_probe(run_dir: str | Path, trust_remote_code: bool = False, *, cls: type[Probe]) -> Probe:
    """Rebuild the probe of a run: base model from its reference, trained weights from safetensors.

    The run folder is untrusted (see the module docstring): ``probe.json`` is validated whole;
    a run that asks for the model's own code is refused unless ``trust_remote_code`` is given
    here (the run folder's own ``model.trust_remote_code`` never allows it); the backbone loaded
    must be the one the run was trained on (model type, blocks, width).

    Raises:
        UserError: anything wrong with the run folder, named by file and field.
    """
    probe, _ = load_run(run_dir, trust_remote_code, cls=cls)
    return probe


def save_probe(probe: Probe, folder: Path, *, overwrite: bool = False) -> Path:
    """`probekit.probe.Probe.save_pretrained`: the probe's checkpoint into ``folder``."""
    from probekit.checkpoint import save_checkpoint

    config = probe.probe_config
    if config is None:
        raise UserError(
            "this probe was not built from a config, so it cannot be saved for from_pretrained; "
            "build it with probekit.build(config, backbone) or Probe.from_config"
        )
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())) and not overwrite:
        raise UserError(f"{folder}: not an empty folder; pass overwrite=True to replace its checkpoint")
    task = probe._task()
    outputs = config.head.num_classes
    names = list(probe.label_names) or (list(range(outputs)) if task.num_outputs(outputs) == outputs else [])
    label_map = {str(label_key(name)): index for index, name in enumerate(names)}
    data = config.model_dump(mode="json")
    source = _backbone_source(probe, config)
    data["model"]["name"] = str(source)
    data["model"]["max_length"] = probe.max_length
    data["task"].update(task.stored())
    layout = probe.layout
    save_checkpoint(
        probe,
        folder,
        config=data,
        label_map=label_map,
        label_names=names,
        threshold=probe.threshold,
        backbone={
            "name": str(source),
            "revision": config.model.revision,
            "provenance": "saved with Probe.save_pretrained",
            "model_type": layout.model_type,
            "num_blocks": layout.num_blocks,
            "hidden_size": layout.hidden_size,
        },
    )
    return folder


def _backbone_source(probe: Probe, config: Any) -> str:
    """Where a saved probe's backbone reloads from: ``config.model.name`` when the backbone came
    from there (a hub id or the embedded MiniLM stay portable), else its own ``name_or_path``."""
    from probekit.hub import resolve_location

    own = str(getattr(getattr(probe.backbone, "config", None), "name_or_path", "") or "")
    if not own:
        return str(config.model.name)
    try:
        location, _ = resolve_location(config.model)
    except UserError:
        return own
    same = (
        own == config.model.name or Path(own).expanduser().resolve() == Path(location).expanduser().resolve()
    )
    return str(config.model.name) if same else own
