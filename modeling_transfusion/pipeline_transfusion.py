"""The `text-to-image` pipeline for Transfusion: prompts in, one generated PIL image per prompt out; with `image=`,
the prompt is an edit instruction for that image (diffusers' image-to-image convention, InstructPix2Pix's guidance).

After `import modeling_transfusion`, `pipeline("text-to-image", model=checkpoint_dir)` builds this pipeline with the
checkpoint's model and processor. The same checkpoint also serves transformers' built-in `image-text-to-text`
(captioning) and `text-generation` pipelines.

The model and processor reach this file through the Auto classes; it imports only the argument checks of
`generation_transfusion` and the editing defaults of `editing_transfusion` (flat relative imports), so the hub export
can copy it next to the weights as remote code.
"""

import functools
import os
from typing import Any

import torch
from transformers import Pipeline

from .editing_transfusion import edit_source_guidance_scale
from .generation_transfusion import (
    OUTPUT_TYPES,
    _finite_float,
    _integer,
    callback_tensor_inputs,
    postprocess_images,
    written_size_image_arguments,
)

TEXT_TO_IMAGE_TASK = "text-to-image"


class TransfusionTextToImagePipeline(Pipeline):
    r"""
    Text-to-image generation with a Transfusion model: each prompt opens its images right after its text
    (`generate(..., generation_mode="image")`), which are denoised against the prompt's KV cache.

    Load it with `pipeline("text-to-image", model=checkpoint_dir)` after `import modeling_transfusion`, or build it from
    objects: `pipeline("text-to-image", model=model, processor=processor)`.

    Call arguments (all optional, each can also be given when the pipeline is built), with diffusers' names and
    meanings:
        image (`PIL.Image.Image` or a list, one per prompt): the image each prompt edits (docs/editing.md). The
            sequence is `<image> prompt`, the source image clean in the KV cache; the edited image is generated after
            it, of the size given by `height`/`width`, else of the size the model writes.
        guidance_scale (`float`, defaults to the model's `image_guidance_scale`, else 1.0):
            Classifier-free guidance for the image: `uncond + scale * (cond - uncond)`; 1 means no guidance. It is
            passed to `generate` as `image_guidance_scale`. With `image`, it guides on the instruction (the branch
            without the instruction in place of `uncond`), as in InstructPix2Pix.
        image_guidance_scale (`float`, with `image` only; defaults to the model's `source_image_guidance_scale`, else
            1.0): guidance on the source image, against the branch without it (InstructPix2Pix's name). It is passed
            to `generate` as `source_image_guidance_scale`.
        num_inference_steps (`int`, defaults to the generation config's, else 50): denoising steps.
        height (`int`), width (`int`): the size of the images in pixels (defaults: the model's `image_size`): multiples
            of `config.image_size_divisor`, at most `config.max_image_size`; one size for all the prompts of a call,
            as in diffusers (`model.generate` takes one per row). For a model that writes sizes (its
            processor has `write_image_size`), the prompt ends with the size text, as in training.
        num_images_per_prompt (`int`, defaults to 1): images generated for each prompt.
        scheduler (`str` or diffusers `SchedulerMixin`): the sampler, as in `generate` (`"ddim"`, `"ddpm"`,
            `"dpmsolver++"`, `"flow_euler"` or an instance).
        seed (`int`): image `k` of every prompt is generated as it would be alone with
            `torch.Generator().manual_seed(seed + k)`, so that it does not depend on the other prompts of the call or
            on `batch_size`.
        generator (`torch.Generator` or a list of them): the source of the noise, used as it is: one shared by the
            images of the call in order, or one per image (`len(prompts) * num_images_per_prompt`). Pass either `seed`
            or `generator`.
        latents (`torch.Tensor`): the starting noise instead, `(len(prompts) * num_images_per_prompt,
            latent_channels, height / f, width / f)` (f: `config.vae_downsample_factor`).
        callback_on_step_end (`Callable`), callback_on_step_end_tensor_inputs (`list[str]`, defaults to
            `["latents"]`): called after each denoising step as `callback_on_step_end(pipeline, step_index, timestep,
            callback_kwargs)`; a returned `{"latents": ...}` replaces the latents.
        output_type (`str`, defaults to `"pil"`): `"pil"` (PIL images), `"np"` (float32 arrays `(height, width,
            channels)` in [0, 1]), `"pt"` (tensors `(channels, height, width)` in [0, 1]) or `"latent"` (the latents,
            not decoded).
        return_dict (`bool`, defaults to `True`): see Returns.
        progress_bar (`bool`): a progress bar over the denoising steps (the model's default otherwise).
        generate_kwargs (`dict`): further arguments of `model.generate`.

    Any other argument is refused with a `ValueError` that says what to use instead. There is no `negative_prompt`:
    diffusers' negative prompt takes the place of the empty prompt of the unconditional branch, and here that branch
    is no prompt at all but the image slots blind to the prefix (the condition dropout the model trains with), run
    against the prompt's own KV cache. A negative prompt would be another conditional branch, with a prefix and KV
    cache of its own per row, which the denoising loop does not have.

    Returns:
        Per prompt, with `return_dict=True`, `{"image": image}`, or a list of `num_images_per_prompt` such dicts when it
        is larger than 1 (transformers' convention for several outputs per input); with `return_dict=False`, diffusers'
        tuple `(images,)`: a list of PIL images, or one array / tensor of the prompt's images stacked. A list of
        prompts gives a list of these, one per prompt.

    Example:

    ```python
    >>> import modeling_transfusion  # registers the task  # doctest: +SKIP
    >>> from transformers import pipeline  # doctest: +SKIP
    >>> generator = pipeline("text-to-image", model="checkpoints/transfusion-mnist")  # doctest: +SKIP
    >>> generator("a handwritten seven", guidance_scale=3.0, num_inference_steps=50, seed=0)["image"]  # doctest: +SKIP
    ```
    """

    _load_processor = True
    _load_tokenizer = False
    _load_image_processor = False
    _load_feature_extractor = False
    _load_video_processor = False
    _pipeline_calls_generate = True
    # `guidance_scale` is a GenerationConfig field (text guidance); here it is the image guidance of diffusion.
    _non_generation_params = ("guidance_scale",)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.processor is None:
            raise ValueError(
                "The text-to-image pipeline needs the checkpoint's processor (a TransfusionProcessor): save it next to "
                "the model with processor.save_pretrained(dir), or pass processor=... to pipeline()."
            )
        generates_images = "image" in getattr(self.model, "output_modalities", ())
        if not generates_images or not hasattr(self.processor, "postprocess_images"):
            raise ValueError(
                f"The text-to-image pipeline needs a model that generates images (a Transfusion model) and its "
                f"processor; got {type(self.model).__name__} and {type(self.processor).__name__}."
            )

    def _sanitize_parameters(
        self,
        guidance_scale: float | None = None,
        image_guidance_scale: float | None = None,
        num_inference_steps: int | None = None,
        height: int | None = None,
        width: int | None = None,
        num_images_per_prompt: int | None = None,
        scheduler=None,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        output_type: str | None = None,
        return_dict: bool | None = None,
        progress_bar: bool | None = None,
        generate_kwargs: dict | None = None,
        **unknown,
    ):
        if unknown:
            raise ValueError(_unknown_arguments_message(unknown))
        if seed is not None and generator is not None:
            raise ValueError("Pass either seed or generator, not both.")
        if output_type is not None and output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {list(OUTPUT_TYPES)}, got {output_type!r}.")
        # Checked here so that an error names the pipeline's arguments (generate knows `image_guidance_scale`).
        if guidance_scale is not None:
            guidance_scale = _finite_float(guidance_scale, "guidance_scale", 0.0)
        if image_guidance_scale is not None:
            image_guidance_scale = _finite_float(image_guidance_scale, "image_guidance_scale", 0.0)
        if num_inference_steps is not None:
            num_inference_steps = _integer(num_inference_steps, "num_inference_steps", 1)
        if num_images_per_prompt is not None:
            num_images_per_prompt = _integer(num_images_per_prompt, "num_images_per_prompt", 1)
        if seed is not None:
            seed = _integer(seed, "seed", 0)
        preprocess_params = {}
        for name, value in (("height", height), ("width", width)):
            if isinstance(value, list | tuple):  # as diffusers' pipelines: one size per call
                raise ValueError(
                    f"The text-to-image pipeline takes one {name} for all its prompts, got {name}={value!r}: call it "
                    "once per size, or pass one size per row to model.generate(height=[...], width=[...])."
                )
        if height is not None or width is not None:
            default = self.model.config.image_size
            size = (default if height is None else height, default if width is None else width)
            height, width = self.model.config.check_image_size(*size, name="height x width")
            preprocess_params = {"height": height, "width": width}
        image_kwargs = {
            "image_guidance_scale": guidance_scale,
            "source_image_guidance_scale": image_guidance_scale,
            "num_inference_steps": num_inference_steps,
            "num_images_per_prompt": num_images_per_prompt,
            "scheduler": scheduler,
            "generator": generator,
            "callback_on_step_end": callback_on_step_end,
            "callback_on_step_end_tensor_inputs": callback_on_step_end_tensor_inputs,
            "output_type": output_type,
            "progress_bar": progress_bar,
            "seed": seed,
            "generate_kwargs": generate_kwargs,
        }
        forward_params = {name: value for name, value in image_kwargs.items() if value is not None}
        postprocess_params = {
            name: value
            for name, value in (("output_type", output_type), ("return_dict", return_dict))
            if value is not None
        }
        return preprocess_params, forward_params, postprocess_params

    def __call__(self, prompt: str | list[str], image=None, latents: torch.Tensor | None = None, **kwargs):
        """
        Generates `num_images_per_prompt` images per prompt.

        Args:
            prompt (`str` or `list[str]`): the text each image is generated from, or with `image` the edit instruction.
            image (`PIL.Image.Image` or `list`, *optional*): the image each prompt edits, one per prompt.
            latents (`torch.Tensor`, *optional*): the starting noise of all images of the call (see the class).
            kwargs: the call arguments documented on the class, and `batch_size`.

        Returns:
            For a string, its result (see the class); for a list of strings, a list of them.
        """
        if not isinstance(prompt, (str, list, tuple)):
            raise ValueError("prompt must be a string or a list of strings.")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise ValueError("Got no prompts: pass a string or a non-empty list of strings.")
        for index, text in enumerate(prompts):
            if not isinstance(text, str):
                raise ValueError("prompt must be a string or a list of strings.")
            if not text.strip():
                raise ValueError(
                    f"Prompt {index} is empty: describe the image to generate, e.g. 'a handwritten seven'."
                )
        if image is None and kwargs.get("image_guidance_scale") is not None:
            raise ValueError(
                "image_guidance_scale guides an edit on its source image: pass the image to edit as image=..., or "
                "guidance_scale alone for text-to-image."
            )
        if image is not None:
            images = list(image) if isinstance(image, (list, tuple)) else [image]
            if len(images) != len(prompts):
                raise ValueError(f"Got {len(images)} images for {len(prompts)} prompt(s): pass one image per prompt.")
            kwargs.setdefault("image_guidance_scale", edit_source_guidance_scale(self.model.generation_config))
            image = images
        per_image = {"latents": latents, "image": image}
        if isinstance(kwargs.get("generator"), (list, tuple)):
            per_image["generator"] = kwargs.pop("generator")
        per_image = {name: values for name, values in per_image.items() if values is not None}
        inputs = prompts
        if per_image:  # given for every image of the call, they travel with their prompt, so that batching splits them
            inputs = [{"prompt": text} for text in prompts]
            for name, values in per_image.items():
                if name != "image" and len(values) % len(prompts):
                    raise ValueError(
                        f"Got {len(values)} {name} for {len(prompts)} prompt(s): pass num_images_per_prompt per prompt."
                    )
                size = len(values) // len(prompts)
                for index, item in enumerate(inputs):
                    chunk = values[index * size : (index + 1) * size]
                    item[name] = chunk[None] if isinstance(chunk, torch.Tensor) else list(chunk)
                    if name == "image":
                        item[name] = chunk[0]
        results = super().__call__(inputs, **kwargs)
        return results[0] if isinstance(prompt, str) else results

    def preprocess(self, prompt, height: int | None = None, width: int | None = None) -> dict[str, Any]:
        item = prompt if isinstance(prompt, dict) else {"prompt": prompt}
        default = self.model.config.image_size
        if "image" in item:
            # An edit: `<image> instruction`, then the size text (given), or the size the model writes (0 x 0 here).
            text = f"{self.processor.image_token} {item['prompt']}"
            if height is not None or width is not None:
                height, width = height or default, width or default
                text += self.processor.render_image_size(height, width)
            inputs = self.processor(text=[text], images=[item["image"]], return_tensors="pt")
        else:
            height, width = height or default, width or default
            text = item["prompt"] + self.processor.render_image_size(height, width)
            inputs = self.processor(text=[text], return_tensors="pt")
        size = torch.tensor([[height or 0, width or 0]])  # a tensor, so that batching collates it
        model_inputs = {
            "input_ids": inputs["input_ids"],
            "attention_mask": inputs["attention_mask"],
            "image_size": size,
        }
        for name in ("pixel_values", "image_sizes"):
            if name in inputs:
                model_inputs[name] = inputs[name]
        return {**model_inputs, **{name: item[name] for name in ("latents", "generator") if name in item}}

    def _forward(
        self,
        model_inputs: dict[str, Any],
        seed: int | None = None,
        num_images_per_prompt: int = 1,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        output_type: str | None = None,
        generate_kwargs=None,
        **image_kwargs,
    ):
        # Batches are padded on the tokenizer's side; generation needs the padding on the left.
        input_ids, attention_mask = _left_align(model_inputs["input_ids"], model_inputs["attention_mask"])
        num_rows = input_ids.shape[0] * num_images_per_prompt
        if "latents" in model_inputs:
            image_kwargs["latents"] = model_inputs["latents"].flatten(0, 1)  # [prompts, images, ...] -> rows
        if "generator" in model_inputs:
            chunks = model_inputs["generator"]  # one prompt's list, or (batched) one list per prompt
            chunks = [chunks] if isinstance(chunks[0], torch.Generator) else chunks
            image_kwargs["generator"] = [generator for chunk in chunks for generator in chunk]
        if seed is not None:
            image_kwargs["generator"] = [
                torch.Generator(device=input_ids.device).manual_seed(seed + image)
                for _ in range(input_ids.shape[0])
                for image in range(num_images_per_prompt)
            ]
        if callback_on_step_end is not None:  # diffusers' callbacks receive the pipeline
            image_kwargs["callback_on_step_end"] = functools.partial(_call_with_pipeline, callback_on_step_end, self)
            tensor_inputs = callback_tensor_inputs(callback_on_step_end, callback_on_step_end_tensor_inputs)
            image_kwargs["callback_on_step_end_tensor_inputs"] = list(tensor_inputs)
        overrides = {"return_dict_in_generate": True}
        generate_kwargs = self._prepare_generate_kwargs(dict(generate_kwargs or {}), **overrides)
        if self.model.generation_config.pad_token_id is None and "pad_token_id" not in generate_kwargs:
            generate_kwargs["pad_token_id"] = self.processor.tokenizer.pad_token_id
        height, width = model_inputs["image_size"][0].tolist()  # one size per call
        mode = {"generation_mode": "image", "height": height, "width": width}
        if "pixel_values" in model_inputs:
            image_kwargs["pixel_values"] = model_inputs["pixel_values"]
            if "image_sizes" in model_inputs:
                image_kwargs["image_sizes"] = model_inputs["image_sizes"].reshape(-1, 2)
            image_kwargs["tokenizer"] = self.processor.tokenizer  # reads the size text the branches keep
            if not height:
                # The model writes the edited image's size, then opens it: one image, then the sequence ends.
                mode = written_size_image_arguments(self.model.config)
                if num_images_per_prompt > 1:
                    raise ValueError(
                        "An edit without height and width makes one image per prompt: pass height and width."
                    )
        if mode["generation_mode"] == "image":
            generate_kwargs.setdefault("use_cache", False)  # no cache is returned: the image is not written to it
        outputs = self.model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            num_images_per_prompt=num_images_per_prompt,
            output_type="latent" if output_type == "latent" else None,
            **mode,
            **image_kwargs,
            **generate_kwargs,
        )
        missing = [row for row, images in enumerate(outputs.images) if not images]
        if missing:
            raise ValueError(
                f"The model wrote no image for the edit of row(s) {missing} (it ended the sequence first): pass height "
                "and width to open the edited image right after the instruction."
            )
        if len({tuple(row[0].shape) for row in outputs.images}) > 1:
            raise ValueError("The model wrote edited images of different sizes in one batch: pass height and width.")
        images = torch.stack([row[0] for row in outputs.images])  # [rows, channels, h, w]: in [-1, 1], or latents
        return {"images": images.unflatten(0, (input_ids.shape[0], num_rows // input_ids.shape[0]))}

    def postprocess(self, model_outputs: dict[str, Any], output_type: str = "pil", return_dict: bool = True):
        images = model_outputs["images"][0]  # [num_images_per_prompt, channels, h, w] of one prompt
        if output_type != "latent":
            images = postprocess_images(images, output_type)
        if not return_dict:
            return (images,)
        results = [{"image": image} for image in images]
        return results[0] if len(results) == 1 else results

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs):
        """Saves the model and its processor (tokenizer and image processor included) to `save_directory`, which
        `pipeline("text-to-image", model=save_directory)` loads again."""
        if os.path.isfile(save_directory):
            raise ValueError(f"save_directory ({save_directory}) must be a directory, not a file.")
        os.makedirs(save_directory, exist_ok=True)
        self.model.save_pretrained(save_directory, **kwargs)
        self.processor.save_pretrained(save_directory, **kwargs)


def _call_with_pipeline(callback, pipeline, model, step_index, timestep, callback_kwargs):
    return callback(pipeline, step_index, timestep, callback_kwargs)


# What other text-to-image pipelines take and this one does not, with what to use instead.
INSTEAD = {
    "negative_prompt": "not implemented: guidance here is against the image slots blind to the prompt (the model's "
    "condition dropout), not against an empty prompt that a negative one could take the place of; a negative prompt "
    "would need a prefix and KV cache of its own per row, which the denoising loop does not have",
    "prompt_embeds": "pass the prompt as text: the model embeds it with its own backbone",
    "eta": "pass a configured diffusers scheduler instance as scheduler=",
    "timesteps": "pass num_inference_steps, or a configured diffusers scheduler instance as scheduler=",
    "sigmas": "pass num_inference_steps, or a configured diffusers scheduler instance as scheduler=",
    "guidance_rescale": "not implemented; guidance_scale and generate_kwargs={'image_guidance_interval': ...} are",
    "cross_attention_kwargs": "Transfusion has no cross-attention: prompt and image share one sequence",
    "callback": "use callback_on_step_end (diffusers' current name)",
    "callback_steps": "use callback_on_step_end, which is called after every step",
}
INSTEAD["negative_prompt_embeds"] = INSTEAD["negative_prompt"]
INSTEAD["strength"] = (
    "an edit regenerates the whole image from the source's clean latents in the context, not from a noised copy of it; "
    "image_guidance_scale sets how closely it follows the source"
)


def _unknown_arguments_message(unknown: dict) -> str:
    names = sorted(unknown)
    reasons = [f"{name}: {INSTEAD[name]}" for name in names if name in INSTEAD]
    return (
        f"The text-to-image pipeline does not take {', '.join(names)}. "
        + "".join(f"{reason}. " for reason in reasons)
        + "It takes image, guidance_scale, image_guidance_scale, num_inference_steps, height, width, "
        "num_images_per_prompt, scheduler, seed, "
        "generator, latents, callback_on_step_end, callback_on_step_end_tensor_inputs, output_type, return_dict, "
        "progress_bar and batch_size; other arguments of model.generate go in generate_kwargs={...}."
    )


# The `custom_pipelines` entry `export-hub` writes into a folder's `config.json`, next to a copy of this file:
# `pipeline("text-to-image", model=folder, trust_remote_code=True)` then loads this class from the folder. (A plain
# `save_pretrained` leaves it out: with it, transformers asks for `trust_remote_code` even where the task is
# registered by `import modeling_transfusion`.)
CUSTOM_PIPELINES = {
    TEXT_TO_IMAGE_TASK: {
        "impl": f"{__name__.rsplit('.', 1)[-1]}.{TransfusionTextToImagePipeline.__name__}",
        "pt": ["AutoModelForMultimodalLM"],
        "type": "multimodal",
    }
}


def _left_align(input_ids: torch.LongTensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Moves each row's padding to the left, keeping the order of its tokens."""
    order = attention_mask.long().argsort(dim=-1, stable=True)  # padding (0) first, then the tokens in order
    return input_ids.gather(-1, order), attention_mask.gather(-1, order)


__all__ = ["TransfusionTextToImagePipeline", "TEXT_TO_IMAGE_TASK", "CUSTOM_PIPELINES"]
