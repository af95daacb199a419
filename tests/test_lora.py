"""LoRA fine-tuning with peft and Trainer: targets, gradient accumulation, adapter save / reload / merge."""

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import Trainer, TrainingArguments

import modeling_transfusion as mt

from conftest import DIGIT_NAMES, build_tiny_config, build_tiny_tokenizer, load_digit_images

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def lora_config(**kwargs) -> LoraConfig:
    """The recipe of docs/finetuning.md: LoRA on the backbone's attention projections, patch layers trained fully."""
    settings = {
        "r": 4,
        "lora_alpha": 8,
        "target_modules": LORA_TARGETS,
        "modules_to_save": ["patch_encoder", "patch_decoder"],
        "task_type": "CAUSAL_LM",
    }
    return LoraConfig(**{**settings, **kwargs})


def digit_records(count: int) -> list[dict]:
    """Captioned real digits, each with a `seed` for its noise (see `SeededNoiseCollator`)."""
    return [
        {"text": f"a handwritten {DIGIT_NAMES[label]} <image>", "images": [image], "seed": index}
        for index, (image, label) in enumerate(load_digit_images(count))
    ]


class SeededNoiseCollator:
    """The project's collator, plus each image's timestep and noise drawn from its record's `seed` (and no condition
    dropout): a record's diffusion target then does not depend on the batch it lands in, so that runs with different
    batch sizes compute the same thing."""

    def __init__(self, processor, config):
        self.collator = mt.TransfusionDataCollator(processor)
        self.latent_shape = (config.latent_channels, config.latent_size, config.latent_size)

    def __call__(self, records):
        batch = self.collator(records)
        generators = [torch.Generator().manual_seed(record["seed"]) for record in records]
        batch["image_timesteps"] = torch.cat([torch.randint(1, 1000, (1,), generator=g) for g in generators])
        batch["image_noise"] = torch.stack([torch.randn(self.latent_shape, generator=g) for g in generators])
        batch["unconditional_images"] = torch.zeros(len(records), dtype=torch.bool)
        return batch


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny base checkpoint (saved, as a user's would be), its processor and config."""
    tokenizer = build_tiny_tokenizer()
    config = build_tiny_config(tokenizer)
    torch.manual_seed(0)
    model = mt.TransfusionForConditionalGeneration(config)
    processor = mt.TransfusionProcessor.from_model_config(config, tokenizer)
    directory = tmp_path_factory.mktemp("base")
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory, processor, config


def training_arguments(output_dir, **kwargs) -> TrainingArguments:
    settings = {
        "output_dir": str(output_dir),
        "remove_unused_columns": False,  # keep pixel_values and the diffusion inputs
        "use_cpu": True,
        "report_to": [],
        "save_strategy": "no",
        "logging_strategy": "no",
        "disable_tqdm": True,
        "seed": 0,
    }
    return TrainingArguments(**{**settings, **kwargs})


@torch.no_grad()
def outputs_on(model, batch):
    out = model.eval()(**{key: value for key, value in batch.items() if key != "labels"})
    return out.logits, out.diffusion_prediction


def test_lora_targets_only_backbone_projections():
    tokenizer = build_tiny_tokenizer()
    vae_config = {
        "latent_channels": 4,
        "block_out_channels": [32, 64],
        "down_block_types": ["DownEncoderBlock2D"] * 2,
        "up_block_types": ["UpDecoderBlock2D"] * 2,
        "layers_per_block": 1,
        "norm_num_groups": 32,
    }
    tiny = build_tiny_config(tokenizer).to_diff_dict()
    tiny.update(vae_config=vae_config, image_size=16, max_image_size=16, num_channels=3, latent_channels=4)
    config = mt.TransfusionConfig.from_dict(tiny)
    model = get_peft_model(mt.TransfusionForConditionalGeneration(config), lora_config())
    lora_modules = {name.rsplit(".lora_A", 1)[0] for name, _ in model.named_parameters() if ".lora_A." in name}
    assert lora_modules and all(
        ".language_model.layers." in name and name.split(".")[-1] in LORA_TARGETS for name in lora_modules
    )
    assert len(lora_modules) == 4 * config.text_config.num_hidden_layers
    trainable = [name for name, parameter in model.named_parameters() if parameter.requires_grad]
    assert all("lora_" in name or ".modules_to_save." in name for name in trainable)
    assert any("patch_encoder.modules_to_save" in name for name in trainable)
    assert any("patch_decoder.modules_to_save" in name for name in trainable)
    assert not any(
        name.startswith("base_model.model.model.vae.") for name in trainable
    )  # the VAE stays frozen, untouched


def test_gradient_accumulation_matches_one_large_batch(base, tmp_path):
    directory, processor, config = base
    records = digit_records(4)
    collator = SeededNoiseCollator(processor, config)

    def updates(batch_size: int, accumulation: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(1)  # the same LoRA initialisation in both runs (B random too, so that A gets gradients)
        model = get_peft_model(
            mt.TransfusionForConditionalGeneration.from_pretrained(directory), lora_config(init_lora_weights=False)
        )
        before = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
        # Plain SGD with lr 1: the update is minus the gradient (Adam's first step would hide a wrong loss scale).
        args = training_arguments(
            tmp_path / f"run{batch_size}",
            per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=accumulation,
            max_steps=1,
            optim="sgd",
            learning_rate=1.0,
            lr_scheduler_type="constant",
            weight_decay=0.0,
            max_grad_norm=0.0,
        )
        Trainer(model=model, args=args, train_dataset=records, data_collator=collator).train()
        return {name: before[name] - p.detach() for name, p in model.named_parameters() if name in before}

    one_batch = updates(batch_size=4, accumulation=1)
    accumulated = updates(batch_size=2, accumulation=2)
    assert one_batch.keys() == accumulated.keys() and len(one_batch) > 0
    largest = max(update.abs().max().item() for update in one_batch.values())
    assert largest > 1e-2  # every record's loss reaches the weights
    for name in one_batch:
        torch.testing.assert_close(accumulated[name], one_batch[name], atol=1e-5 * largest, rtol=1e-4, msg=name)


def test_lora_fine_tune_save_reload_merge(base, tmp_path):
    directory, processor, config = base
    records = digit_records(8)
    collator = SeededNoiseCollator(processor, config)
    probe = collator(records[:2])

    model = get_peft_model(mt.TransfusionForConditionalGeneration.from_pretrained(directory), lora_config())
    base_logits, base_prediction = outputs_on(mt.TransfusionForConditionalGeneration.from_pretrained(directory), probe)
    logits, prediction = outputs_on(model, probe)
    assert torch.equal(logits, base_logits)  # LoRA starts as the identity (B = 0)

    args = training_arguments(tmp_path / "run", per_device_train_batch_size=4, max_steps=4, learning_rate=1e-2)
    Trainer(model=model, args=args, train_dataset=records, data_collator=collator).train()
    tuned_logits, tuned_prediction = outputs_on(model, probe)
    assert not torch.allclose(tuned_logits, base_logits, atol=1e-4)  # the adapter changed the text outputs
    assert not torch.allclose(tuned_prediction, base_prediction, atol=1e-4)  # and the image outputs

    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(
        mt.TransfusionForConditionalGeneration.from_pretrained(directory), tmp_path / "adapter"
    )
    reloaded_logits, reloaded_prediction = outputs_on(reloaded, probe)
    assert torch.equal(reloaded_logits, tuned_logits)  # the saved adapter reproduces the outputs exactly
    assert torch.equal(reloaded_prediction, tuned_prediction)

    merged = reloaded.merge_and_unload()
    assert type(merged) is mt.TransfusionForConditionalGeneration
    assert not any("lora_" in name for name, _ in merged.named_parameters())
    merged_logits, merged_prediction = outputs_on(merged, probe)
    torch.testing.assert_close(merged_logits, tuned_logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(merged_prediction, tuned_prediction, atol=1e-4, rtol=1e-4)

    merged.save_pretrained(tmp_path / "merged")
    restored = mt.TransfusionForConditionalGeneration.from_pretrained(tmp_path / "merged").eval()
    out = restored.generate(
        **processor(text=["a handwritten seven"], return_tensors="pt"),
        generation_mode="image",
        num_inference_steps=3,
        image_guidance_scale=2.0,
        generator=torch.Generator().manual_seed(0),
        return_dict_in_generate=True,
        progress_bar=False,
    )
    image = processor.postprocess_images(out.images)[0][0]
    assert image.size == (config.image_size, config.image_size)
    text = restored.generate(
        **processor(text=["a handwritten"], return_tensors="pt"),
        generation_mode="text",
        max_new_tokens=4,
        do_sample=False,
    )
    assert text.shape[1] == len(processor(text=["a handwritten"])["input_ids"][0]) + 4
