"""Benchmark of text decoding: tokens per second at the peer configuration, greedy, KV-cached.

64 new tokens after a 16-token prompt, one sequence, with

- `transfusion`: this project's `model.generate(generation_mode="text")` (transformers' decoding on our model);
- `interleaved`: `model.generate(generation_mode="interleaved", max_new_images=0)`, a text-only continuation through
  the Transfusion decoding loop that opens images;
- `lm_only`: transformers' own `generate` on the same Llama backbone as a plain `LlamaForCausalLM`;
- `peer`: transfusion-pytorch 0.20.0's `generate_text_only` (`bench/setup_peer.sh`), in its own process.

Repetitions interleaved; then each phase's peak memory in a fresh process (GPU memory with `--device cuda`). Run from
the repository root:

    python bench/bench_text_decoding.py [--repeats 10] [--threads 2] [--shape small|smollm2]
        [--device cuda --dtype bfloat16 --attn-implementation sdpa|flex_attention] [--out PATH]

(`--out` defaults to bench/results/text_decoding.json.)
"""

import argparse
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from common import (
    BOI,
    DTYPES,
    SHAPE_NAMES,
    SHAPES,
    add_device_arguments,
    build_model,
    device_arguments,
    memory_cell,
    optional_peer,
    phase_memory,
    report_phase_memory,
    run_interleaved,
    write_report,
)

PROMPT_LENGTH, NEW_TOKENS = 16, 64


@torch.no_grad()
def decode(model, prompt, **kwargs):
    out = model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS,
        do_sample=False,
        pad_token_id=0,
        **kwargs,
    )
    if out.shape[1] != PROMPT_LENGTH + NEW_TOKENS:
        raise RuntimeError(f"decoded {out.shape[1] - PROMPT_LENGTH} tokens instead of {NEW_TOKENS}")


def our_variants(args) -> dict:
    prompt = torch.randint(3, BOI, (1, PROMPT_LENGTH), generator=torch.Generator().manual_seed(0)).to(args.device)
    model = build_model(16, args.shape, args.device, args.dtype, args.attn_implementation)
    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(**SHAPES[args.shape])).eval()
    lm.set_attn_implementation(args.attn_implementation)
    lm.to(device=args.device, dtype=DTYPES[args.dtype])
    return {
        "transfusion": lambda: decode(model, prompt, generation_mode="text"),
        "interleaved": lambda: decode(model, prompt, generation_mode="interleaved", max_new_images=0),
        "lm_only": lambda: decode(lm, prompt),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-peer", action="store_true", help="skip transfusion-pytorch")
    add_device_arguments(parser)
    parser.add_argument("--phase", choices=["transfusion", "interleaved", "lm_only"], help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=Path("bench/results/text_decoding.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    if args.phase is not None:  # a fresh process measuring one phase's peak memory
        variant = our_variants(args)[args.phase]
        report_phase_memory(variant)
        return

    variants = our_variants(args)
    peer = optional_peer(args.no_peer or args.shape != "small", args.threads)
    if peer is not None:
        variants["peer"] = peer.timed_call("decode_text")

    runs, summary, gflops = run_interleaved(variants, args.repeats, warmup=2)
    memory = {
        name: phase_memory("bench_text_decoding.py", name, *device_arguments(args))
        for name in ("transfusion", "interleaved", "lm_only")
    }
    if peer is not None:
        memory["peer"] = peer.phase_memory("decode_text")
        peer.close()

    print(
        f"text decoding, {NEW_TOKENS} greedy tokens after a {PROMPT_LENGTH}-token prompt, {SHAPE_NAMES[args.shape]}; "
        f"{args.device}, {args.dtype}, {args.attn_implementation}; {args.repeats} interleaved repeats, {args.threads} "
        f"threads; matmul probe {gflops[0]:.0f} -> {gflops[1]:.0f} GFLOP/s"
    )
    header = f"{'variant':>12} | {'median s':>8} | {'tokens/s':>8} | {'vs lm_only':>10} | {'peak MB (+)':>16}"
    print(header)
    print("-" * len(header))
    median = summary["median_wall"]
    tokens_per_second = {name: NEW_TOKENS / seconds for name, seconds in median.items()}
    for name in variants:
        print(
            f"{name:>12} | {median[name]:>8.3f} | {tokens_per_second[name]:>8.0f} | "
            f"{median[name] / median['lm_only']:>9.3f}x | {memory_cell(memory[name]):>16}"
        )
    write_report(
        args.out,
        "bench/bench_text_decoding.py",
        model=SHAPE_NAMES[args.shape],
        shape=args.shape,
        device=args.device,
        dtype=args.dtype,
        attn_implementation=args.attn_implementation,
        ratios_of_median_wall={name: seconds / median["lm_only"] for name, seconds in median.items()},
        prompt_length=PROMPT_LENGTH,
        new_tokens=NEW_TOKENS,
        repeats=args.repeats,
        threads=args.threads,
        matmul_gflops_start_end=gflops,
        peer_torch=peer.torch_version if peer is not None else None,
        summary=summary,
        tokens_per_second=tokens_per_second,
        memory_mb=memory,
        raw_seconds_wall_cpu=runs,
    )


if __name__ == "__main__":
    main()
