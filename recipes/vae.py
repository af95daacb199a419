"""A small diffusers `AutoencoderKL`, trained by the project on the same images as the Transfusion model.

No pretrained image autoencoder ships in any registry package, so the recipe trains its own: 32x32 grey images to
8x8x4 latents (three levels, no attention), with a mean squared error plus a small KL term. The scaling factor is set
so that the scaled latents of the training images have unit standard deviation, as the diffusion objective assumes.
"""

import math
import time
from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL


@dataclass
class VAETrainingResult:
    """The trained VAE and what its training measured (reconstruction MSE is on [-1, 1] pixels)."""

    vae: AutoencoderKL
    train_mse: float
    test_mse: float
    scaling_factor: float
    steps: int
    seconds: float


def autoencoder_geometry(num_channels: int, latent_channels: int, block_out_channels: tuple[int, ...]) -> dict:
    """The diffusers arguments the recipe's autoencoders share (the VAE here, the study's VQ model): downsampling by
    `2 ** (len(block_out_channels) - 1)`, one layer per block, no mid-block attention, 32 px images."""
    return {
        "in_channels": num_channels,
        "out_channels": num_channels,
        "down_block_types": ("DownEncoderBlock2D",) * len(block_out_channels),
        "up_block_types": ("UpDecoderBlock2D",) * len(block_out_channels),
        "block_out_channels": tuple(block_out_channels),
        "layers_per_block": 1,
        "latent_channels": latent_channels,
        "norm_num_groups": math.gcd(32, *block_out_channels),
        "sample_size": 32,
        "mid_block_add_attention": False,
    }


def build_vae(
    num_channels: int = 1, latent_channels: int = 4, block_out_channels: tuple[int, ...] = (32, 64, 64)
) -> AutoencoderKL:
    """An `AutoencoderKL` that downsamples by `2 ** (len(block_out_channels) - 1)` with no mid-block attention."""
    return AutoencoderKL(**autoencoder_geometry(num_channels, latent_channels, block_out_channels))


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, pixels: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Unscaled latent means `(n, latent_channels, h / f, w / f)` of images `(n, c, h, w)` in [-1, 1]."""
    vae.eval()
    chunks = [vae.encode(pixels[i : i + batch_size]).latent_dist.mode() for i in range(0, len(pixels), batch_size)]
    return torch.cat(chunks)


@torch.no_grad()
def reconstruction_mse(vae: AutoencoderKL, pixels: torch.Tensor, batch_size: int = 256) -> float:
    """Mean squared error, on [-1, 1] pixels, of decoding the latent mean of each image."""
    vae.eval()
    total = 0.0
    for i in range(0, len(pixels), batch_size):
        batch = pixels[i : i + batch_size]
        decoded = vae.decode(vae.encode(batch).latent_dist.mode()).sample
        total += float(((decoded - batch) ** 2).mean()) * len(batch)
    return total / len(pixels)


def train_vae(
    train_pixels: torch.Tensor,
    test_pixels: torch.Tensor,
    steps: int = 1500,
    batch_size: int = 64,
    learning_rate: float = 2e-3,
    kl_weight: float = 1e-6,
    latent_channels: int = 4,
    block_out_channels: tuple[int, ...] = (32, 64, 64),
    seed: int = 0,
    log_every: int = 100,
) -> VAETrainingResult:
    """Trains a VAE on images `(n, c, h, w)` in [-1, 1] with AdamW (warm-up, cosine decay) and sets its
    `shift_factor` and `scaling_factor` to the mean and `1 / std` of the training latents.

    Deterministic for a given seed and thread count. Reports reconstruction MSE on up to 2,000 train and test images.
    """
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    vae = build_vae(train_pixels.shape[1], latent_channels, block_out_channels)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=learning_rate, betas=(0.9, 0.95), weight_decay=0.0)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps)),
    )
    start = time.perf_counter()
    vae.train()
    for step in range(steps):
        index = torch.randint(0, len(train_pixels), (batch_size,), generator=generator)
        batch = train_pixels[index]
        posterior = vae.encode(batch).latent_dist
        latents = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        decoded = vae.decode(latents).sample
        mse = ((decoded - batch) ** 2).mean()
        kl = posterior.kl().mean() / batch[0].numel()
        loss = mse + kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if log_every and (step + 1) % log_every == 0:
            print(
                f"vae step {step + 1}/{steps} mse {mse.item():.5f} kl {kl.item():.3f} "
                f"({time.perf_counter() - start:.0f} s)",
                flush=True,
            )
    seconds = time.perf_counter() - start
    vae.eval()
    latents = encode_latents(vae, train_pixels[:5000])
    shift_factor, scaling_factor = float(latents.mean()), float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=scaling_factor, shift_factor=shift_factor)
    return VAETrainingResult(
        vae=vae,
        train_mse=reconstruction_mse(vae, train_pixels[:2000]),
        test_mse=reconstruction_mse(vae, test_pixels[:2000]),
        scaling_factor=scaling_factor,
        steps=steps,
        seconds=seconds,
    )


__all__ = [
    "VAETrainingResult",
    "autoencoder_geometry",
    "build_vae",
    "encode_latents",
    "reconstruction_mse",
    "train_vae",
]
