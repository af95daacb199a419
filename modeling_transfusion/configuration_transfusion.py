"""Transfusion model configuration."""

import math
import numbers

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

# The checkpoint format this release writes and reads. Raise it when a config field changes what a checkpoint means in
# a way an older release would silently ignore; such a checkpoint is then refused by older releases with a clear error.
# 2: images of any size (`max_image_size`) and 2-D patch positions (`image_position_embedding`).
# 3: modality experts (`modality_experts`). Only a config that turns them on is written as 3, so every other checkpoint
#    stays readable by releases that read 2.
# 4: the U-Net decoder without its output GroupNorm (`unet_output_norm=False`); written only by U-Net configs.
FORMAT_VERSION = 4
MODALITY_EXPERTS_FORMAT_VERSION = 3
UNET_WITHOUT_OUTPUT_NORM_FORMAT_VERSION = 4
IMAGE_POSITION_EMBEDDINGS = (None, "learned_2d")


@strict
class TransfusionConfig(PreTrainedConfig):
    r"""
    Configuration of a Transfusion model (Zhou et al., 2024, arXiv 2408.11039): one decoder-only transformer trained
    with next-token prediction on text and with diffusion on the continuous latents of images.

    Args:
        text_config (`dict` or `PreTrainedConfig`, *optional*):
            Config of the decoder backbone (any Hugging Face decoder: Llama by default, Qwen2, SmolLM, ...).
        vae_config (`dict`, *optional*):
            Config of a diffusers `AutoencoderKL` held by the model as a frozen submodule. `None` selects the identity
            autoencoder: the latent is the normalised pixel image itself (then `latent_channels == num_channels`).
        image_size (`int`, *optional*, defaults to 32):
            Height and width, in pixels, of the default image: what an image is when nothing gives its size (and the
            only size of a model with `max_image_size == image_size`).
        max_image_size (`int`, *optional*):
            Largest height or width, in pixels, of an image. Any height and width that are multiples of
            `image_size_divisor` (the VAE's downsampling times `patch_size`) up to this are allowed. Defaults to
            `image_size`.
        num_channels (`int`, *optional*, defaults to 3):
            Channels of those images (1 for grey, 3 for RGB).
        latent_channels (`int`, *optional*):
            Channels of the autoencoder latent: the VAE's `latent_channels` (4 if its config does not say), or
            `num_channels` without a VAE.
        patch_size (`int`, *optional*, defaults to 2):
            Side of the square of latent pixels folded into one sequence position.
        patch_encoder (`str`, *optional*, defaults to `"linear"`):
            `"linear"`: one linear layer each way, plus a timestep embedding (the paper's default); `"unet"`: U-Net
            down blocks in and up blocks out, conditioned on the timestep (the paper's stronger variant).
        image_position_embedding (`str`, *optional*):
            `None` (the paper): a patch knows where it is only by its 1-D position in the sequence. `"learned_2d"`: a
            learned row embedding plus a learned column embedding (`max_image_size / image_size_divisor` of each) is
            added to every patch, so that a patch knows its row and column in an image of any shape.
        unet_block_out_channels (`list[int]`, *optional*):
            Widths of the U-Net levels, one per level; `log2(patch_size) + 1` levels. Defaults to `[64, 128, ...]`.
        unet_layers_per_block (`int`, *optional*, defaults to 1):
            Residual blocks per U-Net level.
        unet_output_norm (`bool`, *optional*, defaults to `False`):
            Whether the U-Net decoder applies a GroupNorm before its output convolution, as diffusers' `UNet2DModel`
            does. Off: over a latent of few positions (8x8 for MNIST) the norm removes each image's per-channel mean
            and scale, which noise prediction needs, and the model draws poorly (docs/discrete_vs_continuous.md).
            Configs of U-Net models saved before this option existed had the norm and load with it.
        objective (`str`, *optional*, defaults to `"ddpm"`):
            `"ddpm"`: epsilon prediction with a cosine noise schedule (the paper); `"flow"`: rectified flow with a
            velocity target.
        num_train_timesteps (`int`, *optional*, defaults to 1000):
            Length of the training noise schedule.
        diffusion_loss_weight (`float`, *optional*, defaults to 5.0):
            The paper's lambda: `loss = lm_loss + diffusion_loss_weight * diffusion_loss`.
        max_conditioning_timestep (`int`, *optional*, defaults to 500):
            Timestep cap for images that condition text after them (the paper's noise limit), so captions are learned
            from images that are still recognisable. 0 trains captioning on clean images, which carry no diffusion
            loss.
        condition_dropout_prob (`float`, *optional*, defaults to 0.1):
            Probability, in training, that an image's patches may not see what precedes its `<boi>`; this teaches the
            unconditional branch used by classifier-free guidance.
        boi_token_id (`int`, *optional*, defaults to 0):
            Id of `<boi>`, which opens an image.
        eoi_token_id (`int`, *optional*, defaults to 1):
            Id of `<eoi>`, which closes an image.
        image_token_id (`int`, *optional*, defaults to 2):
            Id of `<image>`, the placeholder of one patch.
        modality_experts (`bool`, *optional*, defaults to `False`):
            Image slots get weights of their own in every decoder layer (LMFusion, Mixture-of-Transformers): a twin of
            each per-token module (q/k/v/o projections, q/k norms, MLP, layer norms, the final norm), routed by the
            image-slot mask, while attention stays shared. The rows of `<boi>`, `<eoi>` and `<image>` become image
            weights too. With [`~TransfusionForConditionalGeneration.freeze_text_path`], text stays exactly the LLM's.
        modality_experts_rank (`int`, *optional*):
            With `modality_experts`: `None` gives full copies; a rank `r` gives low-rank experts, whose linear layers
            are the text layer plus a trained rank-`r` delta (norms are full copies).
        tie_word_embeddings (`bool`, *optional*, defaults to `False`):
            Whether the LM head shares the input embedding matrix (copied from `text_config` when it ties).
        format_version (`int`, *optional*):
            Version of the checkpoint format: 4 for a U-Net without `unet_output_norm`, 3 with modality experts, 2
            otherwise. A config written by a newer release of `modeling_transfusion`, in a format this one cannot
            read, is refused with an error that says to upgrade.

    Keys this class does not declare are kept as attributes and saved again, as for any transformers config.

    Example:

    ```python
    >>> from modeling_transfusion import TransfusionConfig, TransfusionForConditionalGeneration
    >>> config = TransfusionConfig(
    ...     text_config={"model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
    ...                  "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2},
    ...     image_size=8, num_channels=1, latent_channels=1, patch_size=2,
    ...     boi_token_id=61, eoi_token_id=62, image_token_id=63,
    ... )
    >>> config.num_image_tokens
    16
    >>> model = TransfusionForConditionalGeneration(config)
    ```"""

    model_type = "transfusion"
    sub_configs_defaults = {"text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama")}

    text_config: dict | PreTrainedConfig | None = None
    vae_config: dict | None = None
    image_size: int = 32
    max_image_size: int | None = None
    num_channels: int = 3
    latent_channels: int | None = None
    patch_size: int = 2
    patch_encoder: str = "linear"
    image_position_embedding: str | None = None
    unet_block_out_channels: list[int] | None = None
    unet_layers_per_block: int = 1
    unet_output_norm: bool = False
    objective: str = "ddpm"
    num_train_timesteps: int = 1000
    diffusion_loss_weight: float = 5.0
    max_conditioning_timestep: int = 500
    condition_dropout_prob: float = 0.1
    boi_token_id: int = 0
    eoi_token_id: int = 1
    image_token_id: int = 2
    modality_experts: bool = False
    modality_experts_rank: int | None = None
    tie_word_embeddings: bool = False
    format_version: int | None = None

    def __post_init__(self, **kwargs):
        if self.format_version is None:
            self.format_version = MODALITY_EXPERTS_FORMAT_VERSION if self.modality_experts else 2
        if self.format_version > FORMAT_VERSION:
            raise ValueError(
                f"This Transfusion config has format_version={self.format_version}, written by a newer release of "
                f"modeling_transfusion; this release reads up to {FORMAT_VERSION}. Upgrade modeling_transfusion."
            )
        if self.latent_channels is None:
            self.latent_channels = self.vae_config.get("latent_channels", 4) if self.vae_config else self.num_channels
        if self.objective not in ("ddpm", "flow"):
            raise ValueError(f"Unknown objective {self.objective!r}: choose 'ddpm' (epsilon, cosine) or 'flow'.")
        if self.patch_encoder not in ("linear", "unet"):
            raise ValueError(f"Unknown patch_encoder {self.patch_encoder!r}: choose 'linear' or 'unet'.")
        if self.image_position_embedding not in IMAGE_POSITION_EMBEDDINGS:
            raise ValueError(
                f"Unknown image_position_embedding {self.image_position_embedding!r}: choose None or 'learned_2d'."
            )
        if self.max_image_size is None:
            self.max_image_size = self.image_size
        if self.modality_experts_rank is not None:
            if not self.modality_experts:
                raise ValueError(
                    "modality_experts_rank is the rank of modality experts: it needs modality_experts=True."
                )
            if isinstance(self.modality_experts_rank, bool) or self.modality_experts_rank < 1:
                raise ValueError(f"modality_experts_rank must be positive, got {self.modality_experts_rank}.")
        if self.modality_experts:
            self.format_version = max(self.format_version, MODALITY_EXPERTS_FORMAT_VERSION)
        if self.patch_encoder == "unet" and not self.unet_output_norm:
            self.format_version = max(self.format_version, UNET_WITHOUT_OUTPUT_NORM_FORMAT_VERSION)
        super().__post_init__(**kwargs)
        # The default is False, but a backbone that ties its head (SmolLM2, Qwen2-0.5B, ...) must stay tied.
        if not self.tie_word_embeddings and getattr(self.text_config, "tie_word_embeddings", False):
            self.tie_word_embeddings = True
        if self.patch_encoder == "unet" and self.unet_block_out_channels is None:
            self.unet_block_out_channels = [64 * 2**level for level in range(self.num_unet_levels)]
        self._check_geometry()
        self._check_diffusion()
        self._check_token_ids()

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs) -> "TransfusionConfig":
        # A U-Net model saved before `unet_output_norm` existed was built with the norm.
        if config_dict.get("patch_encoder") == "unet" and "unet_output_norm" not in config_dict:
            config_dict = {**config_dict, "unet_output_norm": True}
        return super().from_dict(config_dict, **kwargs)

    def _check_geometry(self):
        for name in ("image_size", "num_channels", "latent_channels", "patch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}.")
        if self.vae_config is None and self.latent_channels != self.num_channels:
            raise ValueError(
                f"Without a VAE the latent is the pixel image, so latent_channels ({self.latent_channels}) must equal "
                f"num_channels ({self.num_channels})."
            )
        if self.vae_config is not None:
            vae_latents = self.vae_config.get("latent_channels", 4)
            vae_inputs = self.vae_config.get("in_channels", 3)
            if vae_latents != self.latent_channels or vae_inputs != self.num_channels:
                raise ValueError(
                    f"vae_config maps {vae_inputs} image channels to {vae_latents} latent channels, but the config "
                    f"says num_channels={self.num_channels}, latent_channels={self.latent_channels}."
                )
        if self.patch_encoder == "unet":
            if self.patch_size & (self.patch_size - 1):
                raise ValueError(
                    f"The U-Net patch encoder halves the latent per level: patch_size "
                    f"({self.patch_size}) must be a power of two."
                )
            if len(self.unet_block_out_channels) != self.num_unet_levels:
                raise ValueError(
                    f"unet_block_out_channels needs log2(patch_size) + 1 = {self.num_unet_levels} entries, got "
                    f"{self.unet_block_out_channels}."
                )
        factor = self.image_size_divisor
        for name in ("image_size", "max_image_size"):
            if getattr(self, name) % factor:
                raise ValueError(
                    f"{name} ({getattr(self, name)}) must be divisible by the VAE downsample factor "
                    f"({self.vae_downsample_factor}) times patch_size ({self.patch_size}) = {factor}."
                )
        if self.max_image_size < self.image_size:
            raise ValueError(f"max_image_size ({self.max_image_size}) must be at least image_size ({self.image_size}).")
        positions = getattr(self.text_config, "max_position_embeddings", None)
        largest = self.max_image_size
        slots = self.num_image_slots(largest, largest)
        if positions is not None and slots + 2 > positions:  # the image's slots, <boi> and <eoi>
            fitting = math.isqrt(max(positions - 2, 0)) * factor
            raise ValueError(
                f"max_image_size ({largest}): an image of {largest}x{largest} pixels takes {slots} <image> slots, plus "
                f"<boi> and <eoi>, more than the backbone's max_position_embeddings ({positions}). Choose image_size "
                f"and max_image_size of at most {fitting}, or a larger patch_size."
            )

    def _check_diffusion(self):
        if self.num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps must be at least 2, got {self.num_train_timesteps}.")
        if not 0 <= self.max_conditioning_timestep <= self.num_train_timesteps:
            raise ValueError(
                f"max_conditioning_timestep ({self.max_conditioning_timestep}) must lie in [0, num_train_timesteps="
                f"{self.num_train_timesteps}]."
            )
        if not 0.0 <= self.condition_dropout_prob < 1.0:
            raise ValueError(f"condition_dropout_prob must lie in [0, 1), got {self.condition_dropout_prob}.")
        if self.diffusion_loss_weight < 0:
            raise ValueError(f"diffusion_loss_weight must be non-negative, got {self.diffusion_loss_weight}.")

    def _check_token_ids(self):
        vocab_size = self.text_config.vocab_size
        ids = {
            "boi_token_id": self.boi_token_id,
            "eoi_token_id": self.eoi_token_id,
            "image_token_id": self.image_token_id,
        }
        for name, value in ids.items():
            if not 0 <= value < vocab_size:
                raise ValueError(f"{name}={value} lies outside the vocabulary of the text model (size {vocab_size}).")
        if len(set(ids.values())) != 3:
            raise ValueError(f"<boi>, <eoi> and <image> need three distinct ids, got {ids}.")

    @property
    def image_token_ids(self) -> list[int]:
        """The ids of the tokens Transfusion adds: `[boi_token_id, eoi_token_id, image_token_id]`."""
        return [self.boi_token_id, self.eoi_token_id, self.image_token_id]

    @property
    def vae_downsample_factor(self) -> int:
        """Pixels per latent pixel along one side: 2 ** (number of VAE blocks - 1), or 1 without a VAE."""
        if self.vae_config is None:
            return 1
        return 2 ** (len(self.vae_config.get("block_out_channels", (64,))) - 1)

    @property
    def image_size_divisor(self) -> int:
        """Pixels along one side of the square that one `<image>` slot covers: VAE downsampling x `patch_size`.
        Image heights and widths are multiples of it."""
        return self.vae_downsample_factor * self.patch_size

    @property
    def latent_size(self) -> int:
        """Height and width of the latent of the default image."""
        return self.image_size // self.vae_downsample_factor

    @property
    def num_image_tokens(self) -> int:
        """Number of `<image>` slots (patches) that the default image occupies in the sequence."""
        return self.num_image_slots(self.image_size, self.image_size)

    @property
    def max_grid_size(self) -> int:
        """Most patch rows (or columns) of an image: `max_image_size // image_size_divisor`."""
        return self.max_image_size // self.image_size_divisor

    def check_image_size(self, height, width, name: str = "image size") -> tuple[int, int]:
        """Returns `(height, width)` in pixels as ints, or raises a `ValueError` naming `name` and the rule broken:
        positive, multiples of `image_size_divisor`, at most `max_image_size`."""
        divisor, largest = self.image_size_divisor, self.max_image_size
        for side in (height, width):
            if not isinstance(side, numbers.Real):
                raise ValueError(
                    f"{name} {height}x{width}: height and width must be integers, got {type(side).__name__} {side!r}."
                )
            if isinstance(side, bool) or not float(side).is_integer() or side < 1:
                raise ValueError(f"{name} {height}x{width}: height and width must be positive integers.")
            if side % divisor:
                raise ValueError(
                    f"{name} {height}x{width}: height and width must be multiples of {divisor} (the VAE's downsampling "
                    f"{self.vae_downsample_factor} x patch_size {self.patch_size})."
                )
            if side > largest:
                raise ValueError(
                    f"{name} {height}x{width}: this model takes images of at most {largest}x{largest} pixels "
                    "(config.max_image_size)."
                )
        return int(height), int(width)

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        """Patch rows and columns of an image of `height` x `width` pixels; it occupies their product in slots."""
        return height // self.image_size_divisor, width // self.image_size_divisor

    def num_image_slots(self, height: int, width: int) -> int:
        """Number of `<image>` slots (patches) that an image of `height` x `width` pixels occupies in the sequence."""
        rows, columns = self.grid_size(height, width)
        return rows * columns

    @property
    def patch_dim(self) -> int:
        """Number of latent values in one patch: `latent_channels * patch_size ** 2`."""
        return self.latent_channels * self.patch_size**2

    @property
    def num_unet_levels(self) -> int:
        return int(math.log2(self.patch_size)) + 1


# `save_pretrained` copies this file next to the config and names it in `auto_map` (remote code, see the model's save).
TransfusionConfig.register_for_auto_class()

__all__ = ["TransfusionConfig"]
