"""`evaluate.load("brierlm")` from the root of this repository.

`evaluate` resolves a bare name only as `./brierlm/brierlm.py` relative to the working directory (then the Hub, then
its cache), so this thin module makes the bare name work where the examples run. It is the BrierLM metric of the
installed package (`transformers_calm/brierlm/brierlm.py`, in the package's metric folder); elsewhere use
`evaluate.load(transformers_calm.BRIERLM_PATH)` or `transformers_calm.load_brierlm()`.
"""

from transformers_calm.brierlm.brierlm import BrierLM

__all__ = ["BrierLM"]
