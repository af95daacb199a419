"""pipeline() on a Transfusion checkpoint folder: the registered `text-to-image` task, and transformers' built-in
`image-text-to-text` (captioning) and `text-generation` tasks, loaded the way a user writes them."""

import numpy as np
import pytest
import torch
from transformers import pipeline
from transformers.testing_utils import CaptureLogger
from transformers.utils import logging

import modeling_transfusion as mt
from modeling_transfusion.generation_transfusion import postprocess_images

from conftest import build_sampling_model, build_tiny_config, build_tiny_tokenizer, load_digit_images

PROMPTS = ["a handwritten seven", "the number 3 written by hand"]
STEPS = 4


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random Transfusion model saved with its processor: 8x8 grey images, 16 slots each."""
    tokenizer = build_tiny_tokenizer()
    config = build_tiny_config(tokenizer)
    model = build_sampling_model(config)
    directory = tmp_path_factory.mktemp("checkpoint")
    model.save_pretrained(directory)
    mt.TransfusionProcessor.from_model_config(config, tokenizer).save_pretrained(directory)
    return str(directory)


def direct_images(directory, prompts, guidance_scale, seed):
    """What the pipeline should return, computed with generate() one prompt at a time, converted to PIL as diffusers
    does (which agrees with the processor's conversion to the grey level)."""
    model = mt.TransfusionForConditionalGeneration.from_pretrained(directory).eval()
    processor = mt.TransfusionProcessor.from_pretrained(directory)
    images = []
    for prompt in prompts:
        out = model.generate(
            **processor(text=[prompt], return_tensors="pt"),
            generation_mode="image",
            image_guidance_scale=guidance_scale,
            num_inference_steps=STEPS,
            generator=torch.Generator().manual_seed(seed),
            return_dict_in_generate=True,
            progress_bar=False,
        )
        images.append(np.asarray(postprocess_images(out.images[0][0][None], "pil")[0]))
        by_processor = np.asarray(processor.postprocess_images(out.images)[0][0])
        assert np.abs(images[-1].astype(int) - by_processor.astype(int)).max() <= 1
    return images


def test_text_to_image_pipeline_matches_generate(checkpoint):
    generator = pipeline("text-to-image", model=checkpoint)
    assert isinstance(generator, mt.TransfusionTextToImagePipeline)

    result = generator(PROMPTS[0], guidance_scale=3.0, num_inference_steps=STEPS, seed=0, progress_bar=False)
    assert set(result) == {"image"}
    assert result["image"].size == (8, 8) and result["image"].mode == "L"
    expected = direct_images(checkpoint, PROMPTS[:1], guidance_scale=3.0, seed=0)[0]
    np.testing.assert_array_equal(np.asarray(result["image"]), expected)  # guidance_scale is image guidance

    unguided = generator(PROMPTS[0], guidance_scale=1.0, num_inference_steps=STEPS, seed=0, progress_bar=False)
    assert not np.array_equal(np.asarray(unguided["image"]), expected)
    with_generator = generator(
        PROMPTS[0],
        guidance_scale=3.0,
        num_inference_steps=STEPS,
        generator=torch.Generator().manual_seed(0),
        progress_bar=False,
    )
    np.testing.assert_array_equal(np.asarray(with_generator["image"]), expected)


def test_text_to_image_pipeline_batches(checkpoint):
    generator = pipeline("text-to-image", model=checkpoint, num_inference_steps=STEPS, progress_bar=False)
    results = generator(PROMPTS, seed=0, guidance_scale=2.0)
    assert isinstance(results, list) and len(results) == 2
    expected = direct_images(checkpoint, PROMPTS, guidance_scale=2.0, seed=0)
    for result, image in zip(results, expected):
        np.testing.assert_array_equal(np.asarray(result["image"]), image)

    # Prompts of different lengths in one forward (padded), each with its own seeded generator: the same images, up
    # to the rounding of batched matrix products.
    batched = generator(PROMPTS, seed=0, guidance_scale=2.0, batch_size=2, output_type="np")
    for result, image in zip(batched, expected):
        assert result["image"].shape == (8, 8, 1) and result["image"].dtype == np.float32  # diffusers' "np": [0, 1]
        assert np.abs(result["image"][..., 0] * 255 - image.astype(int)).max() <= 1.5


def test_text_to_image_pipeline_saves_and_reloads(checkpoint, tmp_path):
    generator = pipeline("text-to-image", model=checkpoint)
    generator.save_pretrained(tmp_path / "saved")
    reloaded = pipeline("text-to-image", model=str(tmp_path / "saved"))
    kwargs = {"num_inference_steps": STEPS, "seed": 1, "guidance_scale": 2.0, "progress_bar": False}
    np.testing.assert_array_equal(
        np.asarray(reloaded(PROMPTS[1], **kwargs)["image"]), np.asarray(generator(PROMPTS[1], **kwargs)["image"])
    )


def test_text_to_image_pipeline_errors(checkpoint):
    generator = pipeline("text-to-image", model=checkpoint)
    with pytest.raises(ValueError, match="either seed or generator"):
        generator(PROMPTS[0], seed=0, generator=torch.Generator())
    with pytest.raises(ValueError, match="output_type"):
        generator(PROMPTS[0], output_type="tensor")
    model = mt.TransfusionForConditionalGeneration.from_pretrained(checkpoint)
    with pytest.raises(Exception, match="processor"):  # a model object alone does not say where its processor is
        pipeline("text-to-image", model=model)


def test_image_text_to_text_pipeline_captions(checkpoint):
    captioner = pipeline("image-text-to-text", model=checkpoint)
    image = load_digit_images(1)[0][0]
    logging.warning_once.cache_clear()  # transformers warns once per process
    with CaptureLogger(logging.get_logger("transformers.pipelines.image_text_to_text")) as captured:
        result = captioner(
            images=image,
            text="<image> a handwritten",
            max_new_tokens=6,
            return_full_text=False,
            generate_kwargs={"generation_mode": "text", "do_sample": False},
        )
    # A caption model's processor has no chat template, so the documented call is not told to use the chat format.
    assert captioner.processor.chat_template is None and "not formatted as a chat" not in captured.out
    model = mt.TransfusionForConditionalGeneration.from_pretrained(checkpoint).eval()
    processor = mt.TransfusionProcessor.from_pretrained(checkpoint)
    inputs = processor(text=["<image> a handwritten"], images=[image], return_tensors="pt")
    ids = model.generate(**inputs, generation_mode="text", max_new_tokens=6, do_sample=False)
    expected = processor.decode(ids[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert result[0]["generated_text"] == expected


def test_text_generation_pipeline(checkpoint):
    writer = pipeline("text-generation", model=checkpoint)
    result = writer("a handwritten", max_new_tokens=6, do_sample=False, generation_mode="text", return_full_text=False)
    model = mt.TransfusionForConditionalGeneration.from_pretrained(checkpoint).eval()
    processor = mt.TransfusionProcessor.from_pretrained(checkpoint)
    inputs = processor(text=["a handwritten"], return_tensors="pt")
    ids = model.generate(**inputs, generation_mode="text", max_new_tokens=6, do_sample=False)
    expected = processor.decode(ids[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert result[0]["generated_text"] == expected


# height= and width=: a tiny model of any size, max_image_size 16 > image_size 8 (identity VAE, patch 2: sides are
# multiples of 2, at most 16).


@pytest.fixture(scope="module")
def any_size_model():
    tokenizer = build_tiny_tokenizer()
    config = build_tiny_config(tokenizer, image_size=8, max_image_size=16, image_position_embedding="learned_2d")
    return build_sampling_model(config), tokenizer


def any_size_pipeline(any_size_model, write_image_size=False):
    model, tokenizer = any_size_model
    processor = mt.TransfusionProcessor.from_model_config(model.config, tokenizer, write_image_size=write_image_size)
    return pipeline("text-to-image", model=model, processor=processor, num_inference_steps=2, progress_bar=False)


class GenerateSpy:
    """Stands in for `model.generate`: records the calls, then runs the real one."""

    def __init__(self, model):
        self.generate, self.calls = model.generate, []

    def __call__(self, **kwargs):
        self.calls.append(kwargs)
        return self.generate(**kwargs)


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ({}, (8, 8)),
        ({"height": 8, "width": 16}, (8, 16)),
        ({"height": 16, "width": 8}, (16, 8)),
        ({"height": 16}, (16, 8)),
        ({"width": 4}, (8, 4)),
        ({"height": 16, "width": 16}, (16, 16)),
    ],
)
def test_text_to_image_height_and_width(any_size_model, monkeypatch, size, expected):
    generator = any_size_pipeline(any_size_model)
    spy = GenerateSpy(generator.model)
    monkeypatch.setattr(generator.model, "generate", spy)
    result = generator(PROMPTS[0], seed=0, **size)
    height, width = expected
    assert result["image"].size == (width, height)  # PIL sizes are (width, height)
    assert [(call["height"], call["width"]) for call in spy.calls] == [expected]
    array = generator(PROMPTS[0], seed=0, output_type="np", **size)["image"]
    assert array.shape == (height, width, 1)
    np.testing.assert_array_equal((array[..., 0] * 255).round(), np.asarray(result["image"]))
    # A batch of prompts: each image has the size asked for.
    batched = generator(PROMPTS, seed=0, batch_size=2, **size)
    assert [item["image"].size for item in batched] == [(width, height)] * 2


@pytest.mark.parametrize(
    ("size", "rule"),
    [
        ({"height": 7, "width": 8}, "must be multiples of 2"),
        ({"height": 8, "width": 3}, "must be multiples of 2"),
        ({"height": 18}, "at most 16x16 pixels"),
        ({"height": 16, "width": 32}, "at most 16x16 pixels"),
        ({"height": 0}, "must be positive integers"),
        ({"height": -2}, "must be positive integers"),
        ({"width": -8}, "must be positive integers"),
        ({"height": 8.5}, "must be positive integers"),
    ],
)
def test_bad_height_or_width_raises_before_generating(any_size_model, monkeypatch, size, rule):
    generator = any_size_pipeline(any_size_model)
    spy = GenerateSpy(generator.model)
    monkeypatch.setattr(generator.model, "generate", spy)
    height, width = size.get("height", 8), size.get("width", 8)
    with pytest.raises(ValueError, match=rf"^height x width {height}x{width}: .*{rule}"):
        generator(PROMPTS[0], seed=0, **size)
    with pytest.raises(ValueError, match=rf"^height x width {height}x{width}: .*{rule}"):  # when building it, too
        pipeline("text-to-image", model=generator.model, processor=generator.processor, **size)
    assert spy.calls == []


def test_one_size_model_refuses_other_sizes(checkpoint):
    generator = pipeline("text-to-image", model=checkpoint)
    with pytest.raises(ValueError, match=r"height x width 8x16: this model takes images of at most 8x8 pixels"):
        generator(PROMPTS[0], width=16)


@pytest.mark.parametrize(
    ("size", "text"), [({}, " 8x8"), ({"height": 8, "width": 16}, " 8x16"), ({"height": 16}, " 16x8")]
)
def test_prompt_ends_with_the_size_text(any_size_model, monkeypatch, size, text):
    writer, plain = any_size_pipeline(any_size_model, write_image_size=True), any_size_pipeline(any_size_model)
    spy = GenerateSpy(writer.model)  # the two pipelines share the model
    monkeypatch.setattr(writer.model, "generate", spy)
    result = writer(PROMPTS[0], seed=0, **size)
    plain(PROMPTS[0], seed=0, **size)
    written, unwritten = spy.calls
    ids = written["input_ids"][0][written["attention_mask"][0] == 1].tolist()
    processor = writer.processor
    assert ids == processor(text=[PROMPTS[0] + text])["input_ids"][0]
    size_ids = processor.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids[-len(size_ids) :] == size_ids and processor.decode(ids, skip_special_tokens=True) == PROMPTS[0] + text
    assert result["image"].size == (written["width"], written["height"])
    # A processor that does not write sizes leaves the prompt as it is.
    assert unwritten["input_ids"][0].tolist() == processor(text=[PROMPTS[0]])["input_ids"][0]
    assert (unwritten["height"], unwritten["width"]) == (written["height"], written["width"])
