"""Tests of the image processor, the image tokens and TransfusionProcessor."""

import json
import re
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from transformers import AutoImageProcessor, AutoProcessor

from modeling_transfusion import (
    PLAIN_CHAT_TEMPLATE,
    TransfusionForConditionalGeneration,
    TransfusionImageProcessor,
    TransfusionProcessor,
    add_image_tokens,
    patchify,
    unpatchify,
)

from conftest import build_tiny_config, build_tiny_tokenizer

N = 16  # image slots of the tiny config: (8 // 2) ** 2

# Every ValueError the processor documents (docs/processing.md, "Errors"); the property test allows only these.
DOCUMENTED_ERRORS = (
    r"Pass text, images or both",
    r"Got an empty batch",
    r"Row \d+ has neither text nor images",
    r"marker\(s\) but no images were passed",
    r"Row \d+ has \d+ <image> marker\(s\) but \d+ image\(s\)",
    r"The text holds \d+ <image> marker\(s\) in total but \d+ image\(s\)",
    r"text row\(s\) but \d+ lists of images",
    r"Row \d+ is \d+ tokens long",
    r"Unsupported PIL image mode",
    r"Cannot tell the channel axis",
    r"has no channel axis of size 1, 3 or 4",
    r"An image must have 2 dimensions",
)


def rgb_noise(height: int, width: int, seed: int = 0) -> PIL.Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return PIL.Image.fromarray(pixels)


def image_blocks(ids: list[int], processor: TransfusionProcessor) -> list[int]:
    """Start positions of the image slot runs in `ids`, checking each is `<boi>` + N slots + `<eoi>`."""
    slots = [i for i, token in enumerate(ids) if token == processor.image_token_id]
    assert len(slots) % processor.num_image_tokens == 0
    starts = slots[:: processor.num_image_tokens]
    for start in starts:
        assert ids[start - 1] == processor.boi_token_id
        assert (
            ids[start : start + processor.num_image_tokens] == [processor.image_token_id] * processor.num_image_tokens
        )
        assert ids[start + processor.num_image_tokens] == processor.eoi_token_id
    return starts


# Image processor


@pytest.mark.parametrize(
    "image",
    [
        PIL.Image.new("L", (28, 28), 0),
        PIL.Image.new("RGB", (30, 20), (0, 0, 0)),
        PIL.Image.new("RGBA", (20, 30), (0, 0, 0, 255)),
        PIL.Image.new("P", (12, 12), 0),
        np.zeros((28, 28), dtype=np.uint8),
        np.zeros((20, 24, 3), dtype=np.uint8),
        np.zeros((3, 20, 24), dtype=np.uint8),
        np.zeros((20, 24, 4), dtype=np.uint8) + np.array([0, 0, 0, 255], dtype=np.uint8),
        torch.zeros(1, 9, 9),
        torch.zeros(9, 9, 3, dtype=torch.float64),
        torch.zeros(12, 10, dtype=torch.int64),
    ],
    ids=["L", "RGB", "RGBA", "P", "np-HW", "np-HWC", "np-CHW", "np-RGBA", "pt-CHW", "pt-HWC-f64", "pt-HW-int"],
)
@pytest.mark.parametrize("num_channels", [1, 3])
def test_image_processor_accepts_every_layout(image, num_channels):
    image_processor = TransfusionImageProcessor(size=8, num_channels=num_channels)
    pixel_values = image_processor(image, return_tensors="pt")["pixel_values"]
    assert pixel_values.shape == (1, num_channels, 8, 8)
    assert pixel_values.dtype == torch.float32
    torch.testing.assert_close(pixel_values, torch.full_like(pixel_values, -1.0))  # black is -1


def test_image_processor_batches_and_nested_lists():
    image_processor = TransfusionImageProcessor(size=8, num_channels=3)
    batch = torch.rand(4, 3, 10, 12)
    assert image_processor(batch, return_tensors="pt")["pixel_values"].shape == (4, 3, 8, 8)
    nested = [[rgb_noise(9, 9)], [], [rgb_noise(20, 10), np.zeros((8, 8), dtype=np.uint8)]]
    assert image_processor(nested, return_tensors="pt")["pixel_values"].shape == (3, 3, 8, 8)


def test_channel_conversion():
    rgb = rgb_noise(8, 8)
    to_grey = TransfusionImageProcessor(size=8, num_channels=1)
    to_rgb = TransfusionImageProcessor(size=8, num_channels=3)
    grey = to_grey.postprocess(to_grey(rgb, return_tensors="pt")["pixel_values"])[0]
    assert np.array_equal(np.array(grey), np.array(rgb.convert("L")))  # ITU-R 601 luma, as PIL computes it
    replicated = to_rgb(rgb.convert("L"), return_tensors="pt")["pixel_values"][0]
    assert torch.equal(replicated[0], replicated[1]) and torch.equal(replicated[0], replicated[2])
    # Transparent pixels become white whatever colour they store; opaque ones keep theirs.
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[:, :4] = (255, 0, 0, 255)
    rgba[:, 4:] = (0, 0, 255, 0)
    pixels = to_rgb.postprocess(to_rgb(PIL.Image.fromarray(rgba), return_tensors="pt")["pixel_values"], "np")[0]
    assert (pixels[:, :4] == (255, 0, 0)).all() and (pixels[:, 4:] == 255).all()


def test_resize_shorter_side_then_centre_crop():
    image = rgb_noise(16, 32, seed=3)
    image_processor = TransfusionImageProcessor(size=8, num_channels=3)
    pixels = image_processor.postprocess(image_processor(image, return_tensors="pt")["pixel_values"], "np")[0]
    expected = np.array(image.resize((16, 8), PIL.Image.BICUBIC).crop((4, 0, 12, 8)))
    assert np.abs(pixels.astype(int) - expected.astype(int)).max() <= 1


def test_float_inputs_are_read_in_unit_range():
    image_processor = TransfusionImageProcessor(size=4, num_channels=1)
    half = image_processor(np.full((4, 4), 0.5, dtype=np.float32), return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(half, torch.full_like(half, 128 / 255 * 2 - 1), atol=1e-6, rtol=0)


@pytest.mark.parametrize("num_channels", [1, 3])
def test_round_trip_through_processor_and_identity_autoencoder(tokenizer, num_channels):
    """pixels -> pixel_values -> (identity VAE) latents -> patches -> latents -> images -> pixels: exact."""
    config = build_tiny_config(tokenizer, image_size=8, num_channels=num_channels)
    model = TransfusionForConditionalGeneration(config).eval()
    image_processor = TransfusionImageProcessor(size=8, num_channels=num_channels)
    images = [rgb_noise(8, 8, seed) for seed in range(3)]
    if num_channels == 1:
        images = [image.convert("L") for image in images]
    pixel_values = image_processor(images, return_tensors="pt")["pixel_values"]
    assert pixel_values.min() >= -1 and pixel_values.max() <= 1

    latents = model.encode_images(pixel_values)
    patches = patchify(latents, config.patch_size)
    assert patches.shape == (3, config.num_image_tokens, config.patch_dim)
    decoded = model.decode_latents(unpatchify(patches, config.patch_size, config.latent_channels))
    assert torch.equal(decoded, pixel_values)

    for image, restored in zip(images, image_processor.postprocess(decoded)):
        assert restored.mode == image.mode
        assert np.abs(np.array(restored, dtype=int) - np.array(image, dtype=int)).max() <= 1


def test_postprocess_clamps_and_formats():
    image_processor = TransfusionImageProcessor(size=4, num_channels=3)
    images = torch.tensor([-3.0, 0.2, 3.0]).view(1, 3, 1, 1).expand(2, 3, 4, 4)
    pixels = image_processor.postprocess(images, output_type="np")
    assert pixels.shape == (2, 4, 4, 3) and pixels.dtype == np.uint8
    assert (pixels[..., 0] == 0).all() and (pixels[..., 1] == 153).all() and (pixels[..., 2] == 255).all()
    pil = image_processor.postprocess([images[0], images[1]])
    assert [image.mode for image in pil] == ["RGB", "RGB"]
    with pytest.raises(ValueError, match="output_type"):
        image_processor.postprocess(images, output_type="pt")
    with pytest.raises(ValueError, match="1 or 3"):
        image_processor.postprocess(torch.zeros(1, 2, 4, 4))


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (PIL.Image.new("F", (8, 8)), "Unsupported PIL image mode 'F'"),
        (PIL.Image.new("I;16", (8, 8)), "Unsupported PIL image mode 'I;16'"),
        (np.zeros(8, dtype=np.uint8), r"2 dimensions .* got shape \(8,\)"),
        (np.zeros((1, 1, 8, 8, 1), dtype=np.uint8), r"got shape \(1, 1, 8, 8, 1\)"),
        (np.zeros((3, 8, 4), dtype=np.uint8), "Cannot tell the channel axis"),
        (np.zeros((8, 8, 2), dtype=np.uint8), "no channel axis of size 1, 3 or 4"),
        (np.full((8, 8), -0.5), r"Floating point images must hold finite values in \[0, 1\]"),
        (np.full((8, 8), np.nan), "finite values"),
        (np.full((8, 8), 300), r"Integer images must hold values in \[0, 255\]"),
        (np.zeros((8, 8), dtype=bool), "Unsupported image dtype bool"),
        (np.zeros((0, 8), dtype=np.uint8), "empty image"),
        (3, "Unsupported image type int"),
        ([], "Got no images"),
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)
def test_image_processor_errors(image, message):
    with pytest.raises(ValueError, match=message):
        TransfusionImageProcessor(size=8, num_channels=3)(image)


def test_image_processor_channel_layout_can_be_given():
    image_processor = TransfusionImageProcessor(size=8, num_channels=3)
    image = np.zeros((3, 8, 4), dtype=np.uint8)
    assert image_processor(image, input_data_format="channels_first", return_tensors="pt")["pixel_values"].shape == (
        1,
        3,
        8,
        8,
    )
    with pytest.raises(ValueError, match="num_channels must be 1"):
        TransfusionImageProcessor(num_channels=4)


def test_image_processor_save_load(tmp_path):
    image_processor = TransfusionImageProcessor(size=12, num_channels=1)
    image_processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert saved["image_processor_type"] == "TransfusionImageProcessor" and saved["num_channels"] == 1
    build_tiny_config(build_tiny_tokenizer(), image_size=12).save_pretrained(tmp_path)  # AutoImageProcessor needs it
    loaded = AutoImageProcessor.from_pretrained(tmp_path)
    assert type(loaded) is TransfusionImageProcessor
    image = rgb_noise(20, 14)
    assert torch.equal(
        loaded(image, return_tensors="pt")["pixel_values"], image_processor(image, return_tensors="pt")["pixel_values"]
    )


# Image tokens


def test_add_image_tokens_makes_unsplittable_special_tokens():
    tokenizer = build_tiny_tokenizer(with_image_tokens=False)
    assert len(tokenizer.encode("<image>", add_special_tokens=False)) > 1  # split before
    size = len(tokenizer)
    ids = add_image_tokens(tokenizer)
    assert sorted(ids.values()) == [size, size + 1, size + 2]
    ids_of = tokenizer.encode("seven<boi><image><image><eoi>.", add_special_tokens=False)
    assert ids_of[-5:] == [
        ids["boi_token_id"],
        ids["image_token_id"],
        ids["image_token_id"],
        ids["eoi_token_id"],
        ids_of[-1],
    ]
    assert tokenizer.decode(ids_of, skip_special_tokens=True) == "seven."
    assert add_image_tokens(tokenizer) == ids and len(tokenizer) == size + 3  # idempotent


def test_add_image_tokens_resizes_model_and_sets_config():
    tokenizer = build_tiny_tokenizer(with_image_tokens=False)
    # Any three distinct ids inside the vocabulary: add_image_tokens replaces them.
    config = build_tiny_config(tokenizer, boi_token_id=3, eoi_token_id=4, image_token_id=5)
    model = TransfusionForConditionalGeneration(config)
    ids = add_image_tokens(tokenizer, model)
    assert model.get_input_embeddings().num_embeddings == len(tokenizer) == model.lm_head.out_features
    assert model.config.get_text_config().vocab_size == len(tokenizer)
    assert {name: getattr(model.config, name) for name in ids} == ids
    TransfusionProcessor.from_model_config(model.config, tokenizer)  # consistent now

    # A larger vocabulary (padded for speed, as many LLMs have) is left as it is.
    big = TransfusionForConditionalGeneration(build_tiny_config(tokenizer))
    big.resize_token_embeddings(len(tokenizer) + 13)
    add_image_tokens(tokenizer, big)
    assert big.get_input_embeddings().num_embeddings == len(tokenizer) + 13


def test_tokenizer_without_image_tokens():
    with pytest.raises(ValueError, match=r"lacks the image token\(s\) \['<boi>', '<image>', '<eoi>'\]"):
        TransfusionProcessor(
            TransfusionImageProcessor(size=8), build_tiny_tokenizer(False), num_image_tokens=N, add_image_tokens=False
        )
    tokenizer = build_tiny_tokenizer(False)
    processor = TransfusionProcessor(TransfusionImageProcessor(size=8), tokenizer, num_image_tokens=N)
    assert processor.image_token_id == tokenizer.convert_tokens_to_ids("<image>")


def test_from_model_config_checks_the_tokenizer(tokenizer, tiny_config):
    processor = TransfusionProcessor.from_model_config(tiny_config, tokenizer)
    assert processor.num_image_tokens == tiny_config.num_image_tokens == N
    assert processor.context_length == 256
    assert processor.image_processor.crop_size.height == 8 and processor.image_processor.num_channels == 1
    wrong = build_tiny_config(tokenizer)
    wrong.image_token_id, wrong.eoi_token_id = wrong.eoi_token_id, wrong.image_token_id
    with pytest.raises(ValueError, match="add_image_tokens"):
        TransfusionProcessor.from_model_config(wrong, tokenizer)


def test_processor_arguments_are_checked(tokenizer):
    image_processor = TransfusionImageProcessor(size=8)
    with pytest.raises(ValueError, match="num_image_tokens must be a positive integer"):
        TransfusionProcessor(image_processor, tokenizer)
    with pytest.raises(ValueError, match="three different strings"):
        TransfusionProcessor(image_processor, tokenizer, num_image_tokens=4, boi_token="<image>")
    with pytest.raises(ValueError, match="cannot hold even one image"):
        TransfusionProcessor(image_processor, tokenizer, num_image_tokens=4, context_length=5)


# Processor: expansion, batching, padding


def test_marker_expands_to_an_image_block(processor, digit_images):
    image = digit_images[7][0]
    ids = processor(text="a <image> seven", images=image)["input_ids"][0]
    words = processor.tokenizer("a", add_special_tokens=False)["input_ids"]
    assert ids[0] == processor.tokenizer.bos_token_id
    assert ids[1 : 1 + len(words)] == words
    starts = image_blocks(ids, processor)
    assert len(starts) == 1 and len(ids) == len(processor.tokenizer("a seven")["input_ids"]) + N + 2
    # The space before a marker is dropped: the caption ends as the generation prompt "a seven" does.
    caption_first = processor(text="a seven <image>", images=image)["input_ids"][0]
    prompt = processor(text="a seven")["input_ids"][0]
    assert caption_first[: len(prompt)] == prompt and caption_first[
        len(prompt)
    ] == processor.tokenizer.convert_tokens_to_ids("<boi>")
    assert processor.image_sequence == "<boi>" + "<image>" * N + "<eoi>"


def test_mixed_batch(processor, digit_images):
    images = [image for image, _ in digit_images[:4]]
    texts = ["a handwritten seven <image>", "<image> a handwritten two", "only text", "<image> and <image>"]
    nested = processor(text=texts, images=[[images[0]], [images[1]], [], images[2:]], return_tensors="pt")
    flat = processor(text=texts, images=images, return_tensors="pt")
    assert nested.keys() == flat.keys() == {"input_ids", "attention_mask", "pixel_values", "image_sizes"}
    for key in nested:
        assert torch.equal(nested[key], flat[key])
    assert nested["pixel_values"].shape == (4, 1, 8, 8)
    assert [len(image_blocks(row.tolist(), processor)) for row in nested["input_ids"]] == [1, 1, 0, 2]
    expected = processor.image_processor(images, return_tensors="pt")["pixel_values"]
    assert torch.equal(nested["pixel_values"], expected)  # reading order
    assert nested["attention_mask"].sum(-1).tolist() == [
        len(processor(text=text, images=row)["input_ids"][0])
        for text, row in zip(texts, [[images[0]], [images[1]], None, images[2:]])
    ]


def test_text_only_batch_has_no_pixel_values(processor):
    out = processor(text=["a seven", "two"], return_tensors="pt")
    assert set(out) == {"input_ids", "attention_mask"}


@pytest.mark.parametrize("images_per_row", [None, [1, 2]])
def test_image_only_rows(processor, digit_images, images_per_row):
    images = [image for image, _ in digit_images[:3]]
    if images_per_row is None:  # a flat list: one row per image
        out, rows = processor(images=images, return_tensors="pt"), [1, 1, 1]
    else:
        out, rows = processor(images=[images[:1], images[1:]], return_tensors="pt"), images_per_row
    assert out["pixel_values"].shape[0] == 3
    for row, mask, count in zip(out["input_ids"].tolist(), out["attention_mask"].tolist(), rows):
        row = [token for token, keep in zip(row, mask) if keep]
        assert row[0] == processor.tokenizer.bos_token_id and len(row) == 1 + count * (N + 2)
        assert len(image_blocks(row, processor)) == count
    single = processor(images=images[0], return_tensors="pt")
    assert single["input_ids"].shape == (1, 1 + N + 2)
    assert processor(images=images[0], add_special_tokens=False)["input_ids"][0][0] == processor.boi_token_id


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_side(processor, digit_images, side):
    texts, images = ["a handwritten digit seven <image>", "two"], [[digit_images[0][0]], []]
    by_kwarg = processor(text=texts, images=images, padding_side=side, return_tensors="pt")
    processor.tokenizer.padding_side = side
    by_tokenizer = processor(text=texts, images=images, return_tensors="pt")
    assert torch.equal(by_kwarg["input_ids"], by_tokenizer["input_ids"])
    mask = by_kwarg["attention_mask"][1]
    pads = (mask == 0).nonzero().flatten().tolist()
    assert pads and pads == (
        list(range(len(pads))) if side == "left" else list(range(len(mask) - len(pads), len(mask)))
    )
    assert (by_kwarg["input_ids"][1][mask == 0] == processor.tokenizer.pad_token_id).all()


def test_padding_options(processor, digit_images):
    texts = ["a seven <image>", "two"]
    images = [digit_images[0][0]]
    assert processor(text=texts, images=images, padding="max_length", max_length=40, return_tensors="pt")[
        "input_ids"
    ].shape == (2, 40)
    assert (
        processor(text=texts, images=images, pad_to_multiple_of=8, return_tensors="pt")["input_ids"].shape[1] % 8 == 0
    )
    unpadded = processor(text=texts, images=images, padding=False)
    assert [len(row) for row in unpadded["input_ids"]] == [sum(mask) for mask in unpadded["attention_mask"]]
    with pytest.raises(ValueError, match="padding=True"):
        processor(text=texts, images=images, padding=False, return_tensors="pt")
    as_numpy = processor(text=texts, images=images, return_tensors="np")
    assert isinstance(as_numpy["input_ids"], np.ndarray) and as_numpy["pixel_values"].shape == (1, 1, 8, 8)


def test_padding_needs_a_pad_token(processor):
    processor.tokenizer.pad_token = None
    assert processor(text=["two", "one"], return_tensors="pt")["input_ids"].shape[0] == 2  # same length: no padding
    with pytest.raises(ValueError, match="the tokenizer does not have a padding token"):
        processor(text=["a handwritten seven", "two"], return_tensors="pt")


# Processor: errors


@pytest.mark.parametrize(
    ("text", "images", "message"),
    [
        (None, None, "Pass text, images or both"),
        ([], None, "Got an empty batch: text is an empty list"),
        (None, [], "Got an empty batch: images is an empty list"),
        (None, [[], ["image"]], "Row 0 has neither text nor images"),
        ("a <image> b <image>", None, r"The text holds 2 <image> marker\(s\) but no images were passed"),
        (["<image> a", "b"], [["image"], ["image"]], r"Row 1 has 0 <image> marker\(s\) but 1 image\(s\)"),
        (["<image> a", "<image> b"], [["image"], []], r"Row 1 has 1 <image> marker\(s\) but 0 image\(s\)"),
        (["<image> a", "b"], ["image", "image"], r"The text holds 1 <image> marker\(s\) in total but 2 image\(s\)"),
        ("a seven", ["image"], r"The text holds 0 <image> marker\(s\) in total but 1 image\(s\)"),
        (["<image>", "<image>"], [["image", "image"]], r"Got 2 text row\(s\) but 1 lists of images"),
        (["<image>", "<image>"], [["image"], "image"], "mixes lists and single images"),
        ([["pre", "tokenized"]], None, "text must be a string or a list of strings"),
        ("<image>", {"image": 1}, "images must be an image, a list of images or a list of lists"),
    ],
)
def test_input_errors(processor, digit_images, text, images, message):
    def substitute(item):
        if item == "image":
            return digit_images[0][0]
        return [substitute(value) for value in item] if isinstance(item, list) else item

    with pytest.raises(ValueError, match=message):
        processor(text=text, images=substitute(images) if images is not None else None)


def test_tokenizer_that_splits_image_tokens(processor, digit_images):
    processor.tokenizer.split_special_tokens = True
    with pytest.raises(ValueError, match=r"tokenized to 0 <image> slots, expected 16 .*split_special_tokens"):
        processor(text="a <image>", images=digit_images[0][0])


def test_bad_image_inside_a_batch(processor):
    with pytest.raises(ValueError, match="Unsupported PIL image mode 'F'"):
        processor(text=["<image> a"], images=[PIL.Image.new("F", (8, 8))])


# Processor: context length and truncation


def test_too_long_raises_by_default(processor, digit_images):
    text = "a handwritten seven " * 3 + "<image>"
    length = len(processor(text=text, images=digit_images[0][0])["input_ids"][0])
    with pytest.raises(ValueError, match=rf"Row 0 is {length} tokens long with its 1 image\(s\) expanded"):
        processor(text=text, images=digit_images[0][0], max_length=length - 1)
    processor.context_length = length - 1
    with pytest.raises(ValueError, match="truncation=True"):
        processor(text=["two", text], images=[digit_images[0][0]])


@pytest.mark.parametrize("side", ["right", "left"])
def test_truncation_drops_whole_images(processor, digit_images, side):
    processor.tokenizer.truncation_side = side
    images = [digit_images[i][0] for i in range(3)]
    text = "one <image> two <image> three <image> four"
    full = processor(text=text, images=images)["input_ids"][0]
    starts = image_blocks(full, processor)
    # A cut that would fall in the middle of the second image: that image goes, the first (or last) stays.
    middle = starts[1] + N // 2
    max_length = middle if side == "right" else len(full) - middle
    out = processor(text=text, images=images, max_length=max_length, truncation=True, return_tensors="pt")
    ids = out["input_ids"][0].tolist()
    assert len(ids) <= max_length and len(image_blocks(ids, processor)) == 1
    assert out["pixel_values"].shape[0] == 1
    expected = images[0] if side == "right" else images[2]
    assert torch.equal(
        out["pixel_values"][0], processor.image_processor(expected, return_tensors="pt")["pixel_values"][0]
    )
    assert ids == (full[: starts[1] - 1] if side == "right" else full[starts[1] + N + 1 :])


# Processor: output


def test_decode_drops_image_slots(processor, digit_images):
    out = processor(text=["a <image> seven", "two"], images=[digit_images[0][0]], return_tensors="pt")
    assert processor.batch_decode(out["input_ids"], skip_special_tokens=True) == ["a seven", "two"]
    kept = processor.batch_decode(out["input_ids"])
    assert kept[0] == "<s>a<boi><eoi> seven" and kept[1].startswith("<pad>") and kept[1].endswith("<pad><s>two")
    assert processor.decode(out["input_ids"][0]) == kept[0]
    assert processor.decode(out["input_ids"][0].tolist(), skip_special_tokens=True) == "a seven"
    assert processor.post_process_image_text_to_text(out["input_ids"]) == ["a seven", "two"]


def test_postprocess_images(processor):
    generated = [[torch.zeros(1, 8, 8), torch.ones(1, 8, 8)], [], torch.full((1, 1, 8, 8), -1.0)]
    pictures = processor.postprocess_images(generated)
    assert [len(row) for row in pictures] == [2, 0, 1]
    assert all(isinstance(image, PIL.Image.Image) and image.size == (8, 8) for row in pictures for image in row)
    assert np.array(pictures[0][1]).min() == 255 and np.array(pictures[2][0]).max() == 0
    per_row = processor.postprocess_images(torch.zeros(3, 1, 8, 8), output_type="np")
    assert [row[0].shape for row in per_row] == [(8, 8, 1)] * 3
    assert len(processor.post_process_multimodal_output(generated, generation_mode="image")) == 3
    with pytest.raises(ValueError, match="num_rows, channels, height, width"):
        processor.postprocess_images(torch.zeros(1, 8, 8))


def test_a_dataset_row_as_it_comes(processor, digit_images):
    seven = digit_images[7][0]
    row = {"caption": "a handwritten seven <image>", "image": seven}  # the usual column names
    by_row = processor(**row, return_tensors="pt")
    direct = processor(text="a handwritten seven <image>", images=seven, return_tensors="pt")
    assert by_row.keys() == direct.keys() == {"input_ids", "attention_mask", "pixel_values", "image_sizes"}
    assert all(torch.equal(by_row[key], direct[key]) for key in direct)
    # Never the text alone: image data under another keyword, or an image without its marker, is an error.
    with pytest.raises(ValueError, match="The keyword 'photo' holds image data, which the processor does not read"):
        processor(text="a handwritten seven <image>", photo=seven)
    with pytest.raises(ValueError, match=r"holds 0 <image> marker\(s\) in total but 1 image\(s\)"):
        processor(caption="a handwritten seven", image=seven)
    with pytest.raises(ValueError, match="Got both text and caption"):
        processor(text="a seven", caption="a seven")


def test_chat_template(processor, digit_images):
    assert processor.chat_template is None  # a processor claims chat only when given a template
    processor.chat_template = PLAIN_CHAT_TEMPLATE
    conversation = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what digit is this?"}]},
        {"role": "assistant", "content": "a seven"},
        {"role": "user", "content": "draw a two"},
    ]
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
    assert prompt == "User: <image> what digit is this?\nAssistant: a seven</s>\nUser: draw a two\nAssistant:"

    image = digit_images[7][0]
    conversation[0]["content"][0]["image"] = image
    out = processor.apply_chat_template(
        conversation, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    direct = processor(text=prompt, images=[image], return_tensors="pt")
    for key in direct:
        assert torch.equal(out[key], direct[key])


def test_save_load_round_trip(processor, tiny_config, digit_images, tmp_path):
    processor.chat_template = PLAIN_CHAT_TEMPLATE
    processor.save_pretrained(tmp_path)
    tiny_config.save_pretrained(tmp_path)  # AutoProcessor finds the processor through config.json's model_type
    assert {"processor_config.json", "tokenizer.json", "chat_template.jinja"} <= {p.name for p in tmp_path.iterdir()}
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert type(loaded) is TransfusionProcessor and type(loaded.image_processor) is TransfusionImageProcessor
    # Saving names the classes as remote code (`auto_map`, which transformers also records on the saved objects).
    assert json.loads((tmp_path / "processor_config.json").read_text())["auto_map"] == {
        "AutoProcessor": "processing_transfusion.TransfusionProcessor"
    }
    saved = {key: value for key, value in processor.to_dict().items() if key != "auto_map"}
    assert loaded.to_dict() == saved and loaded.chat_template == processor.chat_template

    images = [image for image, _ in digit_images[:3]]
    texts = ["a handwritten <image> seven", "two", "<image> then <image>"]
    expected, actual = (
        processor(text=texts, images=images, return_tensors="pt"),
        loaded(text=texts, images=images, return_tensors="pt"),
    )
    assert expected.keys() == actual.keys()
    for key in expected:
        assert torch.equal(expected[key], actual[key])
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is it?"}]}]
    assert loaded.apply_chat_template(conversation) == processor.apply_chat_template(conversation)

    # processor_config.json names the class, so a folder without config.json loads too.
    (tmp_path / "config.json").unlink()
    assert type(AutoProcessor.from_pretrained(tmp_path)) is TransfusionProcessor


# Properties

WORDS = ("a", "seven", "handwritten", "digit", "two", "é", "\n", "  ", "<image>", "<image>", "<image>")


@st.composite
def processor_calls(draw):
    """Random text rows with markers, and images that mostly match them, of random sizes and kinds (a few of them
    unsupported), in a nested, flat or text-free layout, with or without a length limit."""
    layout = draw(st.sampled_from(["nested", "flat", "text-free"]))
    num_rows = draw(st.integers(0 if layout != "text-free" else 1, 3))
    texts = [" ".join(draw(st.lists(st.sampled_from(WORDS), max_size=8))) for _ in range(num_rows)]
    if layout == "text-free":
        counts = [draw(st.integers(0 if draw(st.integers(0, 9)) == 0 else 1, 2)) for _ in range(num_rows)]
    elif draw(st.integers(0, 3)):
        counts = [text.count("<image>") for text in texts]
    else:
        counts = [draw(st.integers(0, 3)) for _ in range(max(num_rows, 1))]

    def image():
        height, width = draw(st.integers(1, 20)), draw(st.integers(1, 20))
        kind = draw(st.sampled_from(["L", "RGB", "RGBA", "P", "np", "pt", "np", "pt", "F"]))
        if kind in ("np", "pt"):
            shapes = [(height, width), (height + 4, width + 5, 3), (4, height, width + 5), (height, width, 2)]
            array = np.random.default_rng(height * width).random(draw(st.sampled_from(shapes)))
            return array if kind == "np" else torch.from_numpy(array)
        return PIL.Image.new(kind, (width, height))

    images = [[image() for _ in range(count)] for count in counts]
    max_length = draw(st.none() | st.integers(1, 80))
    truncation = draw(st.booleans())
    if layout == "text-free":
        return None, images, max_length, truncation
    return texts, (images if layout == "nested" else [i for row in images for i in row]), max_length, truncation


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(call=processor_calls())
def test_processor_is_consistent_or_raises_a_documented_error(processor, call):
    text, images, max_length, truncation = call
    try:
        out = processor(text=text, images=images, max_length=max_length, truncation=truncation, return_tensors="pt")
    except ValueError as error:
        assert any(re.search(pattern, str(error)) for pattern in DOCUMENTED_ERRORS), str(error)
        event(f"raised: {str(error)[:24]}")
        return
    event("consistent, with images" if "pixel_values" in out else "consistent, text only")
    input_ids, mask = out["input_ids"], out["attention_mask"]
    num_images = out["pixel_values"].shape[0] if "pixel_values" in out else 0
    assert int((input_ids == processor.image_token_id).sum()) == num_images * N
    assert (
        int((input_ids == processor.boi_token_id).sum())
        == int((input_ids == processor.eoi_token_id).sum())
        == num_images
    )
    for row, row_mask in zip(input_ids.tolist(), mask.tolist()):
        image_blocks(row, processor)
        if max_length is not None:
            assert sum(row_mask) <= max_length
    if "pixel_values" in out:
        assert out["pixel_values"].shape[1:] == (1, 8, 8)
        assert out["pixel_values"].abs().max() <= 1
    if max_length is None or not truncation:
        flat = images if text is not None and (not images or not isinstance(images[0], list)) else None
        passed = len(flat) if flat is not None else sum(len(row) for row in images)
        assert num_images == passed


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    pieces=st.lists(st.lists(st.sampled_from(WORDS), max_size=10), min_size=1, max_size=3),
    max_length=st.integers(1, 60),
    side=st.sampled_from(["left", "right"]),
)
def test_truncation_never_cuts_inside_an_image(processor, pieces, max_length, side):
    processor.tokenizer.truncation_side = side
    texts = [" ".join(words) for words in pieces]
    num_images = sum(text.count("<image>") for text in texts)
    # Image k is flat grey level 10 * k, so the pixels tell which images survived.
    images = [PIL.Image.new("L", (8, 8), 10 * k) for k in range(num_images)]
    out = processor(text=texts, images=images, max_length=max_length, truncation=True, return_tensors="pt")
    full = processor(text=texts, images=images, padding=False)["input_ids"]
    kept, first = [], 0
    for row, mask, whole in zip(out["input_ids"].tolist(), out["attention_mask"].tolist(), full):
        row = [token for token, attended in zip(row, mask) if attended]
        assert len(row) <= max_length
        starts = image_blocks(row, processor)
        # What is left is a piece of the whole row, at the end truncation keeps.
        assert row == (whole[: len(row)] if side == "right" else whole[len(whole) - len(row) :])
        row_images = len(image_blocks(whole, processor))
        kept += list(
            range(first, first + len(starts))
            if side == "right"
            else range(first + row_images - len(starts), first + row_images)
        )
        first += row_images
    levels = [] if "pixel_values" not in out else out["pixel_values"][:, 0, 0, 0].tolist()
    assert levels == pytest.approx([(10 * k / 255) * 2 - 1 for k in kept], abs=1e-6)


def test_generated_images_to_pil(processor, tiny_config):
    """processor -> model.generate(generation_mode="image") -> postprocess_images: one 8x8 grey picture per row."""
    torch.manual_seed(0)
    model = TransfusionForConditionalGeneration(tiny_config).eval()
    inputs = processor(text=["a handwritten seven", "two"], padding_side="left", return_tensors="pt")
    generated = model.generate(
        **inputs, generation_mode="image", num_inference_steps=2, max_new_tokens=N + 4, return_dict_in_generate=True
    )
    pictures = processor.postprocess_images(generated.images)
    assert [len(row) for row in pictures] == [1, 1]
    assert all(picture.mode == "L" and picture.size == (8, 8) for row in pictures for picture in row)
    for text in processor.batch_decode(generated.sequences):
        assert "<boi><eoi>" in text  # the image's slots are gone, its markers stay


def test_docstring_examples():
    import doctest

    from modeling_transfusion.processing import image_processing_transfusion, processing_transfusion

    for module in (image_processing_transfusion, processing_transfusion):
        result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
        assert result.failed == 0 and (module is processing_transfusion or result.attempted > 0)


# Images of any size: a tiny model with max_image_size 16 > image_size 8, identity VAE and patch 2, so that
# image_size_divisor is 2 and an image of h x w takes (h / 2) * (w / 2) slots (8x8: 16, 8x16 and 16x8: 32, 16x16: 64).

BUNDLED = Path(__file__).resolve().parent.parent / "checkpoints" / "transfusion-mnist"


def any_size_config(tokenizer, **kwargs):
    kwargs.setdefault("image_position_embedding", "learned_2d")
    return build_tiny_config(tokenizer, image_size=8, max_image_size=16, **kwargs)


def grey_noise(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width), dtype=np.uint8)


def normalised(pixels: np.ndarray) -> torch.Tensor:
    """What the image processor makes of a kept uint8 image: [0, 255] -> [-1, 1], with a channel axis."""
    return torch.from_numpy((pixels.astype(np.float32) / 255 - 0.5) / 0.5)[None]


def slot_runs(ids: list[int], processor: TransfusionProcessor) -> list[int]:
    """The length of each run of `<image>` slots in `ids`, checking that each is enclosed by `<boi>` and `<eoi>`."""
    runs, position = [], 0
    while position < len(ids):
        if ids[position] != processor.image_token_id:
            position += 1
            continue
        end = position
        while end < len(ids) and ids[end] == processor.image_token_id:
            end += 1
        assert ids[position - 1] == processor.boi_token_id and ids[end] == processor.eoi_token_id
        runs.append(end - position)
        position = end
    return runs


ANY_SIZE_TABLE = [  # (input height, width) -> output with longest_edge 32, size_divisor 8
    ((8, 16), (8, 16)),  # multiples of 8 and at most 32: kept
    ((16, 8), (16, 8)),
    ((32, 32), (32, 32)),
    ((24, 8), (24, 8)),
    ((30, 60), (16, 32)),  # scale 32 / 60: 16 x 32, the aspect ratio kept
    ((60, 30), (32, 16)),
    ((64, 64), (32, 32)),
    ((33, 10), (32, 8)),  # 32 x 9.7: 9.7 rounds to 8
    ((100, 20), (32, 8)),  # 32 x 6.4: 6.4 rounds to 8
    ((28, 9), (32, 8)),  # not larger than 32, only rounded: 28 -> 32, 9 -> 8
    ((3, 5), (8, 8)),  # tiny: at least one multiple
    ((1, 1), (8, 8)),
]


@pytest.mark.parametrize(("size", "expected"), ANY_SIZE_TABLE, ids=[f"{h}x{w}" for (h, w), _ in ANY_SIZE_TABLE])
def test_any_size_policy_output_sizes(size, expected):
    image_processor = TransfusionImageProcessor(size={"longest_edge": 32}, size_divisor=8, num_channels=1)
    assert image_processor.target_size(*size) == expected
    pixel_values = image_processor(grey_noise(*size))["pixel_values"]
    assert [tuple(image.shape) for image in pixel_values] == [(1, *expected)]


def test_any_size_policy_keeps_or_resizes_the_pixels():
    image_processor = TransfusionImageProcessor(size={"longest_edge": 32}, size_divisor=8, num_channels=1)
    assert image_processor.do_center_crop is False  # the default with longest_edge
    # Kept: exactly the normalised input, in any of the accepted layouts, and back to the same pixels.
    pixels = grey_noise(8, 16)
    for image in (pixels, PIL.Image.fromarray(pixels), torch.from_numpy(pixels)[None]):
        kept = image_processor(image, return_tensors="pt")["pixel_values"]
        assert torch.equal(kept[0], normalised(pixels))
    assert np.array_equal(image_processor.postprocess(kept, output_type="np")[0, :, :, 0], pixels)
    # Resized: the whole image (no crop) at 16 x 32, as PIL resizes it.
    image = PIL.Image.fromarray(grey_noise(30, 60, seed=1))
    resized = image_processor.postprocess(image_processor(image, return_tensors="pt")["pixel_values"], "np")[0]
    expected = np.array(image.resize((32, 16), PIL.Image.BICUBIC))
    assert resized.shape == (16, 32, 1) and np.abs(resized[:, :, 0].astype(int) - expected.astype(int)).max() <= 1
    # Different sizes make a list; one tensor only through TransfusionProcessor, which pads them.
    both = image_processor([grey_noise(8, 16), grey_noise(16, 8)])["pixel_values"]
    assert [image.shape for image in both] == [(1, 8, 16), (1, 16, 8)]
    with pytest.raises(ValueError, match=r"Images of different sizes \[\(8, 16\), \(16, 8\)\] cannot be stacked"):
        image_processor([grey_noise(8, 16), grey_noise(16, 8)], return_tensors="pt")


def test_square_policy_is_unchanged():
    image_processor = TransfusionImageProcessor(size=8, num_channels=1)
    assert image_processor.size_divisor is None and image_processor.do_center_crop is True
    image = PIL.Image.fromarray(grey_noise(16, 32, seed=2))
    pixels = image_processor.postprocess(image_processor(image, return_tensors="pt")["pixel_values"], "np")[0]
    expected = np.array(image.resize((16, 8), PIL.Image.BICUBIC).crop((4, 0, 12, 8)))  # shorter side 8, centre crop
    assert pixels.shape == (8, 8, 1) and np.abs(pixels[:, :, 0].astype(int) - expected.astype(int)).max() <= 1
    outputs = image_processor([grey_noise(8, 16), grey_noise(30, 60), grey_noise(3, 5)], return_tensors="pt")
    assert outputs["pixel_values"].shape == (3, 1, 8, 8)


def test_any_size_image_processor_save_load(tmp_path):
    image_processor = TransfusionImageProcessor(size={"longest_edge": 32}, size_divisor=8, num_channels=1)
    image_processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert (saved["size"], saved["size_divisor"], saved["do_center_crop"]) == ({"longest_edge": 32}, 8, False)
    loaded = TransfusionImageProcessor.from_pretrained(tmp_path)
    assert (loaded.size.longest_edge, loaded.size_divisor, loaded.do_center_crop) == (32, 8, False)
    for size, expected in ANY_SIZE_TABLE:
        assert loaded.target_size(*size) == expected
    image = grey_noise(30, 60, seed=3)
    assert np.array_equal(loaded(image)["pixel_values"][0], image_processor(image)["pixel_values"][0])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"size": {"longest_edge": 32}}, r"size=\{'longest_edge': 32\} needs size_divisor, .* got None"),
        ({"size": {"longest_edge": 32}, "size_divisor": 0}, r"needs size_divisor, .* got 0"),
        ({"size": {"longest_edge": 30}, "size_divisor": 8}, r"longest_edge \(30\) must be a multiple of size_divisor"),
        ({"size": {"longest_edge": 32}, "size_divisor": 8, "do_center_crop": True}, "pass do_center_crop=False"),
    ],
)
def test_any_size_policy_arguments_are_checked(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TransfusionImageProcessor(num_channels=1, **kwargs)


def test_from_model_config_picks_the_policy(tokenizer):
    any_size = TransfusionProcessor.from_model_config(any_size_config(tokenizer), tokenizer)
    image_processor = any_size.image_processor
    assert (image_processor.size.longest_edge, image_processor.size_divisor) == (16, 2)
    assert any_size.image_size_divisor == 2 and any_size.num_image_tokens == N and not any_size.write_image_size
    square = TransfusionProcessor.from_model_config(build_tiny_config(tokenizer), tokenizer)
    assert square.image_processor.size.shortest_edge == 8 and square.image_processor.do_center_crop
    assert square(images=grey_noise(8, 16), return_tensors="pt")["pixel_values"].shape == (1, 1, 8, 8)


def test_slots_and_size_text_per_image_size(tokenizer):
    config = any_size_config(tokenizer)
    processor = TransfusionProcessor.from_model_config(config, tokenizer)
    sizes = {(8, 8): 16, (8, 16): 32, (16, 8): 32, (16, 16): 64, (2, 2): 1, (4, 16): 16}
    for (height, width), slots in sizes.items():
        assert processor.num_image_slots(height, width) == slots == config.num_image_slots(height, width)
        assert processor.render_image_size(height, width) == ""
        assert processor.image_sequence_for(height, width) == "<boi>" + "<image>" * slots + "<eoi>"
    writer = TransfusionProcessor.from_model_config(config, build_tiny_tokenizer(), write_image_size=True)
    assert writer.render_image_size(8, 16) == " 8x16" and writer.render_image_size(16, 8) == " 16x8"
    assert writer.image_sequence_for(8, 16) == " 8x16<boi>" + "<image>" * 32 + "<eoi>"
    # Without image_size_divisor (a model of one size): every image takes num_image_tokens slots.
    legacy = TransfusionProcessor(TransfusionImageProcessor(size=8, num_channels=1), tokenizer, num_image_tokens=N)
    assert legacy.num_image_slots(8, 16) == legacy.num_image_slots(16, 16) == N
    assert legacy.model_input_names == ["input_ids", "attention_mask", "pixel_values"]
    assert processor.model_input_names == ["input_ids", "attention_mask", "pixel_values", "image_sizes"]


def mixed_size_call(processor, **kwargs):
    """Three rows: an 8x8 image; an 8x16 and a 16x8 image; text only."""
    images = [grey_noise(8, 8, seed=1), grey_noise(8, 16, seed=2), grey_noise(16, 8, seed=3)]
    texts = ["a seven <image>", "<image> and <image> two", "only text"]
    return images, processor(text=texts, images=[images[:1], images[1:], []], **kwargs)


def test_batch_of_mixed_sizes(tokenizer):
    processor = TransfusionProcessor.from_model_config(any_size_config(tokenizer), tokenizer)
    images, batch = mixed_size_call(processor, return_tensors="pt")
    assert set(batch) == {"input_ids", "attention_mask", "pixel_values", "image_sizes"}
    assert [slot_runs(row, processor) for row in batch["input_ids"].tolist()] == [[16], [32, 32], []]
    assert batch["image_sizes"].tolist() == [[8, 8], [8, 16], [16, 8]]
    assert batch["image_sizes"].dtype == torch.long
    # Padded with zeros, bottom and right, to the largest height and width: 16 x 16.
    pixel_values = batch["pixel_values"]
    assert pixel_values.shape == (3, 1, 16, 16)
    for padded, image in zip(pixel_values, images):
        height, width = image.shape
        assert torch.equal(padded[:, :height, :width], normalised(image))
        assert (padded[:, height:] == 0).all() and (padded[:, :, width:] == 0).all()
    assert int((pixel_values != 0).sum()) == 8 * 8 + 8 * 16 + 16 * 8  # no pixel of the noise is exactly grey 127.5
    # Each row is the row alone, padded on the left.
    for row, mask, text, row_images in zip(
        batch["input_ids"].tolist(),
        batch["attention_mask"].tolist(),
        ["a seven <image>", "<image> and <image> two", "only text"],
        [images[:1], images[1:], None],
    ):
        alone = processor(text=text, images=row_images)["input_ids"][0]
        assert [token for token, keep in zip(row, mask) if keep] == alone
    # Without return_tensors: lists, each image at its own size.
    _, lists = mixed_size_call(processor)
    assert lists["image_sizes"] == [[8, 8], [8, 16], [16, 8]]
    assert [image.shape for image in lists["pixel_values"]] == [(1, 8, 8), (1, 8, 16), (1, 16, 8)]
    # One size: stacked as it is, nothing padded.
    same = processor(text=["<image>", "<image>"], images=[grey_noise(8, 16), grey_noise(8, 16, 1)], return_tensors="pt")
    assert same["pixel_values"].shape == (2, 1, 8, 16) and same["image_sizes"].tolist() == [[8, 16], [8, 16]]


def test_resized_images_take_the_slots_of_their_new_size(tokenizer):
    processor = TransfusionProcessor.from_model_config(any_size_config(tokenizer), tokenizer)
    # 28x28 -> 16x16 (64 slots); 10x30 -> 5.3x16 -> 6x16 (24 slots); 40x4 -> 16x1.6 -> 16x2 (8 slots)
    images = [grey_noise(28, 28), grey_noise(10, 30), grey_noise(40, 4)]
    batch = processor(images=[images], return_tensors="pt")
    assert batch["image_sizes"].tolist() == [[16, 16], [6, 16], [16, 2]]
    assert slot_runs(batch["input_ids"][0].tolist(), processor) == [64, 24, 8]
    assert batch["input_ids"].shape == (1, 1 + (64 + 2) + (24 + 2) + (8 + 2))
    assert batch["pixel_values"].shape == (3, 1, 16, 16)


def test_written_image_sizes(tokenizer):
    processor = TransfusionProcessor.from_model_config(any_size_config(tokenizer), tokenizer, write_image_size=True)
    _, batch = mixed_size_call(processor, return_tensors="pt")
    assert [slot_runs(row, processor) for row in batch["input_ids"].tolist()] == [[16], [32, 32], []]
    decoded = processor.batch_decode(batch["input_ids"], skip_special_tokens=True)
    assert decoded == ["a seven 8x8", " 8x16 and 16x8 two", "only text"]
    with_markers = [text.replace("<pad>", "") for text in processor.batch_decode(batch["input_ids"])]
    assert with_markers == ["<s>a seven 8x8<boi><eoi>", "<s> 8x16<boi><eoi> and 16x8<boi><eoi> two", "<s>only text"]
    # The size is text: its tokens stand right before <boi>, as tokenizing the written-out text gives them.
    row = batch["input_ids"][0][batch["attention_mask"][0] == 1].tolist()
    assert row == processor.tokenizer("a seven" + processor.image_sequence_for(8, 8))["input_ids"]
    size_ids = processor.tokenizer(" 8x8", add_special_tokens=False)["input_ids"]
    boi = row.index(processor.boi_token_id)
    assert row[boi - len(size_ids) : boi] == size_ids


def test_any_size_processor_save_load(tokenizer, tmp_path):
    config = any_size_config(tokenizer)
    processor = TransfusionProcessor.from_model_config(config, tokenizer, write_image_size=True)
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "processor_config.json").read_text())
    assert (saved["image_size_divisor"], saved["write_image_size"]) == (2, True)
    config.save_pretrained(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert type(loaded) is TransfusionProcessor
    assert (loaded.image_size_divisor, loaded.write_image_size, loaded.num_image_tokens) == (2, True, N)
    assert (loaded.image_processor.size.longest_edge, loaded.image_processor.size_divisor) == (16, 2)
    (_, expected), (_, actual) = (
        mixed_size_call(processor, return_tensors="pt"),
        mixed_size_call(loaded, return_tensors="pt"),
    )
    assert expected.keys() == actual.keys()
    for key in expected:
        assert torch.equal(expected[key], actual[key])


def test_bundled_processor_without_the_new_keys_keeps_the_old_behaviour(digit_images):
    """checkpoints/transfusion-mnist was saved before images of any size: its processor_config.json has neither
    image_size_divisor nor write_image_size. It loads as a processor of one size: 16 slots per image whatever the
    input size, no image_sizes, and the ids the code before images of any size made (written out below)."""
    saved = json.loads((BUNDLED / "processor_config.json").read_text())
    assert "image_size_divisor" not in saved and "write_image_size" not in saved
    processor = AutoProcessor.from_pretrained(BUNDLED)
    assert (processor.image_size_divisor, processor.write_image_size, processor.num_image_tokens) == (None, False, 16)
    images = [image for image, _ in digit_images[:4]]
    batch = processor(
        text=["a handwritten seven <image>", "<image> a two", "<image> and <image>"], images=images, return_tensors="pt"
    )
    assert set(batch) == {"input_ids", "attention_mask", "pixel_values"}
    image = [360] + [361] * 16 + [362]  # <boi>, 16 slots, <eoi>
    assert batch["input_ids"].tolist() == [
        [0] * 18 + [1, 67, 285, 341] + image,
        [0] * 19 + [1] + image + [289, 336],
        [1] + image + [223, 268, 70] + image,
    ]
    square = TransfusionImageProcessor(size=32, num_channels=1)
    assert torch.equal(batch["pixel_values"], square(images, return_tensors="pt")["pixel_values"])
    # Any input size becomes 32x32 and 16 slots; an image-only row is <s> + 16 slots + <boi>, <eoi>.
    for size in [(28, 28), (32, 64), (10, 30)]:
        alone = processor(images=grey_noise(*size), return_tensors="pt")
        assert alone["input_ids"].tolist() == [[1] + image] and alone["pixel_values"].shape == (1, 1, 32, 32)
        assert alone["input_ids"].shape[1] == 1 + 16 + 2


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("write_image_size", [False, True])
def test_truncation_drops_a_whole_image_of_another_size(tokenizer, side, write_image_size):
    config = any_size_config(tokenizer)
    processor = TransfusionProcessor.from_model_config(config, tokenizer, write_image_size=write_image_size)
    processor.tokenizer.truncation_side = side
    # The 16x8 image (32 slots) is cut into: on the right, the second one; on the left, the first one.
    small, tall = grey_noise(8, 8, seed=1), grey_noise(16, 8, seed=2)
    images = [small, tall] if side == "right" else [tall, small]
    text = "one <image> two <image> three"
    full = processor(text=text, images=images)["input_ids"][0]
    starts = [start for start, run in zip(*_run_starts(full, processor)) if run == 32]
    assert slot_runs(full, processor) == ([16, 32] if side == "right" else [32, 16]) and len(starts) == 1
    start = starts[0]
    max_length = start + 16 if side == "right" else len(full) - (start + 16)  # the cut falls in the middle of it
    out = processor(text=text, images=images, max_length=max_length, truncation=True, return_tensors="pt")
    ids = out["input_ids"][0].tolist()
    assert len(ids) <= max_length
    assert slot_runs(ids, processor) == [16]
    assert out["image_sizes"].tolist() == [[8, 8]]
    assert out["pixel_values"].shape == (1, 1, 8, 8)  # padded to the largest image left, not the dropped one
    assert torch.equal(out["pixel_values"][0], normalised(small))
    # The cut falls before the dropped image (after it, on the left), with its size text: never inside.
    size_text = len(processor.tokenizer(" 16x8", add_special_tokens=False)["input_ids"]) if write_image_size else 0
    expected = full[: start - 1 - size_text] if side == "right" else full[start + 32 + 1 :]
    assert ids == expected
    decoded = processor.decode(ids)
    assert "16x8" not in decoded and ("8x8" in decoded) == write_image_size


@pytest.mark.parametrize("cut", [1, 2])
def test_left_truncation_never_keeps_part_of_a_size_text(tokenizer, cut):
    processor = TransfusionProcessor.from_model_config(any_size_config(tokenizer), tokenizer, write_image_size=True)
    processor.tokenizer.truncation_side = "left"
    images = [grey_noise(8, 8, seed=1), grey_noise(16, 8, seed=2)]
    text = "one <image> two <image> three"
    full = processor(text=text, images=images)["input_ids"][0]
    size_ids = processor.tokenizer(" 8x8", add_special_tokens=False)["input_ids"]  # " 8", "x", "8"
    boi = full.index(processor.boi_token_id)
    assert full[boi - len(size_ids) : boi] == size_ids and len(size_ids) == 3
    # A cut `cut` tokens into " 8x8" would keep the 8x8 image behind a piece of its size: the image goes, whole.
    max_length = len(full) - (boi - len(size_ids) + cut)
    out = processor(text=text, images=images, max_length=max_length, truncation=True, return_tensors="pt")
    ids = out["input_ids"][0].tolist()
    assert ids == full[boi + 16 + 2 :]  # from after the 8x8 image's <eoi>
    assert out["image_sizes"].tolist() == [[16, 8]] and processor.decode(ids) == " two 16x8<boi><eoi> three"


def _run_starts(ids, processor):
    """The start and the length of each run of slots in `ids`."""
    starts = [p for p, token in enumerate(ids) if token == processor.image_token_id and ids[p - 1] != token]
    return starts, slot_runs(ids, processor)


def test_too_long_row_names_each_image_length(tokenizer):
    processor = TransfusionProcessor.from_model_config(any_size_config(tokenizer), tokenizer)
    images = [grey_noise(8, 8), grey_noise(16, 16)]
    with pytest.raises(ValueError, match=r"Row 0 is 88 tokens long with its 2 image\(s\) expanded to 18 \+ 66 tokens"):
        processor(text="a <image> b <image>", images=images, max_length=80)


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_mixed_size_batch_equals_each_row_alone_through_the_model(tokenizer, padding_side):
    """The processor's padded batch (pixel_values + image_sizes) through a model with learned 2-D positions: each
    image's diffusion_prediction is the one of its row run alone, with the same timesteps and noise."""
    config = any_size_config(tokenizer)
    processor = TransfusionProcessor.from_model_config(config, tokenizer)
    torch.manual_seed(0)
    model = TransfusionForConditionalGeneration(config).eval()
    with torch.no_grad():  # the diffusion head starts at zero (predicts nothing): perturb it
        model.model.patch_decoder.proj.weight.normal_(std=0.2)
    # The two-image row is not the longest, so that it is padded too.
    texts = ["a seven <image>", "<image> and <image> two", "a handwritten digit three written by hand <image>"]
    rows = [[grey_noise(8, 8, 1)], [grey_noise(8, 16, 2), grey_noise(16, 8, 3)], [grey_noise(16, 16, 4)]]
    batch = processor(text=texts, images=rows, padding_side=padding_side, return_tensors="pt")
    assert (batch["attention_mask"] == 0).any(-1).tolist() == [True, True, False]
    sizes = batch["image_sizes"].tolist()
    assert sizes == [[8, 8], [8, 16], [16, 8], [16, 16]]
    timesteps = torch.tensor([100, 400, 700, 900])
    noise = torch.randn(4, 1, 16, 16)  # laid out as the padded latents (identity VAE: as the pixels)
    with torch.no_grad():
        together = model(**batch, image_timesteps=timesteps, image_noise=noise).diffusion_prediction
    assert together.shape == (4, 1, 16, 16)

    first = 0
    for text, row in zip(texts, rows):
        index = list(range(first, first + len(row)))
        alone = processor(text=[text], images=[row], return_tensors="pt")
        unpadded_noise = [noise[i, :, : sizes[i][0], : sizes[i][1]] for i in index]
        with torch.no_grad():
            prediction = model(**alone, image_timesteps=timesteps[index], image_noise=unpadded_noise)
        for k, i in enumerate(index):
            height, width = sizes[i]
            own = together[i, :, :height, :width]
            assert own.abs().mean() > 0.1  # a real prediction, not the zero of an untrained head
            torch.testing.assert_close(own, prediction.diffusion_prediction[k, :, :height, :width], atol=1e-5, rtol=0)
            assert (together[i, :, height:] == 0).all() and (together[i, :, :, width:] == 0).all()
        first += len(row)
