"""The official CALM checkpoints as published (`cccczshao/CALM-M`, `-L`, `-XL`, `CALM-Autoencoder`), loaded directly.

The official code (github.com/shaochenze/calm) saves its own layout: a `config.json` without `model_type` whose
`architectures` name the official class (`EnergyTransformer`, `FlowTransformer`, `DiffusionTransformer`,
`Autoencoder`), the autoencoder embedded in every language model as `ae_model.*`, and an `ae_path` naming the
authors' training server. `CalmForCausalLM.from_pretrained` and `CalmAutoencoder.from_pretrained` recognise that
config and convert on load:

- the config, here: `CalmConfig.get_config_dict` / `CalmAutoencoderConfig.get_config_dict` turn the official dict
  into ours (the embedded autoencoder's sizes are read from the weight files' tensor shapes, so `ae_path` is never
  followed: it points nowhere outside the authors' machines, official issue #20);
- the weights, through transformers' own loading: a `key_mapping` renames the official tensors while they load, so
  `dtype=`, `device_map=`, `.bin`/`.safetensors` and sharded files work as for any checkpoint.

The result is exactly what `python -m transformers_calm.convert_official --calm DIR` writes (that command stays, for
writing a converted copy; given a standalone autoencoder too, `--autoencoder A`, it takes the autoencoder's
hyper-parameters from A instead of the defaults); saving a model loaded this way writes this package's layout.
"""

import json
import os
import struct

import torch
from transformers.utils import cached_file

# The official classes of the three generative heads, and our head types.
OFFICIAL_ARCHITECTURES = {
    "EnergyTransformer": "energy",
    "FlowTransformer": "flow",
    "DiffusionTransformer": "diffusion",
}
OFFICIAL_AUTOENCODER_ARCHITECTURE = "Autoencoder"
# The model types of this package's configs (CalmConfig, CalmAutoencoderConfig): a config with one is not official.
# (Strings, not the classes: the config classes call this module, which builds their dicts without importing them.)
OUR_MODEL_TYPES = ("calm", "calm_autoencoder")
_OFFICIAL_MODEL_TYPES = {"energy": "energy", "calm": "energy", "flow": "flow", "diffusion": "diffusion"}
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
# Official CALMConfig fields that the autoencoder defines for the whole model: they must agree with it.
_SHARED_FIELDS = ("vocab_size", "patch_size", "latent_size", "pad_token_id", "bos_token_id", "eos_token_id")

# Official tensor names -> ours, as transformers' `key_mapping` (regular expressions, applied in order while the
# weights load). `generative_head.*` aliases `mlp_generator.*` in official `.bin` files (one module registered under
# two names) and already has our name; `decoder.lm_head_weight` aliases the encoder embedding, which our decoder ties.
CALM_KEY_MAPPING = {
    r"^transformer\.": "model.backbone.",
    r"^embed_proj\.": "model.embed_proj.",
    r"^mlp_generator\.": "generative_head.",
    r"^ae_model\.decoder\.lm_head_weight$": "autoencoder.decoder.lm_head.weight",
    r"^ae_model\.": "autoencoder.",
}
AUTOENCODER_KEY_MAPPING = {r"^decoder\.lm_head_weight$": "decoder.lm_head.weight"}

_HUB_KWARGS = ("cache_dir", "force_download", "proxies", "local_files_only", "token", "revision", "subfolder")
_WEIGHT_FILES = (
    ("model.safetensors.index.json", "model.safetensors"),
    ("pytorch_model.bin.index.json", "pytorch_model.bin"),
)


def official_kind(config_dict: dict | None) -> str | None:
    """`"calm"` or `"autoencoder"` when `config_dict` is an official CALM config, else None. Official configs carry
    no `model_type` (the official classes set it on the instance, and saving drops it); ours always do."""
    if not config_dict or config_dict.get("model_type") in OUR_MODEL_TYPES:
        return None
    architectures = config_dict.get("architectures") or []
    if any(name in OFFICIAL_ARCHITECTURES for name in architectures):
        return "calm"
    if OFFICIAL_AUTOENCODER_ARCHITECTURE in architectures:
        return "autoencoder"
    return None


def autoencoder_config_from_official(official: dict) -> dict:
    """The arguments of our `CalmAutoencoderConfig` for an official `AutoencoderConfig` dict (its single
    `ae_dropout` drives both dropouts)."""
    kwargs = {name: official[name] for name in _AUTOENCODER_FIELDS if name in official}
    dropout = official.get("ae_dropout", 0.15)
    # The official decoder projects with the encoder embedding matrix, tied by hand (its config says False).
    return {
        **kwargs,
        "token_dropout": dropout,
        "latent_dropout": dropout,
        "tie_word_embeddings": True,
        "dtype": "float32",
    }


def embedded_autoencoder_config(official: dict, shapes: dict[str, tuple], prefix: str = "ae_model.") -> dict:
    """The official autoencoder config of the copy embedded in an official CALM checkpoint: K, l and the special ids
    from the language model's config, the autoencoder's own sizes from its tensors' shapes (`shapes`: name -> shape)."""
    embed = shapes[f"{prefix}encoder.embed_tokens.weight"]
    gates = [
        name
        for name in shapes
        if name.startswith(f"{prefix}encoder.encoder_layers.") and name.endswith("gate_proj.weight")
    ]
    decoder_gates = [
        name
        for name in shapes
        if name.startswith(f"{prefix}decoder.decoder_layers.") and name.endswith("gate_proj.weight")
    ]
    sizes = {
        "vocab_size": embed[0],
        "hidden_size": embed[1],
        "latent_size": shapes[f"{prefix}encoder.hidden_to_latent.weight"][0] // 2,
        "intermediate_size": shapes[gates[0]][0] if gates else 4 * embed[1],
        "num_encoder_layers": len(gates),
        "num_decoder_layers": len(decoder_gates),
        "patch_size": shapes[f"{prefix}encoder.squeeze_layer.weight"][1] // embed[1],
    }
    return {
        **{name: official[name] for name in ("vocab_size", "patch_size", "latent_size") if name in official},
        **sizes,
        **{name: official[name] for name in ("pad_token_id", "bos_token_id", "eos_token_id") if name in official},
    }


def official_head_type(official: dict) -> str:
    """`"energy"`, `"flow"` or `"diffusion"` of an official `CALMConfig` dict. Saved official configs have no
    `model_type` (they all read back as "energy"), so the class in `architectures` decides; `model_type` only where
    `architectures` is absent."""
    for architecture in official.get("architectures") or []:
        if architecture in OFFICIAL_ARCHITECTURES:
            return OFFICIAL_ARCHITECTURES[architecture]
    model_type = official.get("model_type", "energy")
    if model_type not in _OFFICIAL_MODEL_TYPES:
        raise ValueError(
            f"Unknown generative head: this checkpoint's model_type is {model_type!r} and its architectures "
            f"{official.get('architectures')}; the official heads are {sorted(_OFFICIAL_MODEL_TYPES)} "
            f"({', '.join(OFFICIAL_ARCHITECTURES)})."
        )
    return _OFFICIAL_MODEL_TYPES[model_type]


def calm_config_from_official(official: dict, autoencoder_config: dict) -> dict:
    """The arguments of our `CalmConfig` for an official `CALMConfig` dict and the autoencoder's config (a dict of
    `CalmAutoencoderConfig`). `ae_path` is not read."""
    head_type = official_head_type(official)
    for name in _SHARED_FIELDS:
        value = official.get(name)
        if value is not None and name in autoencoder_config and value != autoencoder_config[name]:
            raise ValueError(
                f"The CALM checkpoint's {name} ({value}) differs from its autoencoder's "
                f"({autoencoder_config[name]}): they were not trained together. Pass the autoencoder this model was "
                "trained with."
            )
    rope_scaling = official.get("rope_scaling")
    rope_parameters = {"rope_type": "default", "rope_theta": official.get("rope_theta", 10000.0)}
    if rope_scaling:
        rope_parameters.update(
            rope_type=rope_scaling.get("rope_type", rope_scaling.get("type")), factor=rope_scaling["factor"]
        )
    backbone = {name: official[name] for name in _BACKBONE_FIELDS if official.get(name) is not None}
    return {
        "backbone_config": {"model_type": "llama", **backbone, "rope_parameters": rope_parameters},
        "autoencoder_config": autoencoder_config,
        "head_type": head_type,
        "energy_alpha": official.get("beta", 1.0),
        "dtype": "float32",
        **{name: official[name] for name in _HEAD_FIELDS if official.get(name) is not None},
    }


def hub_kwargs(kwargs: dict) -> dict:
    """The download arguments of a `from_pretrained` call (where to find the files), without the others."""
    return {name: kwargs[name] for name in _HUB_KWARGS if kwargs.get(name) is not None}


def weight_files(path, **download_kwargs) -> list[str]:
    """The local paths of the weight files of the checkpoint at `path` (a folder or a Hub repo id, downloaded then):
    `.safetensors` or `.bin`, single or sharded with an index, safetensors first where both are there."""
    for index_name, single_name in _WEIGHT_FILES:
        index = cached_file(path, index_name, _raise_exceptions_for_missing_entries=False, **download_kwargs)
        if index is not None:
            with open(index) as f:
                names = sorted(set(json.load(f)["weight_map"].values()))
        elif cached_file(path, single_name, _raise_exceptions_for_missing_entries=False, **download_kwargs):
            names = [single_name]
        else:
            continue
        return [cached_file(path, name, **download_kwargs) for name in names]
    raise FileNotFoundError(
        f"No weights in {str(path)!r}: expected model.safetensors, pytorch_model.bin, or a sharded index "
        "(model.safetensors.index.json / pytorch_model.bin.index.json)."
    )


def weight_shapes(path, **download_kwargs) -> dict[str, tuple]:
    """Name -> shape of every tensor of the checkpoint at `path` (see `weight_files`): safetensors headers are read
    without loading a tensor; `.bin` files are memory-mapped."""
    shapes = {}
    for file in weight_files(path, **download_kwargs):
        shapes.update(_file_shapes(file))
    return shapes


def _file_shapes(file: str) -> dict[str, tuple]:
    if file.endswith(".safetensors"):
        # A safetensors file starts with the 8-byte little-endian length of a JSON header that lists every tensor's
        # shape: read that alone (the model code imports nothing but torch and transformers).
        with open(file, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        return {name: tuple(entry["shape"]) for name, entry in header.items() if name != "__metadata__"}
    return {
        name: tuple(t.shape) for name, t in torch.load(file, map_location="cpu", weights_only=True, mmap=True).items()
    }


def config_dict_from_official(config_dict: dict, path, download_kwargs: dict, expected: str) -> dict:
    """Our config dict for an official one (see `official_kind`) read from `path`, or `config_dict` unchanged.
    `expected` is the kind the caller's config class holds (`"calm"` or `"autoencoder"`)."""
    kind = official_kind(config_dict)
    if kind is not None and kind != expected:
        raise ValueError(
            _wrong_class_message(path, kind, "CalmConfig" if expected == "calm" else "CalmAutoencoderConfig")
        )
    if kind == "autoencoder":
        return {**autoencoder_config_from_official(config_dict), "architectures": ["CalmAutoencoder"]}
    if kind != "calm":
        return config_dict
    if os.path.isfile(str(path)):
        raise ValueError(
            f"{path} is an official CALM config file: load the folder (or Hub repository) that holds it with its "
            "weights, from which the embedded autoencoder's sizes are read."
        )
    shapes = weight_shapes(path, **download_kwargs)
    if not any(name.startswith("ae_model.") for name in shapes):
        raise ValueError(
            f"The official CALM checkpoint {path!r} holds no embedded autoencoder (ae_model.*), so it cannot be loaded "
            "directly: convert it with `python -m transformers_calm.convert_official --calm <it> --autoencoder "
            "<official autoencoder> --output <folder>`."
        )
    autoencoder = autoencoder_config_from_official(embedded_autoencoder_config(config_dict, shapes))
    return {**calm_config_from_official(config_dict, autoencoder), "architectures": ["CalmForCausalLM"]}


def read_config_dict(path, kwargs: dict) -> dict | None:
    """The raw `config.json` of `path` (a folder or repo id), or None where there is none to read."""
    download_kwargs = hub_kwargs(kwargs)
    if path is None or os.path.isfile(str(path)):  # weights given as a state dict, or a config file
        return None
    try:
        file = cached_file(path, "config.json", _raise_exceptions_for_missing_entries=False, **download_kwargs)
    except OSError:
        return None
    if file is None:
        return None
    with open(file) as f:
        return json.load(f)


def is_official_calm(path, **download_kwargs) -> bool:
    """Whether `path` (a folder or Hub id) holds an official CALM language model as published: the Auto classes
    cannot load it (no `model_type`), `CalmForCausalLM.from_pretrained` can."""
    return official_kind(read_config_dict(path, download_kwargs)) == "calm"


def official_key_mapping(model_class, path, kwargs: dict) -> dict | None:
    """The `key_mapping` that loads `path` into `model_class` when it holds an official checkpoint, else None; an
    official checkpoint that `model_class` cannot hold is a clear error."""
    kind = official_kind(read_config_dict(path, kwargs))
    if kind is None:
        return None
    mapping = model_class._official_key_mapping.get(kind)
    if mapping is None:
        raise ValueError(_wrong_class_message(path, kind, model_class.__name__))
    return mapping


def _names(names: list[str]) -> str:
    shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
    return f"{len(names)} tensors ({shown})" if names else "0 tensors"


def _wrong_class_message(path, kind: str, class_name: str) -> str:
    if kind == "calm":
        return (
            f"{path} holds an official CALM language model: load it with CalmForCausalLM.from_pretrained (its "
            f"autoencoder is the model's `.autoencoder`), not {class_name}."
        )
    return f"{path} holds an official CALM autoencoder: load it with CalmAutoencoder.from_pretrained, not {class_name}."


def load_pretrained(load, model_class, path, args: tuple, kwargs: dict):
    """`model_class.from_pretrained(path, *args, **kwargs)` through transformers' `load` (the parent classmethod). An
    official checkpoint loads through its `key_mapping`; a weight it then lacks is an error, not a line in
    transformers' load report (the mapping does not fit the checkpoint: the weight would be random, the outputs
    wrong). Other checkpoints load exactly as transformers loads them."""
    key_mapping = None
    if kwargs.get("key_mapping") is None:
        key_mapping = official_key_mapping(model_class, path, kwargs)
    if key_mapping is None:
        return load(path, *args, **kwargs)
    output_loading_info = kwargs.pop("output_loading_info", False)
    model, info = load(path, *args, key_mapping=key_mapping, output_loading_info=True, **kwargs)
    missing = sorted(info["missing_keys"])
    # transformers 4.43's Llama saved its rotary table with the weights: a buffer computed from the config here.
    unexpected = sorted(name for name in info["unexpected_keys"] if not name.endswith("rotary_emb.inv_freq"))
    if missing or unexpected:
        raise ValueError(
            f"{model_class.__name__}.from_pretrained({str(path)!r}): this official checkpoint does not match the "
            f"official architecture: {_names(missing)} would be initialised at random (no weights for them), and "
            f"{_names(unexpected)} in it have no place in the model. `python -m transformers_calm.convert_official` "
            "reads the official tensors without this loading path."
        )
    # Saving writes this package's layout, not the official one transformers would restore from the mapping.
    model._weight_conversions = None
    if getattr(model, "generation_config", None) is not None:
        # The official generation_config.json holds the model config's special ids (`_from_model_config`): the
        # sampler's defaults come from our config, as in the converter's copy; a field the file sets stays.
        official = model.generation_config.to_diff_dict()
        model.generation_config = type(model.generation_config).from_model_config(model.config)
        ignored = ("_from_model_config", "transformers_version")
        model.generation_config.update(**{k: v for k, v in official.items() if k not in ignored and v is not None})
    return (model, info) if output_loading_info else model
