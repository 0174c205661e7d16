"""Parity of converted official CALM checkpoints with the official code's golden outputs.

The official checkpoint and its fixtures live in `tests/fixtures/official-tiny` (the `official_dir` fixture); see its
README for how every tensor was produced. Every source layout the official code can leave behind is
converted (safetensors or .bin, single file or sharded, with or without a separate autoencoder directory) and must
reproduce the same numbers."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig

from transformers_calm import CalmAutoencoderConfig, CalmConfig, CalmForCausalLM
from transformers_calm.convert_official import convert_calm, main
from transformers_calm.modeling_energy_head import energy_score_terms

ATOL = 1e-5
B, N, K, L = 2, 4, 4, 16  # batch, chunks, tokens per chunk, latent size of the fixtures


@pytest.fixture(scope="module")
def official_bin(official_dir) -> dict[str, torch.Tensor]:
    return torch.load(official_dir / "calm" / "pytorch_model.bin", map_location="cpu", weights_only=True)


def _copy_config(source: Path, target: Path) -> Path:
    target.mkdir(parents=True)
    shutil.copy(source / "calm" / "config.json", target / "config.json")
    return target


def _write_sharded(state_dict: dict, target: Path, safetensors: bool) -> None:
    names = list(state_dict)
    halves = (names[: len(names) // 2], names[len(names) // 2 :])
    ext = "safetensors" if safetensors else "bin"
    stem = "model" if safetensors else "pytorch_model"
    weight_map = {}
    for i, part in enumerate(halves, start=1):
        filename = f"{stem}-{i:05d}-of-00002.{ext}"
        shard = {name: state_dict[name].clone().contiguous() for name in part}
        if safetensors:
            save_file(shard, target / filename, metadata={"format": "pt"})
        else:
            torch.save(shard, target / filename)
        weight_map.update(dict.fromkeys(part, filename))
    index = {
        "metadata": {"total_size": sum(t.numel() * t.element_size() for t in state_dict.values())},
        "weight_map": weight_map,
    }
    (target / f"{stem}.{ext}.index.json").write_text(json.dumps(index))


def _source_layout(variant: str, official_dir: Path, official_bin: dict, root: Path) -> tuple[Path, Path | None]:
    """A CALM checkpoint directory in the given layout, and the --autoencoder argument to pass."""
    calm, ae = official_dir / "calm", official_dir / "autoencoder"
    if variant in ("cli", "in-process"):
        return calm, ae
    if variant == "embedded-autoencoder-only":
        return calm, None
    target = _copy_config(official_dir, root / "source")
    if variant == "bin":
        # The official training format: duplicate generative_head.* / mlp_generator.* names and the lm_head alias.
        assert any(k.startswith("generative_head.") for k in official_bin)
        assert any(k.startswith("mlp_generator.") for k in official_bin)
        assert "ae_model.decoder.lm_head_weight" in official_bin
        shutil.copy(calm / "pytorch_model.bin", target / "pytorch_model.bin")
    elif variant == "safetensors":
        shutil.copy(calm / "model.safetensors", target / "model.safetensors")
    elif variant == "sharded-bin":
        _write_sharded(official_bin, target, safetensors=False)
    elif variant == "sharded-safetensors":
        _write_sharded(load_file(calm / "model.safetensors"), target, safetensors=True)
    elif variant == "separate-autoencoder":
        # No ae_model.* in the CALM checkpoint: the autoencoder comes from --autoencoder.
        tensors = {k: v for k, v in load_file(calm / "model.safetensors").items() if not k.startswith("ae_model.")}
        save_file(tensors, target / "model.safetensors")
        return target, ae
    else:
        raise AssertionError(variant)
    assert sorted(p.name for p in target.iterdir() if p.name != "config.json")  # weights written
    return target, None if variant.startswith("sharded") else ae


VARIANTS = [
    pytest.param("cli", marks=pytest.mark.slow),  # the converter as a child process
    "in-process",
    "embedded-autoencoder-only",
    "bin",
    "safetensors",
    "sharded-bin",
    "sharded-safetensors",
    "separate-autoencoder",
]


@pytest.fixture(scope="module", params=VARIANTS)
def converted_dir(request, official_dir, official_bin, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp(request.param)
    calm, ae = _source_layout(request.param, official_dir, official_bin, root)
    output = root / "converted"
    args = ["--calm", str(calm), "--output", str(output)] + (["--autoencoder", str(ae)] if ae else [])
    if request.param == "cli":
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
        proc = subprocess.run(
            [sys.executable, "-m", "transformers_calm.convert_official", *args],
            env=env,
            cwd=root,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, f"converter failed:\n{proc.stdout}\n{proc.stderr}"
        assert "Converted CALM language model" in proc.stdout
    else:
        main(args)
    return output


@pytest.fixture(scope="module")
def converted(converted_dir) -> CalmForCausalLM:
    model = CalmForCausalLM.from_pretrained(converted_dir, attn_implementation="eager")
    assert model.model.backbone.config._attn_implementation == "eager"
    assert model.dtype == torch.float32
    return model


def test_converted_directory_and_config(converted_dir, converted):
    assert {"config.json", "model.safetensors", "modeling_calm.py", "configuration_calm.py"} <= set(
        os.listdir(converted_dir)
    )
    config = converted.config
    assert type(config) is CalmConfig and type(config.autoencoder_config) is CalmAutoencoderConfig
    assert (config.vocab_size, config.patch_size, config.latent_size, config.hidden_size) == (512, K, L, 64)
    backbone = config.backbone_config
    assert type(backbone) is LlamaConfig
    assert (backbone.num_hidden_layers, backbone.num_attention_heads, backbone.num_key_value_heads) == (2, 4, 4)
    assert (backbone.vocab_size, backbone.pad_token_id) == (512, 511)
    assert (config.num_mlp_layers, config.noise_size, config.num_samples, config.num_targets) == (2, 64, 8, 100)
    assert config.energy_alpha == 1.0
    assert backbone.rope_parameters["rope_theta"] == 10000.0
    assert (config.pad_token_id, config.bos_token_id, config.eos_token_id) == (511, 508, 509)
    ae = config.autoencoder_config
    assert (ae.hidden_size, ae.intermediate_size, ae.num_encoder_layers, ae.num_decoder_layers) == (64, 96, 2, 2)
    assert (ae.token_dropout, ae.latent_dropout, ae.tie_word_embeddings) == (0.15, 0.15, True)
    decoder, encoder = converted.autoencoder.decoder, converted.autoencoder.encoder
    assert decoder.lm_head.weight.data_ptr() == encoder.embed_tokens.weight.data_ptr()


def test_weights_equal_official_tensors(converted, official_dir):
    official = load_file(official_dir / "calm" / "model.safetensors")
    ours = converted.state_dict()
    prefixes = (
        ("transformer.", "model.backbone."),
        ("embed_proj.", "model.embed_proj."),
        ("mlp_generator.", "generative_head."),
        ("ae_model.", "autoencoder."),
    )
    mapped = 0
    for name, tensor in official.items():
        if name == "ae_model.decoder.lm_head_weight":
            target = "autoencoder.decoder.lm_head.weight"
        else:
            official_prefix, prefix = next(p for p in prefixes if name.startswith(p[0]))
            target = prefix + name[len(official_prefix) :]
        assert torch.equal(ours[target], tensor), name
        mapped += 1
    assert mapped == len(official)


def test_input_compression(converted, official_tensors):
    with torch.no_grad():
        embeds = converted.model.embed_chunks(official_tensors["input_ids"])
    torch.testing.assert_close(embeds, official_tensors["calm_inputs_embeds"], atol=ATOL, rtol=0)


def test_backbone_hidden_states(converted, official_tensors):
    with torch.no_grad():
        hidden = converted.model(input_ids=official_tensors["input_ids"]).last_hidden_state
        lm_hidden = converted(official_tensors["input_ids"]).last_hidden_state
    torch.testing.assert_close(hidden, official_tensors["calm_hidden_states"], atol=ATOL, rtol=0)
    torch.testing.assert_close(lm_hidden, official_tensors["calm_hidden_states"], atol=ATOL, rtol=0)


def test_generative_head(converted, official_tensors):
    with torch.no_grad():
        latent = converted.generative_head(official_tensors["calm_hidden_states"], noise=official_tensors["head_noise"])
    torch.testing.assert_close(latent, official_tensors["head_latent"], atol=ATOL, rtol=0)


def test_decoded_head_latents(converted, official_tensors):
    with torch.no_grad():
        logits = converted.autoencoder.decode(official_tensors["head_latent"])  # (B, N * K, V)
        # The official call: one chunk at a time.
        per_chunk = converted.autoencoder.decode(official_tensors["head_latent"].reshape(B * N, 1, L))
    assert torch.equal(logits.argmax(-1).reshape(B, N, K), official_tensors["head_decoded_argmax"])
    assert torch.equal(per_chunk.argmax(-1).reshape(B, N, K), official_tensors["head_decoded_argmax"])


def test_energy_score(converted, official_tensors, monkeypatch):
    eps = official_tensors["energy_eps"]
    monkeypatch.setattr(torch, "randn", lambda *args, **kwargs: eps.clone())
    config = converted.config
    fidelity, diversity = energy_score_terms(
        official_tensors["energy_x"],
        official_tensors["energy_target_mean"],
        official_tensors["energy_target_log_std"],
        config.num_targets,
        config.energy_alpha,
    )
    torch.testing.assert_close(diversity - 2 * fidelity, official_tensors["energy_score"], atol=ATOL, rtol=1e-6)
    torch.testing.assert_close((2 * fidelity - diversity).mean(), official_tensors["energy_loss"], atol=ATOL, rtol=1e-6)


def _seeded_forward(model, input_ids, seed):
    samples = []
    hook = model.generative_head.register_forward_hook(lambda module, args, output: samples.append(output.detach()))
    try:
        torch.manual_seed(seed)
        with torch.no_grad():
            loss = model(input_ids, labels=input_ids).loss
    finally:
        hook.remove()
    return loss, samples


@pytest.mark.parametrize(
    ("ids", "seed", "loss", "latents"),
    [
        ("input_ids", 1111, "fwd_eval_loss", "fwd_eval_latent_predictions"),
        ("brier_input_ids", 9999, "brier_fwd_loss", "brier_fwd_latent_predictions"),
    ],
)
def test_seeded_eval_loss(converted, official_tensors, ids, seed, loss, latents):
    got, samples = _seeded_forward(converted.eval(), official_tensors[ids], seed)
    assert len(samples) == 1
    # Same random stream as the official forward: head noise (N, B, L-1, noise) then (100, B, L-1, l) target draws.
    torch.testing.assert_close(
        samples[0].reshape(official_tensors[latents].shape), official_tensors[latents], atol=ATOL, rtol=0
    )
    torch.testing.assert_close(got, official_tensors[loss], atol=ATOL, rtol=0)


def test_train_mode_loss_equals_official_eval_loss(converted, official_tensors):
    # The official `model.train()` also puts its frozen autoencoder in training mode, where the encoder rounds token
    # embeddings to bf16; the targets, hence `fwd_train_loss`, then differ slightly from eval. Our frozen
    # autoencoder stays in eval mode in training, so the train-mode loss equals the official EVAL loss, on purpose.
    # The official quirk is real in these fixtures:
    assert abs(official_tensors["fwd_train_loss"] - official_tensors["fwd_eval_loss"]) > 1e-3
    try:
        converted.train()
        assert not converted.autoencoder.training
        got, _ = _seeded_forward(converted, official_tensors["input_ids"], 1111)
    finally:
        converted.eval()
    torch.testing.assert_close(got, official_tensors["fwd_eval_loss"], atol=ATOL, rtol=0)


# --------------------------------------------------------------------------------------------------------------------
# Errors


def _link_weights(official_dir: Path, target: Path) -> None:
    os.symlink(official_dir / "calm" / "model.safetensors", target / "model.safetensors")


def test_unknown_heads_are_rejected(official_dir, tmp_path):
    source = _copy_config(official_dir, tmp_path / "source")
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "model_type": "mystery", "architectures": None}))
    _link_weights(official_dir, source)
    with pytest.raises(ValueError, match=r"model_type is 'mystery'.*'diffusion', 'energy', 'flow'"):
        convert_calm(str(source), str(official_dir / "autoencoder"))
    with pytest.raises(ValueError, match="mystery"):
        main(["--calm", str(source), "--output", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_calm_without_embedded_autoencoder_needs_autoencoder_argument(official_dir, tmp_path):
    source = _copy_config(official_dir, tmp_path / "source")
    tensors = {
        k: v for k, v in load_file(official_dir / "calm" / "model.safetensors").items() if not k.startswith("ae_model.")
    }
    save_file(tensors, source / "model.safetensors")
    with pytest.raises(ValueError, match="--autoencoder"):
        main(["--calm", str(source), "--output", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_directory_without_weights_raises(official_dir, tmp_path):
    source = _copy_config(official_dir, tmp_path / "source")
    with pytest.raises(FileNotFoundError, match="No weights"):
        main(["--calm", str(source), "--output", str(tmp_path / "out")])
