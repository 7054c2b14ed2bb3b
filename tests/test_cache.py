"""The frozen-prefix activation cache: same results as without it, less work, never stale."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

import probekit.training
import probekit.training.loop
from probekit.cache import CachePlan, plan_cache
from probekit.config import ProbeConfig
from probekit.training import Callback, RunResult, prepare, train

from .engine_fixtures import (
    Recorder,
    ToyData,
    bert_dir,
    llama_dir,
    make_config,
    no_plots,
    read_jsonl,
    save_tiny_bert,
    toy_data,
)

__all__ = ["bert_dir", "llama_dir", "no_plots", "toy_data"]


def run(
    config: ProbeConfig, out: Path, lines: list[str] | None = None, callbacks: tuple[Callback, ...] = ()
) -> RunResult:
    return train(
        config,
        out=out,
        log=(lines.append if lines is not None else lambda _l: None),
        progress=False,
        callbacks=callbacks,
    )


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "checkpoint" / "probe.safetensors")


# Dropout is on in every trainable part (tiny BERT: 0.1), so equal results also mean the cached
# run draws the same random numbers in the same order.
SCENARIOS = {
    # safety8k on 4 blocks: 3 frozen; pools hidden states 2-4, so block 3 runs from cached state 3.
    "prefix": ("bert", (), "prefix", (2, 3), 3),
    # a pooler with parameters over frozen layers: cached per token, pooler and head train.
    "layers": ("bert", ("freezer.kind=all", "pooler.combine=scalar_mix"), "layers", (2, 3, 4), 0),
    # everything frozen, parameter-free pooler: pooled features, only the head trains.
    "pooled": ("bert", ("freezer.kind=all",), "pooled", (2, 3, 4), 0),
    # a decoder, left-padded, with position ids from the mask: the replay keeps them right.
    "llama-left": ("llama", ("model.padding_side=left",), "prefix", (2, 3), 3),
}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_cached_and_uncached_training_agree(
    scenario: str,
    bert_dir: Path,
    llama_dir: Path,
    toy_data: ToyData,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    no_plots: list[Any],
) -> None:
    family, extra, mode, layers, boundary = SCENARIOS[scenario]
    folder = bert_dir if family == "bert" else llama_dir
    results: dict[bool, tuple[RunResult, dict[str, torch.Tensor], list[Any], list[str]]] = {}
    for cached in (True, False):
        config = make_config(folder, toy_data, *extra, f"train.cache.enabled={str(cached).lower()}")
        recorder = Recorder()
        lines: list[str] = []
        result = run(config, tmp_path / f"run-{cached}", lines, (recorder,))
        results[cached] = (result, weights(result.run_dir), [v.scores for v in recorder.val], lines)

    config = make_config(folder, toy_data, *extra)
    plan, _ = plan_cache(prepare(config).probe)
    assert plan == CachePlan(mode, layers, boundary)  # type: ignore[arg-type]
    assert any(line.startswith("activation cache train:") for line in results[True][3])
    assert not any(line.startswith("activation cache train:") for line in results[False][3])

    (a, wa, pa, _), (b, wb, pb, _) = results[True], results[False]
    assert wa.keys() == wb.keys() and wa
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], atol=2e-5, rtol=1e-4, msg=name)
    assert len(pa) == len(pb) >= 2
    for x, y in zip(pa, pb, strict=True):
        torch.testing.assert_close(torch.as_tensor(x), torch.as_tensor(y), atol=2e-5, rtol=1e-4)
    for split in a.metrics:
        for key in ("accuracy", "f1"):
            assert a.metrics[split][key] == b.metrics[split][key]
    history = [
        {k: v for k, v in row.items() if k != "lr_head"} for row in read_jsonl(a.run_dir / "metrics.jsonl")
    ]
    reference = [
        {k: v for k, v in row.items() if k != "lr_head"} for row in read_jsonl(b.run_dir / "metrics.jsonl")
    ]
    for row, ref in zip(history, reference, strict=True):
        assert row.keys() == ref.keys()
        for key in row:
            assert row[key] == pytest.approx(ref[key], abs=1e-4), key


def test_frozen_prefix_runs_once_not_every_epoch(
    bert_dir: Path, toy_data: ToyData, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_plots: list[Any]
) -> None:
    """Rows through frozen block 0: one pass over train + val to fill the cache, then none (the
    test split, evaluated once, runs through the backbone)."""
    counts: dict[bool, int] = {}
    for cached in (True, False):
        config = make_config(
            bert_dir, toy_data, "train.epochs=3", f"train.cache.enabled={str(cached).lower()}"
        )
        rows = 0
        real = probekit.training.prepare

        def counting(*args: Any, real: Any = real, **kwargs: Any) -> Any:
            prepared = real(*args, **kwargs)
            block = prepared.probe.layout.blocks(prepared.probe.backbone)[0]

            def hook(_m: Any, args: Any, _kwargs: Any) -> None:
                nonlocal rows
                hidden = args[0] if args else _kwargs["hidden_states"]
                rows += hidden.shape[0]

            block.register_forward_pre_hook(hook, with_kwargs=True)
            return prepared

        monkeypatch.setattr(probekit.training, "prepare", counting)
        run(config, tmp_path / f"run-{cached}")
        monkeypatch.undo()
        counts[cached] = rows
    n_train, n_val, n_test = (len(toy_data.texts(s)) for s in ("train", "val", "test"))
    assert counts[True] == n_train + n_val + n_test + 1  # + the one-token probe of the block format
    assert counts[False] == 3 * (n_train + n_val) + n_test


def test_no_cache_when_the_embeddings_or_block_zero_train(bert_dir: Path, toy_data: ToyData) -> None:
    for assignment, reason in (
        ("freezer.kind=none", "the embeddings train"),
        ("freezer.kind=regex", "block 0 trains"),
    ):
        extra = [assignment]
        if assignment == "freezer.kind=regex":
            extra.append('freezer.patterns=["^embeddings\\\\.", "^encoder\\\\.layer\\\\.[23]\\\\."]')
        prepared = prepare(make_config(bert_dir, toy_data, *extra))
        assert prepared.cache_plan is None
        assert reason in prepared.cache_reason
        assert f"activation cache: none, no frozen prefix ({reason})" in prepared.describe()


def test_dry_run_describes_cache_and_padding(bert_dir: Path, toy_data: ToyData) -> None:
    lines = prepare(make_config(bert_dir, toy_data)).describe()
    text = "\n".join(lines)
    assert "activation cache: hidden states [2, 3] per token; blocks 0-2 run once" in text
    assert "(float32, for this run)" in text
    batching = next(line for line in lines if line.startswith("batching:"))
    assert "length buckets of 50 batches" in batching and "random batches:" in batching


def test_memory_mapped_cache_gives_the_same_run_and_is_removed(
    bert_dir: Path, toy_data: ToyData, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_plots: list[Any]
) -> None:
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    lines: list[str] = []
    mapped = run(make_config(bert_dir, toy_data, "train.cache.max_memory_gb=0"), tmp_path / "mapped", lines)
    memory = run(make_config(bert_dir, toy_data), tmp_path / "memory")
    assert any("(temporary)" in line and "probekit-cache-" in line for line in lines)
    assert list((tmp_path / "tmp").iterdir()) == []  # the temporary cache is gone
    for name, tensor in weights(mapped.run_dir).items():
        torch.testing.assert_close(tensor, weights(memory.run_dir)[name], atol=0, rtol=0)


def _reuse(lines: list[str]) -> dict[str, bool]:
    return {
        line.split()[2].rstrip(":"): line.endswith("reused")
        for line in lines
        if line.startswith("activation cache ") and line.split()[2].rstrip(":") in {"train", "val"}
    }


def test_persistent_cache_is_reused_only_when_everything_matches(
    tmp_path: Path, toy_data: ToyData, no_plots: list[Any]
) -> None:
    model = save_tiny_bert(tmp_path / "model")
    store = tmp_path / "cache"
    base = (f"train.cache.dir={store}", "train.epochs=1")

    def attempt(name: str, *extra: str, data: ToyData = toy_data) -> tuple[dict[str, bool], RunResult]:
        lines: list[str] = []
        result = run(make_config(model, data, *base, *extra), tmp_path / name, lines)
        return _reuse(lines), result

    first, r1 = attempt("first")
    assert first == {"train": False, "val": False}
    again, r2 = attempt("again")
    assert again == {"train": True, "val": True}
    for name, tensor in weights(r1.run_dir).items():
        torch.testing.assert_close(tensor, weights(r2.run_dir)[name], atol=0, rtol=0)

    # Anything the cached values depend on makes a different key.
    assert attempt("length", "model.max_length=12")[0] == {"train": False, "val": False}
    assert attempt("layers", "pooler.layers=[-1,-2]")[0] == {"train": False, "val": False}
    assert attempt("dtype", "train.cache.dtype=bf16")[0] == {"train": False, "val": False}
    assert attempt("right-again")[0] == {"train": True, "val": True}
    # ... including the frozen weights, changed in place in the same folder.
    path = model / "model.safetensors"
    state = load_file(path)
    state["embeddings.word_embeddings.weight"][7, 0] += 0.5
    save_file(state, path, metadata={"format": "pt"})
    assert attempt("weights")[0] == {"train": False, "val": False}
    # ... and the data: one changed row in train, val untouched.
    rows = dict(toy_data.rows)
    rows["train"] = [dict(rows["train"][0], text=rows["train"][0]["text"] + " sky"), *rows["train"][1:]]
    changed = tmp_path / "data2"
    changed.mkdir()
    for split, split_rows in rows.items():
        (changed / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in split_rows))
    assert attempt("data", *(a.replace(str(toy_data.folder), str(changed)) for a in toy_data.assignments()))[
        0
    ] == {
        "train": False,
        "val": True,
    }
    # Only complete caches are kept, each a folder with its key in the metadata.
    folders = sorted(p.name for p in store.iterdir())
    assert not [f for f in folders if f.startswith(".")]
    for folder in store.iterdir():
        meta = json.loads((folder / "cache.json").read_text())
        assert folder.name.endswith(meta["key"][:24])


def test_a_damaged_persistent_cache_is_rebuilt_not_read(
    tmp_path: Path, toy_data: ToyData, no_plots: list[Any]
) -> None:
    model = save_tiny_bert(tmp_path / "model")
    store = tmp_path / "cache"
    config = make_config(model, toy_data, f"train.cache.dir={store}", "train.epochs=1")
    first = run(config, tmp_path / "first")
    for folder in store.iterdir():
        data = folder / "activations.bin"
        data.write_bytes(data.read_bytes()[:-8])  # truncated
    lines: list[str] = []
    second = run(config, tmp_path / "second", lines)
    assert _reuse(lines) == {"train": False, "val": False}
    for name, tensor in weights(first.run_dir).items():
        torch.testing.assert_close(tensor, weights(second.run_dir)[name], atol=0, rtol=0)


def test_bf16_holds_frozen_modules_in_bf16_and_trains_fp32(
    bert_dir: Path, toy_data: ToyData, tmp_path: Path, no_plots: list[Any]
) -> None:
    config = make_config(bert_dir, toy_data, "train.precision=bf16", "train.epochs=1")
    prepared = prepare(config)
    probe = prepared.probe
    assert "frozen modules held in bf16" in "\n".join(prepared.describe())
    assert "(bfloat16, for this run)" in "\n".join(prepared.describe())
    for name, param in probe.named_parameters():
        expected = torch.float32 if param.requires_grad else torch.bfloat16
        assert param.dtype == expected, name
    result = run(config, tmp_path / "run")
    assert all(t.dtype == torch.float32 for t in weights(result.run_dir).values())
    assert 0.0 <= result.metrics["val"]["auroc"] <= 1.0


def test_eval_batches_longest_first_and_results_in_row_order(
    bert_dir: Path, toy_data: ToyData, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_plots: list[Any]
) -> None:
    """Val is batched by length, yet the probabilities the threshold sees are in row order: the
    saved probe gives the same ones text by text."""
    from probekit.probe import Probe

    widths: list[int] = []
    real = probekit.training.loop.inference_loader

    def spy(*args: Any, **kwargs: Any) -> Any:
        loader = real(*args, **kwargs)
        widths.extend(len(b) for b in loader.batch_sampler)  # type: ignore[arg-type]
        return loader

    monkeypatch.setattr(probekit.training.loop, "inference_loader", spy)
    recorder = Recorder()
    config = make_config(bert_dir, toy_data, "train.eval_batch_size=5", "train.epochs=1")
    result = run(config, tmp_path / "run", callbacks=(recorder,))
    probs = [v.scores for v in recorder.val]
    probe = Probe.from_pretrained(result.run_dir)
    expected = probe.predict_proba(toy_data.texts("val"))
    torch.testing.assert_close(
        torch.as_tensor(probs[0]), torch.as_tensor(expected, dtype=torch.float32), atol=1e-5, rtol=1e-4
    )
    loader = real(prepare(config).encoded["val"], 0, 5)
    lengths = prepare(config).encoded["val"].lengths
    order = [i for batch in loader.batch_sampler for i in batch]  # type: ignore[union-attr]
    assert [lengths[i] for i in order] == sorted(lengths, reverse=True)
