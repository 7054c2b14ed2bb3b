"""Batch orders: length-bucketed shuffling for training, longest-first for inference.

Dynamic padding pads each batch to its own longest row, so the padding a batch wastes depends on
how different its rows' lengths are. `BucketBatchSampler` shuffles the data, cuts it into buckets
of ``bucket_batches`` batches, sorts each bucket by length and splits it into batches, then
shuffles the order of the batches: every batch holds rows of similar length, yet which rows meet
and the order batches come in still change from epoch to epoch (sorted order would feed the
model all short texts first and all long ones last).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler


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
