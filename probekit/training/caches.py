"""Building the activation caches of a run (`probekit.cache` keeps the plan and the storage).

Frozen blocks give the same output for an example in every epoch; when the plan has a cache,
`build_caches` runs them once over the train and val splits through `probekit.inference.forward`
(the one inference path) and keeps what the probe needs (per-token hidden states, or pooled
features), reusing a matching cache from ``train.cache.dir``."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Literal

import torch

from probekit.batching import Batch, Collator, LengthSortedBatchSampler, length_share, progress_bar
from probekit.cache import SplitCache, build_split_cache, cache_facts, cache_key, storage_dtype
from probekit.inference import Runner, forward
from probekit.probe import Probe
from probekit.training.context import RunContext
from probekit.training.plan import TrainPlan


def _facts(plan: TrainPlan, model: Probe, dtype: torch.dtype) -> dict[str, Any]:
    """What every split's cached values depend on apart from its rows."""
    config, tokenizer = plan.config, plan.backbone.tokenizer
    assert plan.cache_plan is not None
    return cache_facts(
        model,
        plan.cache_plan,
        model={
            "name": plan.backbone.name,
            "revision": plan.backbone.revision,
            "provenance": plan.backbone.provenance,
        },
        tokenizer={
            "class": type(tokenizer).__name__,
            "name_or_path": str(getattr(tokenizer, "name_or_path", "")),
            "vocab_size": len(tokenizer),
            "max_length": config.model.max_length,
            "padding_side": config.model.padding_side,
        },
        dtype=dtype,
        # Accelerate's flag, as the keys of caches kept in train.cache.dir have always held it.
        precision=plan.precision.engine_flag,
    )


def build_caches(
    plan: TrainPlan, model: Probe, ctx: RunContext
) -> tuple[dict[str, SplitCache], dict[str, list[int]]]:
    """The activation caches of the train and val splits (built, or reused from ``cache.dir``),
    and, per split, the rows each process computed.

    With several processes each computes its share of the rows, and the shares are exchanged, so
    every process holds the whole cache and no row passes through the frozen blocks twice."""
    cache_plan, group, spec = plan.cache_plan, ctx.group, plan.config.train
    assert cache_plan is not None
    dtype = storage_dtype(spec.cache, plan.precision.name)
    width = (
        model.pooler.output_dim(model.layout.hidden_size)
        if cache_plan.mode == "pooled"
        else model.layout.hidden_size
    )
    model.eval()

    runner = Runner(ctx.device, ctx.autocast, group)
    output: Literal["features", "hidden"] = "features" if cache_plan.mode == "pooled" else "hidden"

    def compute(batch: Batch) -> torch.Tensor:
        # Through the probe's own forward: under FSDP only a call of the root unit gathers its
        # parameters.
        return forward(model, batch, runner, output=output, layers=cache_plan.layers)

    shared = _facts(plan, model, dtype)
    caches: dict[str, SplitCache] = {}
    rows_per_process: dict[str, list[int]] = {}
    try:
        for name in ("train", "val"):
            encoded = plan.encoded[name]
            key, facts = cache_key(shared, encoded.ids, encoded.reads)
            collate = Collator(encoded, plan.pad_id, "right")  # the cache stores real tokens only
            share: list[Sequence[int]] = list(
                LengthSortedBatchSampler(
                    encoded.lengths,
                    spec.eval_batch_size,
                    spec.eval_max_tokens,
                    length_share(encoded.lengths, group.rank, group.size),
                )
            )
            # Under FSDP every process runs as many forwards: empty batches run a throw-away one.
            share += [[] for _ in range(group.forward_counts(len(share)) - len(share))]
            begun, computed = time.perf_counter(), [0]

            def run(rows: Sequence[int], collate: Collator = collate, computed: list[int] = computed) -> Any:
                computed[0] += len(rows)
                return compute(collate(rows)) if rows else compute(collate([0]))[:0]

            cache = build_split_cache(
                cache_plan,
                encoded.lengths,
                progress_bar(share, ctx.progress, f"caching {name}", total=len(share)),
                run,
                width=width,
                dtype=dtype,
                spec=spec.cache,
                key=key,
                facts=facts,
                name=name,
                group=group,
            )
            caches[name] = cache
            rows_per_process[name] = [int(n) for n in group.gather(computed[0])]
            verb = "reused" if cache.reused else f"built in {time.perf_counter() - begun:.1f} s"
            shares = " + ".join(map(str, rows_per_process[name]))
            ctx.log(
                f"activation cache {name}: {len(encoded)} rows, {cache.nbytes / 2**20:.1f} MiB "
                f"({cache.location}), {verb}"
                + (f"; rows computed per process: {shares}" if group.active else "")
            )
    except BaseException:
        for cache in caches.values():
            cache.close()
        raise
    return caches, rows_per_process
