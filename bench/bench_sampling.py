"""Benchmark of image sampling at the peer configuration: seconds per image against the sampling floor and the peer.

For each prompt length, on a random model of the peer's shape (hidden 256, 4 layers, 64 patches of 16 latent values),
with the same number of denoising steps (32) everywhere:

- `cached`, `cached_cfg3`: `model.generate(generation_mode="image")`, which denoises against the cached prefix,
  without guidance and with guidance 3 (both branches in one batched forward, sharing the prefix);
- `uncached`: the same sampler recomputing the whole sequence (prompt, `<boi>`, N slots) at every step;
- `denoising_steps`: the 32 steps of the loop alone (`denoise_images`: slots forward against the cache, cache crop,
  scheduler step), against `backbone_floor`: 32 bare backbone forwards of N embedded slots against the same cache,
  with the mask built once (the floor no implementation of this design can go under);
- `peer`, `peer_cfg3`: transfusion-pytorch 0.20.0's `sample_many` (prefix KV-cached, 32 Euler steps) from a
  16-token prompt, in its own process (`bench/setup_peer.sh`).

Repetitions are interleaved; medians and minima of wall-clock and process CPU time are written, and each sampler's
peak resident memory (a fresh process each). Run from the repository root:

    python bench/bench_sampling.py [--steps 32] [--repeats 7] [--prompt-lengths 16 512] [--out PATH]

(`--out` defaults to bench/results/sampling.json.)
"""

import argparse
import functools
from pathlib import Path

import torch

from modeling_transfusion.generation_transfusion import ImageSamplingOptions, denoise_images, sampling_scheduler

from common import (
    BOI,
    EOI,
    IMAGE,
    PEER_SHAPE,
    build_model,
    interleave,
    matmul_gflops,
    memory_cell,
    optional_peer,
    phase_memory,
    report_phase_memory,
    summarise,
    write_report,
)


@torch.no_grad()
def sample_cached(model, prompt, steps, guidance_scale=1.0):
    return model.generate(
        prompt,
        generation_mode="image",
        num_inference_steps=steps,
        image_guidance_scale=guidance_scale,
        generator=torch.Generator().manual_seed(0),
        progress_bar=False,
        return_dict_in_generate=True,
    ).image_latents[0][0]


@torch.no_grad()
def sample_uncached(model, prompt, steps):
    """The same sampler without a cache: every step runs prompt, `<boi>` and the N slots from scratch, and so does
    the commit of the clean image with `<eoi>`."""
    config = model.config
    scheduler = sampling_scheduler(model.noise_scheduler, config.objective)
    scheduler.set_timesteps(steps)
    shape = (1, config.latent_channels, config.latent_size, config.latent_size)
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    slots = torch.full((1, config.num_image_tokens), IMAGE)
    sequence = torch.cat([prompt, torch.tensor([[BOI]]), slots], dim=-1)
    positions = prompt.shape[1] + 1 + torch.arange(config.num_image_tokens)[None]
    for timestep in scheduler.timesteps:
        model_input = scheduler.scale_model_input(latents, timestep)
        cache, _ = prefill(model, prompt)  # prompt and <boi> recomputed at every step
        prediction = model.model.denoise_step(model_input, timestep[None], cache, positions)
        latents = scheduler.step(prediction, timestep, latents).prev_sample
    model(input_ids=torch.cat([sequence, torch.tensor([[EOI]])], dim=-1), image_latents=latents, use_cache=False)
    return latents


@torch.no_grad()
def prefill(model, prompt):
    sequence = torch.cat([prompt, torch.tensor([[BOI]])], dim=-1)
    return model(input_ids=sequence, use_cache=True, logits_to_keep=1).cache, sequence.shape[1]


@torch.no_grad()
def denoising_steps(model, prompt, steps):
    """`steps` denoising steps of the generation loop against a prefilled cache."""
    cache, length = prefill(model, prompt)
    scheduler = sampling_scheduler(model.noise_scheduler, model.config.objective)
    options = ImageSamplingOptions(scheduler, steps, 1.0, torch.Generator().manual_seed(0), progress_bar=False)
    positions = torch.tensor([length])

    @torch.no_grad()  # the decorator of the outer function does not reach a call made later
    def run():
        denoise_images(model, cache, None, positions, [0], options)

    return run


@torch.no_grad()
def backbone_steps(model, prompt, steps):
    """`steps` bare backbone forwards of N embedded slots against the same cache, each followed by the crop."""
    cache, length = prefill(model, prompt)
    num_slots = model.config.num_image_tokens
    slots = torch.full((1, num_slots), IMAGE)
    embeds = model.get_input_embeddings()(slots)
    positions = torch.arange(length, length + num_slots)[None]
    mask = model.model.get_attention_mask(embeds, slots == IMAGE, None, cache, positions)  # built once: cheapest

    @torch.no_grad()
    def run():
        for _ in range(steps):
            model.model.language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, cache=cache)
            cache.crop(-num_slots)

    return run


def our_variants(model, prompt, steps) -> dict:
    return {
        "cached": functools.partial(sample_cached, model, prompt, steps),
        "cached_cfg3": functools.partial(sample_cached, model, prompt, steps, guidance_scale=3.0),
        "uncached": functools.partial(sample_uncached, model, prompt, steps),
        "denoising_steps": denoising_steps(model, prompt, steps),
        "backbone_floor": backbone_steps(model, prompt, steps),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--prompt-lengths", type=int, nargs="+", default=[16, 512])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-peer", action="store_true", help="skip transfusion-pytorch")
    parser.add_argument("--phase", choices=["cached", "cached_cfg3"], help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=Path("bench/results/sampling.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = build_model()

    def prompt_of(length):
        return torch.randint(3, BOI, (1, length), generator=torch.Generator().manual_seed(length))

    if args.phase is not None:  # a fresh process measuring one phase's peak memory
        variant = our_variants(model, prompt_of(args.prompt_lengths[0]), args.steps)[args.phase]
        report_phase_memory(variant)
        return

    peer = optional_peer(args.no_peer, args.threads, args.steps)
    gflops_start = matmul_gflops()
    results = []
    for length in args.prompt_lengths:
        prompt = prompt_of(length)
        cached, uncached = sample_cached(model, prompt, args.steps), sample_uncached(model, prompt, args.steps)
        variants = our_variants(model, prompt, args.steps)
        if peer is not None:  # the peer's prompt is 16 tokens long, whatever the row
            variants["peer"] = peer.timed_call("sample", cfg=1.0)
            variants["peer_cfg3"] = peer.timed_call("sample", cfg=3.0)
        runs = interleave(variants, args.repeats)
        row = {
            "prompt_length": length,
            "max_abs_difference_cached_vs_uncached": float((cached - uncached).abs().max()),  # must agree
            **summarise(runs),
            "raw_seconds_wall_cpu": runs,
        }
        median = row["median_wall"]
        row["ratios_of_median_wall"] = {
            "cached_over_floor": median["cached"] / median["backbone_floor"],
            "step_over_backbone_step": median["denoising_steps"] / median["backbone_floor"],
            "uncached_over_cached": median["uncached"] / median["cached"],
        }
        if peer is not None:
            row["ratios_of_median_wall"]["peer_over_cached"] = median["peer"] / median["cached"]
            row["ratios_of_median_wall"]["peer_cfg3_over_cached_cfg3"] = median["peer_cfg3"] / median["cached_cfg3"]
        results.append(row)
    gflops_end = matmul_gflops()
    memory = {name: phase_memory("bench_sampling.py", name) for name in ("cached", "cached_cfg3")}
    if peer is not None:
        memory["peer"] = peer.phase_memory("sample", cfg=1.0)
        memory["peer_cfg3"] = peer.phase_memory("sample", cfg=3.0)
        peer.close()

    agreement = max(row["max_abs_difference_cached_vs_uncached"] for row in results)
    print(
        f"one image, {args.steps} denoising steps, {PEER_SHAPE}; {args.repeats} interleaved repeats, {args.threads} "
        f"threads, torch {torch.__version__}; matmul probe {gflops_start:.0f} -> {gflops_end:.0f} GFLOP/s; cached "
        f"and uncached images agree to {agreement:.1e}"
    )
    names = list(results[0]["median_wall"])
    header = f"{'prompt':>6} | " + " | ".join(f"{name:>15}" for name in names)
    print(f"\nmedian wall-clock seconds per image ({args.steps} steps)")
    print(header)
    print("-" * len(header))
    for row in results:
        print(f"{row['prompt_length']:>6} | " + " | ".join(f"{row['median_wall'][n]:>15.3f}" for n in names))
    print("\nratios of the medians")
    for row in results:
        ratios = ", ".join(f"{name} {value:.2f}x" for name, value in row["ratios_of_median_wall"].items())
        print(f"{row['prompt_length']:>6} | {ratios}")
    print(
        "\npeak RSS MB (+ added by sampling), fresh process, prompt length {}: {}".format(
            args.prompt_lengths[0], ", ".join(f"{name} {memory_cell(value)}" for name, value in memory.items())
        )
    )
    write_report(
        args.out,
        "bench/bench_sampling.py",
        model=PEER_SHAPE,
        steps=args.steps,
        repeats=args.repeats,
        threads=args.threads,
        matmul_gflops_start_end=[gflops_start, gflops_end],
        peer_torch=peer.torch_version if peer is not None else None,
        memory_mb=memory,
        results=results,
    )


if __name__ == "__main__":
    main()
