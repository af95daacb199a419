"""Training collator for Transfusion: records of text and images in, a padded batch with labels out."""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers.feature_extraction_utils import BatchFeature

from .processing_transfusion import TransfusionProcessor, holds_image_data

# The columns image-text datasets use, in the order they are looked for when the collator is not told.
TEXT_COLUMNS = ("text", "caption")
IMAGES_COLUMNS = ("images", "image")
# The paper's ordering of image-caption pairs (arXiv 2408.11039, section 4.3.4): caption first 80% of the time.
CAPTION_FIRST = 0.8


@dataclass
class TransfusionDataCollator:
    r"""
    Collates records such as `{"text": "a handwritten seven <image>", "images": [image]}`, or the rows of an
    image-text dataset as they come (`{"image": image, "caption": "a red apple"}`), into a batch for
    `TransfusionForConditionalGeneration` (and `Trainer`, with `remove_unused_columns=False`): `input_ids`,
    `attention_mask`, `pixel_values` (when the batch holds images), `image_sizes` (with them, when the processor has
    an `image_size_divisor`, as `from_model_config` gives it) and `labels`. Images of different sizes are padded into
    one `pixel_values` (see [`TransfusionProcessor`]).

    `labels` is a copy of `input_ids` with -100 on padding and on image slots. The model itself also takes no text loss
    on the `<eoi>` after an image's last slot, and draws the diffusion loss from the images.

    Where the images go: a record's text may place them with `<image>` markers (`"caption <image>"` teaches
    generation, text then image; `"<image> caption"` captioning). A record with text and images but no marker, as in
    caption datasets, is laid out caption first (`"caption <image>"`) with probability `caption_first` and image
    first (`"<image>caption"`) otherwise, drawn per record from torch's random generator (which `Trainer` seeds). A
    record with images and no text becomes an image-only row; a record without images is text only.

    A record holding image data (PIL images, arrays of two or more dimensions, datasets' undecoded `{"bytes", "path"}`
    images, or lists of them) in a column the collator does not read is an error naming that column: the collator
    never trains on the text alone by accident.

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
        text_column (`str`, *optional*):
            The records' key for text. Defaults to `"text"`, else `"caption"`, whichever a record has.
        images_column (`str`, *optional*):
            The records' key for an image or a list of images. Defaults to `"images"`, else `"image"`.
        caption_first (`float`, *optional*, defaults to 0.8):
            For records with text and images but no `<image>` marker: the probability of caption then image (image
            generation); image then caption (captioning) otherwise. 0.8 is the paper's ordering of image-caption
            pairs: mostly generation, and enough captioning for the model to describe images too. 1 trains generation
            only, 0 captioning only.
        return_tensors (`str`, *optional*, defaults to `"pt"`): `"pt"` or `"np"`.
    """

    processor: TransfusionProcessor
    max_length: int | None = None
    padding_side: str = "right"
    pad_to_multiple_of: int | None = None
    add_eos_token: bool = True
    text_column: str | None = None
    images_column: str | None = None
    caption_first: float = CAPTION_FIRST
    return_tensors: str = "pt"

    def __post_init__(self):
        if self.max_length is not None and self.max_length < 1:
            raise ValueError(f"max_length must be a positive integer, got {self.max_length}.")
        if self.padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {self.padding_side!r}.")
        if not 0.0 <= self.caption_first <= 1.0:
            raise ValueError(f"caption_first must be a probability in [0, 1], got {self.caption_first}.")
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
            text, row = self._text_and_images(index, record)
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

    def _text_and_images(self, index: int, record: Mapping[str, Any]) -> tuple[str, list]:
        """The text of record `index`, with a marker for each image, and its images."""
        text_column = self._column(index, record, self.text_column, TEXT_COLUMNS, "text")
        images_column = self._column(index, record, self.images_column, IMAGES_COLUMNS, "images")
        for key, value in record.items():
            if key != images_column and holds_image_data(value):
                raise ValueError(
                    f"Record {index} holds image data in the column {key!r}, which the collator does not read (it "
                    f"reads images from {images_column or ' or '.join(map(repr, IMAGES_COLUMNS))}): pass "
                    f"images_column={key!r}, or remove the column. Training would otherwise see the text alone."
                )
        text = record.get(text_column) if text_column else None
        if text is not None and not isinstance(text, str):
            raise ValueError(
                f"Record {index}'s {text_column!r} is a {type(text).__name__}, not a string: give each record one text "
                "(e.g. pick one of several captions in a Dataset.with_transform)."
            )
        row = record.get(images_column) if images_column else None
        row = [] if row is None else list(row) if isinstance(row, (list, tuple)) else [row]
        if not text and not row:
            raise ValueError(
                f"Record {index} has neither text ({self.text_column or ' or '.join(map(repr, TEXT_COLUMNS))}) nor "
                f"images ({self.images_column or ' or '.join(map(repr, IMAGES_COLUMNS))}); its columns are "
                f"{sorted(record)}. With Trainer, pass TrainingArguments(remove_unused_columns=False): it otherwise "
                "removes the columns the model's forward does not name, such as 'text' and 'image'."
            )
        markers = self.processor.image_token * len(row)
        if not text:
            return markers, row
        if row and self.processor.image_token not in text:
            caption_first = bool(torch.rand(()) < self.caption_first)
            return (f"{text} {markers}" if caption_first else markers + text), row
        return text, row

    @staticmethod
    def _column(index: int, record: Mapping[str, Any], given: str | None, names: tuple[str, ...], kind: str):
        """The key of `record` that holds its `kind`: `given`, else the one of `names` it has (None if none)."""
        if given is not None:
            return given
        found = [name for name in names if name in record]
        if len(found) > 1:
            raise ValueError(
                f"Record {index} has both {found[0]!r} and {found[1]!r} columns: pass {kind}_column= to say which "
                f"holds the {kind}."
            )
        return found[0] if found else None


def _as_lists(rows) -> list[list[int]]:
    return rows.tolist() if hasattr(rows, "tolist") else rows


__all__ = ["TransfusionDataCollator"]
