# ruff: noqa: F811  (pytest fixtures imported by name)
"""Streaming per-token scores (`probekit.streaming`): the score at token ``t`` is exactly the score
of the same input truncated after ``t`` tokens, on every decoder family, with either padding side,
for every built-in pooler; bidirectional encoders are refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import probekit
from probekit import Probe
from probekit.errors import UserError
from probekit.heads import LinearHeadSpec, MLPHeadSpec
from probekit.poolers import EmaSpec, LastTokenSpec, MaskedMeanSpec, MaxSpec, MultiLayerSpec, RollingMaxSpec
from probekit.spec import PoolerSpec
from probekit.streaming import running_logits
from tests.backbones import DECODERS, make_backbone, make_batch
from tests.engine_fixtures import ToyData, bert_dir, llama_dir, make_config, quiet, run_cli, toy_data  # noqa: F401

POOLERS: list[PoolerSpec] = [
    MaskedMeanSpec(),
    MaxSpec(),
    LastTokenSpec(),
    EmaSpec(alpha=0.3),
    RollingMaxSpec(window=2),
    MultiLayerSpec(layers=(-2, -1), combine="concat", combine_at="pooled", token_pooler=EmaSpec()),
    MultiLayerSpec(layers=(1, -1), combine="scalar_mix", token_pooler=RollingMaxSpec(window=3)),
]


def left_pad(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rows = [
        (torch.roll(i, int((m == 0).sum())), torch.roll(m, int((m == 0).sum())))
        for i, m in zip(ids, mask, strict=True)
    ]
    return torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])


@pytest.mark.parametrize("family", DECODERS)
@pytest.mark.parametrize("side", ["right", "left"])
def test_the_score_at_each_token_is_the_score_of_the_text_cut_there(family: str, side: str) -> None:
    backbone = make_backbone(family, num_layers=3)
    ids, mask = make_batch(batch=3, tokens=7, seed=1)
    if side == "left":
        ids, mask = left_pad(ids, mask)
    # every pooler on two families; the mean and the rolling max (running sums) on all
    for spec in POOLERS if family in ("llama", "gpt2") else [POOLERS[0], POOLERS[4]]:
        torch.manual_seed(0)
        probe = Probe(backbone, spec, MLPHeadSpec(hidden_sizes=(8,))).eval()
        with torch.no_grad():
            steps = running_logits(probe, ids, mask)
            for row in range(ids.shape[0]):
                real = mask[row].bool()
                tokens = ids[row][real]
                for t in range(1, len(tokens) + 1):
                    cut = probe(tokens[:t].unsqueeze(0), torch.ones(1, t, dtype=torch.long))[0]
                    at = steps[row][real][t - 1]
                    assert torch.allclose(at, cut, atol=1e-5, rtol=1e-4), (family, side, spec.kind, row, t)


def test_predict_per_token_streams_the_scores_of_a_text(llama_dir: Path) -> None:
    from transformers import AutoModel, AutoTokenizer

    config = probekit.preset("safety8k", model={"max_length": 32}, pooler={"kind": "masked_mean"})
    probe = probekit.build(config, AutoModel.from_pretrained(llama_dir))
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    tokenizer.pad_token = tokenizer.eos_token
    texts = ["we like tea and the park", "a bomb in the park", "poison"]
    probe.attach(tokenizer=tokenizer, label_names=["safe", "unsafe"], threshold=0.5).eval()
    assert not probe._causal_checked
    rows = probe.predict(texts, per_token=True)
    assert probe._causal_checked  # checked once; later calls do not run the two extra passes
    whole = probe.predict_proba(texts)
    for row, text, p in zip(rows, texts, whole, strict=True):
        assert row["text"] == text and len(row["tokens"]) == len(row["scores"])
        assert row["tokens"] == tokenizer.convert_ids_to_tokens(tokenizer(text)["input_ids"])
        assert row["scores"][-1] == pytest.approx(p, abs=1e-5)  # the whole text's own score
        flagged = [t for t, s in enumerate(row["scores"]) if s >= 0.5]
        assert row["first_flagged"] == (flagged[0] if flagged else None)
    # each prefix, scored on its own, gives the streamed score (the text-level promise)
    ids = tokenizer(texts[1])["input_ids"]
    for t in range(1, len(ids) + 1):
        prefix = tokenizer.decode(ids[:t], skip_special_tokens=True)
        if tokenizer(prefix)["input_ids"] == ids[:t]:
            assert probe.predict_proba(prefix) == pytest.approx(rows[1]["scores"][t - 1], abs=1e-5)
    alone = probe.predict("poison", per_token=True)  # one string: one dict, the same numbers
    assert alone["tokens"] == rows[2]["tokens"] and alone["first_flagged"] == rows[2]["first_flagged"]
    assert alone["scores"] == pytest.approx(rows[2]["scores"], abs=1e-5)  # batched with padding or not


def test_a_bidirectional_backbone_is_refused_in_one_line(bert_dir: Path) -> None:
    from transformers import AutoModel, AutoTokenizer

    probe = probekit.build(
        probekit.preset("safety8k", model={"max_length": 16}), AutoModel.from_pretrained(bert_dir)
    )
    probe.attach(tokenizer=AutoTokenizer.from_pretrained(bert_dir)).eval()
    with pytest.raises(UserError) as caught:
        probe.predict("a bomb in the park", per_token=True)
    message = str(caught.value)
    assert message.startswith("per-token scores need a causal (decoder) backbone: in bert every token sees")
    assert "changing the last token moved earlier hidden states by" in message
    assert "\n" not in message


def test_the_cli_streams_per_token_scores(
    llama_dir: Path, toy_data: ToyData, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from probekit.training import train

    config = make_config(llama_dir, toy_data, "pooler.kind=masked_mean", "head.kind=linear")
    train(config, out=tmp_path / "run", log=quiet, progress=False)
    code, out, err = run_cli(capsys, "predict", str(tmp_path / "run"), "a bomb in the park", "--per-token")
    assert code == 0, err
    row = json.loads(out)
    assert set(row) == {"text", "tokens", "scores", "first_flagged"} and len(row["tokens"]) == len(
        row["scores"]
    )
    code, out, _ = run_cli(capsys, "predict", str(tmp_path / "run"), "a bomb in the park")
    assert json.loads(out)["probability"] == pytest.approx(row["scores"][-1], abs=1e-5)


def test_a_linear_head_on_a_plugin_style_pooler_streams_through_the_default() -> None:
    """A pooler without its own ``running`` is pooled prefix by prefix: still exact."""
    from probekit.poolers.base import Pooler
    from probekit.poolers.masked_mean import MaskedMean

    class Plain(MaskedMean):
        running = Pooler.running  # the default, as a plugin would inherit it

    backbone = make_backbone("gpt2", num_layers=2)
    probe = Probe(backbone, MaskedMeanSpec(), LinearHeadSpec()).eval()
    ids, mask = make_batch(batch=2, tokens=5)
    with torch.no_grad():
        fast = running_logits(probe, ids, mask)
        probe.pooler = Plain()
        slow = running_logits(probe, ids, mask)
    assert torch.allclose(fast, slow, atol=1e-6)
