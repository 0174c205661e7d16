"""What transformers' own model tests and utilities expect of any model class, checked on CALM's: a base model that
saves and loads, a config whose backbone fields can be set at the top level and still load, outputs that follow the
config's `output_hidden_states` / `output_attentions`, and a clear error where CALM cannot do what is asked."""

import pytest
import torch
from factories import tiny_autoencoder, tiny_calm_config
from huggingface_hub import ModelCard
from transformers import AutoModel, DynamicCache, MistralConfig, StaticCache

from transformers_calm import CalmConfig, CalmForCausalLM, CalmModel


def chunk_ids(config, chunks=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, config.vocab_size, (2, chunks * config.patch_size), generator=generator)


def test_a_base_model_saves_and_loads_with_a_card_of_its_own(tmp_path):
    config = tiny_calm_config()
    model = AutoModel.from_config(config).eval()
    assert type(model) is CalmModel
    model.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    assert type(loaded) is CalmModel
    ids = chunk_ids(config)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).last_hidden_state, model(input_ids=ids).last_hidden_state)
    card = ModelCard.load(tmp_path / "README.md").text
    assert "base model of a CALM" in card and "no generative head" in card
    assert "AutoModel.from_pretrained" in card and "generate(" not in card


def test_the_card_of_a_language_model_names_its_heads_loss(tmp_path):
    CalmForCausalLM(tiny_calm_config(head_type="flow")).save_pretrained(tmp_path)
    card = ModelCard.load(tmp_path / "README.md").text
    assert "generative head (flow)" in card and "trained with flow matching" in card


def test_backbone_fields_set_on_the_config_go_to_the_backbone_and_load(tmp_path):
    config = tiny_calm_config()
    config.rms_norm_eps = 1e-5
    config.num_hidden_layers = 1
    assert config.backbone_config.rms_norm_eps == 1e-5 and config.backbone_config.num_hidden_layers == 1
    assert "num_hidden_layers" not in config.to_dict()  # saved once, in backbone_config
    config.save_pretrained(tmp_path)
    loaded = CalmConfig.from_pretrained(tmp_path)
    assert loaded.num_hidden_layers == 1 and loaded.rms_norm_eps == 1e-5
    assert loaded == config
    assert len(CalmModel(loaded).backbone.layers) == 1


def test_a_field_the_backbone_lacks_is_an_attribute_error():
    backbone = MistralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    config = CalmConfig(autoencoder_config=tiny_calm_config().autoencoder_config, backbone_config=backbone)
    assert not hasattr(backbone, "mlp_bias") and not hasattr(config, "mlp_bias")
    assert config.num_attention_heads == 4


def test_backbone_fields_next_to_backbone_config_are_still_refused():
    config = tiny_calm_config()
    with pytest.raises(ValueError, match="set them in backbone_config"):
        CalmConfig(
            autoencoder_config=config.autoencoder_config, backbone_config=config.backbone_config, num_hidden_layers=1
        )


@pytest.mark.parametrize("model_class", [CalmModel, CalmForCausalLM])
def test_outputs_follow_the_configs_output_flags(model_class):
    config = tiny_calm_config()
    config.output_hidden_states = True
    config.output_attentions = True
    model = model_class(config).eval()
    model.set_attn_implementation("eager")  # attention weights need the eager implementation
    ids = chunk_ids(config)
    with torch.no_grad():
        out = model(input_ids=ids)
    chunks = ids.shape[1] // config.patch_size
    assert len(out.hidden_states) == config.num_hidden_layers + 1
    assert out.hidden_states[-1].shape == (2, chunks, config.hidden_size)
    assert len(out.attentions) == config.num_hidden_layers
    assert out.attentions[0].shape[-2:] == (chunks, chunks)
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=False, output_attentions=False)
    assert out.hidden_states is None and out.attentions is None  # the argument wins over the config


def test_resizing_the_vocabulary_resizes_every_table_of_it_and_loads(tmp_path):
    config = tiny_calm_config(token_loss_weight=0.5)
    model = CalmForCausalLM(config).eval()
    old = {
        "backbone": model.get_input_embeddings().weight.clone(),
        "encoder": model.autoencoder.get_input_embeddings().weight.clone(),
        "decoder": model.autoencoder.get_output_embeddings().weight.clone(),
        "token_loss": model.token_loss_head.unembedding.weight.clone(),
    }
    size = config.vocab_size + 3
    model.resize_token_embeddings(size)
    new = {
        "backbone": model.get_input_embeddings().weight,
        "encoder": model.autoencoder.get_input_embeddings().weight,
        "decoder": model.autoencoder.get_output_embeddings().weight,
        "token_loss": model.token_loss_head.unembedding.weight,
    }
    for name, weight in new.items():
        assert weight.shape[0] == size, name
        torch.testing.assert_close(weight[: size - 3], old[name], msg=name)  # the old tokens keep their rows
    assert (model.config.vocab_size, model.config.backbone_config.vocab_size) == (size, size)
    assert model.autoencoder.config.vocab_size == size
    assert not any(p.requires_grad for p in model.autoencoder.parameters())  # still frozen
    ids = chunk_ids(model.config)
    ids[:, -1] = size - 1  # a new token is read and can be a target
    assert torch.isfinite(model(input_ids=ids, labels=ids).loss)
    model.save_pretrained(tmp_path)
    loaded = CalmForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.vocab_size == size
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.model(input_ids=ids).last_hidden_state, model.model(input_ids=ids).last_hidden_state
        )


def test_shift_labels_are_refused_not_dropped():
    config = tiny_calm_config()
    ids = chunk_ids(config)
    with pytest.raises(ValueError, match="unshifted labels"):
        CalmForCausalLM(config)(input_ids=ids, shift_labels=ids)


def test_the_autoencoder_returns_every_layers_output_when_asked():
    autoencoder = tiny_autoencoder().eval()
    config = autoencoder.config
    ids = torch.randint(3, config.vocab_size, (2, 3 * config.patch_size), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = autoencoder(ids, output_hidden_states=True)
        plain = autoencoder(ids)
    assert plain.hidden_states is None
    torch.testing.assert_close(out.logits, plain.logits)  # recording changes nothing
    encoder_half, decoder_half = config.num_encoder_layers // 2, config.num_decoder_layers // 2
    assert len(out.hidden_states) == 1 + config.num_encoder_layers + config.num_decoder_layers
    tokens, chunks = (2, 3 * config.patch_size, config.hidden_size), (2, 3, config.hidden_size)
    # Embeddings and the encoder's per-token half, then the per-chunk halves, then the decoder's per-token half.
    shapes = [tokens] * (1 + encoder_half) + [chunks] * (encoder_half + decoder_half) + [tokens] * decoder_half
    assert [tuple(h.shape) for h in out.hidden_states] == shapes
    torch.testing.assert_close(out.hidden_states[0], autoencoder.encoder.embed_tokens(ids))
    # The last decoder layer's output, normalised, is what the output layer reads.
    torch.testing.assert_close(
        autoencoder.decoder.lm_head(autoencoder.decoder.norm(out.hidden_states[-1])).float(), out.logits
    )
    autoencoder.config.output_hidden_states = True
    with torch.no_grad():
        assert len(autoencoder(ids).hidden_states) == len(shapes)  # the config's default
    assert not autoencoder.encoder.encoder_layers[0]._forward_hooks  # no hook left behind


@pytest.mark.parametrize("cache_class", [DynamicCache, StaticCache])
def test_a_cache_built_from_the_models_config_works(cache_class):
    """transformers' generic code and users build caches as `Cache(config=model.config)`: CalmConfig has the
    backbone's layer count and attention sizes for it."""
    config = tiny_calm_config()
    model = CalmForCausalLM(config).eval()
    ids = chunk_ids(config, chunks=4)
    extra = {"max_cache_len": 8} if cache_class is StaticCache else {}
    cache = cache_class(config=model.config, **extra)
    with torch.no_grad():
        full = model(input_ids=ids).last_hidden_state
        first = model(input_ids=ids[:, :8], cache=cache, use_cache=True)
        second = model(input_ids=ids[:, 8:], cache=first.cache, use_cache=True)
    assert second.cache.get_seq_length() == 4
    torch.testing.assert_close(torch.cat([first.last_hidden_state, second.last_hidden_state], 1), full)
