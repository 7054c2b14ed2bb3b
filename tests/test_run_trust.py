"""A run folder is untrusted input (issue #13): nothing in it runs code, leads out of it, or
skips validation, and nothing from it reaches the terminal raw.

One small run is trained per module, stopped half-way (its unfinished folder with its
training-state checkpoints is kept) and then resumed to the end; each test edits a copy.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import probekit.plots
from probekit import runfiles
from probekit.batching import Collator
from probekit.checkpoint import META, WEIGHTS, meta_checksum, sha256_file
from probekit.probe import Probe
from probekit.state import MANIFEST, STATE_DIR, STATE_JSON, TENSORS, load_latest
from probekit.training import train

from .engine_fixtures import ToyData, bert_dir, make_config, quiet, run_cli, save_tiny_bert, toy_data
from .test_bad_input import REMOTE_CODE, check_refusal

__all__ = ["bert_dir", "toy_data"]

TEXT = "the cat sat"
SETTINGS = ("train.grad_accum=2", "train.checkpoint_every_steps=1")
"""2 epochs (FAST) of 12 micro-batches, 2 per optimiser step, a checkpoint after every step."""
KILL_AT = 17
"""The micro-batch the first run is stopped at: its newest checkpoints are steps 8 and 7."""


class Killed(BaseException):
    """Stands in for SIGKILL in-process."""


@pytest.fixture(scope="module")
def trained(bert_dir: Path, toy_data: ToyData, tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """One run, stopped at micro-batch `KILL_AT` (its unfinished folder copied to ``stopped``),
    then resumed to the end (``run``, format version 2)."""
    base = tmp_path_factory.mktemp("trained")
    config = make_config(bert_dir, toy_data, *SETTINGS, test=False)
    fetched = [0]
    real = Collator.__call__

    def call(self: Collator, indices: Any) -> Any:
        if self.cache is not None and len(self.encoded) == len(toy_data.texts("train")):
            fetched[0] += 1
            if fetched[0] == KILL_AT:
                raise Killed
        return real(self, indices)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(probekit.plots, "write_report_plots", lambda *a, **k: [])
        patch.setattr(Collator, "__call__", call)
        with pytest.raises(Killed):
            train(config, out=base / "run", log=quiet, progress=False)
        patch.setattr(Collator, "__call__", real)
        (partial,) = [p for p in base.iterdir() if ".partial-" in p.name]
        stopped = tmp_path_factory.mktemp("stopped") / partial.name
        shutil.copytree(partial, stopped, symlinks=True)
        train(config, out=base / "run", log=quiet, progress=False, resume=True)
    return SimpleNamespace(run=base / "run", stopped=stopped, config=config)


# -- helpers -------------------------------------------------------------------------------------
def copy_run(trained: SimpleNamespace, where: Path) -> Path:
    run = where / "run"
    shutil.copytree(trained.run, run, symlinks=True)
    return run


def meta_of(run: Path) -> dict[str, Any]:
    return json.loads((run / "checkpoint" / META).read_text(encoding="utf-8"))  # type: ignore[no-any-return]


def edit_meta(run: Path, change: Callable[[dict[str, Any]], Any], *, reseal: bool = True) -> None:
    """Apply ``change`` to probe.json; ``reseal``: recompute its checksums, as a malicious author
    would, so that only validation stands in the way."""
    meta = meta_of(run)
    change(meta)
    write_json(run / "checkpoint" / META, sealed(meta) if reseal else meta)


def sealed(meta: dict[str, Any]) -> dict[str, Any]:
    """``meta`` with its checksums recomputed (as `write_meta` does, for any content)."""
    weights = meta.get("weights")
    digest = weights.get("sha256") if isinstance(weights, dict) else None
    checksums = {"weights": digest if isinstance(digest, str) else "0" * 64, "meta": meta_checksum(meta)}
    return {**{k: v for k, v in meta.items() if k != "checksums"}, "checksums": checksums}


def write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value), encoding="utf-8")


def as_version_1(meta: dict[str, Any]) -> None:
    """probe.json as probekit wrote it before format version 2."""
    meta.pop("checksums")
    meta["format_version"] = 1


def reseal_weights(run: Path) -> None:
    """Make probe.json vouch for whatever the weights file now holds."""
    digest = sha256_file(run / "checkpoint" / WEIGHTS)
    edit_meta(run, lambda m: m["weights"].update(sha256=digest))


def predict(capsys: pytest.CaptureFixture[str], run: Path, *extra: str) -> tuple[int, str, str]:
    return run_cli(capsys, "predict", run, TEXT, *extra)


def refused(capsys: pytest.CaptureFixture[str], run: Path, *names: str) -> str:
    code, out, err = predict(capsys, run)
    return check_refusal(code, out, err, names)


def snapshot(folder: Path) -> dict[str, bytes | str]:
    """Every entry under ``folder``: file bytes, or where a link points, or that it is a folder."""
    found: dict[str, bytes | str] = {}
    for path in sorted(folder.rglob("*")):
        key = str(path.relative_to(folder))
        if path.is_symlink():
            found[key] = f"link -> {path.readlink()}"
        elif path.is_dir():
            found[key] = "dir"
        else:
            found[key] = path.read_bytes()
    return found


def remote_code_model(where: Path) -> Path:
    """A model folder whose own code would leave ``where/CANARY`` if it ever ran."""
    model = where / "remote-model"
    model.mkdir()
    (model / "config.json").write_text(
        json.dumps(
            {
                "model_type": "canary-net",
                "hidden_size": 8,
                "auto_map": {
                    "AutoConfig": "configuration_canary.CanaryConfig",
                    "AutoModel": "modeling_canary.CanaryModel",
                },
            }
        )
    )
    code = REMOTE_CODE.replace(b"{tmp}", str(where).encode())
    (model / "configuration_canary.py").write_bytes(code)
    (model / "modeling_canary.py").write_bytes(code)
    return model


# -- format version 2 ------------------------------------------------------------------------------
def test_probe_json_v2_checksums_cover_the_weights_and_every_other_field(
    trained: SimpleNamespace, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    meta = meta_of(trained.run)
    assert meta["format_version"] == 2
    assert meta["checksums"]["weights"] == meta["weights"]["sha256"]
    assert meta["checksums"]["weights"] == sha256_file(trained.run / "checkpoint" / WEIGHTS)
    rest = {k: v for k, v in meta.items() if k != "checksums"}
    canonical = json.dumps(rest, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
    assert meta["checksums"]["meta"] == hashlib.sha256(canonical).hexdigest() == meta_checksum(meta)
    with caplog.at_level(logging.WARNING, logger="probekit"):
        code, out, err = predict(capsys, trained.run)
    assert code == 0, err
    assert json.loads(out)["text"] == TEXT
    assert not caplog.records


@pytest.mark.parametrize(
    ("change", "names"),
    [
        (lambda m: m.update(threshold=0.01), ("checksums.meta", "edited")),
        (lambda m: m["config"]["model"].update(max_length=32), ("checksums.meta",)),
        (lambda m: m["weights"].pop("sha256"), ("checksums.meta",)),
        (lambda m: m.pop("checksums"), ("checksums: missing",)),
    ],
    ids=["threshold", "config", "weights-sha256-deleted", "checksums-deleted"],
)
def test_a_partial_edit_of_a_v2_probe_json_is_refused(
    change: Callable[[dict[str, Any]], Any],
    names: tuple[str, ...],
    trained: SimpleNamespace,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    run = copy_run(trained, tmp_path)
    edit_meta(run, change, reseal=False)
    refused(capsys, run, "probe.json", *names)


def test_tampered_weights_are_refused_in_every_format(
    trained: SimpleNamespace, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = copy_run(trained, tmp_path)
    weights = run / "checkpoint" / WEIGHTS
    tensors = load_file(weights)
    first = next(iter(tensors))
    tensors[first] = tensors[first] + 1.0
    save_file(tensors, weights)
    refused(capsys, run, "probe.safetensors", "checksum does not match")

    def v1_without_sha256(meta: dict[str, Any]) -> None:  # the reproduction: loaded silently before
        as_version_1(meta)
        meta["weights"].pop("sha256")

    edit_meta(run, v1_without_sha256, reseal=False)
    refused(capsys, run, "probe.json", "weights.sha256", "missing")


def test_a_version_1_probe_json_still_loads_with_one_warning(
    trained: SimpleNamespace,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    run = copy_run(trained, tmp_path)
    edit_meta(run, as_version_1, reseal=False)
    with caplog.at_level(logging.WARNING, logger="probekit"):
        code, out, err = predict(capsys, run)
    assert code == 0, err
    assert json.loads(out)["probability"] == Probe.from_pretrained(trained.run).predict_proba([TEXT])[0]
    records = [r for r in caplog.records if r.name == "probekit"]
    assert len(records) == 1, records
    message = records[0].getMessage()
    assert "\n" not in message and "probe.json" in message
    assert "not covered by a checksum" in message and "earlier probekit" in message


# -- no remote code from a run folder ----------------------------------------------------------------
@pytest.mark.parametrize("command", ["predict", "eval"])
def test_a_run_folder_cannot_grant_remote_code(
    command: str,
    trained: SimpleNamespace,
    toy_data: ToyData,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    run = copy_run(trained, tmp_path)
    model = remote_code_model(tmp_path)

    def point_at_remote_code(meta: dict[str, Any]) -> None:
        meta["config"]["model"].update(name=str(model), trust_remote_code=True)

    edit_meta(run, point_at_remote_code)
    argv = [command, run, TEXT] if command == "predict" else [command, run, "--data", toy_data.path("val")]
    code, out, err = run_cli(capsys, *argv)
    check_refusal(code, out, err, ("probe.json", "config.model.trust_remote_code", "--trust-remote-code"))
    assert not (tmp_path / "CANARY").exists()
    # Not asked for, the model's code is refused by the loader itself.
    edit_meta(run, lambda m: m["config"]["model"].update(trust_remote_code=False))
    code, out, err = run_cli(capsys, *argv)
    check_refusal(code, out, err, ("probe.json", "config.model.name", "needs its own code"))
    assert not (tmp_path / "CANARY").exists()


@pytest.mark.parametrize(
    ("field", "value", "names"),
    [
        ("name", "../../etc", ("config.model.name", "neither a hub id")),
        ("name", "org/../name", ("config.model.name",)),
        ("name", "a/b/c", ("config.model.name",)),
        ("name", "~/models/bert", ("config.model.name",)),
        ("name", "bad\x1b[31mname", ("config.model.name", "\\x1b")),
        ("name", "x" * 300, ("config.model.name", "characters)")),
        ("name", "/no/such/model/folder", ("config.model.name", "no such model folder")),
        ("revision", "../../refs", ("config.model.revision",)),
        ("revision", "main;rm -rf ~", ("config.model.revision",)),
    ],
)
def test_what_a_run_folder_may_say_about_its_backbone(
    field: str,
    value: str,
    names: tuple[str, ...],
    trained: SimpleNamespace,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    run = copy_run(trained, tmp_path)
    edit_meta(run, lambda m: m["config"]["model"].update({field: value}))
    line = refused(capsys, run, "probe.json", *names)
    assert "\x1b" not in line and len(line) < 600


def test_a_hub_id_that_is_also_a_local_path_is_not_loaded_in_its_place(
    trained: SimpleNamespace,
    bert_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    run = copy_run(trained, tmp_path)
    shutil.copytree(bert_dir, tmp_path / "work" / "org" / "model")
    monkeypatch.chdir(tmp_path / "work")
    edit_meta(run, lambda m: m["config"]["model"].update(name="org/model"))
    refused(capsys, run, "config.model.name", "'org/model' is a hub id", "absolute path")


def test_the_backbone_must_be_the_one_the_run_was_trained_on(
    trained: SimpleNamespace, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = copy_run(trained, tmp_path)
    other = save_tiny_bert(tmp_path / "bert-3", layers=3)
    edit_meta(run, lambda m: m["config"]["model"].update(name=str(other)))
    refused(capsys, run, "probe.json", "backbone.num_blocks", "4", "3")
    edit_meta(
        run, lambda m: m["config"]["model"].update(name=meta_of(trained.run)["config"]["model"]["name"])
    )
    edit_meta(run, lambda m: m["backbone"].update(hidden_size=64))
    refused(capsys, run, "probe.json", "backbone.hidden_size", "64", "32")
    edit_meta(run, lambda m: m["backbone"].update(hidden_size=32, model_type="gpt2"))
    refused(capsys, run, "probe.json", "backbone.model_type", "'gpt2'", "'bert'")


# -- every file stays inside the run folder ----------------------------------------------------------
@pytest.mark.parametrize(
    "name", ["../../../../etc/passwd", "/etc/passwd", "sub/probe.safetensors", "..", "", ".hidden", "a\\b"]
)
def test_weights_file_must_be_a_bare_name(
    name: str,
    trained: SimpleNamespace,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    run = copy_run(trained, tmp_path)
    edit_meta(run, lambda m: m["weights"].update(file=name))
    opened = record_opened(monkeypatch)
    refused(capsys, run, "probe.json", "weights.file", "not a bare file name")
    assert opened == []


def record_opened(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The files whose checksum or tensors get read."""
    import probekit.pretrained as pretrained

    opened: list[Path] = []
    real_sha, real_load = pretrained.sha256_file, pretrained.load_safetensors

    def sha(path: Path) -> str:
        opened.append(path)
        return real_sha(path)

    def load(path: Path) -> dict[str, torch.Tensor]:
        opened.append(path)
        return real_load(path)

    monkeypatch.setattr(pretrained, "sha256_file", sha)
    monkeypatch.setattr(pretrained, "load_safetensors", load)
    return opened


@pytest.mark.parametrize("what", ["weights", "probe.json", "checkpoint folder"])
def test_no_symlink_leads_out_of_the_run_folder(
    what: str,
    trained: SimpleNamespace,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each target outside is a faithful copy (checksums valid): only confinement refuses it."""
    run = copy_run(trained, tmp_path)
    outside = tmp_path / "outside"
    shutil.copytree(run / "checkpoint", outside)
    if what == "weights":
        (run / "checkpoint" / "link.safetensors").symlink_to(outside / WEIGHTS)
        edit_meta(run, lambda m: m["weights"].update(file="link.safetensors"))
    elif what == "probe.json":
        (run / "checkpoint" / META).unlink()
        (run / "checkpoint" / META).symlink_to(outside / META)
    else:
        shutil.rmtree(run / "checkpoint")
        (run / "checkpoint").symlink_to(outside, target_is_directory=True)
    opened = record_opened(monkeypatch)
    refused(capsys, run, "leads out of the run folder")
    assert not any(outside in p.resolve().parents for p in opened)


# -- probe.json through a schema -----------------------------------------------------------------
def _set(*path: Any, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(meta: dict[str, Any]) -> None:
        target = meta
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return change


def _drop(*path: str) -> Callable[[dict[str, Any]], None]:
    def change(meta: dict[str, Any]) -> None:
        target = meta
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]

    return change


FIELD_EDITS: dict[str, tuple[Callable[[dict[str, Any]], None], tuple[str, ...]]] = {
    "threshold missing": (_drop("threshold"), ("probe.json: threshold: missing",)),
    "config missing": (_drop("config"), ("probe.json: config: missing",)),
    "threshold not a number": (_set("threshold", value="0.5"), ("probe.json: threshold:", "'0.5'")),
    "threshold a boolean": (_set("threshold", value=True), ("probe.json: threshold:",)),
    "threshold NaN": (_set("threshold", value=float("nan")), ("probe.json: threshold:", "finite")),
    "threshold infinite": (_set("threshold", value=float("inf")), ("probe.json: threshold:", "finite")),
    "threshold above 1": (_set("threshold", value=1.5), ("probe.json: threshold:", "1.5")),
    "threshold below 0": (_set("threshold", value=-0.1), ("probe.json: threshold:",)),
    "one label name": (_set("label_names", value=[0]), ("probe.json: label_names:",)),
    "label names not the map's": (_set("label_names", value=[0, 2]), ("probe.json: label_names:",)),
    "label names of another type": (_set("label_names", value=["0", "1"]), ("probe.json: label_names:",)),
    "label names not a list": (_set("label_names", value="01"), ("probe.json: label_names:",)),
    "backbone a number": (_set("backbone", value=5), ("probe.json: backbone:",)),
    "config a list": (_set("config", value=[]), ("probe.json: config:",)),
    "weights a string": (_set("weights", value="probe.safetensors"), ("probe.json: weights:",)),
    "label map with a gap": (_set("label_map", value={"0": 0, "1": 2}), ("probe.json: label_map:", "0..K-1")),
    "label map of one class": (_set("label_map", value={"0": 0}), ("probe.json: label_names:",)),
    "label map negative": (_set("label_map", value={"0": -1, "1": 0}), ("probe.json: label_map",)),
    "label map of strings": (_set("label_map", value={"0": "0", "1": "1"}), ("probe.json: label_map",)),
    "format_version 3": (
        _set("format_version", value=3),
        (
            "probe.json: format_version: written by a newer probekit: format_version 3; "
            "this probekit reads 1 and 2",
        ),
    ),
    "format_version a string": (_set("format_version", value="2"), ("probe.json: format_version:",)),
    "format_version a float": (_set("format_version", value=2.0), ("probe.json: format_version: 2.0",)),
    "format_version missing": (_drop("format_version"), ("probe.json: format_version: missing",)),
    "another format": (_set("format", value="pickle"), ("probe.json: not a probekit checkpoint",)),
    "weights.tensors off": (_set("weights", "tensors", value=99), ("probe.json: weights.tensors:", "99")),
    "weights.tensors negative": (_set("weights", "tensors", value=-1), ("probe.json: weights.tensors:",)),
    "weights unknown field": (_set("weights", "extra", value=1), ("probe.json: weights.extra:",)),
    "backbone.num_blocks a string": (_set("backbone", "num_blocks", value="4"), ("backbone.num_blocks",)),
    "components not a list": (_set("components", value={}), ("probe.json: components:",)),
    "versions a number": (_set("versions", value=1), ("probe.json: versions:",)),
    "config field of the wrong type": (
        _set("config", "model", "max_length", value="long"),
        ("probe.json: config.model.max_length:",),
    ),
    "config kind unknown": (_set("config", "pooler", "kind", value="nope"), ("probe.json: config.pooler",)),
    "config field unknown": (_set("config", "head", "evil", value=1), ("probe.json: config.head", "evil")),
}


@pytest.mark.parametrize("case", list(FIELD_EDITS))
def test_every_probe_json_field_is_validated(
    case: str, trained: SimpleNamespace, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    change, names = FIELD_EDITS[case]
    run = copy_run(trained, tmp_path)
    edit_meta(run, change)  # resealed: only the schema stands in the way
    refused(capsys, run, *names)


@pytest.mark.parametrize(
    ("text", "names"),
    [
        (
            '{"format": "probekit-checkpoint", "format',
            ("unreadable checkpoint description", "not valid JSON"),
        ),
        ("[" * 100_000, ("unreadable checkpoint description", "nested too deeply")),
        ('{"format": "probekit-checkpoint", "format": "x"}', ("appears twice",)),
        ("[]", ("not a probekit checkpoint",)),
        ("\xff\xfe", ("unreadable checkpoint description",)),
    ],
    ids=["truncated", "deep", "duplicate-key", "array", "not-utf8"],
)
def test_a_probe_json_that_is_not_json_is_refused(
    text: str,
    names: tuple[str, ...],
    trained: SimpleNamespace,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    run = copy_run(trained, tmp_path)
    (run / "checkpoint" / META).write_bytes(text.encode("latin-1"))
    refused(capsys, run, "probe.json", *names)


def _safetensors_with(change: Callable[[dict[str, torch.Tensor]], None]) -> Callable[[bytes], bytes]:
    def damage(data: bytes) -> bytes:
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "w.safetensors"
            path.write_bytes(data)
            tensors = load_file(path)
            change(tensors)
            save_file(tensors, path)
            return path.read_bytes()

    return damage


def _first_to(dtype: torch.dtype) -> Callable[[dict[str, torch.Tensor]], None]:
    def change(tensors: dict[str, torch.Tensor]) -> None:
        name = next(iter(tensors))
        tensors[name] = tensors[name].to(dtype)

    return change


def _nan_in_first(tensors: dict[str, torch.Tensor]) -> None:
    name = next(iter(tensors))
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] = float("nan")


DAMAGES: dict[str, tuple[Callable[[bytes], bytes], str]] = {
    "truncated": (lambda b: b[: len(b) - 100], "not a readable safetensors file"),
    "garbage": (lambda b: bytes(range(256)) * 8, "header length"),
    "empty": (lambda b: b"", "too short"),
    "header past the end": (lambda b: (len(b) + 1).to_bytes(8, "little") + b[8:], "points past the end"),
    "huge header": (lambda b: (2**40).to_bytes(8, "little") + b[8:], "larger than a safetensors header"),
    "header not JSON": (lambda b: (16).to_bytes(8, "little") + b"{{{{{{{{{{{{{{{{" + b[8:], "not a readable"),
    "integer weights": (_safetensors_with(_first_to(torch.int64)), "dtype torch.int64"),
    "boolean weights": (_safetensors_with(_first_to(torch.bool)), "dtype torch.bool"),
    "nan in the weights": (_safetensors_with(_nan_in_first), "non-finite"),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_weights_file_is_refused_by_name(
    damage: str, trained: SimpleNamespace, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    change, reason = DAMAGES[damage]
    run = copy_run(trained, tmp_path)
    weights = run / "checkpoint" / WEIGHTS
    weights.write_bytes(change(weights.read_bytes()))
    reseal_weights(run)  # the checksum vouches for the damage: only the file checks stand in the way
    refused(capsys, run, "probe.safetensors", reason)


# -- untrusted names are never echoed as commands ----------------------------------------------------
def _plugin_component(distribution: str, kind: str = "evil_pool") -> Callable[[dict[str, Any]], None]:
    def change(meta: dict[str, Any]) -> None:
        meta["components"].append(
            {"family": "pooler", "kind": kind, "source": "somewhere", "distribution": distribution}
        )

    return change


@pytest.mark.parametrize(
    "distribution",
    ["evil-pkg; rm -rf ~", "evil\x1b]0;pwned\x07pkg", "$(touch /tmp/x)", "-e git+https://x", "a" * 500],
)
def test_an_invalid_distribution_name_is_never_shown_as_a_command(
    distribution: str, trained: SimpleNamespace, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = copy_run(trained, tmp_path)
    edit_meta(run, _plugin_component(distribution))
    line = refused(capsys, run, "probe.json", "invalid distribution name", "'evil_pool'")
    assert "pip install" not in line
    assert "\x1b" not in line and "\x07" not in line
    assert distribution not in line if len(distribution) > 100 else repr(distribution)[:60] in line
    assert len(line) < 600


def test_a_valid_distribution_name_gets_a_quoted_install_hint(
    trained: SimpleNamespace, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = copy_run(trained, tmp_path)
    edit_meta(run, _plugin_component("evil-pkg", kind="evil\x1b[2Jpool"))
    line = refused(capsys, run, "which is not installed: pip install evil-pkg")
    assert "\x1b" not in line and "'evil\\x1b[2Jpool'" in line


# -- state.json through a schema -----------------------------------------------------------------
def copy_stopped(trained: SimpleNamespace, where: Path) -> tuple[Path, list[Path]]:
    """A copy of the stopped run's unfinished folder; returns it and its checkpoints, newest first."""
    partial = where / trained.stopped.name
    shutil.copytree(trained.stopped, partial, symlinks=True)
    return partial, sorted((partial / STATE_DIR).iterdir(), reverse=True)


def rewrite(
    folder: Path,
    state: Callable[[dict[str, Any]], Any] | None = None,
    tensors: Callable[[dict[str, torch.Tensor]], Any] | None = None,
) -> None:
    """Edit a checkpoint's state.json and/or tensors, then rewrite its manifest to match, so that
    the checksums pass and only validation stands in the way."""
    if state is not None:
        data = json.loads((folder / STATE_JSON).read_text(encoding="utf-8"))
        replaced = state(data)
        (folder / STATE_JSON).write_text(json.dumps(data if replaced is None else replaced), encoding="utf-8")
    if tensors is not None:
        loaded = load_file(folder / TENSORS)
        tensors(loaded)
        save_file(loaded, folder / TENSORS)
    files = {
        name: {"bytes": (folder / name).stat().st_size, "sha256": sha256_file(folder / name)}
        for name in (TENSORS, STATE_JSON)
    }
    (folder / MANIFEST).write_text(json.dumps({"format": "probekit-train-state", "files": files}))


def _state_set(*path: Any, value: Any) -> Callable[[dict[str, Any]], None]:
    return _set(*path, value=value)


def _pop_last(*path: Any) -> Callable[[dict[str, Any]], None]:
    """Remove the last item of the list at ``path``."""

    def change(state: dict[str, Any]) -> None:
        target: Any = state
        for key in path:
            target = target[key]
        target.pop()

    return change


STATE_EDITS: dict[str, tuple[Callable[[dict[str, Any]], Any], str]] = {
    "epoch -5": (_state_set("epoch", value=-5), "state.json: epoch:"),
    "epoch beyond the history": (_state_set("epoch", value=5), "state.json: epoch: 5, but the history"),
    "step missing": (_drop("step"), "state.json: step: missing"),
    "step negative": (_state_set("step", value=-1), "state.json: step:"),
    "step a string": (_state_set("step", value="8"), "state.json: step:"),
    "window below 0": (_state_set("window", value=-1), "state.json: window:"),
    "history rows not objects": (_state_set("history", value=[5]), "state.json: history[0]:"),
    "history not a list": (_state_set("history", value={}), "state.json: history:"),
    "best not a number": (_state_set("best", value="high"), "state.json: best:"),
    "stopped_early a number": (_state_set("stopped_early", value=0), "state.json: stopped_early:"),
    "accumulators short": (_state_set("accumulators", value=[1.0]), "state.json: accumulators"),
    "optimizer groups not a list": (
        _state_set("optimizer", "param_groups", value=5),
        "state.json: optimizer.param_groups:",
    ),
    "optimizer lr a string": (
        _state_set("optimizer", "param_groups", 0, "lr", value="fast"),
        "state.json: optimizer.param_groups[0].lr:",
    ),
    "optimizer betas wrong": (
        _state_set("optimizer", "param_groups", 0, "betas", value=[0.9]),
        "state.json: optimizer.param_groups[0].betas",
    ),
    "optimizer scalars keyed by names": (
        _state_set("optimizer", "scalars", value={"x": {}}),
        "state.json: optimizer.scalars",
    ),
    "scheduler empty": (_state_set("scheduler", value={}), "state.json: scheduler."),
    "scheduler rates missing one": (
        _pop_last("scheduler", "_last_lr"),
        "state.json: scheduler._last_lr: 3 rates for 4",
    ),
    "scaler empty": (_state_set("scaler", value={}), "state.json: scaler."),
    "rng not an object": (_state_set("rng", value=[1, 2]), "state.json: rng:"),
    "rng numpy position": (_state_set("rng", "numpy", 1, value=9999), "state.json: rng.numpy[1]:"),
    "rng python state short": (
        _pop_last("rng", "python", 1),
        "state.json: rng.python[1]:",
    ),
    "rng python position": (
        lambda s: s["rng"]["python"][1].__setitem__(-1, 700),
        "state.json: rng.python:",
    ),
    "processes without their states": (_state_set("processes", value=2), "state.json: rng_ranks: 1 entries"),
    "not an object": (lambda s: [s], "state.json: a JSON object was expected"),
    "a float that is NaN": (
        _state_set("accumulators", 0, value=float("nan")),
        "state.json: accumulators[0]:",
    ),
}


@pytest.mark.parametrize("case", list(STATE_EDITS))
def test_a_checksum_valid_but_wrong_state_counts_as_damaged(
    case: str, trained: SimpleNamespace, tmp_path: Path
) -> None:
    change, reason = STATE_EDITS[case]
    partial, (newest, previous, *_) = copy_stopped(trained, tmp_path)
    rewrite(newest, state=change)
    warnings: list[str] = []
    saved = load_latest(partial, warnings.append)
    assert saved is not None and saved.path == previous
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith(f"checkpoint {newest.name} is damaged ({reason}"), warnings[0]
    assert warnings[0].endswith("; using the one before it")


def _drop_tensor(name: str) -> Callable[[dict[str, torch.Tensor]], None]:
    def change(tensors: dict[str, torch.Tensor]) -> None:
        del tensors[name]

    return change


def _add_tensor(name: str, value: torch.Tensor) -> Callable[[dict[str, torch.Tensor]], None]:
    return lambda tensors: tensors.update({name: value})


def _drop_best(tensors: dict[str, torch.Tensor]) -> None:
    for name in [n for n in tensors if n.startswith("best.")]:
        del tensors[name]


TENSOR_EDITS: dict[str, tuple[Callable[[dict[str, torch.Tensor]], None], str]] = {
    "rng.numpy missing": (_drop_tensor("rng.numpy"), "no tensor rng.numpy, which state.json needs"),
    "rng.torch missing": (_drop_tensor("rng.torch"), "no tensor rng.torch"),
    "rng.torch of floats": (
        lambda t: t.update({"rng.torch": t["rng.torch"].float()}),
        "rng.torch must be",
    ),
    "a malformed optimizer tensor": (_add_tensor("optim.x.exp_avg", torch.zeros(2)), "'optim.x.exp_avg'"),
    "an optimizer tensor of no parameter": (_add_tensor("optim.999.exp_avg", torch.zeros(2)), "optim.999"),
    "best weights missing": (_drop_best, "best.*"),
    "non-finite weights": (
        lambda t: t.update({k: v * float("inf") for k, v in t.items() if k.startswith("param.")}),
        "finite",
    ),
}


@pytest.mark.parametrize("case", list(TENSOR_EDITS))
def test_tensors_the_state_needs_are_checked(case: str, trained: SimpleNamespace, tmp_path: Path) -> None:
    change, reason = TENSOR_EDITS[case]
    partial, (newest, previous, *_) = copy_stopped(trained, tmp_path)
    rewrite(newest, tensors=change)
    warnings: list[str] = []
    saved = load_latest(partial, warnings.append)
    assert saved is not None and saved.path == previous
    assert len(warnings) == 1 and reason in warnings[0] and "tensors.safetensors" in warnings[0], warnings


def test_checkpoint_files_stay_inside_the_run_folder(trained: SimpleNamespace, tmp_path: Path) -> None:
    partial, (newest, previous, *_) = copy_stopped(trained, tmp_path)
    outside = tmp_path / "outside"
    shutil.copytree(newest, outside)
    # A manifest naming a file outside, with its right size and checksum.
    manifest = json.loads((newest / MANIFEST).read_text())
    manifest["files"]["../../../outside/state.json"] = manifest["files"][STATE_JSON]
    (newest / MANIFEST).write_text(json.dumps(manifest))
    warnings: list[str] = []
    assert load_latest(partial, warnings.append).path == previous  # type: ignore[union-attr]
    assert "'../../../outside/state.json' is not a bare file name" in warnings[0]
    # A listed file that is a symlink leading out (a faithful copy: checksums pass).
    rewrite(newest)
    (newest / TENSORS).unlink()
    (newest / TENSORS).symlink_to(outside / TENSORS)
    warnings.clear()
    assert load_latest(partial, warnings.append).path == previous  # type: ignore[union-attr]
    assert "tensors.safetensors leads out of the checkpoint folder" in warnings[0]
    # A checkpoint folder that is a symlink leading out.
    shutil.rmtree(newest)
    newest.symlink_to(outside, target_is_directory=True)
    warnings.clear()
    assert load_latest(partial, warnings.append).path == previous  # type: ignore[union-attr]
    assert "leads out of the run folder" in warnings[0]
    # state/ itself leading out: nothing there is used.
    shutil.move(partial / STATE_DIR, tmp_path / "state-outside")
    (partial / STATE_DIR).symlink_to(tmp_path / "state-outside", target_is_directory=True)
    warnings.clear()
    assert load_latest(partial, warnings.append) is None
    [warning] = warnings
    assert warning.startswith("state/ leads out of the run folder (it resolves to ")
    assert warning.endswith("state-outside'); its checkpoints are not used")


def test_a_resume_never_trains_epoch_minus_5(
    trained: SimpleNamespace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reproduction: the newest checkpoint says epoch -5 and passes its checksum. It is
    reported and skipped, the one before it is used, and the run ends bit-identical."""
    monkeypatch.setattr(probekit.plots, "write_report_plots", lambda *a, **k: [])
    _partial, (newest, previous, *_) = copy_stopped(trained, tmp_path)
    rewrite(newest, state=_state_set("epoch", value=-5))
    lines: list[str] = []
    result = train(trained.config, out=tmp_path / "run", log=lines.append, progress=False, resume=True)
    assert any(f"checkpoint {newest.name} is damaged (state.json: epoch:" in line for line in lines), lines
    assert any(line.startswith(f"resumed from checkpoint {previous.name}: epoch 2") for line in lines), lines
    assert not any("epoch -5" in line for line in lines)
    assert [row["epoch"] for row in result.history] == [1, 2]
    ours, reference = (load_file(r / "checkpoint" / WEIGHTS) for r in (tmp_path / "run", trained.run))
    assert ours.keys() == reference.keys()
    assert all(torch.equal(ours[k], reference[k]) for k in ours)


def test_no_usable_checkpoint_is_refused_naming_the_problem(
    trained: SimpleNamespace,
    bert_dir: Path,
    toy_data: ToyData,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _partial, folders = copy_stopped(trained, tmp_path)
    for folder in folders:
        rewrite(folder, state=_state_set("epoch", value=-5))
    sets = [f"model.name={bert_dir}", *toy_data.assignments(test=False), *SETTINGS]
    sets += ["train.epochs=2", "train.cpu=true", "train.precision=fp32", "model.max_length=16"]
    argv = ["train", "--resume", tmp_path / "run", *(f"--set={s}" for s in sets)]
    code, out, err = run_cli(capsys, *argv)
    check_refusal(code, out, err, ("every checkpoint of the unfinished run is damaged", "state.json: epoch:"))


# -- eval: read-only run folders and valid JSON ------------------------------------------------------
def test_eval_on_a_read_only_run_prints_the_metrics_and_warns(
    trained: SimpleNamespace,
    toy_data: ToyData,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    run = copy_run(trained, tmp_path)
    before = snapshot(run)
    if os.geteuid() == 0:  # root writes through chmod: simulate the read-only file system
        real_mkdir = Path.mkdir

        def read_only(self: Path, *args: Any, **kwargs: Any) -> None:
            if run in self.parents or self == run:
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
            real_mkdir(self, *args, **kwargs)

        monkeypatch.setattr(Path, "mkdir", read_only)
    else:
        run.chmod(0o555)
    try:
        with caplog.at_level(logging.WARNING, logger="probekit"):
            code, out, err = run_cli(capsys, "eval", run, "--data", toy_data.path("val"))
    finally:
        run.chmod(0o755)
    assert code == 0, err
    assert "Traceback" not in out + err
    assert any(line.startswith("auroc ") for line in out.splitlines())
    assert "written to" not in out
    [record] = [r for r in caplog.records if r.name == "probekit"]
    message = record.getMessage()
    assert "\n" not in message
    assert f"{run / 'eval' / 'val.json'}: could not write the metrics there" in message
    assert ("Read-only file system" if os.geteuid() == 0 else "Permission denied") in message
    assert snapshot(run) == before


def test_eval_never_writes_through_a_symlink_leading_out(
    trained: SimpleNamespace,
    toy_data: ToyData,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    run = copy_run(trained, tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    (run / "eval").symlink_to(outside, target_is_directory=True)
    with caplog.at_level(logging.WARNING, logger="probekit"):
        code, out, err = run_cli(capsys, "eval", run, "--data", toy_data.path("val"))
    assert code == 0, err
    assert list(outside.iterdir()) == []
    [record] = [r for r in caplog.records if r.name == "probekit"]
    assert "eval/ leads out of the run folder" in record.getMessage()
    # A result file that is a symlink to a file outside is replaced, never written through.
    (run / "eval").unlink()
    (run / "eval").mkdir()
    victim = outside / "victim.txt"
    victim.write_text("keep me")
    (run / "eval" / "val.json").symlink_to(victim)
    code, out, err = run_cli(capsys, "eval", run, "--data", toy_data.path("val"))
    assert code == 0, err
    assert victim.read_text() == "keep me"
    written = run / "eval" / "val.json"
    assert not written.is_symlink() and json.loads(written.read_text())["data"] == str(toy_data.path("val"))
    assert f"written to {written}" in out


def _strict_json(text: str) -> Any:
    def refuse(name: str) -> Any:
        raise ValueError(f"invalid JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def test_eval_json_is_valid_json_with_an_undefined_metric(
    trained: SimpleNamespace, toy_data: ToyData, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """One class only: auroc and auprc are undefined (nan): null in JSON, n/a for people."""
    run = copy_run(trained, tmp_path)
    data = tmp_path / "negatives.jsonl"
    rows = [row for row in toy_data.rows["val"] if row["label"] == 0]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    code, out, err = run_cli(capsys, "eval", run, "--data", data, "--json")
    assert code == 0, err
    printed = _strict_json(out)
    assert printed["auroc"] is None and printed["n"] == len(rows)
    written = _strict_json((run / "eval" / "negatives.json").read_text())
    assert written == printed
    code, out, err = run_cli(capsys, "eval", run, "--data", data)
    assert code == 0, err
    lines = out.splitlines()
    assert "auroc                n/a" in lines
    assert not any("nan" in line for line in lines)


# -- any edit: exit 0 or 2, never a traceback, never a write -----------------------------------------
def _paths(value: Any, prefix: tuple[Any, ...] = (), depth: int = 4) -> Iterator[tuple[Any, ...]]:
    if prefix:
        yield prefix
    if depth == 0:
        return
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _paths(item, (*prefix, key), depth - 1)
    elif isinstance(value, list):
        for index, item in enumerate(value[:3]):
            yield from _paths(item, (*prefix, index), depth - 1)


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=6,
)
OUT_OF_RANGE = st.sampled_from([-1, 0, -(2**40), 2**40, 2**63, 10**30, 1e308, -1e-9, 1.5, 0.5, 3, 2])
PATH_STRINGS = st.sampled_from(
    ["..", "../../../../etc/passwd", "/etc/passwd", "/", "/tmp", "a/b", "..\\x", "~", "", ".", "x\x00y"]
)
EDITS = st.tuples(st.sampled_from(["delete", "replace"]), st.one_of(JSON_VALUES, OUT_OF_RANGE, PATH_STRINGS))


def edit_json(document: Any, draw: Callable[..., Any]) -> Any:
    """1-3 drawn `EDITS` of a JSON document, in place: a key removed, or a value replaced by a
    value of any type, a number out of range or a path that climbs out. Returns it."""
    paths = list(_paths(document))
    for _ in range(draw(st.integers(1, 3), label="edits")):
        path = draw(st.sampled_from(paths), label="path")
        how, value = draw(EDITS, label="edit")
        parent: Any = document
        try:
            for key in path[:-1]:
                parent = parent[key]
            if how == "delete" and isinstance(parent, dict):
                del parent[path[-1]]
            else:
                parent[path[-1]] = value
        except (KeyError, IndexError, TypeError):
            continue  # an earlier edit removed or replaced the path
    return document


@settings(max_examples=30, suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
@given(data=st.data())
def test_any_edit_of_probe_json_exits_0_or_2_and_writes_nothing(
    data: st.DataObject, trained: SimpleNamespace, capsys: pytest.CaptureFixture[str]
) -> None:
    with tempfile.TemporaryDirectory() as folder:
        run = copy_run(trained, Path(folder))
        meta = edit_json(meta_of(run), data.draw)
        resealed = data.draw(st.booleans(), label="resealed")
        write_json(run / "checkpoint" / META, sealed(meta) if resealed else meta)
        before = snapshot(run)
        code, out, err = predict(capsys, run)
        assert code in (0, 2), (code, out, err)
        assert "Traceback" not in out + err
        if code == 2:
            assert len([line for line in err.splitlines() if line.startswith("probekit: error: ")]) == 1, err
        assert snapshot(run) == before


def test_shown_escapes_and_caps() -> None:
    assert runfiles.shown("a\x1b[2Jb") == "'a\\x1b[2Jb'"
    capped = runfiles.shown("x" * 1000)
    assert len(capped) < 120 and capped.endswith("(1002 characters)")
    assert runfiles.printable("line\nnext\x07") == "line\\nnext\\x07"


def test_a_kind_registered_in_code_says_how_to_register_it(
    trained: SimpleNamespace, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A run whose pooler was registered in a script (no package) names that code and how to
    register the kind again before loading."""
    run = copy_run(trained, tmp_path)

    def in_code(meta: dict[str, Any]) -> None:
        meta["components"].append(
            {"family": "pooler", "kind": "my_pool", "source": "my_experiment (module)", "distribution": None}
        )

    edit_meta(run, in_code)
    line = refused(
        capsys, run, "'my_pool'", "registered in code (my_experiment (module))", "POOLERS.register"
    )
    assert "pip install" not in line
