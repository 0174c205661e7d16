"""`CalmAutoencoderTrainer`: the transformers `Trainer` for [`CalmAutoencoder`] (loss terms and reconstruction
accuracy in the logs and in eval), and [`evaluate_reconstruction`], the held-out reconstruction accuracy of documents.

Training is the plain `Trainer` loop on the autoencoder's loss (`K * reconstruction_loss + kl_weight * kl_loss`);
every `TrainingArguments` feature keeps working. What it adds, symmetric to `CalmTrainer`:

- train logs: `reconstruction_loss`, `kl_loss` and `reconstruction_accuracy` (of the training forward: DropToken,
  posterior sample, DropLatent), averaged over the micro-batches since the previous log and over the processes
  ([`~trainer_logging.LossTermsLoggingMixin`], shared with `CalmTrainer`);
- evaluation (`trainer.evaluate()`, and eval during training; the model decodes the posterior mean, no dropout):
  `eval_loss`, `eval_reconstruction_loss`, `eval_kl_loss` (means over eval batches, like `eval_loss`),
  `eval_perplexity` (exp of `eval_reconstruction_loss`, as the official script logs), and, counted over the whole
  evaluation set, `eval_reconstruction_accuracy` (labelled tokens whose argmax decoding is right) and
  `eval_chunk_accuracy` (chunks whose labelled tokens are all right).
"""

import math
from itertools import chain

import torch
from tqdm.auto import tqdm
from transformers import Trainer

from .data import documents_to_ids
from .trainer_calm import CalmMetrics
from .trainer_logging import LossTermsLoggingMixin
from .trainer_streaming import StreamedTrainingDataMixin

__all__ = ["AUTOENCODER_STATISTICS", "CalmAutoencoderMetrics", "CalmAutoencoderTrainer", "evaluate_reconstruction"]

# Output fields of CalmAutoencoder that are losses: logged in train and eval as batch means.
_LOSS_FIELDS = ("reconstruction_loss", "kl_loss")
# Columns of the per-block statistics that `CalmAutoencoderTrainer.prediction_step` returns as "predictions" (one row
# per eval block); the Trainer gathers them over processes (dropping the blocks repeated to even out processes) and
# `CalmAutoencoderMetrics` reduces them.
AUTOENCODER_STATISTICS = (
    *_LOSS_FIELDS,  # the block's batch means (like eval_loss: the Trainer repeats each batch's loss per block)
    "correct_tokens",  # labelled tokens whose argmax decoding is the label
    "num_tokens",  # labelled tokens (labels -100 and attention_mask 0 excluded)
    "correct_chunks",  # chunks with a labelled token whose labelled tokens are all right
    "num_chunks",  # chunks with a labelled token
)


class CalmAutoencoderMetrics(CalmMetrics):
    """The `compute_metrics` of [`CalmAutoencoderTrainer`]: reduces the per-block statistics of `prediction_step` to
    `reconstruction_loss`, `kl_loss`, `perplexity`, `reconstruction_accuracy` and `chunk_accuracy` (the Trainer adds
    the `eval_` prefix). Also works with `batch_eval_metrics=True` (it then accumulates until `compute_result`).
    """

    statistics = AUTOENCODER_STATISTICS

    @staticmethod
    def reduce(rows: torch.Tensor) -> dict[str, float]:
        """Metrics of a `(num_blocks, len(AUTOENCODER_STATISTICS))` table."""
        column = {name: rows[:, index] for index, name in enumerate(AUTOENCODER_STATISTICS)}
        reconstruction_loss = float(column["reconstruction_loss"].mean())
        return {
            "reconstruction_loss": reconstruction_loss,
            "kl_loss": float(column["kl_loss"].mean()),
            "perplexity": math.exp(min(reconstruction_loss, 50.0)),
            "reconstruction_accuracy": float(column["correct_tokens"].sum() / column["num_tokens"].sum().clamp(min=1)),
            "chunk_accuracy": float(column["correct_chunks"].sum() / column["num_chunks"].sum().clamp(min=1)),
        }


class CalmAutoencoderTrainer(LossTermsLoggingMixin, StreamedTrainingDataMixin, Trainer):
    """`Trainer` for [`CalmAutoencoder`]: logs the terms of its loss and its reconstruction accuracy.

    Takes the arguments of `transformers.Trainer`; `compute_metrics` defaults to [`CalmAutoencoderMetrics`] (pass
    your own to replace it; it receives the per-block statistics table described in `AUTOENCODER_STATISTICS` as
    `predictions`, and the number of labelled tokens of each block as `label_ids`).

    Train logs gain `reconstruction_loss`, `kl_loss` and `reconstruction_accuracy` (means over the micro-batches since
    the previous log and over processes, of the training forward). Evaluation returns and logs `eval_loss`,
    `eval_reconstruction_loss`, `eval_kl_loss`, `eval_perplexity`, `eval_reconstruction_accuracy` and
    `eval_chunk_accuracy` (see the module docstring). In eval mode the model decodes the posterior mean, with no
    dropout, so evaluation is deterministic. With `args.prediction_loss_only=True` only `eval_loss` is computed.
    """

    # `CalmAutoencoder.forward` returns a per-batch mean and takes no `num_items_in_batch`, so the Trainer must divide
    # the loss by the gradient-accumulation steps. It does so when `model_accepts_loss_kwargs` is False, which it
    # infers from the absence of `**kwargs` in `forward`; we also say it outright (attribute read by transformers
    # >= 5.23, ignored by older versions) and check the inference in `__init__`.
    loss_is_scaled_for_ga = False
    # Output fields of CalmAutoencoder logged beside the loss in train (LossTermsLoggingMixin).
    loss_terms = (*_LOSS_FIELDS, "reconstruction_accuracy")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.model_accepts_loss_kwargs:
            raise ValueError(
                "The Trainer would pass num_items_in_batch to CalmAutoencoder and skip the gradient-accumulation "
                "scaling of its per-batch mean loss; set `accepts_loss_kwargs = False` on the model."
            )
        if self.compute_metrics is None:
            self.compute_metrics = CalmAutoencoderMetrics()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """`Trainer.compute_loss` (the model's loss); the loss terms of a training forward go to the next train log.

        Args:
            model (`nn.Module`): the (wrapped) model.
            inputs (`dict`): the batch.
            return_outputs (`bool`, *optional*, defaults to `False`): also return the model's outputs.
            num_items_in_batch (`int`, *optional*): as in `Trainer.compute_loss` (not passed to the model).
        """
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        self._record_loss_terms(model, outputs)
        return (loss, outputs) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Loss of a batch of eval blocks and, unless `prediction_loss_only`, its per-block statistics.

        Returns `(loss, statistics, num_tokens)`: `statistics` `(batch, len(AUTOENCODER_STATISTICS))` float64 (the
        columns of `AUTOENCODER_STATISTICS`) and the number of labelled tokens of each block as labels (the Trainer
        calls `compute_metrics` only when labels are returned).
        """
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss, outputs = self.compute_loss(model, inputs, return_outputs=True)
        loss = loss.detach().mean()
        if prediction_loss_only:
            return loss, None, None

        input_ids = inputs["input_ids"]
        labels = inputs.get("labels")
        labels = input_ids if labels is None else labels
        attention_mask = inputs.get("attention_mask")
        if attention_mask is not None:  # as the model does
            labels = labels.masked_fill(attention_mask == 0, -100)
        with torch.no_grad():
            labelled = labels != -100
            correct = (outputs["logits"].argmax(-1) == labels) & labelled
            patch_size = self.accelerator.unwrap_model(model).config.patch_size
            chunk_labelled = labelled.unflatten(1, (-1, patch_size)).any(-1)
            chunk_correct = (correct | ~labelled).unflatten(1, (-1, patch_size)).all(-1) & chunk_labelled
            num_tokens = labelled.sum(-1)
            statistics = torch.stack(
                [
                    *self._loss_term_columns(outputs, input_ids.shape[0], _LOSS_FIELDS),
                    correct.sum(-1).double(),
                    num_tokens.double(),
                    chunk_correct.sum(-1).double(),
                    chunk_labelled.sum(-1).double(),
                ],
                dim=-1,
            )
        return loss, statistics.to(input_ids.device), num_tokens


@torch.no_grad()
def evaluate_reconstruction(model, tokenizer, texts, block_size=2048, batch_size=8, show_progress=True) -> dict:
    """Reconstruction accuracy of an autoencoder on held-out documents (eval mode: the posterior mean is decoded).

    Documents are prepared as in training (tokenizer ids + EOS, right-padded to a multiple of K), but nothing is
    dropped: the autoencoder is context-free, so the chunks can be packed in any order and the last block is filled
    with pad chunks that are not scored.

    Args:
        model ([`CalmAutoencoder`]): the autoencoder (left in the train / eval mode it had).
        tokenizer (`PreTrainedTokenizerBase`): its tokenizer, with a pad token.
        texts (`Iterable[str]`): the documents.
        block_size (`int`, *optional*, defaults to 2048): tokens per encoded row, a multiple of K.
        batch_size (`int`, *optional*, defaults to 8): rows per forward.
        show_progress (`bool`, *optional*, defaults to `True`): show a progress bar.

    Returns:
        `dict` with `token_accuracy` (over document tokens, BOS/EOS included, alignment pads excluded),
        `chunk_accuracy` (chunks whose K decoded tokens, alignment pads included, all equal the input), and the
        counts `num_documents`, `num_tokens`, `num_chunks`.
    """
    patch_size = model.config.patch_size
    if block_size % patch_size:
        raise ValueError(f"block_size ({block_size}) must be a multiple of patch_size ({patch_size}).")
    documents, lengths = documents_to_ids(list(texts), tokenizer, patch_size, return_lengths=True)
    ids = list(chain.from_iterable(documents))
    is_token = list(
        chain.from_iterable([True] * n + [False] * (len(d) - n) for d, n in zip(documents, lengths, strict=True))
    )
    num_chunks = len(ids) // patch_size
    fill = -len(ids) % block_size
    ids = torch.tensor(ids + [tokenizer.pad_token_id] * fill).view(-1, block_size)
    is_token = torch.tensor(is_token + [False] * fill).view(-1, block_size)

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = torch.empty_like(ids, dtype=torch.bool)
    for start in tqdm(range(0, len(ids), batch_size), desc="Reconstructing", disable=not show_progress):
        batch = ids[start : start + batch_size].to(device)
        mean, _ = model.encode(batch)
        correct[start : start + batch_size] = (model.decode_token_ids(mean) == batch).cpu()
    model.train(was_training)
    # The chunks of the fill come after every document chunk; they are not scored.
    chunk_correct = correct.view(-1, patch_size).all(-1)[:num_chunks]
    num_tokens = int(is_token.sum())
    return {
        "token_accuracy": int((correct & is_token).sum()) / max(num_tokens, 1),
        "chunk_accuracy": int(chunk_correct.sum()) / max(num_chunks, 1),
        "num_documents": len(documents),
        "num_tokens": num_tokens,
        "num_chunks": num_chunks,
    }
