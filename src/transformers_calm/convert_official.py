"""Convert checkpoints of the official CALM code (github.com/shaochenze/calm) into transformers-calm checkpoints.

    python -m transformers_calm.convert_official --autoencoder A --output DST             # a CalmAutoencoder
    python -m transformers_calm.convert_official --autoencoder A --calm C --output DST    # a CalmForCausalLM

Official directories hold `config.json` and weights as `model.safetensors` or `pytorch_model.bin`, sharded or not.
A is an official autoencoder directory; an official CALM directory also works as A, since every official CALM
checkpoint embeds its autoencoder (`ae_model.*`). With `--calm`, the language model's backbone, input compression and
energy head come from C and its autoencoder weights from C's embedded copy (A then supplies the autoencoder's
hyper-parameters, such as its dropouts; `--autoencoder` may be omitted). The result loads with
`CalmAutoencoder.from_pretrained(DST)` / `CalmForCausalLM.from_pretrained(DST)`, or through the Auto classes.
"""

import argparse
import json
import os
import shutil

import torch
from transformers import LlamaConfig

from .configuration_calm import CalmConfig
from .configuration_calm_autoencoder import CalmAutoencoderConfig
from .modeling_calm import CalmForCausalLM
from .modeling_calm_autoencoder import CalmAutoencoder

# Official AutoencoderConfig fields that map one-to-one onto ours.
_AUTOENCODER_FIELDS = (
    "vocab_size",
    "patch_size",
    "latent_size",
    "hidden_size",
    "intermediate_size",
    "num_encoder_layers",
    "num_decoder_layers",
    "kl_weight",
    "kl_clamp",
    "hidden_act",
    "mlp_bias",
    "rms_norm_eps",
    "initializer_range",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
)
# Official CALMConfig fields of the backbone (a Llama) that map one-to-one onto a LlamaConfig.
_BACKBONE_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "hidden_act",
    "max_position_embeddings",
    "rms_norm_eps",
    "attention_bias",
    "attention_dropout",
    "mlp_bias",
    "initializer_range",
)
# Official CALMConfig fields of the energy head that map one-to-one onto ours (its `beta` is our `energy_alpha`).
_HEAD_FIELDS = ("num_mlp_layers", "noise_size", "num_samples")
# The official classes of the three generative heads, and the model types their configs are built with.
_OFFICIAL_ARCHITECTURES = {
    "EnergyTransformer": "energy",
    "FlowTransformer": "flow",
    "DiffusionTransformer": "diffusion",
}
_OFFICIAL_MODEL_TYPES = {"energy": "energy", "calm": "energy", "flow": "flow", "diffusion": "diffusion"}
# Official CALMConfig fields that the autoencoder defines for the whole model: they must agree with it.
_SHARED_FIELDS = ("vocab_size", "patch_size", "latent_size", "pad_token_id", "bos_token_id", "eos_token_id")
# Official CALM tensor-name prefixes -> ours. `generative_head.*` duplicates `mlp_generator.*` (one module registered
# under two names): .bin files hold both, safetensors exports usually one.
_CALM_PREFIXES = (
    ("transformer.", "model.backbone."),
    ("embed_proj.", "model.embed_proj."),
    ("mlp_generator.", "generative_head."),
    ("generative_head.", "generative_head."),
)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")


def load_official_state_dict(directory: str) -> dict[str, torch.Tensor]:
    """All tensors of an official checkpoint directory: `.safetensors` or `.bin`, single file or sharded with an
    index, preferring safetensors when both exist."""
    for index_name, single_name in (
        ("model.safetensors.index.json", "model.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin"),
    ):
        index_path = os.path.join(directory, index_name)
        if os.path.exists(index_path):
            with open(index_path) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        elif os.path.exists(os.path.join(directory, single_name)):
            files = [single_name]
        else:
            continue
        state_dict = {}
        for name in files:
            path = os.path.join(directory, name)
            if name.endswith(".safetensors"):
                from safetensors.torch import load_file

                state_dict.update(load_file(path))
            else:
                state_dict.update(torch.load(path, map_location="cpu", weights_only=True))
        return state_dict
    raise FileNotFoundError(
        f"No weights in {directory!r}: expected model.safetensors, pytorch_model.bin, or a sharded index "
        "(model.safetensors.index.json / pytorch_model.bin.index.json)."
    )


def autoencoder_config_from_official(official: dict) -> CalmAutoencoderConfig:
    """Our config from an official `AutoencoderConfig` dict (its single `ae_dropout` drives both dropouts)."""
    kwargs = {name: official[name] for name in _AUTOENCODER_FIELDS if name in official}
    dropout = official.get("ae_dropout", 0.15)
    # The official decoder projects with the encoder embedding matrix, tied by hand (its config says False).
    return CalmAutoencoderConfig(
        **kwargs, token_dropout=dropout, latent_dropout=dropout, tie_word_embeddings=True, dtype="float32"
    )


def autoencoder_state_dict_from_official(state_dict: dict[str, torch.Tensor], prefix: str = "") -> dict:
    """Our autoencoder state dict from official tensors whose names start with `prefix` (`"ae_model."` inside an
    official CALM checkpoint). The official `decoder.lm_head_weight` alias of the embedding is dropped: our decoder
    ties `decoder.lm_head.weight` to `encoder.embed_tokens.weight`."""
    converted = {}
    for name, tensor in state_dict.items():
        if not name.startswith(prefix):
            continue
        name = name[len(prefix) :]
        if name == "decoder.lm_head_weight":
            continue
        converted[name] = tensor
    if not converted:
        raise ValueError(f"No autoencoder tensors with prefix {prefix!r} in the official checkpoint.")
    return converted


def convert_autoencoder(source: str) -> CalmAutoencoder:
    """Load an official autoencoder (or the one embedded in an official CALM checkpoint) as a `CalmAutoencoder`."""
    with open(os.path.join(source, "config.json")) as f:
        official_config = json.load(f)
    state_dict = load_official_state_dict(source)
    prefix = "ae_model." if any(name.startswith("ae_model.") for name in state_dict) else ""
    if prefix:
        # An official CALM checkpoint: its config.json describes the LM; the AE keeps the LM's K, l and vocab.
        # Its own sizes are read from the tensor shapes.
        official_config = {
            **{k: official_config[k] for k in ("vocab_size", "patch_size", "latent_size") if k in official_config},
            **_autoencoder_sizes_from_tensors(state_dict, prefix),
            **{k: official_config[k] for k in ("pad_token_id", "bos_token_id", "eos_token_id") if k in official_config},
        }
    config = autoencoder_config_from_official(official_config)
    model = CalmAutoencoder(config)
    missing, unexpected = model.load_state_dict(autoencoder_state_dict_from_official(state_dict, prefix), strict=False)
    missing = [name for name in missing if name != "decoder.lm_head.weight"]  # restored by tying
    if missing or unexpected:
        raise ValueError(
            f"The official checkpoint in {source!r} does not match the autoencoder architecture: missing "
            f"{missing}, unexpected {unexpected}."
        )
    model.tie_weights()
    return model.eval()


def _autoencoder_sizes_from_tensors(state_dict: dict[str, torch.Tensor], prefix: str) -> dict:
    embed = state_dict[f"{prefix}encoder.embed_tokens.weight"]
    latent2 = state_dict[f"{prefix}encoder.hidden_to_latent.weight"].shape[0]
    gate = [
        k for k in state_dict if k.startswith(f"{prefix}encoder.encoder_layers.") and k.endswith("gate_proj.weight")
    ]
    dec = [k for k in state_dict if k.startswith(f"{prefix}decoder.decoder_layers.") and k.endswith("gate_proj.weight")]
    return {
        "vocab_size": embed.shape[0],
        "hidden_size": embed.shape[1],
        "latent_size": latent2 // 2,
        "intermediate_size": state_dict[gate[0]].shape[0] if gate else 4 * embed.shape[1],
        "num_encoder_layers": len(gate),
        "num_decoder_layers": len(dec),
        "patch_size": state_dict[f"{prefix}encoder.squeeze_layer.weight"].shape[1] // embed.shape[1],
    }


def official_head_type(official: dict) -> str:
    """`"energy"`, `"flow"` or `"diffusion"` of an official `CALMConfig` dict. Saved official configs have no
    `model_type` (it is an instance attribute, dropped on saving: they all read back as "energy"), so the class in
    `architectures` decides; `model_type` only where `architectures` is absent."""
    for architecture in official.get("architectures") or []:
        if architecture in _OFFICIAL_ARCHITECTURES:
            return _OFFICIAL_ARCHITECTURES[architecture]
    model_type = official.get("model_type", "energy")
    if model_type not in _OFFICIAL_MODEL_TYPES:
        raise ValueError(
            f"Unknown generative head: this checkpoint's model_type is {model_type!r} and its architectures "
            f"{official.get('architectures')}; the official heads are {sorted(_OFFICIAL_MODEL_TYPES)} "
            f"({', '.join(_OFFICIAL_ARCHITECTURES)})."
        )
    return _OFFICIAL_MODEL_TYPES[model_type]


def calm_config_from_official(official: dict, autoencoder_config: CalmAutoencoderConfig) -> CalmConfig:
    """Our config from an official `CALMConfig` dict and the autoencoder's config."""
    head_type = official_head_type(official)
    for name in _SHARED_FIELDS:
        value, expected = official.get(name), getattr(autoencoder_config, name)
        if value is not None and value != expected:
            raise ValueError(
                f"The CALM checkpoint's {name} ({value}) differs from its autoencoder's ({expected}): they were not "
                "trained together. Pass the autoencoder this model was trained with."
            )
    rope_scaling = official.get("rope_scaling")
    rope_parameters = {"rope_type": "default", "rope_theta": official.get("rope_theta", 10000.0)}
    if rope_scaling:
        rope_parameters.update(
            rope_type=rope_scaling.get("rope_type", rope_scaling.get("type")), factor=rope_scaling["factor"]
        )
    backbone = {name: official[name] for name in _BACKBONE_FIELDS if official.get(name) is not None}
    return CalmConfig(
        backbone_config=LlamaConfig(**backbone, rope_parameters=rope_parameters),
        autoencoder_config=autoencoder_config.to_dict(),
        head_type=head_type,
        energy_alpha=official.get("beta", 1.0),
        dtype="float32",
        **{name: official[name] for name in _HEAD_FIELDS if official.get(name) is not None},
    )


def calm_state_dict_from_official(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our `CalmForCausalLM` tensors (autoencoder excluded) from an official CALM state dict."""
    converted = {}
    for name, tensor in state_dict.items():
        for official_prefix, prefix in _CALM_PREFIXES:
            if name.startswith(official_prefix):
                converted.setdefault(prefix + name[len(official_prefix) :], tensor)
                break
        else:
            if not name.startswith("ae_model.") and not name.endswith("rotary_emb.inv_freq"):
                raise ValueError(f"Unexpected tensor {name!r} in the official CALM checkpoint.")
    return converted


def convert_calm(calm_source: str, autoencoder_source: str | None = None) -> CalmForCausalLM:
    """Load an official CALM checkpoint (energy, flow or diffusion head), with its embedded autoencoder, as a
    `CalmForCausalLM`."""
    with open(os.path.join(calm_source, "config.json")) as f:
        official_config = json.load(f)
    state_dict = load_official_state_dict(calm_source)
    embedded = any(name.startswith("ae_model.") for name in state_dict)
    if not embedded and autoencoder_source is None:
        raise ValueError(f"{calm_source!r} holds no embedded autoencoder (ae_model.*): pass --autoencoder.")
    autoencoder = convert_autoencoder(autoencoder_source or calm_source)
    if embedded and autoencoder_source is not None:
        # Hyper-parameters (dropouts, KL) from the standalone autoencoder; weights from the copy the LM was trained
        # with.
        embedded_weights = autoencoder_state_dict_from_official(state_dict, "ae_model.")
        autoencoder.load_state_dict(embedded_weights, strict=False)
        autoencoder.tie_weights()
    config = calm_config_from_official(official_config, autoencoder.config)
    model = CalmForCausalLM(config)
    missing, unexpected = model.load_state_dict(calm_state_dict_from_official(state_dict), strict=False)
    missing = [name for name in missing if not name.startswith("autoencoder.")]
    if missing or unexpected:
        raise ValueError(
            f"The official CALM checkpoint in {calm_source!r} does not match the architecture: missing {missing}, "
            f"unexpected {unexpected}."
        )
    model.autoencoder.load_state_dict(autoencoder.state_dict())
    return model.eval()


def copy_tokenizer_files(source: str, output: str) -> None:
    for name in _TOKENIZER_FILES:
        path = os.path.join(source, name)
        if os.path.exists(path):
            shutil.copy(path, os.path.join(output, name))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--autoencoder", help="official autoencoder (or CALM) checkpoint directory")
    parser.add_argument(
        "--calm", help="official CALM checkpoint directory (energy, flow or diffusion head): convert the language model"
    )
    parser.add_argument("--output", required=True, help="directory to write the converted checkpoint to")
    args = parser.parse_args(argv)
    if args.autoencoder is None and args.calm is None:
        parser.error("pass --autoencoder, --calm, or both")

    if args.calm is not None:
        model = convert_calm(args.calm, args.autoencoder)
        kind, sources = "CALM language model", [args.calm] + ([args.autoencoder] if args.autoencoder else [])
    else:
        model = convert_autoencoder(args.autoencoder)
        kind, sources = "autoencoder", [args.autoencoder]
    model.save_pretrained(args.output)
    for source in reversed(sources):  # the CALM checkpoint's tokenizer wins
        copy_tokenizer_files(source, args.output)
    num_params = sum(p.numel() for p in model.parameters())
    print(f"Converted {kind} ({num_params:,} parameters) from {', '.join(sources)} to {args.output}")


if __name__ == "__main__":
    main()
