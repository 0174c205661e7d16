"""Checkpoints written by the previous release (transformers-calm 0.1.0, flat `CalmConfig`, before `backbone_config`)
still load, into the new composite config, and compute what they computed.

`tests/fixtures/calm-0.1.0-tiny/` was written by 0.1.0 (commit 0a8000c) with `make_fixture.py` beside it: the saved
model as that release wrote it (its config.json, generation_config.json, weights, model card and model code) and
`reference_outputs.safetensors`, outputs computed by that release."""

import copy
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig

from transformers_calm import CalmConfig, CalmForCausalLM, CalmGenerationConfig

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "calm-0.1.0-tiny"


@pytest.fixture(scope="module")
def reference() -> dict[str, torch.Tensor]:
    return load_file(FIXTURE / "reference_outputs.safetensors")


def check_outputs(model: CalmForCausalLM, reference: dict[str, torch.Tensor]) -> None:
    ids = reference["input_ids"]
    with torch.no_grad():
        hidden = model(ids).last_hidden_state
        torch.testing.assert_close(hidden, reference["last_hidden_state"], atol=1e-6, rtol=1e-5)
        latents = model.sample_latents(hidden, noise=reference["noise"])
        torch.testing.assert_close(latents, reference["latents"], atol=1e-6, rtol=1e-5)
        assert torch.equal(model.decode_latents(latents), reference["tokens"])
        torch.manual_seed(5)  # the same draws, in the same order, as the release that wrote the fixture
        torch.testing.assert_close(
            model(ids, labels=ids).loss.reshape(1), reference["loss_seed5"], atol=1e-5, rtol=1e-5
        )


def test_previous_release_checkpoint_loads_into_the_composite_config(reference):
    model = AutoModelForCausalLM.from_pretrained(FIXTURE).eval()
    assert type(model) is CalmForCausalLM
    config = model.config
    assert type(config) is CalmConfig and type(config.backbone_config) is LlamaConfig
    backbone = config.backbone_config
    assert (backbone.hidden_size, backbone.num_hidden_layers, backbone.num_key_value_heads) == (32, 2, 2)
    assert (backbone.max_position_embeddings, backbone.vocab_size, backbone.pad_token_id) == (32, 37, 0)
    assert (config.patch_size, config.latent_size, config.vocab_size) == (3, 6, 37)
    assert (config.pad_token_id, config.bos_token_id, config.eos_token_id) == (0, 1, 2)
    assert (config.num_mlp_layers, config.noise_size, config.num_samples, config.num_targets) == (2, 8, 4, 16)
    generation_config = model.generation_config
    assert type(generation_config) is CalmGenerationConfig
    assert generation_config.temperature == 0.5
    effective = copy.deepcopy(generation_config).with_calm_defaults()  # what generate() uses
    assert (effective.num_candidates, effective.do_sample) == (200, True)
    check_outputs(model, reference)


def test_previous_release_checkpoint_resaves_in_the_new_layout(reference, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(FIXTURE).eval()
    model.save_pretrained(tmp_path / "resaved")
    config = CalmConfig.from_pretrained(tmp_path / "resaved")
    assert "backbone_config" in config.to_dict() and "hidden_size" not in config.to_diff_dict()
    check_outputs(AutoModelForCausalLM.from_pretrained(tmp_path / "resaved").eval(), reference)
