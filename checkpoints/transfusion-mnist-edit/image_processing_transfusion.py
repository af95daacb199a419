"""Image processor for Transfusion: any image in, a tensor in [-1, 1] of an allowed size out, and pixels back after
generation."""

from collections.abc import Sequence

import numpy as np
import PIL.Image
import torch
from transformers.image_processing_backends import PilBackend
from transformers.image_processing_utils import BatchFeature
from transformers.image_utils import ChannelDimension, PILImageResampling, SizeDict
from transformers.processing_utils import ImagesKwargs, Unpack
from transformers.utils import TensorType

# PIL modes that hold 8-bit samples. Wider modes ("I", "I;16", "F") have no agreed range to map to [0, 1].
SUPPORTED_PIL_MODES = ("1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV")
# Channel counts an array may have: grey, RGB, RGBA.
SUPPORTED_ARRAY_CHANNELS = (1, 3, 4)


class TransfusionImageProcessorKwargs(ImagesKwargs, total=False):
    r"""
    num_channels (`int`, *optional*, defaults to 3):
        Channels of the output: 1 (grey) or 3 (RGB). Inputs are converted to this, whatever they hold.
    size_divisor (`int`, *optional*):
        With `size={"longest_edge": L}`: heights and widths come out as multiples of this (the model's
        `config.image_size_divisor`).
    """

    num_channels: int
    size_divisor: int


class TransfusionImageProcessor(PilBackend):
    r"""
    Turns images into the `pixel_values` a Transfusion model reads: `(num_images, num_channels, height, width)` float32
    in [-1, 1]. Each image is converted to `num_channels` (RGBA and other transparent images are composited onto white),
    resized, rescaled to [0, 1] and normalised with mean 0.5 and std 0.5.
    [`~TransfusionImageProcessor.postprocess`] goes the other way.

    Two resizing policies:
    - one square size (the default, for a model of one image size): the shorter side is resized to
      `size["shortest_edge"]`, then the centre is cropped to `crop_size`;
    - any size (`size={"longest_edge": L}`, `size_divisor=s`, `do_center_crop=False`, for a model with
      `max_image_size = L`): an image whose height and width are multiples of `s` and at most `L` is kept as it is;
      any other is resized, keeping its aspect ratio, so that its longer side is at most `L`, then each side is rounded
      to the nearest multiple of `s` (at least `s`). Nothing is cropped: `do_center_crop` defaults to `False` with
      `longest_edge`, and `True` is refused. [`TransfusionProcessor.from_model_config`] picks this policy for a model
      whose `max_image_size` is larger than its `image_size`.

    Inputs may be PIL images, numpy arrays or torch tensors, one or a (nested) list of them, or a 4-d batch. Arrays are
    `(height, width)`, `(height, width, channels)` or `(channels, height, width)` with 1, 3 or 4 channels; pass
    `input_data_format` where both ends could be the channel axis. Integer arrays hold values in [0, 255]; floating
    point arrays hold values in [0, 1] (as torchvision's `ToTensor` makes them). Every input is quantised to 8 bits,
    the resolution of the PIL resampling path.

    Args:
        size (`int` or `dict[str, int]`, *optional*, defaults to `{"shortest_edge": 32}`):
            The shorter side after resizing. It also sets `crop_size` to that square, unless `crop_size` is given:
            `TransfusionImageProcessor(size=config.image_size)` is all a model needs.
        crop_size (`int` or `dict[str, int]`, *optional*, defaults to `{"height": 32, "width": 32}`):
            The output size, cut from the centre of the resized image.
        num_channels (`int`, *optional*, defaults to 3):
            Channels of the output: 1 or 3 (the model's `config.num_channels`).
        resample (`PILImageResampling`, *optional*, defaults to `BICUBIC`):
            Resampling filter of the resize.
        size_divisor (`int`, *optional*):
            With `size={"longest_edge": L}`: the multiple that heights and widths are rounded to.

    Example:

    ```python
    >>> import numpy as np
    >>> from modeling_transfusion import TransfusionImageProcessor
    >>> image_processor = TransfusionImageProcessor(size=16, num_channels=1)
    >>> pixel_values = image_processor(np.zeros((28, 28), dtype=np.uint8), return_tensors="pt")["pixel_values"]
    >>> tuple(pixel_values.shape), pixel_values.min().item()
    ((1, 1, 16, 16), -1.0)
    >>> image_processor.postprocess(pixel_values)[0].size
    (16, 16)

    ```
    """

    model_input_names = ["pixel_values"]
    valid_kwargs = TransfusionImageProcessorKwargs
    resample = PILImageResampling.BICUBIC
    default_to_square = False
    size = {"shortest_edge": 32}
    crop_size = {"height": 32, "width": 32}
    num_channels = 3
    size_divisor = None
    do_resize = True
    do_center_crop = True
    do_rescale = True
    rescale_factor = 1 / 255
    do_normalize = True
    image_mean = 0.5
    image_std = 0.5

    def __init__(self, **kwargs: Unpack[TransfusionImageProcessorKwargs]):
        side = kwargs.get("size")
        if isinstance(side, dict):
            side = side.get("shortest_edge")
        if isinstance(side, int) and kwargs.get("crop_size") is None:
            kwargs["crop_size"] = {"height": side, "width": side}
        if isinstance(kwargs.get("size"), dict) and kwargs["size"].get("longest_edge") is not None:
            kwargs.setdefault("do_center_crop", False)  # the any-size policy keeps each image's shape
        super().__init__(**kwargs)
        if self.num_channels not in (1, 3):
            raise ValueError(f"num_channels must be 1 (grey) or 3 (RGB), got {self.num_channels}.")
        # `self.size` is a SizeDict here (attributes, no `.get`).
        longest = getattr(self.size, "longest_edge", None)
        if longest is not None:
            if self.do_center_crop:
                raise ValueError(
                    f"size={{'longest_edge': {longest}}} keeps each image's aspect ratio, which a centre crop to "
                    "crop_size would undo: pass do_center_crop=False (the default with longest_edge)."
                )
            if not isinstance(self.size_divisor, int) or self.size_divisor < 1:
                raise ValueError(
                    f"size={{'longest_edge': {longest}}} needs size_divisor, the multiple heights and widths are "
                    f"rounded to (the model's config.image_size_divisor); got {self.size_divisor!r}."
                )
            if longest % self.size_divisor:
                raise ValueError(f"longest_edge ({longest}) must be a multiple of size_divisor ({self.size_divisor}).")

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        """The size an image of `height` x `width` comes out at under the any-size policy (see the class docstring)."""
        longest, divisor = self.size["longest_edge"], self.size_divisor
        if height % divisor == 0 and width % divisor == 0 and max(height, width) <= longest:
            return height, width
        scale = min(1.0, longest / max(height, width))
        return tuple(min(max(divisor, round(side * scale / divisor) * divisor), longest) for side in (height, width))

    def resize(self, image: np.ndarray, size: SizeDict, resample=None, **kwargs) -> np.ndarray:
        """As the backend's `resize`; under the any-size policy (`size.longest_edge`), to [`target_size`]."""
        if size.longest_edge is None or self.size_divisor is None:
            return super().resize(image, size, resample=resample, **kwargs)
        height, width = image.shape[-2:]
        target = self.target_size(height, width)
        if target == (height, width):
            return image
        return super().resize(image, SizeDict(height=target[0], width=target[1]), resample=resample, **kwargs)

    # Input: any image -> a channels-first uint8 array with `num_channels` channels

    def _prepare_images_structure(self, images, expected_ndims: int = 3) -> list:
        """Flattens one image, a list, a nested list or a 4-d batch into a flat list of single images."""
        flat = []
        _flatten_images(images, flat, self.fetch_images)
        if not flat:
            raise ValueError("Got no images: pass at least one PIL image, numpy array or torch tensor.")
        for index, image in enumerate(flat):
            size = image.size if isinstance(image, PIL.Image.Image) else tuple(image.shape)
            if 0 in size:
                detail = (
                    f"PIL image of size {size[0]}x{size[1]}" if isinstance(image, PIL.Image.Image) else f"shape {size}"
                )
                raise ValueError(
                    f"Got an empty image at index {index} ({detail}): every image needs a height and a width of at "
                    "least one pixel."
                )
        return flat

    def process_image(
        self,
        image: "PIL.Image.Image | np.ndarray | torch.Tensor",
        input_data_format: str | ChannelDimension | None = None,
        num_channels: int | None = None,
        **kwargs,
    ) -> np.ndarray:
        """Converts one image to a `(num_channels, height, width)` uint8 array."""
        num_channels = num_channels or self.num_channels
        if num_channels not in (1, 3):
            raise ValueError(f"num_channels must be 1 (grey) or 3 (RGB), got {num_channels}.")
        if not isinstance(image, PIL.Image.Image):
            image = _array_to_pil(_to_numpy(image), input_data_format)
        pixels = np.asarray(_convert_mode(image, "L" if num_channels == 1 else "RGB"))
        if pixels.ndim == 2:
            pixels = pixels[:, :, None]
        return np.ascontiguousarray(pixels.transpose(2, 0, 1))

    def _preprocess(
        self, images: list[np.ndarray], return_tensors: str | TensorType | None = None, **kwargs
    ) -> BatchFeature:
        outputs = super()._preprocess(images, return_tensors=None, **kwargs)
        pixel_values = [image.astype(np.float32) for image in outputs["pixel_values"]]
        shapes = {image.shape[1:] for image in pixel_values}
        if return_tensors is not None and len(shapes) > 1:
            raise ValueError(
                f"Images of different sizes {sorted(shapes)} cannot be stacked into one tensor: pass "
                "return_tensors=None for a list, or let TransfusionProcessor pad them (it returns image_sizes)."
            )
        return BatchFeature(data={"pixel_values": pixel_values}, tensor_type=return_tensors)

    # Output: tensors in [-1, 1] -> pixels

    def postprocess(
        self, images: "torch.Tensor | np.ndarray | Sequence", output_type: str = "pil"
    ) -> "list[PIL.Image.Image] | np.ndarray":
        """
        Converts model images in [-1, 1] back to pixels, the inverse of preprocessing (values outside are clamped).

        Args:
            images (`torch.Tensor`, `np.ndarray` or a list of them):
                `(num_images, channels, height, width)`, `(channels, height, width)`, or a list of the latter; 1 or 3
                channels.
            output_type (`str`, *optional*, defaults to `"pil"`):
                `"pil"`: a list of PIL images (mode `"L"` or `"RGB"`). `"np"`: one uint8 array
                `(num_images, height, width, channels)`, or a list of `(height, width, channels)` arrays when the
                images differ in size.
        """
        if output_type not in ("pil", "np"):
            raise ValueError(f"output_type must be 'pil' or 'np', got {output_type!r}.")
        if isinstance(images, (list, tuple)) and len({tuple(np.shape(image)[-2:]) for image in images}) > 1:
            # Images of different sizes: each on its own (a list of arrays for "np").
            converted = [self.postprocess(image, output_type) for image in images]
            return [item for items in converted for item in items]
        batch = _stack_model_images(images)  # [num_images, channels, height, width]
        mean = np.asarray(self.image_mean, dtype=np.float64).reshape(-1, 1, 1)
        std = np.asarray(self.image_std, dtype=np.float64).reshape(-1, 1, 1)
        values = np.nan_to_num(np.clip(batch.astype(np.float64), -1.0, 1.0)) * std + mean
        pixels = np.clip(np.rint(values / self.rescale_factor), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
        if output_type == "np":
            return pixels
        return [PIL.Image.fromarray(image[:, :, 0] if image.shape[-1] == 1 else image) for image in pixels]


def _flatten_images(images, flat: list, fetch) -> None:
    if isinstance(images, (list, tuple)):
        for item in images:
            _flatten_images(item, flat, fetch)
    elif isinstance(images, str):
        flat.append(fetch(images))
    elif isinstance(images, PIL.Image.Image):
        flat.append(images)
    elif isinstance(images, (np.ndarray, torch.Tensor)):
        if images.ndim == 4:
            flat.extend(images)
        elif images.ndim in (2, 3):
            flat.append(images)
        else:
            raise ValueError(
                f"An image must have 2 dimensions (height, width) or 3 (with a channel axis first or last), or 4 for a "
                f"batch; got shape {tuple(images.shape)}."
            )
    else:
        raise ValueError(
            f"Unsupported image type {type(images).__name__}: pass PIL images, numpy arrays or torch tensors."
        )


def _to_numpy(image: "np.ndarray | torch.Tensor") -> np.ndarray:
    """An integer array in [0, 255] or a float array in [0, 1], as uint8."""
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu()
        image = (image.float() if image.is_floating_point() else image).numpy()
    if image.dtype == np.uint8:
        return image
    if np.issubdtype(image.dtype, np.integer):
        low, high = image.min(), image.max()
        if low < 0 or high > 255:
            raise ValueError(
                f"Integer images must hold values in [0, 255], got [{low}, {high}] ({image.dtype}): convert to uint8."
            )
        return image.astype(np.uint8)
    if np.issubdtype(image.dtype, np.floating):
        if not np.isfinite(image).all():
            raise ValueError("Floating point images must hold finite values in [0, 1], got NaN or infinity.")
        low, high = float(image.min()), float(image.max())
        tolerance = 1e-3  # values a rounding error outside [0, 1] are clipped, not refused
        if low < -tolerance or high > 1 + tolerance:
            raise ValueError(
                f"Floating point images must hold finite values in [0, 1], got [{low}, {high}]. Map images in [-1, 1] "
                "with (x + 1) / 2, and pass images in [0, 255] as uint8."
            )
        return np.rint(np.clip(image, 0.0, 1.0) * 255).astype(np.uint8)
    raise ValueError(f"Unsupported image dtype {image.dtype}: pass uint8 in [0, 255] or floats in [0, 1].")


def _array_to_pil(image: np.ndarray, input_data_format: str | ChannelDimension | None) -> PIL.Image.Image:
    if image.ndim == 2:
        return PIL.Image.fromarray(image, mode="L")
    channels_first = _channels_first(image.shape, input_data_format)
    if channels_first:
        image = image.transpose(1, 2, 0)
    channels = image.shape[-1]
    if channels not in SUPPORTED_ARRAY_CHANNELS:
        axis = "first" if channels_first else "last"
        raise ValueError(
            f"Image of shape {image.shape} has {channels} channels on its {axis} axis; supported: 1 (grey), 3 (RGB), "
            "4 (RGBA)."
        )
    if channels == 1:
        return PIL.Image.fromarray(image[:, :, 0], mode="L")
    return PIL.Image.fromarray(np.ascontiguousarray(image), mode="RGB" if channels == 3 else "RGBA")


def _channels_first(shape: tuple[int, ...], input_data_format: str | ChannelDimension | None) -> bool:
    if input_data_format is not None:
        return ChannelDimension(input_data_format) == ChannelDimension.FIRST
    first, last = shape[0] in SUPPORTED_ARRAY_CHANNELS, shape[-1] in SUPPORTED_ARRAY_CHANNELS
    if first and last:
        raise ValueError(
            f"Cannot tell the channel axis of an image of shape {shape}: pass input_data_format='channels_first' "
            "or 'channels_last'."
        )
    if not (first or last):
        raise ValueError(
            f"Image of shape {shape} has no channel axis of size 1, 3 or 4 first or last: pass (height, width), "
            "(height, width, channels) or (channels, height, width)."
        )
    return first


def _convert_mode(image: PIL.Image.Image, mode: str) -> PIL.Image.Image:
    if image.mode not in SUPPORTED_PIL_MODES:
        raise ValueError(
            f"Unsupported PIL image mode {image.mode!r} (more than 8 bits per sample, with no fixed range): convert "
            f"it to 'L' or 'RGB' first. Supported modes: {', '.join(SUPPORTED_PIL_MODES)}."
        )
    if "A" in image.getbands() or "a" in image.getbands() or "transparency" in image.info:
        # Transparent pixels show the white a viewer would put behind them, not whatever colour they store.
        rgba = image.convert("RGBA")
        image = PIL.Image.alpha_composite(PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return image.convert(mode) if image.mode != mode else image


def _stack_model_images(images: "torch.Tensor | np.ndarray | Sequence") -> np.ndarray:
    if isinstance(images, (list, tuple)):
        batches = [batch for batch in map(_stack_model_images, images) if len(batch)]
        return np.concatenate(batches) if batches else np.zeros((0, 1, 1, 1), dtype=np.float32)
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().float().numpy()
    if not isinstance(images, np.ndarray):
        raise ValueError(f"Expected tensors or arrays of images in [-1, 1], got {type(images).__name__}.")
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(
            f"Expected images of shape (num_images, channels, height, width) or (channels, height, width) with 1 or 3 "
            f"channels, got {images.shape}."
        )
    return images.astype(np.float32)


TransfusionImageProcessor.register_for_auto_class()  # saved with its code, as remote code

__all__ = ["TransfusionImageProcessor"]
