"""Length-bucketed training batches and length-sorted inference batches."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from probekit.batching import BucketBatchSampler, LengthSortedBatchSampler, padding_fraction

lengths_st = st.lists(st.integers(1, 300), min_size=1, max_size=400)


@settings(max_examples=60, deadline=None)
@given(
    lengths=lengths_st,
    batch=st.integers(1, 16),
    buckets=st.integers(1, 60),
    seed=st.integers(0, 9),
    epoch=st.integers(0, 5),
)
def test_every_epoch_is_a_partition_with_only_the_last_batch_short(
    lengths: list[int], batch: int, buckets: int, seed: int, epoch: int
) -> None:
    sampler = BucketBatchSampler(lengths, batch, seed=seed, bucket_batches=buckets)
    sampler.set_epoch(epoch)
    batches = list(sampler)
    assert len(batches) == len(sampler)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert all(len(b) == batch for b in batches[:-1])
    assert 1 <= len(batches[-1]) <= batch
    assert batches == sampler.batches(epoch)  # the order depends on seed and epoch only


@settings(max_examples=40, deadline=None)
@given(lengths=lengths_st, batch=st.integers(1, 16), seed=st.integers(0, 9))
def test_one_bucket_of_the_whole_epoch_pads_least(lengths: list[int], batch: int, seed: int) -> None:
    """Sorting everything gives the minimum padding of any batching into these sizes."""
    whole = BucketBatchSampler(lengths, batch, seed=seed, bucket_batches=len(lengths)).batches(0)
    shuffled = BucketBatchSampler(lengths, batch, seed=seed, bucket_batches=1).batches(0)
    assert padding_fraction(lengths, whole) <= padding_fraction(lengths, shuffled) + 1e-12


def test_buckets_cut_padding_on_mixed_lengths_yet_shuffle_every_epoch() -> None:
    rng = random.Random(0)
    lengths = [rng.choice([rng.randint(5, 30), rng.randint(100, 250)]) for _ in range(2000)]
    bucketed = BucketBatchSampler(lengths, 8, seed=0, bucket_batches=50)
    plain = BucketBatchSampler(lengths, 8, seed=0, bucket_batches=1)
    assert padding_fraction(lengths, bucketed.batches(0)) < 0.25 * padding_fraction(lengths, plain.batches(0))
    epoch0, epoch1 = bucketed.batches(0), bucketed.batches(1)
    assert epoch0 != epoch1
    # Not sorted order: batch widths go up and down through the epoch.
    widths = [max(lengths[i] for i in b) for b in epoch0]
    assert widths != sorted(widths) and widths != sorted(widths, reverse=True)
    # Different seeds give different orders.
    assert BucketBatchSampler(lengths, 8, seed=1, bucket_batches=50).batches(0) != epoch0


@given(lengths=lengths_st, batch=st.integers(1, 70))
def test_inference_batches_run_longest_first(lengths: list[int], batch: int) -> None:
    sampler = LengthSortedBatchSampler(lengths, batch)
    order = [i for b in sampler for i in b]
    assert sorted(order) == list(range(len(lengths)))
    assert [lengths[i] for i in order] == sorted(lengths, reverse=True)
    assert len(sampler) == -(-len(lengths) // batch)


def test_padding_fraction_counts_padded_positions() -> None:
    assert padding_fraction([2, 4, 4], [[0, 1], [2]]) == 1 - 10 / 12
    assert padding_fraction([3, 3], [[0, 1]]) == 0.0
    assert padding_fraction([], []) == 0.0


@given(lengths=lengths_st, batch=st.integers(1, 70), max_tokens=st.integers(1, 2000))
def test_inference_batches_respect_the_token_budget(lengths: list[int], batch: int, max_tokens: int) -> None:
    batches = list(LengthSortedBatchSampler(lengths, batch, max_tokens))
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        width = max(lengths[i] for i in b)
        assert len(b) <= batch
        assert len(b) == 1 or len(b) * width <= max_tokens  # a lone longer row still runs
    assert [lengths[i] for b in batches for i in b] == sorted(lengths, reverse=True)
