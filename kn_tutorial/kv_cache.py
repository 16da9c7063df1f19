"""The KV cache across transformers versions: which forward keyword takes it, where the output holds it.

transformers 5.x renamed the cache argument and output field from `past_key_values` to `cache`;
every method that reuses a forward pass's keys and values (attribution's prompt cache, causal
tracing's corrupted runs, ROME's and MEMIT's suffix-only passes, greedy generation) goes through
these two functions, so the rename is handled in one place. Inspect, rather than assume, so both work.
"""
from __future__ import annotations

import inspect


def cache_keyword(model) -> str:
    """The forward keyword that takes a KV cache: `cache` in recent transformers 5.x, `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def output_cache(output):
    """The KV cache a forward pass returned (`output.cache`, else `output.past_key_values`)."""
    cache = getattr(output, "cache", None)
    return output.past_key_values if cache is None else cache
