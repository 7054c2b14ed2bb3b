"""Peak host memory of loading a backbone with ``model.dtype=fp32`` against ``model.dtype=bf16``.

A Llama-shaped decoder with random weights (``--hidden``, ``--layers``, ``--intermediate``,
``--vocab``; about 0.5 B parameters by default) is saved once as a float32 safetensors checkpoint.
Then, for each dtype, a fresh process imports probekit, loads the backbone as a run does
(`probekit.hub.load_backbone` in the run's dtype, the probe built with the safety8k freezer, and
`probekit.loading.keep_fp32`, which makes the trainable blocks fp32 master weights read again from
the checkpoint), and samples its own ``/proc/self/status`` every 2 ms. Reported per dtype, above
the process's memory after the imports:

* peak anonymous memory (``RssAnon``): what must fit in host RAM; file pages of the memory-mapped
  checkpoint (``RssFile``) are page cache that the kernel can drop;
* peak resident memory (``VmRSS``: anonymous + file pages);
* the bytes of the loaded parameters, and the peak per parameter.

Both a float32 and a bfloat16 checkpoint are measured (Llama-3.1-8B ships bf16). The 8B columns
scale the bytes per parameter to 8.03e9 parameters (Llama-3.1-8B); the last lines compare the
weights held with bf16 and fp32 as a ratio. Linux only (``/proc``). Nothing is downloaded.

    python benchmarks/load_memory.py
    python benchmarks/load_memory.py --hidden 1024 --layers 4 --out /tmp/load_memory.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
EIGHT_B = 8.03e9

MEASURE = r"""
import json, sys, threading, time
import torch, transformers  # imported before the baseline is read

def status():
    found = {}
    with open("/proc/self/status") as handle:
        for line in handle:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile"):
                found[key] = int(value.split()[0]) * 1024
    return found

import probekit
from probekit.hub import ModelSpec, load_backbone
from probekit.loading import keep_fp32
from probekit.probe import Probe

folder, mode = sys.argv[1], sys.argv[2]
base = status()
peak = dict(base)
done = threading.Event()

def sample():
    while not done.is_set():
        for key, value in status().items():
            peak[key] = max(peak[key], value)
        time.sleep(0.002)

thread = threading.Thread(target=sample, daemon=True)
thread.start()
begun = time.perf_counter()
dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[mode]
precision = "fp32" if mode == "fp32" else "bf16"
config = probekit.preset(
    "safety8k", model={"name": folder, "dtype": mode, "max_length": 64}, train={"precision": precision}
)
backbone = load_backbone(config.model, dtype)
probe = Probe.from_config(config, backbone.model)
note = keep_fp32(probe, backbone, dtype)
seconds = time.perf_counter() - begun
done.set()
thread.join()
for key, value in status().items():
    peak[key] = max(peak[key], value)
params = sum(p.numel() for p in backbone.model.parameters())
held = sum(p.numel() * p.element_size() for p in backbone.model.parameters())
print(json.dumps({
    "mode": mode, "parameters": params, "parameter_bytes": held, "seconds": seconds, "note": note,
    "peak_anon": peak["RssAnon"] - base["RssAnon"], "peak_rss": peak["VmRSS"] - base["VmRSS"],
    "trainable_blocks": list(probe.plan.trainable_blocks),
}))
"""


def save_model(folders: dict[str, Path], args: argparse.Namespace) -> None:
    import torch
    import transformers as tf
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<unk>", "<s>", "</s>", *[f"w{i}" for i in range(args.vocab - 3)]]
    core = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = tf.PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    config = tf.LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 128,
        num_key_value_heads=max(1, args.hidden // 512),
        intermediate_size=args.intermediate,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    model = tf.LlamaModel(config)
    for stored in ("fp32", "bf16"):  # one random model, saved in both dtypes
        if stored == "bf16":
            model = model.to(torch.bfloat16)
        model.save_pretrained(folders[stored])
        tokenizer.save_pretrained(folders[stored])
    del model


def measure(folder: Path, mode: str) -> dict[str, Any]:
    run = subprocess.run(
        [sys.executable, "-c", MEASURE, str(folder), mode],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
    )
    if run.returncode != 0:
        raise SystemExit(f"{mode}: the loading process failed:\n{run.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(run.stdout.strip().splitlines()[-1])
    return result


def gib(n: float) -> str:
    return f"{n / 1024**3:.2f} GiB"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args()
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="probekit-load-memory-") as tmp:
        folders = {stored: Path(tmp) / stored for stored in ("fp32", "bf16")}
        print(f"saving a random Llama-shaped model to {tmp} ...", file=sys.stderr, flush=True)
        save_model(folders, args)
        for stored, folder in folders.items():
            for mode in ("fp32", "bf16"):
                print(
                    f"loading the {stored} checkpoint with model.dtype={mode} ...",
                    file=sys.stderr,
                    flush=True,
                )
                results[f"{stored} checkpoint, model.dtype={mode}"] = measure(folder, mode)
    params = int(next(iter(results.values()))["parameters"])
    print(
        f"a random Llama-shaped model of {params / 1e6:.0f} M parameters, saved as fp32 and bf16 safetensors"
    )
    header = ("held", "peak anon", "peak rss", "held/param", "8B held", "8B peak anon", "time")
    print(f"{'':<34} " + " ".join(f"{h:>12}" for h in header))
    for name, r in results.items():
        per_held, per_anon = r["parameter_bytes"] / params, r["peak_anon"] / params
        cells = (gib(r["parameter_bytes"]), gib(r["peak_anon"]), gib(r["peak_rss"]), f"{per_held:.2f} B")
        cells += (gib(per_held * EIGHT_B), gib(per_anon * EIGHT_B), f"{r['seconds']:.1f} s")
        print(f"{name:<34} " + " ".join(f"{c:>12}" for c in cells))
        if r["note"]:
            print(f"  {r['note']}")
    for stored in ("fp32", "bf16"):
        held = [
            results[f"{stored} checkpoint, model.dtype={mode}"]["parameter_bytes"]
            for mode in ("bf16", "fp32")
        ]
        print(f"{stored} checkpoint: weights held, bf16 / fp32: {held[0] / held[1]:.2f}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
