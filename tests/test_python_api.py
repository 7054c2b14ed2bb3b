# ruff: noqa: F811  (pytest fixtures imported by name)
"""The Python API as a notebook uses it: typed overrides, the trained probe on the result, and the
warnings a short run deserves."""

from __future__ import annotations

from pathlib import Path

import pytest

import probekit
from probekit import Probe
from probekit.config import compose_config
from probekit.errors import ConfigError
from probekit.training import train
from tests.engine_fixtures import FAST, ToyData, bert_dir, make_config, toy_data  # noqa: F401  (fixtures)


def test_typed_overrides_equal_the_same_set_assignments() -> None:
    typed = probekit.preset(
        "safety8k",
        train={"epochs": 3, "cache": {"enabled": False}},
        optimizer={"lr_head": 1e-3},
        data={"label_map": {"safe": 0, "unsafe": 1}},
    )
    dotted = compose_config(
        preset="safety8k",
        assignments=[
            "train.epochs=3",
            "train.cache.enabled=false",
            "optimizer.lr_head=0.001",
            'data.label_map={"safe": 0, "unsafe": 1}',
        ],
    )
    assert typed == dotted
    assert typed.replace(train={"epochs": 5}).train.epochs == 5 and typed.train.epochs == 3  # frozen


def test_a_new_kind_replaces_the_block_and_mappings_are_replaced_whole() -> None:
    config = probekit.preset("safety8k", head={"kind": "linear", "dropout": 0.1})
    assert config.head.model_dump() == {"kind": "linear", "num_classes": 2, "dropout": 0.1}  # no mlp fields
    weighted = config.replace(loss={"class_weights": {"a": 2.0}}).replace(loss={"class_weights": {"b": 3.0}})
    assert weighted.loss.class_weights == {"b": 3.0}


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"train": {"epoch": 3}}, "train.epoch: unknown field 'epoch'; did you mean 'epochs'?"),
        ({"trian": {"epochs": 3}}, "trian: unknown field 'trian'; did you mean 'train'?"),
        ({"train": {"epochs": 0}}, "train.epochs: Input should be greater than or equal to 1"),
        ({"head": {"kind": "mpl"}}, "head"),
    ],
)
def test_typed_overrides_are_validated_like_set(
    overrides: dict[str, dict[str, object]], expected: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        probekit.preset("safety8k", **overrides)
    assert expected in str(caught.value)


def test_the_result_carries_the_trained_probe(bert_dir: Path, toy_data: ToyData, tmp_path: Path) -> None:
    result = train(make_config(bert_dir, toy_data), out=tmp_path / "run", log=lambda _l: None, progress=False)
    assert isinstance(result.probe, Probe) and not result.probe.training
    texts = toy_data.texts("test")[:6]
    reloaded = Probe.from_pretrained(tmp_path / "run")
    assert result.probe.predict_proba(texts) == pytest.approx(reloaded.predict_proba(texts), abs=1e-6)
    assert result.probe.predict(texts[0]) == reloaded.predict(texts[0])


def test_a_run_that_is_all_warmup_says_so(bert_dir: Path, toy_data: ToyData) -> None:
    from probekit.training import prepare

    short = prepare(make_config(bert_dir, toy_data, "train.epochs=1"))
    assert any(line.startswith("warning: warmup covers the whole run (3 of 3") for line in short.describe())
    longer = prepare(make_config(bert_dir, toy_data, "train.epochs=4"))
    assert not any(line.startswith("warning: warmup") for line in longer.describe())


def test_a_learning_rate_far_outside_the_known_range_is_a_warning(bert_dir: Path, toy_data: ToyData) -> None:
    from probekit.training import prepare

    def warnings(*assignments: str) -> list[str]:
        lines = prepare(make_config(bert_dir, toy_data, "train.epochs=4", *assignments)).describe()
        return [line for line in lines if line.startswith("warning: optimizer.")]

    assert warnings() == []  # the preset's own rates
    assert warnings("optimizer.lr_head=1.0", "optimizer.lr_body=5e-7") == []  # ten times: not yet
    assert warnings("optimizer.lr_head=5", "optimizer.lr_body=1e-8") == [
        "warning: optimizer.lr_head=5 is far above the range known to work for a pooler and head "
        "(0.0001 to 0.1 with AdamW): training may diverge",
        "warning: optimizer.lr_body=1e-08 is far below the range known to work for fine-tuned "
        "transformer blocks (5e-06 to 0.0001 with AdamW): training may barely move",
    ]
    # A part that does not train is not warned about.
    assert warnings("freezer.kind=all", "optimizer.lr_body=1") == []


def test_a_probe_built_in_your_own_code_saves_and_loads(bert_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModel, AutoTokenizer

    config = probekit.preset("safety8k", model={"max_length": 16})
    probe = probekit.build(config, AutoModel.from_pretrained(bert_dir))
    probe.attach(
        tokenizer=AutoTokenizer.from_pretrained(bert_dir), label_names=["safe", "unsafe"], threshold=0.4
    )
    probe.eval()
    folder = probe.save_pretrained(tmp_path / "mine")
    again = Probe.from_pretrained(folder)
    texts = ["the cat sat", "a bomb in the park"]
    assert again.predict_proba(texts) == pytest.approx(probe.predict_proba(texts), abs=1e-6)
    assert again.predict(texts[1]) == probe.predict(texts[1]) and again.threshold == 0.4
    with pytest.raises(probekit.errors.UserError, match="not an empty folder; pass overwrite=True"):
        probe.save_pretrained(folder)
    probe.save_pretrained(folder, overwrite=True)


def test_the_trained_probe_saves_and_loads(bert_dir: Path, toy_data: ToyData, tmp_path: Path) -> None:
    result = train(make_config(bert_dir, toy_data), out=tmp_path / "run", log=lambda _l: None, progress=False)
    assert result.probe is not None
    result.probe.save_pretrained(tmp_path / "copy")
    texts = toy_data.texts("test")[:5]
    assert Probe.from_pretrained(tmp_path / "copy").predict(texts) == Probe.from_pretrained(
        tmp_path / "run"
    ).predict(texts)


def test_train_a_model_you_loaded_yourself(bert_dir: Path, toy_data: ToyData, tmp_path: Path) -> None:
    """Neither loaded nor copied: the probe trains the very module passed, and the run reloads."""
    from transformers import AutoModel, AutoTokenizer

    model, tokenizer = AutoModel.from_pretrained(bert_dir), AutoTokenizer.from_pretrained(bert_dir)
    config = make_config(bert_dir, toy_data).replace(model={"name": "not-used-when-a-model-is-given"})
    result = train(
        config, out=tmp_path / "run", model=model, tokenizer=tokenizer, log=lambda _l: None, progress=False
    )
    assert result.probe is not None and result.probe.backbone is model
    texts = toy_data.texts("test")[:4]
    assert Probe.from_pretrained(tmp_path / "run").predict_proba(texts) == pytest.approx(
        result.probe.predict_proba(texts), abs=1e-6
    )
    # The passed model's own name is recorded, so the run reloads it.
    assert str(bert_dir) in (tmp_path / "run" / "config.yaml").read_text()


def test_a_half_precision_model_without_autocast_is_refused_in_one_line(
    bert_dir: Path, toy_data: ToyData, tmp_path: Path
) -> None:
    import torch
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(bert_dir, dtype=torch.bfloat16)
    with pytest.raises(
        probekit.errors.UserError,
        match=r"^model=: its weights are bf16 but this run computes in fp32; set train.precision=bf16",
    ):
        train(
            make_config(bert_dir, toy_data),
            out=tmp_path / "run",
            model=model,
            tokenizer=AutoTokenizer.from_pretrained(bert_dir),
            log=lambda _l: None,
            progress=False,
        )
    assert not (tmp_path / "run").exists()
