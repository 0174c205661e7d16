"""The official CALM checkpoints as published load directly with `CalmForCausalLM.from_pretrained` and
`CalmAutoencoder.from_pretrained` (src/transformers_calm/official_checkpoints.py), to exactly the tensors the
converter writes, for every head and every file layout the official code writes: `model.safetensors`,
`pytorch_model.bin` (with the `generative_head.*` and `decoder.lm_head_weight` aliases), sharded either way, from a
folder or from a Hub repository id (a local Hub cache), with `ae_path` pointing nowhere.

The official folders are the official-code fixtures (`tests/fixtures/official-tiny*`), copied as they are."""

import json
import shutil

import pytest
import torch
from common import write_sharded
from safetensors.torch import load_file

from transformers_calm import CalmAutoencoder, CalmForCausalLM, CalmModel
from transformers_calm.convert_official import load_official_state_dict, main

FIXTURES = {
    "energy": ("official-tiny", "calm"),
    "flow": ("official-tiny-heads", "flow"),
    "diffusion": ("official-tiny-heads", "diffusion"),
}
LAYOUTS = ["safetensors", "bin", "sharded-safetensors", "sharded-bin"]
AUTHORS_SERVER = "/mnt/shaochenze/checkpoints/CALM-Autoencoder"  # an ae_path of the kind official issue #20 meets


def official_folder(source, destination, layout, ae_path=AUTHORS_SERVER):
    """`source` (an official folder) rewritten in `layout`, its config as published but for an `ae_path` that names
    a server that does not exist here."""
    destination.mkdir(parents=True)
    config = json.loads((source / "config.json").read_text())
    if "ae_path" in config:
        config["ae_path"] = ae_path
    (destination / "config.json").write_text(json.dumps(config, indent=2))
    if (source / "generation_config.json").exists():
        shutil.copy(source / "generation_config.json", destination)
    if layout in ("safetensors", "bin"):
        name = "model.safetensors" if layout == "safetensors" else "pytorch_model.bin"
        if (source / name).exists():
            shutil.copy(source / name, destination)
            return destination
    state_dict = load_official_state_dict(str(source))
    if "decoder.lm_head_weight" not in state_dict and "encoder.embed_tokens.weight" in state_dict:
        # The official training saved the autoencoder as .bin with the decoder's alias of the embedding.
        state_dict["decoder.lm_head_weight"] = state_dict["encoder.embed_tokens.weight"]
    if layout == "bin":
        torch.save(state_dict, destination / "pytorch_model.bin")
    else:
        write_sharded(state_dict, destination, layout.split("-")[1])
    return destination


@pytest.fixture(scope="module")
def fixtures_root(official_dir):
    return official_dir.parent


@pytest.fixture(scope="module")
def converted(fixtures_root, tmp_path_factory):
    """The converter's copy of each official model, loaded back: what direct loading must equal."""
    cache = {}

    def get(kind):
        if kind not in cache:
            output = tmp_path_factory.mktemp(f"converted-{kind}")
            if kind == "autoencoder":
                main(["--autoencoder", str(fixtures_root / "official-tiny" / "autoencoder"), "--output", str(output)])
                cache[kind] = CalmAutoencoder.from_pretrained(output)
            else:
                fixture_set, folder = FIXTURES[kind]
                main(["--calm", str(fixtures_root / fixture_set / folder), "--output", str(output)])
                cache[kind] = CalmForCausalLM.from_pretrained(output)
        return cache[kind]

    return get


def assert_same_model(model, reference):
    state, expected = model.state_dict(), reference.state_dict()
    assert state.keys() == expected.keys()
    for name, tensor in expected.items():
        assert state[name].dtype == tensor.dtype, name
        assert torch.equal(state[name], tensor), name
    # The same config, but for what saving adds (where it was read from, the auto_map of remote code).
    ignored = {"_name_or_path": "", "auto_map": None}
    assert model.config.to_dict() | ignored == reference.config.to_dict() | ignored


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("head", sorted(FIXTURES))
def test_an_official_language_model_loads_as_the_converter_writes_it(head, layout, fixtures_root, converted, tmp_path):
    fixture_set, folder = FIXTURES[head]
    source = official_folder(fixtures_root / fixture_set / folder, tmp_path / "official", layout)
    model = CalmForCausalLM.from_pretrained(source)
    assert model.config.head_type == head
    assert_same_model(model, converted(head))
    assert model.generation_config.to_dict() == converted(head).generation_config.to_dict()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_the_official_autoencoder_loads_tied_and_decodes_as_the_official_one(
    layout, fixtures_root, converted, official_tensors, tmp_path
):
    # As published, its config says tie_word_embeddings=False and the safetensors file has no decoder output
    # matrix: the official decoder ties it by attribute assignment. Loaded as a plain transformers checkpoint, the
    # decoder's lm_head was random and the logits off by ~29.
    source = official_folder(fixtures_root / "official-tiny" / "autoencoder", tmp_path / "official", layout)
    model = CalmAutoencoder.from_pretrained(source).eval()
    assert_same_model(model, converted("autoencoder"))
    assert model.decoder.lm_head.weight is model.encoder.embed_tokens.weight
    with torch.no_grad():
        logits = model.decode(official_tensors["ae_z"])
    torch.testing.assert_close(logits, official_tensors["ae_decoder_logits"], atol=1e-4, rtol=1e-5)


def test_the_loaded_language_model_computes_the_official_outputs(fixtures_root, official_tensors):
    model = CalmForCausalLM.from_pretrained(fixtures_root / "official-tiny" / "calm").eval()
    with torch.no_grad():
        hidden = model(official_tensors["input_ids"]).last_hidden_state
        latents = model.generative_head(official_tensors["calm_hidden_states"], noise=official_tensors["head_noise"])
        chunks = model.autoencoder.decode(latents).argmax(-1)
    torch.testing.assert_close(hidden, official_tensors["calm_hidden_states"], atol=1e-5, rtol=0)
    torch.testing.assert_close(latents, official_tensors["head_latent"], atol=1e-5, rtol=0)
    assert torch.equal(
        chunks.view(official_tensors["head_decoded_argmax"].shape), official_tensors["head_decoded_argmax"]
    )


def test_dtype_and_device_map(fixtures_root, converted):
    source = fixtures_root / "official-tiny" / "calm"
    model = CalmForCausalLM.from_pretrained(source, dtype=torch.bfloat16, device_map="cpu")
    reference = converted("energy")
    state = model.state_dict()
    for name, tensor in reference.state_dict().items():
        assert state[name].dtype == torch.bfloat16, name
        assert torch.equal(state[name], tensor.to(torch.bfloat16)), name
    assert model.config.dtype == torch.bfloat16


def test_a_hub_repository_id_loads_from_the_cache(fixtures_root, converted, tmp_path):
    """`from_pretrained("cccczshao/CALM-M")` resolves every file through the Hub cache (here filled by hand, offline),
    the tensor shapes the config needs included."""
    snapshot = tmp_path / "models--cccczshao--CALM-M" / "snapshots" / ("0" * 40)
    official_folder(fixtures_root / "official-tiny" / "calm", snapshot, "sharded-safetensors")
    (tmp_path / "models--cccczshao--CALM-M" / "refs").mkdir()
    (tmp_path / "models--cccczshao--CALM-M" / "refs" / "main").write_text("0" * 40)
    model = CalmForCausalLM.from_pretrained("cccczshao/CALM-M", cache_dir=tmp_path, local_files_only=True)
    assert_same_model(model, converted("energy"))


def test_saving_writes_this_packages_layout(fixtures_root, converted, tmp_path):
    model = CalmForCausalLM.from_pretrained(fixtures_root / "official-tiny" / "calm")
    model.save_pretrained(tmp_path / "saved")
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert config["model_type"] == "calm" and config["architectures"] == ["CalmForCausalLM"]
    names = load_file(tmp_path / "saved" / "model.safetensors").keys()
    assert not [name for name in names if name.startswith(("transformer.", "ae_model.", "mlp_generator."))]
    assert_same_model(CalmForCausalLM.from_pretrained(tmp_path / "saved"), converted("energy"))


def test_the_wrong_class_or_an_incomplete_checkpoint_is_a_clear_error(fixtures_root, tmp_path):
    calm, autoencoder = fixtures_root / "official-tiny" / "calm", fixtures_root / "official-tiny" / "autoencoder"
    with pytest.raises(ValueError, match="official CALM language model: load it with CalmForCausalLM"):
        CalmAutoencoder.from_pretrained(calm)
    with pytest.raises(ValueError, match="official CALM language model: load it with CalmForCausalLM"):
        CalmModel.from_pretrained(calm)
    with pytest.raises(ValueError, match="official CALM autoencoder: load it with CalmAutoencoder"):
        CalmForCausalLM.from_pretrained(autoencoder)

    # A language model without its embedded autoencoder cannot be loaded alone: the converter takes both.
    state_dict = load_official_state_dict(str(calm))
    without_autoencoder = official_folder(calm, tmp_path / "no-ae", "safetensors")
    (without_autoencoder / "model.safetensors").unlink()
    torch.save({k: v for k, v in state_dict.items() if not k.startswith("ae_model.")}, without_autoencoder / "x.bin")
    (without_autoencoder / "x.bin").rename(without_autoencoder / "pytorch_model.bin")
    with pytest.raises(ValueError, match="no embedded autoencoder.*convert_official --calm"):
        CalmForCausalLM.from_pretrained(without_autoencoder)

    # A tensor missing from an official checkpoint would be initialised at random: an error, not a warning.
    incomplete = official_folder(calm, tmp_path / "incomplete", "safetensors")
    (incomplete / "model.safetensors").unlink()
    torch.save(
        {k: v for k, v in state_dict.items() if not k.startswith("embed_proj.")}, incomplete / "pytorch_model.bin"
    )
    with pytest.raises(ValueError, match=r"6 tensors \(model\.embed_proj.*would be initialised at random"):
        CalmForCausalLM.from_pretrained(incomplete)

    # A tensor the official architecture has no place for: an error too (the converter refuses it as well).
    extra = official_folder(calm, tmp_path / "extra", "safetensors")
    (extra / "model.safetensors").unlink()
    torch.save({**state_dict, "embed_proj.9.weight": torch.ones(2)}, extra / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"1 tensors \(model\.embed_proj\.9\.weight\) in it have no place"):
        CalmForCausalLM.from_pretrained(extra)
