"""Transfusion (arXiv 2408.11039) for Hugging Face transformers.

Importing this package registers the Transfusion classes with transformers' Auto classes.
"""

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoModelForMultimodalLM,
    AutoProcessor,
)

from .configuration_transfusion import TransfusionConfig
from .modeling_transfusion import (
    TransfusionForConditionalGeneration,
    TransfusionModel,
    TransfusionPreTrainedModel,
    patchify,
    unpatchify,
)
from .processing import TransfusionDataCollator, TransfusionImageProcessor, TransfusionProcessor, add_image_tokens

AutoConfig.register(TransfusionConfig.model_type, TransfusionConfig, exist_ok=True)
# AutoModel gives the full model (it generates), as users of this package load it with AutoModel.from_pretrained.
for auto_class in (AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText, AutoModelForMultimodalLM):
    auto_class.register(TransfusionConfig, TransfusionForConditionalGeneration, exist_ok=True)
AutoImageProcessor.register(
    TransfusionConfig, image_processor_classes={"pil": TransfusionImageProcessor}, exist_ok=True
)
AutoProcessor.register(TransfusionConfig, TransfusionProcessor, exist_ok=True)

__all__ = [
    "TransfusionConfig",
    "TransfusionPreTrainedModel",
    "TransfusionModel",
    "TransfusionForConditionalGeneration",
    "patchify",
    "unpatchify",
    "TransfusionImageProcessor",
    "TransfusionProcessor",
    "TransfusionDataCollator",
    "add_image_tokens",
]
