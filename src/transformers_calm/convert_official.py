"""Convert checkpoints of the official CALM code (github.com/shaochenze/calm) into transformers-calm checkpoints.

    python -m transformers_calm.convert_official --autoencoder A --output DST             # a CalmAutoencoder
    python -m transformers_calm.convert_official --autoencoder A --calm C --output DST    # a CalmForCausalLM

Official directories hold `config.json` and weights as `model.safetensors` or `pytorch_model.bin`, sharded or not.
A is an official autoencoder directory; an official CALM directory also works as A, since every official CALM
checkpoint embeds its autoencoder (`ae_model.*`). With `--calm`, the language model's backbone, input compression and
energy head come from C and its autoencoder weights from C's embedded copy (A then supplies the autoencoder's
hyper-parameters, such as its dropouts; `--autoencoder` may be omitted). The result loads with
`CalmAutoencoder.from_pretrained(DST)` / `CalmForCausalLM.from_pretrained(DST)`, or through the Auto classes.

`CalmForCausalLM.from_pretrained(C)` and `CalmAutoencoder.from_pretrained(A)` also load the official folders (or Hub
repositories) directly, to the same tensors (see `official_checkpoints`): this command writes a converted copy, for
the Auto classes, `trust_remote_code` and publishing. It reads the tensors itself, independently of that loading
path, and the tests hold the two to each other.
"""

import argparse
import json
import os
import shutil

import torch

from .configuration_calm import CalmConfig
from .configuration_calm_autoencoder import CalmAutoencoderConfig
from .modeling_calm import CalmForCausalLM
from .modeling_calm_autoencoder import CalmAutoencoder
from .official_checkpoints import (
    autoencoder_config_from_official,
    calm_config_from_official,
    embedded_autoencoder_config,
    weight_files,
)

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
    index, preferring safetensors when both exist (`official_checkpoints.weight_files`)."""
    state_dict = {}
    for path in weight_files(directory):
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state_dict.update(load_file(path))
        else:
            state_dict.update(torch.load(path, map_location="cpu", weights_only=True))
    return state_dict


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
        shapes = {name: tuple(tensor.shape) for name, tensor in state_dict.items()}
        official_config = embedded_autoencoder_config(official_config, shapes, prefix)
    config = CalmAutoencoderConfig(**autoencoder_config_from_official(official_config))
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
    config = CalmConfig(**calm_config_from_official(official_config, autoencoder.config.to_dict()))
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
