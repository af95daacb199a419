"""Processing for Transfusion: the image processor, the processor and the training collator."""

from .data_collator_transfusion import TransfusionDataCollator
from .image_processing_transfusion import TransfusionImageProcessor
from .processing_transfusion import TransfusionProcessor, add_image_tokens

__all__ = ["TransfusionImageProcessor", "TransfusionProcessor", "TransfusionDataCollator", "add_image_tokens"]
