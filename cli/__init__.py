"""The ``probekit`` command line: a thin Typer layer over the library.

Installed as ``probekit.cli`` (from the top-level ``cli/`` folder of the repository). Every
user error prints one ``probekit: error: ...`` block and exits 2; see ``probekit.errors``.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

app = typer.Typer(
    name="probekit",
    help="Train probes: classifiers that read a pretrained transformer's hidden states.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,
)
components_app = typer.Typer(help="Registered components: poolers, heads, freezers, schedulers, presets.")
config_app = typer.Typer(help="Configs: the JSON schema, presets, validation.")
app.add_typer(components_app, name="components", no_args_is_help=True)
app.add_typer(config_app, name="config", no_args_is_help=True)


def _version(value: bool) -> None:
    if value:
        from probekit._version import __version__

        typer.echo(f"probekit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Train probes: classifiers that read a pretrained transformer's hidden states."""


# -- shell completion (probekit.completion: the config schema and the registries, no torch) ----
def _complete_set(ctx: typer.Context, incomplete: str) -> list[str]:
    from probekit.completion import set_items

    return set_items(incomplete, ctx.params.get("assignments") or ())


def _complete_preset(incomplete: str) -> list[str]:
    from probekit.completion import preset_names

    return preset_names(incomplete)


def _complete_run(incomplete: str) -> list[str]:
    from probekit.completion import run_folders

    return run_folders(incomplete)


RunArgument = Annotated[
    str,
    typer.Argument(
        metavar="RUN", help="A run folder written by probekit train.", autocompletion=_complete_run
    ),
]


def _discover() -> Any:
    import probekit

    return probekit.discover()


@components_app.command("list")
def components_list(
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object for machines.")] = False,
) -> None:
    """Every registered kind per family, with where it came from (plugins included)."""
    import probekit

    report = _discover()
    families = probekit.components()
    unavailable = {name: reg.unavailable() for name, reg in probekit.REGISTRIES.items()}
    if as_json:
        payload = {
            family: [
                {"kind": e.kind, "source": e.source, "distribution": e.distribution, "builtin": e.builtin}
                for e in entries
            ]
            for family, entries in families.items()
        }
        payload_out: dict[str, Any] = {
            "families": payload,
            "unavailable": {f: u for f, u in unavailable.items() if u},
            "plugins_disabled": report.disabled,
        }
        typer.echo(json.dumps(payload_out, indent=2))
        return
    for family, entries in families.items():
        typer.echo(f"{family}:")
        width = max((len(e.kind) for e in entries), default=0)
        for entry in entries:
            typer.echo(f"  {entry.kind:<{width}}  {entry.source}")
        for kind, reason in unavailable[family].items():
            typer.echo(f"  {kind:<{width}}  UNAVAILABLE: {reason}")
    if report.disabled:
        typer.echo("(plugin autoload disabled by PROBEKIT_DISABLE_PLUGIN_AUTOLOAD)")


@config_app.command("schema")
def config_schema() -> None:
    """Print the JSON schema of the full config (every registered kind, plugins included)."""
    import probekit

    _discover()
    typer.echo(json.dumps(probekit.json_schema(), indent=2))


@config_app.command("show")
def config_show(
    preset: Annotated[
        str | None,
        typer.Option(help="A registered preset, e.g. safety8k.", autocompletion=_complete_preset),
    ] = None,
    config: Annotated[Path | None, typer.Option("--config", help="A JSON or YAML config file.")] = None,
    fmt: Annotated[str, typer.Option("--format", help="yaml or json.")] = "yaml",
) -> None:
    """Print a validated config with every default filled in."""
    import probekit
    from probekit.errors import UserError

    _discover()
    if (preset is None) == (config is None):
        raise UserError("give exactly one of --preset or --config")
    if fmt not in {"yaml", "json"}:
        raise UserError(f"--format must be yaml or json, got {fmt!r}")
    cfg = probekit.preset(preset) if preset is not None else probekit.load_config(config)
    typer.echo(probekit.dump_config(cfg, fmt), nl=False)


@config_app.command("validate")
def config_validate(path: Annotated[Path, typer.Argument(help="A JSON or YAML config file.")]) -> None:
    """Check a config file; print every problem with its line and field, exit 2 if any."""
    import probekit

    _discover()
    probekit.load_config(path)
    typer.echo(f"{path}: ok")


presets_app = typer.Typer(help="Released recipes: list them, print one as an editable config.")
app.add_typer(presets_app, name="presets", no_args_is_help=True)


@presets_app.command("list")
def presets_list() -> None:
    """Every registered preset with its description and source."""
    import probekit

    _discover()
    for entry in probekit.PRESETS.entries():
        typer.echo(f"{entry.kind}: {entry.obj.description} [{entry.source}]")


@presets_app.command("show")
def presets_show(
    name: Annotated[str, typer.Argument(help="The preset, e.g. safety8k.", autocompletion=_complete_preset)],
    fmt: Annotated[str, typer.Option("--format", help="yaml or json.")] = "yaml",
) -> None:
    """Print a preset as a complete config file you can edit and pass to --config."""
    config_show(preset=name, config=None, fmt=fmt)


def _echo_err(line: str) -> None:
    typer.echo(line, err=True)


# The options that compose a config, shared by the commands that take one (see compose_config).
PresetOption = Annotated[
    str | None,
    typer.Option(help="A registered preset (safety8k when no --config).", autocompletion=_complete_preset),
]
ConfigOption = Annotated[str | None, typer.Option("--config", help="A full config file (JSON/YAML).")]
ModelOption = Annotated[str | None, typer.Option("--model", help="Hugging Face id or local folder.")]
DataOption = Annotated[
    str | None, typer.Option("--data", help="A data file or a folder with train/val/test.")
]
SetOption = Annotated[
    list[str] | None,
    typer.Option(
        "--set", help="Override any spec field: a.b=value (repeatable).", autocompletion=_complete_set
    ),
]
TrustOption = Annotated[
    bool, typer.Option("--trust-remote-code", help="Allow the model's own Python code to run.")
]


def _path(value: str | None, option: str) -> Path | None:
    """A path option as given (typer would turn an empty one into ``.``, the working folder)."""
    from probekit.errors import UserError

    if value is None:
        return None
    if not value.strip():
        raise UserError(f"{option}: empty path; name a file or folder")
    if "\0" in value:
        raise UserError(f"{option}: {value!r}: a path cannot hold a NUL character")
    return Path(value)


def _protect(config: Path | None) -> dict[str, Path]:
    """The inputs of a command line that the config does not name (see ``train(protect=...)``)."""
    return {"config file (--config)": config} if config is not None else {}


def _compose(
    preset: str | None,
    config: Path | None,
    model: str | None,
    data: str | None,
    assignments: list[str] | None,
    trust_remote_code: bool,
) -> Any:
    """The config those options describe (`probekit.compose_config`)."""
    import probekit

    extra = ["model.trust_remote_code=true"] if trust_remote_code else []
    return probekit.compose_config(
        preset=preset, config=config, model=model, data=data, assignments=[*extra, *(assignments or [])]
    )


@app.command("train")
def train_command(
    preset: PresetOption = None,
    config_text: ConfigOption = None,
    model: ModelOption = None,
    data: DataOption = None,
    assignments: SetOption = None,
    out_text: Annotated[
        str | None, typer.Option("--out", help="Run folder (default runs/<name>-<time>).")
    ] = None,
    run_name: Annotated[
        str | None,
        typer.Option(
            "--name",
            help="Run name: the run folder is runs/<name>-<time> (letters, digits, . _ -; not a path).",
        ),
    ] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty --out.")] = False,
    resume_text: Annotated[
        str | None,
        typer.Option(
            "--resume",
            help="Continue the stopped run of this run folder from its last checkpoint.",
            autocompletion=_complete_run,
        ),
    ] = None,
    allow_spec_change: Annotated[
        bool, typer.Option("--allow-spec-change", help="With --resume: accept a changed config.")
    ] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the resolved plan; do not train.")
    ] = False,
    processes: Annotated[
        int | None,
        typer.Option(
            "--processes",
            min=1,
            help="With --dry-run: plan for this many processes (default: the launcher's WORLD_SIZE, or 1).",
        ),
    ] = None,
    trust_remote_code: TrustOption = False,
) -> None:
    """Train a probe: the preset or config, with --model/--data/--set applied on top."""
    from probekit.errors import UserError

    with _starting():  # imports (torch) and the config: a signal here leaves nothing behind
        from probekit.rundir import check_run_name, safe_run_name
        from probekit.training import prepare, train

        out, resume = _path(out_text, "--out"), _path(resume_text, "--resume")
        config = _path(config_text, "--config")
        if run_name is not None:
            check_run_name(run_name)
            if out is not None or resume is not None:
                raise UserError(
                    "--name picks the folder under runs/; give --name or --out/--resume, not both"
                )
        _discover()
        name = run_name or safe_run_name(preset or (config.stem if config else "safety8k"))
        cfg = _compose(preset, config, model, data, assignments, trust_remote_code)
    if dry_run:
        count = processes or _launched_processes()
        for line in prepare(cfg, num_processes=count).describe():
            typer.echo(line)
        return
    if processes is not None:
        raise UserError("--processes only plans (--dry-run); the launcher decides how many run")
    if resume is not None:
        if out is not None and out.resolve() != resume.resolve():
            raise UserError(f"--resume {resume} and --out {out} name different run folders")
        out = resume
    train(
        cfg,
        out=out,
        overwrite=overwrite,
        log=_echo_err,
        name=name,
        resume=resume is not None,
        allow_spec_change=allow_spec_change,
        protect=_protect(config),
    )


@app.command("sweep")
def sweep_command(
    preset: PresetOption = None,
    config_text: ConfigOption = None,
    model: ModelOption = None,
    data: DataOption = None,
    assignments: SetOption = None,
    layers: Annotated[
        str | None,
        typer.Option(
            "--layers",
            help="Hidden states to probe, comma-separated (0 = embeddings, -1 = last); default all.",
        ),
    ] = None,
    combos: Annotated[
        bool,
        typer.Option("--combos/--no-combos", help="Also probe the best 2, best 3 and all layers combined."),
    ] = True,
    out_text: Annotated[
        str | None, typer.Option("--out", help="Output folder (default runs/sweep-<time>).")
    ] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty --out.")] = False,
    resamples: Annotated[
        int,
        typer.Option(
            "--resamples",
            help="Bootstrap resamples for the 95% intervals and the winner-vs-runner-up check (0: none).",
        ),
    ] = 1000,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the bootstrap resamples.")] = 0,
    trust_remote_code: TrustOption = False,
) -> None:
    """Probe every layer: one frozen pass caches each layer's pooled features, a head trains on
    each layer and on combinations; prints the table (the monitored metric with its 95% bootstrap
    interval) and whether the winner is within the runner-up's interval; writes them with a plot
    and best.yaml."""
    from probekit.sweep import parse_layers, sweep

    out, config = _path(out_text, "--out"), _path(config_text, "--config")
    chosen = parse_layers(layers) if layers is not None else None
    _discover()
    cfg = _compose(preset, config, model, data, assignments, trust_remote_code)
    result = sweep(
        cfg,
        out=out,
        overwrite=overwrite,
        layers=chosen,
        combos=combos,
        resamples=resamples,
        seed=seed,
        log=_echo_err,
        protect=_protect(config),
    )
    for line in result.table():
        typer.echo(line)


@app.command("export")
def export_command(
    run_text: RunArgument,
    out_text: Annotated[str, typer.Option("--out", help="The export folder to write.")],
    export_format: Annotated[str, typer.Option("--format", help="onnx (the only format so far).")] = "onnx",
    quantize: Annotated[
        str | None,
        typer.Option("--quantize", help="int8: also write model.int8.onnx, weights quantised to int8."),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an earlier export in --out.")
    ] = False,
    trust_remote_code: TrustOption = False,
) -> None:
    """Export a trained probe to ONNX: one graph from token ids and attention mask to the task's
    scores, the tokenizer files and probe.json; checked against PyTorch before it is kept."""
    from probekit.errors import UserError

    if export_format != "onnx":
        raise UserError(f"--format {export_format!r}: expected onnx")
    if quantize not in (None, "int8"):
        raise UserError(f"--quantize {quantize!r}: expected int8")
    run, out = _path(run_text, "RUN"), _path(out_text, "--out")
    assert run is not None and out is not None
    with _starting():
        from probekit.export import export_onnx

    result = export_onnx(
        run,
        out,
        quantize="int8" if quantize == "int8" else None,
        overwrite=overwrite,
        trust_remote_code=trust_remote_code,
        log=_echo_err,
    )
    typer.echo(
        f"exported to {result.folder}: {', '.join(sorted(result.files))}, probe.json "
        f"(max |ONNX - PyTorch| {result.max_abs_diff:.2g}"
        + (f"; int8 {result.int8_max_abs_diff:.2g}" if result.int8_max_abs_diff is not None else "")
        + f"; {result.seconds:.1f} s)"
    )


@app.command("serve")
def serve_command(
    run_text: Annotated[
        str,
        typer.Argument(
            metavar="RUN_OR_EXPORT",
            help="A run folder (probekit train) or an ONNX export folder (probekit export).",
            autocompletion=_complete_run,
        ),
    ],
    host: Annotated[
        str, typer.Option("--host", help="The address to bind (only this machine by default).")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="The TCP port.")] = 8000,
    token_file_text: Annotated[
        str | None,
        typer.Option("--token-file", help="A file holding a bearer token /v1/classify and /metrics require."),
    ] = None,
    max_batch: Annotated[int, typer.Option("--max-batch", help="The most texts in one forward pass.")] = 64,
    max_wait_ms: Annotated[
        float, typer.Option("--max-wait-ms", help="How long a forward pass waits for more requests.")
    ] = 5.0,
    queue: Annotated[
        int, typer.Option("--queue", help="The most texts waiting; past that a request gets 503.")
    ] = 256,
    max_text_chars: Annotated[
        int | None,
        typer.Option(
            "--max-text-chars", help="The longest text (default: the run's data.max_text_chars, <= 20000)."
        ),
    ] = None,
    max_texts: Annotated[int, typer.Option("--max-texts", help="The most texts in one request.")] = 256,
    max_body_bytes: Annotated[
        int, typer.Option("--max-body-bytes", help="The largest request body (413 past it).")
    ] = 1 << 20,
    threads: Annotated[
        int | None,
        typer.Option("--threads", help="Compute threads of a forward pass (default: all cores but one)."),
    ] = None,
    trust_remote_code: TrustOption = False,
) -> None:
    """Serve a trained probe over HTTP: POST /v1/classify, GET /healthz, GET /metrics (Prometheus),
    requests micro-batched into shared forward passes; SIGTERM or Ctrl-C stops it gracefully."""
    run, token_file = _path(run_text, "RUN_OR_EXPORT"), _path(token_file_text, "--token-file")
    assert run is not None
    with _starting():
        from probekit.serve import serve

    serve(
        run,
        host,
        port,
        token_file=token_file,
        trust_remote_code=trust_remote_code,
        threads=threads,
        log=_echo_err,
        max_batch=max_batch,
        max_wait_ms=max_wait_ms,
        queue_size=queue,
        max_texts=max_texts,
        max_text_chars=max_text_chars,
        max_body_bytes=max_body_bytes,
    )


@app.command("eval")
def eval_command(
    run_text: RunArgument,
    data_text: Annotated[str, typer.Option("--data", help="A labelled JSONL, CSV or Parquet file.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    by: Annotated[
        str | None,
        typer.Option("--by", help="Every metric per value of this field of the rows (e.g. source)."),
    ] = None,
    threshold: Annotated[
        float | None,
        typer.Option("--threshold", help="Decide at this probability (in [0, 1]), not the run's."),
    ] = None,
    resamples: Annotated[
        int, typer.Option("--resamples", help="Bootstrap resamples of the 95% intervals; 0: none.")
    ] = 1000,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the bootstrap resamples.")] = 0,
    trust_remote_code: TrustOption = False,
) -> None:
    """Evaluate a trained probe on a labelled file; print and write the metrics (an undefined
    metric prints as n/a, and as null in JSON), with bootstrap intervals and, with --by, per
    group; write one prediction per row next to them."""
    from probekit import jsonio
    from probekit.evaluate import evaluate_file

    run, data = _path(run_text, "RUN"), _path(data_text, "--data")
    assert run is not None and data is not None
    result = evaluate_file(
        run,
        data,
        trust_remote_code=trust_remote_code,
        by=by,
        threshold=threshold,
        resamples=resamples,
        seed=seed,
    )
    if as_json:
        typer.echo(jsonio.dumps(result.metrics))
        return
    for line in _metric_lines(result.metrics):
        typer.echo(line)
    if result.written is not None:
        typer.echo(f"written to {result.written}")
    if result.predictions is not None:
        typer.echo(f"predictions written to {result.predictions}")


def _number(value: Any) -> str:
    """A count as an integer, a finite float with four decimals, anything else ``n/a`` (as
    `probekit.evalreport.number`)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return f"{value:.4f}" if isinstance(value, float) and math.isfinite(value) else "n/a"


def _metric_lines(metrics: dict[str, Any]) -> list[str]:
    """Metrics as text (`probekit.evalreport.report_lines`): one line per number, then a table per
    class (or label), a multi-class probe's confusion matrix, a binary probe's confusion counts,
    the bootstrap intervals and the metrics per group."""
    from probekit.evalreport import report_lines

    return report_lines(metrics)


def _predict_options(
    texts: bool, input_file: Path | None, output_format: str, per_text_rows: bool, keep: str | None
) -> list[str]:
    """Check `predict_command`'s options against each other; return the ``--keep`` fields."""
    from probekit.errors import UserError

    if texts and input_file is not None:
        raise UserError("give texts as arguments or --input, not both")
    if output_format not in ("jsonl", "csv"):
        raise UserError(f"--format {output_format!r}: expected jsonl or csv")
    if output_format == "csv" and per_text_rows:
        raise UserError("--format csv writes one row per text: not with --per-token or --show-positions")
    kept = [name.strip() for name in keep.split(",")] if keep else []
    if any(not name for name in kept):
        raise UserError(f"--keep {keep!r}: expected field names separated by commas")
    if kept and input_file is None:
        raise UserError("--keep copies fields of --input rows: give --input FILE")
    return kept


@app.command("predict")
def predict_command(
    run_text: Annotated[
        str,
        typer.Argument(
            metavar="RUN",
            help="A run folder (probekit train) or an export folder (probekit export).",
            autocompletion=_complete_run,
        ),
    ],
    texts: Annotated[
        list[str] | None, typer.Argument(help="Texts to classify (else --input or stdin).")
    ] = None,
    input_text: Annotated[
        str | None,
        typer.Option("--input", help="One text per line, or JSONL/CSV with the run's text field."),
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Texts per batch.", min=1, max=1_000_000)] = 64,
    per_token: Annotated[
        bool,
        typer.Option(
            "--per-token",
            help="Per token, the score of the text cut after it (causal decoder backbones; one pass).",
        ),
    ] = False,
    show_positions: Annotated[
        bool,
        typer.Option(
            "--show-positions",
            help="Print each text's tokens with the ones the probe reads marked [[...]] (data.positions); "
            "no scores.",
        ),
    ] = False,
    keep: Annotated[
        str | None,
        typer.Option(
            "--keep",
            help="With --input a data file: fields copied from each row to its output (comma-separated; "
            "a row's id always is). A name the output uses gets an input_ prefix.",
        ),
    ] = None,
    output_format: Annotated[
        str,
        typer.Option(
            "--format", help="jsonl (one JSON object per text) or csv (a header, then a row per text)."
        ),
    ] = "jsonl",
    plot: Annotated[
        str | None,
        typer.Option(
            "--plot",
            help="With --per-token and one text: draw its per-token scores and the threshold to this PNG.",
        ),
    ] = None,
    backend: Annotated[
        str,
        typer.Option(
            "--backend",
            help="auto (a run folder: torch; an export folder: onnx), torch, onnx, or onnx-int8 "
            "(an export made with --quantize int8).",
        ),
    ] = "auto",
    trust_remote_code: TrustOption = False,
) -> None:
    """Classify texts; write one JSON object per text to stdout (binary: text, label, probability,
    confidence, probabilities; multi-class: text, label, confidence, probabilities, and score and
    flagged with a negative class; --per-token: text, tokens, scores, first_flagged), after the
    input row's id and --keep fields; --format csv writes the same as CSV (nested values as
    probabilities.NAME columns)."""
    from probekit.errors import UserError

    run, input_file = _path(run_text, "RUN"), _path(input_text, "--input")
    assert run is not None
    kept = _predict_options(bool(texts), input_file, output_format, per_token or show_positions, keep)
    exported = _backend(run, backend, per_token or show_positions or plot is not None)
    items, extras = _predict_inputs(run, texts, input_file, kept, None if exported is None else exported.data)
    plot_file = _path(plot, "--plot")
    if plot_file is not None and not per_token:
        raise UserError("--plot draws per-token scores: add --per-token")
    if plot_file is not None and plot_file.suffix.lower() != ".png":
        raise UserError(f"--plot {plot_file}: expected a .png file")
    if exported is not None:
        from probekit.exported import ExportedProbe

        onnx = ExportedProbe(  # the manifest _backend read: the files are not hashed again
            run, precision="int8" if backend == "onnx-int8" else "fp32", manifest=exported
        )
        answered = onnx.predict(list(items), batch_size=batch_size)
        assert isinstance(answered, list)  # a list of texts gives a list of rows
        _write_rows(answered, extras, output_format)
        return
    from probekit.probe import Probe

    probe = Probe.from_pretrained(run, trust_remote_code=trust_remote_code)
    if show_positions:
        from probekit.reading import show_positions as shown

        reader = probe.reader()
        for i, item in enumerate(reader.inputs(list(items))):
            for line in shown(reader, item, where=f"texts[{i}]"):
                typer.echo(line if line.startswith("positions") else f"  {line}")
            if i + 1 < len(items):
                typer.echo("")
        return
    rows = probe.predict(items, batch_size=batch_size, per_token=per_token)
    if plot_file is not None:
        if len(rows) != 1 or probe._task().target != "binary" or not isinstance(probe.threshold, float):
            raise UserError("--plot draws one text's scores on a binary probe: give exactly one text")
        from probekit.plots_extra import plot_token_scores

        plot_token_scores(rows[0], probe.threshold, plot_file)
        typer.echo(f"probekit: per-token scores drawn to {plot_file}", err=True)
    _write_rows(rows, extras, output_format)


def _predict_inputs(
    run: Path, texts: list[str] | None, input_file: Path | None, kept: list[str], data: Any
) -> tuple[Any, list[dict[str, Any]]]:
    """``predict``'s texts (arguments, ``--input`` or stdin) and each input row's kept fields.
    Texts are checked (never coerced), bounded by the run's ``data.max_text_chars`` (``data``:
    an export's ``data`` block instead of the run's), before anything loads."""
    from probekit.data import check_text, stream_text_lines
    from probekit.evaluate import input_spec, read_inputs

    spec = input_spec(run, data)
    max_chars = spec.max_text_chars
    if texts:
        items = [
            check_text(text, f"text argument {i} of {len(texts)}", max_chars)
            for i, text in enumerate(texts, 1)
        ]
        return items, []
    if input_file is not None:
        return read_inputs(input_file, run, kept, spec=spec)
    if sys.stdin is not None and sys.stdin.isatty():
        typer.echo(
            "probekit: reading texts from the terminal, one per line; end with Ctrl-D "
            "(or give texts as arguments, or --input FILE)",
            err=True,
        )
    return stream_text_lines(sys.stdin, "<stdin>", max_chars), []


def _write_rows(rows: list[dict[str, Any]], extras: list[dict[str, Any]], output_format: str) -> None:
    """``predict``'s rows on stdout, after each input row's kept fields, as JSONL or CSV."""
    from probekit import jsonio

    if extras:
        rows = [_with_inputs(extra, row) for extra, row in zip(extras, rows, strict=True)]
    if output_format == "csv":
        typer.echo(_csv(rows), nl=False)
        return
    for row in rows:
        typer.echo(jsonio.dumps(row, ensure_ascii=False))


def _backend(run: Path, backend: str, torch_only: bool) -> Any:
    """The manifest of the export folder ``run`` when ``predict`` runs it with ONNX Runtime, None
    when it runs a run folder with torch; a backend that does not fit the folder is refused."""
    from probekit.errors import UserError
    from probekit.exported import is_export, read_manifest

    if backend not in ("auto", "torch", "onnx", "onnx-int8"):
        raise UserError(f"--backend {backend!r}: expected auto, torch, onnx or onnx-int8")
    if not is_export(run):
        if backend.startswith("onnx"):
            raise UserError(
                f"--backend {backend}: {run} is a run folder; export it first "
                f"(probekit export {run} --out DIR), then predict DIR"
            )
        return None
    if backend == "torch":
        raise UserError(f"--backend torch: {run} is an ONNX export; it runs with --backend onnx")
    if torch_only:
        raise UserError(
            f"{run} is an ONNX export: --per-token, --show-positions and --plot need the run folder"
        )
    return read_manifest(run)


def _with_inputs(extra: dict[str, Any], row: dict[str, Any]) -> dict[str, Any]:
    """An output row after the input row's kept fields (a name the output uses gets ``input_``)."""
    kept = {(f"input_{k}" if k in row else k): v for k, v in extra.items()}
    return {**kept, **row}


def _csv(rows: list[dict[str, Any]]) -> str:
    """Rows as CSV: a header of every key in order of first appearance; a nested mapping becomes
    ``key.name`` columns."""
    import csv
    import io

    flat = []
    for row in rows:
        out: dict[str, Any] = {}
        for key, value in row.items():
            if isinstance(value, dict):
                out.update({f"{key}.{name}": v for name, v in value.items()})
            elif isinstance(value, (list, tuple)):
                out[key] = json.dumps(value, ensure_ascii=False)
            else:
                out[key] = value
        flat.append(out)
    columns = list(dict.fromkeys(key for row in flat for key in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(flat)
    return buffer.getvalue()


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; map probekit errors to exit codes (see ``probekit.errors``)."""
    from probekit.errors import EXIT_INTERRUPTED, EXIT_TERMINATED, PeerLostError, ProbekitError, Terminated

    logging.basicConfig(format="probekit: warning: %(message)s", level=logging.WARNING, stream=sys.stderr)
    # huggingface_hub prints its warnings through its own handler, and they would reach the root
    # handler above too: each was printed twice. Its handler alone prints them (as transformers').
    logging.getLogger("huggingface_hub").propagate = False
    previous = signal.signal(signal.SIGTERM, _terminate)
    previous_int = signal.getsignal(signal.SIGINT)
    if previous_int is not signal.SIG_IGN:  # from here on Ctrl-C unwinds (see probekit._startup)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        code = app(args=argv, prog_name="probekit", standalone_mode=False)
    except ProbekitError as exc:
        for line in str(exc).splitlines() or [type(exc).__name__]:
            typer.echo(f"probekit: error: {_rank_tag()}{line}", err=True)
        if isinstance(exc, PeerLostError) and _launched_processes() > 1:
            _leave_now(exc.exit_code)
        return exc.exit_code
    except KeyboardInterrupt:
        typer.echo("probekit: interrupted by Ctrl-C", err=True)
        return EXIT_INTERRUPTED
    except Terminated:
        typer.echo("probekit: terminated by SIGTERM", err=True)
        return EXIT_TERMINATED
    except typer.Exit as exc:
        if isinstance(exc.__cause__, KeyboardInterrupt):  # typer's own Ctrl-C handling: say so
            typer.echo("probekit: interrupted by Ctrl-C", err=True)
        return int(exc.exit_code)
    except typer.Abort:
        typer.echo("probekit: aborted", err=True)
        return EXIT_INTERRUPTED
    except Exception as exc:
        # Usage errors of click (vendored by recent typer): unknown option or command, missing
        # argument. They know how to print themselves and carry exit code 2.
        show, exit_code = getattr(exc, "show", None), getattr(exc, "exit_code", None)
        if callable(show) and isinstance(exit_code, int):
            show()
            return exit_code
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)
    return code if isinstance(code, int) else 0


@contextmanager
def _starting() -> Iterator[None]:
    """Ctrl-C or SIGTERM while a command imports and checks its inputs, before it writes anything:
    one line that says so (``probekit._startup`` covers the moments before ``main``)."""
    from probekit.errors import InterruptedRunError, Terminated, TerminatedError

    try:
        yield
    except KeyboardInterrupt:
        raise InterruptedRunError("interrupted by Ctrl-C while starting; nothing was written") from None
    except Terminated:
        raise TerminatedError("terminated by SIGTERM while starting; nothing was written") from None


def _leave_now(code: int) -> None:
    """End a launched training process without the interpreter's teardown. A process group with
    a dead or frozen peer can abort the process (SIGABRT) while it is torn down, and a stopped run
    can be ended by a late SIGINT there. The run folder is already closed and the error printed,
    so nothing is lost by skipping the teardown. Only from the command's own entry points:
    ``main`` called in-process by other code returns."""
    import os

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _rank_tag() -> str:
    """``[rank R] `` in a multi-process launch (torchrun, accelerate launch), where every process
    prints its own errors; empty otherwise."""
    import os

    return f"[rank {os.environ.get('RANK', '?')}] " if _launched_processes() > 1 else ""


def _launched_processes() -> int:
    from probekit.blocks import launched_processes

    return launched_processes()


def _terminate(signum: int, frame: Any) -> None:
    """SIGTERM outside the training loop: unwind like Ctrl-C, past any ``except Exception`` of the
    libraries at work (training removes an unfinished run folder without checkpoints; inside the
    loop its own handler stops after a checkpoint)."""
    from probekit.errors import Terminated

    raise Terminated


def run() -> None:
    """Console-script entry point. A run stopped by Ctrl-C or SIGTERM has closed its folder and
    printed its line by now; it ends without the interpreter's teardown, where a signal that
    landed inside native code (a torch op) can still surface and end the process by SIGINT
    instead of the exit code just promised."""
    from probekit.errors import EXIT_INTERRUPTED, EXIT_TERMINATED

    code = main()
    if code in (EXIT_INTERRUPTED, EXIT_TERMINATED):
        _leave_now(code)
    sys.exit(code)
