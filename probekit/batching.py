"""Batches: their order (length-bucketed shuffling for training, longest-first for inference),
the tokenised rows of a split (`Encoded`), the typed `Batch` a `Collator` builds from row
indices, and the loaders of inference.

Dynamic padding pads each batch to its own longest row, so the padding a batch wastes depends on
how different its rows' lengths are. `BucketBatchSampler` shuffles the data, cuts it into buckets
of ``bucket_batches`` batches, sorts each bucket by length and splits it into batches, then
shuffles the order of the batches: every batch holds rows of similar length, yet which rows meet
and the order batches come in still change from epoch to epoch (sorted order would feed the
model all short texts first and all long ones last).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Sampler
from torch.utils.data import Dataset as TorchDataset

if TYPE_CHECKING:
    from probekit.cache import CachePlan, SplitCache
    from probekit.data import Split
    from probekit.distributed import Group
    from probekit.reading import Reader


class BucketBatchSampler(Sampler[list[int]]):
    """Shuffled batches of rows with similar lengths; only the epoch's last batch may be short.

    The order depends only on ``seed`` and the epoch (`set_epoch`, 0-based), never on global RNG
    state, so cached and uncached training (or a resumed run) see the same batches.

    Args:
        lengths: tokens per row.
        batch_size: rows per batch.
        seed: seeds the order of every epoch.
        bucket_batches: batches per bucket; 1 gives plain random batches.
    """

    def __init__(
        self, lengths: Sequence[int], batch_size: int, *, seed: int = 0, bucket_batches: int = 50
    ) -> None:
        if batch_size < 1 or bucket_batches < 1:
            raise ValueError("batch_size and bucket_batches must be at least 1")
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.bucket_batches = bucket_batches
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose order `__iter__` yields (Accelerate calls this too)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return -(-len(self.lengths) // self.batch_size)

    def batches(self, epoch: int | None = None) -> list[list[int]]:
        """The batches of ``epoch`` (default: the current one), in the order they are yielded."""
        epoch = self.epoch if epoch is None else epoch
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        bucket = self.batch_size * self.bucket_batches
        full: list[list[int]] = []
        short: list[list[int]] = []
        for start in range(0, len(order), bucket):
            rows = sorted(order[start : start + bucket], key=lambda i: -self.lengths[i])
            for b in range(0, len(rows), self.batch_size):
                batch = rows[b : b + self.batch_size]
                (full if len(batch) == self.batch_size else short).append(batch)
        shuffled = [full[i] for i in torch.randperm(len(full), generator=generator).tolist()]
        # Only the last bucket can leave a short batch; it goes last so that every gradient
        # accumulation window but the epoch's last holds exactly batch_size x accumulation rows.
        return shuffled + short

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.batches()


class LengthSortedBatchSampler(Sampler[list[int]]):
    """Inference order: batches of rows sorted longest first (the first batch shows peak memory).

    A batch holds at most ``batch_size`` rows and, when ``max_tokens`` is given, at most that many
    padded tokens (rows x its longest row; a single longer row still gets its own batch), so
    batches of long rows are smaller and peak memory stays bounded. ``rows``: batch only these
    rows (indices into ``lengths``), e.g. one process's share.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        max_tokens: int | None = None,
        rows: Sequence[int] | None = None,
    ) -> None:
        order = sorted(range(len(lengths)) if rows is None else rows, key=lambda i: -lengths[i])
        self._batches: list[list[int]] = []
        batch: list[int] = []
        for i in order:
            width = lengths[batch[0]] if batch else lengths[i]
            if batch and (len(batch) == batch_size or (max_tokens and (len(batch) + 1) * width > max_tokens)):
                self._batches.append(batch)
                batch = []
            batch.append(i)
        if batch:
            self._batches.append(batch)

    def __len__(self) -> int:
        return len(self._batches)

    def __iter__(self) -> Iterator[list[int]]:
        yield from self._batches


def padding_fraction(lengths: Sequence[int], batches: Sequence[Sequence[int]]) -> float:
    """Share of the token positions in ``batches`` that are padding (dynamic padding per batch)."""
    real = padded = 0
    for batch in batches:
        if not batch:
            continue
        widths = [lengths[i] for i in batch]
        real += sum(widths)
        padded += max(widths) * len(widths)
    return 0.0 if padded == 0 else 1.0 - real / padded


def length_share(lengths: Sequence[int], rank: int, processes: int) -> list[int]:
    """Process ``rank``'s rows for inference or caching: rows sorted longest first and dealt round
    robin, so every process gets about as many rows and tokens, and together they hold each row
    exactly once."""
    return sorted(range(len(lengths)), key=lambda i: -lengths[i])[rank::processes]


# -- tokenised rows and typed batches ----------------------------------------------------------
@dataclass(frozen=True)
class Encoded:
    """Token ids of one split (unpadded) with labels; ``truncated`` rows exceeded max_length."""

    ids: list[list[int]]
    labels: list[Any]
    """Per row: a class index, or a multi-label row's tuple of cells (``nan``: unknown), or a
    regression target; the latter two are batched as float tensors."""
    truncated: int
    reads: list[list[int]] | None = None
    """Per row, 0/1 per token: the tokens the pooler reads (``data.positions``); None: every
    token of the attention mask."""

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def lengths(self) -> list[int]:
        return [len(ids) for ids in self.ids]


def encode(reader: Reader, split: Split, where: Callable[[int], str] | None = None) -> Encoded:
    """Tokenise a split once through ``reader`` (`probekit.reading.Reader`: chat template and
    positions); rows longer than its ``max_length`` are truncated and counted. A long plain text
    is tokenised through a prefix (`probekit.tokens.encode_texts`), never whole."""
    encoding = reader.encode(split.texts, where or (lambda i: f"{split.source}: {split.name} row {i}"))
    return Encoded(encoding.ids, list(split.labels), sum(encoding.truncated), encoding.reads)


@dataclass(frozen=True)
class Batch:
    """Padded rows of a split: token ids and mask, labels, each row's index in the split, and
    what the activation cache holds for them (per-token ``cached`` hidden states stacked as
    ``(batch, tokens, layers, hidden)``, or pooled ``features``). A ``filler`` batch runs only to
    keep sharded processes in step (FSDP) and is not counted."""

    input_ids: Tensor
    attention_mask: Tensor
    labels: Tensor
    index: Tensor
    cached: Tensor | None = None
    features: Tensor | None = None
    filler: bool = False
    read_mask: Tensor | None = None
    """The tokens the pooler reads (``data.positions``), padded as the attention mask; None:
    the attention mask's tokens."""

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def to(self, device: torch.device) -> Batch:
        """The batch on ``device`` (the row index stays where it is)."""
        return replace(
            self,
            input_ids=self.input_ids.to(device),
            attention_mask=self.attention_mask.to(device),
            labels=self.labels.to(device),
            cached=None if self.cached is None else self.cached.to(device),
            features=None if self.features is None else self.features.to(device),
            read_mask=None if self.read_mask is None else self.read_mask.to(device),
        )

    def inputs(self, plan: CachePlan | None) -> dict[str, Any]:
        """The probe's keyword arguments for this batch: token ids, and the cached activations."""
        found: dict[str, Any] = {"input_ids": self.input_ids, "attention_mask": self.attention_mask}
        if self.read_mask is not None:
            found["read_mask"] = self.read_mask
        if self.features is not None:
            found["features"] = self.features
        elif self.cached is not None and plan is not None:
            found["cached"] = {layer: self.cached[:, :, j] for j, layer in enumerate(plan.layers)}
        return found


class Collator:
    """Dynamic padding: each batch is padded to its own longest row (on ``padding_side``), with the
    split cache's values for its rows when there is one."""

    def __init__(
        self, encoded: Encoded, pad_id: int, padding_side: str = "right", cache: SplitCache | None = None
    ) -> None:
        self.encoded = encoded
        self.pad_id = pad_id
        self.left = padding_side == "left"
        self.cache = cache

    def __call__(self, indices: Sequence[int]) -> Batch:
        from probekit.tokens import pad_rows

        rows = [self.encoded.ids[i] for i in indices]
        ids, mask = pad_rows(rows, self.pad_id, left=self.left)
        targets = [self.encoded.labels[i] for i in indices]
        floats = bool(targets) and isinstance(targets[0], (float, tuple))
        labels = torch.tensor(targets, dtype=torch.float32 if floats else torch.long)
        index = torch.tensor(list(indices), dtype=torch.long)
        reads = None
        if self.encoded.reads is not None:
            reads = pad_rows([self.encoded.reads[i] for i in indices], 0, left=self.left)[0]
        if self.cache is None:
            return Batch(ids, mask, labels, index, read_mask=reads)
        values = self.cache.batch(indices, ids.shape[1], self.left)
        if self.cache.plan.mode == "pooled":
            return Batch(ids, mask, labels, index, features=values, read_mask=reads)
        return Batch(ids, mask, labels, index, cached=values, read_mask=reads)


class _Indices(TorchDataset[int]):
    """Row indices 0..n-1: the collator looks the rows up."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> int:
        return index


def inference_loader(
    encoded: Encoded,
    pad_id: int,
    batch_size: int,
    *,
    padding_side: str = "right",
    cache: SplitCache | None = None,
    max_tokens: int | None = None,
    group: Group | None = None,
) -> DataLoader[Any]:
    """Inference batches sorted by length, longest first (least padding), of at most
    ``batch_size`` rows and ``max_tokens`` padded tokens; with several processes, this process's
    share of them (every row is in exactly one process's share)."""
    rows = length_share(encoded.lengths, group.rank, group.size) if group is not None else None
    batches = list(LengthSortedBatchSampler(encoded.lengths, batch_size, max_tokens, rows))
    return DataLoader(
        _Indices(len(encoded)),
        batch_sampler=batches,
        collate_fn=Collator(encoded, pad_id, padding_side, cache),
    )


def with_fillers(loader: DataLoader[Any], group: Group) -> Iterator[Batch]:
    """``loader``'s batches, then throw-away one-row batches (``filler``) until this process has
    run as many as the process with the most: under FSDP every forward pass all-gathers."""
    total = group.forward_counts(len(loader))
    yield from loader
    for _ in range(total - len(loader)):
        yield replace(loader.collate_fn([0]), filler=True)


def progress_bar(
    iterable: Iterable[Any], enabled: bool, desc: str, total: int | None = None
) -> Iterator[Any]:
    """``iterable``, with a progress bar on stderr when ``enabled``."""
    if not enabled:
        yield from iterable
        return
    from tqdm.auto import tqdm  # type: ignore[import-untyped]

    yield from tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True, file=sys.stderr)


def in_notebook() -> bool:
    """True in a Jupyter kernel (IPython's ZMQ shell), where tqdm's auto front end draws widgets."""
    ipython = sys.modules.get("IPython")
    get = getattr(ipython, "get_ipython", None)
    shell = get() if callable(get) else None
    return type(shell).__name__ == "ZMQInteractiveShell"


class Progress:
    """``iterable`` with its progress shown: a bar (tqdm's auto front end: a terminal or a notebook)
    when ``bar``, with the values last given to `note` beside it; else, with ``heartbeat``, one line
    at most every ``every`` seconds (done/total, the noted values, elapsed time and ETA), so a log
    that is not a terminal (CI, a batch job) still shows the run moving.

    Args:
        iterable: what to iterate.
        bar: draw a progress bar (on stderr).
        desc: what is iterated (``epoch 3/10``).
        total: how many items (for the percentage and ETA).
        heartbeat: where heartbeat lines go (``RunContext.log``); None: no heartbeat.
        every: the fewest seconds between two heartbeat lines.
        clock: the time source (seconds; monotonic).
    """

    def __init__(
        self,
        iterable: Iterable[Any],
        *,
        bar: bool,
        desc: str,
        total: int | None = None,
        heartbeat: Callable[[str], None] | None = None,
        every: float = 30.0,
        clock: Callable[[], float] | None = None,
    ) -> None:
        import time

        self.iterable, self.bar, self.desc, self.total = iterable, bar, desc, total
        self.heartbeat, self.every = heartbeat, every
        self.clock = clock or time.monotonic
        self.values: dict[str, float] = {}
        self._tqdm: Any = None

    def note(self, **values: float) -> None:
        """Values to show with the progress (e.g. the running loss and learning rate)."""
        self.values.update(values)
        if self._tqdm is not None:
            self._tqdm.set_postfix({k: f"{v:.4g}" for k, v in self.values.items()}, refresh=False)

    def __iter__(self) -> Iterator[Any]:
        if self.bar:
            from tqdm.auto import tqdm

            self._tqdm = tqdm(
                self.iterable,
                desc=self.desc,
                total=self.total,
                leave=False,
                dynamic_ncols=True,
                file=sys.stderr,
            )
            try:
                yield from self._tqdm
            finally:
                self._tqdm.close()
                self._tqdm = None
            return
        if self.heartbeat is None:
            yield from self.iterable
            return
        start = last = self.clock()
        for done, item in enumerate(self.iterable):
            yield item
            now = self.clock()
            if now - last >= self.every:
                last = now
                self.heartbeat(self.line(done + 1, now - start))

    def line(self, done: int, elapsed: float) -> str:
        """A heartbeat line: ``epoch 2/10: 40/120 (33%), loss 0.4123, lr 2e-05; 1m05s elapsed, ETA 2m10s``."""
        count = f"{done}/{self.total} ({done / self.total:.0%})" if self.total else f"{done}"
        values = "".join(f", {k} {v:.4g}" for k, v in self.values.items())
        eta = ""
        if self.total and done:
            eta = f", ETA {_duration(elapsed / done * (self.total - done))}"
        return f"{self.desc}: {count}{values}; {_duration(elapsed)} elapsed{eta}"


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"
