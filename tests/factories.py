"""The tiny models every test module builds (importable as `factories`: pytest puts tests/ on sys.path).

One place decides what "tiny" means, so that a change of the config layout is one change here. Sizes are CPU
milliseconds per step; each test passes the overrides it needs (K, vocabulary, special tokens, backbone family).
"""

import json
import math
import os

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from transformers_calm import CalmAutoencoder, CalmAutoencoderConfig, CalmConfig, CalmForCausalLM

WIKITEXT = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "wikitext_document_level-test.json"
)
# The autoencoder holds K (`patch_size`), l (`latent_size`), the vocabulary and the special tokens of a CALM model.
TINY_AUTOENCODER = {"vocab_size": 97, "patch_size": 4, "latent_size": 8, "hidden_size": 32, "intermediate_size": 48}
# Fields of the backbone's transformers config (Llama by default).
TINY_BACKBONE = {
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}
# CALM's own fields: energy head and loss.
TINY_HEAD = {"num_mlp_layers": 2, "noise_size": 8, "num_samples": 4, "num_targets": 16}


def tiny_autoencoder_config(**overrides) -> CalmAutoencoderConfig:
    return CalmAutoencoderConfig(**{**TINY_AUTOENCODER, **overrides})


def tiny_autoencoder(seed: int = 0, **overrides) -> CalmAutoencoder:
    """A seeded `CalmAutoencoder` in eval mode."""
    torch.manual_seed(seed)
    return CalmAutoencoder(tiny_autoencoder_config(**overrides)).eval()


def tiny_calm_config(
    autoencoder: dict | None = None, backbone: dict | None = None, backbone_type: str = "llama", **head
) -> CalmConfig:
    """A `CalmConfig`: `autoencoder` overrides `TINY_AUTOENCODER` (K, l, vocabulary, special tokens), `backbone` the
    backbone fields of `TINY_BACKBONE` (e.g. `max_position_embeddings`), `backbone_type` the transformers model type of
    the backbone, `head` the head and loss fields of `TINY_HEAD`."""
    ae = {**TINY_AUTOENCODER, **(autoencoder or {})}
    return CalmConfig(
        backbone_config={"model_type": backbone_type, **TINY_BACKBONE, **(backbone or {})},
        autoencoder_config=ae,
        **{**TINY_HEAD, **head},
    )


def randomize_head(model: CalmForCausalLM, weight_std: float = 0.5, bias_std: float = 0.5) -> CalmForCausalLM:
    """The head's output layer starts at zero (every sample is the same latent, and no gradient reaches the backbone
    on the first step): give it random weights, so that samples differ."""
    with torch.no_grad():
        last = model.generative_head.final_layer.linears[-1]
        last.weight.normal_(0.0, weight_std)
        last.bias.normal_(0.0, bias_std)
    return model


def scale_head(model: CalmForCausalLM, gain: float) -> CalmForCausalLM:
    """Every linear layer of the head drawn with std `gain / sqrt(fan_in)`: a head whose samples depend strongly on
    the context and on the noise (the generation tests need both)."""
    with torch.no_grad():
        for module in model.generative_head.modules():
            if isinstance(module, torch.nn.Linear):
                torch.nn.init.normal_(module.weight, std=gain / math.sqrt(module.in_features))
    return model


def tiny_calm(
    seed: int = 0,
    autoencoder: dict | None = None,
    backbone: dict | None = None,
    backbone_type: str = "llama",
    random_head: bool = True,
    **head,
) -> CalmForCausalLM:
    """A seeded `CalmForCausalLM` in eval mode (see [`tiny_calm_config`]); `random_head` gives the head's output layer
    random weights ([`randomize_head`])."""
    torch.manual_seed(seed)
    model = CalmForCausalLM(tiny_calm_config(autoencoder, backbone, backbone_type, **head))
    if random_head:
        randomize_head(model)
    return model.eval()


def random_ids(batch: int, length: int, vocab_size: int = TINY_AUTOENCODER["vocab_size"], low: int = 1, seed: int = 0):
    """Random token ids `(batch, length)` in `[low, vocab_size)` (by default no id 0, the tests' pad)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(low, vocab_size, (batch, length), generator=generator)


def documents(count, skip=0, chars=1500) -> list[str]:
    """The first `chars` characters of `count` documents of the bundled WikiText-103 test set, from `skip` on."""
    with open(WIKITEXT, encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f if line.strip()]
    return [text[:chars] for text in texts[skip : skip + count]]


def word_tokenizer(texts, pad=True) -> PreTrainedTokenizerFast:
    """A word-level tokenizer that prepends BOS, as the Llama-3 tokenizer does; ids 0..3 are the special tokens."""
    specials = ["<pad>", "<s>", "</s>", "<unk>"] if pad else ["<s>", "</s>", "<unk>"]
    backend = Tokenizer(models.WordLevel(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.train_from_iterator(texts, trainers.WordLevelTrainer(vocab_size=300, special_tokens=specials))
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", backend.token_to_id("<s>"))]
    )
    extra = {"pad_token": "<pad>"} if pad else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", **extra
    )
