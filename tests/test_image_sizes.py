"""Images of any size: per-image shapes in one batch, 2-D patch positions, `height`/`width` at generation, sizes the
model writes itself, and the fixed-size checkpoint left exactly as it was.

The tiny model reads images without a VAE (latents are pixels) in 2x2 patches, so an image of h x w pixels takes
(h / 2) x (w / 2) slots: 8x8 -> 16, 8x16 and 16x8 -> 32."""

import pytest
import torch
from fixed_size_reference import compute as compute_fixed_size_reference
from safetensors.torch import load_file
from transformers import LogitsProcessor, LogitsProcessorList

from modeling_transfusion import TransfusionConfig, TransfusionForConditionalGeneration, patchify

from conftest import build_tiny_config, build_tiny_tokenizer
from test_generation import BOI, EOI, IMAGE, PAD, OpenImageAt, RecordDenoiser, generate, left_pad, tiny_config

SLOTS = {(8, 8): 16, (8, 16): 32, (16, 8): 32}


def sized_model(position_embedding="learned_2d", objective="ddpm", seed=0):
    torch.manual_seed(seed)
    config = tiny_config(objective, max_image_size=16, image_position_embedding=position_embedding)
    config.text_config.max_position_embeddings = 512
    model = TransfusionForConditionalGeneration(config).eval()
    torch.nn.init.normal_(model.model.patch_decoder.proj.weight, std=0.2)  # zero-initialised for training
    return model


@pytest.fixture(scope="module")
def model():
    return sized_model()


def image(size):
    return [BOI] + [IMAGE] * SLOTS[size] + [EOI]


# Config


def test_config_checks_sizes_with_errors_that_name_the_rule():
    config = tiny_config(max_image_size=16)
    assert (config.image_size_divisor, config.max_grid_size, config.grid_size(8, 16)) == (2, 8, (4, 8))
    assert config.check_image_size(16, 8) == (16, 8)
    for size, rule in [
        ((9, 8), "multiples of 2"),
        ((8, 18), "at most 16x16"),
        ((0, 8), "positive integers"),
        ((-2, 8), "positive integers"),
        ((8.5, 8), "positive integers"),
        ((True, 8), "positive integers"),
    ]:
        with pytest.raises(ValueError, match=rule):
            config.check_image_size(*size)
    with pytest.raises(ValueError, match=r"max_image_size \(12\) must be divisible by .* = 8"):
        TransfusionConfig(image_size=8, max_image_size=12, patch_size=8, num_channels=1)
    with pytest.raises(ValueError, match=r"max_image_size \(8\) must be at least image_size \(16\)"):
        TransfusionConfig(image_size=16, max_image_size=8, num_channels=1)
    with pytest.raises(ValueError, match="Unknown image_position_embedding 'sincos'"):
        TransfusionConfig(image_position_embedding="sincos")


def test_a_fixed_size_config_reads_as_before(tmp_path):
    """A config written before images of any size (no `max_image_size`, no position embedding) means one size."""
    saved = TransfusionConfig.from_pretrained("checkpoints/transfusion-mnist")
    assert (saved.image_size, saved.max_image_size, saved.image_position_embedding) == (32, 32, None)
    model = sized_model()
    model.save_pretrained(tmp_path)
    again = TransfusionForConditionalGeneration.from_pretrained(tmp_path)
    assert (again.config.max_image_size, again.config.image_position_embedding) == (16, "learned_2d")
    assert again.config.format_version == 2
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, again.state_dict()[name]), name


def test_the_fixed_size_checkpoint_computes_exactly_what_it_did():
    reference = load_file("tests/data/fixed_size_reference.safetensors")
    current = compute_fixed_size_reference()
    assert current.keys() == reference.keys()
    for name, tensor in reference.items():
        if tensor.is_floating_point():
            # Bit for bit on a CPU like the one that wrote the reference; another CPU's float kernels round otherwise
            # (seen on an AMD EPYC: 1e-5 on logits of up to 15, 1.3e-6 on latents), far below any real change.
            torch.testing.assert_close(current[name], tensor, atol=1e-4, rtol=1e-5, msg=name)
        else:
            assert torch.equal(current[name], tensor), name  # the same ids: prompts, captions


# One batch of several sizes


def mixed_batch():
    """Row 0: an 8x8 then an 8x16 image; row 1: a 16x8 image, right-padded. Latents, timesteps and noise fixed."""
    rows = [[5] + image((8, 8)) + [6] + image((8, 16)) + [7], [9] + image((16, 8)) + [10]]
    width = max(map(len, rows))
    input_ids = torch.tensor([row + [PAD] * (width - len(row)) for row in rows])
    attention_mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows])
    generator = torch.Generator().manual_seed(0)
    latents = [torch.randn(1, *size, generator=generator) for size in [(8, 8), (8, 16), (16, 8)]]
    noise = [torch.randn(x.shape, generator=generator) for x in latents]
    return input_ids, attention_mask, latents, noise, torch.tensor([100, 400, 700])


@torch.no_grad()
def test_mixed_sizes_in_one_batch_equal_each_row_alone(model):
    input_ids, attention_mask, latents, noise, timesteps = mixed_batch()
    batch = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        image_latents=latents,
        image_noise=noise,
        image_timesteps=timesteps,
        labels=input_ids,
    )
    assert batch.diffusion_prediction.shape == (3, 1, 16, 16)  # padded to the largest height and width
    assert batch.image_sizes.tolist() == [[8, 8], [8, 16], [16, 8]]
    alone = []
    for row, images in [(0, [0, 1]), (1, [2])]:
        length = int(attention_mask[row].sum())
        out = model(
            input_ids=input_ids[row : row + 1, :length],
            image_latents=[latents[i] for i in images],
            image_noise=[noise[i] for i in images],
            image_timesteps=timesteps[images],
        )
        torch.testing.assert_close(batch.logits[row, :length], out.logits[0], atol=1e-5, rtol=1e-5)
        for k, i in enumerate(images):
            height, width = latents[i].shape[1:]
            prediction = batch.diffusion_prediction[i, :, :height, :width]
            torch.testing.assert_close(prediction, out.diffusion_prediction[k, :, :height, :width], atol=1e-5, rtol=0)
            assert (
                not batch.diffusion_prediction[i, :, height:].any()
                and not batch.diffusion_prediction[i, :, :, width:].any()
            )
            alone.append(((prediction - batch.diffusion_target[i, :, :height, :width]) ** 2).mean())
    # Each image's squared error is averaged over its own pixels, then over the images.
    torch.testing.assert_close(batch.diffusion_loss, torch.stack(alone).mean())


@torch.no_grad()
def test_padded_latents_with_image_sizes_equal_a_list(model):
    input_ids, attention_mask, latents, noise, timesteps = mixed_batch()
    padded = torch.zeros(3, 1, 16, 16)
    padded_noise = torch.full((3, 1, 16, 16), float("nan"))  # what lies outside an image is never read
    for i, (x, n) in enumerate(zip(latents, noise)):
        padded[i, :, : x.shape[1], : x.shape[2]] = x
        padded_noise[i, :, : x.shape[1], : x.shape[2]] = n
    common = {"input_ids": input_ids, "attention_mask": attention_mask, "image_timesteps": timesteps}
    as_list = model(**common, image_latents=latents, image_noise=noise, labels=input_ids)
    sizes = torch.tensor([[8, 8], [8, 16], [16, 8]])
    assert torch.equal(
        as_list.logits, model(**common, image_latents=latents, image_noise=noise, image_sizes=sizes).logits
    )
    as_padded = model(**common, image_latents=padded, image_noise=padded_noise, image_sizes=sizes)
    assert torch.equal(as_list.logits, as_padded.logits)
    assert torch.equal(as_list.diffusion_prediction, as_padded.diffusion_prediction)


def test_wrong_sizes_are_named(model):
    input_ids, attention_mask, latents, _, _ = mixed_batch()
    swapped = [latents[0], latents[2], latents[1]]  # 8x16 and 16x8 have the same number of slots: allowed
    model(input_ids=input_ids, attention_mask=attention_mask, image_latents=swapped)
    with pytest.raises(ValueError, match=r"Image 0 occupies 16 <image> slots, but an image of 16x16 pixels needs 64"):
        model(input_ids=input_ids, attention_mask=attention_mask, image_latents=[torch.zeros(1, 16, 16)] + latents[1:])
    with pytest.raises(ValueError, match=r"image_sizes\[1\] = 8x18: this model takes images of at most 16x16"):
        model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            image_latents=torch.zeros(3, 1, 16, 16),
            image_sizes=torch.tensor([[8, 8], [8, 18], [16, 8]]),
        )
    with pytest.raises(ValueError, match=r"image_sizes \[\(8, 8\), \(16, 8\), \(8, 16\)\] do not match .* list "):
        model(input_ids=input_ids, image_latents=latents, image_sizes=torch.tensor([[8, 8], [16, 8], [8, 16]]))
    with pytest.raises(ValueError, match=r"image_sizes must have shape \(3, 2\)"):
        model(input_ids=input_ids, image_latents=torch.zeros(3, 1, 16, 16), image_sizes=torch.tensor([8, 8]))
    with pytest.raises(ValueError, match=r"image_sizes must have shape \(3, 2\)"):
        model(input_ids=input_ids, image_latents=latents, image_sizes=torch.tensor([8, 8]))
    with pytest.raises(ValueError, match=r"pixel_values of size 16x24: this model takes images of at most 16x16"):
        model(input_ids=torch.tensor([image((8, 8))]), pixel_values=torch.zeros(1, 1, 16, 24))


# 2-D positions


@torch.no_grad()
def test_patch_positions_tell_an_image_from_its_transpose():
    """Latents of 8x16 and 16x8 whose patches, in raster order, are the same: without 2-D positions their slots get
    identical embeddings; with them, each slot adds its row's and its column's embedding."""
    wide = torch.randn(1, 1, 8, 16)
    patches = patchify(wide, 2)  # [1, 32, 4]
    tall = patches.reshape(1, 8, 4, 1, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(1, 1, 16, 8)
    assert torch.equal(patchify(tall, 2), patches)
    timesteps = torch.tensor([10])
    plain = sized_model(position_embedding=None)
    assert plain.model.patch_position_embedding is None
    assert torch.equal(plain.model.embed_latents(wide, timesteps)[0], plain.model.embed_latents(tall, timesteps)[0])
    model = sized_model()
    positions = model.model.patch_position_embedding
    wide_embeds, tall_embeds = (model.model.embed_latents(x, timesteps)[0] for x in (wide, tall))
    difference = (wide_embeds - tall_embeds)[0]  # [32, hidden]
    slot = torch.arange(32)
    expected = (
        positions.row_embedding.weight[slot // 8]
        + positions.column_embedding.weight[slot % 8]
        - positions.row_embedding.weight[slot // 4]
        - positions.column_embedding.weight[slot % 4]
    )
    torch.testing.assert_close(difference, expected, atol=1e-6, rtol=0)
    assert difference.abs().max() > 1e-3


# Generation at any size


@pytest.mark.parametrize("size", [(8, 16), (16, 8)])
def test_denoising_steps_equal_an_uncached_forward_at_a_non_square_size(model, size):
    height, width = size
    input_ids, attention_mask = left_pad([[5, 6, 7], [8, 9, 10, 11]])
    with RecordDenoiser(model) as recorder:
        out = generate(
            model,
            input_ids,
            attention_mask=attention_mask,
            generation_mode="image",
            height=height,
            width=width,
            image_guidance_scale=3.0,
        )
    assert [tuple(row[0].shape) for row in out.images] == [(1, height, width)] * 2
    steps = recorder.calls[:-1]
    assert len(steps) == 4
    for row, prompt in enumerate([[5, 6, 7], [8, 9, 10, 11]]):
        sequence = torch.tensor([prompt + [BOI] + [IMAGE] * SLOTS[size]])
        for step in steps:
            for branch in (0, 1):  # conditional, then unconditional
                index = row + 2 * branch
                expected = uncached_prediction(
                    model, sequence, step["latents"][index : index + 1], step["t"][index : index + 1], branch == 1
                )
                torch.testing.assert_close(step["prediction"][index], expected[0], atol=1e-5, rtol=1e-5)


def test_text_after_a_non_square_image_equals_an_uncached_forward(model):
    prompt = torch.tensor([[5, 6, 7, 8, 9]])
    out = generate(
        model,
        prompt,
        max_new_tokens=32 + 2 + 6,
        height=16,
        width=8,
        max_new_images=1,
        logits_processor=LogitsProcessorList([OpenImageAt({7})]),
        output_logits=True,
    )
    sequence = out.sequences[0]
    assert out.images[0][0].shape == (1, 16, 8) and (sequence == IMAGE).sum() == 32
    full = model(input_ids=out.sequences, image_latents=out.image_latents[0]).logits[0]
    sampled = [p - 1 for p in range(prompt.shape[1], len(sequence)) if sequence[p] not in (IMAGE, EOI)]
    assert len(sampled) == len(out.logits) and any(sequence[p] == EOI for p in sampled)
    for step, position in enumerate(sampled):
        torch.testing.assert_close(out.logits[step][0], full[position], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def uncached_prediction(model, input_ids, latents, timesteps, unconditional):
    transfusion = model.model
    slots = input_ids == IMAGE
    embeds = model.get_input_embeddings()(input_ids)
    image_embeds, encoder_state = transfusion.embed_latents(latents, timesteps)
    embeds[slots] = image_embeds.reshape(-1, embeds.shape[-1])
    mask = transfusion.get_attention_mask(embeds, slots, None, None, None, torch.tensor([unconditional]))
    hidden = transfusion.language_model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
    grid = (latents.shape[2] // 2, latents.shape[3] // 2)
    return transfusion.get_image_prediction(hidden[slots].reshape(1, -1, hidden.shape[-1]), encoder_state, grid)


@pytest.mark.parametrize(
    "objective, scheduler", [("ddpm", "ddpm"), ("ddpm", "ddim"), ("ddpm", "dpmsolver++"), ("flow", "flow_euler")]
)
def test_rows_of_different_sizes_equal_each_row_alone(objective, scheduler):
    model = sized_model(objective=objective)
    rows = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    sizes = [(8, 16), (16, 8), (8, 8)]
    input_ids, attention_mask = left_pad(rows)
    kwargs = {"generation_mode": "image", "scheduler": scheduler, "image_guidance_scale": 2.0}
    out = generate(
        model,
        input_ids,
        attention_mask=attention_mask,
        height=[h for h, _ in sizes],
        width=[w for _, w in sizes],
        generator=[torch.Generator().manual_seed(i) for i in range(3)],
        **kwargs,
    )
    for i, (row, (height, width)) in enumerate(zip(rows, sizes)):
        alone = generate(
            model,
            torch.tensor([row]),
            height=height,
            width=width,
            generator=[torch.Generator().manual_seed(i)],
            **kwargs,
        )
        assert out.images[i][0].shape == (1, height, width) and torch.isfinite(out.images[i][0]).all()
        torch.testing.assert_close(out.images[i][0], alone.images[0][0], atol=1e-5, rtol=1e-5)
        assert [t for t in out.sequences[i].tolist() if t != PAD] == alone.sequences[0].tolist()


def test_height_and_width_are_checked_before_any_compute(model):
    calls = []
    hook = model.model.language_model.register_forward_hook(lambda *args: calls.append(1))
    prompt = torch.tensor([[5, 6, 7], [8, 9, 10]])
    try:
        for kwargs, message in [
            ({"height": 9}, r"height x width 9x8: height and width must be multiples of 2"),
            ({"height": 8, "width": 32}, r"height x width 8x32: this model takes images of at most 16x16"),
            ({"width": 0}, r"height x width 8x0: height and width must be positive integers"),
            ({"height": -8}, r"positive integers"),
            ({"height": [8, 16, 8]}, r"height has 3 entries for a batch of 2 rows"),
        ]:
            with pytest.raises(ValueError, match=message):
                generate(model, prompt, generation_mode="image", **kwargs)
    finally:
        hook.remove()
    assert not calls, "an error came after the backbone ran"


def test_image_mode_makes_room_for_the_size_asked(model):
    out = generate(model, torch.tensor([[5, 6, 7]]), generation_mode="image", height=16, width=8)
    assert out.sequences.shape[1] == 3 + 1 + 32 + 1 and out.images[0][0].shape == (1, 16, 8)
    with pytest.raises(ValueError, match="needs room for <boi>, 32 image slots and <eoi>"):
        generate(model, torch.tensor([[5, 6, 7]]), generation_mode="image", height=16, width=8, max_new_tokens=20)


# Sizes the model writes itself


class WriteThenOpen(LogitsProcessor):
    """Test double: makes every row write `text_ids` after its prompt, then open an image."""

    def __init__(self, prompt_length, text_ids, boi_token_id):
        self.prompt_length, self.sequence = prompt_length, [*text_ids, boi_token_id]

    def __call__(self, input_ids, scores):
        step = input_ids.shape[1] - self.prompt_length
        scores = torch.full_like(scores, -float("inf"))
        scores[:, self.sequence[min(step, len(self.sequence) - 1)]] = 0.0
        return scores


@pytest.fixture(scope="module")
def writer():
    """A tiny model with a real tokenizer, so that the size it writes can be read back."""
    tokenizer = build_tiny_tokenizer()
    config = build_tiny_config(tokenizer, image_size=8)
    config = TransfusionConfig(**{**config.to_dict(), "max_image_size": 16, "image_position_embedding": "learned_2d"})
    torch.manual_seed(0)
    return TransfusionForConditionalGeneration(config).eval(), tokenizer


@pytest.mark.parametrize(
    "written, asked, expected",
    [
        (" 8x16", {}, (8, 16)),
        (" 16x8", {}, (16, 8)),
        (" 9x9", {}, (8, 8)),
        (" 64x64", {}, (8, 8)),
        (" 16x8", {"height": 8, "width": 8}, (8, 8)),
    ],
)
def test_interleaved_images_take_the_size_the_row_wrote(writer, written, asked, expected):
    model, tokenizer = writer
    prompt = tokenizer(["a handwritten seven"], return_tensors="pt")["input_ids"]
    text_ids = tokenizer(written, add_special_tokens=False)["input_ids"]
    processor = WriteThenOpen(prompt.shape[1], text_ids, model.config.boi_token_id)
    out = model.generate(
        prompt,
        max_new_tokens=len(text_ids) + 40,
        max_new_images=1,
        logits_processor=LogitsProcessorList([processor]),
        num_inference_steps=2,
        progress_bar=False,
        return_dict_in_generate=True,
        tokenizer=tokenizer,
        **asked,
    )
    assert tuple(out.images[0][0].shape[1:]) == expected
    written_back = tokenizer.decode(out.sequences[0, prompt.shape[1] : prompt.shape[1] + len(text_ids)])
    assert written_back == written
    # Without the tokenizer the written size cannot be read: the default size.
    out = model.generate(
        prompt,
        max_new_tokens=len(text_ids) + 40,
        max_new_images=1,
        logits_processor=LogitsProcessorList([processor]),
        num_inference_steps=2,
        progress_bar=False,
        return_dict_in_generate=True,
    )
    assert tuple(out.images[0][0].shape[1:]) == (8, 8)


def test_images_of_different_sizes_in_one_row_become_pictures():
    from modeling_transfusion import TransfusionImageProcessor

    image_processor = TransfusionImageProcessor(size={"longest_edge": 16}, size_divisor=2, do_center_crop=False)
    row = [torch.full((1, 8, 16), -1.0), torch.full((1, 16, 8), 1.0)]
    pictures = image_processor.postprocess(row)
    assert [picture.size for picture in pictures] == [(16, 8), (8, 16)]  # PIL sizes are (width, height)
    arrays = image_processor.postprocess(row, output_type="np")
    assert [a.shape for a in arrays] == [(8, 16, 1), (16, 8, 1)] and arrays[0].max() == 0 and arrays[1].min() == 255
