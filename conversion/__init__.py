"""Checkpoint conversion for Transfusion, as functions and as the `transfusion-convert` command line (also
`python -m modeling_transfusion.conversion`): a checkpoint from a pretrained causal LM (`convert_from_llm`), a
pretrained VAE swapped in (`convert_from_vae`), a self-contained remote-code folder for the Hub (`export_to_hub`), and
the image path of a model with modality experts on its own, to apply on top of its LLM (`extract_image_path`,
`apply_image_path`)."""

from .convert_llm import convert_from_llm
from .convert_vae import convert_from_vae
from .export_hub import export_to_hub
from .image_path import apply_image_path, extract_image_path
from .report import ConversionReport

__all__ = [
    "convert_from_llm",
    "convert_from_vae",
    "export_to_hub",
    "extract_image_path",
    "apply_image_path",
    "ConversionReport",
]
