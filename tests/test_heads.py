"""The official ablation heads (`head_type="flow"` and `"diffusion"`) work everywhere the energy head does: training
with CalmTrainer, `generate` with both temperature samplers, BrierLM, save/load, LoRA and, without the package,
`trust_remote_code`. (Their parity with the official code is `test_convert_official_heads.py`.)"""

import textwrap

import pytest
import torch
from datasets import Dataset
from factories import random_ids, tiny_calm
from transformers import AutoModelForCausalLM, TrainingArguments

from transformers_calm import CalmConfig, CalmTrainer
from transformers_calm.brierlm import model_brier_terms, score_model
from transformers_calm.modeling_diffusion_head import CalmDiffusionHead
from transformers_calm.modeling_flow_head import CalmFlowHead

pytestmark = pytest.mark.filterwarnings("ignore:BrierLM is reported as 0")
HEADS = ["flow", "diffusion"]


def make(head_type, seed=0, **overrides):
    # random_head=False: the flow/diffusion networks have no energy-head output layer to randomise; their official
    # init (zero adaLN outputs and final layer) starts them at a constant prediction.
    return tiny_calm(seed, autoencoder={"pad_token_id": 0, **overrides}, head_type=head_type, random_head=False)


def perturb(model):
    """Random weights in the zero-initialised layers, so that samples depend on noise and context."""
    with torch.no_grad():
        for parameter in model.generative_head.parameters():
            if not parameter.any():
                parameter.normal_(0.0, 0.3)
    return model


def test_head_type_selects_the_head_and_is_validated():
    assert type(make("flow").generative_head) is CalmFlowHead
    assert type(make("diffusion").generative_head) is CalmDiffusionHead
    with pytest.raises(ValueError, match="head_type must be one of"):
        CalmConfig(head_type="gan")
    assert CalmConfig(head_type="flow", num_samples=1).num_samples == 1  # the energy score's N >= 2 is energy-only


def test_official_init_starts_at_a_constant_prediction():
    for head_type in HEADS:
        net = make(head_type).generative_head.net
        assert not net.final_layer.linear.weight.any() and not net.res_blocks[0].adaLN_modulation[1].weight.any()
        assert net.input_proj.weight.std() > 0.1  # xavier, not transformers' N(0, 0.02)


@pytest.mark.parametrize("head_type", HEADS)
def test_calm_trainer_trains_and_evaluates(head_type, tmp_path):
    model = perturb(make(head_type)).train()
    ids = random_ids(8, 16, seed=1)
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=25, per_device_train_batch_size=8, per_device_eval_batch_size=4,
        learning_rate=3e-3, logging_steps=25, report_to=[], save_strategy="no", use_cpu=True, seed=0,
    )  # fmt: skip

    def seeded_loss():
        torch.manual_seed(0)
        with torch.no_grad():
            return model(ids, labels=ids).loss.item()

    before = seeded_loss()
    trainer = CalmTrainer(model=model, args=args, train_dataset=dataset, eval_dataset=dataset)
    trainer.train()
    model.eval()
    assert seeded_loss() < before
    metrics = trainer.evaluate()
    assert {"eval_loss", "eval_brier1", "eval_brierlm", "eval_reconstruction_accuracy"} <= set(metrics)
    assert "eval_energy_fidelity" not in metrics  # the energy terms belong to the energy head


@pytest.mark.parametrize("head_type", HEADS)
def test_generate_with_both_temperature_samplers(head_type):
    model = perturb(make(head_type, vocab_size=16))
    prompt = random_ids(2, 5, vocab_size=16, seed=2)
    for kwargs in ({}, {"temperature": 0.5, "num_candidates": 16}, {"temperature": 0.5, "exact_temperature": True,
                   "max_draws": 32}, {"do_sample": False, "num_candidates": 8}):  # fmt: skip
        out = model.generate(
            prompt, max_new_tokens=6, eos_token_id=None, generator=torch.Generator().manual_seed(0), **kwargs
        )
        assert out.shape == (2, 11) and torch.equal(out[:, :5], prompt)
    first = model.generate(prompt, max_new_tokens=6, eos_token_id=None, generator=torch.Generator().manual_seed(1))
    again = model.generate(prompt, max_new_tokens=6, eos_token_id=None, generator=torch.Generator().manual_seed(1))
    assert torch.equal(first, again)


@pytest.mark.parametrize("head_type", HEADS)
@pytest.mark.parametrize("patch_size", [4, 2])
def test_brierlm_scores_the_head(head_type, patch_size):
    """Chunk-aligned BrierLM (K = 4: one pass; K = 2: the official roll-out through the cache), deterministic per
    seed and independent of the batching, with the head's own noise (`sample_head_noise`)."""
    model = perturb(make(head_type, vocab_size=16, patch_size=patch_size))
    blocks = random_ids(3, 8 * patch_size, vocab_size=16, seed=3)
    together = model_brier_terms(model, blocks, seed=5).terms
    apart = torch.cat([model_brier_terms(model, blocks[i : i + 1], seed=5, block_indices=[i]).terms for i in range(3)])
    torch.testing.assert_close(together, apart)
    scores = score_model(model, input_ids=blocks, progress=False)
    assert {"brier1", "brier4", "brierlm"} <= set(scores)


@pytest.mark.parametrize("head_type", HEADS)
def test_save_and_load(head_type, tmp_path):
    model = perturb(make(head_type))
    model.save_pretrained(tmp_path / "model")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()
    assert loaded.config.head_type == head_type
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name  # nothing re-initialised on loading
    hidden = torch.randn(3, model.config.hidden_size)
    noise = model.sample_head_noise((3,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.sample_latents(hidden, noise=noise), model.sample_latents(hidden, noise=noise)
        )


# peft 0.21 calls the deprecated `is_gradient_checkpointing` of transformers 5.x when it wraps a model (as test_lora).
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
@pytest.mark.parametrize("head_type", HEADS)
def test_lora_on_the_backbone_with_the_head_trained(head_type):
    import finetune_lora  # examples/ (on sys.path, conftest)

    model = finetune_lora.add_lora(perturb(make(head_type)), r=4, alpha=8, train_head=True)
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    assert any("lora_" in name for name in trainable) and any("generative_head" in name for name in trainable)
    assert not any(".autoencoder." in name for name in trainable)
    ids = random_ids(2, 16, seed=4)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    model.eval()
    assert model.generate(ids[:, :4], max_new_tokens=4, eos_token_id=None).shape == (2, 8)


REMOTE_CODE_CHILD = textwrap.dedent(
    """
    import sys, torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
    expected = torch.load(sys.argv[2])
    with torch.no_grad():
        latents = model.sample_latents(expected["hidden"], noise=expected["noise"])
    torch.testing.assert_close(latents, expected["latents"], atol=0, rtol=0)
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("head_type", HEADS)
def test_trust_remote_code_without_the_package(head_type, tmp_path, run_without_package):
    model = perturb(make(head_type))
    model.save_pretrained(tmp_path / "model")
    hidden = torch.randn(3, model.config.hidden_size)
    noise = model.sample_head_noise((3,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        latents = model.sample_latents(hidden, noise=noise)
    torch.save({"hidden": hidden, "noise": noise, "latents": latents}, tmp_path / "expected.pt")
    run_without_package(REMOTE_CODE_CHILD, [tmp_path / "model", tmp_path / "expected.pt"], cwd=tmp_path)


# ------------------------------------------------------------------------------------ target_noise_scale (flag)


def test_target_noise_scale_is_validated_and_saved(tmp_path):
    assert CalmConfig().target_noise_scale == 1.0  # the official method
    with pytest.raises(ValueError, match="target_noise_scale must be >= 0"):
        CalmConfig(target_noise_scale=-0.5)
    model = tiny_calm(0, target_noise_scale=0.25)
    model.save_pretrained(tmp_path)
    assert type(model).from_pretrained(tmp_path).config.target_noise_scale == 0.25


@pytest.mark.parametrize("scale", [0.0, 0.5])
def test_target_noise_scale_narrows_the_energy_targets(scale):
    """The energy loss's fidelity term against targets `mean + scale * std * eps`: at 0 exactly the distance of each
    head sample to the posterior mean; at 0.5 its expectation over the targets, by Monte Carlo over many targets (the
    head's draws come first, so the same seed gives the same samples)."""
    model = tiny_calm(1, target_noise_scale=scale, num_targets=20_000)
    ids = random_ids(2, 12, seed=2)
    hidden = model.model(input_ids=ids).last_hidden_state[:, :-1]
    torch.manual_seed(3)
    fidelity = model.head_loss(hidden, ids).energy_fidelity
    torch.manual_seed(3)
    samples = model.sample_latents(hidden, num_samples=model.config.num_samples)  # (N, batch, chunks, l)
    mean, log_std = model.encode_chunks(ids[:, model.config.patch_size :])
    if scale == 0:
        expected = (samples - mean).norm(dim=-1).mean()
        torch.testing.assert_close(fidelity, expected, atol=1e-5, rtol=1e-5)
        return
    eps = torch.randn((4000, *mean.shape), generator=torch.Generator().manual_seed(4))
    distances = (samples[:, None] - (mean + scale * log_std.exp() * eps)[None]).norm(dim=-1)  # (N, S, ...)
    # Both are means over target draws (20,000 in the loss, 4,000 here): 5 standard errors of the difference, taken
    # as if the positions and samples were one (conservative: they average out further).
    tolerance = 5 * distances.std() * (1 / 20_000 + 1 / 4000) ** 0.5
    assert abs(fidelity - distances.mean()) < tolerance
    # And the official scale draws wider targets: a larger distance on average.
    official = tiny_calm(1, num_targets=20_000)
    torch.manual_seed(3)
    assert official.head_loss(hidden, ids)[1] > fidelity
