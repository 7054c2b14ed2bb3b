"""``frozen-probe``: a probe on a frozen backbone, with defaults that need no tuning.

Every block and the embeddings stay frozen (``freezer.kind=all``). The pooler is ``safety8k``'s
(masked mean over the tokens of the last 3 hidden states, averaged), which has no parameters, so
the activation cache runs in ``pooled`` mode: the backbone sees each train and val row once and
every epoch trains only the head, on one feature vector per row. The head is ``safety8k``'s
LayerNorm-MLP(128). What differs from ``safety8k`` is what a frozen backbone calls for: a head
learning rate of 5e-3 (25x ``safety8k``'s 2e-4, which is tuned for training the top blocks with
the head and under-trains a head alone), up to 20 epochs, and the 32-row effective batch as one
micro-batch (``batch_size=32``, ``grad_accum=1``: the same optimiser steps with 4x fewer micro-steps).

Chosen on evidence (``benchmarks/frozen_probe.py``, ``docs/results.md``): on the safety mix with
all-MiniLM-L6-v2 it is at least as good in test AUROC as sentence-transformers embeddings +
scikit-learn logistic regression with ``C`` chosen on val, on 400/100/100-row subsets and on the
full mix. Released presets never change meaning: a new behaviour gets a new name.
"""

from probekit.registry import PRESETS
from probekit.spec import Preset

FROZEN_PROBE = PRESETS.register(
    Preset(
        kind="frozen-probe",
        description=(
            "probe on a frozen backbone: every block frozen, masked mean over the last 3 layers "
            "(pooled activation cache: the backbone runs once), LayerNorm-MLP(128) head, AdamW 5e-3, "
            "batch 32, up to 20 epochs with cosine decay, best epoch by val AUROC"
        ),
        config={
            "pooler": {
                "kind": "multilayer",
                "layers": [-3, -2, -1],
                "combine": "mean",
                "combine_at": "tokens",
                "token_pooler": {"kind": "masked_mean"},
            },
            "head": {
                "kind": "mlp",
                "hidden_sizes": [128],
                "norm": "layernorm",
                "activation": "gelu",
                "dropout": 0.2,
                "num_classes": 2,
            },
            "freezer": {"kind": "all"},
            "scheduler": {"kind": "cosine", "warmup_epochs": 1.0, "min_lr_ratio": 0.0},
            "optimizer": {"kind": "adamw", "lr_head": 5e-3, "weight_decay": 0.1},
            "train": {
                "epochs": 20,
                "batch_size": 32,
                "grad_accum": 1,
                "label_smoothing": 0.1,
                "max_grad_norm": 1.0,
                "precision": "auto",
                "patience": 5,
                "monitor": "auroc",
            },
        },
    )
)
