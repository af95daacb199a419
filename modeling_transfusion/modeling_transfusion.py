"""PyTorch Transfusion model (Zhou et al., 2024, arXiv 2408.11039).

One decoder-only transformer reads and writes text and images. Text is embedded as tokens and trained with next-token
prediction. An image is encoded by a frozen VAE into a latent, noised to a per-image timestep, cut into patches and
embedded by a patch encoder into the `<image>` slots between its `<boi>` and `<eoi>`. Attention is causal over the
sequence and bidirectional inside each image. A patch decoder turns the transformer's output at the image slots back
into a latent-shaped prediction of the noise (`ddpm`) or velocity (`flow`), trained with a mean squared error.
"""

import functools
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.unets.unet_2d_blocks import DownBlock2D, UpBlock2D
from safetensors import SafetensorError
from torch import nn
from transformers import AutoModel, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.conversion_mapping import register_checkpoint_conversion_mapping
from transformers.core_model_loading import WeightRenaming
from transformers.masking_utils import (
    create_bidirectional_mask,
    create_causal_mask,
    create_sliding_window_causal_mask,
)
from transformers.modeling_outputs import BaseModelOutputWithPast, BaseModelOutputWithPooling, CausalLMOutputWithPast
from transformers.utils import logging
from transformers.utils.generic import can_return_tuple

from .configuration_transfusion import TransfusionConfig
from .diffusion_transfusion import diffusion_mse, noise_latents, noise_scheduler_from_config, sample_training_timesteps
from .experts_transfusion import (
    ROUTING_KWARG,
    TransfusionLowRankExpert,
    add_image_experts,
    add_image_token_rows,
    image_path_parameters,
)
from .generation_transfusion import TransfusionGenerationMixin, indices_by_shape
from .saving_transfusion import (
    broken_weights,
    check_save_directory,
    load_one_save,
    new_save_id,
    save_atomically,
    stamp_weights,
)

logger = logging.get_logger(__name__)

# The Auto classes a Transfusion checkpoint loads with (`register_for_auto_class` records only one of them).
MODEL_AUTO_CLASSES = ("AutoModel", "AutoModelForCausalLM", "AutoModelForImageTextToText", "AutoModelForMultimodalLM")


@dataclass
class TransfusionModelOutputWithPast(BaseModelOutputWithPast):
    r"""
    Outputs of [`TransfusionModel`]: the backbone's hidden states plus the diffusion head's prediction.

    diffusion_prediction (`torch.FloatTensor` of shape `(num_images, latent_channels, latent_height, latent_width)`):
        The patch decoder's prediction (noise for `ddpm`, velocity for `flow`) for every image in the batch, in the
        order the images appear (row by row, left to right). Images of different sizes are padded with zeros to the
        largest height and width (see `image_sizes`).
    diffusion_target (`torch.FloatTensor`, same shape as `diffusion_prediction`):
        What the prediction is trained towards, for the timesteps and noise used in this forward.
    image_timesteps (`torch.LongTensor` of shape `(num_images,)`):
        The timestep each image was noised to (0 means clean).
    image_sizes (`torch.LongTensor` of shape `(num_images, 2)`):
        Height and width of each image in pixels.
    """

    diffusion_prediction: torch.FloatTensor | None = None
    diffusion_target: torch.FloatTensor | None = None
    image_timesteps: torch.Tensor | None = None
    image_sizes: torch.LongTensor | None = None


@dataclass
class TransfusionCausalLMOutputWithPast(CausalLMOutputWithPast):
    r"""
    Outputs of [`TransfusionForConditionalGeneration`]: those of a causal LM (`loss`, `logits`, the cache, hidden
    states, attentions) plus the two loss terms and the diffusion head's outputs.

    loss (`torch.FloatTensor` of shape `()`, returned when `labels` is given):
        `lm_loss + config.diffusion_loss_weight * diffusion_loss`.
    lm_loss (`torch.FloatTensor` of shape `()`): next-token cross-entropy over the text targets.
    diffusion_loss (`torch.FloatTensor` of shape `()`): mean squared error per image, averaged over the noised images
        (those at a timestep above 0).
    diffusion_prediction, diffusion_target, image_timesteps, image_sizes: as in [`TransfusionModelOutputWithPast`].
    """

    lm_loss: torch.FloatTensor | None = None
    diffusion_loss: torch.FloatTensor | None = None
    diffusion_prediction: torch.FloatTensor | None = None
    diffusion_target: torch.FloatTensor | None = None
    image_timesteps: torch.Tensor | None = None
    image_sizes: torch.LongTensor | None = None


def patchify(latents: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Cuts latents `(num_images, channels, height, width)` into raster-ordered patches
    `(num_images, (height // patch_size) * (width // patch_size), channels * patch_size**2)`."""
    n, c, h, w = latents.shape
    p = patch_size
    patches = latents.reshape(n, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(n, (h // p) * (w // p), c * p * p)


def unpatchify(
    patches: torch.Tensor, patch_size: int, channels: int, grid_size: tuple[int, int] | None = None
) -> torch.Tensor:
    """Inverse of [`patchify`]: `grid_size` is `(rows, columns)` of patches (square by default)."""
    n, num_patches, _ = patches.shape
    rows, columns = grid_size if grid_size is not None else (math.isqrt(num_patches),) * 2
    p = patch_size
    latents = patches.reshape(n, rows, columns, channels, p, p).permute(0, 3, 1, 4, 2, 5)
    return latents.reshape(n, channels, rows * p, columns * p)


class TransfusionTimestepEmbedding(nn.Module):
    """Sinusoidal features of the (possibly fractional) timestep followed by an MLP."""

    def __init__(self, embedding_dim: int, num_frequencies: int = 256):
        super().__init__()
        self.time_proj = Timesteps(num_frequencies, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_mlp = TimestepEmbedding(num_frequencies, embedding_dim)

    def forward(self, timesteps: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.time_mlp(self.time_proj(timesteps).to(dtype))  # [num_images, embedding_dim]


class TransfusionLinearPatchEncoder(nn.Module):
    """The paper's default: one linear layer per patch, plus a timestep embedding added to every patch."""

    def __init__(self, config: TransfusionConfig):
        super().__init__()
        self.patch_size = config.patch_size
        self.time_embedding = TransfusionTimestepEmbedding(config.text_config.hidden_size)
        self.proj = nn.Linear(config.patch_dim, config.text_config.hidden_size)

    def forward(
        self, latents: torch.Tensor, timesteps: torch.Tensor, time_embedding: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, None, tuple[torch.Tensor, torch.Tensor]]:
        """Returns the slot embeddings `(num_images, num_patches, hidden_size)`, no state for the decoder, and the
        encoder's hidden states: the patches `(num_images, num_patches, patch_dim)` and their projection.
        `time_embedding` `(num_images, hidden_size)` is `self.time_embedding` of `timesteps` when already computed."""
        patches = patchify(latents, self.patch_size).to(self.proj.weight.dtype)
        projected = self.proj(patches)
        if time_embedding is None:
            time_embedding = self.time_embedding(timesteps, patches.dtype)
        embeddings = projected + time_embedding[:, None]
        return embeddings, None, (patches, projected)


class TransfusionPatchPositionEmbedding(nn.Module):
    """Learned 2-D positions of patches (`image_position_embedding="learned_2d"`): the embedding of the patch's row plus
    that of its column, for grids of up to `config.max_grid_size` rows and columns. Added to the patch embeddings, it
    tells each slot where it sits in an image of any shape, beyond its 1-D position in the sequence."""

    def __init__(self, config: TransfusionConfig):
        super().__init__()
        self.row_embedding = nn.Embedding(config.max_grid_size, config.text_config.hidden_size)
        self.column_embedding = nn.Embedding(config.max_grid_size, config.text_config.hidden_size)

    def forward(self, grid_size: tuple[int, int]) -> torch.Tensor:
        rows, columns = grid_size
        device = self.row_embedding.weight.device
        row = self.row_embedding(torch.arange(rows, device=device))
        column = self.column_embedding(torch.arange(columns, device=device))
        return (row[:, None] + column[None]).flatten(0, 1)  # [rows * columns, hidden_size], raster order


class TransfusionZeroInitLinear(nn.Linear):
    """A linear layer that [`TransfusionPreTrainedModel`] initialises at zero: the diffusion head starts at the trivial
    prediction, as DiT's does, for a calm first phase of training."""


class TransfusionLinearPatchDecoder(nn.Module):
    """Maps the transformer's output at each image slot back to one patch of the prediction."""

    def __init__(self, config: TransfusionConfig):
        super().__init__()
        self.patch_size = config.patch_size
        self.latent_channels = config.latent_channels
        self.proj = TransfusionZeroInitLinear(config.text_config.hidden_size, config.patch_dim)

    def forward(
        self, hidden_states: torch.Tensor, encoder_state: None = None, grid_size: tuple[int, int] | None = None
    ) -> torch.Tensor:
        return unpatchify(self.proj(hidden_states), self.patch_size, self.latent_channels, grid_size)


def _unet_groups(config: TransfusionConfig) -> int:
    return math.gcd(32, *config.unet_block_out_channels)


@dataclass
class TransfusionUNetState:
    """What the U-Net encoder hands to the U-Net decoder: the timestep embedding and the skip activations."""

    time_embedding: torch.Tensor
    skips: tuple[torch.Tensor, ...]


class TransfusionUNetPatchEncoder(nn.Module):
    """U-Net down blocks: `log2(patch_size)` halvings of the latent, so that each output pixel is one patch."""

    def __init__(self, config: TransfusionConfig):
        super().__init__()
        channels = config.unet_block_out_channels
        time_dim = 4 * channels[0]
        groups = _unet_groups(config)
        self.time_embedding = TransfusionTimestepEmbedding(time_dim, num_frequencies=channels[0])
        self.conv_in = nn.Conv2d(config.latent_channels, channels[0], kernel_size=3, padding=1)
        self.down_blocks = nn.ModuleList(
            DownBlock2D(
                in_channels=channels[max(level - 1, 0)],
                out_channels=channels[level],
                temb_channels=time_dim,
                num_layers=config.unet_layers_per_block,
                resnet_groups=groups,
                add_downsample=level < len(channels) - 1,
                downsample_padding=1,
            )
            for level in range(len(channels))
        )
        self.proj = nn.Linear(channels[-1], config.text_config.hidden_size)

    def forward(
        self, latents: torch.Tensor, timesteps: torch.Tensor, time_embedding: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, TransfusionUNetState, tuple[torch.Tensor, ...]]:
        """Returns the slot embeddings `(num_images, num_patches, hidden_size)`, what the decoder needs, and the
        encoder's hidden states: its levels `(num_images, channels, height, width)`, from the input convolution to
        the last down block. `time_embedding` is `self.time_embedding` of `timesteps` when already computed."""
        dtype = self.conv_in.weight.dtype
        if time_embedding is None:
            time_embedding = self.time_embedding(timesteps, dtype)
        hidden = self.conv_in(latents.to(dtype))
        skips = levels = (hidden,)
        for block in self.down_blocks:
            hidden, block_skips = block(hidden, time_embedding)
            skips += block_skips
            levels += (hidden,)
        patches = hidden.flatten(2).transpose(1, 2)  # [num_images, num_patches, channels[-1]]
        return self.proj(patches), TransfusionUNetState(time_embedding, skips), levels


class TransfusionUNetPatchDecoder(nn.Module):
    """U-Net up blocks, fed by the transformer's output at the image slots and the encoder's skip activations."""

    def __init__(self, config: TransfusionConfig):
        super().__init__()
        channels = list(reversed(config.unet_block_out_channels))
        time_dim = 4 * channels[-1]
        groups = _unet_groups(config)
        self.proj = nn.Linear(config.text_config.hidden_size, channels[0])
        self.up_blocks = nn.ModuleList(
            UpBlock2D(
                in_channels=channels[min(level + 1, len(channels) - 1)],
                prev_output_channel=channels[max(level - 1, 0)],
                out_channels=channels[level],
                temb_channels=time_dim,
                num_layers=config.unet_layers_per_block + 1,
                resnet_groups=groups,
                add_upsample=level < len(channels) - 1,
            )
            for level in range(len(channels))
        )
        # Off by default: over a small latent, a GroupNorm here takes away each image's per-channel mean and scale.
        self.norm_out = nn.GroupNorm(groups, channels[-1]) if config.unet_output_norm else None
        self.conv_out = nn.Conv2d(channels[-1], config.latent_channels, kernel_size=3, padding=1)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_state: TransfusionUNetState,
        grid_size: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        n, num_patches, _ = hidden_states.shape
        rows, columns = grid_size if grid_size is not None else (math.isqrt(num_patches),) * 2
        hidden = self.proj(hidden_states).transpose(1, 2).reshape(n, -1, rows, columns)
        skips = encoder_state.skips
        for block in self.up_blocks:
            block_skips, skips = skips[-len(block.resnets) :], skips[: -len(block.resnets)]
            hidden = block(hidden, block_skips, encoder_state.time_embedding)
        if self.norm_out is not None:
            hidden = self.norm_out(hidden)
        return self.conv_out(nn.functional.silu(hidden))


def _check_finite(values: torch.Tensor, name: str, bound: float | None = None):
    """Refuses non-finite values (and, with `bound`, values outside [-bound, bound]) with an error naming `name`:
    they would not fail, but silently give garbage."""
    if not torch.isfinite(values).all():
        raise ValueError(f"{name} hold NaN or infinite values.")
    if bound is not None and values.numel() and values.abs().max() > bound:
        raise ValueError(
            f"{name} must lie in [-1, 1] (images normalised by TransfusionImageProcessor), got values in "
            f"[{values.min().item():.3g}, {values.max().item():.3g}]."
        )


# Images from the processor lie in [-1, 1]; the margin allows for rounding in a user's own normalisation.
PIXEL_BOUND = 1.01

PATCH_ENCODERS = {"linear": TransfusionLinearPatchEncoder, "unet": TransfusionUNetPatchEncoder}
PATCH_DECODERS = {"linear": TransfusionLinearPatchDecoder, "unet": TransfusionUNetPatchDecoder}


# Checkpoints are saved with the parameter names of the composed modules (`model.language_model.*`, `model.vae.*`, ...,
# `lm_head.*`). Two older layouts load through transformers' key renaming: a plain `*ForCausalLM` (`model.*` is the
# backbone, `lm_head.*` its head), so that a pretrained LLM loads straight in, and checkpoints of modeling_transfusion
# before the composition (that layout plus `patch_encoder.*`, `patch_decoder.*`, `vae.*` beside the backbone).
register_checkpoint_conversion_mapping(
    TransfusionConfig.model_type,
    [
        # Names already in the composed layout (PEFT adapters are saved so) are left as they are.
        WeightRenaming(
            source_patterns="^model.(?!language_model.|patch_encoder.|patch_decoder.|vae.)",
            target_patterns="model.language_model.",
        ),
        WeightRenaming(source_patterns="^patch_encoder.", target_patterns="model.patch_encoder."),
        WeightRenaming(source_patterns="^patch_decoder.", target_patterns="model.patch_decoder."),
        WeightRenaming(source_patterns="^vae.", target_patterns="model.vae."),
    ],
    overwrite=True,
)


def _check_vae_weights(name: str, vae: AutoencoderKL, missing_keys: list[str], source) -> None:
    """Refuses a checkpoint that holds only some of the VAE's weights: a frozen VAE is never trained, so a missing
    weight cannot be initialised (it would also come in the dtype of the rest of the model). A checkpoint without any
    VAE weight (a plain LLM, see `transfusion-convert from-llm --vae`) is loaded as it is."""
    missing = sorted(key for key in missing_keys if key.startswith(f"{name}."))
    total = len(vae.state_dict())
    if 0 < len(missing) < total:
        names = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise ValueError(
            f"The checkpoint {source} lacks {len(missing)} of the {total} weights of its VAE ({names}): the VAE is "
            "frozen and never trained, so missing weights cannot be initialised. Copy the checkpoint again, or put a "
            "whole VAE in with `transfusion-convert from-vae`."
        )


class TransfusionPreTrainedModel(PreTrainedModel):
    config: TransfusionConfig
    base_model_prefix = "model"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flex_attn = True
    # Flash-attention kernels cannot express bidirectional attention inside an image: they would silently go causal.
    _supports_flash_attn = False
    _can_compile_fullgraph = False
    _keep_in_fp32_modules_strict = ["vae"]
    # The diffusion term is a mean over images, so Trainer must average micro-batches itself under accumulation.
    accepts_loss_kwargs = False

    def _check_and_adjust_attn_implementation(self, attn_implementation, *args, **kwargs):
        # Private hook (listed in tests/test_private_api.py): transformers' own refusal would invite adding support.
        if isinstance(attn_implementation, str) and "flash" in attn_implementation:
            raise ValueError(
                f"attn_implementation={attn_implementation!r} cannot express Transfusion's mask (bidirectional inside "
                "each image, causal elsewhere): use 'sdpa' (default), 'eager' or 'flex_attention'."
            )
        return super()._check_and_adjust_attn_implementation(attn_implementation, *args, **kwargs)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """As `PreTrainedModel.save_pretrained`, but never over another model, and in one step: reloading gives
        exactly the saved weights, and a killed save leaves the old checkpoint whole. A new save id goes into the
        config and every weights file, so that a load never mixes two saves (see `saving_transfusion`). The weights
        keep the names of the composed modules (see the key renaming above)."""
        if check_save_directory(save_directory):
            logger.warning(
                f"Replacing the Transfusion checkpoint in {save_directory}: its config and weights are replaced, its "
                "other files are kept."
            )
        kwargs.setdefault("save_original_format", False)
        self.config.save_id = new_save_id()
        return save_atomically(save_directory, super().save_pretrained, *args, save_id=self.config.save_id, **kwargs)

    def _upload_modified_files(self, working_dir, *args, **kwargs):
        # Private hook (tests/test_private_api.py): `save_pretrained(push_to_hub=True)` uploads the files it just wrote;
        # they go up with their save id, as they are kept on disk, so that a clone of the repository loads.
        stamp_weights(working_dir, self.config.save_id)
        return super()._upload_modified_files(working_dir, *args, **kwargs)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """As `PreTrainedModel.from_pretrained`, with these guarantees: from a local folder, the config and weights of
        one save (a folder being saved into by another process is loaded again; files of two saves are refused, see
        `saving_transfusion`); truncated or corrupt weights, and a VAE that lacks some of its weights, are refused
        with an error naming them; the VAE stays frozen (loading re-creates its parameters as trainable); and CPU
        weights are copied out of the memory-mapped safetensors file, so that the model no longer depends on the file
        (which the user may overwrite) and computes bit-identically to the model that saved it."""
        source = args[0] if args else kwargs.get("pretrained_model_name_or_path")
        folder = None if source is None else Path(source, kwargs.get("subfolder") or "")
        if folder is not None and not folder.is_dir():
            folder = None  # a Hub repository: each of its revisions is one save
        wants_loading_info = kwargs.pop("output_loading_info", False)
        load = functools.partial(super().from_pretrained, *args, output_loading_info=True, **kwargs)
        # AutoModel reads the config from the folder before it calls this: the weights must be of that config's save.
        config = kwargs.get("config")
        read_here = getattr(config, "name_or_path", None) == str(source)
        config_save_id = getattr(config, "save_id", None) if read_here else None
        try:
            model, loading_info = load() if folder is None else load_one_save(folder, load, config_save_id)
        except (SafetensorError, RuntimeError) as error:
            # A file that shrank while it was mapped gives torch's RuntimeError ("smaller than the required mapping
            # size") rather than safetensors' error: both are a truncated file.
            if isinstance(error, RuntimeError) and not (folder is not None and broken_weights(folder)):
                raise
            raise ValueError(
                f"The safetensors weights of {source} are truncated or corrupt ({error}); save or copy the checkpoint "
                "again."
            ) from error
        for name, module in model.named_modules():
            if isinstance(module, AutoencoderKL):
                module.requires_grad_(False)
                _check_vae_weights(name, module, loading_info["missing_keys"], source)
        with torch.no_grad():
            for tensor in (*model.parameters(), *model.buffers()):
                if tensor.device.type == "cpu":
                    tensor.data = tensor.data.clone()
        return (model, loading_info) if wants_loading_info else model

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        # On the layer itself: transformers skips the init of a module of remote code that has no parameters of its
        # own (the patch decoder), so a rule for the decoder would never run.
        if isinstance(module, TransfusionZeroInitLinear):
            nn.init.zeros_(module.weight)
            nn.init.zeros_(module.bias)

    @torch.no_grad()
    def initialize_weights(self):
        super().initialize_weights()
        # The image experts live inside the backbone, which transformers initialises by the backbone's own rules: they
        # know neither low-rank experts nor the image tokens' rows. (Weights loaded from a checkpoint are skipped.)
        std = getattr(self.config.get_text_config(), "initializer_range", 0.02)
        for module in self.modules():
            if isinstance(module, TransfusionLowRankExpert):
                module.reset_parameters()
            if isinstance(getattr(module, "image_tokens_weight", None), nn.Parameter):
                init.normal_(module.image_tokens_weight, mean=0.0, std=std)


class TransfusionModel(TransfusionPreTrainedModel):
    """
    The Transfusion transformer without the LM head: the text backbone (`language_model`, any Hugging Face decoder,
    with image twins of its per-token modules when `config.modality_experts` is on), the patch encoder and decoder,
    the optional 2-D patch positions, and the frozen VAE. It returns the backbone's hidden states and the diffusion
    prediction for every image.
    """

    def __init__(self, config: TransfusionConfig):
        super().__init__(config)
        self.language_model = AutoModel.from_config(config.text_config)
        # Modality experts (experts_transfusion.py): the routing that the backbone's routed modules read.
        self.modality_routing = None
        if config.modality_experts:
            self.modality_routing = add_image_experts(self.language_model, config.modality_experts_rank)
            add_image_token_rows(self.language_model.get_input_embeddings(), config.image_token_ids)
        self.patch_encoder = PATCH_ENCODERS[config.patch_encoder](config)
        self.patch_decoder = PATCH_DECODERS[config.patch_encoder](config)
        self.patch_position_embedding = (
            TransfusionPatchPositionEmbedding(config) if config.image_position_embedding == "learned_2d" else None
        )
        self.vae = AutoencoderKL.from_config(config.vae_config).requires_grad_(False) if config.vae_config else None
        with torch.device("cpu"):  # from_pretrained builds modules on the meta device; the schedule is data
            self.noise_scheduler = noise_scheduler_from_config(config)
        self.post_init()

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        if self.modality_routing is not None:
            _keep_image_token_rows(self.language_model.get_input_embeddings(), value)
        self.language_model.set_input_embeddings(value)

    def _routing_kwargs(self, image_slots: torch.BoolTensor | None) -> dict:
        """The keyword that routes the backbone's per-token modules (modality experts only)."""
        return {} if self.modality_routing is None else {ROUTING_KWARG: image_slots}

    def train(self, mode: bool = True):
        super().train(mode)
        if self.vae is not None:
            self.vae.eval()  # frozen: never in training mode
        return self

    # Images <-> latents

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Encodes images in [-1, 1] of one size, `(num_images, num_channels, height, width)`, into scaled latents
        `(num_images, latent_channels, height / f, width / f)` (the VAE's mode, `f` its downsampling; the identity
        without a VAE). Heights and widths follow `config.check_image_size`."""
        channels = self.config.num_channels
        if pixel_values.dim() != 4 or pixel_values.shape[1] != channels:
            raise ValueError(
                f"pixel_values must have shape (num_images, {channels}, height, width), got "
                f"{tuple(pixel_values.shape)}. Prepare images with the processor."
            )
        self.config.check_image_size(*pixel_values.shape[2:], name="pixel_values of size")
        _check_finite(pixel_values, "pixel_values", bound=PIXEL_BOUND)
        if self.vae is None:
            return pixel_values
        vae = self.vae
        latents = vae.encode(pixel_values.to(vae.dtype)).latent_dist.mode()
        shift = vae.config.shift_factor or 0.0
        return (latents - shift) * vae.config.scaling_factor

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Inverse of [`~TransfusionModel.encode_images`]: scaled latents to images in (about) [-1, 1]."""
        if self.vae is None:
            return latents
        vae = self.vae
        shift = vae.config.shift_factor or 0.0
        return vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor + shift).sample

    def get_image_latents(
        self,
        pixel_values: torch.Tensor | list[torch.Tensor] | None = None,
        image_latents: torch.Tensor | list[torch.Tensor] | None = None,
        image_sizes: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """The clean latent of every image, `(latent_channels, height / f, width / f)` each, from `pixel_values`
        (encoded by the VAE, images of one size at a time) or from precomputed `image_latents`.

        Images of different sizes come as a list of `(channels, height, width)` tensors, or as one tensor padded to the
        largest height and width with `image_sizes` `(num_images, 2)` giving each image's own size in pixels (as
        `TransfusionProcessor` returns them)."""
        images = pixel_values if pixel_values is not None else image_latents
        if images is None:
            return []
        scale = 1 if pixel_values is not None else self.config.vae_downsample_factor
        name = "pixel_values" if pixel_values is not None else "image_latents"
        images = self._unpad(images, image_sizes, scale, name)
        if image_latents is not None:
            for index, latents in enumerate(images):
                if latents.dim() != 3 or latents.shape[0] != self.config.latent_channels:
                    raise ValueError(
                        f"image_latents must be (num_images, {self.config.latent_channels}, height, width); image "
                        f"{index} has shape {tuple(latents.shape)}."
                    )
                self.config.check_image_size(*(side * scale for side in latents.shape[1:]), f"image {index} of size")
                _check_finite(latents, "image_latents")
            return images
        latents = [None] * len(images)
        for index in indices_by_shape(images):
            encoded = self.encode_images(torch.stack([images[i] for i in index]))
            for i, image_latents in zip(index, encoded):
                latents[i] = image_latents
        return latents

    # Where the images are in the sequence

    def get_placeholder_mask(
        self, input_ids: torch.LongTensor | None, inputs_embeds: torch.FloatTensor
    ) -> torch.BoolTensor:
        """The `(batch_size, sequence_length)` mask of `<image>` slots, read from `input_ids` or, when only
        `inputs_embeds` are given, from the positions holding the `<image>` embedding."""
        if input_ids is not None:
            return input_ids == self.config.image_token_id
        image_token = torch.tensor(self.config.image_token_id, device=inputs_embeds.device)
        return (inputs_embeds == self.get_input_embeddings()(image_token)).all(-1)

    def locate_images(
        self, image_slots: torch.BoolTensor
    ) -> tuple[torch.LongTensor, torch.LongTensor, torch.LongTensor]:
        """Finds every image in a mask of `<image>` slots (see [`~TransfusionModel.get_placeholder_mask`]): each run of
        consecutive slots is one image.

        Returns `(rows, starts, lengths)`, each of shape `(num_images,)`: the batch row, the position of the first
        slot and the number of slots of each image, in reading order (row by row, left to right).
        """
        slot_rows, positions = image_slots.nonzero(as_tuple=True)
        new_run = torch.ones_like(slot_rows, dtype=torch.bool)
        new_run[1:] = (slot_rows[1:] != slot_rows[:-1]) | (positions[1:] != positions[:-1] + 1)
        lengths = torch.bincount(new_run.long().cumsum(0) - 1) if new_run.numel() else positions.new_zeros(0)
        return slot_rows[new_run], positions[new_run], lengths

    def get_attention_mask(
        self,
        inputs_embeds: torch.Tensor,
        image_slots: torch.BoolTensor | None,
        attention_mask: torch.Tensor | None,
        cache: Cache | None,
        position_ids: torch.LongTensor | None,
        unconditional_images: torch.BoolTensor | None = None,
    ):
        """Builds the Transfusion mask with transformers' masking utilities, for the backbone's attention kernel:
        causal over the sequence, bidirectional inside each image (each run of slots), padding and packed documents
        respected. The slots of images flagged in `unconditional_images` see only their own patches (classifier-free
        guidance). A 4D `attention_mask` is taken as already built."""
        if image_slots is None or not image_slots.any():
            image_slots = None
        return self._hybrid_mask(inputs_embeds, image_slots, attention_mask, cache, position_ids, unconditional_images)

    def _hybrid_mask(self, inputs_embeds, image_slots, attention_mask, cache, position_ids, unconditional_images):
        """[`~TransfusionModel.get_attention_mask`] for a slot mask with at least one slot, or `None`."""
        if (attention_mask is not None and attention_mask.dim() == 4) or image_slots is None:
            return attention_mask  # prebuilt, or text only: the backbone builds its own causal mask from it
        text_config = self.language_model.config
        if image_slots.all() and "sliding_attention" not in (getattr(text_config, "layer_types", None) or []):
            # One image per row and nothing else (a denoising step, or the commit of clean images).
            return self._image_step_mask(inputs_embeds, attention_mask, cache, unconditional_images)
        past_length = cache.get_seq_length() if cache is not None else 0
        mask_kwargs = {
            "config": text_config,
            "inputs_embeds": inputs_embeds,
            "attention_mask": attention_mask,
            "cache": cache,
            "position_ids": position_ids,
        }
        rows, starts, lengths = self.locate_images(image_slots)
        # `block_sequence_ids`: k on the slots of image k, -1 elsewhere, by absolute position (cached prefix too).
        image_index = torch.repeat_interleave(torch.arange(len(starts), device=starts.device), lengths)
        block_ids = torch.full(inputs_embeds.shape[:2], -1, dtype=torch.long, device=starts.device)
        block_ids[image_slots] = image_index  # nonzero order is reading order
        block_ids = nn.functional.pad(block_ids, (past_length, 0), value=-1)
        mask_kwargs["block_sequence_ids"] = block_ids
        if unconditional_images is not None and unconditional_images.any():
            # Slots of a dropped image see only that image: even its <boi> carries the caption in deeper layers.
            image_of = block_ids.clamp(min=0)
            dropped = (block_ids >= 0) & unconditional_images.to(block_ids.device)[image_of]
            image_start = (starts + past_length)[image_of]
            first_visible = torch.where(dropped, image_start, torch.zeros_like(block_ids))  # absolute positions
            mask_kwargs["and_mask_function"] = lambda b, h, q, kv: kv >= first_visible[b, q]
        mask = create_causal_mask(**mask_kwargs)
        if "sliding_attention" not in (getattr(text_config, "layer_types", None) or []):
            return mask
        return {"full_attention": mask, "sliding_attention": create_sliding_window_causal_mask(**mask_kwargs)}

    def _image_step_mask(self, inputs_embeds, attention_mask, cache, unconditional_images):
        """The mask of a forward whose queries are one image per row: every slot sees its row's keys, cached and new,
        except padding, and the slots of `unconditional_images` see only their own image. Both are key masks, so
        transformers builds it from a 2D mask without per-element mask functions. Where the kernel needs none (sdpa,
        eager, nothing hidden) the result is a `(1, 1, 1, 1)` mask that masks nothing: from `None` the backbone would
        build a causal mask."""
        text_config = self.language_model.config
        if unconditional_images is not None and unconditional_images.any():
            past_length = cache.get_seq_length() if cache is not None else 0
            if attention_mask is None:
                batch_size, length = inputs_embeds.shape[:2]
                attention_mask = torch.ones(batch_size, past_length + length, dtype=torch.long)
            attention_mask = attention_mask.to(device=inputs_embeds.device, copy=True)
            # Even the <boi>: in deeper layers it carries the caption.
            attention_mask[unconditional_images.to(attention_mask.device), :past_length] = 0
        mask = create_bidirectional_mask(text_config, inputs_embeds, attention_mask, cache=cache)
        if mask is None:
            if text_config._attn_implementation == "sdpa":
                return torch.ones((1, 1, 1, 1), dtype=torch.bool, device=inputs_embeds.device)
            return torch.zeros((1, 1, 1, 1), dtype=inputs_embeds.dtype, device=inputs_embeds.device)  # additive
        return mask

    # The image encoder (clean images -> slot embeddings, the VLM convention) and the diffusion step (latents at a
    # timestep -> slot embeddings; slot outputs -> prediction)

    @can_return_tuple
    def get_image_features(
        self,
        pixel_values: torch.FloatTensor | list[torch.FloatTensor],
        image_sizes: torch.LongTensor | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling:
        r"""
        Encodes clean images as the backbone reads them: VAE, then the patch encoder at timestep 0 (with the 2-D patch
        positions when the config has them). `pixel_values` and `image_sizes` are taken as in `forward`.

        Returns a `BaseModelOutputWithPooling` (a tuple with `return_dict=False`):
            last_hidden_state (`torch.FloatTensor` of shape `(num_images, num_slots, hidden_size)`): the embeddings each
                image puts in its `<image>` slots, in raster order; images of fewer slots are padded with zeros.
            pooler_output (`torch.FloatTensor` of shape `(num_images, hidden_size)`): the mean of each image's slots.
            hidden_states (`tuple(torch.FloatTensor)`, with `output_hidden_states=True`): the patch encoder's states,
                each with one row per image (zero-padded to the largest image): the patches and their projection for
                the linear encoder; the input convolution and each down block's output for the U-Net. No encoder has
                attention, so there are no attentions.
        """
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        latents = self.get_image_latents(pixel_values=pixel_values, image_sizes=image_sizes)
        if not latents:
            raise ValueError("get_image_features needs pixel_values holding at least one image.")
        groups = []
        for index in indices_by_shape(latents):
            group = torch.stack([latents[i] for i in index])
            timesteps = torch.zeros(len(index), dtype=torch.long, device=group.device)
            embeddings, _, hidden_states = self._encode_latents(group, timesteps)
            groups.append((torch.tensor(index, device=group.device), embeddings, hidden_states))
        num_images = len(latents)
        hidden_states = None
        if output_hidden_states:
            hidden_states = tuple(
                _merge_groups([(index, states[level]) for index, _, states in groups], num_images)
                for level in range(len(groups[0][2]))
            )
        return BaseModelOutputWithPooling(
            last_hidden_state=_merge_groups([(index, embeddings) for index, embeddings, _ in groups], num_images),
            pooler_output=_merge_groups([(index, embeddings.mean(1)) for index, embeddings, _ in groups], num_images),
            hidden_states=hidden_states,
        )

    def embed_timesteps(self, timesteps: torch.Tensor) -> torch.Tensor:
        """The patch encoder's embedding `(num_timesteps, embedding_dim)` of `timesteps` `(num_timesteps,)`, which
        [`~TransfusionModel.embed_latents`] takes precomputed: a sampler embeds all its timesteps in one call."""
        time_embedding = self.patch_encoder.time_embedding
        return time_embedding(timesteps, time_embedding.time_mlp.linear_1.weight.dtype)

    def embed_latents(
        self, latents: torch.Tensor, timesteps: torch.Tensor, time_embedding: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, TransfusionUNetState | None]:
        """The diffusion step's input: embeds latents of one size `(num_images, latent_channels, latent_height,
        latent_width)` that are at `timesteps` `(num_images,)` into the `(num_images, num_slots, hidden_size)`
        embeddings of their slots (patches in raster order, with their 2-D positions when the config has them). Also
        returns what the patch decoder needs from the encoder (the U-Net's skips; `None` for the linear encoder).
        `time_embedding` is [`~TransfusionModel.embed_timesteps`] of `timesteps`, when already computed."""
        embeddings, encoder_state, _ = self._encode_latents(latents, timesteps, time_embedding)
        return embeddings, encoder_state

    def _encode_latents(self, latents: torch.Tensor, timesteps: torch.Tensor, time_embedding=None):
        """[`~TransfusionModel.embed_latents`] plus the patch encoder's hidden states."""
        embeddings, encoder_state, hidden_states = self.patch_encoder(latents, timesteps, time_embedding)
        if self.patch_position_embedding is not None:
            embeddings = embeddings + self.patch_position_embedding(self._grid_size(latents)).to(embeddings.dtype)
        return embeddings, encoder_state, hidden_states

    def get_image_prediction(
        self,
        image_hidden_states: torch.Tensor,
        encoder_state: TransfusionUNetState | None,
        grid_size: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """Turns the backbone's outputs at the slots of images of one size, `(num_images, num_slots, hidden_size)`,
        into the latent-shaped prediction `(num_images, latent_channels, latent_height, latent_width)`: noise for
        `ddpm`, velocity for `flow`. `grid_size` is `(rows, columns)` of patches (square by default)."""
        return self.patch_decoder(image_hidden_states, encoder_state, grid_size)

    def denoise_step(
        self,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        cache: Cache,
        position_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        unconditional_images: torch.BoolTensor | None = None,
        time_embedding: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One denoising step of generation: every row of the batch holds one image at `latents`
        `(batch_size, latent_channels, latent_height, latent_width)`, whose slots attend to the row's cached prefix
        (which ends with `<boi>`) and to each other. Returns the prediction; the cache is left as it was.

        Args:
            position_ids (`torch.LongTensor` of shape `(batch_size, num_slots)`): positions of the slots.
            attention_mask (`torch.Tensor`, *optional*): the 2D padding mask of prefix and slots
                `(batch_size, cache_length + num_slots)`, or the 4D mask that
                [`~TransfusionModel.get_attention_mask`] built for them (the same for every step of an image).
            time_embedding (`torch.Tensor`, *optional*): [`~TransfusionModel.embed_timesteps`] of `timesteps`.
        """
        embeds, encoder_state = self.embed_latents(latents, timesteps, time_embedding)
        embeds = embeds.to(self.get_input_embeddings().weight.dtype)
        slots = torch.ones(embeds.shape[:2], dtype=torch.bool, device=embeds.device)
        if attention_mask is None or attention_mask.dim() != 4:
            attention_mask = self.get_attention_mask(
                embeds, slots, attention_mask, cache, position_ids, unconditional_images
            )
        hidden = self.language_model(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=True,
            **self._routing_kwargs(slots),
        ).last_hidden_state
        cache.crop(-embeds.shape[1])
        return self.get_image_prediction(hidden, encoder_state, self._grid_size(latents))

    def _check_text_inputs(self, input_ids, attention_mask, cache):
        """Turns the mistakes that would otherwise fail deep inside torch into errors that say what is wrong."""
        if input_ids is None:
            return
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(
                f"input_ids must be integer ids of shape (batch_size, sequence_length), got a {input_ids.dtype} "
                f"tensor of shape {tuple(input_ids.shape)}."
            )
        vocab_size = self.get_input_embeddings().num_embeddings
        low, high = torch.aminmax(input_ids) if input_ids.numel() else (0, 0)  # one pass: this runs for every token
        if low < 0 or high >= vocab_size:
            raise ValueError(
                f"input_ids hold ids outside the vocabulary [0, {vocab_size}): min {int(low)}, max {int(high)}. Was "
                "the tokenizer extended without `model.resize_token_embeddings`?"
            )
        if attention_mask is not None and attention_mask.dim() == 2:
            past_length = cache.get_seq_length() if cache is not None else 0
            expected = (input_ids.shape[0], past_length + input_ids.shape[1])
            if tuple(attention_mask.shape) != expected:
                raise ValueError(
                    f"attention_mask has shape {tuple(attention_mask.shape)}, expected {expected} (batch size, cached "
                    "plus new tokens)."
                )

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        pixel_values: torch.FloatTensor | list[torch.FloatTensor] | None = None,
        image_latents: torch.FloatTensor | list[torch.FloatTensor] | None = None,
        image_sizes: torch.LongTensor | None = None,
        image_timesteps: torch.Tensor | None = None,
        image_noise: torch.FloatTensor | list[torch.FloatTensor] | None = None,
        unconditional_images: torch.BoolTensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> TransfusionModelOutputWithPast:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(num_images, num_channels, height, width)`, *optional*):
            Images in [-1, 1] (see `TransfusionImageProcessor`), one per run of `<image>` slots, in reading order.
            Images of different sizes: padded to the largest height and width, with `image_sizes`; or a list of
            `(num_channels, height, width)` tensors.
        image_latents (`torch.FloatTensor` of shape `(num_images, latent_channels, latent_height, latent_width)`):
            Optional. Precomputed clean latents (`model.encode_images(pixel_values)`), instead of `pixel_values`;
            padded or a list as `pixel_values`.
        image_sizes (`torch.LongTensor` of shape `(num_images, 2)`, *optional*):
            Height and width in pixels of each image, when `pixel_values` / `image_latents` are padded.
        image_timesteps (`torch.Tensor` of shape `(num_images,)`, *optional*):
            Timestep of each image; 0 (clean) when not given.
        image_noise (`torch.FloatTensor`, laid out as the latents, *optional*):
            Noise added to the latents; drawn from a standard normal when not given and some timestep is not 0.
            Images at timestep 0 stay clean and carry no diffusion loss.
        unconditional_images (`torch.BoolTensor` of shape `(num_images,)`, *optional*):
            Images whose slots see only their own patches (the unconditional branch of guidance).

        Each image occupies `rows x columns` slots, its patches in raster order: `(height / s) x (width / s)` with
        `s = config.image_size_divisor`.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        if pixel_values is not None and image_latents is not None:
            raise ValueError("Pass only one of pixel_values and image_latents.")
        self._check_text_inputs(input_ids, attention_mask, cache)
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)

        image_slots = self.get_placeholder_mask(input_ids, inputs_embeds)
        latents = self.get_image_latents(pixel_values, image_latents, image_sizes)
        num_images = 0
        if latents or image_slots.any():  # a text decoding step has no image to locate
            rows, starts, lengths = self.locate_images(image_slots)
            num_images = rows.numel()
        if len(latents) != num_images:
            raise ValueError(
                f"The inputs hold {num_images} image(s) (runs of <image> slots) but {len(latents)} image(s) were "
                "passed in pixel_values / image_latents."
            )

        diffusion_prediction = diffusion_target = None
        if num_images:
            grids = self._check_image_slots(latents, lengths)
            device = latents[0].device
            if image_timesteps is None:
                image_timesteps = torch.zeros(num_images, dtype=torch.long, device=device)
            image_timesteps = image_timesteps.to(device)
            if image_timesteps.shape != (num_images,):
                raise ValueError(
                    f"image_timesteps must have shape ({num_images},), got {tuple(image_timesteps.shape)}."
                )
            noise = None
            if image_noise is not None:
                noise = self._unpad(image_noise, image_sizes, self.config.vae_downsample_factor, "image_noise")
            draw_noise = image_noise is None and bool((image_timesteps != 0).any())
            # Images of one size go through the patch encoder and decoder together.
            inputs_embeds = inputs_embeds.clone()
            groups = []
            for index in indices_by_shape(latents):
                index = torch.tensor(index, device=device)
                group = torch.stack([latents[i] for i in index.tolist()])
                timesteps = image_timesteps[index]
                group_noise = torch.stack([noise[i] for i in index.tolist()]) if noise is not None else None
                if draw_noise:
                    group_noise = torch.randn_like(group)
                noisy, target = group, None
                if group_noise is not None:
                    noisy, target = noise_latents(self.noise_scheduler, group, group_noise, timesteps)
                    # Timestep 0 means clean whatever the other images of the batch are noised to.
                    noisy = torch.where((timesteps == 0).view(-1, 1, 1, 1), group, noisy)
                embeds, encoder_state = self.embed_latents(noisy, timesteps)
                slots = starts[index, None] + torch.arange(embeds.shape[1], device=device)
                inputs_embeds[rows[index, None], slots] = embeds.to(inputs_embeds.dtype)
                groups.append((index, slots, encoder_state, target, grids[index[0]]))

        mask = self._hybrid_mask(
            inputs_embeds,
            image_slots if num_images else None,
            attention_mask,
            cache,
            position_ids,
            unconditional_images,
        )
        outputs = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            **self._routing_kwargs(image_slots),
            **kwargs,
        )
        sizes = None
        if num_images:
            predictions, targets = [], []
            for index, slots, encoder_state, target, grid_size in groups:
                hidden = outputs.last_hidden_state[rows[index, None], slots]  # [group, num_slots, hidden_size]
                predictions.append((index, self.get_image_prediction(hidden, encoder_state, grid_size)))
                targets.append((index, target))
            diffusion_prediction = _merge_groups(predictions, num_images)
            if targets[0][1] is not None:
                diffusion_target = _merge_groups(targets, num_images)
            factor = self.config.vae_downsample_factor
            sizes = torch.tensor([[side * factor for side in x.shape[1:]] for x in latents], device=device)
        return TransfusionModelOutputWithPast(
            last_hidden_state=outputs.last_hidden_state,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            diffusion_prediction=diffusion_prediction,
            diffusion_target=diffusion_target,
            image_timesteps=image_timesteps,
            image_sizes=sizes,
        )

    def _check_image_slots(self, latents: list[torch.Tensor], lengths: torch.LongTensor) -> list[tuple[int, int]]:
        """The patch grid of each image, checking that its run of slots has its number of patches."""
        grids = []
        factor = self.config.vae_downsample_factor
        for index, (image_latents, length) in enumerate(zip(latents, lengths.tolist())):
            grid = self._grid_size(image_latents)
            if grid[0] * grid[1] != length:
                height, width = (side * factor for side in image_latents.shape[1:])
                raise ValueError(
                    f"Image {index} occupies {length} <image> slots, but an image of {height}x{width} pixels needs "
                    f"{grid[0] * grid[1]} ({grid[0]} x {grid[1]} patches). Build inputs with TransfusionProcessor, "
                    "which expands each image marker to the slots of that image's size."
                )
            grids.append(grid)
        return grids

    def _grid_size(self, latents: torch.Tensor) -> tuple[int, int]:
        """Patch rows and columns of latents `(..., latent_height, latent_width)`."""
        return latents.shape[-2] // self.config.patch_size, latents.shape[-1] // self.config.patch_size

    def _unpad(self, images, image_sizes, scale: int, name: str) -> list[torch.Tensor]:
        """Each image of `images` (a list of `(channels, height, width)` tensors, or a padded 4-d tensor) at its own
        size: `image_sizes` (in pixels) divided by `scale`, or the tensor's size when `image_sizes` is not given."""
        is_list = isinstance(images, list | tuple)
        if is_list:
            for index, image in enumerate(images):
                if not isinstance(image, torch.Tensor) or image.dim() != 3:
                    raise ValueError(f"{name}[{index}] must be a (channels, height, width) tensor.")
        elif not isinstance(images, torch.Tensor) or images.dim() != 4:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(
                f"{name} must be (num_images, channels, height, width), or a list of (channels, height, width) "
                f"tensors; got {shape}."
            )
        if image_sizes is None:
            return list(images)
        image_sizes = torch.as_tensor(image_sizes)
        if tuple(image_sizes.shape) != (len(images), 2):
            raise ValueError(
                f"image_sizes must have shape ({len(images)}, 2) (height and width of each image), got "
                f"{tuple(image_sizes.shape)}."
            )
        if is_list:
            sizes = [tuple(size) for size in image_sizes.tolist()]
            actual = [(image.shape[1] * scale, image.shape[2] * scale) for image in images]
            if sizes != actual:
                raise ValueError(
                    f"image_sizes {sizes} do not match the sizes of the {name} list {actual} (in pixels); a list "
                    "needs no image_sizes."
                )
            return list(images)
        unpadded = []
        for index, (image, (height, width)) in enumerate(zip(images, image_sizes.tolist())):
            self.config.check_image_size(height, width, f"image_sizes[{index}] =")
            if height // scale > image.shape[1] or width // scale > image.shape[2]:
                raise ValueError(
                    f"image_sizes[{index}] = {height}x{width} is larger than {name} ({images.shape[2] * scale}x"
                    f"{images.shape[3] * scale} pixels)."
                )
            unpadded.append(image[:, : height // scale, : width // scale])
        return unpadded


def _merge_groups(groups: list[tuple[torch.Tensor, torch.Tensor]], num_images: int) -> torch.Tensor:
    """Per-group results `(index, (group, ...))` back in image order, in one tensor padded with zeros to the largest
    size along every dimension."""
    if len(groups) == 1:
        return groups[0][1]
    first = groups[0][1]
    sizes = [max(values.shape[dim] for _, values in groups) for dim in range(1, first.dim())]
    merged = first.new_zeros(num_images, *sizes)
    for index, values in groups:
        merged[(index, *(slice(0, size) for size in values.shape[1:]))] = values
    return merged


def _keep_image_token_rows(previous: nn.Module, new: nn.Module) -> None:
    """Moves the image tokens' own rows to a module that replaces `previous` (e.g. in `resize_token_embeddings`)."""
    if not hasattr(new, "image_tokens_weight"):
        add_image_token_rows(new, previous.image_token_ids)
        new.image_tokens_weight = previous.image_tokens_weight


class TransfusionForConditionalGeneration(TransfusionPreTrainedModel, TransfusionGenerationMixin):
    """
    Transfusion with its LM head: computes the paper's loss `lm_loss + diffusion_loss_weight * diffusion_loss` and
    generates text and images. Holds the [`TransfusionModel`] as `model` and the LM head as `lm_head`.

    A pretrained LLM loads straight into it: `TransfusionForConditionalGeneration.from_pretrained(llm_dir,
    config=transfusion_config)` maps the LLM's `model.*` onto `model.language_model.*` and keeps its `lm_head`; LoRA
    targets keep their usual names (`q_proj`, `v_proj`, ...).
    """

    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}
    # The backbone's plan shards the input embedding along the vocabulary; the head is sharded the same way, so that
    # tied weights stay one tensor (as in transformers' causal LMs).
    _tp_plan = {"lm_head": "colwise_gather_output"}
    output_modalities = ("image", "text")

    def __init__(self, config: TransfusionConfig):
        super().__init__(config)
        self.model = TransfusionModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        if config.modality_experts:
            add_image_token_rows(self.lm_head, config.image_token_ids)
            # Tied like the matrices they stand in for (the tie applies only when `tie_word_embeddings`).
            self._tied_weights_keys = {
                **self._tied_weights_keys,
                "lm_head.image_tokens_weight": "model.language_model.embed_tokens.image_tokens_weight",
            }
        self.post_init()

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.model.set_input_embeddings(value)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """As [`TransfusionPreTrainedModel.save_pretrained`], with the model's code as remote code: the files of this
        package the model needs are copied next to the weights, and `auto_map` in `config.json` names this class for
        every Auto class in `MODEL_AUTO_CLASSES`. The folder (or `push_to_hub`, which saves through this) then loads
        with `trust_remote_code=True` where this package is not installed; the processor's `save_pretrained` does
        the same for the processor."""
        model_class = f"{type(self).__module__.rsplit('.', 1)[-1]}.{type(self).__name__}"
        auto_map = getattr(self.config, "auto_map", None) or {}
        self.config.auto_map = {**auto_map, **dict.fromkeys(MODEL_AUTO_CLASSES, model_class)}
        return super().save_pretrained(save_directory, *args, **kwargs)

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        if self.config.modality_experts:
            _keep_image_token_rows(self.lm_head, new_embeddings)
        self.lm_head = new_embeddings

    def freeze_text_path(self) -> "TransfusionForConditionalGeneration":
        """With modality experts: stops the gradients of everything text uses (the embeddings, the text weights of
        every layer, the final text norm, the LM head), so that text-only inputs keep exactly the logits they had. Left
        trainable: the image experts, the rows of `<boi>`, `<eoi>` and `<image>`, the patch encoder and decoder (with
        the timestep embedding) and the 2-D patch positions; the VAE stays frozen. Frozen weights have no gradient, so
        no optimizer (weight decay included) moves them. Returns the model."""
        if not self.config.modality_experts:
            raise ValueError(
                "freeze_text_path() needs a model with modality_experts=True: without experts, text and images share "
                "every weight of the backbone, so freezing the text path would freeze the image path too."
            )
        self.model.language_model.requires_grad_(False)
        self.lm_head.requires_grad_(False)
        for parameter in image_path_parameters(self):
            parameter.requires_grad_(True)
        return self

    @property
    def vae(self) -> AutoencoderKL | None:
        """The frozen autoencoder (`None`: the identity, latents are pixels)."""
        return self.model.vae

    @property
    def noise_scheduler(self):
        """The diffusers scheduler of the training (noising) process."""
        return self.model.noise_scheduler

    def get_image_features(self, pixel_values, image_sizes=None, **kwargs) -> BaseModelOutputWithPooling:
        """See [`TransfusionModel.get_image_features`]."""
        return self.model.get_image_features(pixel_values=pixel_values, image_sizes=image_sizes, **kwargs)

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """See [`TransfusionModel.encode_images`]."""
        return self.model.encode_images(pixel_values)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """See [`TransfusionModel.decode_latents`]."""
        return self.model.decode_latents(latents)

    def sample_image_timesteps(
        self,
        input_ids: torch.LongTensor,
        labels: torch.LongTensor,
        position_ids: torch.LongTensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Draws a training timestep per image. Images followed, in the same document, by text that carries a loss
        (other than end-of-sequence) are capped at `config.max_conditioning_timestep` (the paper's noise limit for
        captioning)."""
        rows, starts, lengths = self.model.locate_images(input_ids == self.config.image_token_id)
        if position_ids is None:
            documents = torch.zeros_like(input_ids)
        else:
            # A packed row restarts its positions at each document.
            restarts = torch.ones_like(input_ids, dtype=torch.bool)
            restarts[:, 1:] = position_ids.expand_as(input_ids)[:, 1:] != position_ids.expand_as(input_ids)[:, :-1] + 1
            documents = restarts.long().cumsum(-1)
        # Only real text counts: an image followed by nothing but <eos> is generated, not captioned.
        supervised = (labels != -100) & ~torch.isin(labels, self._end_of_text_ids(labels.device))
        image_document = documents[rows, starts]
        after_image = torch.arange(input_ids.shape[1], device=input_ids.device)[None] >= (starts + lengths)[:, None]
        same_document = documents[rows] == image_document[:, None]
        capped = (supervised[rows] & after_image & same_document).any(-1)
        return sample_training_timesteps(self.noise_scheduler, capped, self.config.max_conditioning_timestep, generator)

    def _end_of_text_ids(self, device) -> torch.Tensor:
        eos = self.config.text_config.eos_token_id
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        return torch.tensor(eos + [self.config.eoi_token_id, self.config.image_token_id], device=device)

    def text_labels(self, input_ids: torch.LongTensor, labels: torch.LongTensor, attention_mask=None):
        """The labels the LM loss sees: no loss on image slots (as targets), none from image slots (the `<eoi>`
        after the last patch), none on padding."""
        labels = labels.masked_fill(input_ids == self.config.image_token_id, -100)
        from_slot = torch.zeros_like(labels, dtype=torch.bool)
        from_slot[:, 1:] = input_ids[:, :-1] == self.config.image_token_id
        labels = labels.masked_fill(from_slot, -100)
        if attention_mask is not None and attention_mask.dim() == 2:
            labels = labels.masked_fill(attention_mask == 0, -100)
        return labels

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        image_latents: torch.FloatTensor | None = None,
        image_sizes: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        is_first_iteration: bool = False,
        **kwargs,
    ):
        """As `GenerationMixin`'s; the prompt's images (`pixel_values` or `image_latents`, with `image_sizes`) reach
        the forwards that read their `<image>` slots: the one that reads the prompt (after it they are in the cache),
        every forward without a cache, an assistant's first forward, and none when continuing from a cache that holds
        them."""
        model_inputs = super().prepare_inputs_for_generation(
            input_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            is_first_iteration=is_first_iteration,
            **kwargs,
        )
        if pixel_values is not None or image_latents is not None:
            if self.model.get_placeholder_mask(model_inputs["input_ids"], model_inputs.get("inputs_embeds")).any():
                model_inputs["pixel_values"], model_inputs["image_latents"] = pixel_values, image_latents
                model_inputs["image_sizes"] = image_sizes
        return model_inputs

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        pixel_values: torch.FloatTensor | list[torch.FloatTensor] | None = None,
        image_latents: torch.FloatTensor | list[torch.FloatTensor] | None = None,
        image_sizes: torch.LongTensor | None = None,
        image_timesteps: torch.Tensor | None = None,
        image_noise: torch.FloatTensor | list[torch.FloatTensor] | None = None,
        unconditional_images: torch.BoolTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> TransfusionCausalLMOutputWithPast:
        r"""
        labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
            Token ids for the LM loss (usually `input_ids`; -100 to ignore). With labels, each image is noised to a
            random timestep (unless `image_timesteps` is given) and the loss includes the diffusion term. Image
            slots, the `<eoi>` after them and padding never carry LM loss. Pre-shifted `shift_labels` (sequence
            parallelism) are taken as well, with the same positions ignored.
        logits_to_keep (`int` or `torch.Tensor`, *optional*, defaults to 0):
            As in transformers' causal LMs: logits of the last `logits_to_keep` positions only (0: all). The loss does
            not depend on it; with fewer logits kept, it computes the logits of the text targets alone, which saves
            the LM head's work on image slots in training (`logits_to_keep=1`).

        The other arguments are those of [`TransfusionModel.forward`]. In training mode, images drop their condition
        with probability `config.condition_dropout_prob` unless `unconditional_images` is given.
        """
        shift_labels = kwargs.pop("shift_labels", None)
        if labels is not None and input_ids is None:
            raise ValueError("Computing the loss needs input_ids (to tell text from image slots).")
        if labels is not None and labels.shape != input_ids.shape:
            raise ValueError(f"labels have shape {tuple(labels.shape)}, but input_ids {tuple(input_ids.shape)}.")
        if shift_labels is not None and labels is None:
            labels = nn.functional.pad(shift_labels, (1, 0), value=-100)[:, :-1]  # what decides the noise caps
        if labels is not None and (input_ids == self.config.image_token_id).any():
            if image_timesteps is None:
                image_timesteps = self.sample_image_timesteps(input_ids, labels, position_ids)
            if unconditional_images is None and self.training and self.config.condition_dropout_prob > 0:
                num_images = image_timesteps.shape[0]
                unconditional_images = (
                    torch.rand(num_images, device=input_ids.device) < self.config.condition_dropout_prob
                )

        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            pixel_values=pixel_values,
            image_latents=image_latents,
            image_sizes=image_sizes,
            image_timesteps=image_timesteps,
            image_noise=image_noise,
            unconditional_images=unconditional_images,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, slice_indices, :])

        loss = lm_loss = diffusion_loss = None
        if labels is not None:
            shift_labels = self._shift_labels(input_ids, labels, shift_labels, attention_mask)
            if logits.shape[1] == hidden_states.shape[1]:
                lm_loss = self._lm_loss(logits, shift_labels)
            else:
                # Logits of part of the sequence were asked for: the loss computes the text targets' logits alone.
                targeted = shift_labels != -100
                lm_loss = self._lm_loss(self.lm_head(hidden_states[targeted])[None], shift_labels[targeted][None])
            diffusion_loss = lm_loss.new_zeros(())
            if outputs.diffusion_target is not None:
                latent_sizes = outputs.image_sizes // self.config.vae_downsample_factor
                diffusion_loss = diffusion_mse(
                    outputs.diffusion_prediction,
                    outputs.diffusion_target,
                    latent_sizes,
                    noised=outputs.image_timesteps != 0,
                )
            for name, term in (("lm_loss", lm_loss), ("diffusion_loss", diffusion_loss)):
                if not torch.isfinite(term):
                    raise FloatingPointError(
                        f"{name} is not finite ({term.item()}): check the learning rate, the inputs (pixel_values in "
                        "[-1, 1]) and, in half precision, overflow; `loss = lm_loss + diffusion_loss_weight * "
                        "diffusion_loss`."
                    )
            loss = lm_loss + self.config.diffusion_loss_weight * diffusion_loss

        return TransfusionCausalLMOutputWithPast(
            loss=loss,
            lm_loss=lm_loss,
            diffusion_loss=diffusion_loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            diffusion_prediction=outputs.diffusion_prediction,
            diffusion_target=outputs.diffusion_target,
            image_timesteps=outputs.image_timesteps,
            image_sizes=outputs.image_sizes,
        )

    def _shift_labels(self, input_ids, labels, shift_labels, attention_mask) -> torch.LongTensor:
        """Each position's own text target `(batch_size, sequence_length)` (-100: none), from `labels` or from
        pre-shifted `shift_labels`, with the positions `text_labels` ignores ignored."""
        if shift_labels is None:
            labels = self.text_labels(input_ids, labels, attention_mask)
            return nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
        image_token = self.config.image_token_id
        ignored = (input_ids == image_token) | (shift_labels == image_token)
        if attention_mask is not None and attention_mask.dim() == 2:
            ignored |= attention_mask == 0
        return shift_labels.masked_fill(ignored, -100)

    def _lm_loss(self, logits: torch.Tensor, shift_labels: torch.LongTensor) -> torch.Tensor:
        """transformers' causal-LM loss of `logits` against each position's own target (see `_shift_labels`)."""
        if not (shift_labels != -100).any():
            return logits.sum() * 0.0
        vocab_size = self.config.text_config.vocab_size
        return self.loss_function(logits=logits, labels=None, shift_labels=shift_labels, vocab_size=vocab_size)


# `save_pretrained` copies this file and those it imports (relative imports) next to the weights: remote code.
TransfusionForConditionalGeneration.register_for_auto_class("AutoModel")

__all__ = [
    "TransfusionPreTrainedModel",
    "TransfusionModel",
    "TransfusionForConditionalGeneration",
    "patchify",
    "unpatchify",
]
