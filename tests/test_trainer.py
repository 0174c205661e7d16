"""Tests of `CalmTrainer` (energy terms in the logs, evaluation: BrierLM, reconstruction accuracy; gradient
accumulation, bf16, gradient checkpointing, exact resumption) and of `CalmAutoencoderTrainer` (loss terms in the logs,
evaluation: reconstruction accuracy).

Tiny models from `factories`, random blocks, CPU, one process, offline."""

import importlib
import math

import factories
import pytest
import torch
from common import AUTOENCODER_EVAL_KEYS, EVAL_KEYS, StopAt
from datasets import Dataset
from transformers import TrainingArguments

import transformers_calm
from transformers_calm import CalmAutoencoder, CalmAutoencoderTrainer, CalmForCausalLM, CalmTrainer, calm_loss
from transformers_calm.brierlm import model_brier_terms, scores_from_terms
from transformers_calm.modeling_calm import CalmEnergyHead
from transformers_calm.trainer_calm import block_fingerprints
from transformers_calm.trainer_logging import LossTermsLoggingMixin

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


def make_model(seed=0) -> CalmForCausalLM:
    """A tiny CALM around a random autoencoder, in train mode. The head's output layer gets random weights (it starts
    at zero, and then no gradient reaches the backbone on the first step), so that every test exercises the whole
    model."""
    backbone = {"max_position_embeddings": BLOCK // K}
    return factories.tiny_calm(seed, autoencoder=AE_KWARGS, backbone=backbone, num_targets=8).train()


def make_autoencoder(seed=0) -> CalmAutoencoder:
    """A tiny autoencoder (of the CALM above), in train mode."""
    return factories.tiny_autoencoder(seed, **AE_KWARGS).train()


def make_blocks(num_blocks, seed=0) -> Dataset:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, AE_KWARGS["vocab_size"], (num_blocks, BLOCK), generator=generator).tolist()
    return Dataset.from_dict({"input_ids": ids, "labels": ids})


def make_args(tmp_path, arguments_class=TrainingArguments, **overrides) -> TrainingArguments:
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
    return arguments_class(**{**defaults, **overrides})


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
    original = calm_loss.energy_score_terms

    def posterior_means(samples, target_mean, target_log_std, num_targets, alpha):
        return original(samples, target_mean, torch.full_like(target_log_std, -math.inf), num_targets, alpha)

    monkeypatch.setattr(calm_loss, "energy_score_terms", posterior_means)

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


@pytest.mark.slow  # compiles
def test_torch_compile_trains_as_eager(tmp_path, monkeypatch):
    """`TrainingArguments(torch_compile=True)`: the Trainer compiles CALM (its energy loss included) and trains it as
    eager does. Inductor draws its own random numbers unless `fallback_random` makes it use torch's, as eager does."""
    import torch._inductor.config

    monkeypatch.setattr(torch._inductor.config, "fallback_random", True)
    losses, final = {}, {}
    for compiled in (False, True):
        model = make_model()
        args = make_args(tmp_path / str(compiled), torch_compile=compiled, max_steps=3)
        trainer = CalmTrainer(model=model, args=args, train_dataset=make_blocks(6))
        trainer.train()
        assert (type(trainer.model_wrapped).__name__ == "OptimizedModule") == compiled
        losses[compiled], final[compiled] = [entry["loss"] for entry in train_logs(trainer)], weights(model)
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)
    for name, value in final[False].items():
        torch.testing.assert_close(final[True][name], value, rtol=1e-4, atol=1e-6, msg=name)


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


def calm_args(tmp_path, **overrides):
    return make_args(tmp_path, transformers_calm.CalmTrainingArguments, **overrides)


def test_head_learning_rate_gives_the_head_its_own_groups_and_schedule(tmp_path):
    """head_learning_rate: the head's parameters (and only they) in groups at that peak learning rate, each weight
    decay group split in two, the scheduler scaling every group alike."""
    args = calm_args(tmp_path, max_steps=4, warmup_steps=2, lr_scheduler_type="linear", head_learning_rate=1e-2)
    assert args.head_learning_rate == 1e-2
    trainer = CalmTrainer(model=make_model(), args=args, train_dataset=make_blocks(8))
    trainer.create_optimizer_and_scheduler(num_training_steps=4)
    head = {id(p) for p in trainer.model.generative_head.parameters()}
    trainable = {id(p) for p in trainer.model.parameters() if p.requires_grad}
    groups = trainer.optimizer.param_groups
    assert len(groups) == 4  # (decay, no decay) x (rest, head)
    assert sorted(id(p) for g in groups for p in g["params"]) == sorted(trainable)
    for group in groups:
        in_head = {id(p) in head for p in group["params"]}
        assert len(in_head) == 1
        assert group["initial_lr"] == (1e-2 if in_head.pop() else 1e-3)
    assert {g["weight_decay"] for g in groups} == {0.0, args.weight_decay}
    for _ in range(3):
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
    ratios = {g["lr"] / g["initial_lr"] for g in groups}
    assert len(ratios) == 1 and 0 < ratios.pop() < 1  # one schedule: the same fraction of each group's peak


def test_head_learning_rate_trains_and_resumes_exactly(tmp_path):
    """A run with head_learning_rate differs from one without only through the head's learning rate, and resumes
    exactly from a checkpoint (the optimizer's groups are rebuilt the same way before its state is loaded)."""
    args = calm_args(tmp_path, max_steps=4, save_strategy="steps", save_steps=2, head_learning_rate=3e-2)
    full = CalmTrainer(model=make_model(), args=args, train_dataset=make_blocks(8))
    full.train()
    expected = weights(full.model)
    resumed = CalmTrainer(model=make_model(seed=1), args=args, train_dataset=make_blocks(8))
    resumed.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))
    assert all(torch.equal(weights(resumed.model)[name], expected[name]) for name in expected)
    plain = CalmTrainer(
        model=make_model(), args=make_args(tmp_path / "plain", max_steps=4), train_dataset=make_blocks(8)
    )
    plain.train()
    start = weights(make_model())
    moved = lambda w, prefix: sum((w[n] - start[n]).abs().sum().item() for n in w if n.startswith(prefix))  # noqa: E731
    # With a 30x learning rate the head moves further from its init than with the plain one.
    assert moved(expected, "generative_head") > 3 * moved(weights(plain.model), "generative_head")


def test_head_learning_rate_errors(tmp_path):
    with pytest.raises(ValueError, match="head_learning_rate must be > 0"):
        calm_args(tmp_path, head_learning_rate=0.0)
    model = make_model()
    model.generative_head.requires_grad_(False)
    with pytest.raises(ValueError, match="generative head has no trainable parameters"):
        CalmTrainer(model=model, args=calm_args(tmp_path, head_learning_rate=1e-2)).create_optimizer()


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


# ------------------------------------------------------------------------------------------ CalmAutoencoderTrainer


def test_autoencoder_trainer_is_the_library_one_and_shares_the_loss_term_logging(tmp_path):
    """The trainer comes from the package (lazily, like CalmTrainer); the example script uses that same class. Both
    trainers log their loss terms the same way."""
    assert CalmAutoencoderTrainer.__module__ == "transformers_calm.trainer_calm_autoencoder"
    assert "CalmAutoencoderTrainer" in transformers_calm.__all__
    assert importlib.import_module("train_autoencoder").CalmAutoencoderTrainer is CalmAutoencoderTrainer
    for trainer_class in (CalmTrainer, CalmAutoencoderTrainer):
        assert issubclass(trainer_class, LossTermsLoggingMixin)
        assert trainer_class.log is LossTermsLoggingMixin.log
    assert CalmTrainer.loss_terms == ("energy_fidelity", "energy_diversity", "decoder_loss", "token_loss")
    assert CalmAutoencoderTrainer.loss_terms == ("reconstruction_loss", "kl_loss", "reconstruction_accuracy")
    trainer = CalmAutoencoderTrainer(model=make_autoencoder(), args=make_args(tmp_path), train_dataset=make_blocks(2))
    assert trainer.model_accepts_loss_kwargs is False and trainer.loss_is_scaled_for_ga is False


def test_autoencoder_train_logs_carry_the_loss_terms(tmp_path):
    """Every periodic train log has the loss terms, averaged over exactly the micro-batches whose losses `loss`
    averages: the loss is K * reconstruction_loss + kl_weight * kl_loss per batch, so the logged means obey it too."""
    model = make_autoencoder()
    args = make_args(tmp_path, max_steps=4, logging_steps=2, gradient_accumulation_steps=2)
    trainer = CalmAutoencoderTrainer(model=model, args=args, train_dataset=make_blocks(8))
    trainer.train()
    logs = train_logs(trainer)
    assert [entry["step"] for entry in logs] == [2, 4]
    for entry in logs:
        assert entry["reconstruction_loss"] > 0 and entry["kl_loss"] > 0
        assert 0 <= entry["reconstruction_accuracy"] <= 1
        expected = K * entry["reconstruction_loss"] + model.config.kl_weight * entry["kl_loss"]
        assert entry["loss"] == pytest.approx(expected, rel=1e-5)
    assert "reconstruction_loss" not in trainer.state.log_history[-1]  # the end-of-training summary


def autoencoder_eval_blocks(model, num_blocks=5) -> Dataset:
    """Eval blocks whose labels make the accuracies non-trivial for an untrained model: two positions in three are
    labelled with the model's own decoding (right), the others keep the input (mostly wrong), one in seven is -100."""
    ids = factories.random_ids(num_blocks, BLOCK, AE_KWARGS["vocab_size"], low=3, seed=1)
    with torch.no_grad():
        predicted = model.eval().decode_token_ids(model.encode(ids)[0])
    position = torch.arange(ids.numel()).view_as(ids)
    labels = torch.where(position % 3 != 0, predicted, ids).masked_fill(position % 7 == 0, -100)
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels.tolist()})


def test_autoencoder_evaluate_matches_a_hand_computation(tmp_path):
    model = make_autoencoder()
    blocks = autoencoder_eval_blocks(model)  # 5 blocks in batches of 2: the last batch is partial
    trainer = CalmAutoencoderTrainer(model=model, args=make_args(tmp_path), eval_dataset=blocks)
    metrics = trainer.evaluate()
    assert AUTOENCODER_EVAL_KEYS <= metrics.keys()

    ids, labels = torch.tensor(blocks["input_ids"]), torch.tensor(blocks["labels"])
    model.eval()
    with torch.no_grad():
        tokens = model.decode(model.encode(ids)[0]).argmax(-1)  # the posterior mean, decoded
        batches = [model(ids[i : i + 2], labels=labels[i : i + 2]) for i in range(0, len(ids), 2)]
    labelled = labels != -100
    correct = (tokens == labels) & labelled
    accuracy = correct.sum().item() / labelled.sum().item()
    assert 0.3 < accuracy < 0.9  # the labels make it non-trivial
    assert metrics["eval_reconstruction_accuracy"] == pytest.approx(accuracy, abs=1e-12)
    chunk_labelled = labelled.view(len(ids), -1, K).any(-1)
    chunk_right = (correct | ~labelled).view(len(ids), -1, K).all(-1) & chunk_labelled
    chunk_accuracy = chunk_right.sum().item() / chunk_labelled.sum().item()
    assert 0 < chunk_accuracy < 1
    assert metrics["eval_chunk_accuracy"] == pytest.approx(chunk_accuracy, abs=1e-12)
    # The loss terms are means over eval batches weighted by their sizes, like eval_loss.
    sizes = [2, 2, 1]
    for name in ("loss", "reconstruction_loss", "kl_loss"):
        expected = sum(n * batch[name].item() for n, batch in zip(sizes, batches, strict=True)) / sum(sizes)
        assert metrics[f"eval_{name}"] == pytest.approx(expected, rel=1e-6), name
    assert metrics["eval_perplexity"] == pytest.approx(math.exp(metrics["eval_reconstruction_loss"]), rel=1e-12)

    # Deterministic (eval decodes the posterior mean), and the accuracies do not depend on the batch size.
    assert {k: trainer.evaluate()[k] for k in AUTOENCODER_EVAL_KEYS} == {k: metrics[k] for k in AUTOENCODER_EVAL_KEYS}
    args = make_args(tmp_path, per_device_eval_batch_size=3)
    other = CalmAutoencoderTrainer(model=model, args=args, eval_dataset=blocks).evaluate()
    for key in ("eval_reconstruction_accuracy", "eval_chunk_accuracy"):
        assert other[key] == metrics[key], key


def test_autoencoder_eval_during_training_and_prediction_loss_only(tmp_path):
    model = make_autoencoder()
    args = make_args(
        tmp_path,
        max_steps=4,
        eval_strategy="steps",
        eval_steps=2,
        save_strategy="steps",
        save_steps=2,
        metric_for_best_model="eval_reconstruction_accuracy",
        load_best_model_at_end=True,
    )
    blocks = autoencoder_eval_blocks(make_autoencoder(seed=1), num_blocks=3)
    trainer = CalmAutoencoderTrainer(model=model, args=args, train_dataset=make_blocks(8), eval_dataset=blocks)
    trainer.train()
    evals = [entry for entry in trainer.state.log_history if "eval_reconstruction_accuracy" in entry]
    assert [entry["step"] for entry in evals] == [2, 4]
    assert all(AUTOENCODER_EVAL_KEYS <= entry.keys() for entry in evals)
    assert trainer.state.best_metric == max(entry["eval_reconstruction_accuracy"] for entry in evals)
    assert all("reconstruction_loss" in entry for entry in train_logs(trainer))  # eval does not take the train terms

    args = make_args(tmp_path, prediction_loss_only=True)
    metrics = CalmAutoencoderTrainer(model=model, args=args, eval_dataset=blocks).evaluate()
    assert "eval_loss" in metrics and "eval_reconstruction_accuracy" not in metrics
