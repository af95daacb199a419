"""Training collator for Transfusion: records of text and images in, a padded batch with labels out."""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from transformers.feature_extraction_utils import BatchFeature

from .processing_transfusion import TransfusionProcessor


@dataclass
class TransfusionDataCollator:
    r"""
    Collates records such as `{"text": "a handwritten seven <image>", "images": [image]}` into a batch for
    `TransfusionForConditionalGeneration` (and `Trainer`, with `remove_unused_columns=False`): `input_ids`,
    `attention_mask`, `pixel_values` (when the batch holds images), `image_sizes` (with them, when the processor has
    an `image_size_divisor`, as `from_model_config` gives it) and `labels`. Images of different sizes are padded into
    one `pixel_values` (see [`TransfusionProcessor`]).

    `labels` is a copy of `input_ids` with -100 on padding and on image slots. The model itself also takes no text loss
    on the `<eoi>` after an image's last slot, and draws the diffusion loss from the images.

    A record's text places its images with `<image>` markers: `"caption <image>"` teaches generation (text then image),
    `"<image> caption"` teaches captioning. A record without text but with images becomes an image-only row; a record
    without images is text only.

    Args:
        processor ([`TransfusionProcessor`]): tokenizes, expands markers and preprocesses images.
        max_length (`int`, *optional*):
            Truncate rows to this many tokens (on the tokenizer's `truncation_side`); an image that does not fit is
            dropped whole. Without it, a row longer than the processor's `context_length` raises a `ValueError`.
        padding_side (`str`, *optional*, defaults to `"right"`): where padding goes.
        pad_to_multiple_of (`int`, *optional*): pad the length to a multiple of this.
        add_eos_token (`bool`, *optional*, defaults to `True`):
            End each record with the tokenizer's EOS token (unless the tokenizer adds one itself), so the model learns
            to stop.
        text_column (`str`, *optional*, defaults to `"text"`): the records' key for text.
        images_column (`str`, *optional*, defaults to `"images"`): the records' key for an image or a list of images.
        return_tensors (`str`, *optional*, defaults to `"pt"`): `"pt"` or `"np"`.
    """

    processor: TransfusionProcessor
    max_length: int | None = None
    padding_side: str = "right"
    pad_to_multiple_of: int | None = None
    add_eos_token: bool = True
    text_column: str = "text"
    images_column: str = "images"
    return_tensors: str = "pt"

    def __post_init__(self):
        if self.max_length is not None and self.max_length < 1:
            raise ValueError(f"max_length must be a positive integer, got {self.max_length}.")
        if self.padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {self.padding_side!r}.")
        tokenizer = self.processor.tokenizer
        self._eos_suffix = ""
        if self.add_eos_token and tokenizer.eos_token is not None:
            ids = tokenizer("a")["input_ids"]
            if not ids or ids[-1] != tokenizer.eos_token_id:  # the tokenizer does not already end rows with EOS
                self._eos_suffix = tokenizer.eos_token

    def __call__(self, records: Sequence[Mapping[str, Any]]) -> BatchFeature:
        """Collates `records` (a list of dicts) into one batch."""
        if not records:
            raise ValueError("Got an empty batch: pass at least one record.")
        texts, images = [], []
        for index, record in enumerate(records):
            text = record.get(self.text_column) or ""
            row = record.get(self.images_column)
            row = [] if row is None else list(row) if isinstance(row, (list, tuple)) else [row]
            if not text and not row:
                raise ValueError(
                    f"Record {index} has neither text ({self.text_column!r}) nor images ({self.images_column!r})."
                )
            if not text:
                text = self.processor.image_token * len(row)
            texts.append(text + self._eos_suffix)
            images.append(row)

        batch = self.processor(
            text=texts,
            images=images,
            padding=True,
            padding_side=self.padding_side,
            pad_to_multiple_of=self.pad_to_multiple_of,
            max_length=self.max_length,
            truncation=self.max_length is not None,
            return_tensors=self.return_tensors,  # the processor pads images of different sizes into one tensor
        )
        image_token_id = self.processor.image_token_id
        batch["labels"] = [
            [token if attended and token != image_token_id else -100 for token, attended in zip(ids, mask)]
            for ids, mask in zip(_as_lists(batch["input_ids"]), _as_lists(batch["attention_mask"]))
        ]
        return BatchFeature(data=dict(batch), tensor_type=self.return_tensors)


def _as_lists(rows) -> list[list[int]]:
    return rows.tolist() if hasattr(rows, "tolist") else rows


__all__ = ["TransfusionDataCollator"]
