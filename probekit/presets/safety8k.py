"""``safety8k``: the 8K-example prompt-safety recipe (DESIGN.md section 2), as plain data.

On a 32-block backbone it freezes the embeddings and blocks 0-19 and trains blocks 20-31; on
other depths ``fraction=0.625`` scales (4 of 6 blocks, 15 of 24). Released presets never change
meaning: a new behaviour gets a new name.
"""

from probekit.registry import PRESETS
from probekit.spec import Preset

SAFETY8K = PRESETS.register(
    Preset(
        kind="safety8k",
        description=(
            "prompt-safety recipe: bottom 62.5% of blocks frozen, masked mean over the last 3 layers, "
            "LayerNorm-MLP(128) head, AdamW 2e-4 head / 2e-5 body, cosine with 1 warmup epoch"
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
            "freezer": {"kind": "bottom", "fraction": 0.625, "freeze_embeddings": True},
            "scheduler": {"kind": "cosine", "warmup_epochs": 1.0, "min_lr_ratio": 0.0},
            "optimizer": {"kind": "adamw", "lr_head": 2e-4, "lr_body": 2e-5, "weight_decay": 0.1},
            "train": {
                "epochs": 10,
                "batch_size": 8,
                "grad_accum": 4,
                "label_smoothing": 0.1,
                "max_grad_norm": 1.0,
                "precision": "auto",
                "patience": 5,
                "monitor": "auroc",
            },
        },
    )
)
