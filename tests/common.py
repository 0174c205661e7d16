"""Constants shared by the test modules (importable as `common`: pytest puts tests/ on sys.path). The tiny models
themselves come from `factories`."""

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
