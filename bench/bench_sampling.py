"""Benchmark of image sampling: seconds per image against the backbone floor and the peer.

For each prompt length, on a random model of the peer's shape (hidden 256, 4 layers, 64 patches of 16 latent values;
`--shape smollm2`: SmolLM2-135M's backbone), with the same number of denoising steps (32) everywhere:

- `cached`, `cached_cfg3`: `model.generate(generation_mode="image")`, which denoises against the cached prefix,
  without guidance and with guidance 3 (both branches in one batched forward, the unconditional slots masked off the
  prefix);
- `floor`, `floor_cfg3`: what any sampler of this design must run, on the bare backbone: the prefill of prompt and
  `<boi>`, then the steps' forwards of N embedded slots against the cached prefix (no mask: nothing is padded), each
  followed by the crop; with guidance, the two branches as two rows of one forward, under the mask built once;
- `uncached`: the same sampler recomputing the whole sequence (prompt, `<boi>`, N slots) at every step;
- `denoising_steps`: the steps of the loop alone (`denoise_images`: slots forward against the cache, cache crop,
  scheduler step), against `backbone_steps`: the floor's step forwards without its prefill;
- `peer`, `peer_cfg3`: transfusion-pytorch 0.20.0's `sample_many` (prefix KV-cached, 32 Euler steps) from a
  16-token prompt, in its own process (`bench/setup_peer.sh`).

Repetitions are interleaved; medians and minima of wall-clock and process CPU time are written, and each sampler's
peak memory (a fresh process each; GPU memory with `--device cuda`). Run from the repository root:

    python bench/bench_sampling.py [--steps 32] [--repeats 7] [--prompt-lengths 16 512] [--shape small|smollm2]
        [--device cuda --dtype bfloat16 --attn-implementation sdpa|flex_attention] [--no-uncached] [--out PATH]

(`--out` defaults to bench/results/sampling.json.)
"""

import argparse
import functools
from pathlib import Path

import torch
from transformers import DynamicCache

from modeling_transfusion.generation_transfusion import ImageSamplingOptions, denoise_images, sampling_scheduler

from common import (
    BOI,
    EOI,
    IMAGE,
    SHAPE_NAMES,
    add_device_arguments,
    build_model,
    device_arguments,
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
    config, device = model.config, prompt.device
    scheduler = sampling_scheduler(model.noise_scheduler, config.objective)
    scheduler.set_timesteps(steps, device=device)
    shape = (1, config.latent_channels, config.latent_size, config.latent_size)
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device)
    slots = torch.full((1, config.num_image_tokens), IMAGE, device=device)
    sequence = torch.cat([prompt, torch.tensor([[BOI]], device=device), slots], dim=-1)
    positions = prompt.shape[1] + 1 + torch.arange(config.num_image_tokens, device=device)[None]
    for timestep in scheduler.timesteps:
        model_input = scheduler.scale_model_input(latents, timestep)
        cache, _ = prefill(model, prompt)  # prompt and <boi> recomputed at every step
        prediction = model.model.denoise_step(model_input, timestep[None], cache, positions).float()
        latents = scheduler.step(prediction, timestep, latents).prev_sample
    eoi = torch.tensor([[EOI]], device=device)
    model(input_ids=torch.cat([sequence, eoi], dim=-1), image_latents=latents, use_cache=False)
    return latents


@torch.no_grad()
def prefill(model, prompt):
    sequence = torch.cat([prompt, torch.tensor([[BOI]], device=prompt.device)], dim=-1)
    return model(input_ids=sequence, use_cache=True, logits_to_keep=1).cache, sequence.shape[1]


@torch.no_grad()
def denoising_steps(model, prompt, steps):
    """`steps` denoising steps of the generation loop against a prefilled cache."""
    cache, length = prefill(model, prompt)
    scheduler = sampling_scheduler(model.noise_scheduler, model.config.objective)
    options = ImageSamplingOptions(scheduler, steps, 1.0, torch.Generator().manual_seed(0), progress_bar=False)
    positions = torch.tensor([length], device=prompt.device)

    @torch.no_grad()  # the decorator of the outer function does not reach a call made later
    def run():
        denoise_images(model, cache, None, positions, [0], options)

    return run


@torch.no_grad()
def backbone_floor(model, prompt, steps, guided=False, with_prefill=True):
    """The bare backbone doing what a sampler must: prefill prompt and `<boi>` (unless `with_prefill` is False: the
    steps alone, against a cache prefilled once), then `steps` forwards of N embedded slots against the cache, each
    followed by the crop; `guided`: two rows per step, the second's slots seeing only themselves."""
    backbone, device = model.model.language_model, prompt.device
    rows = 2 if guided else 1
    sequence = torch.cat([prompt, torch.tensor([[BOI]], device=device)], dim=-1)
    num_slots, length = model.config.num_image_tokens, sequence.shape[1]
    slots = torch.full((rows, num_slots), IMAGE, device=device)
    embeds = model.get_input_embeddings()(slots)
    positions = torch.arange(length, length + num_slots, device=device).expand(rows, -1)

    def prefill_rows():
        cache = backbone(input_ids=sequence, use_cache=True).cache
        if guided:
            cache = DynamicCache(
                ddp_cache_data=[
                    (layer.keys.repeat(2, 1, 1, 1), layer.values.repeat(2, 1, 1, 1)) for layer in cache.layers
                ]
            )
        return cache

    cache = prefill_rows()
    # Built once, as cheap as it gets: without guidance the slots see the whole prefix and each other (no mask).
    unconditional = torch.tensor([False, True], device=device) if guided else None
    mask = model.model.get_attention_mask(embeds, slots == IMAGE, None, cache, positions, unconditional)

    @torch.no_grad()
    def run():
        step_cache = prefill_rows() if with_prefill else cache
        for _ in range(steps):
            backbone(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, cache=step_cache)
            step_cache.crop(-num_slots)

    return run


def our_variants(model, prompt, steps, uncached=True) -> dict:
    variants = {
        "cached": functools.partial(sample_cached, model, prompt, steps),
        "floor": backbone_floor(model, prompt, steps),
        "cached_cfg3": functools.partial(sample_cached, model, prompt, steps, guidance_scale=3.0),
        "floor_cfg3": backbone_floor(model, prompt, steps, guided=True),
        "denoising_steps": denoising_steps(model, prompt, steps),
        "backbone_steps": backbone_floor(model, prompt, steps, with_prefill=False),
    }
    if uncached:
        variants["uncached"] = functools.partial(sample_uncached, model, prompt, steps)
    return variants


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--prompt-lengths", type=int, nargs="+", default=[16, 512])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-peer", action="store_true", help="skip transfusion-pytorch")
    parser.add_argument("--no-uncached", action="store_true", help="skip the uncached sampler (slow at large shapes)")
    add_device_arguments(parser)
    parser.add_argument("--phase", choices=["cached", "cached_cfg3"], help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=Path("bench/results/sampling.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = build_model(16, args.shape, args.device, args.dtype, args.attn_implementation)

    def prompt_of(length):
        return torch.randint(3, BOI, (1, length), generator=torch.Generator().manual_seed(length)).to(args.device)

    if args.phase is not None:  # a fresh process measuring one phase's peak memory
        variant = our_variants(model, prompt_of(args.prompt_lengths[0]), args.steps, uncached=False)[args.phase]
        report_phase_memory(variant)
        return

    peer = optional_peer(args.no_peer or args.shape != "small", args.threads, args.steps)
    gflops_start = matmul_gflops()
    results = []
    for length in args.prompt_lengths:
        prompt = prompt_of(length)
        variants = our_variants(model, prompt, args.steps, uncached=not args.no_uncached)
        if peer is not None:  # the peer's prompt is 16 tokens long, whatever the row
            variants["peer"] = peer.timed_call("sample", cfg=1.0)
            variants["peer_cfg3"] = peer.timed_call("sample", cfg=3.0)
        runs = interleave(variants, args.repeats)
        row = {"prompt_length": length, **summarise(runs), "raw_seconds_wall_cpu": runs}
        if not args.no_uncached:  # must agree: the prefix cache changes nothing
            difference = sample_cached(model, prompt, args.steps) - sample_uncached(model, prompt, args.steps)
            row["max_abs_difference_cached_vs_uncached"] = float(difference.abs().max())
        median = row["median_wall"]
        ratios = row["ratios_of_median_wall"] = {
            "cached_over_floor": median["cached"] / median["floor"],
            "cached_cfg3_over_floor_cfg3": median["cached_cfg3"] / median["floor_cfg3"],
            "steps_over_backbone_steps": median["denoising_steps"] / median["backbone_steps"],
            # The floor of earlier runs: the step forwards alone, without the prefill every sampler needs.
            "cached_over_backbone_steps": median["cached"] / median["backbone_steps"],
        }
        if not args.no_uncached:
            ratios["uncached_over_cached"] = median["uncached"] / median["cached"]
        if peer is not None:
            ratios["peer_over_cached"] = median["peer"] / median["cached"]
            ratios["peer_cfg3_over_cached_cfg3"] = median["peer_cfg3"] / median["cached_cfg3"]
        results.append(row)
    gflops_end = matmul_gflops()
    phase_args = ("--steps", str(args.steps), "--prompt-lengths", str(args.prompt_lengths[0]), *device_arguments(args))
    memory = {name: phase_memory("bench_sampling.py", name, *phase_args) for name in ("cached", "cached_cfg3")}
    if peer is not None:
        memory["peer"] = peer.phase_memory("sample", cfg=1.0)
        memory["peer_cfg3"] = peer.phase_memory("sample", cfg=3.0)
        peer.close()

    agreement = [row["max_abs_difference_cached_vs_uncached"] for row in results if not args.no_uncached]
    print(
        f"one image, {args.steps} denoising steps, {SHAPE_NAMES[args.shape]}; {args.device}, {args.dtype}, "
        f"{args.attn_implementation}; {args.repeats} interleaved repeats, {args.threads} threads, torch "
        f"{torch.__version__}; matmul probe {gflops_start:.0f} -> {gflops_end:.0f} GFLOP/s"
        + (f"; cached and uncached images agree to {max(agreement):.1e}" if agreement else "")
    )
    names = list(results[0]["median_wall"])
    header = f"{'prompt':>6} | " + " | ".join(f"{name:>15}" for name in names)
    print(f"\nmedian wall-clock seconds per image ({args.steps} steps)")
    print(header)
    print("-" * len(header))
    for row in results:
        print(f"{row['prompt_length']:>6} | " + " | ".join(f"{row['median_wall'][n]:>15.3f}" for n in names))
    print("\nslot tokens per second (one image: N slots per step, both branches with guidance)")
    slots = model.config.num_image_tokens * args.steps
    for row in results:
        median = row["median_wall"]
        row["slot_tokens_per_second"] = {
            "cached": slots / median["cached"],
            "cached_cfg3": 2 * slots / median["cached_cfg3"],
        }
        rates = ", ".join(f"{name} {value:,.0f}" for name, value in row["slot_tokens_per_second"].items())
        print(f"{row['prompt_length']:>6} | {rates}")
    print("\nratios of the medians")
    for row in results:
        ratios = ", ".join(f"{name} {value:.3f}x" for name, value in row["ratios_of_median_wall"].items())
        print(f"{row['prompt_length']:>6} | {ratios}")
    print(
        "\npeak memory MB (+ added by sampling), fresh process, prompt length {}: {}".format(
            args.prompt_lengths[0], ", ".join(f"{name} {memory_cell(value)}" for name, value in memory.items())
        )
    )
    write_report(
        args.out,
        "bench/bench_sampling.py",
        model=SHAPE_NAMES[args.shape],
        shape=args.shape,
        device=args.device,
        dtype=args.dtype,
        attn_implementation=args.attn_implementation,
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
