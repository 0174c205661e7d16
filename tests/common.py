"""Constants shared by the test modules (importable as `common`: pytest puts tests/ on sys.path)."""

# Backbone, energy head and loss of the tiny CalmForCausalLM the tests build (CPU milliseconds per step); each module
# adds its own autoencoder shape and special tokens.
TINY_LM = {
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_mlp_layers": 2,
    "noise_size": 8,
    "num_samples": 4,
    "num_targets": 16,
}

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
