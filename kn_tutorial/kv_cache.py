"""The KV cache across transformers versions: which forward keyword takes it, where the output holds it.

transformers 5.x renamed the cache argument and output field from `past_key_values` to `cache`;
every method that reuses a forward pass's keys and values (attribution's prompt cache, causal
tracing's corrupted runs, ROME's and MEMIT's suffix-only passes, greedy generation) goes through
these two functions, so the rename is handled in one place. Inspect, rather than assume, so both work. `broadcast_cache` builds the cache that lets many rows
attend to one row's keys and values without copying them.
"""
from __future__ import annotations

import inspect
from collections.abc import Sequence

from transformers import DynamicCache


def cache_keyword(model) -> str:
    """The forward keyword that takes a KV cache: `cache` in recent transformers 5.x, `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def output_cache(output):
    """The KV cache a forward pass returned (`output.cache`, else `output.past_key_values`)."""
    cache = getattr(output, "cache", None)
    return output.past_key_values if cache is None else cache


def block_pairs(cache) -> list:
    """The (keys, values) of each block of a DynamicCache, [rows, heads, tokens, d_head] each."""
    return [(layer_cache.keys, layer_cache.values) for layer_cache in cache.layers]


def broadcast_cache(pairs: Sequence, rows: int | Sequence[int]):
    """A DynamicCache whose block b holds pairs[b] = (keys, values) of one row repeated for `rows`
    rows (or rows[b] for block b). The rows are expanded views of the one row, which the cache
    copies once into its own contiguous tensors (DynamicCache stores them so), so `pairs` are
    never written, however the forward pass extends the cache."""
    counts = [rows] * len(pairs) if isinstance(rows, int) else list(rows)
    return DynamicCache(ddp_cache_data=[(keys.expand(n, -1, -1, -1), values.expand(n, -1, -1, -1))
                                        for (keys, values), n in zip(pairs, counts)])
