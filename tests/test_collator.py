"""Tests of TransfusionDataCollator, from records to a model loss (and through Trainer)."""

import datasets
import numpy as np
import PIL.Image
import pytest
import torch
from torch.utils.data import Dataset
from transformers import Trainer, TrainingArguments

from modeling_transfusion import (
    TransfusionDataCollator,
    TransfusionForConditionalGeneration,
    TransfusionProcessor,
    TransfusionTrainer,
)

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
        ([{"text": "a two", "image": ["image"], "images": ["image"]}], "Record 0 has both 'images' and 'image'"),
        ([{"text": "a two", "caption": "a three"}], "Record 0 has both 'text' and 'caption'"),
        ([{"caption": ["a two", "a 2"]}], "Record 0's 'caption' is a list, not a string"),
        ([{"input_ids": [1, 2, 3]}], r"Record 0 has neither text .* its columns are \['input_ids'\]"),
    ],
)
def test_bad_records(processor, digit_images, records, message):
    image = digit_images[0][0]
    records = [
        {key: [image for _ in value] if key in ("image", "images") else value for key, value in record.items()}
        for record in records
    ]
    with pytest.raises(ValueError, match=message):
        TransfusionDataCollator(processor)(records)


def test_collator_arguments_are_checked(processor):
    with pytest.raises(ValueError, match="max_length must be a positive integer"):
        TransfusionDataCollator(processor, max_length=0)
    with pytest.raises(ValueError, match="padding_side must be"):
        TransfusionDataCollator(processor, padding_side="middle")


# Datasets as they come: `datasets.Dataset` rows with the usual column names and no `<image>` markers.


def digit_dataset(digit_images, text_column: str = "text", images_column: str = "image") -> datasets.Dataset:
    """Real digits and their captions as a `datasets.Dataset` (an `Image` column and a string column)."""
    return datasets.Dataset.from_dict(
        {
            images_column: [image for image, _ in digit_images],
            text_column: [f"a handwritten {DIGIT_NAMES[label]}" for _, label in digit_images],
        },
        features=datasets.Features({images_column: datasets.Image(), text_column: datasets.Value("string")}),
    )


def layouts(batch, processor) -> list[str]:
    """Per row: "image first" when the row opens with its image (after BOS), else "caption first"."""
    opening = [ids[1] for ids in batch["input_ids"].tolist()]
    return ["image first" if token == processor.boi_token_id else "caption first" for token in opening]


@pytest.mark.parametrize("text_column", ["text", "caption"])
@pytest.mark.parametrize("images_column", ["image", "images"])
def test_dataset_rows_as_they_come(processor, tiny_config, digit_images, text_column, images_column):
    dataset = digit_dataset(digit_images[:4], text_column, images_column)
    batch = TransfusionDataCollator(processor)([dataset[i] for i in range(4)])
    assert batch["pixel_values"].shape == (4, 1, 8, 8)
    assert (batch["input_ids"] == processor.image_token_id).sum(-1).tolist() == [N] * 4
    # Each row is its caption and its image, in one order or the other.
    assert processor.batch_decode(batch["input_ids"], skip_special_tokens=True) == dataset[text_column]
    torch.manual_seed(0)
    assert TransfusionForConditionalGeneration(tiny_config)(**batch).diffusion_loss > 0


def test_where_an_unmarked_image_goes(processor, digit_images):
    records = [{"caption": "a handwritten seven", "image": digit_images[7][0]}] * 1000
    torch.manual_seed(0)
    share = layouts(TransfusionDataCollator(processor)(records), processor).count("caption first") / len(records)
    assert 0.76 < share < 0.84  # the paper's 80%; the standard deviation of a share of 1,000 draws is 0.013
    for caption_first, expected in ((1.0, "caption first"), (0.0, "image first")):
        batch = TransfusionDataCollator(processor, caption_first=caption_first)(records[:50])
        assert set(layouts(batch, processor)) == {expected}
    # A marker places the image where it stands, whatever the policy.
    marked = [{"text": "<image> a handwritten seven", "image": digit_images[7][0]}] * 50
    assert set(layouts(TransfusionDataCollator(processor, caption_first=1.0)(marked), processor)) == {"image first"}
    with pytest.raises(ValueError, match=r"caption_first must be a probability in \[0, 1\], got 1.5"):
        TransfusionDataCollator(processor, caption_first=1.5)


def test_image_data_the_collator_does_not_read_is_an_error(processor, digit_images):
    seven = digit_images[7][0]
    undecoded = digit_dataset(digit_images[:1]).cast_column("image", datasets.Image(decode=False))
    cases = [
        ({"text": "a seven", "image": seven}, {"images_column": "images"}, "image"),  # told another column
        ({"text": "a seven", "photo": [seven, seven]}, {}, "photo"),  # a name the collator does not know
        ({"text": "a seven <image>", "pixel_values": np.zeros((1, 8, 8), np.float32)}, {}, "pixel_values"),
        ({"text": "a seven", "photo": undecoded[0]["image"]}, {}, "photo"),  # datasets' Image(decode=False)
    ]
    for record, arguments, column in cases:
        with pytest.raises(ValueError, match=f"Record 0 holds image data in the column '{column}'"):
            TransfusionDataCollator(processor, **arguments)([record])
    # Told the right column, it trains on the images.
    batch = TransfusionDataCollator(processor, images_column="photo")([{"text": "a seven", "photo": [seven, seven]}])
    assert batch["pixel_values"].shape == (2, 1, 8, 8)


def test_trainer_on_datasets_with_transform_and_streaming(processor, tiny_config, digit_images, tmp_path):
    dataset = digit_dataset(digit_images)

    def transform(batch):  # another caption column and mirrored images, computed on access
        return {"caption": [f"{text}, mirrored" for text in batch["text"]], "image": [
            image.transpose(PIL.Image.Transpose.FLIP_LEFT_RIGHT) for image in batch["image"]]}  # fmt: skip

    arguments = {"per_device_train_batch_size": 4, "max_steps": 2, "logging_steps": 1, "report_to": [],
                 "save_strategy": "no", "use_cpu": True, "disable_tqdm": True}  # fmt: skip
    collator = TransfusionDataCollator(processor)
    for train_dataset in (dataset.with_transform(transform), dataset.to_iterable_dataset()):
        torch.manual_seed(0)
        args = TrainingArguments(output_dir=str(tmp_path), remove_unused_columns=False, **arguments)
        model = TransfusionForConditionalGeneration(tiny_config)
        trainer = TransfusionTrainer(model=model, args=args, train_dataset=train_dataset, data_collator=collator)
        trainer.train()
        diffusion = [log["diffusion_loss"] for log in trainer.state.log_history if "loss" in log]
        assert len(diffusion) == 2 and min(diffusion) > 0.1  # every step trained on images
    # Trainer's default removes the columns the model's forward does not name: the collator says so.
    args = TrainingArguments(output_dir=str(tmp_path), **arguments)
    model = TransfusionForConditionalGeneration(tiny_config)
    trainer = TransfusionTrainer(
        model=model, args=args, train_dataset=dataset.to_iterable_dataset(), data_collator=collator
    )
    with pytest.raises(ValueError, match=r"its columns are \[\]\. With Trainer, pass .*remove_unused_columns=False"):
        trainer.train()


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
