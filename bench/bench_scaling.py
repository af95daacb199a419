"""Benchmark of cost against image size: a training step and one sampled image at 16 to 1,024 image slots, each
against its backbone floor.

The peer configuration's backbone (hidden 256, 4 layers, 4 heads, MLP 682, vocab 256) with the identity autoencoder
(latents are pixels, 4 channels, 2x2 patches), on square images of side 8, 16, 32 and 64: 16, 64, 256 and 1,024
image slots. For each size:

- `transfusion_step`: forward, backward and AdamW of the model on a batch of sequences of 32 text tokens + `<boi>`,
  N slots, `<eoi>`, the LM loss plus the diffusion loss of a randomly noised image (as in `bench_training.py`);
- `lm_only_step`: the same Llama backbone as a plain causal LM (`LlamaForCausalLM`) over the same number of tokens:
  the floor of the step;
- `sample`: one image by `model.generate(generation_mode="image")` after a 16-token prompt, K denoising steps;
- `backbone_floor`: K bare backbone forwards of the N embedded slots against the cached prompt prefix, mask built
  once (`bench_sampling.py`'s `backbone_steps`: its floor without the prefill).

All variants of all sizes are timed in one process, their repetitions interleaved; then each size's peak resident
memory of a training step (ours and the floor's) and of sampling, in a fresh process per phase. Run from the
repository root:

    python bench/bench_scaling.py [--slots 16 64 256 1024] [--batch 4] [--steps 8] [--repeats 9] [--threads 2]
        [--out bench/results/scaling.json]
"""

import argparse
import functools
import math
from pathlib import Path

import torch
from bench_sampling import backbone_floor, sample_cached
from bench_training import train_step
from transformers import LlamaConfig, LlamaForCausalLM

from common import (
    BOI,
    EOI,
    IMAGE,
    PEER_TEXT_CONFIG,
    build_model,
    count_parameters,
    memory_cell,
    phase_memory,
    report_phase_memory,
    run_interleaved,
    write_report,
)

TEXT_LENGTH, PROMPT_LENGTH, PATCH_SIZE = 32, 16, 2
MODEL = "hidden 256, 4 layers, 4 heads, MLP 682, vocab 256; identity autoencoder, 4 channels, 2x2 patches"
TRAINING_PHASES, SAMPLING_PHASES = ("transfusion_step", "lm_only_step"), ("sample", "backbone_floor")


def image_size_of(slots: int) -> int:
    """The side of the square image (= latents) that `build_model` cuts into `slots` patches of 2x2."""
    side = math.isqrt(slots)
    if side * side != slots:
        raise ValueError(f"{slots} image slots is not a square number of patches")
    return side * PATCH_SIZE


def training_batch(batch: int, num_slots: int) -> dict[str, torch.Tensor]:
    text = torch.randint(3, BOI, (batch, TEXT_LENGTH), generator=torch.Generator().manual_seed(0))
    image = torch.tensor([BOI] + [IMAGE] * num_slots + [EOI]).expand(batch, -1)
    input_ids = torch.cat([text, image], dim=-1)
    return {"input_ids": input_ids, "labels": input_ids.clone()}


def size_variants(slots: int, batch: int, steps: int) -> tuple[dict, dict[str, int]]:
    """The four variants of one size and the parameter counts of the two training models."""
    model = build_model(image_size_of(slots)).train()
    config = model.config
    assert config.num_image_tokens == slots, (config.num_image_tokens, slots)
    tokens = training_batch(batch, slots)
    latent_shape = (batch, config.latent_channels, config.latent_size, config.latent_size)
    multimodal = {**tokens, "image_latents": torch.randn(latent_shape, generator=torch.Generator().manual_seed(1))}
    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(**PEER_TEXT_CONFIG)).train()
    sampler = build_model(image_size_of(slots))  # eval mode, the patch decoder random
    prompt = torch.randint(3, BOI, (1, PROMPT_LENGTH), generator=torch.Generator().manual_seed(PROMPT_LENGTH))
    variants = {
        "transfusion_step": train_step(model, torch.optim.AdamW(model.parameters(), lr=1e-4), multimodal),
        "lm_only_step": train_step(lm, torch.optim.AdamW(lm.parameters(), lr=1e-4), tokens),
        "sample": functools.partial(sample_cached, sampler, prompt, steps),
        "backbone_floor": backbone_floor(sampler, prompt, steps, with_prefill=False),
    }
    return variants, {"transfusion": count_parameters(model), "lm_only": count_parameters(lm)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slots", type=int, nargs="+", default=[16, 64, 256, 1024], help="image slots per image")
    parser.add_argument("--batch", type=int, default=4, help="sequences per training step")
    parser.add_argument("--steps", type=int, default=8, help="denoising steps per sampled image")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-peer", action="store_true", help="accepted like the other benches': no peer here")
    parser.add_argument("--phase", choices=[*TRAINING_PHASES, "sample"], help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=Path("bench/results/scaling.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    if args.phase is not None:  # a fresh process measuring one phase's peak memory at the first size
        variants, _ = size_variants(args.slots[0], args.batch, args.steps)
        report_phase_memory(variants[args.phase])
        return

    variants, parameters = {}, {}
    for slots in args.slots:
        size, parameters[slots] = size_variants(slots, args.batch, args.steps)
        variants.update({f"{slots}/{name}": function for name, function in size.items()})
    runs, summary, gflops = run_interleaved(variants, args.repeats)

    results = []
    for slots in args.slots:
        common_args = ["--slots", str(slots), "--batch", str(args.batch), "--steps", str(args.steps)]
        common_args += ["--threads", str(args.threads)]
        names = (*TRAINING_PHASES, *SAMPLING_PHASES)
        row = {
            "slots": slots,
            "image_size": image_size_of(slots),
            "training_sequence_length": TEXT_LENGTH + slots + 2,
            "parameters": parameters[slots],
            **{statistic: {name: values[f"{slots}/{name}"] for name in names} for statistic, values in summary.items()},
            "memory_mb": {
                name: phase_memory("bench_scaling.py", name, *common_args) for name in (*TRAINING_PHASES, "sample")
            },
            "raw_seconds_wall_cpu": {name: runs[f"{slots}/{name}"] for name in names},
        }
        for statistic in ("median", "min"):  # the minima: the quiet spells of a shared machine
            seconds = row[f"{statistic}_wall"]
            row[f"ratios_of_{statistic}_wall"] = {
                "training_over_lm_only": seconds["transfusion_step"] / seconds["lm_only_step"],
                "sampling_over_floor": seconds["sample"] / seconds["backbone_floor"],
            }
        results.append(row)

    print(
        f"cost against image size: training step (batch {args.batch} of {TEXT_LENGTH} text tokens + <boi> + N slots "
        f"+ <eoi>) and one image ({PROMPT_LENGTH}-token prompt, {args.steps} denoising steps); {MODEL}; "
        f"{args.repeats} interleaved repeats, {args.threads} threads, torch {torch.__version__}; matmul probe "
        f"{gflops[0]:.0f} -> {gflops[1]:.0f} GFLOP/s"
    )
    header = (
        f"| {'slots':>5} | {'tokens':>6} | {'step s':>7} | {'LM-only s':>9} | {'step ratio':>10} | {'us/token':>8} | "
        f"{'image s':>7} | {'floor s':>7} | {'image ratio':>11} | {'step peak RSS MB (+)':>20} | "
        f"{'LM-only peak RSS MB (+)':>23} | {'sampling peak RSS MB (+)':>24} |"
    )
    print(header)
    print("|" + "|".join("-" * (len(cell)) for cell in header.split("|")[1:-1]) + "|")
    for row in results:
        median, ratios, memory = row["median_wall"], row["ratios_of_median_wall"], row["memory_mb"]
        per_token = median["transfusion_step"] / (args.batch * row["training_sequence_length"]) * 1e6
        print(
            f"| {row['slots']:>5,} | {row['training_sequence_length']:>6,} | {median['transfusion_step']:>7.3f} | "
            f"{median['lm_only_step']:>9.3f} | {ratios['training_over_lm_only']:>9.2f}x | {per_token:>8.1f} | "
            f"{median['sample']:>7.3f} | {median['backbone_floor']:>7.3f} | {ratios['sampling_over_floor']:>10.2f}x | "
            f"{memory_cell(memory['transfusion_step']):>20} | {memory_cell(memory['lm_only_step']):>23} | "
            f"{memory_cell(memory['sample']):>24} |"
        )
    print("\nratios of the minima (the quiet spells)")
    for row in results:
        ratios, minimum = row["ratios_of_min_wall"], row["min_wall"]
        print(
            f"{row['slots']:>5,} | step {ratios['training_over_lm_only']:.2f}x ({minimum['transfusion_step']:.3f} s "
            f"vs {minimum['lm_only_step']:.3f} s), image {ratios['sampling_over_floor']:.2f}x ({minimum['sample']:.3f} "
            f"s vs {minimum['backbone_floor']:.3f} s)"
        )
    write_report(
        args.out,
        "bench/bench_scaling.py",
        model=MODEL,
        batch=args.batch,
        text_length=TEXT_LENGTH,
        prompt_length=PROMPT_LENGTH,
        steps=args.steps,
        repeats=args.repeats,
        threads=args.threads,
        matmul_gflops_start_end=gflops,
        results=results,
    )


if __name__ == "__main__":
    main()
