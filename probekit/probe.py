"""The `Probe`: backbone -> the hidden states the pooler reads -> pooler -> head."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from probekit.backbone import BERT_LIKE, Layout, accepts, base_model, capture, locate, resolve_layers
from probekit.freezers.plan import FreezePlan
from probekit.spec import BuildContext, FreezerSpec, HeadSpec, PoolerSpec

if TYPE_CHECKING:
    from probekit.config import ProbeConfig


class Probe(nn.Module):
    """A classifier reading a pretrained transformer's hidden states.

    Only the layers the pooler needs are captured, and blocks above the highest of them are
    never run. Pooler and head run in float32 whatever the backbone's dtype. Works with encoder
    (BERT-like) and decoder (GPT-2, Llama-like) backbones from ``transformers``; task heads of the
    given model (LM head, classifier) are dropped, and so is the unused ``pooler`` of BERT-like
    models (the backbone object is modified in place: it is now part of the probe).

    Args:
        backbone: a ``transformers`` model.
        pooler: the pooler spec (which layers, how to pool).
        head: the head spec.
        freezer: the freezing policy; ``None`` leaves every backbone parameter trainable.
    """

    def __init__(
        self,
        backbone: nn.Module,
        pooler: PoolerSpec,
        head: HeadSpec,
        freezer: FreezerSpec | None = None,
    ) -> None:
        super().__init__()
        self.backbone = base_model(backbone)
        self.layout: Layout = locate(self.backbone)
        if self.layout.model_type in BERT_LIKE and isinstance(
            getattr(self.backbone, "pooler", None), nn.Module
        ):
            # BERT's own [CLS] pooler feeds nothing a probe reads: drop it (no compute, no
            # parameters that could never get a gradient).
            self.backbone.pooler = None  # type: ignore[assignment]
        self.pooler_spec = pooler
        self.head_spec = head
        self.context = BuildContext(
            hidden_size=self.layout.hidden_size,
            num_layers=self.layout.num_blocks,
            model_type=self.layout.model_type,
        )
        field = "pooler.layers" if pooler.multi_layer else "pooler.layer"
        self.layers = resolve_layers(pooler.layer_indices(), self.layout.num_blocks, field=field)
        self.pooler = pooler.build(self.context)
        self.head = head.build(self.context, self.pooler.output_dim(self.context.hidden_size))
        if freezer is None:
            from probekit.freezers.none import NoFreezeSpec

            freezer = NoFreezeSpec()
        self.freezer_spec = freezer
        self.plan: FreezePlan = freezer.resolve(self.backbone)
        self.plan.apply(self.backbone)
        self._positions_from_mask = accepts(self.backbone, "position_ids") and not _derives_positions(
            self.backbone
        )

    @classmethod
    def from_config(cls, config: ProbeConfig, backbone: nn.Module) -> Probe:
        """Build the probe a config describes on ``backbone``, with its freezing plan applied."""
        return cls(backbone, config.pooler, config.head, config.freezer)

    def _inputs(self, input_ids: Tensor, attention_mask: Tensor, extra: dict[str, Any]) -> dict[str, Any]:
        inputs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask, **extra}
        if getattr(self.backbone.config, "use_cache", None) is not None and accepts(
            self.backbone, "use_cache"
        ):
            inputs.setdefault("use_cache", False)
        left_padded = bool((attention_mask[:, 0] == 0).logical_and(attention_mask.any(dim=1)).any())
        if self._positions_from_mask and left_padded and "position_ids" not in inputs:
            # Count positions from each row's first real token, so left padding reads the text
            # exactly as right padding does.
            inputs["position_ids"] = (attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)
        return inputs

    def hidden_states(self, input_ids: Tensor, attention_mask: Tensor, **extra: Any) -> tuple[Tensor, ...]:
        """The hidden states of ``self.layers``, in that order, as the backbone computed them."""
        captured = capture(
            self.backbone, self.layout, self.layers, self._inputs(input_ids, attention_mask, extra)
        )
        return tuple(captured[i] for i in self.layers)

    def features(self, input_ids: Tensor, attention_mask: Tensor, **extra: Any) -> Tensor:
        """Pooled features ``(batch, pooler.output_dim(hidden))`` in the head's dtype."""
        dtype = next(self.head.parameters()).dtype
        hidden = tuple(h.to(dtype) for h in self.hidden_states(input_ids, attention_mask, **extra))
        if self.pooler_spec.multi_layer:
            return self.pooler(hidden, attention_mask)  # type: ignore[no-any-return]
        return self.pooler(hidden[0], attention_mask)  # type: ignore[no-any-return]

    def forward(self, input_ids: Tensor, attention_mask: Tensor, **extra: Any) -> Tensor:
        """Class logits ``(batch, num_classes)``."""
        return self.head(self.features(input_ids, attention_mask, **extra))  # type: ignore[no-any-return]


def _derives_positions(backbone: nn.Module) -> bool:
    """True for RoBERTa-style embeddings that already count positions past the padding."""
    embeddings = getattr(backbone, "embeddings", None)
    return embeddings is not None and getattr(embeddings, "padding_idx", None) is not None
