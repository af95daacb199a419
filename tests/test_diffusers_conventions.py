"""diffusers' conventions in `generate` and the `text-to-image` pipeline: `num_images_per_prompt`, `latents`,
`generator`, `callback_on_step_end` (+ `callback_on_step_end_tensor_inputs`), `output_type` and `return_dict`, with
diffusers' meanings; and what the pipeline does not take, refused with a message that says what to use instead."""

import numpy as np
import pytest
import torch
from diffusers.callbacks import PipelineCallback
from transformers import pipeline

import modeling_transfusion as mt

from conftest import build_sampling_model, build_tiny_config, build_tiny_tokenizer, load_digit_images

PROMPTS = ["a handwritten seven", "the number 3 written by hand"]
STEPS = 3


@pytest.fixture(scope="module")
def model_and_processor():
    """A tiny random model (8x8 grey images, identity VAE, 16 slots) whose diffusion head is not zero."""
    tokenizer = build_tiny_tokenizer()
    config = build_tiny_config(tokenizer)
    return build_sampling_model(config), mt.TransfusionProcessor.from_model_config(config, tokenizer)


def generate(model, processor, prompts, **kwargs):
    inputs = processor(text=prompts, return_tensors="pt")
    kwargs = {"num_inference_steps": STEPS, "image_guidance_scale": 2.0, "progress_bar": False, **kwargs}
    return model.generate(**inputs, generation_mode="image", return_dict_in_generate=True, **kwargs)


def seeded(*seeds):
    return [torch.Generator().manual_seed(seed) for seed in seeds]


def test_generate_num_images_per_prompt_repeats_each_prompt(model_and_processor):
    model, processor = model_and_processor
    out = generate(model, processor, PROMPTS, num_images_per_prompt=2, generator=seeded(0, 1, 2, 3))
    prompts = processor(text=PROMPTS, return_tensors="pt")["input_ids"]
    assert torch.equal(out.sequences[:, : prompts.shape[1]], prompts.repeat_interleave(2, dim=0))  # p0, p0, p1, p1
    assert [len(row) for row in out.images] == [1, 1, 1, 1]
    for row, (prompt, seed) in enumerate([(0, 0), (0, 1), (1, 2), (1, 3)]):
        alone = generate(model, processor, PROMPTS[prompt : prompt + 1], generator=seeded(seed))
        torch.testing.assert_close(out.images[row][0], alone.images[0][0], atol=1e-5, rtol=0)
    assert not torch.equal(out.images[0][0], out.images[1][0])  # two images of one prompt differ

    # The images of a prompt are repeated with it.
    image = load_digit_images(1)[0][0]
    inputs = processor(text=["<image> a two and a seven"], images=[image], return_tensors="pt")
    both = model.generate(**inputs, generation_mode="image", num_images_per_prompt=2, generator=seeded(4, 5),
                          return_dict_in_generate=True, num_inference_steps=STEPS, progress_bar=False)  # fmt: skip
    second = model.generate(**inputs, generation_mode="image", generator=seeded(5), return_dict_in_generate=True,
                            num_inference_steps=STEPS, progress_bar=False)  # fmt: skip
    torch.testing.assert_close(both.images[1][0], second.images[0][0], atol=1e-5, rtol=0)

    with pytest.raises(ValueError, match="in generation_mode='interleaved', ask for several sequences"):
        model.generate(**processor(text=PROMPTS[:1], return_tensors="pt"), num_images_per_prompt=2)


def test_generate_latents_are_the_starting_noise(model_and_processor):
    model, processor = model_and_processor
    noise = torch.randn((2, 1, 8, 8), generator=torch.Generator().manual_seed(7))
    from_latents = generate(model, processor, PROMPTS, latents=noise)
    from_generator = generate(model, processor, PROMPTS, generator=torch.Generator().manual_seed(7))
    for row in range(2):
        assert torch.equal(from_latents.images[row][0], from_generator.images[row][0])
    with pytest.raises(
        ValueError, match=r"latents must be one tensor of the shape .* = \(2, 1, 8, 8\) .*\(2, 1, 4, 4\)"
    ):
        generate(model, processor, PROMPTS, latents=torch.randn(2, 1, 4, 4))
    with pytest.raises(ValueError, match="latents is the starting noise of the image generation_mode='image' opens"):
        model.generate(**processor(text=PROMPTS, return_tensors="pt"), latents=noise, max_new_tokens=20)


def test_generate_callback_on_step_end(model_and_processor):
    model, processor = model_and_processor
    calls = []

    def callback(caller, step_index, timestep, callback_kwargs):
        calls.append((caller, step_index, int(timestep), tuple(callback_kwargs["latents"].shape)))
        if step_index == STEPS - 1:  # replace the final latents: the image becomes what they decode to
            return {"latents": torch.zeros_like(callback_kwargs["latents"])}
        return callback_kwargs

    out = generate(model, processor, PROMPTS, callback_on_step_end=callback, output_type="pt")
    assert [(caller is model, step) for caller, step, _, _ in calls] == [(True, 0), (True, 1), (True, 2)]
    assert [timestep for _, _, timestep, _ in calls] == [666, 333, 0] and calls[0][3] == (2, 1, 8, 8)
    assert all(torch.equal(row[0], torch.full((1, 8, 8), 0.5)) for row in out.images)  # identity VAE: 0 is grey

    class Recorder(PipelineCallback):  # diffusers' callback objects bring their tensor_inputs
        tensor_inputs = ["latents"]

        def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
            calls.append(sorted(callback_kwargs))
            return callback_kwargs

    calls.clear()
    generate(model, processor, PROMPTS, callback_on_step_end=Recorder())
    assert calls == [["latents"]] * STEPS
    with pytest.raises(ValueError, match=r"asks for \['prompt_embeds'\]; the denoising loop offers \['latents'\]"):
        generate(model, processor, PROMPTS, callback_on_step_end=callback,
                 callback_on_step_end_tensor_inputs=["prompt_embeds"])  # fmt: skip


def test_generate_output_type_and_return_dict(model_and_processor):
    model, processor = model_and_processor
    kwargs = {"generator": torch.Generator().manual_seed(0)}
    default = generate(model, processor, PROMPTS[:1], **kwargs).images[0][0]  # in [-1, 1]
    outputs = {
        output_type: generate(
            model, processor, PROMPTS[:1], generator=torch.Generator().manual_seed(0), output_type=output_type
        )  # fmt: skip
        for output_type in ("pt", "np", "pil", "latent")
    }
    as_pt = outputs["pt"].images[0][0]
    torch.testing.assert_close(as_pt, (default / 2 + 0.5).clamp(0, 1))
    as_np = outputs["np"].images[0][0]
    assert as_np.dtype == np.float32 and as_np.shape == (8, 8, 1)
    np.testing.assert_allclose(as_np, as_pt.permute(1, 2, 0).numpy())
    np.testing.assert_array_equal(np.asarray(outputs["pil"].images[0][0]), (as_np[..., 0] * 255).round())
    latent = outputs["latent"]
    assert torch.equal(latent.images[0][0], latent.image_latents[0][0])  # not decoded
    with pytest.raises(ValueError, match=r"output_type must be one of \['pil', 'np', 'pt', 'latent'\]"):
        generate(model, processor, PROMPTS[:1], output_type="tensor")

    inputs = processor(text=PROMPTS[:1], return_tensors="pt")
    as_dict = model.generate(**inputs, generation_mode="image", return_dict=True, num_inference_steps=1,
                             progress_bar=False)  # fmt: skip
    assert isinstance(as_dict, mt.TransfusionGenerateOutput) and len(as_dict.images) == 1
    sequences = model.generate(**inputs, generation_mode="image", return_dict=False, num_inference_steps=1,
                               progress_bar=False)  # fmt: skip
    assert isinstance(sequences, torch.Tensor)
    with pytest.raises(ValueError, match="return_dict and return_dict_in_generate name the same choice"):
        model.generate(**inputs, generation_mode="image", return_dict=False, return_dict_in_generate=True)


@pytest.fixture(scope="module")
def text_to_image(model_and_processor):
    model, processor = model_and_processor
    return pipeline(
        "text-to-image",
        model=model,
        processor=processor,
        num_inference_steps=STEPS,
        guidance_scale=2.0,
        progress_bar=False,
    )


def test_pipeline_num_images_per_prompt_seed_and_generators(text_to_image):
    results = text_to_image(PROMPTS, num_images_per_prompt=2, seed=10, output_type="np", batch_size=2)
    assert [len(images) for images in results] == [2, 2]  # one list of dicts per prompt
    for prompt, images in zip(PROMPTS, results):
        for k, result in enumerate(images):  # image k of a prompt: as alone with seed + k
            alone = text_to_image(prompt, seed=10 + k, output_type="np")["image"]
            np.testing.assert_allclose(result["image"], alone, atol=1e-5)
    assert not np.array_equal(results[0][0]["image"], results[0][1]["image"])

    for batch_size in (1, 2):  # one generator per image, split along the prompts, in batches or not
        listed = text_to_image(PROMPTS, num_images_per_prompt=2, generator=seeded(10, 11, 10, 11), output_type="np",
                               batch_size=batch_size)  # fmt: skip
        for images, expected in zip(listed, results):
            for result, image in zip(images, expected):
                np.testing.assert_allclose(result["image"], image["image"], atol=1e-5)
    with pytest.raises(ValueError, match=r"Got 3 generator for 2 prompt\(s\)"):
        text_to_image(PROMPTS, generator=seeded(0, 1, 2))


def test_pipeline_latents_callback_output_type_return_dict(text_to_image, model_and_processor):
    model, processor = model_and_processor
    noise = torch.randn((4, 1, 8, 8), generator=torch.Generator().manual_seed(3))
    by_latents = text_to_image(PROMPTS, latents=noise, num_images_per_prompt=2, output_type="pt", batch_size=1)
    direct = generate(model, processor, PROMPTS, latents=noise, num_images_per_prompt=2, output_type="pt")
    flat = [result["image"] for images in by_latents for result in images]
    for image, row in zip(flat, direct.images):
        torch.testing.assert_close(image, row[0], atol=1e-5, rtol=0)

    calls = []

    def callback(caller, step_index, timestep, callback_kwargs):
        calls.append((type(caller).__name__, step_index))
        return callback_kwargs

    latent = text_to_image(PROMPTS[0], seed=0, output_type="latent", callback_on_step_end=callback)["image"]
    assert calls == [("TransfusionTextToImagePipeline", step) for step in range(STEPS)]  # diffusers: the pipeline
    assert latent.shape == (1, 8, 8)

    (images,) = text_to_image(PROMPTS[0], seed=0, num_images_per_prompt=3, output_type="pt", return_dict=False)
    assert images.shape == (3, 1, 8, 8) and 0 <= images.min() and images.max() <= 1
    (pictures,) = text_to_image(PROMPTS[0], seed=0, return_dict=False)
    assert len(pictures) == 1 and pictures[0].size == (8, 8)


@pytest.mark.parametrize(
    ("argument", "instead"),
    [
        ("negative_prompt", "not implemented: guidance here is against the image slots blind to the prompt"),
        ("prompt_embeds", "pass the prompt as text"),
        ("eta", "pass a configured diffusers scheduler instance as scheduler="),
        ("timesteps", "pass num_inference_steps"),
        ("cross_attention_kwargs", "Transfusion has no cross-attention"),
        ("callback", "use callback_on_step_end"),
        ("max_new_tokens", r"other arguments of model.generate go in generate_kwargs=\{...\}"),
    ],
)
def test_pipeline_refuses_what_it_does_not_take(text_to_image, model_and_processor, argument, instead):
    with pytest.raises(ValueError, match=rf"does not take {argument}\..*{instead}"):
        text_to_image(PROMPTS[0], **{argument: 1})
    if argument != "max_new_tokens":  # (which, when building it, goes to its generation config, as in transformers)
        model, processor = model_and_processor
        with pytest.raises(ValueError, match=rf"does not take {argument}\."):  # when building it, too
            pipeline("text-to-image", model=model, processor=processor, **{argument: 1})
