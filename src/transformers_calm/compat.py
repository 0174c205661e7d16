"""The one place that knows which transformers release is installed.

transformers 5.24 renamed the key/value cache argument of every model's `forward`, and the matching field of its
output classes, from `past_key_values` to `cache` (the old name stays a deprecated alias until 5.40). CALM's own API
says `cache` on every supported release; transformers' classes (the Llama backbone, any causal LM that BrierLM scores,
generation outputs) are called and read with the name their release knows: `CACHE_NAME`.
"""

from transformers.modeling_outputs import BaseModelOutputWithPast

CACHE_NAME = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"

__all__ = ["CACHE_NAME"]
