"""``hazards13``: which hazard a prompt is, and whether it is one at all, from one probe.

The multi-class sibling of ``safety8k``, for a taxonomy such as MLCommons' 12 hazards plus
``safe`` (``../shared/data/hazards``; any label set works with ``head.num_classes`` set to its
size). Softmax over 13 classes with balanced class weights (a rare hazard weighs as much as the
``safe`` majority), the best epoch by validation macro F1, and ``negative_class: safe``: the
report adds the guard view "any hazard vs safe" (score ``1 - p(safe)``) with a threshold chosen on
val. The backbone recipe is ``safety8k``'s. Released presets never change meaning.
"""

import copy

from probekit.presets.safety8k import SAFETY8K
from probekit.registry import PRESETS
from probekit.spec import Preset

_config = copy.deepcopy(dict(SAFETY8K.config))
_config["task"] = {"kind": "multiclass", "negative_class": "safe"}
_config["head"] = {**_config["head"], "num_classes": 13}
_config["loss"] = {"class_weights": "balanced"}
_config["train"] = {**_config["train"], "epochs": 15, "monitor": "f1"}

HAZARDS13 = PRESETS.register(
    Preset(
        kind="hazards13",
        description=(
            "13-class hazard categoriser and guard (safe + 12 MLCommons hazards): safety8k's backbone "
            "recipe, softmax head, balanced class weights, best epoch by val macro F1, "
            "negative_class safe for the 'any hazard vs safe' view"
        ),
        config=_config,
    )
)
