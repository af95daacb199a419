"""Generation for Transfusion: text by next-token decoding, images by a diffusion loop over the KV cache.

[`TransfusionGenerationMixin.generate`] is transformers' `generate`. In `generation_mode="text"` it is exactly the
causal-LM decoding of transformers (greedy, sampling, beam search, `use_cache=False`, `inputs_embeds`, every logits
processor and stopping criterion), with `<boi>` never sampled; images may be in the prompt. In `"image"` and
`"interleaved"` mode the decoding loop [`transfusion_decode`] is plugged in through the `custom_generate` hook: it
samples text until a row samples `<boi>`. That row then denoises its image (arXiv 2408.11039, section 3): at every
scheduler step the N `<image>` slots run against the cached prefix and their keys and values are dropped again; the
clean image (timestep 0) and `<eoi>` are then written to the cache once, and text resumes. Text decoding methods the
loop does not carry (beam search, assisted decoding, `use_cache=False`, ...) run as transformers' own in interleaved
mode, `<boi>` ending a sequence; the loop then writes the image of each sequence that ended so.

Rows of a batch that open images at different steps wait for each other: while some rows denoise, the others are
still, and when the image is committed they receive N + 1 masked filler slots (attention mask 0, positions not
advanced), which are removed from the returned sequences. Every row therefore sees exactly what it would see alone.
"""

import copy
import functools
import inspect
import math
import numbers
import re
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from diffusers import SchedulerMixin
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils.torch_utils import randn_tensor
from transformers import GenerationMixin, LogitsProcessor, LogitsProcessorList
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer
from transformers.generation import (
    BaseStreamer,
    GenerateBeamDecoderOnlyOutput,
    GenerateDecoderOnlyOutput,
    GenerationMode,
    MaxLengthCriteria,
    StoppingCriteriaList,
    StopStringCriteria,
)
from transformers.utils import logging

from .diffusion_transfusion import sampling_scheduler
from .editing_transfusion import EditBranches, edit_branches, source_image_end

GENERATION_MODES = ("interleaved", "text", "image")
DEFAULT_NUM_INFERENCE_STEPS = 50
# Arguments that only image sampling reads; `generate` also takes each from the generation config.
IMAGE_ARGUMENTS = (
    "max_new_images",
    "scheduler",
    "num_inference_steps",
    "image_guidance_scale",
    "source_image_guidance_scale",
    "image_guidance_interval",
    "progress_bar",
    "height",
    "width",
    "latents",
    "callback_on_step_end",
    "callback_on_step_end_tensor_inputs",
    "output_type",
)
# diffusers' output types: PIL images, float arrays / tensors in [0, 1], or the latents, not decoded.
OUTPUT_TYPES = ("pil", "np", "pt", "latent")
# What `callback_on_step_end` may ask for in `callback_on_step_end_tensor_inputs` (diffusers' default: the latents).
CALLBACK_TENSOR_INPUTS = ("latents",)
# How a model writes an image's size before its `<boi>` (what `TransfusionProcessor(write_image_size=True)` renders in
# training text: " 32x64<boi>"): the text of the row just before `<boi>` ends with it.
WRITTEN_IMAGE_SIZE = re.compile(r"(\d+)\s*x\s*(\d+)\s*$")

GeneratorArg = torch.Generator | list[torch.Generator] | None
# GenerationMixin's max_length when neither max_length nor max_new_tokens is set.
DEFAULT_MAX_LENGTH = 20


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
        Per row, the generated images in order of appearance, each `(num_channels, height, width)` in [-1, 1]
        (`model.decode_latents` of the latents, clamped); with `output_type`, as diffusers' pipelines give them: PIL
        images (`"pil"`), float32 arrays `(height, width, num_channels)` in [0, 1] (`"np"`), tensors
        `(num_channels, height, width)` in [0, 1] (`"pt"`), or the latents, not decoded (`"latent"`).
    image_latents (`list[list[torch.FloatTensor]]`):
        Per row, the latents of those images, each `(latent_channels, height / f, width / f)`.
    """

    images: list[list[torch.FloatTensor]] | None = None
    image_latents: list[list[torch.FloatTensor]] | None = None


@dataclass
class TransfusionGenerateBeamOutput(GenerateBeamDecoderOnlyOutput):
    r"""
    Outputs of [`TransfusionGenerationMixin.generate`] in interleaved mode with beam search and
    `return_dict_in_generate=True`: those of [`~generation.GenerateBeamDecoderOnlyOutput`] plus `images` and
    `image_latents`, as in [`TransfusionGenerateOutput`].
    """

    images: list[list[torch.FloatTensor]] | None = None
    image_latents: list[list[torch.FloatTensor]] | None = None


class ImageTokenRules(LogitsProcessor):
    """Keeps text decoding off the tokens that only the image loop writes: `<image>` and `<eoi>` (and the ids of
    `suppress_tokens`) always get -inf, `<boi>` does in the rows where `may_open(input_ids)` `(batch_size,)` is False,
    and in every row while `may_open` is `None` (text mode). The fixed mask is built once, not at every step (text
    decoding runs this once per token)."""

    def __init__(self, config, suppress_tokens=(), may_open: Callable[[torch.LongTensor], torch.BoolTensor] = None):
        self.boi_token_id, self.may_open = config.boi_token_id, may_open
        self.token_ids = sorted({config.image_token_id, config.eoi_token_id, *suppress_tokens})
        self.mask = self.mask_key = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        closed = self.may_open is None
        key = (scores.shape[-1], scores.device, closed)
        if self.mask_key != key:
            self.mask = torch.zeros(scores.shape[-1], dtype=torch.bool, device=scores.device)
            self.mask[self.token_ids] = True
            self.mask[self.boi_token_id] = closed
            self.mask_key = key
        scores = scores.masked_fill(self.mask, -float("inf"))
        if not closed:
            open_rows = self.may_open(input_ids).to(scores.device)
            scores[:, self.boi_token_id] = scores[:, self.boi_token_id].masked_fill(~open_rows, -float("inf"))
        return scores


class _StreamUntilImages(BaseStreamer):
    """Hands the text to `streamer` but keeps its end: the images written after transformers' decoding stream last."""

    def __init__(self, streamer):
        self.streamer = streamer

    def put(self, value):
        self.streamer.put(value)

    def end(self):
        pass


def _repeat_rows(value, times: int):
    """A per-row value (a tensor of rows, or a list with one entry per row) for `times` copies of every row, as
    `generate` expands its inputs for beams and returned sequences; anything else as it is."""
    if times == 1 or value is None:
        return value
    if isinstance(value, torch.Tensor):
        return value.repeat_interleave(times, dim=0)
    if isinstance(value, list | tuple):
        return [item for item in value for _ in range(times)]
    return value


def _integer(value, name: str, minimum: int) -> int:
    """`value` as an int (a float such as 4.0 is accepted), refusing bools, fractions and values below `minimum`."""
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Integral | torch.SymInt)
        and not (isinstance(value, float) and value.is_integer())
    ):
        raise TypeError(f"{name} must be an integer, got {value!r}.")
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}.")
    return int(value)


def _finite_float(value, name: str, minimum: float) -> float:
    """`value` as a float, refusing bools, non-numbers, NaN, infinities and values below `minimum`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r}.")
    if not math.isfinite(value) or value < minimum:
        bound = f" >= {minimum:g}" if math.isfinite(minimum) else ""
        raise ValueError(f"{name} must be a finite number{bound}, got {value}.")
    return float(value)


# The numeric arguments `generate` checks (given, or from the generation config) before any compute: name -> (check,
# least value). transformers lets NaN or fractional lengths through (`max_new_tokens=float("nan")` never stops), and
# some NaN sampling settings. Token ids may also be lists of ids.
NUMERIC_ARGUMENTS = {
    "max_new_tokens": (_integer, 1),
    "max_length": (_integer, 1),
    "num_beams": (_integer, 1),
    "num_return_sequences": (_integer, 1),
    "num_inference_steps": (_integer, 1),
    "min_new_tokens": (_integer, 0),
    "min_length": (_integer, 0),
    "top_k": (_integer, 0),
    "no_repeat_ngram_size": (_integer, 0),
    "max_new_images": (_integer, 0),
    # transformers takes negative ids (its own tests pass -1 so that generation never stops) and warns.
    "pad_token_id": (_integer, -math.inf),
    "bos_token_id": (_integer, -math.inf),
    "eos_token_id": (_integer, -math.inf),
    "temperature": (_finite_float, 0.0),
    "top_p": (_finite_float, 0.0),
    "min_p": (_finite_float, 0.0),
    "typical_p": (_finite_float, 0.0),
    "epsilon_cutoff": (_finite_float, 0.0),
    "eta_cutoff": (_finite_float, 0.0),
    "repetition_penalty": (_finite_float, 0.0),
    "guidance_scale": (_finite_float, 0.0),
    "image_guidance_scale": (_finite_float, 0.0),
    "source_image_guidance_scale": (_finite_float, 0.0),
    "length_penalty": (_finite_float, -math.inf),
}
TOKEN_ID_ARGUMENTS = ("pad_token_id", "bos_token_id", "eos_token_id")


def guidance_interval(value, num_train_timesteps: int) -> tuple[float, float] | None:
    """Checks `image_guidance_interval`: `None`, or two finite timesteps `(low, high)` with
    `0 <= low <= high <= num_train_timesteps`, returned as floats."""
    if value is None:
        return None
    if not isinstance(value, list | tuple) or len(value) != 2:
        raise TypeError(
            f"image_guidance_interval must be two timesteps (low, high), got {value!r}: guidance applies at the "
            "denoising steps whose timestep t has low <= t <= high."
        )
    low, high = (_finite_float(bound, "image_guidance_interval", 0.0) for bound in value)
    if not low <= high <= num_train_timesteps:
        raise ValueError(
            f"image_guidance_interval ({low:g}, {high:g}) must have 0 <= low <= high <= {num_train_timesteps} (the "
            "model's num_train_timesteps)."
        )
    return low, high


def _check_numeric_arguments(kwargs: dict, generation_config) -> None:
    """Checks the type and value of every numeric argument of `generate` in `kwargs` (else in `generation_config`),
    raising `TypeError` / `ValueError` naming it; integral floats in `kwargs` (4.0) are replaced by ints."""
    for name, (check, minimum) in NUMERIC_ARGUMENTS.items():
        given = kwargs.get(name)
        value = getattr(generation_config, name, None) if given is None else given
        if value is None or isinstance(value, torch.Tensor):
            continue
        if name in TOKEN_ID_ARGUMENTS and isinstance(value, list | tuple):
            checked = [check(item, name, minimum) for item in value]
        else:
            checked = check(value, name, minimum)
        if given is not None:
            kwargs[name] = checked


@dataclass
class ImageSamplingOptions:
    """How images are sampled in one `generate` call (resolved from its arguments and the generation config)."""

    scheduler: SchedulerMixin
    num_inference_steps: int
    guidance_scale: float
    generator: GeneratorArg
    progress_bar: bool
    sizes: list[tuple[int, int] | None] | None = None  # per row: the size asked for (height, width), or None
    default_size: tuple[int, int] | None = None  # the config's image_size when None
    tokenizer: object | None = None  # reads the size a row wrote before <boi>
    guidance_interval: tuple[float, float] | None = None  # timesteps (low, high) where guidance applies; None: all
    latents: torch.Tensor | None = None  # [batch, latent_channels, h, w]: the starting noise, one image per row
    callback_on_step_end: object | None = None  # called as diffusers does, after each denoising step
    callback_tensor_inputs: tuple[str, ...] = CALLBACK_TENSOR_INPUTS
    output_type: str | None = None  # None: images in [-1, 1]; else one of OUTPUT_TYPES
    # Editing guidance on the source image; set, `guidance_scale` guides on the instruction (three branches).
    source_guidance_scale: float | None = None

    def guidance_at(self, timestep: torch.Tensor, scale: float | None = None) -> float:
        """The guidance scale (`guidance_scale` unless `scale` is given) of the denoising step at `timestep`: 1 (the
        conditional prediction alone) outside `guidance_interval`."""
        scale = self.guidance_scale if scale is None else scale
        if self.guidance_interval is None:
            return scale
        low, high = self.guidance_interval
        return scale if low <= float(timestep) <= high else 1.0

    def edit_branch_names(self) -> tuple[str, ...] | None:
        """The editing branches the guidance scales ask for (`None`: no editing guidance): without the instruction
        when `guidance_scale` is not 1, without the source when `source_guidance_scale` is not 1."""
        if self.source_guidance_scale is None:
            return None
        scales = (("no_instruction", self.guidance_scale), ("no_source", self.source_guidance_scale))
        return tuple(name for name, scale in scales if scale != 1.0)

    @classmethod
    def resolve(cls, model, generation_config, batch_size: int, generator: GeneratorArg = None, **arguments):
        """Takes each image argument from `arguments`, else from the generation config, else its default, and checks
        its type and value (an error names the argument)."""

        def value(name, default):
            given = arguments.get(name)
            given = getattr(generation_config, name, None) if given is None else given
            return default if given is None else given

        steps = _integer(value("num_inference_steps", DEFAULT_NUM_INFERENCE_STEPS), "num_inference_steps", 1)
        guidance = _finite_float(value("image_guidance_scale", 1.0), "image_guidance_scale", 0.0)
        source_guidance = value("source_image_guidance_scale", None)
        if source_guidance is not None:
            source_guidance = _finite_float(source_guidance, "source_image_guidance_scale", 0.0)
        if isinstance(generator, list | tuple):
            generator = list(generator)
            if len(generator) != batch_size:
                raise ValueError(f"Got {len(generator)} generators for a batch of {batch_size} rows: pass one per row.")
        scheduler = sampling_scheduler(model.noise_scheduler, model.config.objective, value("scheduler", None))
        sizes = requested_image_sizes(model.config, value("height", None), value("width", None), batch_size)
        default_size = (model.config.image_size, model.config.image_size)
        output_type = arguments.get("output_type")
        if output_type is not None and output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {list(OUTPUT_TYPES)} (or None), got {output_type!r}.")
        callback = arguments.get("callback_on_step_end")
        if callback is not None and not callable(callback):
            raise TypeError(f"callback_on_step_end must be callable, got {type(callback).__name__}.")
        tensor_inputs = callback_tensor_inputs(callback, arguments.get("callback_on_step_end_tensor_inputs"))
        return cls(
            scheduler,
            steps,
            guidance,
            generator,
            bool(value("progress_bar", True)),
            sizes,
            default_size,
            arguments.get("tokenizer"),
            guidance_interval(value("image_guidance_interval", None), model.config.num_train_timesteps),
            starting_latents(model.config, arguments.get("latents"), sizes, default_size, batch_size),
            callback,
            tensor_inputs,
            output_type,
            source_guidance,
        )

    def image_size(self, row: int, written: str | None, room: int, config) -> tuple[int, int]:
        """The size of the image `row` opens: the one asked for, else the one the row wrote before `<boi>` (`written`,
        when it is a valid size whose slots fit in `room` tokens), else the default."""
        if self.asked_size(row) is not None:
            return self.asked_size(row)
        default = self.default_size or (config.image_size, config.image_size)
        match = WRITTEN_IMAGE_SIZE.search(written or "")
        if match:
            height, width = int(match.group(1)), int(match.group(2))
            try:
                config.check_image_size(height, width)
            except ValueError:
                return default
            if config.num_image_slots(height, width) + 1 <= room:
                return height, width
        return default

    def asked_size(self, row: int) -> tuple[int, int] | None:
        """The `(height, width)` asked for `row` with `generate(height=, width=)`, or `None`."""
        return self.sizes[row] if self.sizes is not None else None

    def repeat_rows(self, times: int) -> "ImageSamplingOptions":
        """These options for a batch in which every row is repeated `times` times (beams, returned sequences)."""
        return replace(self, sizes=_repeat_rows(self.sizes, times), generator=_repeat_rows(self.generator, times))

    def generators_for(self, rows: list[int]) -> GeneratorArg:
        """The generator(s) that draw the noise of `rows`: one per row for a list, the shared one otherwise."""
        if isinstance(self.generator, list):
            return [self.generator[row] for row in rows]
        return self.generator


def callback_tensor_inputs(callback, tensor_inputs: list[str] | None) -> tuple[str, ...]:
    """What `callback_on_step_end` receives, as in diffusers: a `PipelineCallback`'s own `tensor_inputs`, else
    `tensor_inputs` (default `["latents"]`), each of which the denoising loop must offer."""
    if isinstance(callback, PipelineCallback | MultiPipelineCallbacks):
        tensor_inputs = callback.tensor_inputs
    tensor_inputs = tuple(tensor_inputs or CALLBACK_TENSOR_INPUTS)
    unknown = sorted(set(tensor_inputs) - set(CALLBACK_TENSOR_INPUTS))
    if unknown:
        raise ValueError(
            f"callback_on_step_end_tensor_inputs asks for {unknown}; the denoising loop offers "
            f"{list(CALLBACK_TENSOR_INPUTS)}."
        )
    return tensor_inputs


def starting_latents(config, latents, sizes, default_size, batch_size: int) -> torch.Tensor | None:
    """Checks `latents`, the starting noise of image mode: `(batch_size, latent_channels, height / f, width / f)` for
    the size each row asks for (else the default), f the VAE's downsampling."""
    if latents is None:
        return None
    factor = config.vae_downsample_factor
    expected = [
        (batch_size, config.latent_channels, h // factor, w // factor) for h, w in (s or default_size for s in sizes)
    ]
    if not isinstance(latents, torch.Tensor) or len(set(expected)) > 1 or tuple(latents.shape) != expected[0]:
        shape = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
        raise ValueError(
            f"latents must be one tensor of the shape (batch_size * num_images_per_prompt, latent_channels, "
            f"height / {factor}, width / {factor}) = {expected[0]} for this call, got {shape}."
        )
    return latents


def requested_image_sizes(config, height, width, batch_size: int) -> list[tuple[int, int] | None]:
    """Per row, the `(height, width)` asked for by `generate(height=, width=)` (an int, or a list with one per row;
    a missing one is the config's `image_size`), checked against the config; `None` per row when neither is given."""
    if height is None and width is None:
        return [None] * batch_size

    def per_row(value, name):
        values = list(value) if isinstance(value, list | tuple) else [value] * batch_size
        if len(values) != batch_size:
            raise ValueError(f"{name} has {len(values)} entries for a batch of {batch_size} rows: pass one per row.")
        return [config.image_size if v is None else v for v in values]

    heights, widths = per_row(height, "height"), per_row(width, "width")
    return [config.check_image_size(h, w, name="height x width") for h, w in zip(heights, widths)]


def written_size_image_arguments(config) -> dict:
    """The `generate` arguments under which each row writes the size of its next image, opens that image and ends with
    its `<eoi>` (an edit whose size the model chooses): interleaved mode, one image, room for a size text and the
    slots of the largest image."""
    largest = config.num_image_slots(config.max_image_size, config.max_image_size)
    return {
        "generation_mode": "interleaved",
        "max_new_images": 1,
        "max_new_tokens": largest + 16,
        "eos_token_id": [config.text_config.eos_token_id, config.eoi_token_id],
    }


def postprocess_images(images: torch.Tensor, output_type: str):
    """Decoded images `(num_images, channels, height, width)` in [-1, 1] as diffusers' pipelines return them
    (`VaeImageProcessor.postprocess`): `"pil"` a list of PIL images, `"np"` a float32 array
    `(num_images, height, width, channels)` in [0, 1], `"pt"` a tensor `(num_images, channels, height, width)` in
    [0, 1]."""
    return VaeImageProcessor().postprocess(images, output_type=output_type)


def indices_by_shape(tensors: list[torch.Tensor]) -> list[list[int]]:
    """The indices of the tensors of each shape, shapes in order of first appearance."""
    groups = {}
    for index, tensor in enumerate(tensors):
        groups.setdefault(tuple(tensor.shape), []).append(index)
    return list(groups.values())


def _croppable(cache: Cache) -> bool:
    return all(isinstance(layer, DynamicLayer) and not layer.is_sliding for layer in cache.layers)


def denoise_images(
    model,
    cache: Cache,
    attention_mask: torch.Tensor | None,
    positions: torch.LongTensor,
    rows: list[int],
    options: ImageSamplingOptions,
    size: tuple[int, int] | None = None,
    edit: EditBranches | None = None,
) -> torch.FloatTensor:
    """Samples one image of `size` `(height, width)` (the config's default by default) for each row in `rows`, whose
    last cached token is `<boi>`, by running the diffusion loop against the cached prefix
    ([`TransfusionModel.denoise_step`] per scheduler step). The cache is left as it was.

    Args:
        cache (`Cache`): the KV cache of the whole batch, ending with the `<boi>` of `rows`.
        attention_mask (`torch.Tensor` of shape `(batch_size, cache_length)`, *optional*): 2D padding mask.
        positions (`torch.LongTensor` of shape `(batch_size,)`): position id of the first slot of each row.
        rows (`list[int]`): the batch rows that opened an image.
        edit (`EditBranches`, *optional*): the prefixes of editing guidance ([`edit_branches`]), which replace the
            rows of `cache`: the prediction is `full + sum((scale - 1) * (full - branch))` over its branches, with
            `options.guidance_scale` for the one without the instruction and `options.source_guidance_scale` for the
            one without the source image.
    Returns:
        `torch.FloatTensor` of shape `(len(rows), latent_channels, height / f, width / f)`: the clean latents.
    """
    config, transfusion = model.config, model.model
    height, width = size if size is not None else (config.image_size, config.image_size)
    num_slots, num_rows = config.num_image_slots(height, width), len(rows)
    device = positions.device
    guided = options.guidance_scale != 1.0 and edit is None
    # Classifier-free guidance doubles the rows: conditional first, then unconditional (slots that see only their
    # <boi> and themselves), both against the same cached prefix.
    branch_rows = rows + rows if guided else rows
    unconditional = None
    if guided:
        unconditional = torch.arange(2 * num_rows, device=device) >= num_rows
    if edit is not None:
        branch, step_mask, first_positions = edit.cache, edit.attention_mask, edit.positions
        branch_rows = list(range(len(first_positions)))
    else:
        if branch_rows == list(range(positions.shape[0])):
            branch = cache  # every row denoises: crop the batch cache in place, no copy
        else:
            index = torch.tensor(branch_rows, device=device)
            branch = DynamicCache(ddp_cache_data=[(layer.keys[index], layer.values[index]) for layer in cache.layers])
        step_mask = attention_mask[branch_rows] if attention_mask is not None else None
        first_positions = positions[branch_rows]
    if step_mask is not None:
        step_mask = torch.cat([step_mask, step_mask.new_ones(len(branch_rows), num_slots)], dim=-1)
    slot_positions = first_positions[:, None] + torch.arange(num_slots, device=device)  # [branch_rows, N]
    # The cache is cropped back after every step, so every step has the same mask: build it once. Without padding or
    # guidance it masks nothing. A mask that is not a tensor (flex attention's BlockMask) is rebuilt per step.
    slot_embeds = model.get_input_embeddings().weight.new_empty(
        len(branch_rows), num_slots, config.text_config.hidden_size
    )
    all_slots = torch.ones(slot_embeds.shape[:2], dtype=torch.bool, device=device)
    mask = transfusion.get_attention_mask(slot_embeds, all_slots, step_mask, branch, slot_positions, unconditional)
    if not (isinstance(mask, torch.Tensor) and mask.dim() == 4):
        if device.type == "cpu":
            # torch's CPU flex-attention kernel fails to compile for N slots against a cache (an inductor C++ error).
            raise NotImplementedError(
                "Image generation with attn_implementation='flex_attention' does not run on CPU (torch's CPU flex "
                "kernel cannot compile the image step). Load the model with attn_implementation='sdpa' to generate "
                "images on CPU; flex attention works here for training forwards and text generation."
            )
        mask = step_mask

    # A fresh state for every image: options.scheduler is never stepped, and copying it skips its schedule set-up.
    scheduler = copy.deepcopy(options.scheduler)
    scheduler.set_timesteps(options.num_inference_steps, device=device)
    generator = options.generators_for(rows)
    factor = config.vae_downsample_factor
    shape = (num_rows, config.latent_channels, height // factor, width // factor)
    if options.latents is not None:
        latents = options.latents[rows].to(device=device, dtype=torch.float32)
    else:
        latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
    latents = latents * getattr(scheduler, "init_noise_sigma", 1.0)
    step_kwargs = {}
    if generator is not None and "generator" in inspect.signature(scheduler.step).parameters:
        step_kwargs["generator"] = generator

    timesteps = scheduler.timesteps.to(device)
    time_embeddings = transfusion.embed_timesteps(timesteps)  # [num_inference_steps, dim], once per image
    for step, timestep in enumerate(logging.tqdm(timesteps, desc="Denoising", disable=not options.progress_bar)):
        model_input = latents
        if hasattr(scheduler, "scale_model_input"):
            model_input = scheduler.scale_model_input(latents, timestep)
        if len(branch_rows) > num_rows:
            model_input = model_input.repeat(len(branch_rows) // num_rows, 1, 1, 1)
        prediction = transfusion.denoise_step(
            model_input,
            timestep.expand(len(branch_rows)),
            branch,
            slot_positions,
            mask,
            unconditional_images=unconditional,
            time_embedding=time_embeddings[step].expand(len(branch_rows), -1),
        ).float()  # [branch_rows, C, h, w]
        if guided:
            conditional, unconditional_prediction = prediction.chunk(2)
            scale = options.guidance_at(timestep)
            prediction = unconditional_prediction + scale * (conditional - unconditional_prediction)
        elif edit is not None and edit.names:
            full, *without = prediction.chunk(len(edit.names) + 1)
            scales = {"no_instruction": options.guidance_scale, "no_source": options.source_guidance_scale}
            prediction = full
            for name, branch_prediction in zip(edit.names, without):
                prediction = prediction + (options.guidance_at(timestep, scales[name]) - 1) * (full - branch_prediction)
        latents = scheduler.step(prediction, timestep, latents, **step_kwargs).prev_sample
        if options.callback_on_step_end is not None:
            # As in diffusers: the callback sees the tensors it asked for and may return replacements.
            tensors = {"latents": latents}
            callback_kwargs = {name: tensors[name] for name in options.callback_tensor_inputs}
            replaced = options.callback_on_step_end(model, step, timestep, callback_kwargs) or {}
            latents = replaced.get("latents", latents)
    return latents


def image_token_layout(
    config, rows: list[int], latents: list[torch.FloatTensor], batch_size: int, filler_token_id: int, device
):
    """The tokens that write the images of `rows` (one `(latent_channels, h, w)` latent per row, sizes may differ):
    a row's image takes its N slots and `<eoi>`; the columns up to the widest image, and all columns of the other rows,
    are filler slots that nothing attends to. Returns `(input_ids, written, eoi_column)`: the `(batch_size, width)` ids,
    which of them belong to their row, and the column of each row's `<eoi>`."""
    factor = config.vae_downsample_factor
    lengths = torch.zeros(batch_size, dtype=torch.long, device=device)  # slots + <eoi> per row
    for row, row_latents in zip(rows, latents):
        lengths[row] = config.num_image_slots(*(side * factor for side in row_latents.shape[1:])) + 1
    columns = torch.arange(int(lengths.max()), device=device)
    written = columns[None] < lengths[:, None]
    input_ids = torch.full(written.shape, filler_token_id, dtype=torch.long, device=device)
    input_ids[columns[None] < (lengths - 1)[:, None]] = config.image_token_id
    eoi_column = (lengths - 1).clamp(min=0)
    input_ids[rows, eoi_column[rows]] = config.eoi_token_id
    return input_ids, written, eoi_column


def commit_images(
    model,
    cache: Cache,
    attention_mask: torch.Tensor | None,
    positions: torch.LongTensor,
    rows: list[int],
    latents: list[torch.FloatTensor],
    filler_token_id: int,
    read: str = "all",
    **forward_kwargs,
):
    """Writes the clean images of `rows` (timestep 0, laid out by [`image_token_layout`]) and their `<eoi>` to the
    cache, in one forward (given `forward_kwargs` such as `output_hidden_states`). Where nothing follows the images
    (image mode), `read="all_but_last"` leaves out the last column, the widest images' `<eoi>` (a cache returned by
    `generate` holds all but the last token), and `read="none"` runs no forward (nothing reads the cache again).

    Returns `(next_logits, outputs, input_ids, written, attention_mask)`: the float32 logits after each row's `<eoi>`
    `(batch_size, vocab_size)` (meaningful for `rows`; `None` unless `read="all"`), the forward's outputs (`None`
    without a forward), the `(batch_size, width)` ids written, which of them belong to their row (the rest are
    fillers), and the extended 2D attention mask (`None` if all ones).
    """
    if read not in ("all", "all_but_last", "none"):
        raise ValueError(f"read must be 'all', 'all_but_last' or 'none', got {read!r}.")
    batch_size, device = positions.shape[0], positions.device
    input_ids, written, eoi_column = image_token_layout(
        model.config, rows, latents, batch_size, filler_token_id, device
    )
    if attention_mask is None and not written.all():
        attention_mask = torch.ones(batch_size, cache.get_seq_length(), dtype=torch.long, device=device)
    if attention_mask is not None:
        attention_mask = torch.cat([attention_mask, written.to(attention_mask.dtype)], dim=-1)
    if read == "none":
        return None, None, input_ids, written, attention_mask
    width = input_ids.shape[1] - (read == "all_but_last")
    # Filler slots get positions too, but being masked they never influence anything.
    outputs = model(
        input_ids=input_ids[:, :width],
        attention_mask=attention_mask[:, : attention_mask.shape[1] - input_ids.shape[1] + width]
        if attention_mask is not None
        else None,
        position_ids=positions[:, None] + torch.arange(width, device=device),
        cache=cache,
        image_latents=list(latents),
        use_cache=True,
        logits_to_keep=1 if written[rows].all() else 0,
        **forward_kwargs,
    )
    if read != "all":
        return None, outputs, input_ids, written, attention_mask
    logits = outputs.logits
    next_logits = logits[:, -1] if logits.shape[1] == 1 else logits[torch.arange(batch_size, device=device), eoi_column]
    return next_logits.to(copy=True, dtype=torch.float32), outputs, input_ids, written, attention_mask


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
        """Appends `tokens` `(batch, n)`, kept where `keep` says: per row `(batch,)` or per token `(batch, n)`.
        `attention_mask` is the extended mask when the caller built it; otherwise the new tokens are attended in every
        row."""
        self.input_ids = torch.cat([self.input_ids, tokens], dim=-1)
        self.keep = torch.cat(
            [self.keep, keep.expand_as(tokens) if keep.dim() == 2 else keep[:, None].expand_as(tokens)], dim=-1
        )
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


def pad_token_id_of(generation_config) -> int | None:
    """The id that pads finished rows, as transformers chooses it: `pad_token_id`, else the first end-of-sequence id."""
    for token_ids in (generation_config.pad_token_id, generation_config.eos_token_id):
        if isinstance(token_ids, torch.Tensor):
            token_ids = token_ids.flatten().tolist()
        if isinstance(token_ids, list | tuple):
            token_ids = token_ids[0] if token_ids else None
        if token_ids is not None:
            return int(token_ids)
    return None


class InterleavedDecoding:
    """The state of one image or interleaved `generate` call, with its steps named: [`~InterleavedDecoding.prefill`]
    reads the prompt, [`~InterleavedDecoding.sample_text`] chooses each row's next token,
    [`~InterleavedDecoding.write_text`] runs it through the model, [`~InterleavedDecoding.write_images`] denoises and
    commits the images of the rows that opened one, and [`~InterleavedDecoding.result`] packs what `generate` returns.
    """

    def __init__(
        self,
        model,
        input_ids: torch.LongTensor,
        logits_processor,
        stopping_criteria,
        generation_config,
        streamer,
        generation_mode: str,
        max_new_images: int | None,
        options: ImageSamplingOptions,
        model_kwargs: dict,
        max_new_tokens: int,
        keep: torch.BoolTensor | None = None,
        new_tokens: torch.LongTensor | None = None,
    ):
        """`max_new_tokens` is every row's budget of new tokens. A prompt that continues an earlier decoding may hold
        tokens that are not their row's (`keep` False: padding after a row finished, attention mask 0) and count the
        `new_tokens` each row already spent."""
        config = model.config
        self.model, self.config, self.options = model, config, options
        self.generation_config, self.streamer = generation_config, streamer
        self.generation_mode, self.max_new_images = generation_mode, max_new_images
        self.model_kwargs = model_kwargs
        batch_size, prompt_length = input_ids.shape
        device = input_ids.device
        self.pad_token_id = pad_token_id_of(generation_config)
        # What rows that wait or finished feed the model: the pad id, as in transformers, when it is a token.
        vocab_size = model.get_input_embeddings().num_embeddings
        valid_pad = self.pad_token_id is not None and 0 <= self.pad_token_id < vocab_size
        self.filler = self.pad_token_id if valid_pad else config.eoi_token_id
        self.max_new_tokens = max_new_tokens
        # `<boi>` is allowed in the rows that have room for an image now, by the rule `generate` put among the logits
        # processors (where it runs in text mode too, so that both modes process scores alike).
        rules = next((processor for processor in logits_processor if isinstance(processor, ImageTokenRules)), None)
        if rules is None:  # a caller's own `custom_generate=transfusion_decode`
            rules = ImageTokenRules(config)
            logits_processor = LogitsProcessorList([*logits_processor, rules])
        rules.may_open = self._may_open
        self.logits_processor = logits_processor
        # Lengths are enforced per row (a row's fillers do not count), so the batch-wide length criterion is replaced.
        self.criteria = StoppingCriteriaList(c for c in stopping_criteria if not isinstance(c, MaxLengthCriteria))
        flags = generation_config.return_dict_in_generate
        self.scores = () if flags and generation_config.output_scores else None
        self.raw_logits = () if flags and generation_config.output_logits else None
        self.attentions = () if flags and generation_config.output_attentions else None
        self.hidden_states = () if flags and generation_config.output_hidden_states else None
        self.output_flags = {
            k: model_kwargs[k] for k in ("output_attentions", "output_hidden_states") if k in model_kwargs
        }

        attention_mask = model_kwargs.get("attention_mask")
        position_ids = model_kwargs.get("position_ids")
        if position_ids is not None:
            positions = position_ids[:, -1] + 1
        elif attention_mask is not None:
            positions = attention_mask.long().sum(-1)
        else:
            inputs_embeds = model_kwargs.get("inputs_embeds")
            length = prompt_length if inputs_embeds is None else inputs_embeds.shape[1]
            positions = torch.full((batch_size,), length, dtype=torch.long, device=device)
        keep = torch.ones_like(input_ids, dtype=torch.bool) if keep is None else keep
        self.batch = _Batch(input_ids, keep, attention_mask, positions)
        self.unfinished = torch.ones(batch_size, dtype=torch.bool, device=device)
        if new_tokens is None:
            new_tokens = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.new_tokens = new_tokens  # per row, fillers excluded
        self.images_opened = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.row_latents = [[] for _ in range(batch_size)]
        # <boi>, the slots and <eoi> of the smallest image a row may open: the size asked for, else the default.
        default_size = options.default_size or (config.image_size, config.image_size)
        self.least_image_tokens = torch.tensor(
            [config.num_image_slots(*(options.asked_size(row) or default_size)) + 2 for row in range(batch_size)],
            device=device,
        )
        self.cache = self.outputs = self.next_logits = None

    def prefill(self):
        """Reads the prompt (and its images) into the cache, or the part a given cache does not hold yet; a row whose
        prompt ends with `<boi>` opens its image."""
        input_ids = self.batch.input_ids
        model_inputs = self.model.prepare_inputs_for_generation(
            input_ids,
            next_sequence_length=self._uncached_length(),
            is_first_iteration=True,
            **self.model_kwargs,
        )
        self.outputs = self.model(**model_inputs, return_dict=True)
        self.cache = self.outputs.cache
        self.next_logits = self.outputs.logits[:, -1].to(copy=True, dtype=torch.float32)  # [batch, vocab]
        if input_ids.shape[1]:
            last_tokens = input_ids.gather(1, (self.batch.keep.long().cumsum(-1).argmax(-1))[:, None])[:, 0]
            opens_in_prompt = self.unfinished & (last_tokens == self.config.boi_token_id)
            if opens_in_prompt.any():
                self.write_images(opens_in_prompt)

    def _uncached_length(self) -> int | None:
        """How many trailing prompt positions a cache passed to `generate` does not hold (`None`: all of them), as
        transformers' prefill counts them: the prompt is the whole sequence when its attention mask covers it."""
        cache = self.model_kwargs.get("cache")
        past_length = cache.get_seq_length() if cache is not None else 0
        if not past_length:
            return None
        inputs_embeds = self.model_kwargs.get("inputs_embeds")
        if inputs_embeds is not None:
            return inputs_embeds.shape[1] - past_length
        input_ids, attention_mask = self.batch.input_ids, self.batch.attention_mask
        whole = attention_mask.shape[1] == input_ids.shape[1] if attention_mask is not None else True
        return input_ids.shape[1] - past_length if whole and input_ids.shape[1] > past_length else None

    def _may_open(self, input_ids: torch.LongTensor) -> torch.BoolTensor:
        """The rows that may sample `<boi>` now: unfinished, with room for the smallest image they may open, and
        below `max_new_images`."""
        may_open = self.unfinished & (self.new_tokens + self.least_image_tokens <= self.max_new_tokens)
        if self.max_new_images is not None:
            may_open &= self.images_opened < self.max_new_images
        return may_open

    def sample_text(self) -> torch.LongTensor:
        """The next token of every row (`<boi>` in image mode; the filler for finished rows)."""
        config, unfinished = self.config, self.unfinished
        if self.generation_mode == "image":  # an unfinished row has not opened its image yet
            next_scores = torch.full_like(self.next_logits, -float("inf"))
            next_scores[:, config.boi_token_id] = 0.0
            next_tokens = torch.where(unfinished, config.boi_token_id, self.filler)
        else:
            next_scores = self.logits_processor(self.batch.view(self.filler), self.next_logits)
            next_tokens = _sample_next_tokens(
                next_scores, self.generation_config.do_sample, unfinished, self.options.generator, self.filler
            )
        # Recorded as transformers records them: per sampling step, the outputs of the forward that gave its logits.
        if self.scores is not None:
            self.scores += (next_scores,)
        if self.raw_logits is not None:
            self.raw_logits += (self.next_logits,)
        if self.attentions is not None:
            self.attentions += (self.outputs.attentions,)
        if self.hidden_states is not None:
            self.hidden_states += (self.outputs.hidden_states,)
        return next_tokens

    def write_text(self, next_tokens: torch.LongTensor):
        """Appends `next_tokens`, stops the rows that are done, and runs the tokens of the others through the model;
        rows that sampled `<boi>` then write their image."""
        self.batch.append(next_tokens[:, None], keep=self.unfinished)
        self.new_tokens += self.unfinished.long()
        if self.streamer is not None:
            self.streamer.put(next_tokens.cpu())
        opened = self.unfinished & (next_tokens == self.config.boi_token_id)
        # A row that opened an image is not stopped before its image is written.
        self.unfinished &= ~(self._done() & ~opened)
        if not self.unfinished.any():
            return
        self.outputs = self.model(
            input_ids=next_tokens[:, None],
            attention_mask=self.batch.attention_mask,
            position_ids=self.batch.positions[:, None],
            cache=self.cache,
            use_cache=True,
            logits_to_keep=1,
            **self.output_flags,
        )
        self.batch.positions += 1
        self.next_logits = self.outputs.logits[:, -1].to(copy=True, dtype=torch.float32)
        if opened.any():
            self.write_images(opened)

    def write_images(self, opened: torch.BoolTensor):
        """Denoises the images of the `opened` rows against the cache and commits them with their `<eoi>`."""
        if not _croppable(self.cache):
            raise ValueError(
                "Image generation rolls the KV cache back after each denoising step, which needs a DynamicCache of "
                f"full-attention layers; got {type(self.cache).__name__} with {type(self.cache.layers[0]).__name__} "
                "layers."
            )
        batch = self.batch
        rows = opened.nonzero().flatten().tolist()
        sizes = {row: self._image_size(row) for row in rows}
        latents = {}
        edit_names = self.options.edit_branch_names()
        for size in dict.fromkeys(sizes.values()):  # rows opening images of one size denoise together
            group = [row for row in rows if sizes[row] == size]
            # Editing guidance applies to edits; a row with no image before the one it opens draws from its prompt,
            # under ordinary guidance (a generation config with a source scale also serves text-to-image).
            edits = [row for row in group if edit_names and self._holds_image(row)]
            for part, names in ((edits, edit_names), ([row for row in group if row not in edits], None)):
                if not part:
                    continue
                edit = None
                if names:
                    edit = edit_branches(
                        self.model,
                        self.cache,
                        batch.input_ids,
                        batch.keep,
                        batch.attention_mask,
                        batch.positions,
                        part,
                        [self._size_text_length(row, size) for row in part],
                        names,
                    )
                part_latents = denoise_images(
                    self.model, self.cache, batch.attention_mask, batch.positions, part, self.options, size, edit
                )
                latents.update(zip(part, part_latents))
        latents = [latents[row] for row in rows]
        # In image mode a row ends with its image. Where no other row goes on, no logits are read after it, and the
        # cache only where `generate` returns it.
        last = self.generation_mode == "image" and not (self.unfinished & ~opened).any()
        read = "all" if not last else "all_but_last" if self._returns_cache() else "none"
        next_logits, outputs, input_ids, written, attention_mask = commit_images(
            self.model,
            self.cache,
            batch.attention_mask,
            batch.positions,
            rows,
            latents,
            self.filler,
            read=read,
            **self.output_flags,
        )
        if next_logits is not None:
            self.outputs = outputs
            self.next_logits[rows] = next_logits[rows]
        batch.append(input_ids, keep=written, attention_mask=attention_mask)
        batch.positions += written.sum(-1)  # filler slots do not advance a row
        self.new_tokens += written.sum(-1)
        self.images_opened[rows] += 1
        for row, image_latents in zip(rows, latents):
            self.row_latents[row].append(image_latents)
        if self.streamer is not None:
            self.streamer.put(input_ids[0].cpu())  # the whole image is one event: N slots and <eoi>
        done = self._done() | (self.generation_mode == "image")
        self.unfinished[opened] &= ~done[opened]

    def _image_size(self, row: int) -> tuple[int, int]:
        """The size of the image `row` opens now (see [`ImageSamplingOptions.image_size`]): the text it wrote since its
        last image is read back with the tokenizer, when one was given."""
        written = None
        if self.options.tokenizer is not None and self.options.asked_size(row) is None:
            tokens = self.batch.input_ids[row][self.batch.keep[row]][:-1]  # without the <boi> just sampled
            after_image = (tokens == self.config.eoi_token_id).nonzero()
            if len(after_image):
                tokens = tokens[int(after_image[-1]) + 1 :]
            written = self.options.tokenizer.decode(tokens[-16:].tolist(), skip_special_tokens=True)
        room = self.max_new_tokens - int(self.new_tokens[row])
        return self.options.image_size(row, written, room, self.config)

    def _holds_image(self, row: int) -> bool:
        """Whether `row` holds an image before the one it opens (the source of an edit)."""
        return source_image_end(self.config, self.batch.input_ids[row][self.batch.keep[row]]) is not None

    def _size_text_length(self, row: int, size: tuple[int, int]) -> int:
        """How many of the tokens before `row`'s `<boi>` are the size text of its image (`" 32x64"`, read with the
        tokenizer; 0 without one, or where the row wrote none)."""
        if self.options.tokenizer is None:
            return 0
        size_ids = self.options.tokenizer(f" {size[0]}x{size[1]}", add_special_tokens=False)["input_ids"]
        tokens = self.batch.input_ids[row][self.batch.keep[row]][:-1].tolist()
        return len(size_ids) if tokens[-len(size_ids) :] == size_ids else 0

    def _returns_cache(self) -> bool:
        return bool(self.generation_config.use_cache and self.generation_config.return_dict_in_generate)

    def _done(self) -> torch.BoolTensor:
        return self.criteria(self.batch.view(self.filler), self.scores) | (self.new_tokens >= self.max_new_tokens)

    def result(self) -> "TransfusionGenerateOutput | torch.LongTensor":
        """The sequences, or with `return_dict_in_generate` a [`TransfusionGenerateOutput`] with the decoded images."""
        if self.streamer is not None:
            self.streamer.end()
        sequences = self.batch.packed(self.pad_token_id)
        if not self.generation_config.return_dict_in_generate:
            return sequences
        output_type = self.options.output_type
        all_latents = [latents for row in self.row_latents for latents in row]
        decoded = list(all_latents)  # "latent": the latents themselves, not decoded
        for index in indices_by_shape(all_latents) if output_type != "latent" else []:
            # The VAE decodes images of one size at a time.
            pixels = self.model.decode_latents(torch.stack([all_latents[i] for i in index])).float().clamp(-1, 1)
            if output_type is not None:
                pixels = postprocess_images(pixels, output_type)
            for i, image in zip(index, pixels):
                decoded[i] = image
        decoded = iter(decoded)
        images = [[next(decoded) for _ in row] for row in self.row_latents]
        cache = self.cache if self._returns_cache() else None
        if cache is not None and cache.get_seq_length() == self.batch.input_ids.shape[1]:
            # The last forward wrote an image's <eoi>: as transformers returns it, the cache holds all but the last
            # token, which a continuing `generate` feeds again.
            cache.crop(-1)
        return TransfusionGenerateOutput(
            sequences=sequences,
            scores=self.scores,
            logits=self.raw_logits,
            attentions=self.attentions,
            hidden_states=self.hidden_states,
            cache=cache,
            images=images,
            image_latents=self.row_latents,
        )


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
    source_image_guidance_scale: float | None = None,
    image_guidance_interval: tuple[float, float] | None = None,
    generator: GeneratorArg = None,
    progress_bar: bool | None = None,
    height: int | list[int] | None = None,
    width: int | list[int] | None = None,
    tokenizer=None,
    latents: torch.Tensor | None = None,
    callback_on_step_end=None,
    callback_on_step_end_tensor_inputs: list[str] | None = None,
    output_type: str | None = None,
    **model_kwargs,
) -> TransfusionGenerateOutput | torch.LongTensor:
    """The image and interleaved decoding loop, called by `generate` (`custom_generate`) after its usual
    preparation, with the signature of `GenerationMixin._sample` plus the image arguments documented in
    [`TransfusionGenerationMixin.generate`]. It decodes greedily or samples; images are always denoised against a KV
    cache, which is returned only with `use_cache=True`. Returns sequences, or a [`TransfusionGenerateOutput`] with
    `return_dict_in_generate=True`."""
    generation_mode = generation_mode or getattr(generation_config, "generation_mode", None) or "interleaved"
    max_new_images = (
        max_new_images if max_new_images is not None else getattr(generation_config, "max_new_images", None)
    )
    if max_new_images is not None:
        max_new_images = _integer(max_new_images, "max_new_images", 0)
    batch_size = input_ids.shape[0]
    options = ImageSamplingOptions.resolve(
        model,
        generation_config,
        batch_size,
        generator,
        scheduler=scheduler,
        num_inference_steps=num_inference_steps,
        image_guidance_scale=image_guidance_scale,
        source_image_guidance_scale=source_image_guidance_scale,
        image_guidance_interval=image_guidance_interval,
        progress_bar=progress_bar,
        height=height,
        width=width,
        tokenizer=tokenizer,
        latents=latents,
        callback_on_step_end=callback_on_step_end,
        callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
        output_type=output_type,
    )
    if latents is not None and generation_mode != "image":
        raise ValueError(
            "latents is the starting noise of the image generation_mode='image' opens in every row; in "
            f"generation_mode={generation_mode!r} a row may open any number of images: pass generator instead."
        )
    if generation_config.num_beams > 1:
        raise ValueError(
            "The image loop samples or decodes greedily; `generate` runs beam search with transformers' own decoding "
            "(see docs/generation.md)."
        )
    model_kwargs["use_cache"] = True
    if streamer is not None and batch_size > 1:
        raise ValueError("Streamers take one sequence: stream with a batch of one prompt.")
    if generation_mode == "image" and max_new_images == 0:
        raise ValueError("generation_mode='image' generates one image, which max_new_images=0 forbids.")
    num_slots = max(model.config.num_image_slots(*(size or options.default_size)) for size in options.sizes)
    room = generation_config.max_length - input_ids.shape[1]
    if generation_mode == "image" and room < num_slots + 2:
        raise ValueError(
            f"generation_mode='image' needs room for <boi>, {num_slots} image slots and <eoi>: set max_new_tokens >= "
            f"{num_slots + 2} (got room for {room})."
        )

    decoding = InterleavedDecoding(
        model,
        input_ids,
        logits_processor,
        stopping_criteria,
        generation_config,
        streamer,
        generation_mode,
        max_new_images,
        options,
        model_kwargs,
        max_new_tokens=room,
    )
    decoding.prefill()
    while decoding.unfinished.any():
        decoding.write_text(decoding.sample_text())
    return decoding.result()


class TransfusionGenerationMixin(GenerationMixin):
    """Adds Transfusion's image and interleaved generation to `generate` (see [`transfusion_decode`])."""

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
        `temperature`, `top_p`, `num_beams`, `assistant_model`, `use_cache`, logits processors, stopping criteria,
        `streamer`, `return_dict_in_generate`, ...), plus the arguments below; each can also be set as an attribute of
        the generation config. docs/generation.md has a table of every feature in each mode.

        Args:
            generation_mode (`str`, *optional*, defaults to `"interleaved"`):
                `"interleaved"`: the model opens images by sampling `<boi>`; where no image opens, the output is text
                mode's. Greedy search and sampling run in the image loop; under any other decoding method (beam
                search, assisted decoding, `use_cache=False`, ...) transformers' method writes the text and generation
                ends after the first image a sequence opens. `"text"`: transformers' own decoding, with `<boi>` never
                sampled (e.g. captioning an image given in the prompt). `"image"`: one image is opened right after
                the prompt and generation ends with its `<eoi>` (then `max_new_tokens`, unless given in the call, is
                N + 2, N the slots of the image); it decodes no text, so beam search and assistants are refused.
            max_new_images (`int`, *optional*):
                Most images a row may open; `<boi>` is suppressed afterwards. No limit by default.
            scheduler (`str` or diffusers `SchedulerMixin`, *optional*):
                `"ddpm"`, `"ddim"` (default) or `"dpmsolver++"` for `objective="ddpm"`; `"flow_euler"` (default) for
                `objective="flow"`; or a scheduler instance compatible with the model's training schedule.
            num_inference_steps (`int`, *optional*, defaults to 50):
                Denoising steps per image.
            image_guidance_scale (`float`, *optional*, defaults to 1.0):
                Classifier-free guidance for images, `uncond + scale * (cond - uncond)`; 1 means no guidance (and no
                extra compute). `guidance_scale` is transformers' guidance of text and is refused for images. With
                `source_image_guidance_scale` set, it guides an edit on its instruction instead.
            source_image_guidance_scale (`float`, *optional*):
                Editing guidance (docs/editing.md): for a prompt `<source image> instruction` (plus the size text of a
                model that writes sizes), the image opened after it is denoised against three prefixes, as in
                InstructPix2Pix: the full one, one without the instruction and one without the source image, and the
                prediction is `full + (image_guidance_scale - 1) * (full - no_instruction) +
                (source_image_guidance_scale - 1) * (full - no_source)`; a scale of 1 skips its branch. A row that
                holds no image before the one it opens is not an edit: it gets the ordinary guidance of
                `image_guidance_scale`, so that an edit model's generation config serves text-to-image too. The
                pipelines' `guidance_scale` and `image_guidance_scale` (diffusers' names) map to `image_guidance_scale`
                and this. Pass `tokenizer` for a model that writes sizes, so that the branches keep the size text.
            image_guidance_interval (`tuple[float, float]`, *optional*):
                Timesteps `(low, high)` of the training schedule (0 to `config.num_train_timesteps`, high is noisy):
                guidance applies only at denoising steps whose timestep lies in `[low, high]`, the conditional
                prediction alone elsewhere (limited-interval guidance, Kynkaenniemi et al. 2024: guidance at the
                noisiest steps costs diversity). All steps by default.
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*):
                Source of the image noise and, with `do_sample=True`, of the text samples. With a list, one per row,
                every row is generated exactly as it would be alone with its generator.
            progress_bar (`bool`, *optional*, defaults to `True`):
                Shows a progress bar over the denoising steps of each image.
            height (`int` or `list[int]`, *optional*), width (`int` or `list[int]`, *optional*):
                Size in pixels of the images to generate, for every row or one per row: multiples of
                `config.image_size_divisor`, at most `config.max_image_size` (a missing one is `config.image_size`).
                Without them, in interleaved mode, an image takes the size the row wrote just before `<boi>`
                (`"32x64"`, as `TransfusionProcessor(write_image_size=True)` renders it in training text) when a
                `tokenizer` is passed to read it and the size is valid and fits; otherwise `config.image_size`.
            tokenizer (`PreTrainedTokenizerBase`, *optional*):
                Reads the sizes rows write (and, as in transformers, serves `stop_strings`).

        With diffusers' meanings:
            num_images_per_prompt (`int`, *optional*, defaults to 1):
                In `generation_mode="image"`: each prompt row is repeated this many times (rows `p0, p0, p1, p1, ...`),
                so the output has `batch_size * num_images_per_prompt` rows (other modes: `num_return_sequences`).
            latents (`torch.Tensor`, *optional*):
                In `generation_mode="image"`: the starting noise, `(batch_size * num_images_per_prompt,
                latent_channels, height / f, width / f)` (f: `config.vae_downsample_factor`), drawn from N(0, I)
                instead of from `generator` (scaled by the scheduler's `init_noise_sigma`, as diffusers does).
            callback_on_step_end (`Callable`, *optional*):
                Called after each denoising step as `callback_on_step_end(model, step_index, timestep,
                callback_kwargs)`, `callback_kwargs` holding the tensors named in `callback_on_step_end_tensor_inputs`
                (the latents of the rows denoising, `(rows, latent_channels, h, w)`); a returned dict may replace them.
                diffusers' `PipelineCallback` objects bring their own `tensor_inputs`.
            callback_on_step_end_tensor_inputs (`list[str]`, *optional*, defaults to `["latents"]`):
                What the callback receives; only `"latents"` exists here.
            output_type (`str`, *optional*):
                How `images` come back (see [`TransfusionGenerateOutput`]): `"pil"`, `"np"`, `"pt"` or `"latent"`
                (no decoding). Default: tensors in [-1, 1].
            return_dict (`bool`, *optional*):
                The same as transformers' `return_dict_in_generate`: an output object (with `images`) instead of the
                sequences alone.

        Every numeric argument (these and transformers' `max_new_tokens`, `temperature`, ...) is checked for type and
        finiteness before any compute; a `TypeError` or `ValueError` names the argument.

        Return:
            `torch.LongTensor` of sequences, or a [`TransfusionGenerateOutput`] (with `images` and `image_latents`;
            a [`TransfusionGenerateBeamOutput`] under beam search) when `return_dict_in_generate=True` (a plain
            transformers output in `"text"` mode).
        """
        defaults = generation_config if generation_config is not None else self.generation_config
        mode = kwargs.get("generation_mode") or getattr(defaults, "generation_mode", None) or "interleaved"
        if mode not in GENERATION_MODES:
            raise ValueError(f"Unknown generation_mode {mode!r}: choose one of {list(GENERATION_MODES)}.")
        if getattr(defaults, "is_assistant", False):
            mode = "text"  # an assistant drafts text, which the main model checks
        if "return_dict" in kwargs:
            return_dict = kwargs.pop("return_dict")
            if kwargs.setdefault("return_dict_in_generate", return_dict) != return_dict:
                raise ValueError("return_dict and return_dict_in_generate name the same choice: pass one of them.")
        num_images = _integer(kwargs.pop("num_images_per_prompt", None) or 1, "num_images_per_prompt", 1)
        if num_images > 1:
            if mode != "image":
                raise ValueError(
                    f"num_images_per_prompt repeats each prompt in generation_mode='image'; in generation_mode="
                    f"{mode!r}, ask for several sequences with num_return_sequences (and do_sample=True)."
                )
            inputs = self._repeat_prompts(inputs, kwargs, num_images)
        if custom_generate is None and mode != "text" and kwargs.get("guidance_scale") is not None:
            raise ValueError(
                f"guidance_scale is transformers' classifier-free guidance of text; for images in "
                f"generation_mode={mode!r} pass image_guidance_scale={kwargs['guidance_scale']!r}."
            )
        _check_numeric_arguments(kwargs, defaults)
        prompt = inputs if inputs is not None else kwargs.get("input_ids", kwargs.get("inputs_embeds"))
        sizes = requested_image_sizes(
            self.config,
            kwargs.get("height", getattr(defaults, "height", None)),
            kwargs.get("width", getattr(defaults, "width", None)),
            1 if prompt is None else prompt.shape[0],
        )
        size = (self.config.image_size, self.config.image_size)
        image_tokens = max(self.config.num_image_slots(*(s or size)) for s in sizes) + 2
        self._check_prompt_length(prompt, image_tokens if mode == "image" else 0)
        if (
            custom_generate is None
            and mode == "image"
            and all(kwargs.get(k) is None for k in ("max_new_tokens", "max_length"))
        ):
            # Image mode ends with the image's <eoi>: unless the call sets a length, it gets exactly the image's room
            # (a generation config's max_new_tokens is meant for text).
            kwargs["max_new_tokens"] = image_tokens
        settings = copy.deepcopy(defaults)
        settings.update(**kwargs)
        self._check_images_per_row(inputs if inputs is not None else kwargs.get("input_ids"), kwargs, settings)
        if custom_generate is None:
            kwargs.pop("generation_mode", None)
            if mode == "text":
                return self._generate_text(
                    inputs, generation_config, logits_processor, stopping_criteria, streamer, defaults, kwargs
                )
            room = self._room_for_images(prompt, settings, sizes, kwargs)
            rules = ImageTokenRules(self.config, self._suppress_tokens(kwargs, defaults), room)
            logits_processor = LogitsProcessorList([*(logits_processor or []), rules])
            if not self._image_loop_carries(mode, settings, kwargs):
                return self._generate_text_then_images(
                    inputs, generation_config, logits_processor, stopping_criteria, streamer, kwargs, settings
                )
            # A callable custom_generate does not receive `tokenizer`: it is handed over here, and stop strings are
            # turned into a criterion.
            tokenizer = kwargs.pop("tokenizer", None)
            custom_generate = functools.partial(
                transfusion_decode, streamer=streamer, tokenizer=tokenizer, generation_mode=mode
            )
            if kwargs.get("stop_strings") is not None and tokenizer is not None:
                stop = StopStringCriteria(tokenizer=tokenizer, stop_strings=kwargs.pop("stop_strings"))
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

    @staticmethod
    def _image_loop_carries(mode: str, settings, kwargs) -> bool:
        """Whether the image loop decodes the text of this call itself: greedy search or sampling, with the default
        cache. Image mode decodes no text, so it refuses the other methods; interleaved mode hands them to
        transformers (see `_generate_text_then_images`)."""
        method = settings.get_generation_mode(kwargs.get("assistant_model"))
        if kwargs.get("synced_gpus"):
            raise ValueError(
                f"generation_mode={mode!r} cannot keep processes in step (synced_gpus): each row opens images on its "
                "own. Generate images on each process alone, or text with generation_mode='text'."
            )
        samples = method in (GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE)
        if mode == "image" and not samples:
            raise ValueError(
                f"generation_mode='image' decodes no text, so {method.value.replace('_', ' ')} has nothing to do: "
                "the image opens right after the prompt. Use it in generation_mode='interleaved' or 'text'."
            )
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        return mode == "image" or (
            samples
            and settings.use_cache
            and settings.prefill_chunk_size is None
            and settings.cache_implementation in (None, "dynamic")
            and (cache is None or _croppable(cache))
        )

    def _generate_text(
        self, inputs, generation_config, logits_processor, stopping_criteria, streamer, defaults, kwargs
    ):
        """`generation_mode="text"`: transformers' decoding as for any causal LM, `<boi>`, `<image>` and `<eoi>`
        suppressed. The image arguments (`num_inference_steps`, ...) configure images, which this mode never opens."""
        for name in IMAGE_ARGUMENTS:
            kwargs.pop(name, None)
        generator = kwargs.pop("generator", None)
        do_sample = kwargs.get("do_sample", getattr(defaults, "do_sample", False))
        if generator is not None and do_sample:
            raise ValueError(
                "generation_mode='text' samples with transformers' decoding, which draws from torch's global random "
                "state: seed it with torch.manual_seed instead of passing generator."
            )
        input_ids = inputs if inputs is not None else kwargs.get("input_ids")
        if input_ids is not None and input_ids.shape[1] and (input_ids[:, -1] == self.config.boi_token_id).any():
            raise ValueError("A prompt ends with <boi> but generation_mode='text' never generates an image.")
        rules = ImageTokenRules(self.config, self._suppress_tokens(kwargs, defaults))
        return super().generate(
            inputs=inputs,
            generation_config=generation_config,
            logits_processor=LogitsProcessorList([*(logits_processor or []), rules]),
            stopping_criteria=stopping_criteria,
            streamer=streamer,
            **kwargs,
        )

    def _generate_text_then_images(
        self, inputs, generation_config, logits_processor, stopping_criteria, streamer, kwargs, settings
    ):
        """Interleaved mode under a decoding method the image loop does not carry (beam search, beam sampling,
        assisted decoding, `use_cache=False`, another cache class, chunked prefill): transformers' own decoding writes
        the text, in which `<boi>` (allowed where an image fits) ends a sequence as an end-of-sequence id does; the
        image of every sequence that ended with `<boi>` is then written, and generation ends with its `<eoi>`."""
        image_arguments = {name: kwargs.pop(name, None) for name in IMAGE_ARGUMENTS if name != "max_new_images"}
        kwargs.pop("max_new_images", None)
        prompt_ids = inputs if inputs is not None else kwargs.get("input_ids")
        prompt_embeds = kwargs.get("inputs_embeds")
        if prompt_ids is None and prompt_embeds is None and settings.bos_token_id is not None:
            inputs = prompt_ids = torch.full((1, 1), settings.bos_token_id, device=self.device)  # as transformers
        prompt = prompt_ids if prompt_ids is not None else prompt_embeds
        options = ImageSamplingOptions.resolve(
            self,
            settings,
            prompt.shape[0],
            kwargs.pop("generator", None),
            tokenizer=kwargs.get("tokenizer"),
            **image_arguments,
        )
        end_ids = settings.eos_token_id if isinstance(settings.eos_token_id, list) else [settings.eos_token_id]
        end_ids = [token for token in end_ids if token is not None]
        pad_token_id = pad_token_id_of(settings)
        kwargs["eos_token_id"] = [*end_ids, self.config.boi_token_id]
        kwargs["pad_token_id"] = self.config.eoi_token_id if pad_token_id is None else pad_token_id
        out = super().generate(
            inputs=inputs,
            generation_config=generation_config,
            logits_processor=logits_processor,
            stopping_criteria=stopping_criteria,
            streamer=None if streamer is None else _StreamUntilImages(streamer),
            **kwargs,
        )
        sequences = out if isinstance(out, torch.Tensor) else out.sequences
        offset = 0 if prompt_ids is None else prompt_ids.shape[1]  # where the generated tokens start
        generated = sequences[:, offset:]
        ends = torch.isin(generated, torch.tensor(kwargs["eos_token_id"], device=generated.device))
        kept = ends.long().cumsum(-1) - ends.long() == 0  # each row's tokens, up to its first end
        opened = (kept & (generated == self.config.boi_token_id)).any(-1)
        beams = isinstance(out, GenerateBeamDecoderOnlyOutput)
        output_class = TransfusionGenerateBeamOutput if beams else TransfusionGenerateOutput
        if not opened.any():
            if streamer is not None:
                streamer.end()
            if isinstance(out, torch.Tensor):
                return out
            return output_class(**out, images=[[] for _ in sequences], image_latents=[[] for _ in sequences])

        # The image writer reads the decoded sequences (and the prompt's images) into a fresh cache, and each row
        # whose tokens end with <boi> opens its image, as a prompt ending with <boi> does in image mode.
        expand = sequences.shape[0] // prompt.shape[0]  # beams / num_return_sequences
        prompt_mask = kwargs.get("attention_mask")
        if prompt_mask is None:
            prompt_mask = torch.ones(prompt.shape[:2], dtype=torch.long, device=sequences.device)
        attention_mask = torch.cat([prompt_mask.repeat_interleave(expand, 0), kept.to(prompt_mask.dtype)], dim=-1)
        model_kwargs = {
            "attention_mask": attention_mask,
            "position_ids": (attention_mask.long().cumsum(-1) - 1).clamp(min=0),
            "use_cache": True,
            "logits_to_keep": 1,
        }
        for name in ("pixel_values", "image_latents", "image_sizes"):
            model_kwargs[name] = _repeat_rows(kwargs.get(name), expand)
        keep = torch.cat([torch.ones_like(sequences[:, :offset], dtype=torch.bool), kept], dim=-1)
        if prompt_ids is None:
            embeds = torch.cat([prompt_embeds.repeat_interleave(expand, 0), self.get_input_embeddings()(sequences)], 1)
            model_kwargs["inputs_embeds"] = embeds
        writer_config = copy.deepcopy(settings)
        writer_config.return_dict_in_generate, writer_config.use_cache = True, True
        decoding = InterleavedDecoding(
            self,
            sequences,
            LogitsProcessorList(),
            StoppingCriteriaList(),
            writer_config,
            streamer,
            "image",
            None,
            options.repeat_rows(expand),
            model_kwargs,
            max_new_tokens=self._max_new_tokens(settings, prompt),
            keep=keep,
            new_tokens=kept.sum(-1),
        )
        decoding.unfinished = opened
        decoding.prefill()
        written = decoding.result()
        if isinstance(out, torch.Tensor):
            return written.sequences
        fields = {**out, "sequences": written.sequences, "cache": written.cache if settings.use_cache else None}
        return output_class(**fields, images=written.images, image_latents=written.image_latents)

    def _room_for_images(self, prompt, settings, sizes, kwargs) -> Callable | None:
        """The rule of `ImageTokenRules` for transformers' decoding, by sequence length (the image loop replaces it
        with its own per-row count): `<boi>` where the smallest image a row may open still fits its new-token budget
        (`None` where no image may open)."""
        max_new_images = kwargs.get("max_new_images", getattr(settings, "max_new_images", None))
        if max_new_images == 0 or prompt is None:
            return None
        budget = self._max_new_tokens(settings, prompt)
        offset = prompt.shape[1] if prompt.dim() == 2 else 0  # processors see input_ids (none for inputs_embeds)
        size = (self.config.image_size, self.config.image_size)
        least = torch.tensor([self.config.num_image_slots(*(s or size)) + 2 for s in sizes], device=prompt.device)

        def may_open(input_ids: torch.LongTensor) -> torch.BoolTensor:
            rows = least.repeat_interleave(input_ids.shape[0] // least.numel())  # beams follow their prompt
            return input_ids.shape[1] - offset + rows <= budget

        return may_open

    @staticmethod
    def _max_new_tokens(settings, prompt: torch.Tensor) -> int:
        """The new-token budget transformers derives from `max_new_tokens` or else `max_length`."""
        if settings.max_new_tokens is not None:
            return settings.max_new_tokens
        return (settings.max_length if settings.max_length is not None else DEFAULT_MAX_LENGTH) - prompt.shape[1]

    @staticmethod
    def _suppress_tokens(kwargs, defaults) -> list[int]:
        """`suppress_tokens` of the call or the generation config: `ImageTokenRules` takes the place of the processor
        transformers would build for them."""
        return kwargs.pop("suppress_tokens", None) or getattr(defaults, "suppress_tokens", None) or []

    def _check_images_per_row(self, input_ids, kwargs, settings):
        """`generate` repeats every input row-wise for beams and returned sequences, images too: they are counted per
        prompt, so that holds for one image per row only."""
        images = kwargs.get("pixel_values", kwargs.get("image_latents"))
        expansion = max(settings.num_beams or 1, 1) * max(settings.num_return_sequences or 1, 1)
        if images is None or expansion == 1 or input_ids is None:
            return
        per_row = torch.bincount(
            self.model.locate_images(input_ids == self.config.image_token_id)[0], minlength=len(input_ids)
        )
        if not (per_row == 1).all():
            raise ValueError(
                "num_beams / num_return_sequences > 1 with images in the prompt need exactly one image per row; the "
                f"rows hold {per_row.tolist()} images."
            )

    def _repeat_prompts(self, inputs: torch.Tensor | None, kwargs: dict, times: int) -> torch.Tensor | None:
        """Repeats every prompt row `times` times in place (rows `p0, p0, p1, p1, ...`, as diffusers'
        `num_images_per_prompt`): the ids or embeddings, their mask and positions, and the images of the prompts."""
        prompt = inputs if inputs is not None else kwargs.get("input_ids")
        slots = self.model.get_placeholder_mask(prompt, kwargs.get("inputs_embeds"))
        image_rows = self.model.locate_images(slots)[0].tolist()
        per_row = [[index for index, r in enumerate(image_rows) if r == row] for row in range(slots.shape[0])]
        order = [index for images in per_row for _ in range(times) for index in images]
        for name in ("input_ids", "inputs_embeds", "attention_mask", "position_ids"):
            if isinstance(kwargs.get(name), torch.Tensor):
                kwargs[name] = kwargs[name].repeat_interleave(times, dim=0)
        for name in ("pixel_values", "image_latents", "image_sizes"):
            images = kwargs.get(name)
            if isinstance(images, torch.Tensor):
                kwargs[name] = images[torch.tensor(order, dtype=torch.long, device=images.device)]
            elif isinstance(images, list | tuple):
                kwargs[name] = [images[index] for index in order]
        return None if inputs is None else inputs.repeat_interleave(times, dim=0)

    def _check_prompt_length(self, prompt: torch.Tensor | None, image_tokens: int):
        """A prompt the backbone's positions cannot hold (or, in image mode, one that leaves no room for the
        `image_tokens` of its image) is refused here, rather than silently run past the trained positions."""
        limit = getattr(self.config.get_text_config(), "max_position_embeddings", None)
        if prompt is None or limit is None:
            return
        length = prompt.shape[1]
        needed = length + image_tokens
        if needed > limit:
            what = f"a prompt of {length} tokens" + (" plus one image" if image_tokens else "")
            raise ValueError(
                f"{what} needs {needed} positions, more than the backbone's max_position_embeddings ({limit}): "
                "shorten the prompt" + (" or ask for a smaller image." if image_tokens else ".")
            )


__all__ = [
    "GENERATION_MODES",
    "ImageTokenRules",
    "TransfusionGenerateBeamOutput",
    "TransfusionGenerateOutput",
    "TransfusionGenerationMixin",
    "ImageSamplingOptions",
    "InterleavedDecoding",
    "denoise_images",
    "commit_images",
    "image_token_layout",
    "written_size_image_arguments",
    "transfusion_decode",
]
