"""Constants and small helpers shared by the test modules (importable as `common`: pytest puts tests/ on sys.path).
The tiny models themselves come from `factories`."""

from transformers import TrainerCallback

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


class StopAt(TrainerCallback):
    """Interrupts training after `step` (the schedule and `max_steps` stay those of the full run)."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True
        return control
