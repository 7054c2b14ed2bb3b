"""Offline fixtures for the training-engine tests: tiny saved backbones and a toy JSONL dataset.

Everything is built in code: a randomly initialised BERT (WordPiece tokenizer over the toy
vocabulary) and a Llama-shaped decoder (word-level tokenizer with ``eos`` but no ``pad`` token),
each saved with ``save_pretrained`` into a folder that ``model.name`` can point at, and
train/val/test JSONL files whose label is 1 exactly when a text holds a word of `BAD`.

Model folders are cached per test session (keyed by the session's temporary root), so the
modules that import these fixtures share them.
"""

from __future__ import annotations

import json
import random
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from probekit.checkpoint import trainable_state
from probekit.config import ProbeConfig, compose_config
from probekit.training.callbacks import BestWeights, Callback

NEUTRAL = (
    *("the", "cat", "sat", "on", "mat", "dog", "ran", "in", "park", "sun", "is", "warm", "we", "like"),
    *("green", "tea", "a", "bird", "sings", "today", "river", "flows", "slowly", "blue", "sky", "book"),
    *("reads", "well", "quiet", "room"),
)
"""Words of every text."""
BAD = ("poison", "bomb")
"""A text holding one of these words has label 1."""
SPECIAL_BERT = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
SPECIAL_LLAMA = ("<unk>", "<s>", "</s>")
WORDS = tuple(dict.fromkeys([*NEUTRAL, *BAD]))

TINY = {"hidden": 32, "layers": 4, "heads": 4}


# -- data --------------------------------------------------------------------------------------
def make_rows(n: int, seed: int = 0, names: Sequence[Any] = (0, 1)) -> list[dict[str, Any]]:
    """``n`` distinct rows ``{"text", "label"}``, alternating classes; positives hold a `BAD` word."""
    rng = random.Random(seed)
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    while len(rows) < n:
        positive = len(rows) % 2 == 1
        words = rng.choices(NEUTRAL, k=rng.randint(2, 5))
        if positive:
            words.insert(rng.randint(0, len(words)), rng.choice(BAD))
        text = " ".join(words)
        if text in seen:
            continue
        seen.add(text)
        rows.append({"text": text, "label": names[1] if positive else names[0]})
    return rows


def write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


@dataclass(frozen=True)
class ToyData:
    """Paths of a toy dataset and its rows per split."""

    folder: Path
    rows: dict[str, list[dict[str, Any]]]

    def path(self, split: str) -> Path:
        return self.folder / f"{split}.jsonl"

    def texts(self, split: str) -> list[str]:
        return [row["text"] for row in self.rows[split]]

    def labels(self, split: str) -> list[Any]:
        return [row["label"] for row in self.rows[split]]

    def assignments(self, *, test: bool = True) -> list[str]:
        """``--set`` assignments pointing ``data.train/val/test`` at these files."""
        out = [f"data.train={self.path('train')}", f"data.val={self.path('val')}"]
        if test:
            out.append(f"data.test={self.path('test')}")
        return out


def write_toy_data(
    folder: Path,
    *,
    train: int = 96,
    val: int = 48,
    test: int = 48,
    seed: int = 0,
    names: Sequence[Any] = (0, 1),
) -> ToyData:
    """Write ``train.jsonl``, ``val.jsonl`` and ``test.jsonl`` (no text shared between splits)."""
    rows = make_rows(train + val + test, seed=seed, names=names)
    splits = {"train": rows[:train], "val": rows[train : train + val], "test": rows[train + val :]}
    for name, split_rows in splits.items():
        if split_rows:
            write_jsonl(folder / f"{name}.jsonl", split_rows)
    return ToyData(folder, splits)


# -- tiny backbones ----------------------------------------------------------------------------
def save_tiny_bert(
    folder: Path, *, layers: int = TINY["layers"], seed: int = 0, dropout: float = 0.1
) -> Path:
    """A random BertModel (width 32) and a WordPiece tokenizer over the toy words, saved to ``folder``."""
    import torch
    import transformers as tf

    vocab = {token: i for i, token in enumerate([*SPECIAL_BERT, *WORDS])}
    tokenizer = tf.BertTokenizer(vocab=vocab)
    config = tf.BertConfig(
        vocab_size=len(vocab),
        hidden_size=TINY["hidden"],
        num_hidden_layers=layers,
        num_attention_heads=TINY["heads"],
        intermediate_size=2 * TINY["hidden"],
        max_position_embeddings=64,
        pad_token_id=vocab["[PAD]"],
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    torch.manual_seed(seed)
    weights = tf.BertModel(config).state_dict()
    # 512 positions, as BERT's (the default model.max_length, 256, fits), with the first 64 and
    # every other weight as drawn above: texts of up to 64 tokens read exactly as before.
    key = "embeddings.position_embeddings.weight"
    extra = torch.randn(512 - 64, TINY["hidden"], generator=torch.Generator().manual_seed(seed)) * 0.02
    weights[key] = torch.cat([weights[key], extra])
    config.max_position_embeddings = 512
    model = tf.BertModel(config)
    model.load_state_dict({k: v for k, v in weights.items() if k != "embeddings.position_ids"}, strict=False)
    assert torch.equal(model.state_dict()[key], weights[key])
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def save_tiny_llama(folder: Path, *, layers: int = TINY["layers"], seed: int = 0) -> Path:
    """A random LlamaModel (width 32) and a word-level tokenizer without a pad token."""
    import torch
    import transformers as tf
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {token: i for i, token in enumerate([*SPECIAL_LLAMA, *WORDS])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = tf.PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    config = tf.LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=TINY["hidden"],
        num_hidden_layers=layers,
        num_attention_heads=TINY["heads"],
        num_key_value_heads=2,
        intermediate_size=2 * TINY["hidden"],
        max_position_embeddings=64,
        bos_token_id=vocab["<s>"],
        eos_token_id=vocab["</s>"],
        pad_token_id=None,
    )
    torch.manual_seed(seed)
    model = tf.LlamaModel(config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


_CACHE: dict[tuple[str, str], Any] = {}


def _cached(factory: pytest.TempPathFactory, key: str, build: Callable[[Path], Any]) -> Any:
    root = str(factory.getbasetemp())
    if (root, key) not in _CACHE:
        _CACHE[(root, key)] = build(factory.mktemp(key))
    return _CACHE[(root, key)]


@pytest.fixture(scope="module", autouse=True)
def single_thread() -> Iterator[None]:
    """One torch thread: tiny models gain nothing from more, and a busy 2-core box loses a lot."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def no_plots(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, ...]]:
    """Skip the report plots (tested in test_plots.py; ~2 s a run); records each call's arguments."""
    import probekit.plots

    calls: list[tuple[Any, ...]] = []

    def stub(*args: Any, **kwargs: Any) -> list[Path]:
        calls.append(args)
        return []

    monkeypatch.setattr(probekit.plots, "write_report_plots", stub)
    return calls


@pytest.fixture(scope="session")
def bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder of the tiny BERT backbone (4 blocks, width 32) with its tokenizer."""
    return _cached(tmp_path_factory, "tiny-bert", save_tiny_bert)  # type: ignore[no-any-return]


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder of the tiny Llama-shaped backbone (4 blocks, width 32) with its tokenizer."""
    return _cached(tmp_path_factory, "tiny-llama", save_tiny_llama)  # type: ignore[no-any-return]


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory: pytest.TempPathFactory) -> ToyData:
    """96 train / 48 val / 48 test rows with integer labels."""
    return _cached(tmp_path_factory, "toy-data", write_toy_data)  # type: ignore[no-any-return]


# -- configs and runs --------------------------------------------------------------------------
FAST = (
    "train.epochs=2",
    "train.cpu=true",
    "train.precision=fp32",
    "model.max_length=16",
)
"""Assignments that keep a safety8k run to a couple of seconds on a CPU."""


def make_config(
    model_dir: Path, data: ToyData, *assignments: str, preset: str = "safety8k", test: bool = True
) -> ProbeConfig:
    """A ``preset`` config on ``model_dir`` and ``data``, made fast, then ``assignments`` applied."""
    return compose_config(
        preset=preset,
        assignments=[f"model.name={model_dir}", *data.assignments(test=test), *FAST, *assignments],
    )


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Run ``probekit argv`` in-process; return (exit code, stdout, stderr)."""
    from probekit.cli import main

    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def quiet(_line: str) -> None:
    """A ``log`` for `probekit.engine.train` that drops the lines."""


def quiet_train(config: ProbeConfig, out: Path, **kwargs: Any) -> Any:
    """``probekit.train`` quietly, without progress bars; returns its `RunResult`."""
    from probekit.training import train

    return train(config, out=out, log=quiet, progress=False, **kwargs)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def leftovers(parent: Path) -> list[Path]:
    """Hidden ``.NAME.partial-PID`` / ``.NAME.old-PID`` folders and ``.NAME.lock`` files a run left
    next to its output folder."""
    return sorted(
        p
        for p in parent.iterdir()
        if p.name.startswith(".") and (".partial-" in p.name or ".old-" in p.name or p.name.endswith(".lock"))
    )


def names(folder: Path) -> list[str]:
    """The sorted names of the entries of ``folder``."""
    return sorted(p.name for p in folder.iterdir())


def step_of(done: list[Path]) -> int:
    """The highest optimiser step among checkpoint folders ``step-<steps>-<phase>``."""
    return max(int(p.name.split("-")[1]) for p in done)


def wait_for_checkpoint(process: subprocess.Popen[str], parent: Path, at_least: int) -> Path:
    """Wait until the unfinished run next to ``parent`` has a checkpoint of step >= ``at_least``;
    return its folder. Fails when ``process`` ends first or after two minutes."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        folders = [p / "state" for p in leftovers(parent) if (p / "state").is_dir()]
        done = [c for f in folders for c in f.iterdir() if c.name.startswith("step-")]
        if done and step_of(done) >= at_least:
            return folders[0].parent
        assert process.poll() is None, "the run ended before it could be stopped"
        time.sleep(0.05)
    raise AssertionError("no checkpoint appeared")


# -- what a run did, through the hooks a user's callback has -------------------------------------
class Recorder(Callback):
    """A `probekit.training.Callback` that records what tests check about a run: the optimiser
    (its group names, each group's learning rate as every step starts), each window's step and
    loss, each epoch's validation scores and trainable weights (before the best ones come back),
    and the validation scores the decision threshold is chosen on."""

    def __init__(self) -> None:
        self.plan: Any = None
        self.optimizer: Any = None
        self.group_names: list[str] = []
        self.lrs: list[list[float]] = []
        self.windows: list[tuple[int, float]] = []
        self.val: list[Any] = []
        self.weights: list[dict[str, Any]] = []
        self.best_val: Any = None

    def on_fit_start(self, fit: Any) -> None:
        self.plan, self.optimizer = fit.plan, fit.optimizer
        raw = getattr(fit.optimizer, "optimizer", fit.optimizer)  # inside Accelerate's wrapper
        self.group_names = [g.get("name", "") for g in raw.param_groups]
        raw.register_step_pre_hook(
            lambda opt, args, kwargs: self.lrs.append([g["lr"] for g in opt.param_groups])
        )

    def on_window_end(self, fit: Any) -> None:
        self.windows.append((fit.state.step, fit.window_loss))

    def on_epoch_end(self, fit: Any) -> None:
        self.val.append(fit.val)
        self.weights.append(trainable_state(fit.probe))

    def on_fit_end(self, fit: Any) -> None:
        best = next(cb for cb in fit.callbacks if isinstance(cb, BestWeights))
        self.best_val = best.val


def assert_one_line_error(code: int, out: str, err: str, *fragments: str) -> None:
    """Exit 2, nothing on stdout, one ``probekit: error:`` line on stderr, no traceback."""
    assert code == 2, (code, out, err)
    assert out == "" and "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("probekit: error: "), err
    for fragment in fragments:
        assert fragment in err, f"{fragment!r} not in:\n{err}"


def tiny_binary_run(bert_dir: Path, toy_data: ToyData, folder: Path) -> Path:
    """One tiny binary run on the toy data (1 epoch, linear head, no report plots): a middling
    probe for the commands that read a run (eval, predict)."""
    import probekit.plots

    config = make_config(bert_dir, toy_data, "train.epochs=1", "head.kind=linear")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(probekit.plots, "write_report_plots", lambda *a, **k: [])
        return quiet_train(config, folder / "run").run_dir  # type: ignore[no-any-return]
