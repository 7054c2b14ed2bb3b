"""The `Probe`: backbone -> the hidden states the pooler reads -> pooler -> head."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast, overload

import numpy as np
import torch
from torch import Tensor, nn

from probekit.backbone import (
    BERT_LIKE,
    Layout,
    StopForwardError,
    accepts,
    base_model,
    capture,
    half_dtypes,
    locate,
    resolve_layers,
)
from probekit.errors import PluginError, UserError
from probekit.freezers.plan import FreezePlan
from probekit.spec import BuildContext, FreezerSpec, HeadSpec, PoolerSpec

if TYPE_CHECKING:
    from probekit.config import ProbeConfig
    from probekit.reading import Reader
    from probekit.tasks.base import Task


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
        tokenizer: the backbone's tokenizer (``predict`` needs it; see `attach`).
        max_length: tokens kept per text by ``predict``.
        label_names: the label of each class by index, as ``predict`` writes them.
        threshold: the decision threshold of ``predict``.
        task: the `probekit.tasks.Task` (binary with the default threshold rule when None).
    """

    def __init__(
        self,
        backbone: nn.Module,
        pooler: PoolerSpec,
        head: HeadSpec,
        freezer: FreezerSpec | None = None,
        *,
        tokenizer: Any = None,
        max_length: int = 512,
        label_names: Sequence[Any] = (),
        threshold: float = 0.5,
        task: Task | None = None,
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
        self._pooler_checked = False
        self._arity: int | None = None
        self._causal_checked = False  # per-token scores: the backbone was found causal once
        self._reader: tuple[Any, Reader] | None = None
        self.tokenizer: Any = None
        self.max_length = 512
        self.threshold: float | list[float] = 0.5
        self.label_names: list[Any] = []
        self.task: Task | None = None
        self.probe_config: ProbeConfig | None = None
        """The config the probe was built from (`from_config`), which `save_pretrained` stores."""
        self.attach(
            tokenizer=tokenizer,
            max_length=max_length,
            label_names=label_names,
            threshold=threshold,
            task=task,
        )

    @classmethod
    def from_config(cls, config: ProbeConfig, backbone: nn.Module, **attached: Any) -> Probe:
        """Build the probe a config describes on ``backbone``, with its freezing plan applied and
        its task (``config.task`` with ``config.threshold``'s rule); ``attached``: what `attach`
        takes."""
        from probekit.config import task_of

        attached.setdefault("max_length", config.model.max_length)
        attached.setdefault("task", task_of(config))
        probe = cls(backbone, config.pooler, config.head, config.freezer, **attached)
        probe.probe_config = config
        return probe

    def save_pretrained(self, folder: str | Path, *, overwrite: bool = False) -> Path:
        """Write this probe where `from_pretrained` reads it back: its trainable weights
        (safetensors), its config, label names, threshold and task (``probe.json`` with its
        checksums). Works for a probe built from a config in your own code (`probekit.build`,
        ``Probe.from_config``), trained by `probekit.train` or by your own loop. The backbone is
        not copied: ``probe.json`` names where it loads from (the backbone's own
        ``name_or_path`` when it has one, else ``config.model.name``). Returns the folder.

        Raises:
            UserError: a probe not built from a config, or a non-empty ``folder`` without
                ``overwrite``.
        """
        from probekit.pretrained import save_probe

        return save_probe(self, Path(folder), overwrite=overwrite)

    def attach(
        self,
        *,
        tokenizer: Any = None,
        max_length: int | None = None,
        label_names: Sequence[Any] | None = None,
        threshold: float | Sequence[float] | None = None,
        task: Task | None = None,
    ) -> Probe:
        """Give the probe what ``predict`` needs, all at once or later (the one place these are
        set): the tokenizer, ``max_length`` (tokens per text), the ``label_names`` of the classes
        by index, the decision ``threshold`` and the `probekit.tasks.Task` (binary by default).
        Arguments left None keep their value. Returns the probe."""
        if tokenizer is not None:
            self.tokenizer = tokenizer
        if max_length is not None:
            self.max_length = int(max_length)
        if label_names is not None:
            self.label_names = list(label_names)
        if threshold is not None:
            self.threshold = (
                float(threshold) if isinstance(threshold, (int, float)) else [float(t) for t in threshold]
            )
        if task is not None:
            self.task = task
        return self

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

    def hidden_states(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        *,
        layers: Sequence[int] | None = None,
        cached: Mapping[int, Tensor] | None = None,
        **extra: Any,
    ) -> tuple[Tensor, ...]:
        """The hidden states ``layers`` (default: those the pooler reads), in that order.

        ``cached`` maps hidden-state indices to values computed earlier (padded like
        ``input_ids``; see `probekit.cache`): the blocks below the highest of them are not run,
        their outputs are replayed, and only the blocks above run.
        """
        layers = self.layers if layers is None else tuple(layers)
        if cached and all(i in cached for i in layers):
            return tuple(cached[i] for i in layers)
        inputs = self._inputs(input_ids, attention_mask, extra)
        if not cached:
            captured = capture(self.backbone, self.layout, layers, inputs)
        else:
            with self._replaying(cached, input_ids):
                captured = capture(self.backbone, self.layout, layers, inputs)
        return tuple(captured[i] for i in layers)

    @contextmanager
    def _replaying(self, cached: Mapping[int, Tensor], input_ids: Tensor) -> Iterator[None]:
        """Swap the blocks below the highest cached hidden state for stand-ins returning the cache."""
        boundary = max(cached)
        blocks = self.layout.blocks(self.backbone)
        arity = self._block_arity(input_ids)
        # the dtype the block computes in: its first floating parameter (a quantised block
        # also holds int8/uint8 weights)
        dtype = next(p.dtype for p in blocks[boundary - 1].parameters() if p.is_floating_point())
        originals = [blocks[i] for i in range(boundary)]
        try:
            for i in range(boundary):
                value = cached.get(i + 1)
                blocks[i] = _Replay(None if value is None else value.to(dtype), arity)
            yield
        finally:
            for i, block in enumerate(originals):
                blocks[i] = block

    def _block_arity(self, input_ids: Tensor) -> int:
        """How a block returns its hidden state: 0 for a bare tensor, else the length of its tuple."""
        if self._arity is None:
            found: list[int] = []

            def record(_module: nn.Module, _args: Any, output: Any) -> None:
                found.append(len(output) if isinstance(output, tuple) else 0)
                raise StopForwardError

            block = self.layout.blocks(self.backbone)[0]
            handle = block.register_forward_hook(record)
            one = input_ids[:1, :1]
            try:
                with torch.no_grad():
                    self.backbone(**self._inputs(one, torch.ones_like(one), {}))
            except StopForwardError:
                pass
            finally:
                handle.remove()
            self._arity = found[0] if found else 0
        return self._arity

    def features(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        *,
        cached: Mapping[int, Tensor] | None = None,
        read_mask: Tensor | None = None,
        **extra: Any,
    ) -> Tensor:
        """Pooled features ``(batch, pooler.output_dim(hidden))`` in the head's dtype; the pooler
        reads the tokens of ``read_mask`` (``data.positions``), by default the attention mask's."""
        dtype = next(self.head.parameters()).dtype
        hidden = tuple(
            h.to(dtype) for h in self.hidden_states(input_ids, attention_mask, cached=cached, **extra)
        )
        reads = attention_mask if read_mask is None else read_mask
        pooled: Tensor = self.pooler(hidden if self.pooler_spec.multi_layer else hidden[0], reads)
        if not self._pooler_checked:
            self._check_pooled(pooled, input_ids.shape[0])
        return pooled

    def token_logits(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        *,
        cached: Mapping[int, Tensor] | None = None,
        **extra: Any,
    ) -> Tensor:
        """``(batch, tokens, outputs)``: the head's logits on each token pooled alone (the pooler
        given that one token), what token-level training (``loss.token_level``) scores."""
        dtype = next(self.head.parameters()).dtype
        hidden = tuple(
            h.to(dtype) for h in self.hidden_states(input_ids, attention_mask, cached=cached, **extra)
        )
        b, t = input_ids.shape[0], input_ids.shape[1]
        alone = tuple(h.reshape(b * t, 1, *h.shape[2:]) for h in hidden)
        ones = torch.ones(b * t, 1, dtype=attention_mask.dtype, device=attention_mask.device)
        pooled: Tensor = self.pooler(alone if self.pooler_spec.multi_layer else alone[0], ones)
        logits: Tensor = self.head(pooled)
        return logits.reshape(b, t, -1)

    def _check_pooled(self, pooled: Tensor, batch: int) -> None:
        """On first use, hold the pooler to its promise: ``(batch, output_dim(hidden))``."""
        expected = (batch, self.pooler.output_dim(self.context.hidden_size))
        if tuple(pooled.shape) != expected:
            from probekit.registry import POOLERS

            # Blame the plugin: a token pooler inside multilayer rather than the built-in around it.
            culprit = self.pooler_spec
            inner = getattr(culprit, "token_pooler", None)
            if (
                isinstance(inner, PoolerSpec)
                and inner.kind in POOLERS
                and not POOLERS.entry(inner.kind).builtin
            ):
                culprit = inner
            kind = culprit.kind
            source = POOLERS.entry(kind).source if kind in POOLERS else type(culprit).__module__
            inside = f" (inside {self.pooler_spec.kind!r})" if culprit is not self.pooler_spec else ""
            raise PluginError(
                f"pooler {kind!r} from {source}{inside} returned shape {tuple(pooled.shape)}, but promised "
                f"{expected} (batch, output_dim({self.context.hidden_size})); the pooler is broken"
            )
        self._pooler_checked = True

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        *,
        cached: Mapping[int, Tensor] | None = None,
        features: Tensor | None = None,
        output: Literal["logits", "features", "hidden", "token_logits"] = "logits",
        layers: Sequence[int] | None = None,
        read_mask: Tensor | None = None,
        **extra: Any,
    ) -> Tensor:
        """Class logits ``(batch, num_classes)``, or what ``output`` asks for.

        ``features`` (pooled features from the activation cache) skips backbone and pooler;
        ``cached`` replays cached hidden states of the frozen prefix (see `hidden_states`).
        ``output`` asks for what the activation cache stores instead: the pooled ``features``
        (`features`), or the ``hidden`` states ``layers`` stacked to ``(batch, tokens, layers,
        hidden)`` (`hidden_states`). They are computed here, in the forward pass, because a
        sharded probe (FSDP) gathers its parameters only when its own forward runs.
        """
        if output == "features":
            return self.features(input_ids, attention_mask, cached=cached, read_mask=read_mask, **extra)
        if output == "token_logits":
            return self.token_logits(input_ids, attention_mask, cached=cached, **extra)
        if output == "hidden":
            hidden = self.hidden_states(input_ids, attention_mask, layers=layers, cached=cached, **extra)
            return torch.stack(hidden, dim=2)
        if features is not None:
            return self.head(features.to(next(self.head.parameters()).dtype))  # type: ignore[no-any-return]
        pooled = self.features(input_ids, attention_mask, cached=cached, read_mask=read_mask, **extra)
        return self.head(pooled)  # type: ignore[no-any-return]

    def embedding_modules(self) -> list[nn.Module]:
        """The backbone's embedding modules that exist (its layout names every candidate)."""
        modules: list[nn.Module] = []
        for prefix in self.layout.embedding_prefixes:
            try:
                modules.append(self.backbone.get_submodule(prefix))
            except AttributeError:
                continue
        return modules

    # -- frozen parts stay deterministic -------------------------------------------------------
    def frozen_modules(self) -> list[nn.Module]:
        """Blocks (and embeddings) the plan freezes: they always run in eval mode, without dropout."""
        blocks = self.layout.blocks(self.backbone)
        modules: list[nn.Module] = [blocks[i] for i in self.plan.frozen_blocks]
        if self.plan.embeddings_frozen:
            modules += self.embedding_modules()
        return modules

    def train(self, mode: bool = True) -> Probe:
        """Like ``nn.Module.train``, but frozen blocks and embeddings stay in eval mode."""
        super().train(mode)
        if mode:
            for module in self.frozen_modules():
                module.eval()
        return self

    # -- inference on texts ---------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, run_dir: str | Path, trust_remote_code: bool = False) -> Probe:
        """Load a trained probe from a run folder, ready to predict.

        The run folder is untrusted input: its ``probe.json`` is validated whole, every file it
        names must lie inside it, and its weights must match their checksum (see
        `probekit.checkpoint`). ``trust_remote_code``: allow the backbone's own Python code to
        run; a run folder that asks for it (``model.trust_remote_code: true``) is refused without
        it, since a run folder can never grant that itself.

        An export folder (``probekit export``) loads as a `probekit.exported.ExportedProbe`, run by
        ONNX Runtime without torch: it answers ``predict`` and ``predict_proba`` as a probe does,
        and has none of its torch methods.

        Raises:
            UserError: the run folder is missing, damaged, or not what it claims to be.
        """
        from probekit.exported import ExportedProbe, is_export
        from probekit.pretrained import load_probe

        if is_export(run_dir):
            return cast("Probe", ExportedProbe(run_dir))
        return load_probe(run_dir, trust_remote_code, cls=cls)

    def reader(self) -> Reader:
        """How this probe reads its inputs (`probekit.reading.Reader`): the chat template and token
        positions of its config's ``data`` (plain text, every token, without a config)."""
        from probekit.reading import reader_for

        data = self.probe_config.data if self.probe_config is not None else None
        key = (id(self.tokenizer), self.max_length, data)
        if self._reader is None or self._reader[0] != key:
            self._reader = (key, reader_for(self._require_tokenizer(), data, self.max_length))
        return self._reader[1]

    def _items(self, texts: Any) -> tuple[list[Any], bool]:
        """The checked inputs of `predict`: strings, or for a chat probe conversations too."""
        from probekit.data import check_texts

        reader = self.reader()
        if reader.chat is None:
            return check_texts(texts)
        if isinstance(texts, (str, Mapping)):
            return reader.inputs([texts], "text"), True
        if isinstance(texts, (bytes, bytearray, memoryview)) or not isinstance(texts, Sequence):
            return check_texts(texts)  # refused there, with the usual message
        return reader.inputs(list(texts)), False

    def _require_tokenizer(self) -> Any:
        if self.tokenizer is None:
            raise UserError("this probe has no tokenizer; load it with Probe.from_pretrained(run_dir)")
        return self.tokenizer

    @overload
    def predict_proba(
        self,
        texts: str | Sequence[str],
        batch_size: int = 64,
        max_tokens: int | None = 4096,
        *,
        as_array: Literal[True],
    ) -> np.ndarray: ...

    @overload
    def predict_proba(  # type: ignore[overload-overlap]  # a str is also a Sequence[str]: it comes first
        self,
        texts: str,
        batch_size: int = 64,
        max_tokens: int | None = 4096,
        *,
        as_array: Literal[False] = False,
    ) -> float: ...

    @overload
    def predict_proba(
        self,
        texts: Sequence[str],
        batch_size: int = 64,
        max_tokens: int | None = 4096,
        *,
        as_array: Literal[False] = False,
    ) -> list[float]: ...

    def predict_proba(
        self,
        texts: str | Sequence[str],
        batch_size: int = 64,
        max_tokens: int | None = 4096,
        *,
        as_array: bool = False,
    ) -> float | list[float] | np.ndarray:
        """The task's score per text (a binary probe: the probability of the positive class, index
        1; a multi-class probe: the list of its class probabilities, by class index): one for one
        string, a list for a sequence of strings; in batches sorted by length of at most
        ``batch_size`` texts and ``max_tokens`` padded tokens, through the one inference path
        (`probekit.inference.predict`). Texts are truncated to ``max_length`` tokens (a long
        text is tokenised through a prefix only, `probekit.tokens.encode_texts`).

        With ``as_array=True`` the result is a NumPy array shaped as scikit-learn's
        ``predict_proba``, one row per text (a single string is one row): ``(rows, classes)``
        class probabilities in label-index order (a binary probe: negative, positive), ``(rows,
        labels)`` for a multi-label probe, ``(rows,)`` values for a regression probe.

        Raises:
            probekit.data.TextTypeError: (a `TypeError`) bytes, or an item that is not a string
                (``texts[3]: expected a string, got int 123``).
            probekit.data.TextValueError: (a `ValueError`) an empty text, or one of only invisible
                characters (``texts[1]: has only invisible characters (U+200B ZERO WIDTH SPACE)``).
        """
        from probekit.batching import Encoded, inference_loader
        from probekit.inference import Runner, predict

        tokenizer = self._require_tokenizer()
        items, single = self._items(texts)
        task = self._task()
        if not items:
            if not as_array:
                return []
            # no rows: the shape a batch's scores have, from empty logits
            logits = torch.zeros(0, task.num_outputs(len(self.label_names)))
            return task.probability_matrix(task.scores(logits).numpy().astype(np.float64))
        encoding = self.reader().encode(items)
        ids = encoding.ids
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        blank = task.blank_label(task.num_outputs(len(self.label_names)))
        loader = inference_loader(
            Encoded(ids, [blank] * len(ids), 0, encoding.reads),
            int(pad_id),
            batch_size,
            padding_side=getattr(tokenizer, "padding_side", "right"),
            max_tokens=max_tokens,
        )
        device = next(self.head.parameters()).device
        was_training = self.training
        try:
            scores = predict(self, loader, Runner(device, self._autocast(device)), task)
        finally:
            self.train(was_training)
        if as_array:
            return task.probability_matrix(np.asarray(scores.scores, dtype=np.float64))
        # 1-D scores: a float per text; a multi-class probe: its list of class probabilities
        probs: list[Any] = scores.scores.tolist()
        return probs[0] if single else probs

    @overload
    def predict(  # type: ignore[overload-overlap]  # a str is also a Sequence[str]: it comes first
        self, texts: str, batch_size: int = 64, max_tokens: int | None = 4096, *, per_token: bool = False
    ) -> dict[str, Any]: ...

    @overload
    def predict(
        self,
        texts: Sequence[str],
        batch_size: int = 64,
        max_tokens: int | None = 4096,
        *,
        per_token: bool = False,
    ) -> list[dict[str, Any]]: ...

    def predict(
        self,
        texts: str | Sequence[str],
        batch_size: int = 64,
        max_tokens: int | None = 4096,
        *,
        per_token: bool = False,
    ) -> dict[str, Any] | list[dict[str, Any]]:
        """What the task says of each text: for a binary probe ``{"text", "label", "probability",
        "confidence", "probabilities"}`` (positive when ``probability``, the positive class's,
        reaches the threshold; ``confidence`` is the predicted label's probability and
        ``probabilities`` both classes' by label); for a multi-class one ``{"text", "label",
        "confidence", "probabilities"}`` (the argmax label, its probability, every class's
        probability by label name) and, with a
        ``negative_class``, ``"score"`` (1 - its probability) and ``"flagged"`` (score >=
        threshold). One dict for one string, a list of them for a sequence of strings. Raises as
        `predict_proba`.

        With ``per_token=True`` (a causal decoder backbone), each dict holds the text's
        ``tokens`` and, per token, the score the probe gives the text cut after it (``scores``),
        all from one forward pass, and for a binary probe ``first_flagged``: see
        `probekit.streaming.token_predictions`. A bidirectional backbone is refused in one line."""
        items, single = self._items(texts)
        if per_token:
            from probekit.streaming import token_predictions

            if not items:
                return []
            device = next(self.head.parameters()).device
            was_training = self.training
            try:
                self.eval()
                rows = token_predictions(self, items, batch_size, device, self._autocast(device))
            finally:
                self.train(was_training)
            return rows[0] if single else rows
        probs = self.predict_proba(items, batch_size, max_tokens)
        rows = self._task().predictions(items, probs, self.threshold, self.label_names)
        return rows[0] if single else rows

    def _autocast(self, device: torch.device) -> Any:
        """Autocast to the dtype frozen blocks are held in (bf16/fp16 after a mixed-precision run
        or with ``model.dtype``), so they feed the fp32 parts; a no-op for an fp32 backbone."""
        from contextlib import nullcontext
        from functools import partial

        half = half_dtypes(self.backbone)
        if not half:
            return nullcontext
        return partial(torch.autocast, device.type, dtype=half[0])

    def _task(self) -> Task:
        """The probe's task; a binary one with the default threshold rule when none was given."""
        if self.task is None:
            from probekit.config import ThresholdSpec
            from probekit.tasks.binary import BinaryTask

            self.task = BinaryTask(ThresholdSpec())
        return self.task


def _derives_positions(backbone: nn.Module) -> bool:
    """True for RoBERTa-style embeddings that already count positions past the padding."""
    embeddings = getattr(backbone, "embeddings", None)
    return embeddings is not None and getattr(embeddings, "padding_idx", None) is not None


class _Replay(nn.Module):
    """Stands in for a frozen block: returns the cached hidden state (or passes its input on)."""

    def __init__(self, value: Tensor | None, arity: int) -> None:
        super().__init__()
        self.value = value
        self.arity = arity

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        hidden = self.value if self.value is not None else (args[0] if args else kwargs["hidden_states"])
        return hidden if self.arity == 0 else (hidden, *([None] * (self.arity - 1)))
