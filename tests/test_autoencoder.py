import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModel
from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

from transformers_calm import CalmAutoencoder, CalmAutoencoderConfig, CalmAutoencoderOutput

SRC_DIR = Path(__file__).resolve().parent.parent / "src"

OUTPUT_FIELDS = (
    "loss",
    "reconstruction_loss",
    "kl_loss",
    "reconstruction_accuracy",
    "logits",
    "latent_mean",
    "latent_log_std",
)


def binomial_tolerance(n, p, sigmas=5.0):
    return sigmas * math.sqrt(n * p * (1 - p))


class Recorder:
    """Records the first positional input of every call of a module (forward pre-hook)."""

    def __init__(self, module):
        self.inputs = []
        self.handle = module.register_forward_pre_hook(lambda _, args: self.inputs.append(args[0].detach().clone()))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def zeros_like_randn(tensor, **kwargs):
    return torch.zeros_like(tensor, **kwargs)


def set_latent_bias(model, mean_bias=None, log_std_bias=None):
    """Write the bias of `hidden_to_latent` (first half: mean, second half: log-std)."""
    latent_size = model.config.latent_size
    with torch.no_grad():
        bias = model.encoder.hidden_to_latent.bias
        if mean_bias is not None:
            bias[:latent_size] = torch.as_tensor(mean_bias, dtype=bias.dtype)
        if log_std_bias is not None:
            bias[latent_size:] = torch.as_tensor(log_std_bias, dtype=bias.dtype)


# --------------------------------------------------------------------------------------------------------------------
# Shapes


@pytest.mark.parametrize("patch_size", [1, 2, 4, 8])
@pytest.mark.parametrize("latent_size", [3, 16])
def test_encode_decode_shapes(tiny_model, make_ids, patch_size, latent_size):
    model = tiny_model(patch_size=patch_size, latent_size=latent_size)
    input_ids = make_ids(3, 5 * patch_size)
    with torch.no_grad():
        mean, log_std = model.encode(input_ids)
        assert mean.shape == log_std.shape == (3, 5, latent_size)
        assert model.decode(mean).shape == (3, 5 * patch_size, 97)
        assert model.decode(torch.randn(2, 7, latent_size)).shape == (2, 7 * patch_size, 97)


@pytest.mark.parametrize("patch_size", [1, 2, 4, 8])
def test_forward_output_fields_and_shapes(tiny_model, make_ids, patch_size):
    model = tiny_model(patch_size=patch_size, latent_size=6)
    input_ids = make_ids(2, 3 * patch_size)
    out = model(input_ids)
    assert isinstance(out, CalmAutoencoderOutput)
    assert tuple(out.keys()) == OUTPUT_FIELDS
    for name in ("loss", "reconstruction_loss", "kl_loss", "reconstruction_accuracy"):
        assert out[name].shape == (), name
    assert out.logits.shape == (2, 3 * patch_size, 97)
    assert out.logits.dtype == torch.float32
    assert out.latent_mean.shape == out.latent_log_std.shape == (2, 3, 6)

    as_tuple = model(input_ids, return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == len(OUTPUT_FIELDS)
    for value, name in zip(as_tuple, OUTPUT_FIELDS, strict=True):
        torch.testing.assert_close(value, out[name], rtol=0, atol=0)


def test_chunks_are_encoded_and_decoded_independently(tiny_model, make_ids):
    """The autoencoder is context-free: chunk j of the output depends only on chunk j of the input, in token order."""
    model = tiny_model()
    input_ids = make_ids(2, 12)
    with torch.no_grad():
        mean, log_std = model.encode(input_ids)
        logits = model.decode(mean)
        for j in range(3):
            chunk = input_ids[:, 4 * j : 4 * (j + 1)]
            chunk_mean, chunk_log_std = model.encode(chunk)
            torch.testing.assert_close(chunk_mean[:, 0], mean[:, j])
            torch.testing.assert_close(chunk_log_std[:, 0], log_std[:, j])
            torch.testing.assert_close(model.decode(mean[:, j : j + 1]), logits[:, 4 * j : 4 * (j + 1)])
        # Token order within a chunk matters (the K token vectors are concatenated, not pooled).
        swapped = input_ids.clone()
        swapped[:, [0, 1]] = input_ids[:, [1, 0]]
        assert not torch.allclose(model.encode(swapped)[0][:, 0], mean[:, 0])


def test_patch_size_property(tiny_model):
    assert tiny_model(patch_size=8).patch_size == 8


def test_initialisation(tiny_model):
    model = tiny_model(initializer_range=0.05, vocab_size=2000, hidden_size=64)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            assert torch.equal(param, torch.ones_like(param)), name
        elif name.endswith(".bias"):
            assert torch.equal(param, torch.zeros_like(param)), name
    embed_std = model.encoder.embed_tokens.weight.std().item()
    assert abs(embed_std - 0.05) < 0.005
    assert model.decoder.lm_head.weight is model.encoder.embed_tokens.weight


def test_all_parameters_get_gradients_in_training(tiny_model, make_ids):
    model = tiny_model(kl_clamp=0.0).train()
    model(make_ids(4, 16)).loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name


# --------------------------------------------------------------------------------------------------------------------
# Input and config validation


@pytest.mark.parametrize("length", [3, 5, 10])
def test_sequence_length_must_be_multiple_of_patch_size(tiny_model, make_ids, length):
    model = tiny_model()
    input_ids = make_ids(2, length)
    with pytest.raises(ValueError, match=r"multiple of patch_size \(K = 4\)"):
        model.encode(input_ids)
    with pytest.raises(ValueError, match=r"multiple of patch_size"):
        model(input_ids)


def test_zero_length_input_is_rejected(tiny_model):
    with pytest.raises(ValueError, match=r"sequence_length \(0\) must be a positive multiple"):
        tiny_model()(torch.zeros(2, 0, dtype=torch.long))


@pytest.mark.parametrize("shape", [(8,), (1, 2, 8)])
def test_input_ids_must_be_2d(tiny_model, shape):
    model = tiny_model()
    with pytest.raises(ValueError, match=r"input_ids must have shape \(batch_size, sequence_length\)"):
        model(torch.ones(shape, dtype=torch.long))
    with pytest.raises(ValueError, match=r"input_ids must have shape"):
        model.encode(torch.ones(shape, dtype=torch.long))


def test_labels_shape_must_match_input_ids(tiny_model, make_ids):
    with pytest.raises(ValueError, match=r"labels \(2, 4\) must have the shape of input_ids \(2, 8\)"):
        tiny_model()(make_ids(2, 8), labels=make_ids(2, 4))


@pytest.mark.parametrize("shape", [(2, 3, 7), (2, 3, 9), (3, 8), (1, 2, 3, 8)])
@pytest.mark.parametrize("method", ["decode", "decode_token_ids"])
def test_decode_rejects_wrong_latent_shape(tiny_model, shape, method):
    with pytest.raises(ValueError, match=r"latents must have shape \(batch_size, num_latents, latent_size=8\)"):
        getattr(tiny_model(), method)(torch.zeros(shape))


@pytest.mark.parametrize("patch_size", [1, 4])
@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (64, 1)])  # up to 256 rows: both ways of computing the scores
def test_decode_token_ids_is_the_argmax_of_decode(tiny_model, patch_size, shape):
    model = tiny_model(patch_size=patch_size).eval()
    latents = torch.randn(*shape, 8, generator=torch.Generator().manual_seed(0)) * 3
    with torch.no_grad():
        token_ids = model.decode_token_ids(latents)
        logits = model.decode(latents)
    assert token_ids.shape == (shape[0], shape[1] * patch_size) and token_ids.dtype == torch.long
    # Summing the products in another order may flip an argmax between two logits within rounding: compare the
    # logits of the chosen tokens instead of the ids.
    torch.testing.assert_close(logits.gather(-1, token_ids[..., None]).squeeze(-1), logits.max(-1).values)


@pytest.mark.parametrize("name", ["num_encoder_layers", "num_decoder_layers"])
@pytest.mark.parametrize("value", [1, 3, -2])
def test_config_rejects_odd_or_negative_layer_counts(tiny_config, name, value):
    with pytest.raises(ValueError, match=rf"{name} must be a non-negative even integer"):
        tiny_config(**{name: value})


@pytest.mark.parametrize("name", ["token_dropout", "latent_dropout"])
@pytest.mark.parametrize("value", [-0.1, 1.0, 1.5])
def test_config_rejects_dropout_out_of_range(tiny_config, name, value):
    with pytest.raises(ValueError, match=rf"{name} must be in \[0, 1\)"):
        tiny_config(**{name: value})


@pytest.mark.parametrize("name", ["vocab_size", "patch_size", "latent_size", "hidden_size", "intermediate_size"])
@pytest.mark.parametrize("value", [0, -3, 2.0])
def test_config_rejects_non_positive_sizes(tiny_config, name, value):
    with pytest.raises(ValueError, match=rf"{name} must be a positive integer"):
        tiny_config(**{name: value})


@pytest.mark.parametrize("value", [-1, 97, 1000])
def test_config_rejects_replacement_id_outside_vocab(tiny_config, value):
    with pytest.raises(ValueError, match=r"token_dropout_replacement_id must be a token id in \[0, vocab_size=97\)"):
        tiny_config(token_dropout_replacement_id=value)


@pytest.mark.parametrize("kwargs", [{"kl_weight": -1e-3}, {"kl_clamp": -0.5}])
def test_config_rejects_negative_kl_settings(tiny_config, kwargs):
    with pytest.raises(ValueError, match=r"kl_weight and kl_clamp must be >= 0"):
        tiny_config(**kwargs)


def test_config_defaults_follow_the_official_autoencoder():
    config = CalmAutoencoderConfig()
    assert config.model_type == "calm_autoencoder"
    assert (config.patch_size, config.latent_size, config.hidden_size, config.intermediate_size) == (4, 128, 512, 1280)
    assert (config.num_encoder_layers, config.num_decoder_layers) == (2, 2)
    assert (config.kl_weight, config.kl_clamp, config.token_dropout, config.latent_dropout) == (1e-3, 0.5, 0.15, 0.15)
    assert config.token_dropout_replacement_id == 0
    assert config.cast_embeddings_to_bf16_in_training is True
    assert config.tie_word_embeddings is True


# --------------------------------------------------------------------------------------------------------------------
# Loss arithmetic


def hand_kl(mean, log_std, kl_clamp):
    """Clipped KL: 0.5 * (mu^2 + sigma^2 - 1 - 2 log sigma) per dim, floored at kl_clamp, summed over dims, averaged
    over chunks. Also returns the unclipped per-dimension values."""
    per_dim = 0.5 * (mean**2 + torch.exp(2 * log_std) - 1 - 2 * log_std)
    clipped = torch.where(per_dim < kl_clamp, torch.full_like(per_dim, kl_clamp), per_dim)
    return clipped.sum(-1).mean(), per_dim


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_kl_loss_matches_hand_computation(tiny_model, make_ids, mode):
    model = tiny_model(kl_clamp=0.3)
    # Dimensions 0-3 far from the prior (KL ~ 2 and ~ 1.1), dimensions 4-7 close to it (KL ~ 0, under the floor).
    set_latent_bias(
        model, mean_bias=[2.0, -2.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0], log_std_bias=[0, 0, -1.0, 1.0, 0, 0, 0, 0]
    )
    model.train(mode == "train")
    out = model(make_ids(3, 16))
    expected, per_dim = hand_kl(out.latent_mean.double(), out.latent_log_std.double(), 0.3)
    assert (per_dim[..., :4] > 0.3).all() and (per_dim[..., 4:] < 0.3).all()  # the floor is exercised
    assert not torch.isclose(per_dim.sum(-1).mean(), expected)
    torch.testing.assert_close(out.kl_loss.double(), expected, rtol=1e-5, atol=1e-6)


def test_kl_dimensions_under_the_floor_get_no_gradient(tiny_model, make_ids):
    model = tiny_model(kl_clamp=0.5)
    set_latent_bias(model, mean_bias=[3.0, 0, 0, 0, 0, 0, 0, -3.0])
    out = model(make_ids(3, 16))
    out.latent_mean.retain_grad()
    out.latent_log_std.retain_grad()
    out.kl_loss.backward()
    _, per_dim = hand_kl(out.latent_mean.detach(), out.latent_log_std.detach(), 0.5)
    below = per_dim < 0.5
    assert below[..., 1:7].all() and not below[..., [0, 7]].any()
    for grad in (out.latent_mean.grad, out.latent_log_std.grad):
        assert (grad[below] == 0).all()
    # Above the floor, the gradient of the chunk-averaged KL: d/dmu = mu / chunks, d/dlog_sigma = (sigma^2 - 1) / chunks.
    chunks = 3 * 4
    mean, log_std = out.latent_mean.detach(), out.latent_log_std.detach()
    torch.testing.assert_close(out.latent_mean.grad[~below], mean[~below] / chunks)
    torch.testing.assert_close(out.latent_log_std.grad[~below], (torch.exp(2 * log_std[~below]) - 1) / chunks)
    # Hence the rows of hidden_to_latent that produce dims 1..6 (mean and log-std halves) get no KL gradient at all.
    weight_grad = model.encoder.hidden_to_latent.weight.grad
    floored_rows = [*range(1, 7), *range(8 + 1, 8 + 7)]
    assert (weight_grad[floored_rows] == 0).all()
    assert (weight_grad[[0, 7]].abs().sum(-1) > 0).all()


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_loss_is_k_times_reconstruction_plus_weighted_kl(tiny_model, make_ids, mode):
    model = tiny_model(kl_weight=0.3)
    set_latent_bias(model, mean_bias=[2.0] * 8)  # KL well above the floor, so the KL term matters
    model.train(mode == "train")
    out = model(make_ids(2, 16))
    assert out.kl_loss > 1.0
    torch.testing.assert_close(out.loss, 4 * out.reconstruction_loss + 0.3 * out.kl_loss)


def test_eval_reconstruction_loss_is_mean_cross_entropy(tiny_model, make_ids):
    model = tiny_model()
    input_ids = make_ids(2, 16)
    out = model(input_ids)
    expected = F.cross_entropy(out.logits.reshape(-1, 97), input_ids.reshape(-1))
    torch.testing.assert_close(out.reconstruction_loss, expected)
    torch.testing.assert_close(out.logits, model.decode(out.latent_mean))


def test_reconstruction_accuracy(tiny_model, make_ids):
    model = tiny_model()
    input_ids = make_ids(4, 16)
    with torch.no_grad():
        predictions = model(input_ids).logits.argmax(-1)
    # Labels that agree with the prediction at about half of the positions, so the accuracy is not 0 or 1.
    agree = torch.rand(input_ids.shape, generator=torch.Generator().manual_seed(1)) < 0.5
    labels = torch.where(agree, predictions, (predictions + 1) % 97)
    out = model(input_ids, labels=labels)
    torch.testing.assert_close(out.reconstruction_accuracy, agree.float().mean())
    assert 0.2 < out.reconstruction_accuracy < 0.8


# --------------------------------------------------------------------------------------------------------------------
# Masking


def test_attention_mask_and_ignored_labels_are_excluded(tiny_model, make_ids):
    model = tiny_model()
    input_ids = make_ids(4, 16)
    with torch.no_grad():
        predictions = model(input_ids).logits.argmax(-1)
    agree = torch.rand(input_ids.shape, generator=torch.Generator().manual_seed(1)) < 0.5
    labels = torch.where(agree, predictions, (predictions + 1) % 97)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, 8:] = 0
    attention_mask[2, 4:] = 0
    keep = attention_mask.bool()

    out = model(input_ids, labels=labels, attention_mask=attention_mask)
    expected_loss = F.cross_entropy(out.logits[keep], labels[keep])
    torch.testing.assert_close(out.reconstruction_loss, expected_loss)
    torch.testing.assert_close(out.reconstruction_accuracy, agree[keep].float().mean())

    # Same result with -100 labels instead of a mask, and whatever the masked labels are.
    ignored = model(input_ids, labels=labels.masked_fill(~keep, -100))
    scrambled = model(input_ids, labels=torch.where(keep, labels, (labels + 5) % 97), attention_mask=attention_mask)
    for other in (ignored, scrambled):
        torch.testing.assert_close(other.loss, out.loss)
        torch.testing.assert_close(other.reconstruction_accuracy, out.reconstruction_accuracy)
    # The mask does not change the encoding (the autoencoder has no attention).
    torch.testing.assert_close(out.latent_mean, model(input_ids).latent_mean)


# --------------------------------------------------------------------------------------------------------------------
# Training-only stochasticity


def test_eval_is_deterministic_and_decodes_the_posterior_mean(tiny_model, make_ids):
    model = tiny_model(token_dropout=0.5, latent_dropout=0.5)
    input_ids = make_ids(2, 16)
    first, second = model(input_ids), model(input_ids)
    for name in OUTPUT_FIELDS:
        assert torch.equal(first[name], second[name]), name
    with Recorder(model.decoder) as decoder_inputs:
        model(input_ids)
    assert torch.equal(decoder_inputs.inputs[0], first.latent_mean)
    assert torch.equal(first.logits, model.decode(first.latent_mean))


def test_train_mode_is_stochastic(tiny_model, make_ids):
    model = tiny_model().train()
    input_ids = make_ids(2, 16)
    first, second = model(input_ids), model(input_ids)
    assert not torch.equal(first.logits, second.logits)
    assert not torch.equal(first.latent_mean, second.latent_mean)  # DropToken changes the encoder input


def test_drop_token_rate_replacement_and_labels(tiny_model, make_ids):
    p, replacement = 0.25, 5
    model = tiny_model(token_dropout=p, latent_dropout=0.0, token_dropout_replacement_id=replacement).train()
    input_ids = make_ids(32, 256, low=6)  # the replacement id never occurs in the input
    torch.manual_seed(0)
    with Recorder(model.encoder.embed_tokens) as embed_inputs:
        out = model(input_ids)
    encoder_ids = embed_inputs.inputs[0].reshape(input_ids.shape)
    dropped = encoder_ids != input_ids
    assert (encoder_ids[dropped] == replacement).all()
    n = input_ids.numel()
    assert abs(dropped.sum().item() - p * n) < binomial_tolerance(n, p)
    # The labels keep the original tokens.
    torch.testing.assert_close(
        out.reconstruction_loss, F.cross_entropy(out.logits.reshape(-1, 97), input_ids.reshape(-1))
    )


def test_drop_token_default_replacement_is_id_zero(tiny_model, make_ids):
    model = tiny_model(token_dropout=0.5, latent_dropout=0.0).train()
    input_ids = make_ids(4, 64, low=1)
    with Recorder(model.encoder.embed_tokens) as embed_inputs:
        model(input_ids)
    encoder_ids = embed_inputs.inputs[0].reshape(input_ids.shape)
    assert (encoder_ids[encoder_ids != input_ids] == 0).all()
    assert (encoder_ids == 0).any()


def test_drop_latent_rate_and_scaling(tiny_model, make_ids):
    p = 0.3
    model = tiny_model(token_dropout=0.0, latent_dropout=p, latent_size=16).train()
    input_ids = make_ids(32, 64)
    torch.manual_seed(0)
    # With zero noise the sampled latent is the mean, so the decoder input is dropout(mean).
    with mock.patch("torch.randn_like", zeros_like_randn), Recorder(model.decoder) as decoder_inputs:
        out = model(input_ids)
    latents, mean = decoder_inputs.inputs[0], out.latent_mean.detach()
    zeroed = latents == 0
    torch.testing.assert_close(latents[~zeroed], mean[~zeroed] / (1 - p))
    n = latents.numel()
    assert abs(zeroed.sum().item() - p * n) < binomial_tolerance(n, p)


def test_train_mode_samples_from_the_posterior(tiny_model, make_ids):
    model = tiny_model(token_dropout=0.0, latent_dropout=0.0, latent_size=16)
    set_latent_bias(model, log_std_bias=[-1.0] * 16)  # sigma ~ 0.37, so a wrong scale shows
    model.train()
    torch.manual_seed(0)
    with Recorder(model.decoder) as decoder_inputs:
        out = model(make_ids(32, 64))
    latents = decoder_inputs.inputs[0]
    assert not torch.isclose(latents, out.latent_mean).any()
    eps = (latents - out.latent_mean.detach()) / out.latent_log_std.detach().exp()
    n = eps.numel()
    assert abs(eps.mean().item()) < 5 / math.sqrt(n)
    assert abs(eps.std().item() - 1) < 5 / math.sqrt(2 * n)


def test_bf16_embedding_cast_changes_train_numerics_only(tiny_model, make_ids):
    input_ids = make_ids(2, 16)
    no_dropout = {"token_dropout": 0.0, "latent_dropout": 0.0}
    cast = tiny_model(cast_embeddings_to_bf16_in_training=True, **no_dropout)
    plain = tiny_model(cast_embeddings_to_bf16_in_training=False, **no_dropout)
    assert torch.equal(cast(input_ids).logits, plain(input_ids).logits)
    eval_logits = plain(input_ids).logits

    cast.train()
    plain.train()
    with mock.patch("torch.randn_like", zeros_like_randn):
        with Recorder(cast.encoder.encoder_layers[0]) as cast_inputs:
            cast_logits = cast(input_ids).logits
        with Recorder(plain.encoder.encoder_layers[0]) as plain_inputs:
            plain_logits = plain(input_ids).logits
    assert cast_inputs.inputs[0].dtype == torch.bfloat16
    assert plain_inputs.inputs[0].dtype == torch.float32
    assert torch.equal(plain_logits, eval_logits)  # without noise, dropout or cast, train == eval
    assert not torch.equal(cast_logits, eval_logits)
    torch.testing.assert_close(cast_logits, eval_logits, rtol=0.05, atol=0.05)


def test_bf16_cast_without_encoder_layers(tiny_model, make_ids):
    """The config allows num_encoder_layers=0; the bf16 embeddings then reach the float32 squeeze layer directly."""
    model = tiny_model(num_encoder_layers=0, num_decoder_layers=0).train()
    out = model(make_ids(2, 8))
    assert out.latent_mean.dtype == torch.float32
    assert torch.isfinite(out.loss)


# --------------------------------------------------------------------------------------------------------------------
# Save / load


def assert_same_outputs(model_a, model_b, input_ids):
    with torch.no_grad():
        out_a, out_b = model_a.eval()(input_ids), model_b.eval()(input_ids)
    for name in OUTPUT_FIELDS:
        assert torch.equal(out_a[name], out_b[name]), name


def test_calm_autoencoder_is_not_a_builtin_model_type():
    assert "calm_autoencoder" not in CONFIG_MAPPING_NAMES


def test_save_and_auto_load_round_trip(tiny_model, make_ids, tmp_path):
    model = tiny_model(pad_token_id=96, kl_weight=0.01, token_dropout_replacement_id=96)
    model.save_pretrained(tmp_path / "ckpt")
    files = set(os.listdir(tmp_path / "ckpt"))
    assert {"config.json", "model.safetensors"} <= files
    assert not any(name.endswith(".bin") for name in files)

    config = AutoConfig.from_pretrained(tmp_path / "ckpt")
    assert type(config) is CalmAutoencoderConfig
    assert (config.pad_token_id, config.kl_weight, config.token_dropout_replacement_id) == (96, 0.01, 96)
    loaded = AutoModel.from_pretrained(tmp_path / "ckpt")
    assert type(loaded) is CalmAutoencoder
    assert loaded.decoder.lm_head.weight is loaded.encoder.embed_tokens.weight
    assert_same_outputs(model, loaded, make_ids(2, 16))


def test_saved_checkpoint_carries_auto_map_and_code(tiny_model, tmp_path):
    tiny_model().save_pretrained(tmp_path / "ckpt")
    assert {"configuration_calm_autoencoder.py", "modeling_calm_autoencoder.py"} <= set(os.listdir(tmp_path / "ckpt"))
    with open(tmp_path / "ckpt" / "config.json") as f:
        saved = json.load(f)
    assert saved["model_type"] == "calm_autoencoder"
    assert saved["auto_map"]["AutoConfig"] == "configuration_calm_autoencoder.CalmAutoencoderConfig"
    assert saved["auto_map"]["AutoModel"] == "modeling_calm_autoencoder.CalmAutoencoder"


def test_untied_embeddings_round_trip(tiny_model, make_ids, tmp_path):
    model = tiny_model(tie_word_embeddings=False)
    assert model.decoder.lm_head.weight is not model.encoder.embed_tokens.weight
    assert not torch.equal(model.decoder.lm_head.weight, model.encoder.embed_tokens.weight)
    model.save_pretrained(tmp_path / "ckpt")
    loaded = AutoModel.from_pretrained(tmp_path / "ckpt")
    assert loaded.config.tie_word_embeddings is False
    assert loaded.decoder.lm_head.weight is not loaded.encoder.embed_tokens.weight
    assert torch.equal(loaded.decoder.lm_head.weight, model.decoder.lm_head.weight)
    assert torch.equal(loaded.encoder.embed_tokens.weight, model.encoder.embed_tokens.weight)
    assert_same_outputs(model, loaded, make_ids(2, 16))


def test_tied_weights_stay_tied_after_training_step_and_reload(tiny_model, make_ids, tmp_path):
    model = tiny_model().train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    model(make_ids(2, 16)).loss.backward()
    optimizer.step()
    model.save_pretrained(tmp_path / "ckpt")
    loaded = CalmAutoencoder.from_pretrained(tmp_path / "ckpt")
    assert loaded.decoder.lm_head.weight is loaded.encoder.embed_tokens.weight
    assert torch.equal(loaded.decoder.lm_head.weight, model.decoder.lm_head.weight)


# Atomic saving, stale shards and push_to_hub: tests/test_hub.py.


def test_trust_remote_code_with_package_installed_uses_the_package_class(tiny_model, tmp_path):
    tiny_model().save_pretrained(tmp_path / "ckpt")
    assert type(AutoModel.from_pretrained(tmp_path / "ckpt", trust_remote_code=True)) is CalmAutoencoder


REMOTE_CODE_SCRIPT = textwrap.dedent(
    """
    import importlib.abc, json, sys

    class HideTransformersCalm(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "transformers_calm":
                raise ModuleNotFoundError(f"No module named {name!r} (hidden by the test)")
            return None

    sys.meta_path.insert(0, HideTransformersCalm())
    src_dir, checkpoint, expected_path, result_path = sys.argv[1:5]
    sys.path[:] = [p for p in sys.path if p != src_dir]
    try:
        import transformers_calm  # noqa: F401
    except ModuleNotFoundError:
        pass
    else:
        raise SystemExit("transformers_calm is still importable")

    import torch
    from transformers import AutoConfig, AutoModel

    expected = torch.load(expected_path)
    config = AutoConfig.from_pretrained(checkpoint, trust_remote_code=True)
    model = AutoModel.from_pretrained(checkpoint, trust_remote_code=True).eval()
    with torch.no_grad():
        out = model(expected["input_ids"])
        decoded = model.decode(expected["latents"])
    torch.save({"out": dict(out), "decoded": decoded}, result_path)
    print(json.dumps({
        "model_module": type(model).__module__,
        "config_module": type(config).__module__,
        "tied": model.decoder.lm_head.weight is model.encoder.embed_tokens.weight,
        "calm_modules": sorted(m for m in sys.modules if m.startswith("transformers_calm")),
    }))
    """
)


@pytest.mark.slow  # a child process
def test_trust_remote_code_load_without_the_package(tiny_model, make_ids, tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path / "ckpt")
    input_ids, latents = make_ids(2, 16), torch.randn(2, 3, 8)
    with torch.no_grad():
        expected_out, expected_decoded = dict(model(input_ids)), model.decode(latents)
    torch.save({"input_ids": input_ids, "latents": latents}, tmp_path / "expected.pt")
    (tmp_path / "script.py").write_text(REMOTE_CODE_SCRIPT)

    args = [str(SRC_DIR), str(tmp_path / "ckpt"), str(tmp_path / "expected.pt"), str(tmp_path / "result.pt")]
    proc = subprocess.run(
        [sys.executable, str(tmp_path / "script.py"), *args], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info["model_module"].startswith("transformers_modules.")
    assert info["model_module"].endswith("modeling_calm_autoencoder")
    assert info["config_module"].startswith("transformers_modules.")
    assert info["calm_modules"] == []
    assert info["tied"] is True

    result = torch.load(tmp_path / "result.pt")
    for name in OUTPUT_FIELDS:
        assert torch.equal(result["out"][name], expected_out[name]), name
    assert torch.equal(result["decoded"], expected_decoded)
