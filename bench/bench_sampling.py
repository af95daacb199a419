"""Benchmark of image sampling: the prefix KV cache against full recomputation, and the cost of one denoising step.

For each prompt length it measures, on a random model of the peer's shape (hidden 256, 4 layers, 64 patches of 16
latent values):

- seconds per image with `model.generate(generation_mode="image")`, which denoises against the cached prefix;
- seconds per image when every step recomputes the whole sequence (prompt, `<boi>`, N slots) without a cache;
- one denoising step (`denoise_images`: slots forward against the cache, cache crop, scheduler step) against a bare
  backbone forward of N embedded slots against the same cache (the floor no implementation can go under).

Repetitions of the variants are interleaved. Each run records wall-clock and process CPU time; the table shows
medians of the wall-clock times (as asked for) and, because a shared machine makes them noisy, also the minimum (the
least disturbed run) and the medians of CPU time. Run from the repository root:

    python bench/bench_sampling.py [--steps 32] [--repeats 5] [--prompt-lengths 32 512] [--out PATH]

(`--out` defaults to bench/results/sampling.json.)
"""

import argparse
import functools
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import transformers

from modeling_transfusion import TransfusionConfig, TransfusionForConditionalGeneration
from modeling_transfusion.generation_transfusion import ImageSamplingOptions, denoise_images, sampling_scheduler

BOI, EOI, IMAGE = 253, 254, 255


def build_model(guidance_scale: float = 1.0) -> TransfusionForConditionalGeneration:
    config = TransfusionConfig(
        text_config={
            "model_type": "llama",
            "vocab_size": 256,
            "hidden_size": 256,
            "intermediate_size": 682,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "max_position_embeddings": 4096,
        },
        image_size=16,
        num_channels=4,
        latent_channels=4,
        patch_size=2,
        boi_token_id=BOI,
        eoi_token_id=EOI,
        image_token_id=IMAGE,
    )
    torch.manual_seed(0)
    model = TransfusionForConditionalGeneration(config).eval()
    torch.nn.init.normal_(model.patch_decoder.proj.weight, std=0.02)
    return model


def timed(function) -> tuple[float, float]:
    """Runs `function` once; returns `(wall_seconds, cpu_seconds)`, the latter the CPU time of this process."""
    wall, cpu = time.perf_counter(), time.process_time()
    function()
    return time.perf_counter() - wall, time.process_time() - cpu


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
    for timestep in scheduler.timesteps:
        model_input = scheduler.scale_model_input(latents, timestep)
        out = model(
            input_ids=sequence, noisy_image_latents=model_input, image_timesteps=timestep[None], use_cache=False
        )
        latents = scheduler.step(out.diffusion_prediction, timestep, latents).prev_sample
    model(input_ids=torch.cat([sequence, torch.tensor([[EOI]])], dim=-1), image_latents=latents, use_cache=False)
    return latents


@torch.no_grad()
def prefill(model, prompt):
    sequence = torch.cat([prompt, torch.tensor([[BOI]])], dim=-1)
    return model(input_ids=sequence, use_cache=True, logits_to_keep=1).past_key_values, sequence.shape[1]


@torch.no_grad()
def denoising_steps(model, prompt, steps):
    """`steps` denoising steps of the generation loop against a prefilled cache."""
    cache, length = prefill(model, prompt)
    scheduler = sampling_scheduler(model.noise_scheduler, model.config.objective)
    options = ImageSamplingOptions(scheduler, steps, 1.0, torch.Generator().manual_seed(0), progress_bar=False)
    positions = torch.tensor([length])

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
    mask = model.get_attention_mask(embeds, slots, None, cache, positions)  # built once: the cheapest possible

    def run():
        for _ in range(steps):
            model.model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, past_key_values=cache)
            cache.crop(-num_slots)

    return run


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--prompt-lengths", type=int, nargs="+", default=[32, 512])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench/results/sampling.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = build_model()
    results = []
    for length in args.prompt_lengths:
        prompt = torch.randint(3, BOI, (1, length), generator=torch.Generator().manual_seed(length))
        cached, uncached = sample_cached(model, prompt, args.steps), sample_uncached(model, prompt, args.steps)
        max_difference = float((cached - uncached).abs().max())  # the two samplers must agree
        variants = {
            "cached_s_per_image": functools.partial(sample_cached, model, prompt, args.steps),
            "uncached_s_per_image": functools.partial(sample_uncached, model, prompt, args.steps),
            "cached_cfg3_s_per_image": functools.partial(sample_cached, model, prompt, args.steps, guidance_scale=3.0),
            "denoising_step_ms": denoising_steps(model, prompt, args.steps),
            "backbone_step_ms": backbone_steps(model, prompt, args.steps),
        }
        for function in variants.values():  # warm-up
            function()
        runs = {name: [] for name in variants}
        for _ in range(args.repeats):
            for name, function in variants.items():
                runs[name].append(timed(function))
        row = {"prompt_length": length, "max_abs_difference_cached_vs_uncached": max_difference}
        for statistic, pick in (("median", statistics.median), ("min", min)):
            for clock, index in (("wall", 0), ("cpu", 1)):
                values = {name: pick(run[index] for run in timings) for name, timings in runs.items()}
                for name in ("denoising_step_ms", "backbone_step_ms"):
                    values[name] = values[name] / args.steps * 1000
                values["speedup_cache"] = values["uncached_s_per_image"] / values["cached_s_per_image"]
                values["step_over_backbone"] = values["denoising_step_ms"] / values["backbone_step_ms"]
                row[f"{statistic}_{clock}"] = values
        row["raw_seconds_wall_cpu"] = runs
        results.append(row)

    agreement = max(row["max_abs_difference_cached_vs_uncached"] for row in results)
    print(
        f"{args.steps} steps, {args.repeats} interleaved repeats, {args.threads} threads, torch {torch.__version__}; "
        f"cached and uncached images agree to {agreement:.1e}"
    )
    for key, title in (
        ("median_wall", "median wall-clock"),
        ("min_wall", "minimum wall-clock"),
        ("median_cpu", "median process CPU time"),
    ):
        print(f"\n{title}")
        header = (
            f"{'prompt':>6} | {'cached s/img':>12} | {'uncached s/img':>14} | {'speedup':>7} | {'CFG x3 s/img':>12} | "
            f"{'step ms':>7} | {'backbone ms':>11} | {'step/backbone':>13}"
        )
        print(header)
        print("-" * len(header))
        for row in results:
            v = row[key]
            print(
                f"{row['prompt_length']:>6} | {v['cached_s_per_image']:>12.3f} | {v['uncached_s_per_image']:>14.3f} | "
                f"{v['speedup_cache']:>6.2f}x | {v['cached_cfg3_s_per_image']:>12.3f} | "
                f"{v['denoising_step_ms']:>7.2f} | {v['backbone_step_ms']:>11.2f} | {v['step_over_backbone']:>12.2f}x"
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "benchmark": "bench/bench_sampling.py",
        "model": "llama hidden 256, 4 layers, 4 heads, intermediate 682, vocab 256; 64 patches of 16 latent values",
        "steps": args.steps,
        "repeats": args.repeats,
        "threads": args.threads,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "machine": platform.processor() or platform.machine(),
        "load_average_at_end": os.getloadavg(),
        "results": results,
    }
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
