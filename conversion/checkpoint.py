"""Reading and writing Transfusion checkpoint folders for the converters: output folders are never overwritten
silently, and a checkpoint is always saved whole (model, generation config, processor with its tokenizer)."""

import contextlib
import json
import os
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from transformers import AutoProcessor, GenerationConfig
from transformers.utils import logging

from ..modeling_transfusion import TransfusionForConditionalGeneration


def prepare_output_dir(output_dir: str | os.PathLike, overwrite: bool = False, sources: tuple = ()) -> Path:
    """
    Makes sure `output_dir` may be written: it is created if missing; an existing non-empty folder is refused unless
    `overwrite`, in which case the files the conversion writes replace those of the same name (`save_pretrained` also
    removes stale weight shards); nothing else in the folder is deleted. A folder that is one of the `sources` of the
    conversion is always refused.

    Raises:
        `FileExistsError`: `output_dir` is a file, or a non-empty folder and `overwrite` is False.
        `ValueError`: `output_dir` is a source of the conversion.
    """
    path = Path(output_dir)
    for source in sources:
        if source is not None and Path(source).exists() and path.exists() and path.resolve() == Path(source).resolve():
            raise ValueError(f"The output folder {path} is also an input of the conversion: choose another folder.")
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"The output path {path} is a file, not a folder.")
    if path.is_dir() and any(path.iterdir()):
        if not overwrite:
            raise FileExistsError(
                f"The output folder {path} is not empty: refusing to overwrite it. Pass overwrite=True (--overwrite on "
                "the command line) to write over its files, or choose an empty folder."
            )
    path.mkdir(parents=True, exist_ok=True)
    return path


def load_checkpoint(checkpoint_dir: str | os.PathLike, **model_kwargs):
    """Loads a Transfusion checkpoint folder: returns `(model, processor)`."""
    path = Path(checkpoint_dir)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a checkpoint folder: it has no config.json.")
    model = TransfusionForConditionalGeneration.from_pretrained(path, **model_kwargs)
    processor = AutoProcessor.from_pretrained(path)
    return model, processor


def save_checkpoint(model, processor, output_dir: str | os.PathLike, generation_config: GenerationConfig | None = None):
    """Saves `model` (safetensors, config, generation config) and `processor` (with its tokenizer) to `output_dir`."""
    if generation_config is not None:
        model.generation_config = generation_config
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)


def load_vae(path: str | os.PathLike) -> AutoencoderKL:
    """A diffusers `AutoencoderKL` in float32, from its own folder or from a Transfusion checkpoint folder that holds
    one (its frozen `vae`, e.g. the bundled MNIST checkpoint's)."""
    path = Path(path)
    config_file = path / "config.json"
    is_transfusion = config_file.is_file() and json.loads(config_file.read_text()).get("model_type") == "transfusion"
    if not is_transfusion:
        return AutoencoderKL.from_pretrained(path, torch_dtype=torch.float32)
    vae = TransfusionForConditionalGeneration.from_pretrained(path, dtype=torch.float32).vae
    if vae is None:
        raise ValueError(f"The Transfusion checkpoint {path} has no VAE (it works on pixels): give a VAE folder.")
    return vae


def vae_config_dict(vae) -> dict:
    """The config of a diffusers `AutoencoderKL` as plain JSON values, for `TransfusionConfig.vae_config` (without
    diffusers' private entries such as `_name_or_path`, which is a path object)."""
    return {name: value for name, value in vae.config.items() if not name.startswith("_")}


@contextlib.contextmanager
def quiet_loading():
    """Silences transformers' warnings (its load report, the embedding-resizing notice) while a converter loads and
    reshapes weights: the converter's own [`ConversionReport`] says what happened, precisely."""
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)


__all__ = ["prepare_output_dir", "load_checkpoint", "save_checkpoint", "quiet_loading", "load_vae", "vae_config_dict"]
