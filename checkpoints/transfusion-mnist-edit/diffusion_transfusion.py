"""Diffusion in Transfusion, expressed with diffusers schedulers: the two training objectives, the timestep draw with
the paper's noise cap, the diffusion loss, and the schedulers that sample a trained model.

`ddpm` is the paper's: epsilon prediction, cosine schedule, integer timesteps in [0, T). `flow` is rectified flow as
diffusers writes it: `x_t = sigma * noise + (1 - sigma) * x_0` with `sigma = t / T`, timesteps in [1, T], velocity
target `noise - x_0`. Timestep 0 always means a clean image.
"""

import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    SchedulerMixin,
)

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


def diffusion_mse(
    prediction: torch.Tensor,
    target: torch.Tensor,
    latent_sizes: torch.Tensor | None = None,
    noised: torch.BoolTensor | None = None,
) -> torch.Tensor:
    """The diffusion loss: mean squared error per image, then the mean over images (in float32).

    With `latent_sizes` `(num_images, 2)`, images of different sizes padded with zeros in both tensors: each image's
    error is averaged over its own height x width only. With `noised` `(num_images,)`, only those images count (an image
    at timestep 0 is clean: its noise cannot be predicted); the loss is 0 when none does."""
    squared = ((prediction.float() - target.float()) ** 2).flatten(1)
    if latent_sizes is None or bool(
        (latent_sizes == torch.tensor(prediction.shape[2:], device=latent_sizes.device)).all()
    ):
        per_image = squared.mean(1)
    else:
        per_image = squared.sum(1) / (prediction.shape[1] * latent_sizes.prod(-1).to(squared))
    if noised is None:
        return per_image.mean()
    return (per_image * noised).sum() / noised.sum().clamp(min=1)


# name -> (objective it samples, scheduler class, settings that differ from the training scheduler's config)
# Latents are not bounded like pixels, so x_0 is never clipped. Sampling starts at the "leading" timestep (980 of 1000
# for 50 steps), not at 999: the capped cosine schedule has alphas_cumprod[999] ~ 2e-9 there, where an epsilon
# prediction determines x_0 only up to a factor 1 / sqrt(2e-9), so any model error would be blown up.
SAMPLING_SCHEDULERS = {
    "ddpm": ("ddpm", DDPMScheduler, {"clip_sample": False, "timestep_spacing": "leading"}),
    "ddim": ("ddpm", DDIMScheduler, {"clip_sample": False, "timestep_spacing": "leading", "set_alpha_to_one": True}),
    "dpmsolver++": (
        "ddpm",
        DPMSolverMultistepScheduler,
        {"algorithm_type": "dpmsolver++", "timestep_spacing": "leading", "final_sigmas_type": "zero"},
    ),
    "flow_euler": ("flow", FlowMatchEulerDiscreteScheduler, {}),
}
DEFAULT_SAMPLING_SCHEDULERS = {"ddpm": "ddim", "flow": "flow_euler"}


def sampling_scheduler(
    noise_scheduler: SchedulerMixin, objective: str, scheduler: str | SchedulerMixin | None = None
) -> SchedulerMixin:
    """Returns a fresh diffusers scheduler that samples images for a model trained with `noise_scheduler`.

    Args:
        noise_scheduler (`SchedulerMixin`): the training scheduler (`model.noise_scheduler`).
        objective (`str`): `model.config.objective`, `"ddpm"` or `"flow"`.
        scheduler (`str` or `SchedulerMixin`, *optional*): a name from `SAMPLING_SCHEDULERS` (`"ddpm"`, `"ddim"`,
            `"dpmsolver++"` for `ddpm`; `"flow_euler"` for `flow`), or a scheduler instance, which is checked against
            the training schedule and copied (its state is not touched). Defaults to `"ddim"` / `"flow_euler"`.
    """
    if scheduler is None:
        scheduler = DEFAULT_SAMPLING_SCHEDULERS[objective]
    if isinstance(scheduler, str):
        if scheduler not in SAMPLING_SCHEDULERS:
            raise ValueError(
                f"Unknown scheduler {scheduler!r}: choose one of {sorted(SAMPLING_SCHEDULERS)} or pass a diffusers "
                "scheduler instance."
            )
        scheduler_objective, scheduler_class, settings = SAMPLING_SCHEDULERS[scheduler]
        if scheduler_objective != objective:
            fitting = sorted(name for name, spec in SAMPLING_SCHEDULERS.items() if spec[0] == objective)
            raise ValueError(
                f"scheduler={scheduler!r} samples the {scheduler_objective!r} objective, but this model was trained "
                f"with objective={objective!r}: use one of {fitting}."
            )
        return scheduler_class.from_config(noise_scheduler.config, **settings)
    if not isinstance(scheduler, SchedulerMixin):
        raise TypeError(f"scheduler must be a name or a diffusers scheduler, got {type(scheduler).__name__}.")
    check_scheduler(scheduler, noise_scheduler, objective)
    return type(scheduler).from_config(scheduler.config)


def scheduler_objective(scheduler: SchedulerMixin) -> str | None:
    """The objective a scheduler samples, read from its config: a noise schedule of betas (`ddpm`), or flow
    matching's sigma shift (`flow`); `None` if neither."""
    if "beta_schedule" in scheduler.config:
        return "ddpm"
    if "shift" in scheduler.config:
        return "flow"
    return None


def check_scheduler(scheduler: SchedulerMixin, noise_scheduler: SchedulerMixin, objective: str):
    """Raises a `ValueError` that says why, if `scheduler` cannot sample a model trained on `noise_scheduler`."""
    name = type(scheduler).__name__
    if scheduler_objective(scheduler) != objective:
        kind = "a flow-matching" if objective == "flow" else "a DDPM-family (beta schedule)"
        raise ValueError(f"{name} cannot sample a model trained with objective={objective!r}: use {kind} scheduler.")
    train_steps, steps = noise_scheduler.config.num_train_timesteps, scheduler.config.num_train_timesteps
    if steps != train_steps:
        raise ValueError(f"{name} has num_train_timesteps={steps}, but the model was trained with {train_steps}.")
    if objective == "flow":
        if scheduler.config.get("use_dynamic_shifting", False):
            raise ValueError(f"{name} uses dynamic shifting, which needs a `mu` this model does not define.")
        return
    if scheduler.config.get("prediction_type", "epsilon") != "epsilon":
        raise ValueError(
            f"{name} has prediction_type={scheduler.config.prediction_type!r}; the model predicts 'epsilon'."
        )
    if scheduler.config.get("clip_sample", False):
        raise ValueError(
            f"{name} has clip_sample=True, which clips latents to [-1, 1]: build it with clip_sample=False."
        )
    if not torch.allclose(scheduler.alphas_cumprod, noise_scheduler.alphas_cumprod, atol=1e-6):
        raise ValueError(f"{name} has another noise schedule (alphas_cumprod) than the one the model was trained on.")


__all__ = [
    "noise_scheduler_from_config",
    "sample_training_timesteps",
    "noise_latents",
    "diffusion_mse",
    "SAMPLING_SCHEDULERS",
    "sampling_scheduler",
    "check_scheduler",
]
