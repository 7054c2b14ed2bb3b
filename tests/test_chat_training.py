"""Training, evaluating and serving probes on conversations: a chat template from a file stored
in the run, predict/eval on conversation files, token-level training, the ``chat-prompt-guard``
preset's plan on a 32-block Llama-shaped backbone, and the per-token plot."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from probekit.config import compose_config
from probekit.errors import UserError
from tests.chat_fixtures import CHATML_TEMPLATE, conversation_rows, save_chat_model, write_rows
from tests.engine_fixtures import quiet_train, run_cli

FAST = ["train.epochs=2", "train.cpu=true", "train.precision=fp32", "model.max_length=64"]
POOLER = 'pooler={"kind": "masked_mean", "layer": -1}'


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Qwen2-shaped model whose ChatML tokenizer has its template removed (so runs need
    data.chat.template_file), and the template as a file beside it."""
    folder = save_chat_model(tmp_path_factory.mktemp("chat") / "qwen2", "qwen2", "chatml")
    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    for extra in folder.glob("chat_template.*"):
        extra.unlink()
    (folder.parent / "chatml.jinja").write_text(CHATML_TEMPLATE, encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def conversations(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_rows(tmp_path_factory.mktemp("conv") / "conv.jsonl", conversation_rows(60))


def _assignments(model: Path, data: Path, *extra: str) -> list[str]:
    return [
        f"model.name={model}",
        f"data.path={data}",
        "data.chat.classify=response",
        f"data.chat.template_file={model.parent / 'chatml.jinja'}",
        "data.positions=response",
        POOLER,
        *FAST,
        *extra,
    ]


def test_a_tokenizer_without_a_template_is_refused_in_one_line(
    chat_model: Path, conversations: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run_cli(
        capsys,
        "train",
        "--dry-run",
        *[
            arg
            for a in _assignments(chat_model, conversations)
            if "template_file" not in a
            for arg in ("--set", a)
        ],
    )
    assert code == 2
    assert err.strip().count("\n") == 0
    assert "has no chat template; give one with data.chat.template_file" in err


def test_train_predict_eval_on_conversations(
    chat_model: Path, conversations: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from probekit.probe import Probe

    config = compose_config(assignments=_assignments(chat_model, conversations))
    result = quiet_train(config, tmp_path / "run")
    run = result.run_dir
    stored = (run / "config.yaml").read_text(encoding="utf-8")
    assert "im_start" in stored  # the template's text, so the run no longer needs the file
    (chat_model.parent / "chatml.jinja").rename(chat_model.parent / "moved.jinja")
    try:
        probe = Probe.from_pretrained(run)
        rows = conversation_rows(4, seed=3)
        direct = probe.predict_proba([{"prompt": r["prompt"], "response": r["response"]} for r in rows])
        write_rows(tmp_path / "in.jsonl", rows)
        code, out, err = run_cli(capsys, "predict", run, "--input", tmp_path / "in.jsonl")
        assert code == 0, err
        printed = [json.loads(line) for line in out.splitlines()]
        assert [p["probability"] for p in printed] == pytest.approx(direct, abs=1e-6)
        assert printed[0]["text"].startswith("user: ")
        code, out, err = run_cli(capsys, "predict", run, "--input", tmp_path / "in.jsonl", "--per-token")
        assert code == 0, err
        streamed = [json.loads(line) for line in out.splitlines()]
        assert [s["scores"][-1] for s in streamed] == pytest.approx(direct, abs=1e-5)
        assert "<|im_start|>assistant" in streamed[0]["rendered"]
        assert streamed[0]["text"] == printed[0]["text"]
        code, out, err = run_cli(capsys, "predict", run, "--input", tmp_path / "in.jsonl", "--show-positions")
        assert code == 0, err
        heads = [line for line in out.splitlines() if line.startswith("positions response: the pooler reads")]
        assert len(heads) == 4 and "[[" in out and "[[<|im_start|>]]" not in out
        code, _, err = run_cli(capsys, "eval", run, "--data", conversations)
        assert code == 0, err
        # a response probe given a bare text: one located line, exit 2
        code, _, err = run_cli(capsys, "predict", run, "how do I bake bread")
        assert code == 2 and "no response to classify" in err and err.strip().count("\n") == 0
    finally:
        (chat_model.parent / "moved.jinja").rename(chat_model.parent / "chatml.jinja")


def test_predict_plot_writes_the_token_scores(
    chat_model: Path, conversations: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = compose_config(assignments=_assignments(chat_model, conversations, "train.epochs=1"))
    run = quiet_train(config, tmp_path / "run").run_dir
    write_rows(tmp_path / "one.jsonl", conversation_rows(2)[1:])
    png = tmp_path / "tokens.png"
    code, _, err = run_cli(
        capsys, "predict", run, "--input", tmp_path / "one.jsonl", "--per-token", "--plot", png
    )
    assert code == 0, err
    assert png.read_bytes().startswith(b"\x89PNG")
    for extra, message in (
        ((), "--plot draws per-token scores: add --per-token"),
        (("--per-token", "--plot", tmp_path / "x.svg"), "expected a .png file"),
    ):
        args = ["predict", run, "--input", tmp_path / "one.jsonl", *extra]
        if not extra:
            args += ["--plot", png]
        code, _, err = run_cli(capsys, *args)
        assert code == 2 and message in err
    write_rows(tmp_path / "two.jsonl", conversation_rows(2))
    code, _, err = run_cli(
        capsys, "predict", run, "--input", tmp_path / "two.jsonl", "--per-token", "--plot", png
    )
    assert code == 2 and "give exactly one text" in err


# -- token-level training ----------------------------------------------------------------------------
def test_token_level_loss_is_normalised_per_row() -> None:
    """Each row's loss is the mean over its read tokens: a row weighs the same whether it reads one
    token or many copies of it, and the sum equals the row-level loss when every row reads one
    token."""
    from probekit.config import ThresholdSpec
    from probekit.tasks.binary import BinaryTask
    from probekit.training.loop import token_level_loss

    task = BinaryTask(ThresholdSpec())
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 2, generator=gen)
    labels = torch.tensor([1, 0])
    one = torch.tensor([[0, 0, 1, 0, 0], [1, 0, 0, 0, 0]])
    loss, rows = token_level_loss(task, logits, one, labels, smoothing=0.1)
    picked = torch.stack([logits[0, 2], logits[1, 0]])
    assert loss == pytest.approx(float(task.loss(picked, labels, smoothing=0.1)), rel=1e-6)
    torch.testing.assert_close(rows, picked)
    repeated = logits.clone()
    repeated[0, :] = logits[0, 2]  # row 0: five copies of the token it read
    many = torch.tensor([[1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    loss_many, _ = token_level_loss(task, repeated, many, labels, smoothing=0.1)
    assert loss_many == pytest.approx(float(loss), rel=1e-6)
    mixed = torch.tensor([[1, 1, 0, 0, 1], [1, 1, 1, 0, 0]])
    loss_mixed, _ = token_level_loss(task, logits, mixed, labels)
    expected = sum(
        float(task.loss(logits[r][mixed[r].bool()], labels[r].repeat(int(mixed[r].sum()))))
        / int(mixed[r].sum())
        for r in range(2)
    )
    assert loss_mixed == pytest.approx(expected, rel=1e-6)


def test_token_level_training_runs_without_the_pooled_cache(
    chat_model: Path, conversations: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = _assignments(chat_model, conversations, "loss.token_level=true", 'freezer={"kind": "all"}')
    code, out, err = run_cli(capsys, "train", "--dry-run", *[x for a in args for x in ("--set", a)])
    assert code == 0, err
    cache_line = next(line for line in out.splitlines() if line.startswith("activation cache"))
    assert "pooled" not in cache_line and "per token" in cache_line
    config = compose_config(assignments=args)
    result = quiet_train(config, tmp_path / "run")
    history = result.history
    assert len(history) == 2 and all(math.isfinite(row["train_loss"]) for row in history)
    from probekit.probe import Probe

    probe = Probe.from_pretrained(result.run_dir)
    assert (
        0.0
        <= probe.predict_proba({"prompt": "plan a trip", "response": "Here is what I know about it."})
        <= 1.0
    )


# -- the chat preset ---------------------------------------------------------------------------------
def test_chat_prompt_guard_dry_run_on_32_blocks(
    tmp_path: Path, conversations: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The preset's plan on a 32-block Llama-shaped backbone (width 32, random weights): the
    generation prompt's tokens of a prompt-only rendering, hidden state -8 = block 25's output,
    every block frozen, the pooled cache (the backbone runs once, up to that block)."""
    import transformers as tf

    from tests.chat_fixtures import chat_tokenizer

    tok = chat_tokenizer("llama3")
    config = tf.LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    folder = tmp_path / "llama-32"
    tf.LlamaModel(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    code, out, err = run_cli(
        capsys,
        "train",
        "--preset",
        "chat-prompt-guard",
        "--model",
        folder,
        "--data",
        conversations,
        "--set",
        "train.cpu=true",
        "--dry-run",
    )
    assert code == 0, err
    assert "llama, 32 blocks, width 32" in out
    assert "reading: conversations in the tokenizer's chat template, classifying the prompt" in out
    assert "positions generation_prompt" in out
    marked = [line for line in out.splitlines() if "[[" in line]
    assert marked and "[[<|start_header_id|>]]" in " ".join(marked)
    assert "pooling: masked_mean over hidden states [25]" in out
    assert "blocks frozen 0-31" in out
    assert "activation cache: pooled" in out


def test_chat_prompt_guard_needs_eight_blocks(
    chat_model: Path, conversations: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run_cli(
        capsys,
        "train",
        "--preset",
        "chat-prompt-guard",
        "--model",
        chat_model,
        "--data",
        conversations,
        "--set",
        f"data.chat.template_file={chat_model.parent / 'chatml.jinja'}",
        "--dry-run",
    )
    assert code == 2 and "layer -8 does not exist" in err


def test_cache_key_depends_on_the_read_tokens_only_for_pooled_features() -> None:
    from probekit.cache import cache_key

    rows = [[1, 2, 3], [4, 5]]
    pooled = {"mode": "pooled"}
    assert cache_key(pooled, rows)[0] != cache_key(pooled, rows, [[0, 1, 1], [1, 1]])[0]
    assert cache_key(pooled, rows, [[0, 1, 1], [1, 1]])[0] != cache_key(pooled, rows, [[1, 1, 1], [1, 1]])[0]
    layers = {"mode": "layers"}
    assert cache_key(layers, rows)[0] == cache_key(layers, rows, [[0, 1, 1], [1, 1]])[0]


def test_reader_refuses_a_slow_tokenizer() -> None:
    from probekit.chat import ChatSpec
    from probekit.reading import Reader

    class Slow:
        chat_template = CHATML_TEMPLATE
        all_special_ids: tuple[int, ...] = ()
        truncation_side = "right"

        def apply_chat_template(self, messages: list[dict[str, Any]], **kwargs: Any) -> str:
            return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)

        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            raise NotImplementedError("return_offset_mapping is not available when using Python tokenizers")

    reader = Reader(Slow(), ChatSpec(), "prompt", 64)
    with pytest.raises(UserError, match="needs a fast tokenizer"):
        reader.encode(reader.inputs([{"prompt": "hi"}]))


def test_the_cls_pooler_refuses_positions(
    chat_model: Path, conversations: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = [a for a in _assignments(chat_model, conversations) if a != POOLER] + ['pooler={"kind": "cls"}']
    code, _, err = run_cli(capsys, "train", "--dry-run", *[x for a in args for x in ("--set", a)])
    assert code == 2 and "pooler cls reads the first token whatever data.positions selects" in err
