"""Reading a Hugging Face backbone: where its blocks are, and its hidden states, computed no higher
than needed.

Hidden-state index ``i`` follows ``transformers``' ``output_hidden_states``: 0 is the embedding
output (the input of block 0), ``i`` the output of block ``i - 1`` for ``0 < i < L``, and ``L``
the model's final hidden state (after the final norm in decoders such as Llama and GPT-2).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from probekit.errors import BackboneError

BERT_LIKE = ("bert", "roberta", "xlm-roberta", "xlm-roberta-xl", "electra", "camembert", "ernie", "mpnet")
_LLAMA_LIKE = (
    *("llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe"),
    *("gemma", "gemma2", "gemma3_text", "phi", "phi3", "olmo", "olmo2", "granite", "starcoder2", "cohere"),
)
_DEBERTA_EMBEDDINGS = ("embeddings", "encoder.rel_embeddings", "encoder.LayerNorm")

KNOWN_LAYOUTS: dict[str, tuple[str, tuple[str, ...]]] = {
    **dict.fromkeys(BERT_LIKE, ("encoder.layer", ("embeddings",))),
    **dict.fromkeys(("deberta", "deberta-v2"), ("encoder.layer", _DEBERTA_EMBEDDINGS)),
    "distilbert": ("transformer.layer", ("embeddings",)),
    "gpt2": ("h", ("wte", "wpe")),
    "gptj": ("h", ("wte",)),
    "codegen": ("h", ("wte",)),
    "falcon": ("h", ("word_embeddings",)),
    "bloom": ("h", ("word_embeddings", "word_embeddings_layernorm")),
    "gpt_neox": ("layers", ("embed_in",)),
    "opt": ("decoder.layers", ("decoder.embed_tokens", "decoder.embed_positions", "decoder.project_in")),
    "modernbert": ("layers", ("embeddings",)),
    **dict.fromkeys(_LLAMA_LIKE, ("layers", ("embed_tokens",))),
}
"""``config.model_type`` -> (path of the block list, prefixes of the embedding parameters)."""


def half_dtypes(module: nn.Module) -> list[torch.dtype]:
    """The half-precision dtypes (bf16, fp16) ``module``'s parameters are held in, in the order
    they first occur: empty for an fp32 (or quantised-only) module."""
    found = dict.fromkeys(p.dtype for p in module.parameters() if p.dtype in (torch.bfloat16, torch.float16))
    return list(found)


def base_model(model: nn.Module) -> nn.Module:
    """The bare transformer of a ``PreTrainedModel`` (drops LM or classification heads)."""
    inner = getattr(model, "base_model", model)
    return inner if isinstance(inner, nn.Module) else model


def _config(model: nn.Module) -> Any:
    config = getattr(model, "config", None)
    if config is None:
        raise BackboneError(f"{type(model).__name__} has no `config`; expected a transformers model")
    return config


@dataclass(frozen=True)
class Layout:
    """Where the parts of a backbone are, as parameter-name prefixes relative to the backbone."""

    model_type: str
    blocks_path: str
    num_blocks: int
    embedding_prefixes: tuple[str, ...]
    hidden_size: int

    def block_of(self, name: str) -> int | None:
        """The block index a parameter belongs to, or None when it is outside the blocks."""
        prefix = self.blocks_path + "."
        if not name.startswith(prefix):
            return None
        return int(name[len(prefix) :].split(".", 1)[0])

    def is_embedding(self, name: str) -> bool:
        return any(name == p or name.startswith(p + ".") for p in self.embedding_prefixes)

    def blocks(self, backbone: nn.Module) -> nn.ModuleList:
        module = backbone.get_submodule(self.blocks_path)
        assert isinstance(module, nn.ModuleList)
        return module


def locate(backbone: nn.Module) -> Layout:
    """Find the block list and embeddings of ``backbone`` (a bare transformers model).

    Known families use a table keyed by ``config.model_type``; others fall back to the only
    ``ModuleList`` whose length equals ``config.num_hidden_layers``.

    Raises:
        BackboneError: when no single block list can be found.
    """
    config = _config(backbone)
    model_type = str(getattr(config, "model_type", "unknown"))
    hidden_size = int(getattr(config, "hidden_size", 0) or 0)
    num_hidden = getattr(config, "num_hidden_layers", None)
    known = KNOWN_LAYOUTS.get(model_type)
    if known is not None:
        path, embeddings = known
        try:
            blocks = backbone.get_submodule(path)
        except AttributeError:
            blocks = None
        if isinstance(blocks, nn.ModuleList):
            return Layout(model_type, path, len(blocks), embeddings, hidden_size)
    candidates = [
        name
        for name, module in backbone.named_modules()
        if isinstance(module, nn.ModuleList) and num_hidden is not None and len(module) == num_hidden
    ]
    if len(candidates) != 1:
        found = f"found {len(candidates)} candidate block lists {candidates}" if candidates else "found none"
        raise BackboneError(
            f"cannot locate the transformer blocks of {type(backbone).__name__} "
            f"(model_type={model_type!r}): looked for one ModuleList of length "
            f"num_hidden_layers={num_hidden} and {found}; known model types: "
            f"{', '.join(sorted(KNOWN_LAYOUTS))}"
        )
    path = candidates[0]
    top = path.split(".", 1)[0]
    before: list[str] = []
    for child, _ in backbone.named_children():
        if child == top:
            break
        before.append(child)
    embeddings = tuple(
        sorted(
            set(before)
            | {
                n.rsplit(".", 1)[0]
                for n, _ in backbone.named_parameters()
                if "embed" in n.lower() and not n.startswith(path + ".")
            }
        )
    )
    blocks = backbone.get_submodule(path)
    assert isinstance(blocks, nn.ModuleList)
    return Layout(model_type, path, len(blocks), embeddings, hidden_size)


def resolve_layers(
    indices: Iterable[int], num_blocks: int, *, field: str = "pooler.layers"
) -> tuple[int, ...]:
    """Map hidden-state indices (negative from the end) to ``0..num_blocks``.

    Raises:
        BackboneError: for an index outside the backbone, or two that name the same layer.
    """
    count = num_blocks + 1
    resolved: list[int] = []
    for i in indices:
        if not -count <= i < count:
            raise BackboneError(
                f"{field}: layer {i} does not exist; the backbone has {count} hidden states "
                f"(0 = embeddings .. {num_blocks} = last block, or -1 .. -{count})"
            )
        r = i % count
        if r in resolved:
            raise BackboneError(
                f"{field}: layer {i} names hidden state {r} twice (the backbone has {count} hidden states)"
            )
        resolved.append(r)
    return tuple(resolved)


class StopForwardError(Exception):
    """Raised from a hook once the highest needed hidden state is captured."""


def _first(output: Any) -> Tensor:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return _first(output[0])
    if isinstance(output, Mapping):
        return _first(next(iter(output.values())))
    hidden = getattr(output, "last_hidden_state", None)
    if isinstance(hidden, Tensor):
        return hidden
    raise BackboneError(f"cannot read hidden states from a block output of type {type(output).__name__}")


def capture(
    backbone: nn.Module, layout: Layout, layers: tuple[int, ...], inputs: Mapping[str, Any]
) -> dict[int, Tensor]:
    """Run ``backbone`` on ``inputs`` and return the hidden states ``layers`` (resolved indices).

    Blocks above the highest requested layer are not run: a hook stops the forward pass as soon
    as that layer's output exists. Only when the last layer is requested does the model run to
    its end (so the final norm of decoders applies, as in ``output_hidden_states``).
    """
    top = max(layers)
    blocks = layout.blocks(backbone)
    runs_to_end = top == layout.num_blocks
    captured: dict[int, Tensor] = {}
    handles = []

    def stop_if_done() -> None:
        if not runs_to_end and all(i in captured for i in layers):
            raise StopForwardError

    if 0 in layers:

        def grab_input(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            captured[0] = args[0] if args else kwargs["hidden_states"]
            stop_if_done()

        handles.append(blocks[0].register_forward_pre_hook(grab_input, with_kwargs=True))
    for index in layers:
        if 0 < index < layout.num_blocks:

            def grab_output(_module: nn.Module, _args: Any, output: Any, index: int = index) -> None:
                captured[index] = _first(output)
                stop_if_done()

            handles.append(blocks[index - 1].register_forward_hook(grab_output))
    try:
        output = backbone(**inputs)
        if runs_to_end:
            captured[layout.num_blocks] = _first(output)
    except StopForwardError:
        pass
    finally:
        for handle in handles:
            handle.remove()
    missing = [i for i in layers if i not in captured]
    if missing:
        raise BackboneError(f"the backbone never produced hidden states {missing}")
    return captured


def accepts(module: nn.Module, argument: str) -> bool:
    """Whether ``module.forward`` takes ``argument`` by name."""
    try:
        return argument in inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False
