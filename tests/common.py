"""Constants shared by the test modules (importable as `common`: pytest puts tests/ on sys.path). The tiny models
themselves come from `factories`."""

from factories import TINY_BACKBONE, TINY_HEAD

# Backbone, energy head and loss of the tiny CalmForCausalLM, for the modules that still build their models from
# config fields (the same values as `factories.tiny_calm`, which the others use).
TINY_LM = {**TINY_BACKBONE, **TINY_HEAD}

# What CalmTrainer.evaluate() reports.
EVAL_KEYS = {
    "eval_loss",
    "eval_energy_fidelity",
    "eval_energy_diversity",
    "eval_brier1",
    "eval_brier2",
    "eval_brier3",
    "eval_brier4",
    "eval_brierlm",
    "eval_reconstruction_accuracy",
}

# What CalmAutoencoderTrainer.evaluate() reports.
AUTOENCODER_EVAL_KEYS = {
    "eval_loss",
    "eval_reconstruction_loss",
    "eval_kl_loss",
    "eval_perplexity",
    "eval_reconstruction_accuracy",
    "eval_chunk_accuracy",
}
