"""Streaming per-token scores: for every token of a text, the score the probe would give the text
cut after that token, all from one forward pass.

On a causal (decoder) backbone the hidden state at a token never depends on later tokens, so the
probe's score of the prefix ending at token ``i`` is its pooler's running value there
(`probekit.poolers.base.Pooler.running`) through the head: ``masked_mean`` is a running mean,
``max`` a running max, ``last_token`` the token itself, ``ema`` and ``rolling_max`` their running
forms, and a plugin pooler without its own ``running`` is pooled prefix by prefix. A guard can
then stop a response mid-stream at the first token whose score crosses the threshold.

`check_causal` checks each probe once, on the first text of its first call with two or more
tokens: changing that text's last token must leave the hidden states at every earlier token
unchanged, else (a bidirectional encoder such as BERT, where every token sees the whole text)
the call is refused in one line.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from probekit.errors import UserError
from probekit.tokens import pad_rows

if TYPE_CHECKING:
    from probekit.probe import Probe

TOLERANCE = 1e-4
"""Largest change of an earlier hidden state, relative to their size, that `check_causal` lets
pass (the two passes have one shape, so a causal backbone gives exactly equal values)."""


def running_logits(
    probe: Probe, input_ids: Tensor, attention_mask: Tensor, read_mask: Tensor | None = None
) -> Tensor:
    """``(b, t, outputs)``: the head's logits on the pooled prefix ending at each position (the
    pooler reading the tokens of ``read_mask``, by default the attention mask's)."""
    dtype = next(probe.head.parameters()).dtype
    hidden = tuple(h.to(dtype) for h in probe.hidden_states(input_ids, attention_mask))
    reads = attention_mask if read_mask is None else read_mask
    steps = probe.pooler.running(hidden if probe.pooler_spec.multi_layer else hidden[0], reads)
    b, t, width = steps.shape
    logits: Tensor = probe.head(steps.reshape(b * t, width))
    return logits.reshape(b, t, -1)


def check_causal(probe: Probe, ids: Sequence[int], device: torch.device, autocast: Any) -> None:
    """Refuse a backbone whose hidden states at a token depend on later tokens: change the last
    token of ``ids`` and compare the hidden states the pooler reads at every earlier position.
    Both passes have the same shape, so on a causal backbone they agree to the last bit whatever
    the precision; on a bidirectional encoder every position moves."""
    if probe._causal_checked or len(ids) < 2:
        return
    backbone: Any = probe.backbone  # a transformers model
    vocab = int(backbone.get_input_embeddings().num_embeddings)
    changed = [*ids[:-1], (int(ids[-1]) + 1) % vocab]
    batch, mask = pad_rows([list(ids), changed], 0, False)
    with torch.inference_mode(), autocast():
        hidden = probe.hidden_states(batch.to(device), mask.to(device))
    gap = max(float((h[0, :-1] - h[1, :-1]).float().abs().max()) for h in hidden)
    scale = max(float(h[0, :-1].float().abs().max()) for h in hidden)
    if gap > TOLERANCE * max(1.0, scale):
        kind = getattr(getattr(probe.backbone, "config", None), "model_type", type(probe.backbone).__name__)
        raise UserError(
            f"per-token scores need a causal (decoder) backbone: in {kind} every token sees the tokens "
            f"after it, so the score at a token is not the score of the text cut there (changing the "
            f"last token moved earlier hidden states by {gap:.3g})"
        )
    probe._causal_checked = True  # the backbone does not change: once per probe is enough


def token_predictions(
    probe: Probe, texts: Sequence[str], batch_size: int, device: torch.device, autocast: Any
) -> list[dict[str, Any]]:
    """Per text: its ``tokens`` (as the tokenizer writes them) and, per token, the task's score of
    the text cut after it (``scores``: a binary probe's positive-class probability, a multi-class
    probe's class probabilities...); a binary probe adds ``first_flagged``, the index in
    ``tokens`` of the first token whose score reaches the threshold (None when none does). The
    last score is the text's own ``predict_proba``.

    A probe that reads selected positions (``data.positions``, e.g. a conversation's response)
    scores only the tokens of that span: ``tokens`` and ``scores`` hold those, and
    ``positions`` their indices in the tokenised text. A chat probe's rows add ``rendered``, the
    conversation as the tokenizer read it (in its chat template); ``text`` is the conversation's
    readable form, as in ``predict``."""
    tokenizer = probe._require_tokenizer()
    task = probe._task()
    reader = probe.reader()
    encoding = reader.encode(texts)
    ids = encoding.ids
    check_causal(probe, ids[0], device, autocast)
    pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
    left = getattr(tokenizer, "padding_side", "right") == "left"
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    scores: dict[int, Any] = {}
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        batch_ids, mask = pad_rows([ids[i] for i in chunk], pad_id, left)
        reads = None
        if encoding.reads is not None:
            reads = pad_rows([encoding.reads[i] for i in chunk], 0, left)[0]
        with torch.inference_mode(), autocast():
            logits = running_logits(
                probe, batch_ids.to(device), mask.to(device), None if reads is None else reads.to(device)
            ).float()
        for j, i in enumerate(chunk):
            real = (mask if reads is None else reads)[j].bool()
            kept = logits[j][real.to(logits.device)]
            scores[i] = task.scores(kept).cpu().tolist()
    rows: list[dict[str, Any]] = []
    threshold = probe.threshold
    for i, text in enumerate(texts):
        tokens = tokenizer.convert_ids_to_tokens(ids[i])
        row: dict[str, Any] = {"text": text, "tokens": tokens, "scores": scores[i]}
        if encoding.reads is not None:
            chosen = [t for t, read in enumerate(encoding.reads[i]) if read]
            row.update(tokens=[tokens[t] for t in chosen], positions=chosen)
        if reader.chat is not None:
            row["rendered"] = encoding.texts[i]
        if task.target == "binary" and isinstance(threshold, float):
            flagged = [t for t, s in enumerate(scores[i]) if s >= threshold]
            row["first_flagged"] = flagged[0] if flagged else None
        rows.append(row)
    return rows
