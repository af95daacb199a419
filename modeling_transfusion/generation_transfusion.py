"""Generation for Transfusion: text by next-token sampling, images by a diffusion loop over the KV cache.

[`TransfusionGenerationMixin.generate`] is transformers' `generate` with the decoding loop [`transfusion_decode`]
plugged in through the `custom_generate` hook, so generation configs, logits processors, stopping criteria, streamers
and `return_dict_in_generate` behave as for any causal LM. The loop samples text until a row samples `<boi>`. That
row then denoises its image (arXiv 2408.11039, section 3): at every scheduler step the N `<image>` slots run against
the cached prefix and their keys and values are dropped again; the clean image (timestep 0) and `<eoi>` are then
written to the cache once, and text resumes.

Rows of a batch that open images at different steps wait for each other: while some rows denoise, the others are
still, and when the image is committed they receive N + 1 masked filler slots (attention mask 0, positions not
advanced), which are removed from the returned sequences. Every row therefore sees exactly what it would see alone.
"""

import functools
import inspect
from dataclasses import dataclass

import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    SchedulerMixin,
)
from diffusers.utils.torch_utils import randn_tensor
from transformers import GenerationMixin
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer
from transformers.generation.stopping_criteria import MaxLengthCriteria, StoppingCriteriaList, StopStringCriteria
from transformers.generation.utils import GenerateDecoderOnlyOutput
from transformers.utils import logging

GENERATION_MODES = ("interleaved", "text", "image")
DEFAULT_NUM_INFERENCE_STEPS = 50

# name -> (objective it samples, scheduler class, settings that differ from the training scheduler's config)
# Latents are not bounded like pixels, so x_0 is never clipped. Sampling starts at the "leading" timestep (980 of 1000
# for 50 steps), not at 999: the capped cosine schedule has alphas_cumprod[999] ~ 2e-9 there, where an epsilon
# prediction determines x_0 only up to a factor 1 / sqrt(2e-9), so any model error would be blown up.
SAMPLING_SCHEDULERS = {
    "ddpm": ("ddpm", DDPMScheduler, {"clip_sample": False, "timestep_spacing": "leading"}),
    "ddim": ("ddpm", DDIMScheduler, {"clip_sample": False, "timestep_spacing": "leading", "set_alpha_to_one": True}),
    "dpmsolver++": (
        "ddpm",
        DPMSolverMultistepScheduler,
        {"algorithm_type": "dpmsolver++", "timestep_spacing": "leading", "final_sigmas_type": "zero"},
    ),
    "flow_euler": ("flow", FlowMatchEulerDiscreteScheduler, {}),
}
DEFAULT_SAMPLING_SCHEDULERS = {"ddpm": "ddim", "flow": "flow_euler"}

GeneratorArg = torch.Generator | list[torch.Generator] | None


@dataclass
class TransfusionGenerateOutput(GenerateDecoderOnlyOutput):
    r"""
    Outputs of [`TransfusionGenerationMixin.generate`] with `return_dict_in_generate=True`: those of
    [`~generation.GenerateDecoderOnlyOutput`] plus the images.

    sequences (`torch.LongTensor` of shape `(batch_size, sequence_length)`):
        Prompt and generated tokens; each generated image appears as `<boi>`, N `<image>` slots and `<eoi>`. Rows that
        finished early are right-padded with `pad_token_id`.
    scores, logits (`tuple(torch.FloatTensor)`, *optional*):
        One `(batch_size, vocab_size)` tensor per text sampling step (image slots are not sampled).
    images (`list[list[torch.FloatTensor]]`):
        Per row, the generated images in order of appearance, each `(num_channels, image_size, image_size)` in
        [-1, 1] (`model.decode_latents` of the latents, clamped).
    image_latents (`list[list[torch.FloatTensor]]`):
        Per row, the latents of those images, each `(latent_channels, latent_size, latent_size)`.
    """

    images: list[list[torch.FloatTensor]] | None = None
    image_latents: list[list[torch.FloatTensor]] | None = None


def sampling_scheduler(
    noise_scheduler: SchedulerMixin, objective: str, scheduler: str | SchedulerMixin | None = None
) -> SchedulerMixin:
    """Returns a fresh diffusers scheduler that samples images for a model trained with `noise_scheduler`.

    Args:
        noise_scheduler (`SchedulerMixin`): the training scheduler (`model.noise_scheduler`).
        objective (`str`): `model.config.objective`, `"ddpm"` or `"flow"`.
        scheduler (`str` or `SchedulerMixin`, *optional*): a name from `SAMPLING_SCHEDULERS` (`"ddpm"`, `"ddim"`,
            `"dpmsolver++"` for `ddpm`; `"flow_euler"` for `flow`), or a scheduler instance, which is checked against
            the training schedule and copied (its state is not touched). Defaults to `"ddim"` / `"flow_euler"`.
    """
    if scheduler is None:
        scheduler = DEFAULT_SAMPLING_SCHEDULERS[objective]
    if isinstance(scheduler, str):
        if scheduler not in SAMPLING_SCHEDULERS:
            raise ValueError(
                f"Unknown scheduler {scheduler!r}: choose one of {sorted(SAMPLING_SCHEDULERS)} or pass a diffusers "
                "scheduler instance."
            )
        scheduler_objective, scheduler_class, settings = SAMPLING_SCHEDULERS[scheduler]
        if scheduler_objective != objective:
            fitting = sorted(name for name, spec in SAMPLING_SCHEDULERS.items() if spec[0] == objective)
            raise ValueError(
                f"scheduler={scheduler!r} samples the {scheduler_objective!r} objective, but this model was trained "
                f"with objective={objective!r}: use one of {fitting}."
            )
        return scheduler_class.from_config(noise_scheduler.config, **settings)
    if not isinstance(scheduler, SchedulerMixin):
        raise TypeError(f"scheduler must be a name or a diffusers scheduler, got {type(scheduler).__name__}.")
    _check_scheduler(scheduler, noise_scheduler, objective)
    return type(scheduler).from_config(scheduler.config)


def _check_scheduler(scheduler: SchedulerMixin, noise_scheduler: SchedulerMixin, objective: str):
    name = type(scheduler).__name__
    is_flow = name.startswith("FlowMatch")
    if objective == "flow" and not is_flow:
        raise ValueError(f"{name} cannot sample a model trained with objective='flow': use a FlowMatch scheduler.")
    if objective == "ddpm" and (is_flow or not hasattr(scheduler, "alphas_cumprod")):
        raise ValueError(f"{name} cannot sample a model trained with objective='ddpm': use a DDPM-family scheduler.")
    train_steps, steps = noise_scheduler.config.num_train_timesteps, scheduler.config.num_train_timesteps
    if steps != train_steps:
        raise ValueError(f"{name} has num_train_timesteps={steps}, but the model was trained with {train_steps}.")
    if objective == "flow":
        if scheduler.config.get("use_dynamic_shifting", False):
            raise ValueError(f"{name} uses dynamic shifting, which needs a `mu` this model does not define.")
        return
    if scheduler.config.get("prediction_type", "epsilon") != "epsilon":
        raise ValueError(
            f"{name} has prediction_type={scheduler.config.prediction_type!r}; the model predicts 'epsilon'."
        )
    if scheduler.config.get("clip_sample", False):
        raise ValueError(
            f"{name} has clip_sample=True, which clips latents to [-1, 1]: build it with clip_sample=False."
        )
    if not torch.allclose(scheduler.alphas_cumprod, noise_scheduler.alphas_cumprod, atol=1e-6):
        raise ValueError(f"{name} has another noise schedule (alphas_cumprod) than the one the model was trained on.")


@dataclass
class ImageSamplingOptions:
    """How images are sampled in one `generate` call (resolved from its arguments and the generation config)."""

    scheduler: SchedulerMixin
    num_inference_steps: int
    guidance_scale: float
    generator: GeneratorArg
    progress_bar: bool

    def generators_for(self, rows: list[int]) -> GeneratorArg:
        """The generator(s) that draw the noise of `rows`: one per row for a list, the shared one otherwise."""
        if isinstance(self.generator, list):
            return [self.generator[row] for row in rows]
        return self.generator


def _croppable(cache: Cache) -> bool:
    return all(isinstance(layer, DynamicLayer) and not layer.is_sliding for layer in cache.layers)


def denoise_images(
    model,
    cache: Cache,
    attention_mask: torch.Tensor | None,
    positions: torch.LongTensor,
    rows: list[int],
    options: ImageSamplingOptions,
) -> torch.FloatTensor:
    """Samples one image for each row in `rows`, whose last cached token is `<boi>`, by running the diffusion loop
    against the cached prefix. The cache is left as it was.

    Args:
        cache (`Cache`): the KV cache of the whole batch, ending with the `<boi>` of `rows`.
        attention_mask (`torch.Tensor` of shape `(batch_size, cache_length)`, *optional*): 2D padding mask.
        positions (`torch.LongTensor` of shape `(batch_size,)`): position id of the first slot of each row.
        rows (`list[int]`): the batch rows that opened an image.
    Returns:
        `torch.FloatTensor` of shape `(len(rows), latent_channels, latent_size, latent_size)`: the clean latents.
    """
    config = model.config
    num_slots, num_rows = config.num_image_tokens, len(rows)
    device = positions.device
    guided = options.guidance_scale != 1.0
    # Classifier-free guidance doubles the rows: conditional first, then unconditional (slots that see only their
    # <boi> and themselves), both against the same cached prefix.
    branch_rows = rows + rows if guided else rows
    unconditional = None
    if guided:
        unconditional = torch.arange(2 * num_rows, device=device) >= num_rows
    if branch_rows == list(range(positions.shape[0])):
        branch = cache  # every row denoises: crop the batch cache in place, no copy
    else:
        index = torch.tensor(branch_rows, device=device)
        branch = DynamicCache(ddp_cache_data=[(layer.keys[index], layer.values[index]) for layer in cache.layers])
    step_mask = None
    if attention_mask is not None:
        step_mask = attention_mask[branch_rows]
        step_mask = torch.cat([step_mask, step_mask.new_ones(len(branch_rows), num_slots)], dim=-1)
    slots = torch.full((len(branch_rows), num_slots), config.image_token_id, dtype=torch.long, device=device)
    slot_positions = positions[branch_rows, None] + torch.arange(num_slots, device=device)  # [branch_rows, N]
    # The cache is cropped back after every step, so every step has the same mask: build it once (with guidance it
    # costs about half a forward). A mask that is not a tensor (flex attention's BlockMask) is rebuilt per step.
    slot_embeds = model.get_input_embeddings()(slots)
    full_mask = model.get_attention_mask(slot_embeds, slots, step_mask, branch, slot_positions, unconditional)
    mask_is_fixed = isinstance(full_mask, torch.Tensor) and full_mask.dim() == 4  # [branch_rows, 1, N, cache + N]
    if not mask_is_fixed and device.type == "cpu":
        # torch's CPU flex-attention kernel fails to compile for N slots against a cache (an inductor C++ error).
        raise NotImplementedError(
            "Image generation with attn_implementation='flex_attention' does not run on CPU (torch's CPU flex "
            "kernel cannot compile the image step). Load the model with attn_implementation='sdpa' to generate "
            "images on CPU; flex attention works here for training forwards and text generation."
        )

    scheduler = type(options.scheduler).from_config(options.scheduler.config)  # fresh state for every image
    scheduler.set_timesteps(options.num_inference_steps, device=device)
    generator = options.generators_for(rows)
    shape = (num_rows, config.latent_channels, config.latent_size, config.latent_size)
    latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
    latents = latents * getattr(scheduler, "init_noise_sigma", 1.0)
    step_kwargs = {}
    if generator is not None and "generator" in inspect.signature(scheduler.step).parameters:
        step_kwargs["generator"] = generator

    for timestep in logging.tqdm(scheduler.timesteps, desc="Denoising", disable=not options.progress_bar):
        model_input = latents
        if hasattr(scheduler, "scale_model_input"):
            model_input = scheduler.scale_model_input(latents, timestep)
        if guided:
            model_input = torch.cat([model_input, model_input])
        # The step's tokens are all image slots: their embeddings are the patch encoder's output, so the step goes
        # straight through patch encoder, backbone and patch decoder (what `model.forward` would do for these inputs,
        # without locating images, scattering embeddings or the LM head).
        embeds, encoder_state = model.patch_encoder(model_input, timestep.expand(len(branch_rows)).to(device))
        embeds = embeds.to(slot_embeds.dtype)
        mask = full_mask
        if not mask_is_fixed:
            mask = model.get_attention_mask(embeds, slots, step_mask, branch, slot_positions, unconditional)
        hidden = model.model(
            inputs_embeds=embeds,
            attention_mask=mask,
            position_ids=slot_positions,
            cache=branch,
            use_cache=True,
        ).last_hidden_state
        branch.crop(-num_slots)
        prediction = model.patch_decoder(hidden, encoder_state).float()  # [branch_rows, C, h, w]
        if guided:
            conditional, unconditional_prediction = prediction.chunk(2)
            prediction = unconditional_prediction + options.guidance_scale * (conditional - unconditional_prediction)
        latents = scheduler.step(prediction, timestep, latents, **step_kwargs).prev_sample
    return latents


def commit_images(
    model,
    cache: Cache,
    attention_mask: torch.Tensor | None,
    positions: torch.LongTensor,
    rows: list[int],
    latents: torch.FloatTensor,
    filler_token_id: int,
):
    """Writes the clean images of `rows` (timestep 0) and their `<eoi>` to the cache, in one forward of N + 1 slots.
    The other rows receive N + 1 filler slots that nothing attends to (attention mask 0).

    Returns `(outputs, input_ids, attention_mask)`: the forward's outputs (the last logits of `rows` predict the token
    after `<eoi>`), the `(batch_size, N + 1)` ids written, and the extended 2D attention mask (`None` if all ones).
    """
    config = model.config
    batch_size, num_slots = positions.shape[0], config.num_image_tokens
    device = positions.device
    in_image = torch.zeros(batch_size, dtype=torch.bool, device=device)
    in_image[rows] = True
    input_ids = torch.full((batch_size, num_slots + 1), filler_token_id, dtype=torch.long, device=device)
    input_ids[rows, :num_slots] = config.image_token_id
    input_ids[rows, num_slots] = config.eoi_token_id
    if attention_mask is None and not in_image.all():
        attention_mask = torch.ones(batch_size, cache.get_seq_length(), dtype=torch.long, device=device)
    if attention_mask is not None:
        new_mask = in_image[:, None].expand(batch_size, num_slots + 1).to(attention_mask.dtype)
        attention_mask = torch.cat([attention_mask, new_mask], dim=-1)
    # Filler slots get positions too, but being masked they never influence anything.
    slot_positions = positions[:, None] + torch.arange(num_slots + 1, device=device)
    outputs = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=slot_positions,
        cache=cache,
        image_latents=latents,
        use_cache=True,
        logits_to_keep=1,
    )
    return outputs, input_ids, attention_mask


@dataclass
class _Batch:
    """The growing batch of the decoding loop. Filler slots (written to rows that wait while others write an image)
    and tokens after a row finished are in `input_ids` but not kept: they are left out of what processors, stopping
    criteria and the caller see."""

    input_ids: torch.LongTensor  # [batch, length]
    keep: torch.BoolTensor  # [batch, length]
    attention_mask: torch.Tensor | None  # [batch, length], None while all ones
    positions: torch.LongTensor  # [batch]: the position id of each row's next token

    def append(self, tokens: torch.LongTensor, keep: torch.BoolTensor, attention_mask: torch.Tensor | None = None):
        """Appends `tokens` `(batch, n)`, kept in the rows flagged in `keep` `(batch,)`. `attention_mask` is the
        extended mask when the caller built it; otherwise the new tokens are attended in every row."""
        self.input_ids = torch.cat([self.input_ids, tokens], dim=-1)
        self.keep = torch.cat([self.keep, keep[:, None].expand_as(tokens)], dim=-1)
        if attention_mask is not None:
            self.attention_mask = attention_mask
        elif self.attention_mask is not None:
            self.attention_mask = torch.cat([self.attention_mask, self.attention_mask.new_ones(tokens.shape)], dim=-1)

    def view(self, pad_token_id: int) -> torch.LongTensor:
        """Each row's own tokens, left-padded: what logits processors and stopping criteria see."""
        return _pack(self.input_ids, self.keep, pad_token_id, left=True)

    def packed(self, pad_token_id: int | None) -> torch.LongTensor:
        """Each row's own tokens, right-padded: the sequences `generate` returns."""
        return _pack(self.input_ids, self.keep, pad_token_id, left=False)


def _pack(tokens: torch.LongTensor, keep: torch.BoolTensor, pad_token_id: int | None, left: bool) -> torch.LongTensor:
    """Keeps the `keep` entries of each row, in order, and pads the rows to a common length (on the left or right)."""
    if keep.all():
        return tokens
    lengths = keep.sum(-1)
    width = int(lengths.max())
    if pad_token_id is None and bool((lengths != width).any()):
        raise ValueError("The rows of the batch ended at different lengths: set pad_token_id to pad them.")
    packed = tokens.new_full((tokens.shape[0], width), pad_token_id if pad_token_id is not None else 0)
    columns = keep.long().cumsum(-1) - 1
    if left:
        columns = columns + (width - lengths)[:, None]
    row_index = torch.arange(tokens.shape[0], device=tokens.device)[:, None].expand_as(tokens)
    packed[row_index[keep], columns[keep]] = tokens[keep]
    return packed


def _sample_next_tokens(
    scores: torch.FloatTensor, do_sample: bool, active: torch.BoolTensor, generator: GeneratorArg, filler: int
) -> torch.LongTensor:
    if not do_sample:
        next_tokens = scores.argmax(-1)
    else:
        probs = scores.softmax(-1)
        if isinstance(generator, list):
            # One generator per row, drawn only when the row is active: a row then samples exactly as it would alone.
            next_tokens = torch.full_like(active, filler, dtype=torch.long)
            for row in active.nonzero().flatten().tolist():
                next_tokens[row] = torch.multinomial(probs[row], 1, generator=generator[row])[0]
        else:
            next_tokens = torch.multinomial(probs, 1, generator=generator).squeeze(1)
    return torch.where(active, next_tokens, filler)


def _forbid(scores: torch.FloatTensor, may_open: torch.BoolTensor, config) -> torch.FloatTensor:
    """Masks what text sampling may never produce: `<image>` and `<eoi>` (the image loop writes them), and `<boi>`
    for rows that may not open an image now."""
    scores[:, [config.image_token_id, config.eoi_token_id]] = -float("inf")
    scores[~may_open, config.boi_token_id] = -float("inf")
    return scores


def _resolve(value, generation_config, name: str, default):
    if value is not None:
        return value
    configured = getattr(generation_config, name, None)
    return default if configured is None else configured


def transfusion_decode(
    model,
    input_ids: torch.LongTensor,
    logits_processor,
    stopping_criteria,
    generation_config,
    synced_gpus: bool = False,
    streamer=None,
    generation_mode: str | None = None,
    max_new_images: int | None = None,
    scheduler: str | SchedulerMixin | None = None,
    num_inference_steps: int | None = None,
    image_guidance_scale: float | None = None,
    generator: GeneratorArg = None,
    progress_bar: bool | None = None,
    **model_kwargs,
) -> TransfusionGenerateOutput | torch.LongTensor:
    """The Transfusion decoding loop, called by `generate` (`custom_generate`) after its usual preparation, with the
    signature of `GenerationMixin._sample` plus the image arguments documented in
    [`TransfusionGenerationMixin.generate`]. Returns sequences, or a [`TransfusionGenerateOutput`] with
    `return_dict_in_generate=True`."""
    config = model.config
    generation_mode = _resolve(generation_mode, generation_config, "generation_mode", "interleaved")
    if generation_mode not in GENERATION_MODES:
        raise ValueError(f"Unknown generation_mode {generation_mode!r}: choose one of {list(GENERATION_MODES)}.")
    max_new_images = _resolve(max_new_images, generation_config, "max_new_images", None)
    if max_new_images is not None and max_new_images < 0:
        raise ValueError(f"max_new_images must be a non-negative integer or None, got {max_new_images}.")
    guidance_scale = float(_resolve(image_guidance_scale, generation_config, "image_guidance_scale", 1.0))
    if guidance_scale < 0:
        raise ValueError(f"image_guidance_scale must be >= 0 (1 means no guidance), got {guidance_scale}.")
    steps = int(_resolve(num_inference_steps, generation_config, "num_inference_steps", DEFAULT_NUM_INFERENCE_STEPS))
    if steps < 1:
        raise ValueError(f"num_inference_steps must be at least 1, got {steps}.")
    batch_size, prompt_length = input_ids.shape
    if isinstance(generator, list | tuple):
        generator = list(generator)
        if len(generator) != batch_size:
            raise ValueError(f"Got {len(generator)} generators for a batch of {batch_size} rows: pass one per row.")
    options = ImageSamplingOptions(
        scheduler=sampling_scheduler(
            model.noise_scheduler, config.objective, _resolve(scheduler, generation_config, "scheduler", None)
        ),
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        generator=generator,
        progress_bar=bool(_resolve(progress_bar, generation_config, "progress_bar", True)),
    )
    if generation_config.num_beams > 1:
        raise ValueError("Beam search (num_beams > 1) is not supported: Transfusion generation samples or is greedy.")
    if not model_kwargs.get("use_cache", True):
        raise ValueError("Images are denoised against the KV cache: use_cache=False is not supported.")
    if streamer is not None and batch_size > 1:
        raise ValueError("Streamers take one sequence: stream with a batch of one prompt.")

    num_slots = config.num_image_tokens
    boi, eoi = config.boi_token_id, config.eoi_token_id
    device = input_ids.device
    pad_token_id = generation_config.pad_token_id
    if isinstance(pad_token_id, list | tuple):
        pad_token_id = pad_token_id[0] if pad_token_id else None
    filler = eoi if pad_token_id is None else pad_token_id
    max_new_tokens = generation_config.max_length - prompt_length
    if generation_mode == "image" and max_new_tokens < num_slots + 2:
        raise ValueError(
            f"generation_mode='image' needs room for <boi>, {num_slots} image slots and <eoi>: set max_new_tokens >= "
            f"{num_slots + 2} (got room for {max_new_tokens})."
        )
    # Lengths are enforced per row (a row's fillers do not count), so the batch-wide length criterion is replaced.
    criteria = StoppingCriteriaList(c for c in stopping_criteria if not isinstance(c, MaxLengthCriteria))
    return_dict = generation_config.return_dict_in_generate
    scores = () if return_dict and generation_config.output_scores else None
    raw_logits = () if return_dict and generation_config.output_logits else None
    attentions = () if return_dict and generation_config.output_attentions else None
    hidden_states = () if return_dict and generation_config.output_hidden_states else None
    output_flags = {k: model_kwargs[k] for k in ("output_attentions", "output_hidden_states") if k in model_kwargs}

    attention_mask = model_kwargs.get("attention_mask")
    position_ids = model_kwargs.get("position_ids")
    if position_ids is not None:
        positions = position_ids[:, -1] + 1
    elif attention_mask is not None:
        positions = attention_mask.long().sum(-1)
    else:
        positions = torch.full((batch_size,), prompt_length, dtype=torch.long, device=device)
    batch = _Batch(input_ids, torch.ones_like(input_ids, dtype=torch.bool), attention_mask, positions)
    unfinished = torch.ones(batch_size, dtype=torch.bool, device=device)
    new_tokens = torch.zeros(batch_size, dtype=torch.long, device=device)  # per row, fillers excluded
    images_opened = torch.zeros(batch_size, dtype=torch.long, device=device)
    row_latents = [[] for _ in range(batch_size)]

    prefill_inputs = model.prepare_inputs_for_generation(input_ids, is_first_iteration=True, **model_kwargs)
    outputs = model(**prefill_inputs, return_dict=True)
    cache = outputs.cache
    next_logits = outputs.logits[:, -1].to(copy=True, dtype=torch.float32)  # [batch, vocab]: what each row samples

    def open_images(opened: torch.BoolTensor):
        """Denoises and writes the images of the `opened` rows; returns the forward that wrote them."""
        if not _croppable(cache):
            raise ValueError(
                "Image generation rolls the KV cache back after each denoising step, which needs a DynamicCache of "
                f"full-attention layers; got {type(cache).__name__} with {type(cache.layers[0]).__name__} layers."
            )
        rows = opened.nonzero().flatten().tolist()
        latents = denoise_images(model, cache, batch.attention_mask, batch.positions, rows, options)
        outputs, written, attention_mask = commit_images(
            model, cache, batch.attention_mask, batch.positions, rows, latents, filler
        )
        batch.append(written, keep=opened, attention_mask=attention_mask)
        batch.positions[rows] += num_slots + 1  # filler rows do not advance
        new_tokens[rows] += num_slots + 1
        images_opened[rows] += 1
        next_logits[rows] = outputs.logits[rows, -1].float()
        for row, image_latents in zip(rows, latents):
            row_latents[row].append(image_latents)
        if streamer is not None:
            streamer.put(written[0].cpu())  # the whole image is one event: N slots and <eoi>
        done = criteria(batch.view(filler), scores) | (new_tokens >= max_new_tokens) | (generation_mode == "image")
        unfinished[opened] &= ~done[opened]
        return outputs

    opens_in_prompt = input_ids[:, -1] == boi
    if opens_in_prompt.any():
        if generation_mode == "text":
            raise ValueError("A prompt ends with <boi> but generation_mode='text' never generates an image.")
        outputs = open_images(opens_in_prompt)

    while unfinished.any():
        may_open = unfinished & (new_tokens + num_slots + 2 <= max_new_tokens)  # room for <boi>, slots, <eoi>
        if max_new_images is not None:
            may_open &= images_opened < max_new_images
        if generation_mode == "text":
            may_open[:] = False
        if generation_mode == "image":  # an unfinished row has not opened its image yet
            next_scores = torch.full_like(next_logits, -float("inf"))
            next_scores[:, boi] = 0.0
            next_tokens = torch.where(unfinished, boi, filler)
        else:
            # Constrained before the processors (so top-k / top-p choose among allowed tokens) and after them (so no
            # processor can bring a forbidden token back).
            next_scores = _forbid(next_logits.clone(), may_open, config)
            next_scores = _forbid(logits_processor(batch.view(filler), next_scores), may_open, config)
            next_tokens = _sample_next_tokens(next_scores, generation_config.do_sample, unfinished, generator, filler)
        if scores is not None:
            scores += (next_scores,)
        if raw_logits is not None:
            raw_logits += (next_logits.clone(),)
        if attentions is not None and getattr(outputs, "attentions", None) is not None:
            attentions += (outputs.attentions,)
        if hidden_states is not None and getattr(outputs, "hidden_states", None) is not None:
            hidden_states += (outputs.hidden_states,)

        batch.append(next_tokens[:, None], keep=unfinished)
        new_tokens += unfinished.long()
        if streamer is not None:
            streamer.put(next_tokens.cpu())
        opened = unfinished & (next_tokens == boi)
        # A row that opened an image is not stopped before its image is written.
        done = (criteria(batch.view(filler), scores) | (new_tokens >= max_new_tokens)) & ~opened
        unfinished &= ~done
        if not unfinished.any():
            break

        outputs = model(
            input_ids=next_tokens[:, None],
            attention_mask=batch.attention_mask,
            position_ids=batch.positions[:, None],
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
            **output_flags,
        )
        batch.positions += 1
        next_logits = outputs.logits[:, -1].to(copy=True, dtype=torch.float32)
        if opened.any():
            outputs = open_images(opened)

    if streamer is not None:
        streamer.end()
    sequences = batch.packed(pad_token_id)
    if not return_dict:
        return sequences
    images = [[] for _ in range(batch_size)]
    all_latents = [latents for row in row_latents for latents in row]
    if all_latents:
        decoded = iter(model.decode_latents(torch.stack(all_latents)).float().clamp(-1, 1))
        images = [[next(decoded) for _ in row] for row in row_latents]
    return TransfusionGenerateOutput(
        sequences=sequences,
        scores=scores,
        logits=raw_logits,
        attentions=attentions,
        hidden_states=hidden_states,
        cache=cache,
        images=images,
        image_latents=row_latents,
    )


class TransfusionGenerationMixin(GenerationMixin):
    """Adds Transfusion's interleaved text and image generation to `generate` (see [`transfusion_decode`])."""

    def generate(
        self,
        inputs: torch.Tensor | None = None,
        generation_config=None,
        logits_processor=None,
        stopping_criteria=None,
        streamer=None,
        custom_generate=None,
        **kwargs,
    ):
        r"""
        Generates text and images. Accepts everything `GenerationMixin.generate` does (`max_new_tokens`, `do_sample`,
        `temperature`, `top_p`, logits processors, stopping criteria, `streamer`, `return_dict_in_generate`, ...),
        plus the arguments below; each can also be set as an attribute of the generation config.

        Args:
            generation_mode (`str`, *optional*, defaults to `"interleaved"`):
                `"interleaved"`: the model opens images by sampling `<boi>`; `"text"`: `<boi>` is never sampled (e.g.
                captioning an image given in the prompt); `"image"`: one image is opened right after the prompt and
                generation ends with its `<eoi>` (then `max_new_tokens` defaults to N + 2).
            max_new_images (`int`, *optional*):
                Most images a row may open; `<boi>` is suppressed afterwards. No limit by default.
            scheduler (`str` or diffusers `SchedulerMixin`, *optional*):
                `"ddpm"`, `"ddim"` (default) or `"dpmsolver++"` for `objective="ddpm"`; `"flow_euler"` (default) for
                `objective="flow"`; or a scheduler instance compatible with the model's training schedule.
            num_inference_steps (`int`, *optional*, defaults to 50):
                Denoising steps per image.
            image_guidance_scale (`float`, *optional*, defaults to 1.0):
                Classifier-free guidance for images, `uncond + scale * (cond - uncond)`; 1 means no guidance (and no
                extra compute). (`guidance_scale` is transformers' text guidance, a different thing.)
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*):
                Source of the image noise and, with `do_sample=True`, of the text samples. With a list, one per row,
                every row is generated exactly as it would be alone with its generator.
            progress_bar (`bool`, *optional*, defaults to `True`):
                Shows a progress bar over the denoising steps of each image.

        Return:
            `torch.LongTensor` of sequences, or a [`TransfusionGenerateOutput`] (with `images` and `image_latents`)
            when `return_dict_in_generate=True`.
        """
        if custom_generate is None:
            custom_generate = functools.partial(transfusion_decode, streamer=streamer)
            defaults = generation_config if generation_config is not None else self.generation_config
            mode = kwargs.get("generation_mode") or getattr(defaults, "generation_mode", None)
            length_set = any(kwargs.get(k) is not None for k in ("max_new_tokens", "max_length")) or any(
                getattr(defaults, k, None) is not None for k in ("max_new_tokens", "max_length")
            )
            if mode == "image" and not length_set:
                kwargs["max_new_tokens"] = self.config.num_image_tokens + 2
            # A callable custom_generate does not receive `tokenizer`, so stop strings are turned into a criterion here.
            if kwargs.get("stop_strings") is not None and kwargs.get("tokenizer") is not None:
                stop = StopStringCriteria(tokenizer=kwargs.pop("tokenizer"), stop_strings=kwargs.pop("stop_strings"))
                stopping_criteria = StoppingCriteriaList([*(stopping_criteria or []), stop])
        return super().generate(
            inputs=inputs,
            generation_config=generation_config,
            logits_processor=logits_processor,
            stopping_criteria=stopping_criteria,
            streamer=streamer,
            custom_generate=custom_generate,
            **kwargs,
        )


__all__ = [
    "TransfusionGenerateOutput",
    "TransfusionGenerationMixin",
    "ImageSamplingOptions",
    "sampling_scheduler",
    "denoise_images",
    "commit_images",
    "transfusion_decode",
]
