"""Tests of `CalmTrainer`: energy terms in the logs, evaluation (BrierLM, reconstruction accuracy), gradient
accumulation, bf16, gradient checkpointing and exact resumption.

Tiny models and random blocks built here, CPU, one process, offline."""

import math

import pytest
import torch
from common import EVAL_KEYS, TINY_LM
from datasets import Dataset
from transformers import TrainerCallback, TrainingArguments

from transformers_calm import (
    CalmAutoencoder,
    CalmAutoencoderConfig,
    CalmForCausalLM,
    CalmTrainer,
    modeling_calm,
)
from transformers_calm.brierlm import model_brier_terms, scores_from_terms
from transformers_calm.modeling_calm import CalmEnergyHead
from transformers_calm.trainer_calm import block_fingerprints

pytestmark = pytest.mark.filterwarnings("ignore:BrierLM is reported as 0")  # untrained models score <= 0

# transformers 5.23 renamed TrainingArguments.gradient_checkpointing (kept as a deprecated alias) to
# activation_checkpointing; the suite runs on releases before and after.
CHECKPOINTING_ARG = (
    "activation_checkpointing"
    if "activation_checkpointing" in TrainingArguments.__dataclass_fields__
    else "gradient_checkpointing"
)
K = 4
BLOCK = 8 * K  # 8 chunks per block
AE_KWARGS = {
    "vocab_size": 61,
    "patch_size": K,
    "latent_size": 6,
    "hidden_size": 16,
    "intermediate_size": 24,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
LM_KWARGS = {
    **TINY_LM,
    "num_targets": 8,
    "max_position_embeddings": BLOCK // K,
}


def make_model(seed=0) -> CalmForCausalLM:
    """A tiny CALM around a random autoencoder. The head's output layer starts at zero (then no gradient reaches the
    backbone on the first step): give it random weights, so that every test exercises the whole model."""
    torch.manual_seed(seed)
    autoencoder = CalmAutoencoder(CalmAutoencoderConfig(**AE_KWARGS))
    model = CalmForCausalLM.from_autoencoder(autoencoder, **LM_KWARGS)
    with torch.no_grad():
        last = model.generative_head.final_layer.linears[-1]
        last.weight.normal_(0.0, 0.5)
        last.bias.normal_(0.0, 0.5)
    return model


def make_blocks(num_blocks, seed=0) -> Dataset:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, AE_KWARGS["vocab_size"], (num_blocks, BLOCK), generator=generator).tolist()
    return Dataset.from_dict({"input_ids": ids, "labels": ids})


def make_args(tmp_path, **overrides) -> TrainingArguments:
    defaults = {
        "output_dir": str(tmp_path / "out"),
        "use_cpu": True,
        "report_to": "none",
        "save_strategy": "no",
        "logging_steps": 1,
        "per_device_train_batch_size": 2,
        "per_device_eval_batch_size": 2,
        "learning_rate": 1e-3,
        "max_steps": 2,
        "seed": 0,
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
    }
    return TrainingArguments(**{**defaults, **overrides})


def train_logs(trainer):
    return [entry for entry in trainer.state.log_history if "loss" in entry]


def weights(model) -> dict[str, torch.Tensor]:
    """Every tensor of the state dict (the frozen autoencoder and tied weights included)."""
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


# ------------------------------------------------------------------------------------------------------ training


def test_train_logs_carry_energy_terms(tmp_path):
    """Every train log has the energy terms, averaged over exactly the micro-batches whose losses `loss` averages:
    the loss is 2 * fidelity - diversity per batch, so the logged means obey the same identity."""
    args = make_args(tmp_path, max_steps=4, logging_steps=2, gradient_accumulation_steps=2)
    trainer = CalmTrainer(model=make_model(), args=args, train_dataset=make_blocks(8))
    trainer.train()
    logs = train_logs(trainer)
    assert [entry["step"] for entry in logs] == [2, 4]
    for entry in logs:
        assert entry["energy_fidelity"] > 0 and entry["energy_diversity"] > 0
        assert entry["loss"] == pytest.approx(2 * entry["energy_fidelity"] - entry["energy_diversity"], rel=1e-5)
    # The end-of-training summary is not a periodic log: no energy terms there.
    assert "energy_fidelity" not in trainer.state.log_history[-1]


def test_trainer_sets_loss_scaling_for_gradient_accumulation(tmp_path):
    trainer = CalmTrainer(model=make_model(), args=make_args(tmp_path), train_dataset=make_blocks(2))
    assert trainer.model_accepts_loss_kwargs is False
    assert trainer.loss_is_scaled_for_ga is False


def batch_independent_noise(self, hidden_states, generator=None):
    """Head noise that depends on (sample, position, coordinate) only: not on the batch row, not on any RNG draw."""
    num_samples, batch, positions, _ = hidden_states.shape  # (N, batch, positions, hidden) in the energy loss
    index = torch.arange(num_samples * positions * self.noise_size, dtype=torch.float64)
    noise = (torch.sin(index * 12.9898 + 1.0) * 43758.5453).remainder(1.0) - 0.5
    shape = (num_samples, 1, positions, self.noise_size)
    return noise.reshape(shape).expand(num_samples, batch, positions, self.noise_size).to(hidden_states.dtype)


def test_gradient_accumulation_matches_the_larger_batch(tmp_path, monkeypatch):
    """GA=2 with batch 2 gives the update of batch 4: same logged loss, same gradient norm, same weights.

    The loss draws head noise and autoencoder posterior samples; a batch of 4 and two batches of 2 draw them in a
    different order. To compare exactly, the noise is made a function of the position only and the targets are the
    posterior means. SGD without clipping, so that a gradient scaled by the wrong factor changes the update (Adam and
    clipping would hide it)."""
    monkeypatch.setattr(CalmEnergyHead, "sample_noise", batch_independent_noise)
    original = modeling_calm.energy_score_terms

    def posterior_means(samples, target_mean, target_log_std, num_targets, alpha):
        return original(samples, target_mean, torch.full_like(target_log_std, -math.inf), num_targets, alpha)

    monkeypatch.setattr(modeling_calm, "energy_score_terms", posterior_means)

    results = []
    for batch_size, accumulation in ((4, 1), (2, 2)):
        model = make_model()
        before = weights(model)
        args = make_args(
            tmp_path,
            max_steps=1,
            per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=accumulation,
            optim="sgd",
            learning_rate=0.1,
            weight_decay=0.0,
            lr_scheduler_type="constant",
            max_grad_norm=0.0,
        )
        trainer = CalmTrainer(model=model, args=args, train_dataset=make_blocks(4))
        trainer.train()
        (log,) = train_logs(trainer)
        results.append((log, before, weights(model)))

    (big_log, before, big), (small_log, _, small) = results
    assert small_log["loss"] == pytest.approx(big_log["loss"], rel=1e-5)
    assert small_log["grad_norm"] == pytest.approx(big_log["grad_norm"], rel=1e-5)
    moved = [name for name in big if not torch.equal(big[name], before[name])]
    assert any("backbone.layers" in name for name in moved) and any("generative_head" in name for name in moved)
    for name in big:
        torch.testing.assert_close(small[name], big[name], rtol=1e-5, atol=1e-6, msg=name)


def test_bf16_training_is_finite_and_autocast(tmp_path):
    model = make_model()
    dtypes = []
    hook = model.model.backbone.layers[0].register_forward_hook(
        lambda module, args, output: dtypes.append(output.dtype)
    )
    trainer = CalmTrainer(model=model, args=make_args(tmp_path, bf16=True), train_dataset=make_blocks(4))
    trainer.train()
    hook.remove()
    assert torch.bfloat16 in dtypes  # the Trainer's autocast reached the backbone
    logs = train_logs(trainer)
    assert len(logs) == 2
    for entry in logs:
        assert all(math.isfinite(entry[key]) for key in ("loss", "grad_norm", "energy_fidelity", "energy_diversity"))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    metrics = trainer.evaluate(make_blocks(3, seed=1))
    assert EVAL_KEYS <= metrics.keys() and all(math.isfinite(metrics[key]) for key in EVAL_KEYS)


def test_gradient_checkpointing_gives_the_same_training(tmp_path):
    """With activation (gradient) checkpointing the backbone layers recompute their forward in the backward pass (each
    attention runs twice per step), and the training is the same."""
    final = {}
    for checkpointing in (False, True):
        model = make_model()
        calls = []
        hook = model.model.backbone.layers[0].self_attn.register_forward_hook(
            lambda *args, calls=calls: calls.append(1)
        )
        args = make_args(tmp_path, **{CHECKPOINTING_ARG: checkpointing})
        trainer = CalmTrainer(model=model, args=args, train_dataset=make_blocks(4))
        trainer.train()
        hook.remove()
        assert len(calls) == (4 if checkpointing else 2)  # 2 steps
        assert all(layer.gradient_checkpointing == checkpointing for layer in model.model.backbone.layers)
        final[checkpointing] = weights(model)
    for name, value in final[False].items():
        torch.testing.assert_close(final[True][name], value, rtol=1e-5, atol=1e-6, msg=name)


class StopAt(TrainerCallback):
    """Interrupts training after `step` (the schedule and `max_steps` stay those of the full run)."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True
        return control


def test_resume_from_checkpoint_is_exact(tmp_path):
    """6 steps in one go == 3 steps, checkpoint, and a resumed run from a fresh process state (another model init, a
    disturbed RNG). 8 blocks in batches of 2: the run crosses an epoch boundary after the checkpoint."""
    args = make_args(tmp_path, max_steps=6, save_strategy="steps", save_steps=3, lr_scheduler_type="linear")

    full = CalmTrainer(model=make_model(), args=args, train_dataset=make_blocks(8))
    full.train()
    expected = weights(full.model)

    interrupted = CalmTrainer(model=make_model(), args=args, train_dataset=make_blocks(8), callbacks=[StopAt(3)])
    interrupted.train()
    assert interrupted.state.global_step == 3
    checkpoint = tmp_path / "out" / "checkpoint-3"
    assert (checkpoint / "rng_state.pth").is_file()

    torch.manual_seed(1234)
    resumed = CalmTrainer(model=make_model(seed=1), args=args, train_dataset=make_blocks(8))
    torch.rand(7)  # whatever the RNG state before resuming, the checkpoint's is restored
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 6
    final = weights(resumed.model)
    assert final.keys() == expected.keys()
    different = [name for name in expected if not torch.equal(final[name], expected[name])]
    assert not different, f"resumed run differs from the uninterrupted one in {different}"
    # The log history (steps 1..3 restored from the checkpoint, then 4..6) is that of the uninterrupted run, too.
    assert [(e["step"], e["loss"]) for e in train_logs(resumed)] == [(e["step"], e["loss"]) for e in train_logs(full)]


# ---------------------------------------------------------------------------------------------------- evaluation


def test_evaluate_returns_brierlm_and_reconstruction_accuracy(tmp_path):
    model = make_model()
    eval_blocks = make_blocks(5, seed=1)  # odd: the last batch is partial
    trainer = CalmTrainer(model=model, args=make_args(tmp_path, seed=3), eval_dataset=eval_blocks)
    rng_state = torch.get_rng_state()
    metrics = trainer.evaluate()
    assert EVAL_KEYS <= metrics.keys()
    # Evaluating leaves the global RNG alone: eval during training does not change the training run.
    assert torch.equal(torch.get_rng_state(), rng_state)

    # BrierLM: the package's estimator on the same blocks, each seeded with (args.seed, its fingerprint).
    blocks = torch.tensor(eval_blocks["input_ids"])
    model.eval()
    terms = model_brier_terms(model, blocks, seed=3, block_indices=block_fingerprints(blocks)).terms
    expected = scores_from_terms(terms, prefix="eval_")
    assert terms.shape == (5, BLOCK // K - 1, 4)
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, abs=1e-12), key
    # Reconstruction accuracy of the frozen autoencoder: argmax of decode(posterior mean) == input.
    with torch.no_grad():
        mean, _ = model.autoencoder.encode(blocks)
        accuracy = (model.autoencoder.decode(mean).argmax(-1) == blocks).double().mean().item()
    assert metrics["eval_reconstruction_accuracy"] == pytest.approx(accuracy, abs=1e-12)
    assert metrics["eval_loss"] == pytest.approx(
        2 * metrics["eval_energy_fidelity"] - metrics["eval_energy_diversity"], rel=1e-5
    )

    # Deterministic: again, and with another eval batch size (BrierLM and accuracy are per block).
    again = trainer.evaluate()
    assert {k: again[k] for k in EVAL_KEYS} == {k: metrics[k] for k in EVAL_KEYS}
    other_batch = CalmTrainer(
        model=model, args=make_args(tmp_path, seed=3, per_device_eval_batch_size=3), eval_dataset=eval_blocks
    ).evaluate()
    per_block = ["eval_brier1", "eval_brier2", "eval_brier3", "eval_brier4", "eval_brierlm"]
    assert {k: other_batch[k] for k in per_block} == {k: metrics[k] for k in per_block}
    assert other_batch["eval_reconstruction_accuracy"] == metrics["eval_reconstruction_accuracy"]
    # Another seed, other draws.
    other_seed = CalmTrainer(model=model, args=make_args(tmp_path, seed=4), eval_dataset=eval_blocks).evaluate()
    assert [other_seed[k] for k in per_block[:4]] != [metrics[k] for k in per_block[:4]]


def test_eval_during_training_and_best_model_by_brierlm(tmp_path):
    args = make_args(
        tmp_path,
        max_steps=4,
        eval_strategy="steps",
        eval_steps=2,
        save_strategy="steps",
        save_steps=2,
        metric_for_best_model="eval_brierlm",
        load_best_model_at_end=True,
    )
    trainer = CalmTrainer(model=make_model(), args=args, train_dataset=make_blocks(8), eval_dataset=make_blocks(3, 1))
    trainer.train()
    evals = [entry for entry in trainer.state.log_history if "eval_brierlm" in entry]
    assert [entry["step"] for entry in evals] == [2, 4]
    assert all(EVAL_KEYS <= entry.keys() for entry in evals)
    assert trainer.state.best_metric == max(entry["eval_brierlm"] for entry in evals)
    assert trainer.state.best_model_checkpoint is not None

    # Evaluating during training does not change the training run.
    plain = CalmTrainer(model=make_model(), args=make_args(tmp_path, max_steps=4), train_dataset=make_blocks(8))
    plain.train()
    assert [e["loss"] for e in train_logs(plain)] == [e["loss"] for e in train_logs(trainer)]


def test_prediction_loss_only(tmp_path):
    args = make_args(tmp_path, prediction_loss_only=True)
    metrics = CalmTrainer(model=make_model(), args=args, eval_dataset=make_blocks(2)).evaluate()
    assert "eval_loss" in metrics and "eval_brierlm" not in metrics
