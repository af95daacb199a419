"""Benchmark of image sampling: the prefix KV cache against full recomputation, and the cost of one denoising step.

For each prompt length it measures, on a random model of the peer's shape (hidden 256, 4 layers, 64 patches of 16
latent values):

- seconds per image with `model.generate(generation_mode="image")`, which denoises against the cached prefix;
- seconds per image when every step recomputes the whole sequence (prompt, `<boi>`, N slots) without a cache;
- one denoising step (`denoise_images`: slots forward against the cache, cache crop, scheduler step) against a bare
  backbone forward of N embedded slots against the same cache (the floor no implementation can go under).

Repetitions of the variants are interleaved and medians reported. Run from the repository root:

    python bench/bench_sampling.py [--steps 32] [--repeats 5] [--prompt-lengths 32 512] [--out bench/results/sampling.json]
"""

import argparse
import json
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


def timed(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


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
        out = model(input_ids=sequence, noisy_image_latents=model_input, image_timesteps=timestep[None], use_cache=False)
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
            "cached_s_per_image": lambda: sample_cached(model, prompt, args.steps),
            "uncached_s_per_image": lambda: sample_uncached(model, prompt, args.steps),
            "cached_cfg3_s_per_image": lambda: sample_cached(model, prompt, args.steps, guidance_scale=3.0),
            "denoising_step_ms": denoising_steps(model, prompt, args.steps),
            "backbone_step_ms": backbone_steps(model, prompt, args.steps),
        }
        for function in variants.values():  # warm-up
            function()
        times = {name: [] for name in variants}
        for _ in range(args.repeats):
            for name, function in variants.items():
                times[name].append(timed(function))
        medians = {name: statistics.median(values) for name, values in times.items()}
        for name in ("denoising_step_ms", "backbone_step_ms"):
            medians[name] = medians[name] / args.steps * 1000
        row = {
            "prompt_length": length,
            **medians,
            "speedup_cache": medians["uncached_s_per_image"] / medians["cached_s_per_image"],
            "step_over_backbone": medians["denoising_step_ms"] / medians["backbone_step_ms"],
            "max_abs_difference_cached_vs_uncached": max_difference,
            "raw_seconds": times,
        }
        results.append(row)

    header = (
        f"{'prompt':>6} | {'cached s/img':>12} | {'uncached s/img':>14} | {'speedup':>7} | {'CFG x3 s/img':>12} | "
        f"{'step ms':>7} | {'backbone ms':>11} | {'step/backbone':>13}"
    )
    print(f"{args.steps} steps, {args.repeats} repeats (medians), {args.threads} threads, torch {torch.__version__}")
    print(header)
    print("-" * len(header))
    for row in results:
        print(
            f"{row['prompt_length']:>6} | {row['cached_s_per_image']:>12.3f} | {row['uncached_s_per_image']:>14.3f} | "
            f"{row['speedup_cache']:>6.2f}x | {row['cached_cfg3_s_per_image']:>12.3f} | "
            f"{row['denoising_step_ms']:>7.2f} | {row['backbone_step_ms']:>11.2f} | {row['step_over_backbone']:>12.2f}x"
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
        "results": results,
    }
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
