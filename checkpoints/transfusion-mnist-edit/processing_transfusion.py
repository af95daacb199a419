"""Processor for Transfusion: text with `<image>` markers and images in, model inputs out, generated output back."""

import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import PIL.Image
import torch
from transformers import PreTrainedConfig, PreTrainedTokenizerBase
from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import ProcessingKwargs, ProcessorMixin, Unpack
from transformers.utils import logging

from .image_processing_transfusion import TransfusionImageProcessor
from .saving_transfusion import check_save_directory, save_atomically

logger = logging.get_logger(__name__)

# A plain chat template for models trained on chats: "User: <image> What digit is this?\nAssistant: seven</s>\n".
# Assistant turns end with EOS so a model learns to stop.
PLAIN_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- message['role'] | capitalize -}}:"
    "{%- if message['content'] is string -%}{{- ' ' + message['content'] -}}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{- ' ' + image_token -}}"
    "{%- elif item['type'] == 'text' -%}{{- ' ' + item['text'] -}}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}{{- eos_token | default('') -}}{%- endif -%}"
    "{{- '\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'Assistant:' -}}{%- endif -%}"
)


def _register_image_tokens(tokenizer: PreTrainedTokenizerBase, tokens: Sequence[str]) -> int:
    """Adds the missing ones of `tokens` to `tokenizer` as special tokens; returns how many were added."""
    missing = [token for token in tokens if not _is_single_token(tokenizer, token)]
    if not missing:
        return 0
    num_before = len(tokenizer)
    tokenizer.add_special_tokens({"extra_special_tokens": missing}, replace_extra_special_tokens=False)
    return len(tokenizer) - num_before


def _is_single_token(tokenizer: PreTrainedTokenizerBase, token: str) -> bool:
    """Whether the tokenizer keeps `token` whole: one id, never split by the pre-tokenizer."""
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or (token_id == tokenizer.unk_token_id and token != tokenizer.unk_token):
        return False
    return tokenizer.encode(token, add_special_tokens=False) == [token_id]


def add_image_tokens(
    tokenizer: PreTrainedTokenizerBase,
    model: torch.nn.Module | None = None,
    boi_token: str = "<boi>",
    image_token: str = "<image>",
    eoi_token: str = "<eoi>",
) -> dict[str, int]:
    """
    Makes `<boi>`, `<image>` and `<eoi>` special tokens of `tokenizer` (adding those it lacks), so that the
    pre-tokenizer never splits them and `skip_special_tokens` drops them.

    With a `model`, also grows its embeddings (and LM head) to `len(tokenizer)` where they are smaller, and writes the
    three ids into `model.config` (`boi_token_id`, `eoi_token_id`, `image_token_id`).

    Returns:
        `dict[str, int]`: `{"boi_token_id": ..., "eoi_token_id": ..., "image_token_id": ...}`.
    """
    _register_image_tokens(tokenizer, (boi_token, image_token, eoi_token))
    ids = {
        "boi_token_id": tokenizer.convert_tokens_to_ids(boi_token),
        "eoi_token_id": tokenizer.convert_tokens_to_ids(eoi_token),
        "image_token_id": tokenizer.convert_tokens_to_ids(image_token),
    }
    if model is not None:
        if model.get_input_embeddings().num_embeddings < len(tokenizer):
            model.resize_token_embeddings(len(tokenizer))
        for name, value in ids.items():
            setattr(model.config, name, value)
    return ids


class TransfusionProcessor(ProcessorMixin):
    r"""
    Prepares interleaved text and images for a Transfusion model, and turns its output back into text and images.

    Each `<image>` marker in the text stands for one image and expands to `<boi>` + N x `<image>` + `<eoi>`, N the
    number of patches of that image (`num_image_tokens` for a model of one image size; `(height / s) x (width / s)`
    with `s = image_size_divisor` for a model of any size), preceded by the size as text (`" 32x64"`) when
    `write_image_size` is on. The images become `pixel_values` `(num_images, num_channels, height, width)` in
    [-1, 1], flattened in reading order (row by row, left to right), as the model wants them; images of different
    sizes are padded (bottom and right) to the largest, and `image_sizes` gives each one's own height and width.

    Args:
        image_processor ([`TransfusionImageProcessor`]):
            Resizes, crops and normalises images to the model's `image_size` and `num_channels`.
        tokenizer ([`PreTrainedTokenizerBase`]):
            Any Hugging Face tokenizer. It must have a pad token for batches of unequal length.
        chat_template (`str`, *optional*):
            Jinja template for [`~ProcessorMixin.apply_chat_template`], for a model trained on chats: an instruct
            LLM's own (`transfusion-convert from-llm` keeps it), or `PLAIN_CHAT_TEMPLATE`, a "Role: content" template
            that renders `{"type": "image"}` content as the image marker. None by default: a processor claims chat
            only for a model that learned it (transformers' pipelines then ask for chat-formatted input).
        num_image_tokens (`int`):
            `<image>` slots of the default image: the model's `config.num_image_tokens`.
        image_size_divisor (`int`, *optional*):
            Pixels along the side of the square one slot covers (the model's `config.image_size_divisor`): an image
            of `height` x `width` takes `(height / s) x (width / s)` slots. Without it, every image takes
            `num_image_tokens` slots (a model of one image size).
        write_image_size (`bool`, *optional*, defaults to `False`):
            Write each image's size as text (`" {height}x{width}"`, see
            [`~TransfusionProcessor.render_image_size`]) right before its `<boi>`, so that a model trained on it
            writes the size of the image it is about to generate (read back by `generate(..., tokenizer=...)`).
        image_token (`str`, *optional*, defaults to `"<image>"`):
            The marker users write, and the slot token it expands to.
        boi_token (`str`, *optional*, defaults to `"<boi>"`):
            Opens an image.
        eoi_token (`str`, *optional*, defaults to `"<eoi>"`):
            Closes an image.
        context_length (`int`, *optional*):
            The model's context in tokens (`config.text_config.max_position_embeddings`). A row longer than this once
            its images are expanded raises a `ValueError`, unless the call passes `truncation=True`.
        add_image_tokens (`bool`, *optional*, defaults to `True`):
            Add the three tokens to the tokenizer where it lacks them (see [`add_image_tokens`], which also resizes a
            model). With `False`, a tokenizer lacking them is an error.

    Example:

    ```python
    >>> processor = TransfusionProcessor.from_model_config(config, tokenizer)  # doctest: +SKIP
    >>> batch = processor(text=["a handwritten seven <image>"], images=[image], return_tensors="pt")  # doctest: +SKIP
    >>> loss = model(**batch, labels=batch["input_ids"]).loss  # doctest: +SKIP
    ```
    """

    # Batches go straight into the model, which needs rectangular tensors.
    text_kwargs = {"padding": True}

    def __init__(
        self,
        image_processor: TransfusionImageProcessor | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        chat_template: str | None = None,
        num_image_tokens: int | None = None,
        image_token: str = "<image>",
        boi_token: str = "<boi>",
        eoi_token: str = "<eoi>",
        context_length: int | None = None,
        add_image_tokens: bool = True,
        image_size_divisor: int | None = None,
        write_image_size: bool = False,
    ):
        if image_processor is None or tokenizer is None:
            raise ValueError("TransfusionProcessor needs both an image_processor and a tokenizer.")
        if not isinstance(num_image_tokens, int) or num_image_tokens < 1:
            raise ValueError(
                f"num_image_tokens must be a positive integer (the model's config.num_image_tokens), got "
                f"{num_image_tokens!r}."
            )
        if context_length is not None and context_length < num_image_tokens + 2:
            raise ValueError(
                f"context_length ({context_length}) cannot hold even one image ({num_image_tokens + 2} tokens)."
            )
        tokens = (boi_token, image_token, eoi_token)
        if len(set(tokens)) != 3:
            raise ValueError(f"boi_token, image_token and eoi_token must be three different strings, got {tokens}.")
        if add_image_tokens:
            num_added = _register_image_tokens(tokenizer, tokens)
            if num_added:
                logger.warning(
                    f"Added {num_added} image token(s) to the tokenizer (now {len(tokenizer)} tokens). A model must "
                    "cover them: call add_image_tokens(tokenizer, model) to resize it and set its token ids."
                )
        missing = [token for token in tokens if not _is_single_token(tokenizer, token)]
        if missing:
            raise ValueError(
                f"The tokenizer lacks the image token(s) {missing} (each must be one special token). Build the "
                "processor with add_image_tokens=True, or call add_image_tokens(tokenizer, model) first."
            )
        if image_size_divisor is not None and (not isinstance(image_size_divisor, int) or image_size_divisor < 1):
            raise ValueError(f"image_size_divisor must be a positive integer, got {image_size_divisor!r}.")
        self.num_image_tokens = num_image_tokens
        self.image_size_divisor = image_size_divisor
        self.write_image_size = bool(write_image_size)
        self.image_token = image_token
        self.boi_token = boi_token
        self.eoi_token = eoi_token
        self.context_length = context_length
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        self.boi_token_id = tokenizer.convert_tokens_to_ids(boi_token)
        self.eoi_token_id = tokenizer.convert_tokens_to_ids(eoi_token)
        tokenizer.padding_side = "left"  # batched generation continues every row from its last token
        super().__init__(image_processor, tokenizer, chat_template=chat_template)

    @classmethod
    def from_model_config(
        cls, config: PreTrainedConfig, tokenizer: PreTrainedTokenizerBase, **kwargs
    ) -> "TransfusionProcessor":
        """
        Builds the processor a model with `config` needs: image size, channels, image slots and context from the
        config, and checks that the tokenizer's image token ids are the config's.

        Args:
            config ([`TransfusionConfig`]): the model's config.
            tokenizer ([`PreTrainedTokenizerBase`]): the tokenizer, with the image tokens (see [`add_image_tokens`]).
            kwargs: further arguments of [`TransfusionProcessor`] (`chat_template`, ...).
        """
        if config.max_image_size > config.image_size:  # any size: keep each image's own size (see the policies)
            image_processor = TransfusionImageProcessor(
                size={"longest_edge": config.max_image_size},
                size_divisor=config.image_size_divisor,
                do_center_crop=False,
                num_channels=config.num_channels,
            )
        else:
            image_processor = TransfusionImageProcessor(size=config.image_size, num_channels=config.num_channels)
        kwargs.setdefault("context_length", getattr(config.get_text_config(), "max_position_embeddings", None))
        processor = cls(
            image_processor,
            tokenizer,
            num_image_tokens=config.num_image_tokens,
            image_size_divisor=config.image_size_divisor,
            **kwargs,
        )
        for name in ("boi_token_id", "eoi_token_id", "image_token_id"):
            if getattr(processor, name) != getattr(config, name):
                raise ValueError(
                    f"The tokenizer gives {name}={getattr(processor, name)} but the model config says "
                    f"{getattr(config, name)}: call add_image_tokens(tokenizer, model) to align them."
                )
        vocab_size = config.get_text_config().vocab_size
        if len(tokenizer) > vocab_size:
            raise ValueError(
                f"The tokenizer has {len(tokenizer)} tokens but the model's vocabulary only {vocab_size}: call "
                "add_image_tokens(tokenizer, model) to resize the model."
            )
        return processor

    def save_pretrained(self, save_directory, *args, **kwargs):
        """As `ProcessorMixin.save_pretrained`, but, as the model's, never over another model, and in one step: a
        killed save leaves the old files whole, and the model's files in the folder are kept (see
        `saving_transfusion`)."""
        check_save_directory(save_directory)
        return save_atomically(save_directory, super().save_pretrained, *args, **kwargs)

    @property
    def image_sequence(self) -> str:
        """What one `<image>` marker of a default-size image expands to (see [`image_sequence_for`])."""
        return self.boi_token + self.image_token * self.num_image_tokens + self.eoi_token

    def num_image_slots(self, height: int, width: int) -> int:
        """The `<image>` slots of an image of `height` x `width` pixels."""
        if self.image_size_divisor is None:
            return self.num_image_tokens
        return (height // self.image_size_divisor) * (width // self.image_size_divisor)

    def render_image_size(self, height: int, width: int) -> str:
        """The size text written before an image's `<boi>`: `" {height}x{width}"` with `write_image_size`, else `""`.
        An image-mode prompt for a model that writes sizes ends with it: `prompt + render_image_size(32, 64)`."""
        return f" {height}x{width}" if self.write_image_size else ""

    def image_sequence_for(self, height: int, width: int) -> str:
        """What the marker of an image of `height` x `width` expands to: its size text (with `write_image_size`),
        `<boi>`, its slots and `<eoi>`."""
        slots = self.image_token * self.num_image_slots(height, width)
        return self.render_image_size(height, width) + self.boi_token + slots + self.eoi_token

    @property
    def model_input_names(self) -> list[str]:
        names = ["input_ids", "attention_mask", "pixel_values"]
        return names + ["image_sizes"] if self.image_size_divisor is not None else names

    def __call__(
        self,
        text: str | list[str] | None = None,
        images: Any = None,
        **kwargs: Unpack[ProcessingKwargs],
    ) -> BatchFeature:
        r"""
        Tokenizes `text` with each `<image>` marker expanded, and preprocesses `images`.

        Args:
            text (`str` or `list[str]`, *optional*):
                One prompt or a batch; each `<image>` marker takes the next image of its row.
            images (*optional*):
                PIL images, arrays or tensors. Either one list per row (`[[img_a, img_b], [], [img_c]]`), or a flat
                list matched to the markers in reading order. Without `text`, each image (or each inner list) makes an
                image-only row: `[bos] <boi> <image>... <eoi>`.
            caption, image (*optional*):
                The column names of image-text datasets, taken for `text` and `images`, so that `processor(**row)`
                reads a row as it comes (its text still needs a marker per image; `TransfusionDataCollator` places
                unmarked images itself). Any other keyword that holds image data is an error naming it: images are
                never dropped silently.
            padding (`bool` or `str`, *optional*, defaults to `True`):
                `True`/`"longest"`, `"max_length"` or `False`, as in tokenizers.
            padding_side (`str`, *optional*):
                `"left"` or `"right"`; defaults to `tokenizer.padding_side`, which the processor sets to `"left"`: a
                decoder-only model generates after the last token of every row (the training collator pads right).
            max_length (`int`, *optional*):
                Longest row allowed (and the length `padding="max_length"` pads to); defaults to `context_length`.
            truncation (`bool`, *optional*, defaults to `False`):
                Cut over-long rows on `tokenizer.truncation_side` instead of raising. A cut never falls inside an
                image: an image that does not fit is dropped whole (markers and pixels).
            return_tensors (`str`, *optional*):
                `"pt"`, `"np"` or `None` (lists).

        Returns:
            [`BatchFeature`]: `input_ids`, `attention_mask` and, where the batch holds images, `pixel_values`.

        Raises:
            `ValueError`: no input or an empty batch; markers and images disagree in number (per row, or in total for
            a flat list); an unsupported image; a row longer than `max_length`/`context_length` without truncation.
        """
        text, images = _dataset_columns(text, images, kwargs)
        texts, row_images = self._pair_text_and_images(text, images)
        merged = self._merge_kwargs(tokenizer_init_kwargs=self.tokenizer.init_kwargs, **kwargs)
        text_kwargs, images_kwargs = merged["text_kwargs"], merged["images_kwargs"]
        return_tensors = text_kwargs.get("return_tensors", images_kwargs.get("return_tensors"))

        flat_images = [image for row in row_images for image in row]
        pixel_values = []
        if flat_images:
            images_kwargs["return_tensors"] = None
            pixel_values = self.image_processor(flat_images, **images_kwargs)["pixel_values"]
        sizes = [tuple(image.shape[-2:]) for image in pixel_values]
        self._check_image_sizes(sizes)

        # Spaces before a marker are dropped: "a seven <image>" must end like the prompt "a seven" that opens an image
        # at generation time, not with a stray space token.
        marker = re.compile(rf"[ \t]*{re.escape(self.image_token)}")
        next_size = iter(sizes)
        expanded = [marker.sub(lambda _: self.image_sequence_for(*next(next_size)), sample) for sample in texts]
        input_ids = self.tokenizer(
            expanded, add_special_tokens=text_kwargs.get("add_special_tokens", True), padding=False, truncation=False
        )["input_ids"]
        self._check_image_slots(input_ids, row_images, sizes)

        max_length = text_kwargs.get("max_length") or self.context_length
        truncation = text_kwargs.get("truncation") not in (None, False, "do_not_truncate")
        kept_images = list(range(len(flat_images)))
        if max_length is not None:
            input_ids, kept_images = self._fit_to_length(input_ids, max_length, truncation, sizes)

        padding = text_kwargs.get("padding", False)
        if padding in (True, "longest") and len({len(ids) for ids in input_ids}) == 1:
            padding = False  # nothing to pad: a tokenizer without a pad token works too
        padded = self.tokenizer.pad(
            {"input_ids": input_ids},
            padding=padding,
            max_length=max_length if padding == "max_length" else None,
            pad_to_multiple_of=text_kwargs.get("pad_to_multiple_of"),
            padding_side=text_kwargs.get("padding_side") or self.tokenizer.padding_side,
            return_attention_mask=True,
        )
        data = {"input_ids": padded["input_ids"], "attention_mask": padded["attention_mask"]}
        if kept_images:
            kept = [pixel_values[index] for index in kept_images]
            if self.image_size_divisor is not None:
                data["image_sizes"] = [list(sizes[index]) for index in kept_images]
                if return_tensors is not None:
                    kept = _pad_images(kept)
            data["pixel_values"] = kept
        return BatchFeature(data=data, tensor_type=return_tensors)

    # Steps of __call__

    def _pair_text_and_images(self, text, images) -> tuple[list[str], list[list[Any]]]:
        """Normalises the inputs to one string and one list of images per row, checking that they agree."""
        if text is None and images is None:
            raise ValueError("Pass text, images or both.")
        if images is not None:
            images, nested = _as_image_list(images)
        if text is None:
            if not images:
                raise ValueError("Got an empty batch: images is an empty list.")
            rows = images if nested else [[image] for image in images]
            for index, row in enumerate(rows):
                if not row:
                    raise ValueError(f"Row {index} has neither text nor images.")
            return [self.image_token * len(row) for row in rows], rows

        texts = [text] if isinstance(text, str) else text
        if not isinstance(texts, (list, tuple)) or not all(isinstance(sample, str) for sample in texts):
            raise ValueError(f"text must be a string or a list of strings, got {type(text).__name__}.")
        if not texts:
            raise ValueError("Got an empty batch: text is an empty list.")
        texts = list(texts)
        markers = [sample.count(self.image_token) for sample in texts]
        if not images:
            if sum(markers):
                raise ValueError(
                    f"The text holds {sum(markers)} {self.image_token} marker(s) but no images were passed."
                )
            return texts, [[] for _ in texts]
        if nested:
            if len(images) != len(texts):
                raise ValueError(
                    f"Got {len(texts)} text row(s) but {len(images)} lists of images: pass one list per row, or one "
                    "flat list matched to the markers in order."
                )
            for index, (count, row) in enumerate(zip(markers, images)):
                if count != len(row):
                    raise ValueError(
                        f"Row {index} has {count} {self.image_token} marker(s) but {len(row)} image(s): each image "
                        f"needs one marker where it goes in the text."
                    )
            return texts, [list(row) for row in images]
        if sum(markers) != len(images):
            raise ValueError(
                f"The text holds {sum(markers)} {self.image_token} marker(s) in total but {len(images)} image(s) were "
                "passed: each image needs one marker where it goes in the text."
            )
        ends = np.cumsum(markers).tolist()
        return texts, [images[end - count : end] for count, end in zip(markers, ends)]

    def _check_image_sizes(self, sizes: list[tuple[int, int]]) -> None:
        """Images the slots cannot hold (sides not multiples of `image_size_divisor`) are refused, naming the image."""
        divisor = self.image_size_divisor
        if divisor is None:
            return
        for index, (height, width) in enumerate(sizes):
            if height % divisor or width % divisor:
                raise ValueError(
                    f"Image {index} is {height}x{width} pixels after preprocessing; heights and widths must be "
                    f"multiples of {divisor}. Keep the image processor's resizing on (do_resize=True)."
                )

    def _check_image_slots(
        self, input_ids: list[list[int]], row_images: list[list[Any]], sizes: list[tuple[int, int]]
    ) -> None:
        slot_counts = iter([self.num_image_slots(*size) for size in sizes])
        for index, (ids, row) in enumerate(zip(input_ids, row_images)):
            found, expected = ids.count(self.image_token_id), sum(next(slot_counts) for _ in row)
            if found != expected:
                raise ValueError(
                    f"Row {index} tokenized to {found} {self.image_token} slots, expected {expected} for its "
                    f"{len(row)} image(s): the tokenizer splits {self.image_token} (turn off "
                    "tokenizer.split_special_tokens)."
                )

    def _fit_to_length(
        self, input_ids: list[list[int]], max_length: int, truncation: bool, sizes: list[tuple[int, int]]
    ) -> tuple[list[list[int]], list[int]]:
        """Checks, or with `truncation` cuts, rows to `max_length` without cutting inside an image.

        An image's span includes its size text, so that a cut drops the text with the image. Returns the rows and the
        flat indices of the images that are left."""
        fitted, kept_images, first_image = [], [], 0
        for index, ids in enumerate(input_ids):
            # Each image is its size text (with write_image_size) + <boi> + its slots + <eoi>.
            starts = [
                p for p, token in enumerate(ids) if token == self.image_token_id and ids[p - 1] == self.boi_token_id
            ]
            spans = [
                (start - 1 - self._size_text_length(ids, start - 1, size), start + self.num_image_slots(*size) + 1)
                for start, size in zip(starts, sizes[first_image : first_image + len(starts)])
            ]
            begin, end = 0, len(ids)
            if len(ids) > max_length:
                if not truncation:
                    raise ValueError(
                        f"Row {index} is {len(ids)} tokens long with its {len(spans)} image(s) expanded to "
                        f"{' + '.join(str(stop - start) for start, stop in spans) or 0} tokens, more than "
                        f"max_length/context_length {max_length}: shorten the text, pass fewer or smaller images, or "
                        "pass truncation=True (which drops whole images)."
                    )
                if self.tokenizer.truncation_side == "left":
                    begin = len(ids) - max_length
                    begin = next((stop for start, stop in spans if start < begin < stop), begin)
                else:
                    end = max_length
                    end = next((start for start, stop in spans if start < end < stop), end)
            fitted.append(ids[begin:end])
            kept_images += [first_image + k for k, (start, stop) in enumerate(spans) if begin <= start and stop <= end]
            first_image += len(spans)
        return fitted, kept_images

    def _size_text_length(self, ids: list[int], boi: int, size: tuple[int, int]) -> int:
        """How many tokens right before the `<boi>` at `boi` are the image's size text: 0 without `write_image_size`
        (or where the text tokenized differently in its context)."""
        text = self.render_image_size(*size)
        if not text:
            return 0
        size_ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return len(size_ids) if ids[max(boi - len(size_ids), 0) : boi] == size_ids else 0

    # Output: ids -> text, model images -> PIL

    def _drop_image_slots(self, token_ids):
        if isinstance(token_ids, (torch.Tensor, np.ndarray)):
            token_ids = token_ids.tolist()
        if isinstance(token_ids, int):
            return token_ids
        if token_ids and not isinstance(token_ids[0], int):
            return [self._drop_image_slots(row) for row in token_ids]
        return [token for token in token_ids if token != self.image_token_id]

    def batch_decode(self, sequences, skip_special_tokens: bool = False, **kwargs) -> list[str]:
        """Decodes rows of ids to strings. Image slots are dropped; `<boi>` and `<eoi>` stay as markers of where
        images were, unless `skip_special_tokens`."""
        return self.tokenizer.batch_decode(
            self._drop_image_slots(sequences), skip_special_tokens=skip_special_tokens, **kwargs
        )

    def decode(self, token_ids, skip_special_tokens: bool = False, **kwargs) -> str:
        """Decodes one row of ids, as [`~TransfusionProcessor.batch_decode`] does."""
        return self.tokenizer.decode(
            self._drop_image_slots(token_ids), skip_special_tokens=skip_special_tokens, **kwargs
        )

    def post_process_image_text_to_text(self, generated_outputs, skip_special_tokens: bool = True, **kwargs):
        """Decodes generated ids to text, without image slots (see [`~TransfusionProcessor.batch_decode`])."""
        return self.decode(generated_outputs, skip_special_tokens=skip_special_tokens, **kwargs)

    def postprocess_images(self, images, output_type: str = "pil") -> list[list["PIL.Image.Image | np.ndarray"]]:
        """
        Turns generated images in [-1, 1] into pictures, one list per row.

        Args:
            images:
                A list with one entry per row (a list of `(channels, height, width)` tensors, or one
                `(num_images, channels, height, width)` tensor), or a single `(num_rows, channels, height, width)`
                tensor with one image per row.
            output_type (`str`, *optional*, defaults to `"pil"`):
                `"pil"` for PIL images, `"np"` for uint8 arrays `(height, width, channels)`.

        Returns:
            `list[list[PIL.Image.Image]]`: the images of each row, in order.
        """
        if isinstance(images, (torch.Tensor, np.ndarray)):
            if images.ndim != 4:
                raise ValueError(
                    f"A tensor of images must be (num_rows, channels, height, width), got shape {tuple(images.shape)}."
                )
            images = [image[None] for image in images]
        if not isinstance(images, (list, tuple)):
            raise ValueError(f"images must be a list per row or a 4-d tensor, got {type(images).__name__}.")
        return [list(self.image_processor.postprocess(row, output_type=output_type)) for row in images]

    def post_process_multimodal_output(
        self, generated_outputs, skip_special_tokens: bool = True, generation_mode: str | None = None, **kwargs
    ):
        """For `generation_mode="image"`: the generated images as one flat list of PIL images; otherwise the text."""
        if generation_mode == "image":
            return [image for row in self.postprocess_images(generated_outputs) for image in row]
        if generation_mode not in (None, "text"):
            raise ValueError(f"generation_mode must be 'text' or 'image', got {generation_mode!r}.")
        return self.post_process_image_text_to_text(
            generated_outputs, skip_special_tokens=skip_special_tokens, **kwargs
        )

    def apply_chat_template(self, conversation, chat_template: str | None = None, **kwargs):
        """As [`~ProcessorMixin.apply_chat_template`]; templates may use `image_token` for the image marker."""
        template = self.chat_template if chat_template is None else chat_template
        if isinstance(template, str) and "image_token" in template:
            kwargs.setdefault("image_token", self.image_token)
        return super().apply_chat_template(conversation, chat_template=chat_template, **kwargs)


def _pad_images(images: list[np.ndarray]) -> np.ndarray:
    """Images `(channels, height, width)` of different sizes in one array, padded with zeros (bottom and right) to the
    largest height and width; one size is stacked as it is."""
    height = max(image.shape[1] for image in images)
    width = max(image.shape[2] for image in images)
    padded = np.zeros((len(images), images[0].shape[0], height, width), dtype=images[0].dtype)
    for index, image in enumerate(images):
        padded[index, :, : image.shape[1], : image.shape[2]] = image
    return padded


def holds_image_data(value: Any) -> bool:
    """Whether `value` is an image (PIL), an array of two or more dimensions, a `datasets` image not decoded
    (`{"bytes": ..., "path": ...}`), or a non-empty list of them."""
    if isinstance(value, (list, tuple)):
        return bool(value) and all(holds_image_data(item) for item in value)
    if isinstance(value, dict):
        return "bytes" in value and "path" in value
    return isinstance(value, PIL.Image.Image) or (isinstance(value, (np.ndarray, torch.Tensor)) and value.ndim >= 2)


def _dataset_columns(text, images, kwargs: dict) -> tuple[Any, Any]:
    """`text` and `images`, else a dataset row's `caption` and `image` (taken out of `kwargs`). Image data under any
    other keyword is refused, naming it: transformers would drop an unknown keyword with a warning."""
    if "caption" in kwargs:
        if text is not None:
            raise ValueError("Got both text and caption: caption is another name for text, pass one.")
        text = kwargs.pop("caption")
    if "image" in kwargs:
        if images is not None:
            raise ValueError("Got both images and image: image is another name for images, pass one.")
        images = kwargs.pop("image")
    for key, value in kwargs.items():
        if holds_image_data(value):
            raise ValueError(
                f"The keyword {key!r} holds image data, which the processor does not read: pass the images as "
                "images= (or image=)."
            )
    return text, images


def _is_image(item: Any) -> bool:
    return isinstance(item, (PIL.Image.Image, str)) or (
        isinstance(item, (np.ndarray, torch.Tensor)) and item.ndim in (2, 3)
    )


def _as_image_list(images: Any) -> tuple[list, bool]:
    """Returns `(images, nested)`: a flat list of images, or (`nested`) one list of images per row."""
    if _is_image(images):
        return [images], False
    if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
        return list(images), False
    if not isinstance(images, (list, tuple)):
        raise ValueError(
            f"images must be an image, a list of images or a list of lists of images, got {type(images).__name__}."
        )
    is_row = [isinstance(item, (list, tuple)) for item in images]
    if any(is_row) and not all(is_row):
        raise ValueError("images mixes lists and single images: pass one list per row, or one flat list.")
    return list(images), bool(images) and all(is_row)


# `save_pretrained` copies this file and the ones it imports next to the processor files and names it in `auto_map`,
# so that `AutoProcessor.from_pretrained(folder, trust_remote_code=True)` works where this package is not installed.
TransfusionProcessor.register_for_auto_class()

__all__ = ["TransfusionProcessor", "add_image_tokens", "holds_image_data", "PLAIN_CHAT_TEMPLATE"]
