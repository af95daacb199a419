"""Benchmark of modality experts: what routing costs, against the same model without experts, back to back.

At SmolLM2-135M's shape (random weights: width 576, 30 layers, 9 heads of 64, 3 key-value heads, MLP 1536, vocabulary
49152, 8x8x4 latents in 16 slots) or, with `--shape small`, the peer's (see common.py). Three measurements, the
repetitions of each interleaved:

- training step (forward, backward, AdamW) at equal tokens, 8 rows of a 24-token caption then a 16-slot image:
  `dense` (no experts), `experts` (full experts, every weight trained) and `experts_frozen_text`
  (`freeze_text_path()`: the LMFusion recipe);
- forward and backward alone (no optimizer) of the same batch, `dense` and `experts`: the routing's own cost, apart
  from AdamW's, which grows with the number of trained parameters;
- text decoding, 64 greedy tokens after a 16-token prompt (as bench_text_decoding.py): `lm_only` (transformers'
  `generate` on the plain `LlamaForCausalLM` with the text weights), `dense` and `experts` (`generation_mode="text"`);
- one denoising step (16 slots against a cached 24-token prefix, `TransfusionModel.denoise_step`): `dense`, `experts`.

Run from the repository root:

    python bench/bench_experts.py [--shape smollm2|small] [--repeats 10] [--out bench/results/experts.json]
"""

import argparse
from pathlib import Path

import torch
from bench_text_decoding import PROMPT_LENGTH, decode
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from modeling_transfusion import TransfusionConfig, TransfusionForConditionalGeneration

from common import SHAPES, run_interleaved, write_report

BATCH, CAPTION = 8, 24


def build(shape: str, experts: bool) -> TransfusionForConditionalGeneration:
    text_config = SHAPES[shape]
    vocab = text_config["vocab_size"]
    ids = {"boi_token_id": vocab - 3, "eoi_token_id": vocab - 2, "image_token_id": vocab - 1}
    config = TransfusionConfig(
        text_config=text_config,
        image_size=8,
        num_channels=4,
        latent_channels=4,
        patch_size=2,
        modality_experts=experts,
        **ids,
    )
    torch.manual_seed(0)
    model = TransfusionForConditionalGeneration(config).eval()
    torch.nn.init.normal_(model.model.patch_decoder.proj.weight, std=0.02)
    return model


def training_batch(config) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    text = torch.randint(3, config.boi_token_id, (BATCH, CAPTION), generator=generator)
    image = [config.boi_token_id] + [config.image_token_id] * config.num_image_tokens + [config.eoi_token_id]
    input_ids = torch.cat([text, torch.tensor(image).expand(BATCH, -1)], dim=-1)
    latents = torch.randn(BATCH, 4, 8, 8, generator=generator)
    return {"input_ids": input_ids, "labels": input_ids.clone(), "image_latents": latents, "logits_to_keep": 1}


def train_step(model, batch, optimize: bool = True):
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def step():
        model(**batch).loss.backward()
        if optimize:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def denoising_step(model):
    """One step of 16 slots against a cached prefix: the cache is rolled back after each call."""
    config = model.config
    prefix = torch.randint(3, config.boi_token_id, (1, CAPTION), generator=torch.Generator().manual_seed(1))
    prefix[0, -1] = config.boi_token_id
    with torch.no_grad():
        cache = model(input_ids=prefix, use_cache=True, cache=DynamicCache(config=config.text_config)).cache
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    positions = torch.arange(CAPTION, CAPTION + config.num_image_tokens)[None]
    timesteps = torch.tensor([500])

    @torch.no_grad()
    def step():
        model.model.denoise_step(latents, timesteps, cache, positions)

    return step


def plain_lm(model) -> LlamaForCausalLM:
    """A plain `LlamaForCausalLM` holding the model's text weights."""
    lm = LlamaForCausalLM(LlamaConfig(**model.config.text_config.to_dict())).eval()
    state = {name.replace("model.language_model.", "model."): t for name, t in model.state_dict().items()}
    lm.load_state_dict({name: state[name] for name in lm.state_dict()})
    return lm


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="smollm2")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench/results/experts.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    dense, experts, frozen = build(args.shape, False), build(args.shape, True), build(args.shape, True)
    frozen.freeze_text_path()
    batch = training_batch(dense.config)
    prompt = torch.randint(3, dense.config.boi_token_id, (1, PROMPT_LENGTH), generator=torch.Generator().manual_seed(0))
    lm = plain_lm(dense)
    measurements = {
        "training step": {
            "dense": train_step(dense, batch),
            "experts": train_step(experts, batch),
            "experts_frozen_text": train_step(frozen, batch),
        },
        "forward+backward": {
            "dense": train_step(dense, batch, optimize=False),
            "experts": train_step(experts, batch, optimize=False),
        },
        "text decoding": {
            "lm_only": lambda: decode(lm, prompt),
            "dense": lambda: decode(dense.eval(), prompt, generation_mode="text"),
            "experts": lambda: decode(experts.eval(), prompt, generation_mode="text"),
        },
        "denoising step": {"dense": denoising_step(dense), "experts": denoising_step(experts)},
    }
    baselines = {
        "training step": "dense",
        "forward+backward": "dense",
        "text decoding": "lm_only",
        "denoising step": "dense",
    }
    targets = {"training step": 1.10, "forward+backward": 1.10, "text decoding": 1.05, "denoising step": 1.05}

    print(f"modality experts at the {args.shape} shape; {args.repeats} interleaved repeats, {args.threads} threads")
    header = f"{'measurement':>16} | {'variant':>20} | {'median s':>9} | {'ratio':>7} | target"
    print(header)
    print("-" * len(header))
    results = {}
    for name, variants in measurements.items():
        if name not in ("training step", "forward+backward"):
            for model in (dense, experts):
                model.eval()
        runs, summary, gflops = run_interleaved(variants, args.repeats, warmup=1)
        median = summary["median_wall"]
        baseline = median[baselines[name]]
        ratios = {variant: seconds / baseline for variant, seconds in median.items()}
        for variant in variants:
            target = f"<= {targets[name]:.2f}x" if variant.startswith("experts") else ""
            print(f"{name:>16} | {variant:>20} | {median[variant]:>9.4f} | {ratios[variant]:>6.3f}x | {target}")
        results[name] = {
            "baseline": baselines[name],
            "target": targets[name],
            "summary": summary,
            "ratios_of_median_wall": ratios,
            "matmul_gflops_start_end": gflops,
            "raw_seconds_wall_cpu": runs,
        }
    write_report(
        args.out,
        "bench/bench_experts.py",
        shape=args.shape,
        text_config=SHAPES[args.shape],
        batch=BATCH,
        caption_tokens=CAPTION,
        image_slots=dense.config.num_image_tokens,
        repeats=args.repeats,
        threads=args.threads,
        results=results,
    )


if __name__ == "__main__":
    main()
