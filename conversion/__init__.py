"""Checkpoint conversion for Transfusion, as functions and as the `transfusion-convert` command line (also
`python -m modeling_transfusion.conversion`): a checkpoint from a pretrained causal LM (`convert_from_llm`), a
pretrained VAE swapped in (`convert_from_vae`), and a self-contained remote-code folder for the Hub
(`export_to_hub`)."""

from .convert_llm import convert_from_llm
from .convert_vae import convert_from_vae
from .export_hub import export_to_hub
from .report import ConversionReport

__all__ = ["convert_from_llm", "convert_from_vae", "export_to_hub", "ConversionReport"]
