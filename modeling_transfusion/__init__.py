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
from transformers.pipelines import PIPELINE_REGISTRY

from .configuration_transfusion import TransfusionConfig
from .generation_transfusion import TransfusionGenerateBeamOutput, TransfusionGenerateOutput
from .modeling_transfusion import (
    TransfusionForConditionalGeneration,
    TransfusionModel,
    TransfusionPreTrainedModel,
    patchify,
    unpatchify,
)
from .pipeline_transfusion import TEXT_TO_IMAGE_TASK, TransfusionTextToImagePipeline
from .processing import (
    PLAIN_CHAT_TEMPLATE,
    TransfusionDataCollator,
    TransfusionImageProcessor,
    TransfusionProcessor,
    add_image_tokens,
    train_caption_tokenizer,
)
from .trainer_transfusion import TransfusionTrainer

AutoConfig.register(TransfusionConfig.model_type, TransfusionConfig, exist_ok=True)
# AutoModel gives the full model (it generates), as users of this package load it with AutoModel.from_pretrained.
for auto_class in (AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText, AutoModelForMultimodalLM):
    auto_class.register(TransfusionConfig, TransfusionForConditionalGeneration, exist_ok=True)
AutoImageProcessor.register(
    TransfusionConfig, image_processor_classes={"pil": TransfusionImageProcessor}, exist_ok=True
)
AutoProcessor.register(TransfusionConfig, TransfusionProcessor, exist_ok=True)
# transformers has no text-to-image task: register ours, so that pipeline("text-to-image", model=dir) works.
if PIPELINE_REGISTRY.supported_tasks.get(TEXT_TO_IMAGE_TASK, {}).get("impl") is not TransfusionTextToImagePipeline:
    PIPELINE_REGISTRY.register_pipeline(
        TEXT_TO_IMAGE_TASK,
        pipeline_class=TransfusionTextToImagePipeline,
        pt_model=AutoModelForMultimodalLM,
        type="multimodal",
    )

__all__ = [
    "TransfusionConfig",
    "TransfusionPreTrainedModel",
    "TransfusionModel",
    "TransfusionForConditionalGeneration",
    "TransfusionGenerateOutput",
    "TransfusionGenerateBeamOutput",
    "patchify",
    "unpatchify",
    "TransfusionImageProcessor",
    "TransfusionProcessor",
    "TransfusionDataCollator",
    "add_image_tokens",
    "train_caption_tokenizer",
    "PLAIN_CHAT_TEMPLATE",
    "TransfusionTextToImagePipeline",
    "TransfusionTrainer",
]
