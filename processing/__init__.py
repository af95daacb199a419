"""Processing for Transfusion: the image processor, the processor, the training collator and a tokenizer trainer."""

from .data_collator_transfusion import TransfusionDataCollator
from .image_processing_transfusion import TransfusionImageProcessor
from .processing_transfusion import PLAIN_CHAT_TEMPLATE, TransfusionProcessor, add_image_tokens
from .tokenization_transfusion import train_caption_tokenizer

__all__ = [
    "TransfusionImageProcessor",
    "TransfusionProcessor",
    "TransfusionDataCollator",
    "add_image_tokens",
    "train_caption_tokenizer",
    "PLAIN_CHAT_TEMPLATE",
]
