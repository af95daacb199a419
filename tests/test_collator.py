"""Tests of TransfusionDataCollator, from records to a model loss (and through Trainer)."""

import numpy as np
import PIL.Image
import pytest
import torch
from torch.utils.data import Dataset
from transformers import Trainer, TrainingArguments

from modeling_transfusion import TransfusionDataCollator, TransfusionForConditionalGeneration, TransfusionProcessor

from conftest import DIGIT_NAMES, build_tiny_config, build_tiny_tokenizer

N = 16  # image slots of the tiny config


def mixed_records(digit_images) -> list[dict]:
    (seven, _), (two, _), (three, _), (nine, _) = digit_images[7], digit_images[2], digit_images[3], digit_images[9]
    return [
        {"text": "a handwritten digit seven"},  # text only
        {"text": "a handwritten seven <image>", "images": [seven]},  # caption, then image: generation
        {"text": "<image> a handwritten two", "images": [two]},  # image, then caption: captioning
        {"text": "a three <image> and a nine <image>", "images": [three, nine]},  # two images
    ]


def test_mixed_batch_to_model_loss(processor, tiny_config, digit_images):
    records = mixed_records(digit_images)
    batch = TransfusionDataCollator(processor)(records)
    assert set(batch) == {"input_ids", "attention_mask", "pixel_values", "image_sizes", "labels"}
    input_ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert batch["pixel_values"].shape == (4, 1, 8, 8)

    # -100 exactly on padding and image slots; everything else is a copy of input_ids.
    is_pad, is_slot = mask == 0, input_ids == processor.image_token_id
    assert torch.equal(labels == -100, is_pad | is_slot)
    assert torch.equal(labels[labels != -100], input_ids[labels != -100])
    assert is_slot.sum(-1).tolist() == [0, N, N, 2 * N]
    assert int((labels == -100).sum()) == int(is_pad.sum()) + 4 * N
    assert is_pad.sum(-1).tolist() == [mask.shape[1] - length for length in mask.sum(-1).tolist()]
    # Each row ends with EOS (right padding: just before the padding).
    last = mask.sum(-1) - 1
    assert (input_ids[torch.arange(4), last] == processor.tokenizer.eos_token_id).all()

    torch.manual_seed(0)
    model = TransfusionForConditionalGeneration(tiny_config)
    output = model(**batch)
    assert torch.isfinite(output.loss) and torch.isfinite(output.lm_loss) and torch.isfinite(output.diffusion_loss)
    assert output.diffusion_loss > 0
    torch.testing.assert_close(output.loss, output.lm_loss + tiny_config.diffusion_loss_weight * output.diffusion_loss)
    output.loss.backward()
    assert model.model.patch_encoder.proj.weight.grad.abs().sum() > 0


def test_records_without_text_or_list(processor, digit_images):
    image = digit_images[0][0]
    batch = TransfusionDataCollator(processor)([{"images": image}, {"text": "two", "images": None}])
    ids = batch["input_ids"][0].tolist()
    tokenizer = processor.tokenizer
    assert ids == [tokenizer.bos_token_id, processor.boi_token_id] + [processor.image_token_id] * N + [
        processor.eoi_token_id,
        tokenizer.eos_token_id,
    ]
    assert batch["pixel_values"].shape == (1, 1, 8, 8)


def test_text_only_batch(processor):
    batch = TransfusionDataCollator(processor, add_eos_token=False)([{"text": "a two"}, {"text": "seven"}])
    assert "pixel_values" not in batch
    assert processor.tokenizer.eos_token_id not in batch["input_ids"].tolist()[0]


def test_eos_is_not_doubled_when_the_tokenizer_adds_it(processor):
    from tokenizers import processors

    tokenizer = processor.tokenizer
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", bos), ("</s>", eos)]
    )
    ids = TransfusionDataCollator(processor)([{"text": "a two"}])["input_ids"][0].tolist()
    assert ids[-1] == eos and ids.count(eos) == 1


def test_left_padding_and_multiple(processor, digit_images):
    collator = TransfusionDataCollator(processor, padding_side="left", pad_to_multiple_of=8)
    batch = collator(mixed_records(digit_images))
    assert batch["input_ids"].shape[1] % 8 == 0
    assert (batch["attention_mask"][:, -1] == 1).all()
    assert torch.equal(
        batch["labels"] == -100, (batch["attention_mask"] == 0) | (batch["input_ids"] == processor.image_token_id)
    )


def test_max_length_truncates_without_cutting_images(processor, tiny_config, digit_images):
    records = mixed_records(digit_images)
    collator = TransfusionDataCollator(processor, max_length=N + 8)
    batch = collator(records)
    mask = batch["attention_mask"]
    assert mask.sum(-1).max() <= N + 8
    slots = (batch["input_ids"] == processor.image_token_id).sum(-1).tolist()
    # "a three <image> and a nine <image>": the second image no longer fits and is dropped whole.
    assert slots == [0, N, N, N]
    assert batch["pixel_values"].shape[0] == 3
    assert torch.isfinite(TransfusionForConditionalGeneration(tiny_config)(**batch).loss)


def test_over_long_records_raise_without_max_length(processor, digit_images):
    processor.context_length = 30  # rows 0-2 fit, row 3 (two images) does not
    with pytest.raises(ValueError, match="Row 3 is .* tokens long"):
        TransfusionDataCollator(processor)(mixed_records(digit_images))


@pytest.mark.parametrize(
    ("records", "message"),
    [
        ([], "Got an empty batch"),
        ([{"text": ""}], "Record 0 has neither text"),
        (
            [{"text": "a two"}, {"text": "<image> <image>", "images": ["image"]}],
            r"Row 1 has 2 <image> marker\(s\) but 1",
        ),
        ([{"text": "a two", "images": ["image"]}], r"Row 0 has 0 <image> marker\(s\) but 1 image"),
    ],
)
def test_bad_records(processor, digit_images, records, message):
    records = [
        {**record, "images": [digit_images[0][0] for _ in record["images"]]} if "images" in record else record
        for record in records
    ]
    with pytest.raises(ValueError, match=message):
        TransfusionDataCollator(processor)(records)


def test_collator_arguments_are_checked(processor):
    with pytest.raises(ValueError, match="max_length must be a positive integer"):
        TransfusionDataCollator(processor, max_length=0)
    with pytest.raises(ValueError, match="padding_side must be"):
        TransfusionDataCollator(processor, padding_side="middle")


class DigitCaptions(Dataset):
    """Real digits with captions, half generation (caption first) and half captioning (image first)."""

    def __init__(self, digit_images: list[tuple[PIL.Image.Image, int]]):
        self.items = digit_images

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        image, label = self.items[index]
        caption = f"a handwritten {DIGIT_NAMES[label]}"
        text = f"{caption} <image>" if index % 2 else f"<image> {caption}"
        return {"text": text, "images": [image]}


def test_trainer_runs_with_the_collator(processor, tiny_config, digit_images, tmp_path):
    torch.manual_seed(0)
    model = TransfusionForConditionalGeneration(tiny_config)
    before = model.lm_head.weight.detach().clone()
    arguments = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        max_steps=2,
        learning_rate=1e-2,
        remove_unused_columns=False,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        dataloader_num_workers=0,
        logging_steps=1,
    )
    trainer = Trainer(
        model=model,
        args=arguments,
        train_dataset=DigitCaptions(digit_images),
        data_collator=TransfusionDataCollator(processor),
    )
    result = trainer.train()
    assert result.global_step == 2 and torch.isfinite(torch.tensor(result.training_loss))
    assert not torch.equal(model.lm_head.weight, before)


# Images of any size: a tiny model with max_image_size 16 > image_size 8 (identity VAE, patch 2: an image of h x w
# takes (h / 2) * (w / 2) slots).


def grey_noise(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width), dtype=np.uint8)


def any_size_setup(**config_kwargs):
    tokenizer = build_tiny_tokenizer()
    config = build_tiny_config(tokenizer, image_size=8, max_image_size=16, **config_kwargs)
    return config, TransfusionProcessor.from_model_config(config, tokenizer)


def mixed_size_records() -> list[dict]:
    return [
        {"text": "a seven <image>", "images": [grey_noise(8, 8, 1)]},  # 16 slots
        {"text": "<image> a tall two", "images": [grey_noise(16, 8, 2)]},  # 32 slots
        {"text": "a wide <image> and a big <image>", "images": [grey_noise(8, 16, 3), grey_noise(16, 16, 4)]},
        {"text": "only text"},
    ]


def test_records_of_different_image_sizes(tmp_path):
    config, processor = any_size_setup(image_position_embedding="learned_2d")
    records = mixed_size_records()
    batch = TransfusionDataCollator(processor)(records)
    assert set(batch) == {"input_ids", "attention_mask", "pixel_values", "image_sizes", "labels"}
    assert batch["image_sizes"].tolist() == [[8, 8], [16, 8], [8, 16], [16, 16]]
    assert batch["pixel_values"].shape == (4, 1, 16, 16)  # padded to the largest height and width
    input_ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    is_pad, is_slot = mask == 0, input_ids == processor.image_token_id
    assert is_slot.sum(-1).tolist() == [16, 32, 32 + 64, 0]
    assert torch.equal(labels == -100, is_pad | is_slot)  # -100 on every slot of every size, and on padding
    assert int((labels == -100).sum()) == int(is_pad.sum()) + 16 + 32 + 32 + 64
    assert torch.equal(labels[labels != -100], input_ids[labels != -100])

    # The loss of the padded batch is the loss of the same batch with the images as a list of unpadded tensors.
    image_processor = processor.image_processor
    flat = [image for record in records for image in record.get("images", [])]
    as_list = [torch.from_numpy(image_processor(image)["pixel_values"][0]) for image in flat]
    assert [tuple(image.shape) for image in as_list] == [(1, 8, 8), (1, 16, 8), (1, 8, 16), (1, 16, 16)]
    torch.manual_seed(0)
    model = TransfusionForConditionalGeneration(config).eval()
    with torch.no_grad():  # the diffusion head starts at zero: perturb it so that the prediction depends on the input
        model.model.patch_decoder.proj.weight.normal_(std=0.2)
    timesteps = torch.tensor([100, 300, 600, 900])
    noise = [torch.randn_like(image) for image in as_list]  # identity VAE: latents are the pixels
    fixed = {"image_timesteps": timesteps, "image_noise": noise}
    padded = model(**batch, **fixed)
    listed = model(**{**batch, "pixel_values": as_list}, **fixed)
    without_sizes = {key: value for key, value in batch.items() if key not in ("pixel_values", "image_sizes")}
    listed_alone = model(**without_sizes, pixel_values=as_list, **fixed)
    for output in (padded, listed, listed_alone):
        assert torch.isfinite(output.loss) and output.diffusion_loss > 0
    for name in ("loss", "lm_loss", "diffusion_loss"):
        torch.testing.assert_close(getattr(padded, name), getattr(listed, name), atol=1e-6, rtol=0)
        torch.testing.assert_close(getattr(padded, name), getattr(listed_alone, name), atol=1e-6, rtol=0)
    torch.testing.assert_close(padded.loss, padded.lm_loss + config.diffusion_loss_weight * padded.diffusion_loss)

    # With the timesteps and noise drawn by the model (same seed), too, and in training mode.
    model.train()
    losses = []
    for inputs in ({**batch}, {**batch, "pixel_values": as_list}):
        torch.manual_seed(1)
        losses.append(model(**inputs).loss)
    assert torch.isfinite(losses[0])
    torch.testing.assert_close(losses[0], losses[1], atol=1e-6, rtol=0)
    losses[0].backward()
    assert model.model.patch_position_embedding.row_embedding.weight.grad.abs().sum() > 0


def test_max_length_drops_a_whole_image_of_another_size():
    config, processor = any_size_setup()
    records = mixed_size_records()
    # Row 2 is "a wide <image> and a big <image>" + EOS: its 16x16 image (66 tokens) does not fit in 60.
    batch = TransfusionDataCollator(processor, max_length=60)(records)
    assert batch["attention_mask"].sum(-1).max() <= 60
    assert (batch["input_ids"] == processor.image_token_id).sum(-1).tolist() == [16, 32, 32, 0]
    assert batch["image_sizes"].tolist() == [[8, 8], [16, 8], [8, 16]]
    assert batch["pixel_values"].shape == (3, 1, 16, 16)
    assert torch.isfinite(TransfusionForConditionalGeneration(config)(**batch).loss)
