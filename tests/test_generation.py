"""Tests of `model.generate()`: the cached diffusion loop, schedulers, guidance, batching, modes and HF plumbing.

Everything runs on CPU with the tiny config of the `TransfusionConfig` docstring (8x8 grey images, 2x2 patches, so
N = 16 image slots); input ids are built by hand.
"""

import re

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer
from transformers.masking_utils import create_causal_mask

from modeling_transfusion import TransfusionConfig, TransfusionForConditionalGeneration
from modeling_transfusion.experts_transfusion import ROUTING_KWARG
from modeling_transfusion.generation_transfusion import TransfusionGenerateOutput, sampling_scheduler

BOI, EOI, IMAGE, PAD = 61, 62, 63, 0
NUM_SLOTS = 16


def tiny_config(objective="ddpm", **kwargs):
    return TransfusionConfig(
        text_config={
            "model_type": "llama",
            "vocab_size": 64,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
        },
        image_size=8,
        num_channels=1,
        latent_channels=1,
        patch_size=2,
        objective=objective,
        boi_token_id=BOI,
        eoi_token_id=EOI,
        image_token_id=IMAGE,
        **kwargs,
    )


def tiny_model(objective="ddpm", seed=0, **kwargs):
    torch.manual_seed(seed)
    model = TransfusionForConditionalGeneration(tiny_config(objective, **kwargs)).eval()
    # The diffusion head starts at zero (DiT init); give it weights so that predictions depend on the inputs.
    torch.nn.init.normal_(model.model.patch_decoder.proj.weight, std=0.2)
    return model


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def flow_model():
    return tiny_model("flow")


def generate(model, input_ids, **kwargs):
    kwargs.setdefault("num_inference_steps", 4)
    kwargs.setdefault("progress_bar", False)
    kwargs.setdefault("return_dict_in_generate", True)
    kwargs.setdefault("pad_token_id", PAD)
    return model.generate(input_ids, **kwargs)


def left_pad(rows):
    width = max(len(row) for row in rows)
    input_ids = torch.tensor([[PAD] * (width - len(row)) + row for row in rows])
    attention_mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows])
    return input_ids, attention_mask


def strip(row: torch.Tensor) -> list[int]:
    return [token for token in row.tolist() if token != PAD]


class OpenImageAt(LogitsProcessor):
    """Test double: makes a row open an image (`<boi>`) when its own length (pad excluded) is in `lengths` (and, with
    `only_after`, if that token is in the row), and never emit pad or the default `<eos>` (2). Depends only on the
    row's tokens, so a row behaves the same alone or in a batch."""

    def __init__(self, lengths=(), always=False, only_after=None):
        self.lengths, self.always, self.only_after = set(lengths), always, only_after

    def __call__(self, input_ids, scores):
        scores = scores.clone()
        scores[:, [PAD, 2]] = -float("inf")
        lengths = (input_ids != PAD).sum(-1)
        for row, length in enumerate(lengths.tolist()):
            tokens = input_ids[row][input_ids[row] != PAD]
            if self.only_after is not None and self.only_after not in tokens.tolist():
                continue
            if self.always or length in self.lengths:
                scores[row, BOI] = 1e4
        return scores


def processors(*items):
    return LogitsProcessorList(items)


class Oracle:
    """Test double for the denoiser: the patch decoder returns the exact noise (`ddpm`) or velocity (`flow`) that
    turns the current x_t into the fixed `target` latents, whatever the transformer computed."""

    def __init__(self, model, target):
        self.model, self.target = model, target
        self.inputs = None

    def __enter__(self):
        encoder, decoder = self.model.model.patch_encoder, self.model.model.patch_decoder
        self.encoder_forward, self.decoder_forward = encoder.forward, decoder.forward

        def record(latents, timesteps, time_embedding=None):
            self.inputs = (latents.float(), timesteps)
            return self.encoder_forward(latents, timesteps, time_embedding)

        def predict(hidden_states, encoder_state=None, grid_size=None):
            latents, timesteps = self.inputs
            target = self.target.expand_as(latents)
            if self.model.config.objective == "flow":
                sigma = (timesteps.float() / self.model.config.num_train_timesteps).clamp(min=1e-6).view(-1, 1, 1, 1)
                return (latents - target) / sigma
            alphas = self.model.noise_scheduler.alphas_cumprod[timesteps.long()].view(-1, 1, 1, 1)
            return (latents - alphas.sqrt() * target) / (1 - alphas).clamp(min=1e-12).sqrt()

        encoder.forward, decoder.forward = record, predict
        return self

    def __exit__(self, *exc):
        self.model.model.patch_encoder.forward = self.encoder_forward
        self.model.model.patch_decoder.forward = self.decoder_forward


class RecordDenoiser:
    """Records, for every forward that embeds images, the latents and timesteps given to the patch encoder and the
    prediction of the patch decoder."""

    def __init__(self, model):
        self.model, self.calls = model, []

    def __enter__(self):
        self.hooks = [
            self.model.model.patch_encoder.register_forward_hook(
                lambda module, args, output: self.calls.append({"latents": args[0].clone(), "t": args[1].clone()})
            ),
            self.model.model.patch_decoder.register_forward_hook(
                lambda module, args, output: self.calls[-1].update(prediction=output.clone())
            ),
        ]
        return self

    def __exit__(self, *exc):
        for hook in self.hooks:
            hook.remove()


# Cache correctness


def test_logits_after_generated_image_equal_uncached_forward(model):
    prompt = torch.tensor([[5, 6, 7, 8, 9]])
    out = generate(
        model,
        prompt,
        max_new_tokens=2 * (NUM_SLOTS + 2) + 10,
        logits_processor=processors(OpenImageAt({7, 30})),
        output_logits=True,
    )
    sequence = out.sequences[0]
    assert len(out.images[0]) == 2
    latents = torch.stack(out.image_latents[0])
    # Every logit the loop sampled from, text steps right after an <eoi> included, equals an uncached forward.
    full = model(input_ids=out.sequences, image_latents=latents).logits[0]  # [length, vocab]
    sampled_positions = [p - 1 for p in range(prompt.shape[1], len(sequence)) if sequence[p] not in (IMAGE, EOI)]
    assert len(sampled_positions) == len(out.logits)
    after_image = [i for i, p in enumerate(sampled_positions) if sequence[p] == EOI]
    assert len(after_image) == 2
    for step, position in enumerate(sampled_positions):
        torch.testing.assert_close(out.logits[step][0], full[position], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_denoising_step_equals_uncached_forward(model, guidance):
    # Two left-padded rows; only the second opens an image, so the loop denoises a subset of the cached batch.
    input_ids, attention_mask = left_pad([[5, 6, 7], [8, 9, 10, 11, BOI]])
    with RecordDenoiser(model) as recorder:
        out = generate(
            model,
            input_ids,
            attention_mask=attention_mask,
            max_new_tokens=NUM_SLOTS + 3,
            image_guidance_scale=guidance,
            generation_mode="interleaved",
            max_new_images=1,
        )
    assert [len(images) for images in out.images] == [0, 1]
    steps = recorder.calls[:-1]  # then the commit of the clean image
    assert len(steps) == 4 and torch.equal(recorder.calls[-1]["t"], torch.zeros(1, dtype=torch.long))
    prefix = torch.tensor([[8, 9, 10, 11, BOI] + [IMAGE] * NUM_SLOTS])
    for step in steps:
        num_branches = 2 if guidance != 1.0 else 1
        assert step["latents"].shape[0] == num_branches
        for branch in range(num_branches):
            full = uncached_prediction(
                model, prefix, step["latents"][branch : branch + 1], step["t"][branch : branch + 1], branch == 1
            )
            torch.testing.assert_close(step["prediction"][branch], full[0], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def uncached_prediction(model, input_ids, latents, timesteps, unconditional):
    """The prediction for one image already at `timesteps`, from a full forward of the whole sequence with no cache,
    through the model's public image step (what a denoising step must equal)."""
    transfusion = model.model
    slots = input_ids == IMAGE
    embeds = model.get_input_embeddings()(input_ids)
    image_embeds, encoder_state = transfusion.embed_latents(latents, timesteps)
    embeds[slots] = image_embeds.reshape(-1, embeds.shape[-1])
    mask = transfusion.get_attention_mask(embeds, slots, None, None, None, torch.tensor([unconditional]))
    routing = {ROUTING_KWARG: slots} if model.config.modality_experts else {}  # image slots through the image experts
    hidden = transfusion.language_model(inputs_embeds=embeds, attention_mask=mask, **routing).last_hidden_state
    return transfusion.get_image_prediction(hidden[slots].reshape(1, NUM_SLOTS, -1), encoder_state)


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_unpadded_denoising_step_runs_without_a_mask_and_equals_the_masked_step(attn_implementation):
    model = tiny_model(attn_implementation=attn_implementation)
    transfusion = model.model
    prefix = torch.tensor([[5, 6, 7, BOI], [8, 9, 10, BOI]])
    latents = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    timesteps = torch.tensor([700, 300])
    positions = 4 + torch.arange(NUM_SLOTS).expand(2, -1)
    embeds = model.get_input_embeddings()(torch.full((2, NUM_SLOTS), IMAGE))
    with torch.no_grad():
        cache = model(input_ids=prefix, use_cache=True).cache
        # One image per row, no padding: the slots see the whole prefix and each other, so nothing is masked.
        mask = transfusion.get_attention_mask(
            embeds, torch.ones(2, NUM_SLOTS, dtype=torch.bool), None, cache, positions
        )
        assert mask.shape == (1, 1, 1, 1)
        # The Transfusion mask in full (causal, or inside the image), as for any other sequence.
        block_ids = torch.tensor([[-1] * 4 + [0] * NUM_SLOTS, [-1] * 4 + [1] * NUM_SLOTS])
        text_config = model.config.text_config
        full = create_causal_mask(text_config, embeds, None, cache, positions, block_sequence_ids=block_ids)
        assert full.shape == (2, 1, NUM_SLOTS, 4 + NUM_SLOTS)
        masked = transfusion.denoise_step(latents, timesteps, cache, positions, full)
        mask_free = transfusion.denoise_step(latents, timesteps, cache, positions)
        precomputed = transfusion.embed_timesteps(timesteps)  # what the sampler computes once per image
        embedded_once = transfusion.denoise_step(latents, timesteps, cache, positions, time_embedding=precomputed)
    assert cache.get_seq_length() == 4
    torch.testing.assert_close(mask_free, masked, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(embedded_once, mask_free, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("patch_encoder", ["linear", "unet"])
def test_precomputed_timestep_embeddings_equal_the_step_own_in_bfloat16(patch_encoder):
    # A bf16 model fed float32 latents (the sampler's): the embedding computed once per image has the dtype and values
    # the patch encoder would compute at each step.
    model = tiny_model(patch_encoder=patch_encoder).to(torch.bfloat16)
    transfusion = model.model
    latents = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    timesteps = torch.tensor([700, 300])
    with torch.no_grad():
        precomputed = transfusion.embed_timesteps(timesteps)
        own, _ = transfusion.embed_latents(latents, timesteps)
        given, _ = transfusion.embed_latents(latents, timesteps, time_embedding=precomputed)
    assert precomputed.dtype == own.dtype == torch.bfloat16
    assert torch.equal(given, own)


def test_padding_and_unconditional_steps_mask_keys_and_two_images_in_a_row_keep_the_block_mask(model):
    transfusion = model.model
    slots = torch.ones(2, NUM_SLOTS, dtype=torch.bool)
    embeds = model.get_input_embeddings()(torch.full((2, NUM_SLOTS), IMAGE))
    positions = 3 + torch.arange(NUM_SLOTS).expand(2, -1)
    padding = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    with torch.no_grad():
        cache = model(
            input_ids=torch.tensor([[PAD, 6, 7, BOI], [5, 6, 7, BOI]]), attention_mask=padding, use_cache=True
        ).cache
    step_padding = torch.cat([padding, torch.ones(2, NUM_SLOTS, dtype=torch.long)], dim=-1)
    padded = transfusion.get_attention_mask(embeds, slots, step_padding, cache, positions)
    assert padded.shape == (2, 1, NUM_SLOTS, 4 + NUM_SLOTS)
    assert not padded[0, ..., 0].any() and padded[0, ..., 1:].all() and padded[1].all()
    unconditional = torch.tensor([False, True])
    guided = transfusion.get_attention_mask(embeds, slots, step_padding, cache, positions, unconditional)
    assert torch.equal(guided[0], padded[0])
    assert not guided[1, ..., :4].any() and guided[1, ..., 4:].all()
    # The same mask as the general one (causal, bidirectional inside each image, the unconditional slots seeing only
    # their image), which the step builds from a 2D key mask instead of per-element mask functions.
    block_ids = torch.tensor([[-1] * 4 + [0] * NUM_SLOTS, [-1] * 4 + [1] * NUM_SLOTS])
    first_visible = torch.tensor([0, 4])
    general = create_causal_mask(
        model.config.text_config,
        embeds,
        step_padding,
        cache,
        positions,
        block_sequence_ids=block_ids,
        and_mask_function=lambda b, h, q, kv: kv >= first_visible[b],
    )
    assert torch.equal(guided, general)
    # Two images in one row: the first does not see the second; the second sees the first.
    ids = torch.tensor([[5, BOI] + [IMAGE] * NUM_SLOTS + [EOI, BOI] + [IMAGE] * NUM_SLOTS + [EOI]])
    two = transfusion.get_attention_mask(model.get_input_embeddings()(ids), ids == IMAGE, None, None, None)[0, 0]
    first, second = slice(2, 2 + NUM_SLOTS), slice(4 + NUM_SLOTS, 4 + 2 * NUM_SLOTS)
    assert two[first, first].all() and not two[first, second].any() and two[second, first].all()


def test_cache_is_rolled_back_after_denoising(model):
    prompt = torch.tensor([[5, 6, 7, BOI]])
    out = generate(model, prompt, generation_mode="image", num_inference_steps=3)
    assert out.sequences.shape[1] == prompt.shape[1] + NUM_SLOTS + 1
    # No denoising step is left in the cache; as transformers returns it, it holds all but the last token (<eoi>).
    assert out.cache.get_seq_length() == out.sequences.shape[1] - 1


def test_image_mode_commits_the_image_only_where_the_cache_is_returned(model):
    prompt, attention_mask = left_pad([[5, 6, 7], [8, 9]])
    forwards = []
    hook = model.model.language_model.register_forward_hook(
        lambda module, args, kwargs, out: forwards.append(kwargs["inputs_embeds"].shape[1]), with_kwargs=True
    )
    try:
        kwargs = {"generation_mode": "image", "num_inference_steps": 2, "attention_mask": attention_mask}
        kwargs["generator"] = torch.Generator().manual_seed(3)
        returned = generate(model, prompt, **kwargs)
        committed = list(forwards)
        forwards.clear()
        kwargs["generator"] = torch.Generator().manual_seed(3)
        not_returned = generate(model, prompt, use_cache=False, **kwargs)
    finally:
        hook.remove()
    # prefill, <boi>, two steps, then the slots of the clean image (its <eoi> is not read: nothing follows it)
    assert committed == [3, 1, NUM_SLOTS, NUM_SLOTS, NUM_SLOTS] and forwards == committed[:-1]
    assert not_returned.cache is None
    assert torch.equal(returned.sequences, not_returned.sequences)
    assert torch.equal(returned.image_latents[0][0], not_returned.image_latents[0][0])
    # The returned cache holds all but the last token (<eoi>), as a forward of the sequence without it writes them.
    sequences = returned.sequences
    assert sequences[0, -1] == EOI and returned.cache.get_seq_length() == sequences.shape[1] - 1
    mask = (sequences[:, :-1] != PAD).long()
    with torch.no_grad():
        fresh = model(
            input_ids=sequences[:, :-1],
            attention_mask=mask,
            position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
            image_latents=[row[0] for row in returned.image_latents],
            use_cache=True,
        ).cache
    for layer, fresh_layer in zip(returned.cache.layers, fresh.layers):
        kept = mask.bool()[:, None, :, None].expand_as(layer.keys)  # padded positions may differ
        torch.testing.assert_close(layer.keys[kept], fresh_layer.keys[kept], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(layer.values[kept], fresh_layer.values[kept], atol=1e-5, rtol=1e-5)


# The diffusion loop recovers an image with an exact denoiser, for every scheduler offered


@pytest.mark.parametrize(
    "objective, scheduler, guidance",
    [
        ("ddpm", "ddpm", 1.0),
        ("ddpm", "ddim", 1.0),
        ("ddpm", "dpmsolver++", 1.0),
        ("ddpm", "ddim", 4.0),
        ("flow", "flow_euler", 1.0),
        ("flow", "flow_euler", 4.0),
    ],
)
def test_oracle_denoiser_recovers_the_image(model, flow_model, objective, scheduler, guidance):
    model = model if objective == "ddpm" else flow_model
    target = torch.linspace(-1.5, 1.5, 64).view(1, 1, 8, 8)
    with Oracle(model, target):
        out = generate(
            model,
            torch.tensor([[5, 6, 7]]),
            generation_mode="image",
            scheduler=scheduler,
            num_inference_steps=20,
            image_guidance_scale=guidance,
            generator=torch.Generator().manual_seed(0),
        )
    error = (out.image_latents[0][0] - target[0]).abs().max()
    assert error < 1e-3, f"{scheduler}: max error {error}"
    torch.testing.assert_close(out.images[0][0], target[0].clamp(-1, 1), atol=1e-3, rtol=0)


def test_scheduler_instance_is_used_and_left_untouched(model):
    target = torch.linspace(-1, 1, 64).view(1, 1, 8, 8)
    instance = DDIMScheduler.from_config(model.noise_scheduler.config, clip_sample=False)
    with Oracle(model, target):
        out = generate(model, torch.tensor([[5, 6]]), generation_mode="image", scheduler=instance)
    assert (out.image_latents[0][0] - target[0]).abs().max() < 1e-3
    assert instance.num_inference_steps is None  # a copy was stepped, not the user's instance


# Guidance and reproducibility


def test_guidance_scale_one_is_no_guidance_bit_for_bit(model):
    prompt = torch.tensor([[5, 6, 7]])
    plain = generate(model, prompt, generation_mode="image", generator=torch.Generator().manual_seed(3))
    one = generate(
        model, prompt, generation_mode="image", image_guidance_scale=1.0, generator=torch.Generator().manual_seed(3)
    )
    guided = generate(
        model, prompt, generation_mode="image", image_guidance_scale=3.0, generator=torch.Generator().manual_seed(3)
    )
    assert torch.equal(plain.image_latents[0][0], one.image_latents[0][0])
    assert not torch.allclose(plain.image_latents[0][0], guided.image_latents[0][0], atol=1e-3)


def test_guidance_interval_limits_guidance_to_its_timesteps(model):
    prompt, steps = torch.tensor([[5, 6, 7]]), model.config.num_train_timesteps

    def latents(**kwargs):
        out = generate(model, prompt, generation_mode="image", generator=torch.Generator().manual_seed(3), **kwargs)
        return out.image_latents[0][0]

    plain, guided = latents(), latents(image_guidance_scale=3.0)
    assert torch.equal(latents(image_guidance_scale=3.0, image_guidance_interval=(0, steps)), guided)
    # 0.5 is no timestep of the schedule: the conditional prediction alone at every step (its rows still run beside
    # the unconditional ones, in one batch, hence a tolerance)
    torch.testing.assert_close(latents(image_guidance_scale=3.0, image_guidance_interval=(0.5, 0.5)), plain)
    low_noise = latents(image_guidance_scale=3.0, image_guidance_interval=(0, steps // 2))
    assert (low_noise - plain).abs().max() > 1e-3 and (low_noise - guided).abs().max() > 1e-3


def test_flex_attention_on_cpu_generates_text_and_refuses_images_clearly():
    flex, sdpa = tiny_model(attn_implementation="flex_attention"), tiny_model()
    prompt = torch.tensor([[5, 6, 7]])
    kwargs = {"generation_mode": "text", "max_new_tokens": 4, "do_sample": False}
    assert torch.equal(generate(flex, prompt, **kwargs).sequences, generate(sdpa, prompt, **kwargs).sequences)
    with pytest.raises(NotImplementedError, match="attn_implementation='sdpa'"):
        generate(flex, prompt, generation_mode="image")


def test_generator_makes_generation_reproducible(model):
    kwargs = {"do_sample": True, "max_new_tokens": NUM_SLOTS + 8, "logits_processor": processors(OpenImageAt({5}))}
    first = generate(model, torch.tensor([[5, 6, 7]]), generator=torch.Generator().manual_seed(7), **kwargs)
    second = generate(model, torch.tensor([[5, 6, 7]]), generator=torch.Generator().manual_seed(7), **kwargs)
    other = generate(model, torch.tensor([[5, 6, 7]]), generator=torch.Generator().manual_seed(8), **kwargs)
    assert torch.equal(first.sequences, second.sequences)
    assert torch.equal(first.image_latents[0][0], second.image_latents[0][0])
    assert not torch.allclose(first.image_latents[0][0], other.image_latents[0][0])


@pytest.mark.parametrize("scheduler", ["ddpm", "ddim"])
def test_batch_equals_rows_run_alone(model, scheduler):
    check_batch_equals_rows_run_alone(model, scheduler, tolerance=1e-5)


def check_batch_equals_rows_run_alone(model, scheduler, tolerance):
    # Different prompt lengths (left-padded), images opened at different steps, a second image in one row, sampled
    # text, stochastic (ddpm) and deterministic (ddim) samplers, guidance: each row must come out as it does alone.
    rows = [[10, 11, 12, 13, 14], [20, 21, 22], [30, 31, 32, 33]]
    opens = OpenImageAt({7, 8, 31})
    kwargs = {
        "do_sample": True,
        "max_new_tokens": 2 * (NUM_SLOTS + 2) + 8,
        "logits_processor": processors(opens),
        "image_guidance_scale": 2.0,
        "scheduler": scheduler,
        "eos_token_id": 1,
    }
    seeds = [11, 12, 13]
    input_ids, attention_mask = left_pad(rows)
    batch = generate(
        model,
        input_ids,
        attention_mask=attention_mask,
        generator=[torch.Generator().manual_seed(seed) for seed in seeds],
        **kwargs,
    )
    assert sorted(len(images) for images in batch.images) != [0, 0, 0]
    for index, (row, seed) in enumerate(zip(rows, seeds)):
        alone = generate(model, torch.tensor([row]), generator=[torch.Generator().manual_seed(seed)], **kwargs)
        assert strip(batch.sequences[index]) == strip(alone.sequences[0])
        assert len(batch.image_latents[index]) == len(alone.image_latents[0])
        for batched, single in zip(batch.image_latents[index], alone.image_latents[0]):
            torch.testing.assert_close(batched, single, atol=tolerance, rtol=tolerance)
        for batched, single in zip(batch.images[index], alone.images[0]):
            torch.testing.assert_close(batched, single, atol=tolerance, rtol=tolerance)


def test_batch_with_rows_opening_at_different_steps_keeps_text_rows_exact(model):
    # Greedy: the row that never opens an image must produce the tokens it produces alone, despite the fillers.
    rows = [[10, 11, 12, 13, 14], [20, 21, 22, 23, 24, 25, 26]]
    kwargs = {"max_new_tokens": NUM_SLOTS + 12, "logits_processor": processors(OpenImageAt({6}))}
    input_ids, attention_mask = left_pad(rows)
    batch = generate(model, input_ids, attention_mask=attention_mask, **kwargs)
    assert [len(images) for images in batch.images] == [1, 0]
    for index, row in enumerate(rows):
        alone = generate(model, torch.tensor([row]), **kwargs)
        assert strip(batch.sequences[index]) == strip(alone.sequences[0])
    # Row 1 generated only text, so its sequence keeps all max_new_tokens of text.
    assert len(strip(batch.sequences[1])) == len(rows[1]) + kwargs["max_new_tokens"]


def test_unpadded_batch_with_one_row_opening_an_image(model):
    # Prompts of equal length (no attention mask at all): the mask is created when the first fillers are needed.
    rows = [[10, 11, 12], [20, 21, 22]]
    kwargs = {"max_new_tokens": NUM_SLOTS + 8, "logits_processor": processors(OpenImageAt({5}, only_after=20))}
    batch = generate(model, torch.tensor(rows), generator=[torch.Generator().manual_seed(i) for i in (1, 2)], **kwargs)
    assert [len(images) for images in batch.images] == [0, 1]
    for index, row in enumerate(rows):
        alone = generate(model, torch.tensor([row]), generator=[torch.Generator().manual_seed(index + 1)], **kwargs)
        assert strip(batch.sequences[index]) == strip(alone.sequences[0])
        for batched, single in zip(batch.image_latents[index], alone.image_latents[0]):
            torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-5)


def test_tiny_model_trained_on_one_digit_draws_it():
    # A real denoiser: a tiny flow model fitted to one 8x8 digit (sklearn's bundled digits) for 200 steps must draw
    # that digit through the whole cached loop, and not any other digit.
    from sklearn.datasets import load_digits

    digits = torch.tensor(load_digits().images[:10], dtype=torch.float32)[:, None] / 8 - 1  # [10, 1, 8, 8]
    model = tiny_model("flow", condition_dropout_prob=0.0).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    input_ids = torch.tensor([[5, 6, BOI] + [IMAGE] * NUM_SLOTS + [EOI]]).repeat(32, 1)
    for _ in range(200):
        loss = model(input_ids=input_ids, image_latents=digits[:1].expand(32, -1, -1, -1), labels=input_ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    out = generate(model, torch.tensor([[5, 6]]), generation_mode="image", num_inference_steps=20)
    errors = (out.images[0][0] - digits).abs().mean((1, 2, 3))  # against each of the ten digits
    assert errors[0] < 0.15 and errors[0] < errors[1:].min() / 3, errors


# Modes, limits and the length budget


def test_text_mode_never_opens_an_image(model):
    out = generate(
        model,
        torch.tensor([[5, 6, 7]]),
        generation_mode="text",
        max_new_tokens=3 * NUM_SLOTS,
        logits_processor=processors(OpenImageAt(always=True)),
        do_sample=True,
    )
    assert not (out.sequences == BOI).any() and not (out.sequences == IMAGE).any()
    assert out.sequences.shape[1] == 3 + 3 * NUM_SLOTS, "plain transformers decoding, to the length asked"


def test_image_mode_opens_exactly_one_image_right_after_the_prompt(model):
    input_ids, attention_mask = left_pad([[5, 6, 7, 8], [9, 10]])
    out = generate(model, input_ids, attention_mask=attention_mask, generation_mode="image")
    expected_tail = torch.tensor([BOI] + [IMAGE] * NUM_SLOTS + [EOI])
    assert out.sequences.shape[1] == input_ids.shape[1] + NUM_SLOTS + 2  # max_new_tokens defaults to N + 2
    for row in range(2):
        assert torch.equal(out.sequences[row, input_ids.shape[1] :], expected_tail)
        assert len(out.images[row]) == 1 and out.images[row][0].shape == (1, 8, 8)
        assert out.images[row][0].abs().max() <= 1


def test_image_mode_needs_room_for_the_image(model):
    with pytest.raises(ValueError, match="max_new_tokens >= 18"):
        generate(model, torch.tensor([[5, 6]]), generation_mode="image", max_new_tokens=NUM_SLOTS)


def test_max_new_images_is_respected(model):
    out = generate(
        model,
        torch.tensor([[5, 6, 7]]),
        max_new_images=2,
        max_new_tokens=4 * (NUM_SLOTS + 2),
        logits_processor=processors(OpenImageAt(always=True)),
    )
    assert len(out.images[0]) == 2 and int((out.sequences == BOI).sum()) == 2
    assert out.sequences.shape[1] == 3 + 4 * (NUM_SLOTS + 2)  # text fills the rest of the budget


@pytest.mark.parametrize(
    "room, expected_images", [(NUM_SLOTS + 1, 0), (NUM_SLOTS + 2, 1), (2 * NUM_SLOTS + 3, 1), (2 * NUM_SLOTS + 4, 2)]
)
def test_an_image_opens_only_if_it_fits_the_budget(model, room, expected_images):
    out = generate(
        model, torch.tensor([[5, 6, 7]]), max_new_tokens=room, logits_processor=processors(OpenImageAt(always=True))
    )
    assert len(out.images[0]) == expected_images
    assert out.sequences.shape[1] == 3 + room
    # No <boi> without its slots and <eoi>.
    assert int((out.sequences == BOI).sum()) == int((out.sequences == EOI).sum()) == expected_images


def test_captioning_reads_the_prompt_image(model):
    image = torch.rand(1, 1, 8, 8) * 2 - 1
    prompt = torch.tensor([[5, BOI] + [IMAGE] * NUM_SLOTS + [EOI, 6]])
    out = generate(model, prompt, pixel_values=image, generation_mode="text", max_new_tokens=5, output_logits=True)
    assert out.sequences.shape[1] == prompt.shape[1] + 5 and not hasattr(out, "images")
    full = model(input_ids=prompt, pixel_values=image).logits[0, -1]
    torch.testing.assert_close(out.logits[0][0], full, atol=1e-5, rtol=1e-5)
    other = generate(model, prompt, pixel_values=-image, generation_mode="text", max_new_tokens=1, output_logits=True)
    assert not torch.allclose(out.logits[0], other.logits[0])


# transformers plumbing: streamers, processors, stopping criteria, outputs, generation config


class RecordingStreamer(BaseStreamer):
    def __init__(self):
        self.events, self.ended = [], False

    def put(self, value):
        self.events.append(value.flatten().tolist())

    def end(self):
        self.ended = True


def test_streamer_gets_text_tokens_and_one_event_per_image(model):
    streamer = RecordingStreamer()
    prompt = torch.tensor([[5, 6, 7]])
    out = generate(
        model, prompt, streamer=streamer, max_new_tokens=NUM_SLOTS + 6, logits_processor=processors(OpenImageAt({5}))
    )
    assert streamer.ended
    assert streamer.events[0] == [5, 6, 7]  # the prompt, as transformers streams it
    image_events = [event for event in streamer.events if IMAGE in event]
    assert image_events == [[IMAGE] * NUM_SLOTS + [EOI]]
    assert sum(streamer.events[1:], []) == out.sequences[0, 3:].tolist()
    assert all(len(event) == 1 for event in streamer.events[1:] if IMAGE not in event)


def test_logits_processors_and_sampling_settings_are_honoured(model):
    prompt = torch.tensor([[5, 6, 7]])
    greedy = generate(model, prompt, max_new_tokens=8)
    top1 = generate(model, prompt, max_new_tokens=8, do_sample=True, top_k=1, temperature=0.7)
    assert torch.equal(greedy.sequences, top1.sequences)
    sampled = generate(
        model,
        prompt,
        max_new_tokens=8,
        do_sample=True,
        top_k=3,
        output_scores=True,
        generator=torch.Generator().manual_seed(0),
    )
    for scores in sampled.scores:
        assert int(torch.isfinite(scores).sum()) == 3

    class Ban(LogitsProcessor):
        def __call__(self, input_ids, scores):
            scores[:, 10:40] = -float("inf")
            return scores

    banned = generate(model, prompt, max_new_tokens=8, do_sample=True, logits_processor=processors(Ban()))
    assert not ((banned.sequences[0, 3:] >= 10) & (banned.sequences[0, 3:] < 40)).any()


def test_stopping_criteria_and_eos_are_honoured(model):
    prompt = torch.tensor([[5, 6, 7]])
    greedy = generate(model, prompt, max_new_tokens=10).sequences[0, 3:].tolist()
    stop_at = greedy[3]

    class StopAt(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return input_ids[:, -1] == stop_at

    stopped = generate(model, prompt, max_new_tokens=10, stopping_criteria=StoppingCriteriaList([StopAt()]))
    assert stopped.sequences[0, 3:].tolist() == greedy[: greedy.index(stop_at) + 1]
    eos = generate(model, prompt, max_new_tokens=10, eos_token_id=stop_at)
    assert eos.sequences[0, 3:].tolist() == greedy[: greedy.index(stop_at) + 1]


def test_outputs_without_return_dict_are_sequences(model):
    prompt = torch.tensor([[5, 6, 7]])
    kwargs = {"max_new_tokens": NUM_SLOTS + 4, "logits_processor": processors(OpenImageAt({4}))}
    torch.manual_seed(0)  # the image noise comes from the global generator
    sequences = generate(model, prompt, return_dict_in_generate=False, **kwargs)
    torch.manual_seed(0)
    out = generate(model, prompt, **kwargs)
    assert isinstance(sequences, torch.Tensor) and torch.equal(sequences, out.sequences)
    assert isinstance(out, TransfusionGenerateOutput)


def test_generation_config_defaults_survive_save_and_load(tmp_path):
    model = tiny_model()
    model.generation_config = GenerationConfig(
        num_inference_steps=3, scheduler="ddpm", generation_mode="image", progress_bar=False, pad_token_id=PAD
    )
    model.save_pretrained(tmp_path)
    loaded = TransfusionForConditionalGeneration.from_pretrained(tmp_path).eval()
    with RecordDenoiser(loaded) as recorder:
        out = loaded.generate(torch.tensor([[5, 6]]), return_dict_in_generate=True)
    assert len(out.images[0]) == 1
    assert len(recorder.calls) == 3 + 1  # 3 denoising steps, then the commit of the clean image


def test_with_processor_and_stop_strings(tokenizer, tiny_config, processor):
    # Integration with the processor fixtures of conftest.py: text prompt -> image -> PIL, and stop strings (which
    # transformers does not hand to a custom decoding loop; generate turns them into a criterion).
    torch.manual_seed(0)
    model = TransfusionForConditionalGeneration(tiny_config).eval()
    inputs = processor(text=["a handwritten seven"], return_tensors="pt")
    out = model.generate(**inputs, generation_mode="image", num_inference_steps=2, return_dict_in_generate=True)
    assert processor.postprocess_images(out.images)[0][0].size == (8, 8)
    prompt = processor(text=["a handwritten"], return_tensors="pt")
    length = prompt["input_ids"].shape[1]
    free = model.generate(**prompt, generation_mode="text", max_new_tokens=12)[0, length:]
    texts = [tokenizer.decode(token) for token in free]
    first = next(i for i, text in enumerate(texts) if text.strip() and text.isascii() and text.isprintable())
    stopped = model.generate(
        **prompt, generation_mode="text", max_new_tokens=12, stop_strings=[texts[first]], tokenizer=tokenizer
    )
    assert texts[first] in tokenizer.decode(stopped[0, length:])
    assert stopped.shape[1] <= length + first + 1 < length + len(free)


# Clear errors


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"scheduler": "euler"}, "Unknown scheduler 'euler'"),
        ({"scheduler": "flow_euler"}, "samples the 'flow' objective"),
        ({"image_guidance_scale": -1.0}, "image_guidance_scale must be a finite number >= 0"),
        ({"generation_mode": "video"}, "Unknown generation_mode 'video'"),
        ({"num_inference_steps": 0}, "num_inference_steps must be at least 1"),
        ({"max_new_images": -1}, "max_new_images must be"),
        ({"generator": [torch.Generator(), torch.Generator()]}, "2 generators for a batch of 1"),
        ({"scheduler": DDPMScheduler(beta_schedule="squaredcos_cap_v2")}, "clip_sample=True"),
        ({"scheduler": DDIMScheduler(clip_sample=False)}, "another noise schedule"),
        ({"image_guidance_interval": (600, 200)}, "image_guidance_interval (600, 200) must have 0 <= low <= high"),
        ({"image_guidance_interval": (0, 1e9)}, "<= high <= 1000 (the model's num_train_timesteps)"),
    ],
)
def test_clear_errors(model, kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        generate(model, torch.tensor([[5, 6, 7]]), max_new_tokens=NUM_SLOTS + 2, **kwargs)


def test_guidance_interval_must_be_two_timesteps(model):
    message = "image_guidance_interval must be two timesteps (low, high), got 800"
    with pytest.raises(TypeError, match=re.escape(message)):
        generate(model, torch.tensor([[5, 6, 7]]), generation_mode="image", image_guidance_interval=800)


def test_clear_errors_for_objective_and_prompt(model, flow_model):
    with pytest.raises(ValueError, match="samples the 'ddpm' objective"):
        generate(flow_model, torch.tensor([[5, 6]]), generation_mode="image", scheduler="ddim")
    with pytest.raises(ValueError, match="cannot sample a model trained with objective='flow'"):
        sampling_scheduler(flow_model.noise_scheduler, "flow", DDIMScheduler(clip_sample=False))
    with pytest.raises(ValueError, match="generation_mode='text' never generates an image"):
        generate(model, torch.tensor([[5, BOI]]), generation_mode="text", max_new_tokens=4)
    with pytest.raises(ValueError, match="Streamers take one sequence"):
        generate(model, torch.tensor([[5, 6], [7, 8]]), streamer=RecordingStreamer(), max_new_tokens=2)
