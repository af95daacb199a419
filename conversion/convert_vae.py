"""Swapping a pretrained VAE into a Transfusion checkpoint (or attaching one to a checkpoint that works on pixels).

The backbone, LM head and tokenizer are kept. The image layers are kept where their shapes still fit the new latent
(channels, patch size) and re-initialised where they do not; the VAE is replaced. The processor is rebuilt for the new
geometry (image size, channels, slots per image).
"""

import os
from pathlib import Path

import torch

from ..configuration_transfusion import TransfusionConfig
from ..modeling_transfusion import TransfusionForConditionalGeneration
from ..processing import TransfusionProcessor
from .checkpoint import load_checkpoint, load_vae, prepare_output_dir, save_checkpoint, vae_config_dict
from .report import ConversionReport

VAE_PREFIX = "model.vae."


def convert_from_vae(
    checkpoint_dir: str | os.PathLike,
    vae_path: str | os.PathLike | None,
    output_dir: str | os.PathLike,
    image_size: int | None = None,
    patch_size: int | None = None,
    overwrite: bool = False,
) -> ConversionReport:
    """
    Puts the diffusers `AutoencoderKL` saved in `vae_path` into the Transfusion checkpoint `checkpoint_dir` (replacing
    its VAE, or attaching one to a checkpoint without), and saves the result to `output_dir`. With `vae_path=None`,
    the VAE is removed and the model works on pixels (the identity autoencoder).

    The VAE may have any latent channel count (4 for Stable Diffusion 1/2, 16 for SD3 / FLUX, ...). Parameters whose
    shape depends on the latent (the patch encoder's input, the patch decoder's output) are re-initialised when the
    shape changes; everything else is kept. The returned report lists both.

    Args:
        checkpoint_dir (`str` or `os.PathLike`): a Transfusion checkpoint (model and processor).
        vae_path (`str` or `os.PathLike`, *optional*): folder of a diffusers `AutoencoderKL`, or of a Transfusion
            checkpoint whose VAE to take.
        output_dir (`str` or `os.PathLike`): where to save the result; must be empty unless `overwrite`.
        image_size (`int`, *optional*): new image side in pixels; by default the checkpoint's, which must then be
            divisible by the new VAE's downsampling factor times `patch_size`.
        patch_size (`int`, *optional*): new patch size; by default the checkpoint's.
        overwrite (`bool`, *optional*, defaults to `False`): allow writing into a non-empty `output_dir`.

    Returns:
        [`ConversionReport`]: what was kept, re-initialised and replaced, and how the image geometry changed.
    """
    checkpoint_dir = Path(checkpoint_dir)
    output_dir = prepare_output_dir(output_dir, overwrite, sources=(checkpoint_dir, vae_path))
    report = ConversionReport(
        title=f"from-vae: {checkpoint_dir} + {vae_path or 'no VAE (pixels)'} -> {output_dir}",
        output_dir=str(output_dir),
    )
    old_model, old_processor = load_checkpoint(checkpoint_dir)
    old_config = old_model.config

    vae = load_vae(vae_path) if vae_path is not None else None
    num_channels = vae.config.in_channels if vae is not None else old_config.num_channels
    changes = {
        "vae_config": vae_config_dict(vae) if vae is not None else None,
        "num_channels": num_channels,
        "latent_channels": vae.config.latent_channels if vae is not None else num_channels,
        "image_size": old_config.image_size if image_size is None else image_size,
        "patch_size": old_config.patch_size if patch_size is None else patch_size,
    }
    # The largest image keeps its ratio to the default one (a model of one size stays one size).
    changes["max_image_size"] = old_config.max_image_size * changes["image_size"] // old_config.image_size
    fields = old_config.to_diff_dict()
    for name in ("auto_map", "custom_pipelines"):  # remote code of an exported folder is not carried over
        fields.pop(name, None)
    try:
        config = TransfusionConfig.from_dict({**fields, **changes})
    except ValueError as error:
        raise ValueError(
            f"The new VAE does not fit the checkpoint's image geometry: {error} Pass image_size= or patch_size= "
            "(--image-size / --patch-size) to choose a geometry that fits."
        ) from error

    old_state = old_model.state_dict()
    expected = _expected_shapes(config)
    keep = {}
    for name, shape in expected.items():
        if name.startswith(VAE_PREFIX):
            continue
        old = old_state.get(name)
        if old is not None and tuple(old.shape) == shape:
            keep[name] = old
            report.kept.append(name)
        elif old is None:
            report.initialised.append(f"{name} {shape} (new)")
        else:
            report.initialised.append(f"{name} {tuple(old.shape)} -> {shape} (shape changed)")
    model = TransfusionForConditionalGeneration(config).to(old_model.dtype)
    model.load_state_dict(keep, strict=False)  # the VAE and re-initialised layers: the report says what happened
    if vae is not None:
        model.vae.load_state_dict(vae.state_dict())
    model.generation_config = old_model.generation_config
    report.replaced = sorted(name for name in expected if name.startswith(VAE_PREFIX))
    report.dropped = sorted(name for name in old_state if name.startswith(VAE_PREFIX))

    report.notes.append(_describe_geometry("before", old_config))
    report.notes.append(_describe_geometry("after", config))
    if config.num_image_tokens != old_config.num_image_tokens:
        report.notes.append(
            f"an image now takes {config.num_image_tokens} slots instead of {old_config.num_image_tokens}: the "
            "processor is rebuilt for it; fine-tune before use"
        )
    elif report.initialised or vae is not None:
        report.notes.append("the image layers see a new latent space: fine-tune before use")

    processor = TransfusionProcessor.from_model_config(
        config, old_processor.tokenizer, chat_template=old_processor.chat_template
    )
    save_checkpoint(model, processor, output_dir)
    return report


def _expected_shapes(config: TransfusionConfig) -> dict[str, tuple[int, ...]]:
    """The parameter shapes of a model with `config`, computed on the meta device (no memory, no initialisation)."""
    with torch.device("meta"):
        model = TransfusionForConditionalGeneration(config)
    return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}


def _describe_geometry(when: str, config: TransfusionConfig) -> str:
    autoencoder = "no VAE (pixels)" if config.vae_config is None else f"VAE x{config.vae_downsample_factor}"
    return (
        f"{when}: {autoencoder}, {config.image_size}x{config.image_size} px, {config.num_channels} channel(s) -> "
        f"latent {config.latent_channels}x{config.latent_size}x{config.latent_size}, patch {config.patch_size}, "
        f"{config.num_image_tokens} slots per image"
    )


__all__ = ["convert_from_vae"]
