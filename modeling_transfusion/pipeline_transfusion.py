"""The `text-to-image` pipeline for Transfusion: prompts in, one generated PIL image per prompt out.

After `import modeling_transfusion`, `pipeline("text-to-image", model=checkpoint_dir)` builds this pipeline with the
checkpoint's model and processor. The same checkpoint also serves transformers' built-in `image-text-to-text`
(captioning) and `text-generation` pipelines.

The model and processor reach this file through the Auto classes; it imports only the argument checks of
`generation_transfusion` (a flat relative import), so the hub export can copy it next to the weights as remote code.
"""

import os
from typing import Any

import torch
from transformers import Pipeline

from .generation_transfusion import _finite_float, _integer

TEXT_TO_IMAGE_TASK = "text-to-image"


class TransfusionTextToImagePipeline(Pipeline):
    r"""
    Text-to-image generation with a Transfusion model: each prompt opens one image right after its text
    (`generate(..., generation_mode="image")`), which is denoised against the prompt's KV cache.

    Load it with `pipeline("text-to-image", model=checkpoint_dir)` after `import modeling_transfusion`, or build it from
    objects: `pipeline("text-to-image", model=model, processor=processor)`.

    Call arguments (all optional, each can also be given when the pipeline is built):
        guidance_scale (`float`, defaults to the model's `image_guidance_scale`, else 1.0):
            Classifier-free guidance for the image: `uncond + scale * (cond - uncond)`; 1 means no guidance. It is
            passed to `generate` as `image_guidance_scale`.
        num_inference_steps (`int`, defaults to the generation config's, else 50): denoising steps.
        height (`int`), width (`int`): the size of the images in pixels (defaults: the model's `image_size`): multiples
            of `config.image_size_divisor`, at most `config.max_image_size`; one size for all the prompts of a call,
            as in diffusers (`model.generate` takes one per row). For a model that writes sizes (its
            processor has `write_image_size`), the prompt ends with the size text, as in training.
        scheduler (`str` or diffusers `SchedulerMixin`): the sampler, as in `generate` (`"ddim"`, `"ddpm"`,
            `"dpmsolver++"`, `"flow_euler"` or an instance).
        seed (`int`): every prompt is generated as it would be alone with `torch.Generator().manual_seed(seed)`, so
            the image of a prompt does not depend on the other prompts of the call or on `batch_size`.
        generator (`torch.Generator`): the source of the noise, used as it is (shared by the prompts of the call, in
            order). Pass either `seed` or `generator`.
        output_type (`str`, defaults to `"pil"`): `"pil"` for a PIL image, `"np"` for a uint8 array
            `(height, width, channels)`.
        progress_bar (`bool`): a progress bar over the denoising steps (the model's default otherwise).
        generate_kwargs (`dict`): further arguments of `model.generate`.

    Returns:
        For one prompt, `{"image": PIL.Image.Image}`; for a list of prompts, one such dict per prompt.

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
        num_inference_steps: int | None = None,
        height: int | None = None,
        width: int | None = None,
        scheduler=None,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        output_type: str | None = None,
        progress_bar: bool | None = None,
        generate_kwargs: dict | None = None,
    ):
        if seed is not None and generator is not None:
            raise ValueError("Pass either seed or generator, not both.")
        if output_type is not None and output_type not in ("pil", "np"):
            raise ValueError(f"output_type must be 'pil' or 'np', got {output_type!r}.")
        # Checked here so that an error names the pipeline's arguments (generate knows `image_guidance_scale`).
        if guidance_scale is not None:
            guidance_scale = _finite_float(guidance_scale, "guidance_scale", 0.0)
        if num_inference_steps is not None:
            num_inference_steps = _integer(num_inference_steps, "num_inference_steps", 1)
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
        forward_params = {}
        image_kwargs = {
            "image_guidance_scale": guidance_scale,
            "num_inference_steps": num_inference_steps,
            "scheduler": scheduler,
            "generator": generator,
            "progress_bar": progress_bar,
        }
        forward_params.update({name: value for name, value in image_kwargs.items() if value is not None})
        if seed is not None:
            forward_params["seed"] = seed
        if generate_kwargs is not None:
            forward_params["generate_kwargs"] = generate_kwargs
        postprocess_params = {} if output_type is None else {"output_type": output_type}
        return preprocess_params, forward_params, postprocess_params

    def __call__(self, prompts: str | list[str], **kwargs) -> dict[str, Any] | list[dict[str, Any]]:
        """
        Generates one image per prompt.

        Args:
            prompts (`str` or `list[str]`): the text each image is generated from.
            kwargs: the call arguments documented on the class (`guidance_scale`, `num_inference_steps`, `height`,
                `width`, `seed`, `generator`, `scheduler`, `output_type`, `progress_bar`, `generate_kwargs`), and
                `batch_size`.

        Returns:
            `{"image": image}` for a string, a list of them for a list of strings.
        """
        if isinstance(prompts, (str, list, tuple)):
            prompt_list = [prompts] if isinstance(prompts, str) else prompts
            if not prompt_list:
                raise ValueError("Got no prompts: pass a string or a non-empty list of strings.")
            for index, prompt in enumerate(prompt_list):
                if not isinstance(prompt, str):
                    raise ValueError("prompts must be a string or a list of strings.")
                if not prompt.strip():
                    raise ValueError(
                        f"Prompt {index} is empty: describe the image to generate, e.g. 'a handwritten seven'."
                    )
        if isinstance(prompts, tuple):
            prompts = list(prompts)
        return super().__call__(prompts, **kwargs)

    def preprocess(self, prompt: str, height: int | None = None, width: int | None = None) -> dict[str, Any]:
        if not isinstance(prompt, str):
            raise ValueError(f"A prompt must be a string, got {type(prompt).__name__}.")
        default = self.model.config.image_size
        height, width = height or default, width or default
        inputs = self.processor(text=[prompt + self.processor.render_image_size(height, width)], return_tensors="pt")
        size = torch.tensor([[height, width]])  # a tensor, so that batching collates it
        return {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"], "image_size": size}

    def _forward(self, model_inputs: dict[str, Any], seed: int | None = None, generate_kwargs=None, **image_kwargs):
        # Batches are padded on the tokenizer's side; generation needs the padding on the left.
        input_ids, attention_mask = _left_align(model_inputs["input_ids"], model_inputs["attention_mask"])
        batch_size = input_ids.shape[0]
        if seed is not None:
            image_kwargs["generator"] = [
                torch.Generator(device=input_ids.device).manual_seed(seed) for _ in range(batch_size)
            ]
        overrides = {"return_dict_in_generate": True}
        generate_kwargs = self._prepare_generate_kwargs(dict(generate_kwargs or {}), **overrides)
        if self.model.generation_config.pad_token_id is None and "pad_token_id" not in generate_kwargs:
            generate_kwargs["pad_token_id"] = self.processor.tokenizer.pad_token_id
        height, width = model_inputs["image_size"][0].tolist()  # one size per call
        outputs = self.model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            generation_mode="image",
            height=height,
            width=width,
            **image_kwargs,
            **generate_kwargs,
        )
        images = torch.stack([row[0] for row in outputs.images])  # [batch, channels, height, width] in [-1, 1]
        return {"images": images}

    def postprocess(self, model_outputs: dict[str, Any], output_type: str = "pil") -> dict[str, Any]:
        images = model_outputs["images"]  # [1, channels, height, width]
        return {"image": self.processor.postprocess_images(images, output_type=output_type)[0][0]}

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs):
        """Saves the model and its processor (tokenizer and image processor included) to `save_directory`, which
        `pipeline("text-to-image", model=save_directory)` loads again."""
        if os.path.isfile(save_directory):
            raise ValueError(f"save_directory ({save_directory}) must be a directory, not a file.")
        os.makedirs(save_directory, exist_ok=True)
        self.model.save_pretrained(save_directory, **kwargs)
        self.processor.save_pretrained(save_directory, **kwargs)


def _left_align(input_ids: torch.LongTensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Moves each row's padding to the left, keeping the order of its tokens."""
    order = attention_mask.long().argsort(dim=-1, stable=True)  # padding (0) first, then the tokens in order
    return input_ids.gather(-1, order), attention_mask.gather(-1, order)


__all__ = ["TransfusionTextToImagePipeline", "TEXT_TO_IMAGE_TASK"]
