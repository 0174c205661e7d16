"""Parity with the official CALM code: official checkpoints (standalone autoencoder, or the autoencoder embedded in a
CALM checkpoint; .safetensors or .bin; sharded or not) convert into a `CalmAutoencoder` that reproduces the golden
outputs recorded from the official implementation."""

import json
import os
import shutil
import subprocess
import sys
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from common import write_sharded
from safetensors.torch import load_file, save_file
from transformers import AutoModel

from transformers_calm import CalmAutoencoder, CalmAutoencoderConfig
from transformers_calm.convert_official import (
    autoencoder_config_from_official,
    convert_autoencoder,
    load_official_state_dict,
    main,
)

SOURCES = [
    pytest.param("autoencoder-cli", marks=pytest.mark.slow),  # the converter as a child process
    "calm-safetensors",
    "calm-bin",
    "sharded-safetensors",
    "sharded-bin",
]


def prepare_source(name, official_dir, root):
    """An official checkpoint directory for `name` (see SOURCES)."""
    if name == "autoencoder-cli":
        return official_dir / "autoencoder"
    source = root / f"src-{name}"
    if name.startswith("calm-"):
        source.mkdir()
        for filename in ("config.json", "generation_config.json"):
            shutil.copy(official_dir / "calm" / filename, source / filename)
        weights = "model.safetensors" if name == "calm-safetensors" else "pytorch_model.bin"
        shutil.copy(official_dir / "calm" / weights, source / weights)
        return source
    state_dict = load_file(official_dir / "autoencoder" / "model.safetensors")
    extension = name.split("-")[1]
    if extension == "bin":
        # The official training wrote .bin files holding the decoder's alias of the embedding as well.
        state_dict["decoder.lm_head_weight"] = state_dict["encoder.embed_tokens.weight"]
    write_sharded(state_dict, source, extension)
    shutil.copy(official_dir / "autoencoder" / "config.json", source / "config.json")
    return source


def run_cli(source, output):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "transformers_calm.convert_official",
            "--autoencoder",
            str(source),
            "--output",
            str(output),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Converted autoencoder" in proc.stdout


@pytest.fixture(scope="session", params=SOURCES)
def converted_dir(request, official_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    source = prepare_source(request.param, official_dir, root)
    output = root / "converted"
    if request.param.endswith("-cli"):
        run_cli(source, output)
    else:
        main(["--autoencoder", str(source), "--output", str(output)])
    return output


@pytest.fixture
def converted(converted_dir):
    return CalmAutoencoder.from_pretrained(converted_dir).eval()


def test_converted_checkpoint_files_and_config(converted_dir):
    files = set(os.listdir(converted_dir))
    assert {"config.json", "model.safetensors", "modeling_calm_autoencoder.py"} <= files
    with open(converted_dir / "config.json") as f:
        config = json.load(f)
    assert config["model_type"] == "calm_autoencoder"
    expected = {
        "vocab_size": 512,
        "patch_size": 4,
        "latent_size": 16,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_encoder_layers": 2,
        "num_decoder_layers": 2,
        "kl_weight": 1e-3,
        "kl_clamp": 0.5,
        "token_dropout": 0.15,
        "latent_dropout": 0.15,
        "token_dropout_replacement_id": 0,
        "cast_embeddings_to_bf16_in_training": True,
        "tie_word_embeddings": True,
        "rms_norm_eps": 1e-6,
        "pad_token_id": 511,
        "bos_token_id": 508,
        "eos_token_id": 509,
    }
    assert {key: config.get(key) for key in expected} == expected
    stored = load_file(converted_dir / "model.safetensors")
    assert "decoder.lm_head_weight" not in stored and not any(k.startswith("ae_model.") for k in stored)


def test_converted_weights_equal_the_official_ones(converted, official_dir):
    official = load_file(official_dir / "autoencoder" / "model.safetensors")
    ours = converted.state_dict()
    assert set(official) == set(ours) - {"decoder.lm_head.weight"}
    for name, tensor in official.items():
        assert torch.equal(ours[name], tensor), name
    assert converted.decoder.lm_head.weight is converted.encoder.embed_tokens.weight


def test_auto_model_loads_converted_checkpoint(converted_dir):
    assert type(AutoModel.from_pretrained(converted_dir)) is CalmAutoencoder


def test_encoder_parity(converted, official_tensors):
    with torch.no_grad():
        mean, log_std = converted.encode(official_tensors["input_ids"])
    torch.testing.assert_close(mean, official_tensors["ae_mean"], rtol=0, atol=1e-5)
    torch.testing.assert_close(log_std, official_tensors["ae_log_std"], rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.cat([mean, log_std], -1), official_tensors["ae_encoder_out"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("latent_name, logits_name, argmax_name", [
    ("ae_z", "ae_decoder_logits", "ae_recon_argmax"),
    ("ae_mean", "ae_decoder_logits_from_mean", "ae_recon_argmax_from_mean"),
])  # fmt: skip
def test_decoder_parity(converted, official_tensors, latent_name, logits_name, argmax_name):
    with torch.no_grad():
        logits = converted.decode(official_tensors[latent_name])
    torch.testing.assert_close(logits, official_tensors[logits_name], rtol=1e-5, atol=1e-5)
    assert torch.equal(logits.argmax(-1), official_tensors[argmax_name])


def test_eval_loss_parity(converted, official_tensors):
    """The official eval forward samples z (recorded as ae_z) and returns the plain mean cross-entropy."""
    input_ids = official_tensors["input_ids"]
    with torch.no_grad():
        logits = converted.decode(official_tensors["ae_z"])
    torch.testing.assert_close(
        logits.reshape(-1, 512), official_tensors["ae_forward_eval_logits"], rtol=1e-5, atol=1e-5
    )
    loss = F.cross_entropy(logits.reshape(-1, 512), input_ids.reshape(-1))
    torch.testing.assert_close(loss, official_tensors["ae_forward_eval_loss"], rtol=1e-6, atol=1e-5)


def test_eval_forward_uses_the_posterior_mean(converted, official_tensors):
    with torch.no_grad():
        out = converted(official_tensors["input_ids"])
    torch.testing.assert_close(out.logits, official_tensors["ae_decoder_logits_from_mean"], rtol=1e-5, atol=1e-5)
    expected = F.cross_entropy(
        official_tensors["ae_decoder_logits_from_mean"].reshape(-1, 512), official_tensors["input_ids"].reshape(-1)
    )
    torch.testing.assert_close(out.reconstruction_loss, expected, rtol=1e-6, atol=1e-5)


def test_train_loss_parity(converted, official_tensors):
    """Replays the official train forward's random draws (DropToken uniforms, posterior noise, DropLatent
    uniforms) and compares the training loss, which includes the bf16 embedding rounding and the KL term."""
    draws = {name: official_tensors[f"ae_train_draw0{i}_{name}"] for i, name in enumerate(("rand_like", "randn_like"))}
    dropout_uniform = official_tensors["ae_train_draw02_dropout_uniform"]
    calls = []

    def rand_like(tensor, dtype=None, **kwargs):
        calls.append("rand_like")
        return draws["rand_like"].reshape(tensor.shape).to(dtype or tensor.dtype)

    def randn_like(tensor, **kwargs):
        calls.append("randn_like")
        return draws["randn_like"].reshape(tensor.shape).to(tensor.dtype)

    def dropout(input, p=0.5, training=True, inplace=False):
        calls.append("dropout")
        assert training and p == 0.15
        # ATen's CPU dropout: noise = (u < 1 - p) / (1 - p), output = input * noise.
        noise = (dropout_uniform.reshape(input.shape) < 1 - p).to(input.dtype).div_(1 - p)
        return input * noise

    converted.train()
    with (
        mock.patch("torch.rand_like", rand_like),
        mock.patch("torch.randn_like", randn_like),
        mock.patch("torch.nn.functional.dropout", dropout),
    ):
        out = converted(official_tensors["input_ids"])
    assert calls == ["rand_like", "randn_like", "dropout"]
    torch.testing.assert_close(out.loss, official_tensors["ae_forward_train_loss"], rtol=1e-6, atol=1e-5)


def test_official_config_mapping():
    official = {"vocab_size": 300, "patch_size": 2, "latent_size": 4, "ae_dropout": 0.1, "tie_word_embeddings": False}
    config = CalmAutoencoderConfig(**autoencoder_config_from_official(official))
    assert (config.vocab_size, config.patch_size, config.latent_size) == (300, 2, 4)
    assert config.token_dropout == config.latent_dropout == 0.1
    assert config.tie_word_embeddings is True  # the official decoder always uses the embedding matrix
    assert config.token_dropout_replacement_id == 0


def test_missing_weights_raise_file_not_found(tmp_path, official_dir):
    shutil.copy(official_dir / "autoencoder" / "config.json", tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match=r"No weights in .*model\.safetensors, pytorch_model\.bin"):
        load_official_state_dict(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="No weights"):
        convert_autoencoder(str(tmp_path))


def test_mismatched_checkpoint_is_rejected(tmp_path, official_dir):
    state_dict = load_file(official_dir / "autoencoder" / "model.safetensors")
    del state_dict["decoder.expand_layer.bias"]
    save_file(state_dict, tmp_path / "model.safetensors")
    shutil.copy(official_dir / "autoencoder" / "config.json", tmp_path / "config.json")
    with pytest.raises(
        ValueError, match=r"does not match the autoencoder architecture: missing \['decoder.expand_layer.bias'\]"
    ):
        convert_autoencoder(str(tmp_path))


def test_missing_weights_cli_exits_non_zero(tmp_path, official_dir):
    shutil.copy(official_dir / "autoencoder" / "config.json", tmp_path / "config.json")
    with pytest.raises(FileNotFoundError):
        main(["--autoencoder", str(tmp_path), "--output", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
