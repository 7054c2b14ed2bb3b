"""``probekit sweep``: the one-pass feature cache, the candidates, the outputs, the error paths."""

from __future__ import annotations

import contextlib
import io
import json
import math
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal

import numpy as np
import pytest
import torch
import yaml
from hypothesis import given
from hypothesis import strategies as st
from probekit.cli import main
from torch import Tensor, nn

from probekit import Probe, load_config
from probekit.batching import Collator, Encoded
from probekit.errors import UserError
from probekit.freezers.all import FreezeAllSpec
from probekit.heads.linear import LinearHeadSpec
from probekit.inference import Runner
from probekit.plots import plot_layers
from probekit.poolers import ClsSpec, LastTokenSpec, MaskedMeanSpec, MaxSpec, MultiLayerSpec
from probekit.poolers.base import Pooler
from probekit.spec import BuildContext, PoolerSpec, TokenPoolerSpec
from probekit.sweep import (
    SWEEP_FILES,
    Candidate,
    FeatureProbe,
    best_config,
    choose_combinations,
    parse_layers,
    pool_layers,
    sweep,
    sweep_pooler,
)
from tests import engine_fixtures
from tests.engine_fixtures import (
    ToyData,
    assert_one_line_error,
    leftovers,
    make_config,
    names,
    quiet,
    run_cli,
)

bert_dir = engine_fixtures.bert_dir
toy_data = engine_fixtures.toy_data
single_thread = engine_fixtures.single_thread

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
LAYERS = 5  # hidden states of the 4-block test backbones: 0 (embeddings) .. 4


CPU = Runner(torch.device("cpu"))
"""Inference on the CPU, no autocast, one process."""


def sweep_args(model: Path, data: ToyData, *extra: str | Path) -> list[str]:
    """``probekit sweep`` on the tiny BERT and toy data, on the CPU, short rows, a few epochs."""
    return [
        *("sweep", "--model", str(model), "--data", str(data.folder)),
        *("--set", "train.cpu=true", "--set", "model.max_length=16", "--set", "train.epochs=3"),
        *map(str, extra),
    ]


# -- the one-pass cache equals a probe on each layer --------------------------------------------
def encoded_rows(count: int = 10, seed: int = 0) -> Encoded:
    """Rows of random token ids (2..99) of lengths 1..9, alternating labels."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 10, (count,), generator=gen).tolist()
    ids = [torch.randint(2, 100, (n,), generator=gen).tolist() for n in lengths]
    return Encoded(ids, [i % 2 for i in range(count)], 0)


@pytest.mark.parametrize(
    ("family", "pooler", "side"),
    [
        ("bert", MaskedMeanSpec, "right"),
        ("bert", MaxSpec, "right"),
        ("bert", ClsSpec, "left"),
        ("gpt2", LastTokenSpec, "left"),
        ("gpt2", MaskedMeanSpec, "right"),
    ],
)
def test_cached_features_equal_a_probe_pooling_that_single_layer(
    backbone_factory: Callable[..., nn.Module],
    family: str,
    pooler: Callable[..., TokenPoolerSpec],
    side: Literal["left", "right"],
) -> None:
    backbone = backbone_factory(family, fresh=True)
    encoded = encoded_rows()
    reader = Probe(backbone, pooler(), LinearHeadSpec(), FreezeAllSpec())
    # Length-sorted batches of 3 rows: each batch is padded differently from the reference's.
    features = pool_layers(
        reader, encoded, range(LAYERS), CPU, pad_id=0, padding_side=side, batch_size=3, max_tokens=None
    )
    assert features.shape == (len(encoded), LAYERS, 32) and features.dtype == np.float32
    batch = Collator(encoded, 0, side)(list(range(len(encoded))))  # every row at once, split order
    for layer in range(LAYERS):
        probe = Probe(backbone, pooler(layer=layer), LinearHeadSpec(), FreezeAllSpec())
        with torch.inference_mode():
            expected = probe.features(batch.input_ids, batch.attention_mask).numpy()
        np.testing.assert_allclose(
            features[:, layer], expected, rtol=1e-5, atol=1e-5, err_msg=f"layer {layer}"
        )
    # A subset in any order: the columns follow the requested order.
    subset = pool_layers(
        reader, encoded, (3, 1), CPU, pad_id=0, padding_side=side, batch_size=3, max_tokens=None
    )
    np.testing.assert_allclose(subset, features[:, [3, 1]], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("combine", ["mean", "concat"])
def test_best_yaml_of_a_combination_computes_what_the_sweep_measured(
    backbone_factory: Callable[..., nn.Module], combine: Literal["mean", "concat"]
) -> None:
    """The combination's features (cached layers, combined as the sweep combines them) equal the
    features of the probe its best config builds."""
    backbone = backbone_factory("bert", fresh=True)
    encoded = encoded_rows()
    reader = Probe(backbone, MaskedMeanSpec(), LinearHeadSpec(), FreezeAllSpec())
    cached = pool_layers(reader, encoded, range(LAYERS), CPU, pad_id=0, batch_size=4)
    spec = MultiLayerSpec(layers=(-3, -2, -1), combine=combine, token_pooler=MaskedMeanSpec())
    config = load_config({"pooler": spec.model_dump(), "freezer": {"kind": "all"}})
    token, how = sweep_pooler(config.pooler)
    assert how == combine
    candidate = Candidate("top 2", (1, 3), how, {"val": {}}, 0.5, 1, 1)
    chosen = best_config(config, candidate, token)
    assert chosen.pooler.model_dump(mode="json") == {
        "kind": "multilayer",
        "layers": [1, 3],
        "combine": combine,
        "combine_at": "pooled",
        "token_pooler": {"kind": "masked_mean", "layer": -1},
    }
    assert chosen.model_dump(exclude={"pooler"}) == config.model_dump(exclude={"pooler"})
    probe = Probe.from_config(chosen, backbone)
    batch = Collator(encoded, 0)(list(range(len(encoded))))
    with torch.inference_mode():
        expected = probe.features(batch.input_ids, batch.attention_mask)
        combiner = FeatureProbe(nn.Identity(), probe.pooler)  # type: ignore[arg-type]
        pooled = combiner(features=torch.from_numpy(cached[:, [1, 3]]))
    np.testing.assert_allclose(pooled.numpy(), expected.numpy(), rtol=1e-5, atol=1e-5)


# -- the CLI end to end -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cli_sweep(bert_dir: Path, toy_data: ToyData, tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """One ``probekit sweep`` (all layers, combinations) from a fresh working folder, no --out."""
    home = tmp_path_factory.mktemp("sweep-home")
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        mp.chdir(home)
        code = main(sweep_args(bert_dir, toy_data))
    runs = sorted((home / "runs").iterdir()) if (home / "runs").is_dir() else []
    return SimpleNamespace(code=code, out=out.getvalue(), err=err.getvalue(), home=home, runs=runs)


def test_cli_sweep_writes_every_output(cli_sweep: SimpleNamespace) -> None:
    assert cli_sweep.code == 0, cli_sweep.err
    assert "Traceback" not in cli_sweep.err
    (run,) = cli_sweep.runs
    assert run.name.startswith("sweep-") and sorted(p.name for p in cli_sweep.home.iterdir()) == ["runs"]
    assert names(run) == sorted(SWEEP_FILES)
    assert not leftovers(run.parent)
    assert (run / "layers.png").read_bytes()[:8] == PNG_SIGNATURE

    report = json.loads((run / "sweep.json").read_text())
    assert report["layers"] == list(range(LAYERS)) and report["monitor"] == "auroc"
    candidates = report["candidates"]
    singles = [c for c in candidates if c["combine"] is None]
    combos = [c for c in candidates if c["combine"] is not None]
    assert [c["layers"] for c in singles] == [[layer] for layer in range(LAYERS)]
    assert [c["name"] for c in combos] == ["top 2", "top 3", "all"]
    assert {c["combine"] for c in combos} == {"mean"}  # safety8k's multilayer combine
    assert combos[-1]["layers"] == list(range(LAYERS))
    for c in candidates:
        assert set(c["metrics"]) == {"val", "test"}
        for key in ("accuracy", "f1", "auroc", "auprc", "recall_at_1pct_fpr", "recall_at_5pct_fpr", "ece"):
            assert 0.0 <= c["metrics"]["val"][key] <= 1.0
    values = [c["metrics"]["val"]["auroc"] for c in candidates]
    assert report["best"] == candidates[values.index(max(values))]  # the first of the best
    assert report["seconds"]["features"] >= 0.0 and report["seconds"]["probes"] > 0.0

    table = (run / "sweep.md").read_text().splitlines()
    assert cli_sweep.out.splitlines() == table
    assert len(table) == 2 + len(candidates)
    assert sum("(best)" in row for row in table) == 1
    assert f"best: {report['best']['name']}" in cli_sweep.err


def test_best_yaml_is_the_config_with_the_best_pooler_and_trains(
    cli_sweep: SimpleNamespace, bert_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (run,) = cli_sweep.runs
    best = json.loads((run / "sweep.json").read_text())["best"]
    config = load_config(run / "best.yaml")
    raw = yaml.safe_load((run / "best.yaml").read_text())
    if best["combine"] is None:
        assert raw["pooler"] == {"kind": "masked_mean", "layer": best["layers"][0]}
    else:
        assert raw["pooler"]["layers"] == best["layers"] and raw["pooler"]["combine_at"] == "pooled"
    assert config.model.name == str(bert_dir) and config.freezer.kind == "bottom"  # the spec's freezer
    assert config.train.epochs == 3 and config.model.max_length == 16
    out = tmp_path / "trained"
    code, _, err = run_cli(
        capsys, "train", "--config", str(run / "best.yaml"), "--set", "train.epochs=1", "--out", str(out)
    )
    assert code == 0, err
    assert (out / "checkpoint").is_dir()


def test_sweep_is_deterministic_for_a_seed(bert_dir: Path, toy_data: ToyData, tmp_path: Path) -> None:
    config = make_config(bert_dir, toy_data, "head.kind=mlp", "train.epochs=3")
    first = sweep(config, out=tmp_path / "a", log=quiet, progress=False)
    second = sweep(config, out=tmp_path / "b", log=quiet, progress=False)
    assert [c.metrics for c in first.candidates] == [c.metrics for c in second.candidates]
    reports = [json.loads((tmp_path / name / "sweep.json").read_text()) for name in ("a", "b")]
    assert reports[0]["candidates"] == reports[1]["candidates"]
    for split, array in first.features.items():
        assert array.shape == (len(toy_data.rows[split]), LAYERS, 32)
        np.testing.assert_array_equal(array, second.features[split])
    other = sweep(
        config.model_copy(update={"train": config.train.model_copy(update={"seed": 1})}),
        out=tmp_path / "c",
        log=quiet,
        progress=False,
        combos=False,
    )
    assert [c.metrics for c in other.candidates] != [c.metrics for c in first.candidates[:LAYERS]]


def test_layers_and_no_combos(
    bert_dir: Path, toy_data: ToyData, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "few"
    code, stdout, err = run_cli(
        capsys, *sweep_args(bert_dir, toy_data, "--layers", "-1, 0,2", "--no-combos", "--out", out)
    )
    assert code == 0, err
    report = json.loads((out / "sweep.json").read_text())
    assert report["layers"] == [0, 2, 4]  # in layer order, whatever order --layers gave
    assert [c["layers"] for c in report["candidates"]] == [[0], [2], [4]]
    assert len(stdout.splitlines()) == 2 + 3


# -- bad input ----------------------------------------------------------------------------------
def test_a_layer_out_of_range_is_one_line_and_leaves_nothing(
    bert_dir: Path, toy_data: ToyData, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "runs" / "bad"
    code, stdout, err = run_cli(capsys, *sweep_args(bert_dir, toy_data, "--layers", "0,9", "--out", out))
    assert_one_line_error(
        code, stdout, err, "--layers: layer 9 does not exist", "0 = embeddings .. 4 = last block"
    )
    assert not out.parent.exists(), "the parent folder the sweep created is removed again"


def test_a_malformed_layer_list_is_refused_before_loading(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, stdout, err = run_cli(
        capsys, "sweep", "--model", str(tmp_path / "nothing"), "--layers", "1,x", "--out", str(tmp_path / "o")
    )
    assert_one_line_error(code, stdout, err, "--layers '1,x': 'x' is not a layer index")
    assert names(tmp_path) == []


def test_a_launched_sweep_is_refused(
    bert_dir: Path,
    toy_data: ToyData,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Under torchrun every process would run the whole sweep and race for --out."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    out = tmp_path / "o"
    code, stdout, err = run_cli(capsys, *sweep_args(bert_dir, toy_data, "--out", out))
    assert_one_line_error(code, stdout, err, "probekit sweep runs in one process")
    assert not out.exists() and names(tmp_path) == []


def test_a_non_empty_out_needs_overwrite(
    bert_dir: Path, toy_data: ToyData, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, stdout, err = run_cli(capsys, *sweep_args(bert_dir, toy_data, "--out", out))
    assert_one_line_error(code, stdout, err, f"{out}: the output folder exists and is not empty")
    assert names(out) == ["keep.txt"] and not leftovers(tmp_path)
    once = ("--no-combos", "--layers", "4")
    # --overwrite replaces an earlier sweep (or run) only, never a folder of other files.
    code, stdout, err = run_cli(capsys, *sweep_args(bert_dir, toy_data, "--out", out, "--overwrite", *once))
    assert_one_line_error(code, stdout, err, "--overwrite replaces only an earlier probekit run")
    assert names(out) == ["keep.txt"]
    sweep = tmp_path / "sweep"
    for _ in range(2):
        code, _, err = run_cli(capsys, *sweep_args(bert_dir, toy_data, "--out", sweep, "--overwrite", *once))
        assert code == 0, err
    assert names(sweep) == sorted(SWEEP_FILES) and not leftovers(tmp_path)


class _LearnedPool(Pooler):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.score = nn.Linear(width, 1)

    def forward(self, hidden: Tensor, mask: Tensor) -> Tensor:
        weights = self.score(hidden).squeeze(-1).masked_fill(mask == 0, -1e9).softmax(dim=-1)
        return torch.einsum("bt,bth->bh", weights, hidden)

    def output_dim(self, hidden_size: int) -> int:
        return hidden_size


class _LearnedPoolSpec(TokenPoolerSpec):
    kind: Literal["learned_pool"] = "learned_pool"

    def build(self, ctx: BuildContext) -> _LearnedPool:
        return _LearnedPool(ctx.hidden_size)


def test_a_pooler_with_parameters_is_refused(
    isolated_registry: Any,
    bert_dir: Path,
    toy_data: ToyData,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    isolated_registry["poolers"].register(_LearnedPoolSpec)
    out = tmp_path / "learned"
    args = sweep_args(bert_dir, toy_data, "--set", "pooler.token_pooler.kind=learned_pool", "--out", out)
    code, stdout, err = run_cli(capsys, *args)
    assert_one_line_error(
        code, stdout, err, "pooler 'learned_pool' has parameters", "masked_mean", "last_token", "multilayer"
    )
    assert names(tmp_path) == []
    # Refused before anything loads: the model named here does not even exist.
    args[args.index("--model") + 1] = str(tmp_path / "no-model")
    code, stdout, err = run_cli(capsys, *args)
    assert_one_line_error(code, stdout, err, "pooler 'learned_pool' has parameters")
    assert names(tmp_path) == []


def test_a_multi_layer_pooler_other_than_multilayer_is_refused() -> None:
    class TwoLayerSpec(PoolerSpec):
        kind: Literal["two_layer"] = "two_layer"
        multi_layer = True

    with pytest.raises(UserError, match="a sweep pools each layer with a single-layer pooler"):
        sweep_pooler(TwoLayerSpec())
    assert sweep_pooler(MaxSpec(layer=2)) == (MaxSpec(layer=2), "concat")


# -- pure logic ---------------------------------------------------------------------------------
@given(st.lists(st.integers(-1000, 1000), min_size=1, max_size=12), st.sampled_from(["", " ", "  "]))
def test_parse_layers_reads_any_comma_list_of_integers(layers: list[int], space: str) -> None:
    text = f",{space}".join(f"{space}{layer}" for layer in layers)
    assert parse_layers(text) == tuple(layers)


@given(st.text(alphabet="0123456789,- ax.", max_size=12))
def test_parse_layers_accepts_integers_only(text: str) -> None:
    try:
        parsed = parse_layers(text)
    except UserError as exc:
        assert "is not a layer index" in str(exc)
        assert any(not _is_int(item) for item in text.split(","))
    else:
        assert parsed == tuple(int(item) for item in text.split(","))


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


scores_strategy = st.dictionaries(
    st.integers(0, 40),
    st.one_of(st.floats(0.0, 1.0), st.just(math.nan), st.sampled_from([0.25, 0.5, 0.75])),
    min_size=1,
    max_size=12,
)


@given(scores_strategy, st.booleans())
def test_combinations_are_the_best_layers_and_all(scores: dict[int, float], lower: bool) -> None:
    combos = choose_combinations(scores, lower_is_better=lower)
    sets = [layers for _, layers in combos]
    assert len(set(sets)) == len(sets)  # no combination twice
    assert all(
        len(layers) >= 2 and list(layers) == sorted(layers) and set(layers) <= set(scores) for layers in sets
    )
    # "all" repeats "top 2" or "top 3" for 2 or 3 layers; one layer has no combination
    expected = {1: [], 2: ["top 2"], 3: ["top 2", "top 3"]}.get(len(scores), ["top 2", "top 3", "all"])
    assert [label for label, _ in combos] == expected
    assert sets[-1:] == [tuple(sorted(scores))][: len(sets)]  # the last one reads every layer

    def key(layer: int) -> float:
        value = scores[layer]
        return math.inf if math.isnan(value) else (value if lower else -value)

    for label, layers in combos:
        outside = set(scores) - set(layers)
        # every chosen layer ranks at least as well as every layer left out (ties: lower index)
        assert all((key(a), a) < (key(b), b) for a in layers for b in outside), (label, layers)


def test_plot_layers_writes_a_png_with_gaps_and_combinations(tmp_path: Path) -> None:
    rows: list[dict[str, float | None]] = [
        {"accuracy": 0.5, "auroc": math.nan, "auprc": None},
        {"accuracy": 0.7, "auroc": 0.8, "auprc": 0.75},
    ]
    path = plot_layers(
        [0, 1], rows, tmp_path / "a.png", [("all", {"accuracy": 0.9, "auroc": 0.95})], best="all"
    )
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    empty = plot_layers([3], [{}], tmp_path / "b.png", best="3")
    assert empty.read_bytes()[:8] == PNG_SIGNATURE
    with pytest.raises(UserError, match="2 layers but 1 rows"):
        plot_layers([0, 1], rows[:1], tmp_path / "c.png")


def test_the_sweep_runs_under_train_deterministic(
    bert_dir: Path, toy_data: ToyData, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """train.deterministic holds for the sweep's whole run (backbone pass and candidates) and not
    after it; an operation without a deterministic kernel is named in one line, nothing kept."""
    import probekit.sweep

    seen: list[bool] = []

    def no_kernel(*_args: Any, **_kwargs: Any) -> Any:
        seen.append(torch.are_deterministic_algorithms_enabled())
        raise RuntimeError("index_add_cuda_ does not have a deterministic implementation, but you set ...")

    monkeypatch.setattr(probekit.sweep, "_sweep", no_kernel)
    config = make_config(bert_dir, toy_data, "freezer.kind=all", "train.deterministic=true")
    with pytest.raises(UserError, match=r"^train.deterministic: index_add_cuda_ has no deterministic kernel"):
        sweep(config, out=tmp_path / "sweep", log=quiet, progress=False)
    assert seen == [True] and not torch.are_deterministic_algorithms_enabled()
    assert not (tmp_path / "sweep").exists() and leftovers(tmp_path) == []
