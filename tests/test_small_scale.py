"""The small-scale remedies (not in the paper, each a CalmConfig field that is off by default): the token loss through
the frozen decoder (`decoder_loss.py`), noise on the backbone's inputs, and CALM from a pretrained decoder
(`pretrained_decoder.py`)."""

import math

import pytest
import torch
from factories import random_ids, randomize_head, scale_head, tiny_autoencoder, tiny_calm, tiny_calm_config
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from transformers_calm import CalmConfig, CalmForCausalLM
from transformers_calm.decoder_loss import decoder_token_loss, token_log_probs

# ----------------------------------------------------------------------------------------------------- config


def test_remedies_are_off_by_default():
    config = CalmConfig()
    assert config.decoder_loss_weight == 0.0 and config.input_noise_std == 0.0
    assert config.decoder_loss_type == "mixture" and config.decoder_loss_samples is None


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"decoder_loss_weight": -0.1}, "decoder_loss_weight must be >= 0"),
        ({"decoder_loss_weight": float("nan")}, "decoder_loss_weight must be >= 0"),
        ({"decoder_loss_type": "mode"}, "decoder_loss_type must be one of"),
        ({"decoder_loss_samples": 0}, "decoder_loss_samples must be in"),
        ({"decoder_loss_samples": 5, "num_samples": 4}, "decoder_loss_samples must be in"),
        ({"input_noise_std": -1.0}, "input_noise_std must be >= 0"),
    ],
)
def test_bad_remedy_settings_are_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        CalmConfig(**fields)


def test_remedy_fields_survive_save_and_load(tmp_path):
    config = tiny_calm_config(
        decoder_loss_weight=0.3, decoder_loss_type="point", decoder_loss_samples=2, input_noise_std=0.2
    )
    config.save_pretrained(tmp_path)
    loaded = CalmConfig.from_pretrained(tmp_path)
    assert (loaded.decoder_loss_weight, loaded.decoder_loss_type, loaded.decoder_loss_samples) == (0.3, "point", 2)
    assert loaded.input_noise_std == 0.2


# ------------------------------------------------------------------------------------------ the decoder loss


def calm_with_head(head_type: str, **fields) -> CalmForCausalLM:
    """A tiny CALM in training mode whose head's output depends on its inputs (the flow and diffusion heads start
    with zero output layers, which would pass no gradient on)."""
    model = tiny_calm(seed=0, head_type=head_type, random_head=head_type == "energy", **fields)
    if head_type != "energy":
        scale_head(model, 1.0)
    return model.train()


class TableDecoder(torch.nn.Module):
    """A decoder whose logits for latent row r are a fixed table entry (latents hold their row index)."""

    def __init__(self, logits):  # (rows, K, vocab)
        super().__init__()
        self.logits = logits

    def forward(self, latents):  # (rows, 1, 1) -> (rows, K, vocab)
        return self.logits[latents[:, 0, 0].long()]


def test_decoder_token_loss_is_the_mixture_and_the_mean_cross_entropy():
    torch.manual_seed(0)
    S, P, K, V = 3, 5, 2, 7
    logits = torch.randn(S * P, K, V) * 2
    latents = torch.arange(S * P, dtype=torch.float32).view(S, P, 1)
    targets = torch.randint(V, (P, K))
    probs = logits.softmax(-1).view(S, P, K, V)
    p_target = probs.gather(-1, targets.expand(S, P, K).unsqueeze(-1)).squeeze(-1)  # (S, P, K)
    decoder = TableDecoder(logits)
    assert torch.allclose(token_log_probs(decoder, latents, targets), p_target.log(), atol=1e-6)
    mixture = decoder_token_loss(decoder, latents, targets, mixture=True)
    per_sample = decoder_token_loss(decoder, latents, targets, mixture=False)
    assert torch.allclose(mixture, -p_target.mean(0).log().mean(-1), atol=1e-6)
    assert torch.allclose(per_sample, -p_target.log().mean(0).mean(-1), atol=1e-6)
    assert (mixture <= per_sample + 1e-6).all()  # Jensen: the mixture's log loss is never above the mean one


def test_the_mixture_is_a_proper_score_and_the_per_sample_loss_is_not():
    """Targets token 0 and 1 with probabilities 0.7 and 0.3, two samples, each decoding sharply to one token: the
    expected mixture loss is lowest when the samples cover both tokens; the expected per-sample loss when both sit on
    the mode (pulling every sample to the mode is what collapsed the head in the first probe)."""
    sharp = torch.full((2, 1, 2), -20.0)
    sharp[0, 0, 0] = sharp[1, 0, 1] = 20.0  # latent 0 decodes to token 0, latent 1 to token 1
    decoder = TableDecoder(sharp)
    placements = {"spread": [0.0, 1.0], "on the mode": [0.0, 0.0]}

    def expected_loss(samples, mixture):
        samples = torch.tensor(samples).view(2, 1, 1)
        return sum(
            q * decoder_token_loss(decoder, samples, torch.tensor([[y]]), mixture).item()
            for y, q in ((0, 0.7), (1, 0.3))
        )

    mixture = {name: expected_loss(samples, True) for name, samples in placements.items()}
    per_sample = {name: expected_loss(samples, False) for name, samples in placements.items()}
    assert mixture["spread"] < mixture["on the mode"]
    assert per_sample["on the mode"] < per_sample["spread"]


@pytest.mark.parametrize("head_type", ["energy", "flow", "diffusion"])
def test_decoder_loss_adds_to_the_heads_loss_with_the_same_draws(head_type):
    ids = random_ids(2, 16, seed=1)
    losses = {}
    for weight in (0.0, 0.5):
        model = calm_with_head(head_type, decoder_loss_weight=weight)
        torch.manual_seed(7)
        losses[weight] = model(input_ids=ids, labels=ids)
    assert losses[0.0].decoder_loss is None
    decoder_loss = losses[0.5].decoder_loss
    assert decoder_loss is not None and 0 < decoder_loss.item() < 2 * math.log(97)
    assert torch.allclose(losses[0.5].loss, losses[0.0].loss + 0.5 * decoder_loss, atol=1e-5)
    if head_type == "energy":
        assert torch.equal(losses[0.5].energy_fidelity, losses[0.0].energy_fidelity)


@pytest.mark.parametrize("head_type, loss_type", [("energy", "mixture"), ("flow", "mixture"), ("energy", "point")])
def test_decoder_loss_trains_head_and_backbone_and_not_the_autoencoder(head_type, loss_type):
    model = calm_with_head(head_type, decoder_loss_weight=1.0, decoder_loss_type=loss_type)
    ids = random_ids(2, 16, seed=1)
    output = model(input_ids=ids, labels=ids)
    output.decoder_loss.backward()  # the auxiliary term alone
    assert all(p.grad is None and not p.requires_grad for p in model.autoencoder.parameters())
    assert model.model.embed_proj[0].weight.grad.abs().sum() > 0  # it reaches the backbone's input
    if loss_type == "point":  # a branch of its own: the head is not scored
        assert model.decoder_loss_proj.weight.grad.abs().sum() > 0
        assert all(p.grad is None for p in model.generative_head.parameters())
    else:
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.generative_head.parameters())


def test_decoder_loss_samples_limits_what_is_decoded():
    ids = random_ids(2, 16, seed=1)
    model = tiny_calm(seed=0, decoder_loss_weight=1.0, decoder_loss_samples=1).train()
    calls = []
    hook = model.autoencoder.decoder.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    model(input_ids=ids, labels=ids)
    hook.remove()
    assert calls == [2 * 3]  # one sample for each of the 2 x 3 target chunks (num_samples is 4)


def test_point_branch_exists_only_with_its_loss_and_round_trips(tmp_path):
    assert not hasattr(tiny_calm(seed=0), "decoder_loss_proj")
    assert not hasattr(tiny_calm(seed=0, decoder_loss_type="point"), "decoder_loss_proj")  # weight 0: no branch
    model = tiny_calm(seed=0, decoder_loss_weight=1.0, decoder_loss_type="point")
    model.save_pretrained(tmp_path)
    loaded = CalmForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(loaded.decoder_loss_proj.weight, model.decoder_loss_proj.weight)


def test_flow_estimate_is_the_target_when_the_velocity_is_exact():
    model = tiny_calm(seed=0, head_type="flow", random_head=False)
    head = model.generative_head
    target, x0 = torch.randn(6, 8), torch.randn(6, 8)
    t, c = torch.rand(6), torch.randn(6, 32)
    head.velocity = lambda x, t_, c_: target - x0  # the exact velocity of the straight path
    loss, estimate = head.sample_loss(target, c, t, x0, return_estimate=True)
    assert torch.allclose(estimate, target, atol=1e-6) and torch.allclose(loss, torch.zeros(6))


def test_diffusion_estimate_is_the_target_when_the_noise_is_exact():
    model = tiny_calm(seed=0, head_type="diffusion", random_head=False)
    head = model.generative_head
    target, noise = torch.randn(6, 8), torch.randn(6, 8)
    t, c = torch.randint(0, 1000, (6,)), torch.randn(6, 32)
    head.net.forward = lambda x, t_, c_: torch.cat([noise, torch.zeros_like(noise)], dim=-1)
    mse, _, estimate = head.sample_loss(target, c, t, noise, return_estimate=True)
    assert torch.allclose(estimate, target, atol=1e-3) and torch.allclose(mse, torch.zeros(6))


# --------------------------------------------------------------------------------------------- input noise


def test_input_noise_is_gaussian_of_its_std_and_only_in_training():
    ids = random_ids(4, 64, seed=1)
    seen = []

    def keep_inputs(module, args, kwargs):
        seen.append(kwargs["inputs_embeds"].detach())

    model = tiny_calm(seed=0, input_noise_std=0.3)
    model.model.backbone.register_forward_pre_hook(keep_inputs, with_kwargs=True)
    clean = model.model.embed_chunks(ids).detach()
    model.eval()
    model(input_ids=ids)
    assert torch.equal(seen[-1], clean)  # eval and generation read the inputs as they are
    model.train()
    torch.manual_seed(0)
    model(input_ids=ids, labels=ids)
    noise = seen[-1] - clean
    n = noise.numel()  # 4 x 16 x 32 values: the sample std is within 5 standard errors (std / sqrt(2 n))
    assert abs(noise.std().item() - 0.3) < 5 * 0.3 / math.sqrt(2 * n) and abs(noise.mean().item()) < 5 * 0.3 / n**0.5


# -------------------------------------------------------------------------------- from a pretrained decoder

PRETRAINED = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, {"head_dim": 16}),
    "mistral": (MistralConfig, MistralForCausalLM, {}),
}


def pretrained_lm(family: str, vocab_size: int = 97):
    config_class, model_class, extra = PRETRAINED[family]
    torch.manual_seed(1)
    config = config_class(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rope_parameters={"rope_type": "default", "rope_theta": 5000.0},
        **extra,
    )
    return model_class(config).eval()


@pytest.mark.parametrize("family", sorted(PRETRAINED))
def test_from_pretrained_decoder_takes_the_decoders_layers_norm_rotary_and_embeddings(family):
    lm = pretrained_lm(family)
    autoencoder = tiny_autoencoder(seed=0, pad_token_id=0)
    calm = CalmForCausalLM.from_pretrained_decoder(
        lm, autoencoder, init_input_compression=True, num_mlp_layers=1, noise_size=8, num_samples=2
    )
    randomize_head(calm.eval())  # the head's zero output layer would pass no gradient to the backbone
    backbone = calm.model.backbone
    assert type(backbone) is type(lm.model) and calm.config.backbone_config.model_type == family
    assert calm.config.backbone_config.rope_parameters["rope_theta"] == 5000.0
    lm_state = lm.model.state_dict()
    for name, tensor in backbone.state_dict().items():
        if name == "embed_tokens.weight":  # the pad row is zeroed: CALM reads a padded token as a zero embedding
            assert torch.equal(tensor[1:], lm_state[name][1:]) and tensor[0].abs().sum() == 0
        else:
            assert torch.equal(tensor, lm_state[name]), name
    # The backbone computes what the pretrained decoder computes, on the same input vectors.
    vectors = torch.randn(2, 5, 64)
    assert torch.allclose(
        backbone(inputs_embeds=vectors).last_hidden_state, lm.model(inputs_embeds=vectors).last_hidden_state
    )
    # The input compression starts as the chunk's last token embedding, through the final LayerNorm.
    ids = random_ids(2, 20, seed=2)
    compression = calm.model.embed_proj
    last = lm.model.embed_tokens(ids[:, 3::4])
    expected = torch.nn.functional.layer_norm(last, (64,), compression[-1].weight, compression[-1].bias, eps=1e-6)
    assert torch.allclose(calm.model.embed_chunks(ids), expected, atol=1e-5)
    assert torch.equal(calm.autoencoder.state_dict()["decoder.lm_head.weight"], autoencoder.decoder.lm_head.weight)
    assert not any(p.requires_grad for p in calm.autoencoder.parameters())
    calm.train()
    output = calm(input_ids=ids, labels=ids)
    output.loss.backward()
    assert compression[0].weight.grad[:, : 3 * 64].abs().sum() > 0  # the other tokens' weights are learnt


def test_from_pretrained_decoder_loads_a_path_and_round_trips(tmp_path):
    lm = pretrained_lm("llama")
    lm.save_pretrained(tmp_path / "lm")
    autoencoder = tiny_autoencoder(seed=0)
    calm = CalmForCausalLM.from_pretrained_decoder(str(tmp_path / "lm"), autoencoder)
    torch.manual_seed(0)
    fresh = CalmForCausalLM.from_autoencoder(autoencoder, backbone_config=lm.config)
    assert calm.model.embed_proj[0].weight.std().item() == pytest.approx(
        fresh.model.embed_proj[0].weight.std().item(), rel=0.1
    )
    assert calm.model.embed_proj[-1].weight.eq(1).all()  # by default the compression starts as a new CALM's
    assert torch.equal(calm.model.backbone.layers[0].mlp.up_proj.weight, lm.model.layers[0].mlp.up_proj.weight)
    calm.save_pretrained(tmp_path / "calm")
    loaded = CalmForCausalLM.from_pretrained(tmp_path / "calm").eval()
    ids = random_ids(1, 12, seed=3)
    assert torch.equal(loaded(input_ids=ids).last_hidden_state, calm.eval()(input_ids=ids).last_hidden_state)


def test_from_pretrained_decoder_refuses_another_vocabulary_and_backbone_settings():
    lm = pretrained_lm("llama", vocab_size=120)
    with pytest.raises(ValueError, match=r"vocabulary \(120 token embeddings\) differs from the autoencoder's \(97\)"):
        CalmForCausalLM.from_pretrained_decoder(lm, tiny_autoencoder(seed=0))
    with pytest.raises(ValueError, match="backbone config is the pretrained decoder's"):
        CalmForCausalLM.from_pretrained_decoder(
            pretrained_lm("llama"), tiny_autoencoder(seed=0), backbone_config=LlamaConfig()
        )
    with pytest.raises(ValueError, match="loading options"):
        CalmForCausalLM.from_pretrained_decoder(pretrained_lm("llama"), tiny_autoencoder(seed=0), revision="main")


# ------------------------------------------------------------------------------------------- the token loss


def test_token_loss_is_the_cross_entropy_of_the_next_chunks_tokens():
    model_off = calm_with_head("flow")
    model = calm_with_head("flow", token_loss_weight=0.5)
    missing, _ = model.load_state_dict(model_off.state_dict(), strict=False)  # the same weights, and the new layer
    assert sorted(missing) == ["token_loss_head.position_offsets", "token_loss_head.unembedding.weight"]
    assert not hasattr(model_off, "token_loss_head")
    ids = random_ids(2, 16, seed=1)
    torch.manual_seed(7)
    output = model(input_ids=ids, labels=ids)
    states = output.last_hidden_state[:, :-1]  # the states that condition chunks 1..3
    head = model.token_loss_head
    logits = head.unembedding(states.unsqueeze(-2) + head.position_offsets)  # (2, 3, K, vocab)
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, 97), ids[:, 4:].reshape(-1))
    assert torch.allclose(output.token_loss, expected, atol=1e-5)
    torch.manual_seed(7)
    assert torch.allclose(output.loss, model_off(input_ids=ids, labels=ids).loss + 0.5 * expected, atol=1e-5)


def test_token_loss_is_masked_like_the_heads_loss():
    model = calm_with_head("energy", token_loss_weight=1.0)
    ids = random_ids(2, 16, seed=1)
    labels = ids.clone()
    labels[0, 8:12] = -100  # chunk 2 of the first block is not a target
    output = model(input_ids=ids, labels=labels)
    states = output.last_hidden_state[:, :-1]
    per_chunk = model.token_loss_head.loss(states, ids[:, 4:].unflatten(1, (-1, 4)))  # (2, 3)
    keep = torch.tensor([[True, False, True], [True, True, True]])
    assert torch.allclose(output.token_loss, per_chunk[keep].mean(), atol=1e-6)


def test_token_loss_trains_the_backbone_and_generation_does_not_use_it():
    model = calm_with_head("energy", token_loss_weight=1.0)
    ids = random_ids(2, 16, seed=1)
    model(input_ids=ids, labels=ids).token_loss.backward()
    assert model.model.embed_proj[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.generative_head.parameters())
    model.eval()
    calls = []
    model.token_loss_head.register_forward_hook(lambda *a: calls.append(1))
    model.generate(ids[:, :8], max_new_tokens=8, do_sample=True)
    assert calls == []


# ------------------------------------------------------------------------------ classifier-free guidance


def test_guidance_is_refused_for_the_energy_head_and_without_training():
    with pytest.raises(ValueError, match="needs a flow or diffusion head"):
        CalmConfig(guidance_dropout=0.1)
    with pytest.raises(ValueError, match="needs a flow or diffusion head"):
        CalmConfig(guidance_scale=2.0)
    with pytest.raises(ValueError, match=r"guidance_dropout must be in \[0, 1\)"):
        CalmConfig(head_type="flow", guidance_dropout=1.0)
    model = tiny_calm(seed=0, head_type="flow", random_head=False, guidance_scale=2.0)
    with pytest.raises(ValueError, match="needs a head trained with guidance_dropout > 0"):
        model.sample_latents(torch.randn(2, 32))


@pytest.mark.parametrize("head_type", ["flow", "diffusion"])
def test_guided_prediction_combines_conditional_and_null(head_type):
    model = tiny_calm(seed=0, head_type=head_type, random_head=False, guidance_dropout=0.2)
    scale_head(model, 1.0)
    head = model.generative_head
    with torch.no_grad():
        head.null_condition.normal_()
    x, c = torch.randn(5, 8), torch.randn(5, 32)
    t = torch.rand(5) if head_type == "flow" else torch.randint(0, 1000, (5,))
    predict = head.velocity if head_type == "flow" else head.net
    conditional, null = predict(x, t, c), predict(x, t, head.null_condition.expand_as(c))
    from transformers_calm.modeling_flow_head import guide

    model.config.guidance_scale = 1.0
    assert torch.equal(guide(head, predict, x, t, c), conditional)
    model.config.guidance_scale = 2.5
    assert torch.allclose(guide(head, predict, x, t, c), null + 2.5 * (conditional - null), atol=1e-5)
    model.config.guidance_scale = 0.0
    assert torch.allclose(guide(head, predict, x, t, c), null, atol=1e-6)
    samples = model.sample_latents(torch.randn(3, 32), num_samples=2)  # the sampler runs guided
    assert samples.shape == (2, 3, 8) and torch.isfinite(samples).all()


def test_guidance_dropout_replaces_conditions_at_its_rate_in_training_only():
    from transformers_calm.modeling_flow_head import drop_condition

    model = tiny_calm(seed=0, head_type="flow", random_head=False, guidance_dropout=0.25)
    head = model.generative_head
    with torch.no_grad():
        head.null_condition.fill_(7.0)
    c = torch.randn(4000, 32)
    head.train()
    torch.manual_seed(0)
    dropped = (drop_condition(head, c) == 7.0).all(-1).float().mean().item()
    assert abs(dropped - 0.25) < 5 * math.sqrt(0.25 * 0.75 / 4000)  # 5 standard errors
    head.eval()
    assert torch.equal(drop_condition(head, c), c)


def test_a_guided_model_round_trips(tmp_path):
    model = tiny_calm(seed=0, head_type="flow", random_head=False, guidance_dropout=0.1, guidance_scale=1.5)
    model.save_pretrained(tmp_path)
    loaded = CalmForCausalLM.from_pretrained(tmp_path)
    assert loaded.config.guidance_scale == 1.5
    assert torch.equal(loaded.generative_head.null_condition, model.generative_head.null_condition)
