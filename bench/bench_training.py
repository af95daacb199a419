"""Benchmark of one training step (forward, backward, AdamW) at the peer configuration.

Three variants, their repetitions interleaved in one run:

- `transfusion`: this project's model on batches of 8 sequences of 128 text tokens + `<boi>`, 64 image slots,
  `<eoi>` (194 tokens), the LM loss plus the diffusion loss of a randomly noised image;
- `lm_only`: the same Llama backbone as a plain causal LM (`LlamaForCausalLM`) over the same 194 tokens: the floor,
  since a multimodal model cannot beat its own backbone;
- `peer`: transfusion-pytorch 0.20.0 (`bench/setup_peer.sh`) through its own API on 8 samples of 128 text tokens +
  one 8x8 image of 16 latent values (it wraps them into 200 tokens), in its own process.

Then each phase's peak resident memory, in a fresh process per phase. Run from the repository root:

    python bench/bench_training.py [--repeats 10] [--threads 2] [--out bench/results/training.json]
"""

import argparse
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from common import (
    BOI,
    EOI,
    IMAGE,
    PEER_SHAPE,
    PEER_TEXT_CONFIG,
    build_model,
    count_parameters,
    memory_cell,
    optional_peer,
    phase_memory,
    report_phase_memory,
    run_interleaved,
    write_report,
)

BATCH, TEXT_LENGTH = 8, 128


def training_batch(num_slots: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    text = torch.randint(3, BOI, (BATCH, TEXT_LENGTH), generator=generator)
    image = torch.tensor([BOI] + [IMAGE] * num_slots + [EOI]).expand(BATCH, -1)
    input_ids = torch.cat([text, image], dim=-1)
    return {"input_ids": input_ids, "labels": input_ids.clone()}


def train_step(model, optimizer, batch):
    def step():
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def our_variants(compile_model: bool = False) -> tuple[dict, dict[str, int]]:
    """The in-process variants (transfusion, lm_only, and with `compile_model` transfusion_compiled: the same model
    under `torch.compile`) and their parameter counts."""
    model = build_model().train()
    batch = training_batch(model.config.num_image_tokens)
    config = model.config
    latent_shape = (BATCH, config.latent_channels, config.latent_size, config.latent_size)
    multimodal = {**batch, "image_latents": torch.randn(latent_shape, generator=torch.Generator().manual_seed(1))}
    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(**PEER_TEXT_CONFIG)).train()
    variants = {
        "transfusion": train_step(model, torch.optim.AdamW(model.parameters(), lr=1e-4), multimodal),
        "lm_only": train_step(lm, torch.optim.AdamW(lm.parameters(), lr=1e-4), batch),
    }
    parameters = {"transfusion": count_parameters(model), "lm_only": count_parameters(lm)}
    if compile_model:
        compiled = build_model().train()
        optimizer = torch.optim.AdamW(compiled.parameters(), lr=1e-4)
        variants["transfusion_compiled"] = train_step(torch.compile(compiled), optimizer, multimodal)
        parameters["transfusion_compiled"] = parameters["transfusion"]
    return variants, parameters


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-peer", action="store_true", help="skip transfusion-pytorch")
    parser.add_argument("--compile", action="store_true", help="also time the model under torch.compile")
    parser.add_argument("--phase", choices=["transfusion", "lm_only"], help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=Path("bench/results/training.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    if args.phase is not None:  # a fresh process measuring one phase's peak memory
        variants, _ = our_variants()
        report_phase_memory(variants[args.phase])
        return

    variants, parameters = our_variants(args.compile)
    peer = optional_peer(args.no_peer, args.threads)
    if peer is not None:
        variants["peer"] = peer.timed_call("train_step")
        parameters["peer"] = peer.parameters

    runs, summary, gflops = run_interleaved(variants, args.repeats, warmup=2)
    memory = {name: phase_memory("bench_training.py", name) for name in ("transfusion", "lm_only")}
    if peer is not None:
        memory["peer"] = peer.phase_memory("train_step")
        peer.close()

    print(
        f"training step (forward + backward + AdamW), batch {BATCH}, {PEER_SHAPE}; {args.repeats} interleaved "
        f"repeats, {args.threads} threads, torch {torch.__version__}; matmul probe {gflops[0]:.0f} -> "
        f"{gflops[1]:.0f} GFLOP/s"
    )
    header = (
        f"{'variant':>20} | {'parameters':>10} | {'median s':>8} | {'min s':>6} | {'median CPU s':>12} | "
        f"{'vs lm_only':>10} | {'peer / this':>11} | {'peak RSS MB (+)':>16}"
    )
    print(header)
    print("-" * len(header))
    median = summary["median_wall"]
    for name in variants:
        versus_peer = f"{median['peer'] / median[name]:>10.2f}x" if peer is not None else f"{'-':>11}"
        print(
            f"{name:>20} | {parameters[name]:>10,} | {median[name]:>8.3f} | {summary['min_wall'][name]:>6.3f} | "
            f"{summary['median_cpu'][name]:>12.3f} | {median[name] / median['lm_only']:>9.2f}x | {versus_peer} | "
            f"{memory_cell(memory[name]) if name in memory else '-':>16}"
        )
    write_report(
        args.out,
        "bench/bench_training.py",
        model=PEER_SHAPE,
        batch=BATCH,
        sequence="128 text + <boi> + 64 image slots + <eoi> = 194 tokens (peer: 200 after its wrapping)",
        repeats=args.repeats,
        threads=args.threads,
        matmul_gflops_start_end=gflops,
        parameters=parameters,
        peer_torch=peer.torch_version if peer is not None else None,
        summary=summary,
        overhead_vs_lm_only=median["transfusion"] / median["lm_only"],
        speedup_vs_peer=median["peer"] / median["transfusion"] if peer is not None else None,
        memory_mb=memory,
        raw_seconds_wall_cpu=runs,
    )


if __name__ == "__main__":
    main()
