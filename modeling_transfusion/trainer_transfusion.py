"""`Trainer` for Transfusion: the two terms of the loss, `lm_loss` and `diffusion_loss`, logged beside `loss`."""

import torch
from transformers import Trainer

# The terms of `loss = lm_loss + config.diffusion_loss_weight * diffusion_loss`, as the model's output names them.
LOSS_TERMS = ("lm_loss", "diffusion_loss")


class TransfusionTrainer(Trainer):
    r"""
    `transformers.Trainer` that also logs the two terms of Transfusion's loss, so that one can tell whether text or
    images are learning: `lm_loss` and `diffusion_loss` in training, averaged over the steps since the last log as
    `loss` is; `eval_lm_loss` and `eval_diffusion_loss` in evaluation (`{metric_key_prefix}_...`), averaged over the
    evaluation batches as `eval_loss` is. They go wherever `loss` goes: `state.log_history`, the progress bar, the
    reporting callbacks (TensorBoard, W&B, ...) and the metrics `evaluate()` returns.

    It takes `Trainer`'s arguments and does everything else as `Trainer` does. (A callback could not do this: callbacks
    see the logs after `state.log_history` has recorded them, and after the reporting callbacks, which come first.)
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Per split: the sums of the terms (weighted, on the model's device) and of their weights.
        self._loss_terms = {"train": [None, 0], "eval": [None, 0]}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """As `Trainer.compute_loss`, also adding the output's `lm_loss` and `diffusion_loss` to the running sums: one
        weight per step in training, the batch size in evaluation (as `eval_loss` weighs its batches)."""
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if all(outputs.get(name) is not None for name in LOSS_TERMS):
            split = "train" if model.training else "eval"
            weight = 1 if model.training else outputs["logits"].shape[0]
            terms = torch.stack([outputs[name].detach().float() for name in LOSS_TERMS]) * weight
            sums = self._loss_terms[split]
            sums[0] = terms if sums[0] is None else sums[0] + terms
            sums[1] += weight
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        """As `Trainer.log`; a training log (one with `loss`) gets `lm_loss` and `diffusion_loss` too."""
        if "loss" in logs:
            logs.update(self._mean_loss_terms("train"))
        super().log(logs, *args, **kwargs)

    def evaluation_loop(
        self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"
    ):
        """As `Trainer.evaluation_loop`, with `{metric_key_prefix}_lm_loss` and `..._diffusion_loss` in the metrics."""
        self._loss_terms["eval"] = [None, 0]
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        terms = self._mean_loss_terms("eval")
        output.metrics.update({f"{metric_key_prefix}_{name}": value for name, value in terms.items()})
        return output

    def _mean_loss_terms(self, split: str) -> dict[str, float]:
        """The mean of each term since the sums of `split` were last read (averaged over processes), and a reset."""
        sums, weight = self._loss_terms[split]
        self._loss_terms[split] = [None, 0]
        if sums is None:
            return {}
        means = self.accelerator.reduce(sums / weight, reduction="mean")
        return dict(zip(LOSS_TERMS, means.tolist()))


__all__ = ["TransfusionTrainer"]
