"""``chat-prompt-guard``: a prompt classifier on a chat model, read where the model decides how to
answer.

The probe reads the conversation as the chat model sees it (its tokenizer's chat template, the
answer left out, ``data.chat.classify=prompt``) at the generation prompt: the tokens the template
adds to open the assistant's turn (``data.positions=generation_prompt``), after the whole prompt and
before any answer, the position the published monitors of chat models read (refusal and harmfulness
directions are clearest there). It pools those few tokens with a masked mean of hidden state -8
(a quarter from the top: on a 32-block Llama-shaped model block 25, in the middle-to-late range
where probes on large decoders read best), with every block frozen: the activation cache then
runs the backbone once, up to that block only, so an 8B model costs one forward pass of 25 blocks
per row. Head, optimiser and schedule are ``frozen-probe``'s.

Needs a backbone with at least 8 blocks and a chat template (the tokenizer's, or
``data.chat.template_file``). Rows are conversations: ``prompt`` (and an ignored ``response``) or
``messages`` fields. Released presets never change meaning: a new behaviour gets a new name.
"""

from probekit.presets.frozen_probe import FROZEN_PROBE
from probekit.registry import PRESETS
from probekit.spec import Preset

CHAT_PROMPT_GUARD = PRESETS.register(
    Preset(
        kind="chat-prompt-guard",
        description=(
            "prompt classifier for chat models: conversations in the tokenizer's chat template, masked "
            "mean of hidden state -8 over the generation prompt's tokens, every block frozen (the "
            "backbone runs once), frozen-probe's head and schedule"
        ),
        config={
            **FROZEN_PROBE.config,
            "pooler": {"kind": "masked_mean", "layer": -8},
            "data": {
                "chat": {"classify": "prompt", "generation_prompt": True},
                "positions": "generation_prompt",
            },
        },
    )
)
