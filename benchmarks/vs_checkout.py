"""This checkout's training against another checkout of probekit, on the same run, side by side.

For a refactor that must not change results or speed: each side trains the same config (the
shipped demo data on the embedded MiniLM, the safety8k preset) in its own process, in
alternation, ``--repeats`` times; the script reports the median time of ``train()`` on each side
(imports and model loading left out), their ratio, and whether the two runs are bit-identical
(``metrics.jsonl`` byte for byte, every checkpoint tensor equal).

    git worktree add /tmp/baseline <commit>
    python benchmarks/vs_checkout.py --baseline /tmp/baseline --repeats 3

The baseline may predate the training package (``probekit.engine.train`` is used then).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]

RUN = r"""
import json, sys, time
from pathlib import Path
import probekit, probekit.plots
from probekit.config import compose_config
try:
    from probekit.training import train
except ImportError:
    from probekit.engine import train
probekit.plots.write_report_plots = lambda *a, **k: []  # the same on both sides; not timed
out = Path(sys.argv[1])
config = compose_config(preset="safety8k", assignments=json.loads(sys.argv[2]))
begun = time.perf_counter()
train(config, out=out, log=lambda _line: None, progress=False)
print(json.dumps({"seconds": time.perf_counter() - begun, "probekit": probekit.__file__}))
"""


def run_side(root: Path, out: Path, assignments: list[str]) -> dict[str, object]:
    env = {**os.environ, "PYTHONPATH": str(root), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    done = subprocess.run(
        [sys.executable, "-c", RUN, str(out), json.dumps(assignments)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        cwd=root,
    )
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def identical(a: Path, b: Path) -> bool:
    import torch
    from safetensors.torch import load_file

    if (a / "metrics.jsonl").read_bytes() != (b / "metrics.jsonl").read_bytes():
        return False
    wa, wb = (load_file(p / "checkpoint" / "probe.safetensors") for p in (a, b))
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", type=Path, required=True, help="another probekit checkout")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--set",
        dest="assignments",
        action="append",
        default=["train.epochs=3", "model.max_length=64", "train.cpu=true"],
        help="config assignments for both sides",
    )
    args = parser.parse_args()
    times: dict[str, list[float]] = {"this": [], "baseline": []}
    same = True
    with tempfile.TemporaryDirectory() as folder:
        for repeat in range(args.repeats):
            outs = {}
            for side, root in (("baseline", args.baseline.resolve()), ("this", HERE)):
                outs[side] = Path(folder) / f"{side}-{repeat}"
                result = run_side(root, outs[side], args.assignments)
                assert str(root) in str(result["probekit"]), result  # each side ran its own code
                times[side].append(float(result["seconds"]))  # type: ignore[arg-type]
                print(f"repeat {repeat + 1}: {side:<8} {times[side][-1]:.1f} s", flush=True)
            same = same and identical(outs["this"], outs["baseline"])
    this, base = statistics.median(times["this"]), statistics.median(times["baseline"])
    print(
        f"median train(): this {this:.1f} s, baseline {base:.1f} s; ratio this / baseline {this / base:.3f}"
    )
    print(f"bit-identical runs: {same}")


if __name__ == "__main__":
    main()
