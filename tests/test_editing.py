"""Tests of image editing: the edit data's exact targets, the three-branch guidance of `generate` (each branch equals
its prefix run alone; the scales combine the branches linearly), chained edits that read only the new instruction
from the KV cache, and the text-to-image pipeline's `image=` entry."""

import random

import numpy as np
import pytest
import torch
from transformers import pipeline

from modeling_transfusion import TransfusionProcessor
from modeling_transfusion.generation_transfusion import sampling_scheduler
from modeling_transfusion.recipes.editing import (
    CHANGED_HALF,
    EDIT_KINDS,
    EDIT_TEMPLATES,
    EditExample,
    apply_edit,
    edit_record_text,
    make_edits,
)
from modeling_transfusion.recipes.evaluation import edit_images, edit_metrics
from modeling_transfusion.recipes.training import LatentDataCollator, LatentEditDataset

from conftest import build_sampling_model

INSTRUCTION = "turn it over"


@pytest.fixture(scope="module")
def digits():
    """40 random 32 x 32 "digits" (uint8) with labels 0-9 four times each."""
    rng = np.random.default_rng(0)
    images = (rng.random((40, 32, 32)) > 0.7).astype(np.uint8) * 255
    return images, np.arange(40) % 10


@pytest.fixture
def sizing_processor(tokenizer, tiny_config):
    """A processor for the tiny config that writes each image's size before its `<boi>` (" 8x8")."""
    return TransfusionProcessor.from_model_config(tiny_config, tokenizer, write_image_size=True)


@pytest.fixture
def model(tiny_config):
    return build_sampling_model(tiny_config)


def edit_prompt(processor, digit_images, texts=(INSTRUCTION,)):
    pictures = [image for image, _ in digit_images[: len(texts)]]
    text = [f"<image> {t}" + processor.render_image_size(8, 8) for t in texts]
    return processor(text=text, images=pictures, padding_side="left", return_tensors="pt")


def generate(model, batch, processor, **kwargs):
    kwargs.setdefault("num_inference_steps", 3)
    kwargs.setdefault("output_type", "latent")
    kwargs.setdefault("generator", [torch.Generator().manual_seed(0)])
    return model.generate(
        **batch,
        generation_mode="image",
        tokenizer=processor.tokenizer,
        return_dict_in_generate=True,
        progress_bar=False,
        **kwargs,
    )


# The data


def test_edit_targets_are_exact(digits):
    images, labels = digits
    digit, pair = images[3], np.concatenate([images[1], images[2]], axis=1)
    rotated, same = apply_edit("rotate", digit, (3,))
    assert same == (3,) and np.array_equal(apply_edit("rotate", rotated, (3,))[0], digit)
    assert np.array_equal(rotated[0], digit[-1, ::-1])
    mirrored = apply_edit("mirror", digit, (3,))[0]
    assert np.array_equal(mirrored[:, 0], digit[:, -1])
    thicker, thinner = (apply_edit(kind, digit, (3,))[0] for kind in ("thicker", "thinner"))
    assert (thicker >= digit).all() and (thinner <= digit).all()
    assert thicker.sum() > digit.sum() > thinner.sum()
    removed, kept = apply_edit("remove", pair, (1, 2))
    assert kept == (1,) and np.array_equal(removed, images[1])
    swapped, order = apply_edit("swap", pair, (1, 2))
    assert order == (2, 1) and np.array_equal(swapped[:, :32], images[2]) and np.array_equal(swapped[:, 32:], images[1])
    added, pair_digits = apply_edit("add", digit, (3,), (images[7], 7))
    assert added.shape == (32, 64) and pair_digits == (3, 7) and np.array_equal(added[:, :32], digit)
    replaced, new_digits = apply_edit("replace", pair, (1, 2), (images[9], 9))
    assert new_digits == (9, 2) and np.array_equal(replaced[:, 32:], images[2])
    with pytest.raises(ValueError, match="does not apply to an image of shape"):
        apply_edit("swap", digit, (3,))
    with pytest.raises(ValueError, match="Unknown edit kind"):
        apply_edit("blur", digit, (3,))


def test_make_edits_draws_every_kind_with_its_phrasings_and_chains(digits):
    images, labels = digits
    examples = make_edits(images, labels, 160, seed=0, chain_share=0.5)
    assert [e.kinds[0] for e in examples[: len(EDIT_KINDS)]] == list(EDIT_KINDS)
    for kind in set(EDIT_KINDS) - set(CHANGED_HALF):
        assert {e.instructions[0] for e in examples if e.kinds[0] == kind} == set(EDIT_TEMPLATES[kind]), kind
    chained = [e for e in examples if len(e.instructions) == 2]
    assert 40 <= len(chained) <= 120
    for example in examples:
        for step, kind in enumerate(example.kinds):
            new = None
            if example.asked[step] is not None:
                half = slice(32, 64) if kind == "add" else slice(0, 32)
                new = (example.images[step + 1][:, half], example.asked[step])
            target, digits_after = apply_edit(kind, example.images[step], example.labels[step], new)
            assert np.array_equal(target, example.images[step + 1]) and digits_after == example.labels[step + 1]
            # A new digit is one of the given images, of the asked class.
            if new is not None:
                assert any(np.array_equal(new[0], image) for image in images[labels == new[1]])


def test_record_text_drops_the_instruction_or_the_source(digits):
    images, labels = digits
    (example,) = make_edits(images, labels, 1, seed=1, kinds=("mirror",))
    rng = random.Random(0)
    texts = [edit_record_text(example, rng, drop_instruction=0.25, drop_source=0.25) for _ in range(400)]
    full = f"<image> {example.instructions[0]} <image>"
    counts = {text: texts.count(text) for text in set(texts)}
    assert set(counts) == {full, "<image> <image>", f" {example.instructions[0]} <image>"}
    assert 60 <= counts["<image> <image>"] <= 140 and 150 <= counts[full] <= 250


def test_edit_records_carry_no_loss_on_their_instructions(sizing_processor):
    example = EditExample([np.zeros((8, 8), np.uint8)] * 3, ["mirror it", "swap them"], ["mirror"] * 2, [None] * 2)
    dataset = LatentEditDataset([[torch.zeros(1, 8, 8)] * 3], [example], drop_instruction=0, drop_source=0)
    batch = LatentDataCollator(sizing_processor, vae_downsample_factor=1)([dataset[0]])
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    decode = sizing_processor.tokenizer.decode
    without_loss = (labels == -100) & (ids != sizing_processor.image_token_id)
    assert decode(ids[without_loss]).split() == ["mirror", "it", "swap", "them"]
    # The sizes the model writes before each image, the image markers and the end of text keep their loss.
    assert decode(ids[labels != -100]) == "<s> 8x8<boi><eoi> 8x8<boi><eoi> 8x8<boi><eoi></s>"
    # Without its instruction an edit trains the images alone: its size text would follow the source image, where a
    # caption belongs (a model trained so captions an image by writing a size).
    one = EditExample([np.zeros((8, 8), np.uint8)] * 2, ["mirror it"], ["mirror"], [None])
    dropped = LatentEditDataset([[torch.zeros(1, 8, 8)] * 2], [one], drop_instruction=1, drop_source=0)[0]
    kept = LatentEditDataset([[torch.zeros(1, 8, 8)] * 2], [one], drop_instruction=0, drop_source=0)[0]
    no_source = LatentEditDataset([[torch.zeros(1, 8, 8)] * 2], [one], drop_instruction=0, drop_source=1)[0]
    batch = LatentDataCollator(sizing_processor, vae_downsample_factor=1)([dropped, kept, no_source])
    assert dropped["text"] == "<image> <image>" and (batch["labels"][0] == -100).all()
    assert decode(batch["input_ids"][1][batch["labels"][1] != -100]) == "<s> 8x8<boi><eoi> 8x8<boi><eoi></s>"
    assert decode(batch["input_ids"][2][batch["labels"][2] != -100]) == "<s> 8x8<boi><eoi></s>"


# Guidance


class RecordBranches:
    """Records the latents, timesteps and prediction of each denoising step (the rows of every branch)."""

    def __init__(self, model):
        self.model, self.calls = model, []

    def __enter__(self):
        transfusion = self.model.model
        self.hooks = [
            transfusion.patch_encoder.register_forward_hook(
                lambda module, args, output: self.calls.append({"latents": args[0].clone(), "t": args[1].clone()})
            ),
            transfusion.patch_decoder.register_forward_hook(
                lambda module, args, output: self.calls[-1].update(prediction=output.clone())
            ),
        ]
        return self

    def __exit__(self, *exc):
        for hook in self.hooks:
            hook.remove()


@torch.no_grad()
def uncached_prediction(model, input_ids, images, latents, timestep):
    """The prediction for the last image of `input_ids`, at `latents` and `timestep`, from one forward of the whole
    sequence without a cache; the earlier `images` (latents) are clean."""
    transfusion = model.model
    slots = input_ids == model.config.image_token_id
    embeds = model.get_input_embeddings()(input_ids)
    clean = [transfusion.embed_latents(image[None], torch.zeros(1, dtype=torch.long))[0] for image in images]
    noised, encoder_state = transfusion.embed_latents(latents[None], timestep.view(1))
    embeds[slots] = torch.cat([*clean, noised], 1).reshape(-1, embeds.shape[-1]).to(embeds.dtype)
    mask = transfusion.get_attention_mask(embeds, slots, None, None, None)
    hidden = transfusion.language_model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
    return transfusion.get_image_prediction(hidden[slots][-noised.shape[1] :][None], encoder_state)[0]


def test_each_editing_branch_equals_its_prefix_run_alone(model, sizing_processor, digit_images):
    processor, tokenizer = sizing_processor, sizing_processor.tokenizer
    batch = edit_prompt(processor, digit_images)
    source = model.encode_images(batch["pixel_values"])[0]
    with RecordBranches(model) as recorder:
        generate(model, batch, processor, image_guidance_scale=3.0, source_image_guidance_scale=2.0)
    steps = [call for call in recorder.calls if call["latents"].shape[0] == 3]
    assert len(steps) == 3  # one per denoising step: full, without the instruction, without the source

    def ids(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    bos, boi, eoi, image = tokenizer.bos_token_id, model.config.boi_token_id, model.config.eoi_token_id, 16
    slot = model.config.image_token_id
    source_ids = ids(" 8x8") + [boi] + [slot] * image + [eoi]
    target_ids = [boi] + [slot] * image
    prefixes = {
        "full": ([bos] + source_ids + ids(f" {INSTRUCTION} 8x8") + target_ids, [source]),
        "no instruction": ([bos] + source_ids + ids(" 8x8") + target_ids, [source]),
        "no source": ([bos] + ids(f" {INSTRUCTION} 8x8") + target_ids, []),
    }
    assert prefixes["full"][0] == batch["input_ids"][0].tolist() + target_ids
    for step in steps:
        for branch, (tokens, images) in enumerate(prefixes.values()):
            expected = uncached_prediction(
                model, torch.tensor([tokens]), images, step["latents"][branch], step["t"][branch]
            )
            torch.testing.assert_close(step["prediction"][branch], expected, atol=1e-5, rtol=1e-5)


def test_the_two_scales_combine_the_three_branches(model, sizing_processor, digit_images):
    batch = edit_prompt(sizing_processor, digit_images)

    def edited(instruction, source):
        after_first_step = []
        with RecordBranches(model) as recorder:
            generate(
                model,
                batch,
                sizing_processor,
                num_inference_steps=2,
                scheduler="ddim",
                image_guidance_scale=instruction,
                source_image_guidance_scale=source,
                callback_on_step_end=lambda model, step, t, tensors: after_first_step.append(tensors["latents"]),
            )
        first_step = next(call for call in recorder.calls if call["t"].max() > 0)  # not the source's encoding
        return after_first_step[0][0], first_step

    plain, _ = edited(1.0, 1.0)
    scheduler = sampling_scheduler(model.noise_scheduler, "ddpm", "ddim")
    scheduler.set_timesteps(2)
    for instruction, source in [(3.0, 1.0), (1.0, 2.5), (3.0, 2.5), (1.0, 0.5)]:
        latents, step = edited(instruction, source)
        full, *others = step["prediction"]
        assert len(others) == (instruction != 1) + (source != 1)  # a scale of 1 skips its branch
        no_instruction = others[0] if instruction != 1 else full
        no_source = others[-1] if source != 1 else full
        guided = full + (instruction - 1) * (full - no_instruction) + (source - 1) * (full - no_source)
        expected = scheduler.step(guided[None], scheduler.timesteps[0], step["latents"][:1]).prev_sample[0]
        torch.testing.assert_close(latents, expected, atol=1e-5, rtol=1e-5)
        assert (latents - plain).abs().mean() > 1e-4  # each guidance moves the image


def test_editing_guidance_applies_to_edits_and_leaves_text_to_image_rows_to_ordinary_guidance(
    model, sizing_processor, digit_images
):
    # A batch of an edit and a text-to-image prompt (as an edit checkpoint's generation config, with its source scale,
    # is used for plain prompts too): each row is denoised as it would be alone.
    edit = edit_prompt(sizing_processor, digit_images)
    seven = "a handwritten seven" + sizing_processor.render_image_size(8, 8)
    text = sizing_processor(text=[seven])
    prompts = sizing_processor.tokenizer.pad(
        {"input_ids": [edit["input_ids"][0].tolist(), text["input_ids"][0]]}, padding_side="left", return_tensors="pt"
    )
    batch = {**prompts, "pixel_values": edit["pixel_values"], "image_sizes": edit["image_sizes"]}
    generators = [torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)]
    scales = {"image_guidance_scale": 3.0, "source_image_guidance_scale": 2.0}
    both = generate(model, batch, sizing_processor, generator=generators, **scales).images
    alone_edit = generate(model, edit, sizing_processor, **scales).images
    alone_text = model.generate(
        **sizing_processor(text=[seven], return_tensors="pt"),
        generation_mode="image", generator=[torch.Generator().manual_seed(1)], num_inference_steps=3,
        output_type="latent", return_dict_in_generate=True, progress_bar=False, image_guidance_scale=3.0,
    ).images  # fmt: skip
    torch.testing.assert_close(both[0], alone_edit[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(both[1], alone_text[0], atol=1e-5, rtol=1e-5)
    unguided = generate(model, batch, sizing_processor, generator=generators, image_guidance_scale=1.0).images
    assert (both[1][0] - unguided[1][0]).abs().mean() > 1e-4  # the text-to-image row is guided


def test_editing_guidance_needs_an_instruction(model, processor, digit_images):
    no_instruction = processor(text=["<image>"], images=[digit_images[0][0]], return_tensors="pt")
    with pytest.raises(ValueError, match="has no instruction between its source image"):
        generate(model, no_instruction, processor, source_image_guidance_scale=2.0)
    with pytest.raises(ValueError, match="source_image_guidance_scale must be"):
        generate(model, edit_prompt(processor, digit_images), processor, source_image_guidance_scale=float("nan"))


# Chained edits


def test_a_chained_edit_reads_only_the_new_instruction_and_equals_the_whole_sequence(
    model, sizing_processor, digit_images
):
    processor = sizing_processor
    pixels = processor(text=["<image>"] * 2, images=[image for image, _ in digit_images[:2]], return_tensors="pt")
    sources = pixels["pixel_values"]
    second = ["now mirror it", "swap"]  # of different lengths: the shorter is padded, masked, inside the sequence
    lengths = []
    hook = model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: lengths.append(kwargs["inputs_embeds"].shape[1]), with_kwargs=True
    )
    try:
        calls = len(lengths)
        first, chained = edit_images(
            model,
            processor,
            sources,
            [[INSTRUCTION] * 2, second],
            [(8, 8), (8, 8)],
            seeds=[0, 1],
            num_inference_steps=2,
            image_guidance_scale=2.0,
            source_image_guidance_scale=1.5,
            progress_bar=False,
            output_type="latent",
        )
    finally:
        hook.remove()
    calls = lengths[calls:]
    tail = processor.tokenizer([f" {text} 8x8" for text in second], padding=True)["input_ids"]
    # Edit 2 reads the first edit's <eoi> (not yet cached) and the new instruction, nothing of the history: the only
    # forward as long as a history is the first prompt's.
    assert len(tail[0]) + 1 in calls and [n for n in calls if n > 2 * 16] == [calls[0]]
    for row in range(2):
        text = f"<image> {INSTRUCTION}<image> {second[row]} 8x8"
        batch = processor(text=[text], images=[digit_images[row][0]] * 2, return_tensors="pt")
        fresh = model.generate(
            input_ids=batch["input_ids"],
            image_latents=[model.encode_images(sources[row : row + 1])[0], first[row]],
            generation_mode="image",
            height=8,
            width=8,
            tokenizer=processor.tokenizer,
            generator=[torch.Generator().manual_seed(row * 31 + 1)],
            num_inference_steps=2,
            image_guidance_scale=2.0,
            source_image_guidance_scale=1.5,
            progress_bar=False,
            return_dict_in_generate=True,
            output_type="latent",
        )
        torch.testing.assert_close(chained[row], fresh.images[0][0], atol=1e-4, rtol=1e-4)


def test_edit_metrics_against_the_baselines():
    torch.manual_seed(0)
    targets = torch.rand(4, 1, 32, 32) * 2 - 1
    sources = targets.flip(-1)

    class Judge(torch.nn.Module):  # classifies every half as a 7
        def embed(self, images):
            return images.flatten(1)

        def head(self, features):
            return torch.nn.functional.one_hot(torch.full((len(features),), 7), 10).float()

    exact = edit_metrics(Judge(), "mirror", sources, targets, targets, [None] * 4, round_trip=targets + 0.1)
    assert exact["mse"] == 0 and exact["mse_unedited_source"] > 0.1 and exact["meets_target"]
    assert exact["mse_vae_round_trip"] == pytest.approx(0.01)
    unedited = edit_metrics(Judge(), "mirror", sources, targets, sources, [None] * 4, round_trip=targets)
    assert unedited["mse_ratio"] == 1 and not unedited["meets_target"]
    pairs = torch.cat([sources, targets], -1)
    added = edit_metrics(Judge(), "add", sources, pairs, pairs, [7, 7, 7, 1], round_trip=pairs + 0.1)
    assert added["asked_digit_accuracy"] == 0.75 and added["kept_half_mse"] == 0 and not added["meets_target"]
    removed = edit_metrics(Judge(), "remove", pairs, sources, sources, [None] * 4, round_trip=sources)
    assert removed["mse"] == 0 and removed["mse_unedited_source"] > 0  # the unedited pair, squeezed to 32 x 32


# The pipeline


def test_the_pipeline_edits_with_diffusers_names(model, sizing_processor, digit_images):
    edit = pipeline("text-to-image", model=model, processor=sizing_processor)
    image = digit_images[0][0]
    scales = {"guidance_scale": 2.0, "image_guidance_scale": 1.5}  # diffusers' (InstructPix2Pix's) names
    result = edit(
        INSTRUCTION, image=image, height=8, width=8, num_inference_steps=3, seed=0, output_type="pt", **scales
    )
    result = result["image"]
    batch = edit_prompt(sizing_processor, digit_images)
    direct = generate(
        model,
        batch,
        sizing_processor,
        height=8,
        width=8,
        image_guidance_scale=2.0,
        source_image_guidance_scale=1.5,
        output_type="pt",
    )
    torch.testing.assert_close(result, direct.images[0][0])
    with pytest.raises(ValueError, match="image_guidance_scale guides an edit on its source image"):
        edit(INSTRUCTION, image_guidance_scale=1.5)
    with pytest.raises(ValueError, match="Got 2 images for 1 prompt"):
        edit(INSTRUCTION, image=[image, image])
