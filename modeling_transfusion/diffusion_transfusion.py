"""The two diffusion objectives of Transfusion, expressed with diffusers schedulers.

`ddpm` is the paper's: epsilon prediction, cosine schedule, integer timesteps in [0, T). `flow` is rectified flow as
diffusers writes it: `x_t = sigma * noise + (1 - sigma) * x_0` with `sigma = t / T`, timesteps in [1, T], velocity
target `noise - x_0`. Timestep 0 always means a clean image.
"""

import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler, SchedulerMixin

from .configuration_transfusion import TransfusionConfig


def noise_scheduler_from_config(config: TransfusionConfig) -> SchedulerMixin:
    """The scheduler that defines the forward (noising) process the model is trained on."""
    if config.objective == "ddpm":
        return DDPMScheduler(
            num_train_timesteps=config.num_train_timesteps,
            beta_schedule="squaredcos_cap_v2",
            prediction_type="epsilon",
            clip_sample=False,
        )
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=config.num_train_timesteps)


def sample_training_timesteps(
    scheduler: SchedulerMixin,
    capped: torch.BoolTensor,
    max_conditioning_timestep: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draws one timestep per image, uniformly from the scheduler's training table; images flagged in `capped` draw
    only among the timesteps at or below `max_conditioning_timestep`.

    Args:
        capped (`torch.BoolTensor` of shape `(num_images,)`): images that condition text after them.
    Returns:
        A tensor of shape `(num_images,)` with values from `scheduler.timesteps` (integers for `ddpm`, floats for
        `flow`, whose table is `sigma * T`).
    """
    table = scheduler.timesteps.flip(0).to(capped.device)  # ascending
    num_allowed = torch.where(capped, (table <= max_conditioning_timestep).sum(), table.numel()).clamp(min=1)
    uniform = torch.rand(capped.shape, generator=generator, device=capped.device)
    return table[(uniform * num_allowed).long().clamp(max=table.numel() - 1)]


def noise_latents(
    scheduler: SchedulerMixin, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Noises clean `latents` to `timesteps` and returns `(noisy_latents, target)`.

    Shapes: `latents` and `noise` `(num_images, channels, height, width)`; `timesteps` `(num_images,)`.
    """
    if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        # Timestep 0 (sigma 0) is the clean image; the flow table itself starts at sigma = 1 / T.
        noisy, noisy_rows = latents.clone(), timesteps != 0
        if noisy_rows.any():
            noisy[noisy_rows] = scheduler.scale_noise(latents[noisy_rows], timesteps[noisy_rows], noise[noisy_rows])
        return noisy, noise - latents
    return scheduler.add_noise(latents, noise, timesteps.long()), noise


__all__ = ["noise_scheduler_from_config", "sample_training_timesteps", "noise_latents"]
