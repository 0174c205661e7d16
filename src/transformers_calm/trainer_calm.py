"""`CalmTrainer`: the transformers `Trainer` for [`CalmForCausalLM`] (energy loss, energy terms, BrierLM in eval).

Training is the plain `Trainer` loop on the model's energy loss; every `TrainingArguments` feature keeps working
(gradient accumulation, bf16, gradient checkpointing, DDP, save / resume, `load_best_model_at_end`). What it adds:

- train logs: `energy_fidelity` and `energy_diversity` (energy head), `decoder_loss` and `token_loss` (when the
  config weighs them), averaged over the micro-batches since the previous log and over
  the processes ([`~trainer_logging.LossTermsLoggingMixin`], shared with `CalmAutoencoderTrainer`);
- evaluation (`trainer.evaluate()`, and eval during training): `eval_loss`, `eval_energy_fidelity`,
  `eval_energy_diversity`, `eval_brier1..4`, `eval_brierlm` (the official chunk-aligned BrierLM, see
  [`~brierlm.model_brier_terms`]) and `eval_reconstruction_accuracy` (the frozen autoencoder's token accuracy on the
  eval blocks), so `metric_for_best_model="eval_brierlm"` works.
"""

import contextlib
import hashlib
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import Trainer, TrainingArguments

from .brierlm import MAX_N, brierlm_from_briers, model_brier_terms
from .trainer_logging import LossTermsLoggingMixin
from .trainer_streaming import StreamedTrainingDataMixin

__all__ = ["CalmMetrics", "CalmTrainer", "CalmTrainingArguments", "OfficialTrainingArguments", "block_fingerprints"]

# Columns of the per-block statistics that `CalmTrainer.prediction_step` returns as "predictions" (one row per eval
# block). The Trainer gathers them over processes and drops the blocks that the last batch repeats to even out
# processes (`gather_for_metrics`), then `CalmMetrics` reduces them.
STATISTICS = (
    # The block's batch means (like eval_loss: the Trainer repeats each batch's loss per block): CalmTrainer.loss_terms.
    "energy_fidelity",
    "energy_diversity",
    # The auxiliary losses, when the model has them (CalmConfig.decoder_loss_weight, token_loss_weight).
    "decoder_loss",
    "token_loss",
    *(f"brier{n}_sum" for n in range(1, MAX_N + 1)),  # sums of the per-position Brier-n estimates of the block
    "num_positions",
    "correct_tokens",  # tokens the autoencoder reconstructs
    "num_tokens",
)


def block_fingerprints(input_ids: torch.LongTensor) -> list[int]:
    """A 63-bit hash of the tokens of every block `(batch, T)`.

    `CalmTrainer` seeds the BrierLM draws of an eval block with `(args.seed, fingerprint)` (passed as the block index
    of [`~brierlm.model_brier_terms`]), so a block's draws depend only on its tokens: the metrics do not depend on the
    number of processes, the eval batch size, or the order and selection of the eval blocks.
    """
    rows = input_ids.detach().to("cpu", torch.int64).contiguous().numpy()
    return [int.from_bytes(hashlib.sha256(row.tobytes()).digest()[:8], "little") & (2**63 - 1) for row in rows]


def _as_rows(array) -> torch.Tensor:
    if isinstance(array, torch.Tensor):
        return array.detach().to("cpu", torch.float64)
    return torch.from_numpy(np.asarray(array, dtype=np.float64))


class CalmMetrics:
    """The `compute_metrics` of [`CalmTrainer`]: reduces the per-block statistics of `prediction_step` to
    `energy_fidelity`, `energy_diversity`, `brier1..4`, `brierlm` and `reconstruction_accuracy` (the Trainer adds the
    `eval_` prefix). Also works with `batch_eval_metrics=True` (it then accumulates until `compute_result`).
    """

    # The columns of the table it reduces (`CalmAutoencoderMetrics` reduces another one).
    statistics = STATISTICS

    def __init__(self):
        self._rows = []

    def __call__(self, eval_prediction, compute_result: bool | None = None) -> dict[str, float]:
        """
        Args:
            eval_prediction (`EvalPrediction`): `predictions` is the `(blocks, len(statistics))` table.
            compute_result (`bool`, *optional*): given by the Trainer with `batch_eval_metrics=True` only: `False` to
                accumulate a batch, `True` on the last batch to reduce everything accumulated.
        """
        rows = _as_rows(eval_prediction.predictions).reshape(-1, len(self.statistics))
        if compute_result is None:  # the whole evaluation set at once
            return self.reduce(rows)
        self._rows.append(rows)
        if not compute_result:
            return {}
        rows, self._rows = torch.cat(self._rows), []
        return self.reduce(rows)

    @staticmethod
    def reduce(rows: torch.Tensor) -> dict[str, float]:
        """Metrics of a `(num_blocks, len(STATISTICS))` table."""
        column = {name: rows[:, index] for index, name in enumerate(STATISTICS)}
        num_positions = column["num_positions"].sum().clamp(min=1)
        briers = [float(column[f"brier{n}_sum"].sum() / num_positions) for n in range(1, MAX_N + 1)]
        # The energy terms exist for the energy head only, the auxiliary losses where they are on (other columns: NaN).
        names = ("energy_fidelity", "energy_diversity", "decoder_loss", "token_loss")
        terms = {name: float(column[name].mean()) for name in names}
        metrics = {
            **{name: value for name, value in terms.items() if value == value},
            **{f"brier{n}": value for n, value in enumerate(briers, start=1)},
            "brierlm": brierlm_from_briers(briers),
            "reconstruction_accuracy": float(column["correct_tokens"].sum() / column["num_tokens"].sum().clamp(min=1)),
        }
        return metrics


@dataclass
class CalmTrainingArguments(TrainingArguments):
    """`TrainingArguments` with CALM's one optimiser option. [`CalmTrainer`] also takes plain `TrainingArguments`.

    Args:
        head_learning_rate (`float`, *optional*):
            Peak learning rate of the generative head's parameters (the same schedule as the rest); `None` (the
            official recipe): `learning_rate` for every parameter. Small CALMs learn several times faster per step
            with a head learning rate above the backbone's (docs/small-scale.md measures it).
    """

    head_learning_rate: float | None = field(
        default=None, metadata={"help": "Peak learning rate of the generative head (default: learning_rate)."}
    )

    def __post_init__(self):
        super().__post_init__()
        if self.head_learning_rate is not None and not self.head_learning_rate > 0:
            raise ValueError(f"head_learning_rate must be > 0 (or None: learning_rate), got {self.head_learning_rate}.")


@dataclass
class OfficialTrainingArguments(CalmTrainingArguments):
    """`CalmTrainingArguments` whose defaults are the official CALM runs' optimiser settings: AdamW (0.9, 0.95), weight
    decay 0.1, constant learning rate 3e-4, gradient clipping 1.0, one learning rate for every parameter (no
    `head_learning_rate`). (The official warmup_steps, 1000 for the autoencoder and 2000 for CALM, are ignored by the
    "constant" scheduler, so they are not set.) `calm train` and the example scripts train with them."""

    learning_rate: float = field(default=3e-4)
    adam_beta2: float = field(default=0.95)
    weight_decay: float = field(default=0.1)
    lr_scheduler_type: str = field(default="constant")
    max_grad_norm: float = field(default=1.0)


class CalmTrainer(LossTermsLoggingMixin, StreamedTrainingDataMixin, Trainer):
    """`Trainer` for [`CalmForCausalLM`]: trains on the energy loss and evaluates with BrierLM.

    Takes the arguments of `transformers.Trainer`. Differences:

    - `compute_metrics` defaults to [`CalmMetrics`] (pass your own to replace it; it receives the per-block statistics
      table described in `STATISTICS` as `predictions`, and the blocks' fingerprints as `label_ids`);
    - `compute_loss_func` is not used: the loss is the model's energy loss;
    - batches without `labels` are trained on `labels = input_ids` (the CALM recipe);
    - with [`CalmTrainingArguments`] and `head_learning_rate`, the generative head's parameters get their own peak
      learning rate (each weight-decay group of transformers' optimiser is split in two).

    Train logs gain `energy_fidelity` and `energy_diversity` (energy head), `decoder_loss` and `token_loss` (when the
    model has these auxiliary losses): means over the micro-batches since the previous log and over processes.
    Evaluation returns and logs `eval_loss`, `eval_energy_fidelity`, `eval_energy_diversity`, `eval_decoder_loss`,
    `eval_token_loss` (the same),
    `eval_brier1..4`, `eval_brierlm` and `eval_reconstruction_accuracy`:

    - the energy terms are means over eval batches, like `eval_loss`; the random draws of a batch's loss are seeded
      with `args.seed` and the batch's first block, so they are deterministic for a given eval batch size;
    - BrierLM follows the official protocol: every eval block is scored on its own from its first token, two energy-head
      samples per chunk position decoded by argmax, n-grams starting at chunk boundaries (see
      [`~brierlm.model_brier_terms`]). The draws of a block are seeded with `args.seed` and the block's
      [`block_fingerprints`], so the metrics are deterministic and the same for any number of processes and eval
      batch size. It costs one more backbone pass per eval batch (plus roll-outs when K < 4);
    - `eval_reconstruction_accuracy`: the fraction of eval tokens (all tokens of the blocks, EOS and pads included,
      except those masked out by an `attention_mask`) for which the frozen autoencoder's decoder, applied to the
      posterior mean of the encoder, has the token as its argmax.

    Eval blocks are scored in full: give them a fixed length, a multiple of K, with no padding (as
    [`~data.build_blocks`] makes them). The global RNG state is restored after an evaluation, so evaluating during
    training does not change the training run.
    With `args.prediction_loss_only=True` only `eval_loss` is computed.
    """

    # The energy loss is a per-batch mean: the Trainer must divide it by the gradient-accumulation steps (read by
    # transformers >= 5.23; older 5.x versions decide from `model_accepts_loss_kwargs`, set in `__init__`).
    loss_is_scaled_for_ga = False
    # Output fields of CalmForCausalLM logged beside the loss (LossTermsLoggingMixin).
    loss_terms = ("energy_fidelity", "energy_diversity", "decoder_loss", "token_loss")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # We never pass `num_items_in_batch` to the model (its loss is a per-batch mean), so tell the Trainer, whatever
        # the model's forward signature says; otherwise it would skip the gradient-accumulation scaling.
        self.model_accepts_loss_kwargs = False
        if self.compute_metrics is None:
            self.compute_metrics = CalmMetrics()

    # ------------------------------------------------------------------------------------------------------ training

    def create_optimizer(self, model=None):
        """transformers' optimiser; with `args.head_learning_rate`, the head's parameters in groups of their own at
        that learning rate (the scheduler scales every group's own initial learning rate)."""
        build = self.optimizer is None
        optimizer = super().create_optimizer(model)
        head_lr = getattr(self.args, "head_learning_rate", None)
        if not build or head_lr is None:
            return optimizer
        if head_lr <= 0:
            raise ValueError(f"head_learning_rate must be > 0, got {head_lr}.")
        head = {id(p) for p in self._calm_model(self.model if model is None else model).generative_head.parameters()}
        if not any(id(p) in head for group in optimizer.param_groups for p in group["params"]):
            raise ValueError("head_learning_rate is set, but the generative head has no trainable parameters.")
        groups = []
        for group in optimizer.param_groups:
            for in_head in (False, True):
                params = [p for p in group["params"] if (id(p) in head) == in_head]
                if params:
                    groups.append({**group, "params": params, **({"lr": head_lr} if in_head else {})})
        optimizer.param_groups.clear()
        for group in groups:
            optimizer.add_param_group(group)
        return optimizer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The model's energy loss (a mean over the batch's target chunks); `num_items_in_batch` is not used."""
        if "labels" not in inputs:
            inputs = {**inputs, "labels": inputs["input_ids"]}
        outputs = model(**inputs)
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs[0]
        self._record_loss_terms(model, outputs)
        return (loss, outputs) if return_outputs else loss

    # ---------------------------------------------------------------------------------------------------- evaluation

    def _calm_model(self, model):
        """The `CalmForCausalLM` inside DDP / torch.compile / peft wrappers (peft injects its layers in place)."""
        model = self.accelerator.unwrap_model(model)
        if hasattr(model, "get_base_model"):
            model = model.get_base_model()
        return model

    @contextlib.contextmanager
    def _forked_rng(self):
        """Restore the global RNG state (CPU and the training device) on exit."""
        device = self.args.device
        devices = [device] if device.type not in ("cpu", "meta") else []
        # With no devices only the CPU state is forked; the device type must still be a real one (torch 2.11 rejects
        # None).
        with torch.random.fork_rng(devices=devices, device_type=device.type if devices else "cpu"):
            yield

    def evaluation_loop(self, *args, **kwargs):
        # The eval dataloader and the eval loss draw from the global RNG: restore it afterwards, so that evaluating
        # during training does not change the training run (nor the equality of a resumed and an uninterrupted run).
        with self._forked_rng():
            return super().evaluation_loop(*args, **kwargs)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Loss of a batch of eval blocks and, unless `prediction_loss_only`, its per-block statistics.

        Returns `(loss, statistics, fingerprints)`: `statistics` `(batch, len(STATISTICS))` float64 (the columns of
        `STATISTICS`) and the blocks' [`block_fingerprints`] as labels (the Trainer calls `compute_metrics` only when
        labels are returned).
        """
        inputs = self._prepare_inputs(inputs)
        if "labels" not in inputs:
            inputs = {**inputs, "labels": inputs["input_ids"]}
        input_ids = inputs["input_ids"]
        fingerprints = block_fingerprints(input_ids)
        # The eval loss draws head noise and posterior samples: seed them from the batch, so that it is deterministic.
        seed = int.from_bytes(hashlib.sha256(f"calm-eval:{self.args.seed}:{fingerprints[0]}".encode()).digest()[:8])
        with torch.no_grad(), self._forked_rng():
            torch.manual_seed(seed % 2**63)
            with self.compute_loss_context_manager():
                loss, outputs = self.compute_loss(model, inputs, return_outputs=True)
        loss = loss.detach().mean()
        if prediction_loss_only:
            return loss, None, None

        calm = self._calm_model(model)
        # The model's forward runs under the Trainer's mixed precision (accelerate wraps it); these direct calls of its
        # submodules get the same autocast.
        with torch.no_grad(), self.accelerator.autocast():
            terms = model_brier_terms(calm, input_ids, seed=self.args.seed, block_indices=fingerprints).terms
            mean, _ = calm.encode_chunks(input_ids)
            correct = calm.decode_latents(mean).flatten(-2) == input_ids  # (batch, chunks, K) -> tokens
        scored = torch.ones_like(correct)
        attention_mask = inputs.get("attention_mask")
        if attention_mask is not None and attention_mask.shape == input_ids.shape:
            scored = attention_mask != 0
        batch = input_ids.shape[0]
        statistics = torch.stack(
            [
                *self._loss_term_columns(outputs, batch),
                *terms.double().sum(1).unbind(-1),
                torch.full((batch,), float(terms.shape[1]), dtype=torch.float64, device=terms.device),
                (correct & scored).sum(-1).double(),
                scored.sum(-1).double(),
            ],
            dim=-1,
        )
        labels = torch.tensor(fingerprints, dtype=torch.int64, device=input_ids.device)
        return loss, statistics.to(input_ids.device), labels
