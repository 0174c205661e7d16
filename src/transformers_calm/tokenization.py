"""A tokenizer for a new CALM, trained on your text: byte-level BPE (GPT-2 / Llama-3 style) that prepends BOS.

CALM's autoencoder is trained with its tokenizer and keeps it for life (the vocabulary, the special tokens and K
define the model), so a new model usually starts by training one. `<pad>` gets id 0: the autoencoder's DropToken
writes id 0 in place of a dropped token, as the official code does, and so writes the pad token rather than a word.
"""

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")


def train_tokenizer(
    texts: Iterable[str], vocab_size: int = 4096, length: int | None = None, show_progress: bool = True
) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on `texts` (every byte encodable: no unknown tokens), with `<pad>` (id 0),
    `<s>` (BOS, prepended to every text) and `</s>` (EOS).

    Args:
        texts (`Iterable[str]`): the training documents (a list, or any iterator, e.g. a `datasets` column).
        vocab_size (`int`, *optional*, defaults to 4096): vocabulary size, special tokens included.
        length (`int`, *optional*): the number of texts, for the progress bar when `texts` is an iterator.
        show_progress (`bool`, *optional*, defaults to `True`): show the trainer's progress bar.

    Returns:
        [`~transformers.PreTrainedTokenizerFast`]; `save_pretrained` it beside the models.
    """
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(
            f"vocab_size must hold the 256 bytes and {len(SPECIAL_TOKENS)} special tokens, got {vocab_size}."
        )
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    backend.train_from_iterator(texts, trainer, length=length if length is not None else _length(texts))
    bos = SPECIAL_TOKENS[1]
    backend.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, backend.token_to_id(bos))]
            ),
        ]
    )
    pad, bos, eos = SPECIAL_TOKENS
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos, eos_token=eos, pad_token=pad)


def _length(texts) -> int | None:
    try:
        return len(texts)
    except TypeError:
        return None


__all__ = ["SPECIAL_TOKENS", "train_tokenizer"]
