"""The BrierLM `evaluate` module. Load it with `evaluate.load(transformers_calm.BRIERLM_PATH)` or
`transformers_calm.load_brierlm()`; `evaluate` reads `brierlm.py` in this folder."""
