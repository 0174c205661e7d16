"""The one place that knows which transformers release is installed, and works around what a torch release lacks.

transformers 5.24 renamed the key/value cache argument of every model's `forward`, and the matching field of its
output classes, from `past_key_values` to `cache` (the old name stays a deprecated alias until 5.40). CALM's own API
says `cache` on every supported release; transformers' classes (the Llama backbone, any causal LM that BrierLM scores,
generation outputs) are called and read with the name their release knows: `CACHE_NAME`.
"""

from transformers.modeling_outputs import BaseModelOutputWithPast

CACHE_NAME = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"


def cache_max_length(cache) -> int:
    """How many positions a cache can hold (-1 or None: unbounded). `Cache.get_max_length` from transformers 5.2x,
    `get_max_cache_shape` before."""
    method = getattr(cache, "get_max_length", None) or cache.get_max_cache_shape
    return method()


def generator_kwargs(generator) -> dict:
    """`{"generator": generator}`, or `{}` for `None`: torch.compile (torch 2.13) fails to trace a random draw of a
    symbolic shape (a number of samples that changed between calls) when `generator=None` is passed explicitly."""
    return {} if generator is None else {"generator": generator}


__all__ = ["CACHE_NAME", "cache_max_length", "generator_kwargs"]
