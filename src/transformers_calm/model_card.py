"""Model cards (the README.md of a Hub repository) for CALM checkpoints, written from the model's config.

The package's `save_pretrained` writes one next to the weights when the directory has none, and its `push_to_hub`
uploads it (see `hub.py`, which imports this module). It is package code, not model code: no modeling file imports it,
so it is not copied into the checkpoints.
"""

from huggingface_hub import ModelCard, ModelCardData

CITATION = """\
@article{shao2025calm,
  title   = {Continuous Autoregressive Language Models},
  author  = {Shao, Chenze and Li, Darren and Meng, Fandong and Zhou, Jie},
  journal = {arXiv preprint arXiv:2510.27688},
  year    = {2025}
}"""

# Part of the generic card transformers' own push_to_hub writes when the Hub repository has no README (a repository
# pushed from a remote-code copy of the model, or by the Trainer, may hold it): not a card of its own.
TRANSFORMERS_PLACEHOLDER = "This model card has been automatically generated."

# Metadata of our card that completes a card the repository already has (the license comes with its name and link).
_METADATA_FILLED_ON_MERGE = ("library_name", "pipeline_tag", "license", "base_model")


def _count(n: int) -> str:
    return f"{n:,} ({n / 1e9:.2f}B)" if n >= 1e9 else f"{n:,} ({n / 1e6:.1f}M)"


def _format(value) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def _table(rows) -> str:
    return "\n".join(["| | |", "|---|---|", *(f"| {name} | {value} |" for name, value in rows)])


def _backbone_summary(backbone) -> str:
    """Layers, widths and heads of any decoder config, with transformers' standard names where it has them."""
    fields = (
        ("num_hidden_layers", "{} layers"),
        ("hidden_size", "hidden size {}"),
        ("intermediate_size", "intermediate size {}"),
        ("num_attention_heads", "{} attention heads"),
    )
    parts = [text.format(getattr(backbone, name)) for name, text in fields if getattr(backbone, name, None) is not None]
    if parts and getattr(backbone, "num_key_value_heads", None) is not None:
        parts[-1] += f" ({backbone.num_key_value_heads} key/value heads)"
    return ", ".join(parts) or type(backbone).__name__


HEAD_LOSSES = {"energy": "the energy score", "flow": "flow matching", "diffusion": "a diffusion (DDPM) loss"}


def _calm_details(model) -> tuple[list, str]:
    config, ae, backbone = model.config, model.config.autoencoder_config, model.config.backbone_config
    family = type(backbone).__name__.removesuffix("Config")  # e.g. Llama, Qwen3
    total = model.num_parameters()
    rows = [
        ("Class", f"`{type(model).__name__}`"),
        ("Tokens per step, K (`patch_size`)", config.patch_size),
        ("Latent vector size, l (`latent_size`)", config.latent_size),
        (f"Backbone ({family})", _backbone_summary(backbone)),
        ("Vocabulary", f"{config.vocab_size:,} tokens"),
        ("Context", f"{config.max_chunks:,} chunks = {config.max_tokens:,} tokens"),
        ("Parameters", _count(total)),
        ("Weights", str(model.dtype).replace("torch.", "")),
    ]
    if not hasattr(model, "autoencoder"):  # `CalmModel` (what `AutoModel` loads): compression and backbone only
        summary = (
            "The base model of a CALM language model (Continuous Autoregressive Language Model, "
            "[Shao et al., 2025](https://arxiv.org/abs/2510.27688)): the input compression, which turns each chunk "
            f"of K = {config.patch_size} tokens into one vector, and the {family} backbone that reads those vectors. "
            "It returns one hidden state per chunk; it has no generative head and no autoencoder, so it does not "
            "generate text."
        )
        return rows, summary
    autoencoder = model.autoencoder.num_parameters()
    rows[4:4] = [
        (
            f"Generative head ({config.head_type})",
            f"{config.num_mlp_layers} residual blocks"
            + (f", noise size {config.noise_size}" if config.head_type == "energy" else ""),
        ),
        (
            "Autoencoder (frozen)",
            f"hidden size {ae.hidden_size}, intermediate size {ae.intermediate_size}, "
            f"{ae.num_encoder_layers} encoder / {ae.num_decoder_layers} decoder layers",
        ),
    ]
    rows[-2] = (
        "Parameters",
        f"{_count(total)}: language model {_count(total - autoencoder)} + autoencoder {_count(autoencoder)}",
    )
    summary = (
        "A CALM language model (Continuous Autoregressive Language Model, "
        "[Shao et al., 2025](https://arxiv.org/abs/2510.27688)). Instead of one token per step, it predicts one "
        f"continuous vector per chunk of K = {config.patch_size} tokens: a {family} backbone reads one vector per chunk "
        f"of the context, a generative head ({config.head_type}) turns its last hidden state and random noise into a "
        "sample of the next "
        "chunk's latent vector, and the frozen autoencoder stored in this checkpoint decodes that vector into "
        f"{config.patch_size} tokens. Each generation step therefore emits {config.patch_size} tokens. There is no "
        f"softmax over the vocabulary: the model is trained with {HEAD_LOSSES[config.head_type]}, sampled with a "
        "likelihood-free "
        "temperature algorithm, and scored with BrierLM."
    )
    return rows, summary


def _autoencoder_details(model) -> tuple[list, str]:
    config = model.config
    rows = [
        ("Class", f"`{type(model).__name__}`"),
        ("Tokens per chunk, K (`patch_size`)", config.patch_size),
        ("Latent vector size, l (`latent_size`)", config.latent_size),
        (
            "Layers",
            f"{config.num_encoder_layers} encoder / {config.num_decoder_layers} decoder residual SwiGLU blocks, hidden "
            f"size {config.hidden_size}, intermediate size {config.intermediate_size}, no attention",
        ),
        ("Vocabulary", f"{config.vocab_size:,} tokens"),
        ("Parameters", _count(model.num_parameters())),
        ("Weights", str(model.dtype).replace("torch.", "")),
    ]
    summary = (
        "The chunk autoencoder of CALM (Continuous Autoregressive Language Models, "
        "[Shao et al., 2025](https://arxiv.org/abs/2510.27688)): a variational autoencoder that maps every chunk of "
        f"K = {config.patch_size} tokens to a Gaussian posterior over one vector of size {config.latent_size}, and "
        "decodes such vectors back to tokens. Chunks are encoded independently of each other. A CALM language model "
        "is trained to predict these vectors and keeps a frozen copy of the autoencoder."
    )
    return rows, summary


def _usage(model, model_id: str) -> str:
    if model.config.model_type == "calm" and not hasattr(model, "autoencoder"):
        code = f"""\
import torch
from transformers import AutoModel

model = AutoModel.from_pretrained("{model_id}", trust_remote_code=True)
input_ids = torch.randint(0, model.config.vocab_size, (1, 8 * model.config.patch_size))
hidden = model(input_ids=input_ids).last_hidden_state  # (1, 8, hidden_size): one state per chunk"""
    elif model.config.model_type == "calm":
        code = f"""\
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{model_id}", trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained("{model_id}")  # when the tokenizer files are saved with the model

inputs = tokenizer("The history of", return_tensors="pt")
# temperature in (0, 1]; the CALM authors advise 0.5 or lower for fluent text
output = model.generate(**inputs, max_new_tokens=64, temperature=0.5)
print(tokenizer.decode(output[0], skip_special_tokens=True))"""
    else:
        code = f"""\
import torch
from transformers import AutoModel

autoencoder = AutoModel.from_pretrained("{model_id}", trust_remote_code=True)

input_ids = torch.randint(0, autoencoder.config.vocab_size, (1, 8 * autoencoder.config.patch_size))
mean, log_std = autoencoder.encode(input_ids)        # one posterior per chunk of K tokens
reconstruction = autoencoder.decode_token_ids(mean)  # back to token ids"""
    return (
        f"```python\n{code}\n```\n\n"
        "`trust_remote_code=True` runs the model code stored in this repository (`configuration_*.py`, "
        "`modeling_*.py` and the files they import), so only `transformers` is needed. Where the `transformers-calm` "
        "package is installed and imported, its own classes are used and the flag is not needed."
    )


def create_model_card(
    model,
    *,
    model_name: str | None = None,
    repo_id: str | None = None,
    license: str | None = None,
    base_model: str | list[str] | None = None,
    datasets: str | list[str] | None = None,
    language: str | list[str] | None = None,
    tags: list[str] | None = None,
    results: dict | None = None,
    **card_data,
) -> ModelCard:
    """A model card for a `CalmForCausalLM` or a `CalmAutoencoder`, with Hub metadata and a body written from its
    config (K, latent size, backbone sizes, parameter count), a usage snippet and the paper's citation.

    Args:
        model ([`CalmForCausalLM`] or [`CalmAutoencoder`]):
            The model the card describes.
        model_name (`str`, *optional*):
            Title of the card; defaults to the last part of `repo_id`, or the class name.
        repo_id (`str`, *optional*):
            Hub repository id (or local path) used in the usage snippet; defaults to `model_name`.
        license (`str`, *optional*):
            Hub license identifier (e.g. `"apache-2.0"`, or `"other"` with `license_name` and `license_link`); left
            out when `None`.
        base_model (`str` or `list[str]`, *optional*):
            Hub id(s) of the model(s) this one was converted or fine-tuned from.
        datasets (`str` or `list[str]`, *optional*):
            Hub ids of the training datasets.
        language (`str` or `list[str]`, *optional*):
            Language code(s) of the training text.
        tags (`list[str]`, *optional*):
            Tags added after the default ones (`calm`, `custom_code`, and `text-generation` or `autoencoder`).
        results (`dict`, *optional*):
            Evaluation results to list in a table, e.g. `{"brierlm": 5.72}` or `{"reconstruction_accuracy": 0.999}`.
        card_data:
            Other `huggingface_hub.ModelCardData` fields (e.g. `license_name`, `license_link`, `pipeline_tag`).

    Returns:
        `huggingface_hub.ModelCard`: save it with `card.save("README.md")` or upload it with `card.push_to_hub(...)`.
    """
    is_language_model = model.config.model_type == "calm"
    default_tags = ["calm", "custom_code", "text-generation" if is_language_model else "autoencoder"]
    if is_language_model:
        card_data.setdefault("pipeline_tag", "text-generation")
    data = ModelCardData(
        library_name="transformers",
        license=license,
        base_model=base_model,
        datasets=datasets,
        language=language,
        tags=default_tags + [tag for tag in tags or [] if tag not in default_tags],
        **card_data,
    )
    model_name = model_name or (repo_id.rstrip("/").split("/")[-1] if repo_id else type(model).__name__)
    rows, summary = _calm_details(model) if is_language_model else _autoencoder_details(model)
    sections = [
        f"# {model_name}",
        summary,
        "## Model details",
        _table(rows),
        "## Usage",
        _usage(model, repo_id or model_name),
    ]
    if base_model:
        sources = [base_model] if isinstance(base_model, str) else base_model
        sections.insert(
            2, "Converted or fine-tuned from " + ", ".join(f"[{s}](https://huggingface.co/{s})" for s in sources) + "."
        )
    if results:
        sections += ["## Evaluation results", _table((name, _format(value)) for name, value in results.items())]
    sections += ["## Citation", f"```bibtex\n{CITATION}\n```"]
    body = "\n\n".join(str(section) for section in sections)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}\n")


def merge_model_card(existing: ModelCard | None, generated: ModelCard) -> ModelCard:
    """The card to upload to a Hub repository whose README is `existing`.

    A repository without a card of its own (`existing` is `None` or transformers' generic placeholder) gets
    `generated`. A card written by someone is kept as it is, only completed: tags are merged, and the metadata of
    `generated` it lacks (library name, pipeline tag, license, base model) is added.
    """
    if existing is None or TRANSFORMERS_PLACEHOLDER in existing.text:
        card = ModelCard(str(generated))
    else:
        card = ModelCard(str(existing), ignore_metadata_errors=True)
        for key in _METADATA_FILLED_ON_MERGE:
            if card.data.get(key) is None and generated.data.get(key) is not None:
                card.data[key] = generated.data.get(key)
                if key == "license":
                    card.data.license_name = generated.data.get("license_name")
                    card.data.license_link = generated.data.get("license_link")
    # Tags of both: the repository's own, then ours (with those passed to push_to_hub(tags=...)).
    tags = list(card.data.tags or [])
    for card_tags in (generated.data.tags, existing.data.tags if existing is not None else None):
        tags += [tag for tag in card_tags or [] if tag not in tags]
    card.data.tags = tags
    return card


__all__ = ["CITATION", "create_model_card", "merge_model_card"]
