"""TransfusionTrainer: the loss split (`lm_loss`, `diffusion_loss`) in Trainer's logs, in training and evaluation, on
the documented fine-tuning path (LoRA, the collator, gradient accumulation)."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import TrainerCallback, TrainingArguments

from modeling_transfusion import TransfusionDataCollator, TransfusionForConditionalGeneration, TransfusionTrainer

from conftest import DIGIT_NAMES


class SeenLogs(TrainerCallback):
    """What a reporting callback (TensorBoard, W&B, ...) receives in `on_log`."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


def records(digit_images) -> list[dict]:
    """Captioned digits as an image-text dataset has them, and some text-only rows."""
    captioned = [{"caption": f"a handwritten {DIGIT_NAMES[label]}", "image": image} for image, label in digit_images]
    return captioned + [{"text": f"the digit {name}"} for name in DIGIT_NAMES[:4]]


@pytest.fixture
def run(processor, tiny_config, digit_images, tmp_path):
    """LoRA fine-tuning with TransfusionTrainer on 14 records: 4 steps of 2 micro-batches of 7, logged every 2 steps,
    evaluated at the end; each forward's loss terms recorded by a hook."""
    torch.manual_seed(0)
    model = TransfusionForConditionalGeneration(tiny_config)
    model = get_peft_model(
        model,
        LoraConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["patch_encoder", "patch_decoder"]),
    )
    forwards = []
    model.base_model.model.register_forward_hook(
        lambda module, args, output: forwards.append(
            (module.training, output.loss.item(), output.lm_loss.item(), output.diffusion_loss.item())
        )
    )
    seen = SeenLogs()
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=7,
        per_device_eval_batch_size=5,
        gradient_accumulation_steps=2,
        max_steps=4,
        logging_steps=2,
        eval_strategy="steps",
        eval_steps=4,
        learning_rate=1e-3,
        remove_unused_columns=False,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    data = records(digit_images)
    trainer = TransfusionTrainer(
        model=model,
        args=args,
        train_dataset=data,
        eval_dataset=data[:7],
        data_collator=TransfusionDataCollator(processor),
        callbacks=[seen],
    )
    trainer.train()
    return trainer, forwards, seen, tiny_config.diffusion_loss_weight


def test_training_logs_hold_the_loss_split(run):
    trainer, forwards, seen, weight = run
    train_logs = [log for log in trainer.state.log_history if "loss" in log]
    assert [log["step"] for log in train_logs] == [2, 4]
    training_forwards = [forward for forward in forwards if forward[0]]
    assert len(training_forwards) == 8  # 4 steps x 2 micro-batches
    for index, log in enumerate(train_logs):
        window = training_forwards[4 * index : 4 * (index + 1)]  # the 2 steps x 2 micro-batches since the last log
        for position, name in ((1, "loss"), (2, "lm_loss"), (3, "diffusion_loss")):
            assert log[name] == pytest.approx(sum(forward[position] for forward in window) / 4, rel=1e-5), name
        assert log["diffusion_loss"] > 0.1  # the images train
        assert log["loss"] == pytest.approx(log["lm_loss"] + weight * log["diffusion_loss"], rel=1e-5)
    # The callbacks (the reporting integrations among them) get the terms too.
    assert [log.get("lm_loss") for log in seen.logs if "loss" in log] == [log["lm_loss"] for log in train_logs]


def test_evaluation_logs_and_metrics_hold_the_loss_split(run):
    trainer, forwards, seen, weight = run
    (log,) = [log for log in trainer.state.log_history if "eval_loss" in log]
    evaluation_forwards = [forward for forward in forwards if not forward[0]]
    assert len(evaluation_forwards) == 2  # 7 records in batches of 5 and 2: the terms are weighted by batch size
    for position, name in ((1, "eval_loss"), (2, "eval_lm_loss"), (3, "eval_diffusion_loss")):
        expected = (5 * evaluation_forwards[0][position] + 2 * evaluation_forwards[1][position]) / 7
        assert log[name] == pytest.approx(expected, rel=1e-5), name
    assert log["eval_loss"] == pytest.approx(log["eval_lm_loss"] + weight * log["eval_diffusion_loss"], rel=1e-5)
    assert any("eval_diffusion_loss" in log for log in seen.logs)

    metrics = trainer.evaluate(metric_key_prefix="held_out")
    assert metrics["held_out_loss"] == pytest.approx(
        metrics["held_out_lm_loss"] + weight * metrics["held_out_diffusion_loss"], rel=1e-5
    )
