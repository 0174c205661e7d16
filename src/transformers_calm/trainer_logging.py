"""The one way both CALM trainers log the terms of their models' losses (`CalmTrainer`: the energy terms;
`CalmAutoencoderTrainer`: reconstruction loss, KL and token accuracy)."""

import torch

__all__ = ["LossTermsLoggingMixin"]


class LossTermsLoggingMixin:
    """Mixin for a `transformers.Trainer` subclass (before `Trainer` among its bases): the fields of the model's
    outputs named in `loss_terms` are logged beside the loss.

    - Train logs (the periodic ones, which have a `loss`) gain each field, averaged over the micro-batches since the
      previous log and over the processes (each micro-batch counts once, whatever its size). The subclass's
      `compute_loss` hands every forward's outputs to [`_record_loss_terms`]; the sums stay on the device until the
      log, so there is no synchronisation per step.
    - Evaluation: [`_loss_term_columns`] repeats each field's batch mean once per sample of the batch, as the
      Trainer does with `eval_loss`, for a `prediction_step` that returns per-sample statistics: their mean over the
      evaluation set is then the mean over eval batches weighted by batch size, like `eval_loss`.
    """

    # Fields of the model's outputs (a `ModelOutput` / dict) to log; each a tensor whose mean is the batch's value.
    loss_terms: tuple[str, ...] = ()
    # Per field, its sum and the number of micro-batches that had it, since the previous train log (a float32 tensor
    # `(2, len(loss_terms))`), or None.
    _loss_term_sums: torch.Tensor | None = None

    def _record_loss_terms(self, model, outputs) -> None:
        """Add the `loss_terms` of a training forward's `outputs` to the sums of the next train log (nothing in eval
        mode). A field the outputs lack (e.g. the energy terms of a flow head) is not counted for this micro-batch."""
        if not model.training or not isinstance(outputs, dict):
            return
        values = [outputs.get(name) for name in self.loss_terms]
        present = [value for value in values if value is not None]
        if not present:
            return
        zero, one = torch.zeros((), device=present[0].device), torch.ones((), device=present[0].device)
        terms = torch.stack(
            [
                torch.stack([zero if value is None else value.detach().float().mean() for value in values]),
                torch.stack([zero if value is None else one for value in values]),
            ]
        )
        self._loss_term_sums = terms if self._loss_term_sums is None else self._loss_term_sums + terms

    def _loss_term_columns(self, outputs, batch_size: int, names: tuple[str, ...] | None = None) -> list[torch.Tensor]:
        """The batch mean of each of the `loss_terms` of `outputs` (or of `names`), repeated `batch_size` times
        (float64); NaN for a term the outputs do not have."""
        columns = []
        for name in names or self.loss_terms:
            value = outputs.get(name)
            if value is None:  # a term this model's head does not have (e.g. the energy terms of a flow head): NaN
                value = torch.full((), float("nan"), device=outputs["loss"].device)
            columns.append(value.detach().double().mean().expand(batch_size))
        return columns

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Adds the `loss_terms` to the periodic train logs (those with a `loss`), then logs as `Trainer.log`.

        Args:
            logs (`dict[str, float]`): the values to log.
            start_time (`float`, *optional*): as in `Trainer.log`.
        """
        # The Trainer makes these logs on every process at the same step, so the reduction below runs in lockstep.
        if "loss" in logs and self._loss_term_sums is not None:
            sums, counts = self.accelerator.reduce(self._loss_term_sums, reduction="sum").tolist()
            for name, total, count in zip(self.loss_terms, sums, counts, strict=True):
                if count:
                    logs[name] = total / count
            self._loss_term_sums = None
        super().log(logs, start_time)
