"""Tests of the CALM language model: `CalmConfig`, `CalmModel`, `CalmForCausalLM` and the energy loss.

Tiny models built here, CPU, offline. Every helper is defined in this file."""

import copy
import json
import os
import textwrap
import warnings

import factories
import pytest
import torch
from factories import TINY_BACKBONE, TINY_HEAD, randomize_head, tiny_calm_config
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, DynamicCache, LlamaConfig
from transformers.cache_utils import Cache
from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

from transformers_calm import (
    CalmAutoencoder,
    CalmAutoencoderConfig,
    CalmConfig,
    CalmForCausalLM,
    CalmModel,
    calm_loss,
)
from transformers_calm.modeling_energy_head import energy_score_terms

K = 3  # tokens per chunk; deliberately not 2 or 4
AE_KWARGS = {
    "vocab_size": 61,
    "patch_size": K,
    "latent_size": 6,
    "hidden_size": 16,
    "intermediate_size": 24,
    "pad_token_id": 0,
}
LM_KWARGS = {**TINY_BACKBONE, **TINY_HEAD}  # hidden_size and noise_size as the tests read them
HEAD_FIELDS = {"num_mlp_layers", "noise_size", "num_samples", "num_targets", "energy_alpha"}
AUTO_MAP = {
    "AutoConfig": "configuration_calm.CalmConfig",
    "AutoModel": "modeling_calm.CalmModel",
    "AutoModelForCausalLM": "modeling_calm.CalmForCausalLM",
}
MODULE_FILES = (
    "configuration_calm.py",
    "modeling_calm.py",
    "configuration_calm_autoencoder.py",
    "modeling_calm_autoencoder.py",
)


def tiny_config(autoencoder=None, **overrides) -> CalmConfig:
    """A tiny Llama-backed CalmConfig; `overrides` are head/loss fields or backbone fields."""
    head = {name: overrides.pop(name) for name in list(overrides) if name in HEAD_FIELDS}
    return tiny_calm_config(autoencoder={**AE_KWARGS, **(autoencoder or {})}, backbone=overrides, **head)


def tiny_model(seed=0, random_head=True, **overrides) -> CalmForCausalLM:
    torch.manual_seed(seed)
    model = CalmForCausalLM(tiny_config(**overrides))
    if random_head:
        randomize_head(model)
    return model.eval()


def make_ids(batch=2, num_chunks=4, seed=0) -> torch.LongTensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(1, AE_KWARGS["vocab_size"], (batch, num_chunks * K), generator=generator)


def seeded_loss(model, input_ids, seed=123, **kwargs):
    torch.manual_seed(seed)
    return model(input_ids, labels=kwargs.pop("labels", input_ids), **kwargs)


def capture_energy_terms(monkeypatch) -> list:
    """Record the per-position (fidelity, diversity) that `head_loss` averages."""
    records = []

    def recording(*args, **kwargs):
        fidelity, diversity = energy_score_terms(*args, **kwargs)
        records.append((fidelity.detach().clone(), diversity.detach().clone()))
        return fidelity, diversity

    monkeypatch.setattr(calm_loss, "energy_score_terms", recording)
    return records


def reference_energy_terms(x, mean, log_std, eps, alpha):
    """The official `energy_score` with all pairwise differences materialised; x `(N, P, l)`, eps `(M, P, l)`."""
    n = x.shape[0]
    y = mean + eps * log_std.exp()
    distance_x = torch.linalg.vector_norm(x.unsqueeze(1) - x.unsqueeze(0), ord=2, dim=-1) ** alpha
    distance_y = torch.linalg.vector_norm(x.unsqueeze(1) - y.unsqueeze(0), ord=2, dim=-1) ** alpha
    return distance_y.mean(dim=(0, 1)), distance_x.sum(dim=(0, 1)) / (n * (n - 1))


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    """A tiny CalmForCausalLM (random head) saved with save_pretrained: `(model, directory)`."""
    model = tiny_model(seed=3)
    directory = tmp_path_factory.mktemp("calm") / "tiny-calm"
    model.save_pretrained(directory)
    return model, directory


# --------------------------------------------------------------------------------------------------------------------
# Config


@pytest.mark.parametrize(
    ("name", "lm_value", "ae_value"), [("patch_size", 3, 2), ("latent_size", 6, 5), ("vocab_size", 61, 67)]
)
def test_config_must_match_autoencoder(name, lm_value, ae_value):
    """The autoencoder defines K, l and the vocabulary; a flat value (configs before backbone_config) must agree."""
    with pytest.raises(ValueError, match=rf"{name} \({lm_value}\) differs from the autoencoder's \({ae_value}\)"):
        CalmConfig(autoencoder_config={**AE_KWARGS, name: ae_value}, **{name: lm_value})


@pytest.mark.parametrize(
    "overrides",
    [
        {"num_samples": 1},
        {"num_samples": 0},
        {"energy_alpha": 0.0},
        {"energy_alpha": 2.0},
        {"energy_alpha": -0.5},
        {"energy_alpha": 2.5},
    ],
)
def test_config_rejects_invalid_energy_settings(overrides):
    with pytest.raises(ValueError, match=next(iter(overrides))):
        tiny_config(**overrides)


def test_config_accepts_boundary_energy_settings():
    config = tiny_config(num_samples=2, energy_alpha=1.99)
    assert (config.num_samples, config.energy_alpha) == (2, 1.99)


def test_config_single_source_of_truth():
    """K, l, vocabulary and special tokens are the autoencoder's; the backbone's vocabulary and pad follow it."""
    config = tiny_config(autoencoder={"vocab_size": 77, "patch_size": 5, "latent_size": 9, "pad_token_id": 3})
    ae, backbone = config.autoencoder_config, config.backbone_config
    assert isinstance(ae, CalmAutoencoderConfig) and isinstance(backbone, LlamaConfig)
    assert (config.vocab_size, config.patch_size, config.latent_size, config.pad_token_id) == (77, 5, 9, 3)
    assert (backbone.vocab_size, backbone.pad_token_id) == (77, 3)
    for name in ("patch_size", "latent_size"):
        with pytest.raises(AttributeError):
            setattr(config, name, 1)
    config.vocab_size = 80  # as resize_token_embeddings does: both vocabularies
    assert (ae.vocab_size, backbone.vocab_size) == (80, 80)
    config.eos_token_id = 4  # as tokenizers and pipelines do: it lands on the autoencoder
    assert ae.eos_token_id == 4 and "eos_token_id" not in config.to_diff_dict()
    assert CalmConfig.from_dict(config.to_dict()).autoencoder_config.eos_token_id == 4


def test_config_default_is_a_llama_backbone_and_the_default_autoencoder():
    config = CalmConfig()
    assert type(config.backbone_config) is LlamaConfig and config.hidden_size == 768
    assert config.autoencoder_config.to_dict() == CalmAutoencoderConfig().to_dict()


def test_config_rejects_an_encoder_decoder_backbone():
    with pytest.raises(ValueError, match="decoder-only"):
        CalmConfig(backbone_config={"model_type": "t5"})


def test_config_save_load_roundtrip(tmp_path):
    config = tiny_config(energy_alpha=1.5, num_samples=3, num_targets=7, autoencoder={"token_dropout": 0.25})
    config.save_pretrained(tmp_path)
    for loaded in (CalmConfig.from_pretrained(tmp_path), AutoConfig.from_pretrained(tmp_path)):
        assert type(loaded) is CalmConfig
        assert type(loaded.autoencoder_config) is CalmAutoencoderConfig
        assert loaded.autoencoder_config.to_dict() == config.autoencoder_config.to_dict()
        assert loaded.autoencoder_config.token_dropout == 0.25
        assert loaded.autoencoder_config.hidden_size == AE_KWARGS["hidden_size"]
        assert (loaded.energy_alpha, loaded.num_samples, loaded.num_targets) == (1.5, 3, 7)
        ignore = {"_name_or_path"}
        assert {k: v for k, v in loaded.to_dict().items() if k not in ignore} == {
            k: v for k, v in config.to_dict().items() if k not in ignore
        }


def test_flat_config_of_the_previous_release_becomes_a_llama_backbone(tmp_path):
    """Configs written before `backbone_config` (flat Llama fields, the official `rope_theta`) still load."""
    flat = {
        "vocab_size": 61,
        "patch_size": K,
        "latent_size": 6,
        "pad_token_id": 0,
        **TINY_BACKBONE,
        "max_position_embeddings": 64,
        "rope_theta": 500.0,
        "pretraining_tp": 1,
        **TINY_HEAD,
        "autoencoder_config": {k: v for k, v in AE_KWARGS.items() if k != "pad_token_id"},
    }
    config = CalmConfig(**flat)
    assert type(config.backbone_config) is LlamaConfig
    assert config.backbone_config.rope_parameters["rope_theta"] == 500.0
    assert config.backbone_config.max_position_embeddings == 64 and config.max_tokens == 64 * K
    assert config.pad_token_id == 0  # an old config kept it beside the autoencoder's None
    config.save_pretrained(tmp_path)
    assert CalmConfig.from_pretrained(tmp_path).backbone_config.rope_parameters["rope_theta"] == 500.0
    # and the backbone uses it
    model = CalmForCausalLM(config)
    head_dim = config.hidden_size // config.backbone_config.num_attention_heads
    expected = 1.0 / 500.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    torch.testing.assert_close(model.model.backbone.rotary_emb.inv_freq, expected)
    with pytest.raises(ValueError, match="next to backbone_config"):
        CalmConfig(backbone_config=LlamaConfig(), hidden_size=32)


def test_calm_is_not_a_native_transformers_model_type():
    assert "calm" not in CONFIG_MAPPING_NAMES
    assert "calm_autoencoder" not in CONFIG_MAPPING_NAMES
    kwargs = {k: v for k, v in tiny_config().to_dict().items() if k != "model_type"}
    assert type(AutoConfig.for_model("calm", **kwargs)) is CalmConfig


# --------------------------------------------------------------------------------------------------------------------
# Shapes and errors


def test_forward_shapes_and_hidden_states():
    model = tiny_model()
    ids = make_ids(batch=2, num_chunks=4)
    out = model(ids, output_hidden_states=True)
    assert out.last_hidden_state.shape == (2, 4, LM_KWARGS["hidden_size"])
    assert out.loss is None
    assert len(out.hidden_states) == LM_KWARGS["num_hidden_layers"] + 1
    assert all(h.shape == (2, 4, LM_KWARGS["hidden_size"]) for h in out.hidden_states)
    torch.testing.assert_close(out.hidden_states[-1], out.last_hidden_state, atol=0, rtol=0)
    # the first one is the compressed input
    torch.testing.assert_close(out.hidden_states[0], model.model.embed_chunks(ids), atol=0, rtol=0)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("use_cache", [None, True, False])
@pytest.mark.parametrize("with_labels", [False, True], ids=["no-labels", "labels"])
def test_cache_comes_back_as_cache(training, use_cache, with_labels):
    """The cache is the output field `cache` (transformers 5.24's name, on every supported release), present exactly
    when asked for. `CalmForCausalLM` returns it by default in eval mode only (never by default in training, which is
    how Trainer calls it); `CalmModel`, like transformers' `LlamaModel`, whenever `config.use_cache`. Nothing here may
    warn about a deprecated name."""
    model = tiny_model().train(training)
    ids = make_ids(num_chunks=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        out = model(ids, labels=ids if with_labels else None, use_cache=use_cache)
        base = model.model(input_ids=ids, use_cache=use_cache)
    assert (out.loss is not None) == with_labels
    out_has_cache = not training if use_cache is None else use_cache
    base_has_cache = True if use_cache is None else use_cache
    for output, has_cache in ((out, out_has_cache), (base, base_has_cache)):
        assert "past_key_values" not in type(output).__dataclass_fields__
        if has_cache:
            assert "cache" in output.keys()
            assert isinstance(output.cache, Cache)
            assert output.cache.get_seq_length() == 5
        else:
            assert "cache" not in output.keys() and output.cache is None
    if out_has_cache:  # the cache of an output continues the sequence
        more = model(make_ids(num_chunks=1, seed=1), cache=out.cache, use_cache=True)
        assert more.cache.get_seq_length() == 6


def test_model_output_as_tuple():
    model = tiny_model()
    ids = make_ids(num_chunks=2)
    hidden, cache = model.model(input_ids=ids, use_cache=True, return_dict=False)
    torch.testing.assert_close(hidden, model.model(input_ids=ids).last_hidden_state, atol=0, rtol=0)
    assert cache.get_seq_length() == 2


def test_past_key_values_is_a_deprecated_alias_of_cache():
    model = tiny_model()
    ids = make_ids(num_chunks=3)
    with torch.no_grad():
        first = model(ids[:, :K], use_cache=True)
        with pytest.warns(FutureWarning, match="past_key_values.*Use `cache` instead"):
            old = model(ids[:, K:], past_key_values=first.cache, use_cache=True)
        first = model(ids[:, :K], use_cache=True)
        new = model(ids[:, K:], cache=first.cache, use_cache=True)
    torch.testing.assert_close(old.last_hidden_state, new.last_hidden_state, atol=0, rtol=0)
    assert old.cache.get_seq_length() == 3


@pytest.mark.parametrize("leading", [(5,), (2, 3), (4, 2, 3), ()])
def test_generative_head_shapes_and_determinism(leading):
    head = tiny_model().generative_head
    hidden = torch.randn(*leading, LM_KWARGS["hidden_size"])
    noise = torch.rand(*leading, LM_KWARGS["noise_size"]) - 0.5
    sample = head(hidden)
    assert sample.shape == (*leading, AE_KWARGS["latent_size"])
    torch.testing.assert_close(head(hidden, noise=noise), head(hidden, noise=noise), atol=0, rtol=0)
    assert not torch.allclose(head(hidden), head(hidden))  # fresh noise each call
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    torch.testing.assert_close(head(hidden, generator=g1), head(hidden, generator=g2), atol=0, rtol=0)


def test_generative_head_noise_is_uniform_centered():
    head = tiny_model().generative_head
    noise = head.sample_noise(torch.zeros(4000, LM_KWARGS["hidden_size"]))
    assert noise.shape == (4000, LM_KWARGS["noise_size"])
    assert noise.min() >= -0.5 and noise.max() < 0.5 and abs(noise.mean()) < 0.01


@pytest.mark.parametrize("noise_shape", [(2, 4, 7), (2, 3, 8), (4, 8), (1, 2, 4, 8)])
def test_generative_head_rejects_wrong_noise_shape(noise_shape):
    head = tiny_model().generative_head
    with pytest.raises(ValueError, match="noise must have shape"):
        head(torch.randn(2, 4, LM_KWARGS["hidden_size"]), noise=torch.zeros(noise_shape))


@pytest.mark.parametrize("length", [K - 1, 2 * K + 1, 4 * K - 1])
def test_sequence_length_must_be_multiple_of_k(length):
    model = tiny_model()
    ids = make_ids(num_chunks=4)[:, :length]
    with pytest.raises(ValueError, match="multiple of patch_size"):
        model(ids)
    with pytest.raises(ValueError, match="multiple of patch_size"):
        model.model(input_ids=ids)


def test_labels_need_two_chunks():
    model = tiny_model()
    ids = make_ids(num_chunks=1)
    assert model(ids).last_hidden_state.shape[1] == 1  # a single chunk is fine without labels
    with pytest.raises(ValueError, match="two chunks"):
        model(ids, labels=ids)


def test_labels_shape_must_match():
    model = tiny_model()
    ids = make_ids(num_chunks=3)
    with pytest.raises(ValueError, match="shape"):
        model(ids, labels=ids[:, :-K])


# --------------------------------------------------------------------------------------------------------------------
# KV cache


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_incremental_forward_matches_full_forward(attn_implementation):
    model = tiny_model()
    if model.config._attn_implementation != attn_implementation:  # a fresh model defaults to sdpa
        model.set_attn_implementation(attn_implementation)
    assert model.model.backbone.config._attn_implementation == attn_implementation
    ids = make_ids(batch=2, num_chunks=6)
    with torch.no_grad():
        full = model(ids).last_hidden_state
        cache = DynamicCache(config=model.config.backbone_config)
        out = model(ids[:, : 2 * K], cache=cache, use_cache=True)
        steps = [out.last_hidden_state]
        for i in range(2, 6):
            out = model(ids[:, i * K : (i + 1) * K], cache=out.cache, use_cache=True)
            assert out.cache.get_seq_length() == i + 1
            steps.append(out.last_hidden_state)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_incremental_forward_with_token_attention_mask():
    """Left padding: a token-level mask that grows with the cache gives the full-forward states at real chunks."""
    model = tiny_model()
    ids = make_ids(batch=2, num_chunks=5)
    mask = torch.ones_like(ids)
    mask[1, :K] = 0
    with torch.no_grad():
        full = model(ids, attention_mask=mask).last_hidden_state
        out = model(ids[:, : 3 * K], attention_mask=mask[:, : 3 * K], use_cache=True)
        steps = [out.last_hidden_state]
        for i in range(3, 5):
            out = model(
                ids[:, i * K : (i + 1) * K],
                attention_mask=mask[:, : (i + 1) * K],
                cache=out.cache,
                use_cache=True,
            )
            steps.append(out.last_hidden_state)
    torch.testing.assert_close(torch.cat(steps, dim=1)[:, 1:], full[:, 1:], atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------------------------------
# Energy loss


def test_loss_is_two_fidelity_minus_diversity():
    model = tiny_model()
    out = seeded_loss(model, make_ids())
    assert out.energy_fidelity > 0 and out.energy_diversity > 0
    torch.testing.assert_close(out.loss, 2 * out.energy_fidelity - out.energy_diversity)


@pytest.mark.parametrize("alpha", [1.0, 0.5, 1.5])
def test_energy_score_terms_match_pairwise_reference(alpha):
    generator = torch.Generator().manual_seed(0)
    num_samples, num_targets, latent = 5, 9, 6
    mean = torch.randn(2, 3, latent, generator=generator)
    log_std = 0.3 * torch.randn(2, 3, latent, generator=generator)
    x = mean + 0.7 * torch.randn(num_samples, 2, 3, latent, generator=generator)
    eps = torch.randn(num_targets, 2, 3, latent, generator=generator)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "randn", lambda *args, **kwargs: eps.clone())
        fidelity, diversity = energy_score_terms(x, mean, log_std, num_targets=num_targets, alpha=alpha)
    assert fidelity.shape == diversity.shape == (2, 3)
    ref_fidelity, ref_diversity = reference_energy_terms(
        x.flatten(1, 2), mean.flatten(0, 1), log_std.flatten(0, 1), eps.flatten(1, 2), alpha
    )
    torch.testing.assert_close(fidelity.flatten(), ref_fidelity, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(diversity.flatten(), ref_diversity, atol=1e-5, rtol=1e-5)


def test_energy_score_terms_draw_num_targets_standard_normals():
    calls = []
    original = torch.randn

    def recording(*args, **kwargs):
        calls.append(args[0] if len(args) == 1 else args)
        return original(*args, **kwargs)

    mean = torch.zeros(2, 3, 6)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "randn", recording)
        energy_score_terms(torch.zeros(4, 2, 3, 6), mean, mean, num_targets=11, alpha=1.0)
    assert [tuple(c) for c in calls] == [(11, 2, 3, 6)]


def test_energy_score_prefers_the_true_distribution():
    """Strict propriety, statistically: samples from the target posterior score better than shifted, too narrow or
    too wide ones."""
    generator = torch.Generator().manual_seed(0)
    positions, latent, num_samples = 32, 4, 64
    mean = torch.randn(positions, latent, generator=generator)
    log_std = torch.full((positions, latent), -0.5)
    noise = torch.randn(num_samples, positions, latent, generator=generator)

    def loss(samples):
        torch.manual_seed(1)
        fidelity, diversity = energy_score_terms(samples, mean, log_std, num_targets=256, alpha=1.0)
        return (2 * fidelity - diversity).mean()

    true = loss(mean + noise * log_std.exp())
    assert true < loss(mean + 0.5 + noise * log_std.exp())
    assert true < loss(mean + noise * log_std.exp() * 0.3)
    assert true < loss(mean + noise * log_std.exp() * 2.0)
    assert true < loss(mean.expand(num_samples, -1, -1))  # a point mass at the mean


def test_loss_averages_valid_positions_only(monkeypatch):
    model = tiny_model()
    ids = make_ids(batch=2, num_chunks=4)
    labels = ids.clone()
    labels[0, 2 * K + 1] = -100  # one token of target chunk 2 of row 0 -> the whole chunk is out
    records = capture_energy_terms(monkeypatch)
    out = seeded_loss(model, ids, labels=labels)
    ((fidelity, diversity),) = records
    assert fidelity.shape == (2, 3)  # targets are chunks 1..3
    valid = torch.ones(2, 3, dtype=torch.bool)
    valid[0, 1] = False
    torch.testing.assert_close(out.energy_fidelity, fidelity[valid].mean())
    torch.testing.assert_close(out.energy_diversity, diversity[valid].mean())
    torch.testing.assert_close(out.loss, 2 * fidelity[valid].mean() - diversity[valid].mean())


def test_masked_target_chunk_does_not_change_loss():
    model = tiny_model()
    ids = make_ids(batch=2, num_chunks=4)
    labels = ids.clone()
    labels[0, 2 * K] = -100
    base = seeded_loss(model, ids, labels=labels).loss

    other_tokens = labels.clone()
    other_tokens[0, 2 * K + 1 : 3 * K] = (other_tokens[0, 2 * K + 1 : 3 * K] + 5) % AE_KWARGS["vocab_size"]
    torch.testing.assert_close(seeded_loss(model, ids, labels=other_tokens).loss, base, atol=1e-6, rtol=0)

    unmasked_change = labels.clone()
    unmasked_change[1, 2 * K + 1] = (unmasked_change[1, 2 * K + 1] + 5) % AE_KWARGS["vocab_size"]
    assert not torch.allclose(seeded_loss(model, ids, labels=unmasked_change).loss, base, atol=1e-4)


def test_padding_mask_removes_chunks_from_loss(monkeypatch):
    model = tiny_model()
    ids = make_ids(batch=2, num_chunks=4)
    mask = torch.ones_like(ids)
    mask[1, -K:] = 0  # right padding: the last chunk of row 1
    mask[0, -1] = 0  # one padded token makes the last chunk of row 0 no target either
    records = capture_energy_terms(monkeypatch)
    out = seeded_loss(model, ids, attention_mask=mask)
    fidelity, diversity = records[0]
    valid = torch.ones(2, 3, dtype=torch.bool)
    valid[:, -1] = False
    torch.testing.assert_close(out.loss, 2 * fidelity[valid].mean() - diversity[valid].mean())

    changed = ids.clone()
    changed[1, -K:] = (changed[1, -K:] + 7) % AE_KWARGS["vocab_size"]
    torch.testing.assert_close(seeded_loss(model, changed, attention_mask=mask).loss, out.loss, atol=1e-6, rtol=0)


def test_all_masked_labels_give_zero_loss_without_nan():
    model = tiny_model().train()
    ids = make_ids()
    out = seeded_loss(model, ids, labels=torch.full_like(ids, -100))
    assert out.loss.item() == 0.0
    assert out.energy_fidelity.item() == 0.0 and out.energy_diversity.item() == 0.0
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_head_starts_at_zero_and_gradients_are_finite():
    model = tiny_model(random_head=False).train()
    last = model.generative_head.final_layer.linears[-1]
    assert torch.count_nonzero(last.weight) == 0 and torch.count_nonzero(last.bias) == 0
    out = seeded_loss(model, make_ids())
    assert out.energy_diversity.item() < 1e-6  # every sample is the zero vector
    assert torch.isfinite(out.loss)
    out.loss.backward()
    for name, param in model.named_parameters():
        if param.grad is not None:
            assert torch.isfinite(param.grad).all(), name
    assert last.weight.grad.abs().sum() > 0


# --------------------------------------------------------------------------------------------------------------------
# The frozen autoencoder


def test_gradients_reach_only_the_language_model():
    model = tiny_model().train()
    seeded_loss(model, make_ids()).loss.backward()
    for name, param in model.autoencoder.named_parameters():
        assert not param.requires_grad, name
        assert param.grad is None, name
    lm_params = {name: p for name, p in model.named_parameters() if not name.startswith("autoencoder.")}
    assert any(name.startswith("model.backbone.layers.") for name in lm_params)
    for name, param in lm_params.items():
        assert param.grad is not None, name
        assert param.grad.abs().sum() > 0, name
    for name in (
        "model.backbone.embed_tokens.weight",
        "model.embed_proj.0.weight",
        "model.backbone.norm.weight",
        "generative_head.noise_embd.weight",
    ):
        assert name in lm_params


def test_train_keeps_autoencoder_in_eval_mode():
    model = tiny_model()
    model.train()
    assert model.training and model.model.training and model.generative_head.training
    assert not model.autoencoder.training
    assert not any(module.training for module in model.autoencoder.modules())
    model.eval()
    assert not model.autoencoder.training


def test_optimizer_step_leaves_autoencoder_unchanged():
    model = tiny_model().train()
    ae_before = {k: v.clone() for k, v in model.autoencoder.state_dict().items()}
    lm_before = model.model.embed_proj[0].weight.detach().clone()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    seeded_loss(model, make_ids()).loss.backward()
    optimizer.step()
    for name, value in model.autoencoder.state_dict().items():
        assert torch.equal(value, ae_before[name]), name
    assert not torch.equal(model.model.embed_proj[0].weight, lm_before)


# --------------------------------------------------------------------------------------------------------------------
# from_autoencoder


def tiny_autoencoder(seed=1, **overrides) -> CalmAutoencoder:
    torch.manual_seed(seed)
    config = CalmAutoencoderConfig(
        **{**AE_KWARGS, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, **overrides}
    )
    return CalmAutoencoder(config).eval()


def test_from_autoencoder_with_kwargs():
    ae = tiny_autoencoder(token_dropout=0.3)
    lm_kwargs = {k: v for k, v in LM_KWARGS.items() if k != "pad_token_id"}
    model = CalmForCausalLM.from_autoencoder(ae, **lm_kwargs)
    config = model.config
    assert (config.hidden_size, config.backbone_config.num_hidden_layers, config.num_samples) == (32, 2, 4)
    assert (config.vocab_size, config.patch_size, config.latent_size) == (61, K, 6)
    assert (config.pad_token_id, config.bos_token_id, config.eos_token_id) == (0, 1, 2)
    assert type(config.autoencoder_config) is CalmAutoencoderConfig
    assert config.autoencoder_config.token_dropout == 0.3
    assert config.autoencoder_config.hidden_size == AE_KWARGS["hidden_size"]
    ae_state = ae.state_dict()
    for name, value in model.autoencoder.state_dict().items():
        assert torch.equal(value, ae_state[name]), name
    assert model.autoencoder.decoder.lm_head.weight is model.autoencoder.encoder.embed_tokens.weight
    assert not any(p.requires_grad for p in model.autoencoder.parameters())
    assert not model.autoencoder.training
    ids = make_ids()
    torch.testing.assert_close(model.autoencoder.encode(ids)[0], ae.encode(ids)[0], atol=0, rtol=0)


def test_from_autoencoder_with_config():
    ae = tiny_autoencoder()
    config = CalmConfig(vocab_size=61, patch_size=K, latent_size=6, **LM_KWARGS)  # default (512-wide) AE config
    model = CalmForCausalLM.from_autoencoder(ae, config=config)
    assert model.config.autoencoder_config.hidden_size == AE_KWARGS["hidden_size"]
    assert model.config.hidden_size == LM_KWARGS["hidden_size"]
    torch.testing.assert_close(
        model.autoencoder.encoder.embed_tokens.weight, ae.encoder.embed_tokens.weight, atol=0, rtol=0
    )


@pytest.mark.parametrize("mismatch", [{"latent_size": 7}, {"patch_size": 2}, {"vocab_size": 50}])
def test_from_autoencoder_rejects_mismatch(mismatch):
    ae = tiny_autoencoder()
    name = next(iter(mismatch))
    with pytest.raises(ValueError, match=name):
        CalmForCausalLM.from_autoencoder(ae, **mismatch)
    # A whole config gets the autoencoder's config: K, l and the vocabulary are the autoencoder's.
    config = tiny_config(autoencoder=mismatch)
    model = CalmForCausalLM.from_autoencoder(ae, config=config)
    assert getattr(model.config, name) == getattr(ae.config, name)


# --------------------------------------------------------------------------------------------------------------------
# Save / load


def test_save_pretrained_writes_weights_config_and_code(saved_model):
    _, directory = saved_model
    files = set(os.listdir(directory))
    assert {"model.safetensors", "config.json", *MODULE_FILES} <= files
    config = json.loads((directory / "config.json").read_text())
    assert config["model_type"] == "calm"
    assert config["autoencoder_config"]["model_type"] == "calm_autoencoder"
    assert {k: config["auto_map"][k] for k in AUTO_MAP} == AUTO_MAP
    assert not [name for name in os.listdir(directory.parent) if ".tmp-" in name]  # no temporary leftovers


def test_auto_model_for_causal_lm_roundtrip(saved_model):
    model, directory = saved_model
    loaded = AutoModelForCausalLM.from_pretrained(directory)
    assert type(loaded) is CalmForCausalLM
    assert not loaded.training and not loaded.autoencoder.training
    ids = make_ids()
    with torch.no_grad():
        ref, got = seeded_loss(model, ids, seed=5), seeded_loss(loaded, ids, seed=5)
    torch.testing.assert_close(got.last_hidden_state, ref.last_hidden_state, atol=0, rtol=0)
    torch.testing.assert_close(got.loss, ref.loss, atol=0, rtol=0)
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    # the tied autoencoder embedding is one tensor again, with the saved values
    ae = loaded.autoencoder
    assert ae.decoder.lm_head.weight.data_ptr() == ae.encoder.embed_tokens.weight.data_ptr()
    torch.testing.assert_close(ae.decoder.lm_head.weight, model.autoencoder.encoder.embed_tokens.weight, atol=0, rtol=0)


def test_loaded_autoencoder_stays_frozen(saved_model):
    _, directory = saved_model
    loaded = CalmForCausalLM.from_pretrained(directory)
    trainable = [name for name, p in loaded.named_parameters() if p.requires_grad]
    assert trainable and not [name for name in trainable if name.startswith("autoencoder.")]


def test_auto_model_and_auto_config(saved_model):
    model, directory = saved_model
    config = AutoConfig.from_pretrained(directory)
    assert type(config) is CalmConfig and type(config.autoencoder_config) is CalmAutoencoderConfig
    base = AutoModel.from_pretrained(directory)
    assert type(base) is CalmModel
    ids = make_ids()
    with torch.no_grad():
        torch.testing.assert_close(
            base(input_ids=ids).last_hidden_state, model.model(input_ids=ids).last_hidden_state, atol=0, rtol=0
        )


_CHILD = textwrap.dedent(
    """
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    model_dir, data_path, result_path = sys.argv[1:4]
    data = torch.load(data_path)
    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=True)
    lm = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True)
    base = AutoModel.from_pretrained(model_dir, trust_remote_code=True)
    with torch.no_grad():
        torch.manual_seed(data["seed"])
        out = lm(data["input_ids"], labels=data["input_ids"])
        base_hidden = base(input_ids=data["input_ids"]).last_hidden_state
    torch.save(
        {
            "classes": [type(o).__module__ + "." + type(o).__name__ for o in (config, lm, base, lm.autoencoder)],
            "loss": out.loss,
            "last_hidden_state": out.last_hidden_state,
            "base_last_hidden_state": base_hidden,
            "package_imported": any(m.partition(".")[0] == "transformers_calm" for m in sys.modules),
        },
        result_path,
    )
    """
)


@pytest.mark.slow  # a child process
def test_trust_remote_code_without_the_package(saved_model, tmp_path, run_without_package):
    model, directory = saved_model
    ids = make_ids(seed=4)
    with torch.no_grad():
        ref = seeded_loss(model, ids, seed=11)
    torch.save({"input_ids": ids, "seed": 11}, tmp_path / "data.pt")
    run_without_package(
        _CHILD,
        [directory, tmp_path / "data.pt", tmp_path / "result.pt"],
        cwd=tmp_path,
        HF_MODULES_CACHE=str(tmp_path / "modules"),
    )
    result = torch.load(tmp_path / "result.pt")
    assert not result["package_imported"]
    config_cls, lm_cls, base_cls, ae_cls = result["classes"]
    for name in result["classes"]:
        assert name.startswith("transformers_modules."), name
    assert config_cls.endswith(".configuration_calm.CalmConfig")
    assert lm_cls.endswith(".modeling_calm.CalmForCausalLM")
    assert base_cls.endswith(".modeling_calm.CalmModel")
    assert ae_cls.endswith(".modeling_calm_autoencoder.CalmAutoencoder")
    torch.testing.assert_close(result["last_hidden_state"], ref.last_hidden_state, atol=1e-6, rtol=0)
    torch.testing.assert_close(result["base_last_hidden_state"], ref.last_hidden_state, atol=1e-6, rtol=0)
    torch.testing.assert_close(result["loss"], ref.loss, atol=1e-6, rtol=0)


# --------------------------------------------------------------------------------------------------------------------
# Attention implementations, precision, checkpointing


def test_eager_and_sdpa_agree(saved_model):
    _, directory = saved_model
    eager = CalmForCausalLM.from_pretrained(directory, attn_implementation="eager")
    sdpa = CalmForCausalLM.from_pretrained(directory)  # the default on CPU
    assert eager.model.backbone.config._attn_implementation == "eager"
    assert eager.model.backbone.layers[0].self_attn.config._attn_implementation == "eager"
    assert sdpa.model.backbone.config._attn_implementation == "sdpa"
    ids = make_ids(num_chunks=5)
    mask = torch.ones_like(ids)
    mask[0, :K] = 0
    real = torch.ones(2, 5, dtype=torch.bool)
    real[0, 0] = False  # a fully masked query (a padded chunk) has no meaningful state
    with torch.no_grad():
        for kwargs in ({}, {"attention_mask": mask}):
            torch.testing.assert_close(
                eager(ids, **kwargs).last_hidden_state[real],
                sdpa(ids, **kwargs).last_hidden_state[real],
                atol=1e-5,
                rtol=1e-5,
            )


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_requested_attn_implementation_reaches_backbone(saved_model, attn_implementation):
    """An explicit request must work although the autoencoder (no attention at all) is a sub-model."""
    model, directory = saved_model
    loaded = CalmForCausalLM.from_pretrained(directory, attn_implementation=attn_implementation)
    assert loaded.model.backbone.config._attn_implementation == attn_implementation
    assert loaded.model.backbone.layers[0].self_attn.config._attn_implementation == attn_implementation
    fresh = copy.deepcopy(model)
    fresh.set_attn_implementation(attn_implementation)
    assert fresh.model.backbone.config._attn_implementation == attn_implementation


def _half_precision_supported(dtype) -> str | None:
    try:
        layer = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)).to(dtype)
        layer(torch.ones(2, 4, dtype=dtype)).sum().backward()
    except RuntimeError as error:
        return f"{dtype} CPU kernels unavailable in torch {torch.__version__}: {error}"
    return None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_forward_backward(dtype):
    reason = _half_precision_supported(dtype)
    if reason:
        pytest.skip(reason)
    model = tiny_model().to(dtype).train()
    assert model.autoencoder.encoder.embed_tokens.weight.dtype == dtype
    out = seeded_loss(model, make_ids())
    assert out.last_hidden_state.dtype == dtype
    assert torch.isfinite(out.loss) and out.loss > 0
    out.loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert grads
    for name, grad in grads.items():
        assert torch.isfinite(grad).all(), name


# transformers 5.23 added activation_checkpointing_enable; gradient_checkpointing_enable is its deprecated alias since.
@pytest.mark.parametrize(
    "method",
    [m for m in ("gradient_checkpointing_enable", "activation_checkpointing_enable") if hasattr(CalmForCausalLM, m)],
)
def test_gradient_checkpointing_gives_same_loss_and_grads(method):
    model = tiny_model().train()
    checkpointed = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # gradient_checkpointing_enable is deprecated from 5.23 on
        getattr(checkpointed, method)()
    assert all(layer.gradient_checkpointing for layer in checkpointed.model.backbone.layers)
    ids = make_ids()
    ref, got = seeded_loss(model, ids), seeded_loss(checkpointed, ids)
    torch.testing.assert_close(got.loss, ref.loss, atol=1e-6, rtol=0)
    ref.loss.backward()
    got.loss.backward()
    ref_grads = dict(model.named_parameters())
    for name, param in checkpointed.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param.grad, ref_grads[name].grad, atol=1e-6, rtol=1e-5, msg=name)


# --------------------------------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("bad_id", [-1, -100, AE_KWARGS["vocab_size"], 10_000])
def test_token_ids_outside_the_vocabulary_name_the_fix(bad_id):
    """A raw IndexError from the embedding would say nothing; the error names the id, the vocabulary and the fix."""
    model = tiny_model()
    ids = make_ids(num_chunks=3)
    ids[1, 4] = bad_id
    message = rf"token id {bad_id}, outside the vocabulary \[0, {AE_KWARGS['vocab_size']}\).*tokenizer"
    with pytest.raises(ValueError, match=message):
        model(ids)
    with pytest.raises(ValueError, match=message):
        model(ids, labels=ids)
    with pytest.raises(ValueError, match=message):
        model.autoencoder.encode(ids)
    with pytest.raises(ValueError, match=message):
        model.generate(ids[:, :5], max_new_tokens=K)


def test_labels_may_hold_ignore_index():
    model = tiny_model()
    ids = make_ids(num_chunks=3)
    labels = ids.clone()
    labels[:, -K:] = -100
    assert torch.isfinite(model(ids, labels=labels).loss)


@pytest.mark.parametrize("shape", [(2, 2), (2, 4 * K + 1), (1, 4 * K)])
def test_attention_mask_must_be_per_token(shape):
    model = tiny_model()
    ids = make_ids(batch=2, num_chunks=4)
    with pytest.raises(ValueError, match="attention_mask must have one entry per token.*chunk_attention_mask"):
        model(ids, attention_mask=torch.ones(shape, dtype=torch.long))


def test_chunk_attention_mask_equals_the_token_mask_it_summarises():
    model = tiny_model()
    ids = make_ids(batch=2, num_chunks=4)
    token_mask = torch.ones_like(ids)
    token_mask[1, : 2 * K] = 0
    chunk_mask = token_mask.unflatten(1, (-1, K)).any(-1).long()
    with torch.no_grad():
        by_token = model(ids, attention_mask=token_mask).last_hidden_state
        by_chunk = model(ids, chunk_attention_mask=chunk_mask).last_hidden_state
    torch.testing.assert_close(by_token[:, 2:], by_chunk[:, 2:], atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="not both"):
        model(ids, attention_mask=token_mask, chunk_attention_mask=chunk_mask)
    with pytest.raises(ValueError, match="chunk_attention_mask must have one entry per chunk"):
        model(ids, chunk_attention_mask=token_mask)


def test_output_attentions_come_back():
    model = tiny_model()
    model.set_attn_implementation("eager")
    out = model(make_ids(num_chunks=3), output_attentions=True)
    assert len(out.attentions) == TINY_BACKBONE["num_hidden_layers"]
    assert out.attentions[0].shape[-2:] == (3, 3)


def test_labels_outside_the_vocabulary_name_the_labels():
    model = tiny_model()
    ids = make_ids(num_chunks=3)
    labels = ids.clone()
    labels[0, -1] = AE_KWARGS["vocab_size"] + 3
    with pytest.raises(ValueError, match=r"labels contain the token id 64, outside the vocabulary \[0, 61\)"):
        model(ids, labels=labels)


def test_autoencoder_config_equality_compares_every_field():
    assert CalmAutoencoderConfig(patch_size=4) != CalmAutoencoderConfig(patch_size=8)
    assert CalmAutoencoderConfig(patch_size=4) == CalmAutoencoderConfig(patch_size=4)


@pytest.mark.parametrize("other", [{"patch_size": 2}, {"patch_size": 8}, {"latent_size": 6}])
def test_a_swapped_autoencoder_is_a_clear_error(other):
    """`model.autoencoder = another one` (other K or l): generate and the loss say what is wrong and how to fix it,
    instead of a reshape error (which, with K = 8, blamed the prompt length)."""
    model = factories.tiny_calm()
    model.autoencoder = factories.tiny_autoencoder(**other)
    ids = factories.random_ids(1, 8)
    with pytest.raises(ValueError, match="not the autoencoder this model was built around.*from_autoencoder"):
        model.generate(ids, max_new_tokens=4)
    with pytest.raises(ValueError, match="not the autoencoder this model was built around"):
        model(input_ids=ids, labels=ids)
