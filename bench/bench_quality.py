"""Quality per CPU-minute: this project's model and transfusion-pytorch, trained for the same wall-clock time on the
recipe's MNIST data, then judged by the recipe's evaluation.

Both models get the same backbone size (width 192, 4 layers, 4 heads, feed-forward inner width 512: the recipe's
bundled model), the same data and the same optimiser:

- images: MNIST's 60,000 training digits padded to 32x32 and encoded once by the bundled checkpoint's VAE into 8x8x4
  latents, cut into 2x2 patches (16 positions of 16 values; the peer receives them as its `(4, 4, 16)` modality);
- captions: the recipe's generation prompts ("a handwritten digit seven", ...), tokenised by the bundled tokenizer;
  each step draws 64 (image, prompt) pairs from the same `numpy.random.RandomState`, so both see the same batches;
- AdamW (0.9, 0.95), weight decay 0.1, learning rate 1e-3 after 100 linear warm-up steps, gradient clipping at 1;
  condition dropout 0.1 for classifier-free guidance in both.

Training alternates chunks (30 s by default) between the two, so a busy spell of the machine hits both alike, until
each has trained for `--seconds`. Then each generates 500 images for balanced prompts with its own default sampler
and guidance 3 (this project: DPM-Solver++, 20 steps; the peer: its midpoint ODE solver over 16 time points), decoded
by the same VAE and judged by the recipe's CNN: prompt accuracy and Frechet distance (see docs/results.md). The
first 100 images of each go into a PNG grid beside the JSON. Run from
the repository root after `transfusion data install --only mnist` and `bash bench/setup_peer.sh`:

    python bench/bench_quality.py [--seconds 300] [--chunk 30] [--out bench/results/quality.json]
"""

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from modeling_transfusion import patchify, unpatchify
from modeling_transfusion.recipes.classifier import JudgeCNN
from modeling_transfusion.recipes.cli import load_checkpoint
from modeling_transfusion.recipes.data import (
    GENERATION_TEMPLATES,
    generation_prompt,
    load_dataset_images,
    to_model_range,
)
from modeling_transfusion.recipes.evaluation import balanced_prompts, generate_images, generated_image_metrics
from modeling_transfusion.recipes.figures import image_grid
from modeling_transfusion.recipes.training import (
    LatentDataCollator,
    ModelSize,
    build_model,
    default_generation_config,
)

from common import PeerWorker, count_parameters, write_report

SIZE = ModelSize(
    hidden_size=192, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512, patch_encoder="linear"
)
OPTIMISER = {"lr": 1e-3, "weight_decay": 0.1, "warmup_steps": 100, "max_grad_norm": 1.0, "batch_size": 64, "seed": 0}


def caption_tables(tokenizer) -> tuple[list[list[str]], np.ndarray, np.ndarray]:
    """The recipe's generation prompts per class and template, their texts and token ids (padded, with lengths)."""
    num_variants = len(GENERATION_TEMPLATES["mnist"])
    texts = [[generation_prompt("mnist", k, v) for v in range(num_variants)] for k in range(10)]
    ids = [[tokenizer(text, add_special_tokens=False)["input_ids"] for text in row] for row in texts]
    lengths = np.array([[len(row_ids) for row_ids in row] for row in ids])
    padded = np.zeros((*lengths.shape, lengths.max()), dtype=np.int64)
    for k, row in enumerate(ids):
        for v, row_ids in enumerate(row):
            padded[k, v, : len(row_ids)] = row_ids
    return texts, padded, lengths


class OurTrainer:
    """This project's model, trained with the same loop as the peer's worker (`bench/peer_worker.py`)."""

    def __init__(self, model, processor, latents, labels, caption_texts):
        self.model, self.processor, self.latents = model.train(), processor, latents
        self.labels, self.caption_texts = labels, caption_texts
        self.collator = LatentDataCollator(processor)
        self.rng = np.random.RandomState(OPTIMISER["seed"])
        self.optimizer = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad],
            lr=OPTIMISER["lr"],
            betas=(0.9, 0.95),
            weight_decay=OPTIMISER["weight_decay"],
        )
        self.steps = 0
        self.parameters = count_parameters(model) - count_parameters(model.vae)

    def train_for(self, seconds: float) -> dict:
        start, cpu, loss = time.perf_counter(), time.process_time(), None
        while time.perf_counter() - start < seconds:
            size = OPTIMISER["batch_size"]
            indices = self.rng.randint(len(self.labels), size=size)
            variants = self.rng.randint(len(self.caption_texts[0]), size=size)
            records = [
                {"text": self.caption_texts[self.labels[i]][v] + " <image>", "latents": self.latents[i : i + 1]}
                for i, v in zip(indices, variants)
            ]
            for group in self.optimizer.param_groups:
                group["lr"] = OPTIMISER["lr"] * min(1.0, (self.steps + 1) / OPTIMISER["warmup_steps"])
            loss = self.model(**self.collator(records)).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), OPTIMISER["max_grad_norm"])
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.steps += 1
        return {"steps": self.steps, "loss": loss.item(), "cpu": time.process_time() - cpu}

    def generate(self, targets: list[int], prompts: list[str]) -> torch.Tensor:
        self.model.eval()
        return generate_images(self.model, self.processor, prompts, seeds=list(range(len(prompts))))


class PeerTrainer:
    """The peer in its worker process (`bench/peer_worker.py`), given the same data as `.npz` arrays: the patch
    latents as its `(4, 4, 16)` modality and the caption token ids. Its images come back as patch latents and are
    decoded by `decode` (the bundled VAE)."""

    def __init__(self, scratch: Path, data: dict[str, np.ndarray], vocab_size: int, threads: int, decode):
        self.scratch, self.decode = scratch, decode
        np.savez(scratch / "data.npz", **data)
        self.worker = PeerWorker(steps=32, threads=threads)
        self.parameters = self.worker.request(
            "quality_init",
            data=str(scratch / "data.npz"),
            vocab_size=vocab_size,
            dim=SIZE.hidden_size,
            depth=SIZE.num_hidden_layers,
            heads=SIZE.num_attention_heads,
            ff_expansion_factor=SIZE.intermediate_size * 3 / (2 * SIZE.hidden_size),  # GEGLU inner width 512
            **OPTIMISER,
        )["parameters"]

    def train_for(self, seconds: float) -> dict:
        return self.worker.request("train_for", seconds=seconds)

    def generate(self, targets: list[int], prompts: list[str]) -> torch.Tensor:
        # The same prompts as `balanced_prompts`: image i uses template i // 10 (its caption_ids row).
        variants = np.arange(len(targets)) // 10 % len(GENERATION_TEMPLATES["mnist"])
        np.savez(self.scratch / "prompts.npz", labels=np.array(targets), variants=variants)
        out = self.scratch / "peer.npy"
        self.worker.request(
            "sample_images", prompts=str(self.scratch / "prompts.npz"), out=str(out), cfg=3.0, batch_size=50, seed=0
        )
        return self.decode(torch.from_numpy(np.load(out, allow_pickle=False)))

    def close(self):
        self.worker.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=300.0, help="training wall-clock time of each model")
    parser.add_argument("--chunk", type=float, default=30.0, help="seconds each model trains before the other's turn")
    parser.add_argument("--num-generated", type=int, default=500)
    parser.add_argument("--checkpoint", default="checkpoints/transfusion-mnist", help="VAE and tokenizer source")
    parser.add_argument("--judge", default="checkpoints/judge-mnist")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench/results/quality.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    base, processor = load_checkpoint(args.checkpoint)
    config = base.config
    images, labels = load_dataset_images("mnist", "train", config.image_size)
    with torch.no_grad():
        latents = torch.cat([base.encode_images(chunk) for chunk in to_model_range(images).split(1000)])
    caption_texts, caption_ids, caption_lengths = caption_tables(processor.tokenizer)
    side = config.latent_size // config.patch_size

    @torch.no_grad()
    def decode_patches(patches: torch.Tensor) -> torch.Tensor:
        latents = unpatchify(patches.flatten(1, 2), config.patch_size, config.latent_channels)
        return base.decode_latents(latents).clamp(-1, 1)

    ours = build_model(processor.tokenizer, base.vae, config.image_size, config.num_channels, SIZE, config.patch_size)
    ours.generation_config = default_generation_config(ours)
    with tempfile.TemporaryDirectory() as scratch:
        peer_data = {
            "latents": patchify(latents, config.patch_size).reshape(len(latents), side, side, -1).numpy(),
            "labels": np.asarray(labels),
            "caption_ids": caption_ids,
            "caption_lengths": caption_lengths,
        }
        trainers = {
            "transfusion": OurTrainer(ours, processor, latents, labels, caption_texts),
            "peer": PeerTrainer(Path(scratch), peer_data, len(processor.tokenizer), args.threads, decode_patches),
        }
        results = {name: {"seconds": 0.0, "cpu_seconds": 0.0} for name in trainers}
        while min(record["seconds"] for record in results.values()) < args.seconds:
            for name, trainer in trainers.items():
                chunk = min(args.chunk, args.seconds - results[name]["seconds"])
                if chunk <= 0:
                    continue
                wall = time.perf_counter()
                result = trainer.train_for(chunk)
                results[name]["seconds"] += time.perf_counter() - wall
                results[name]["cpu_seconds"] += result["cpu"]
                results[name].update(steps=result["steps"], last_loss=result["loss"])
                seconds, steps = results[name]["seconds"], result["steps"]
                print(f"{name:>12}: {seconds:6.0f} s, {steps:5d} steps, loss {result['loss']:.3f}")

        judge = JudgeCNN.load(args.judge)
        test_images, test_labels = load_dataset_images("mnist", "test", config.image_size)
        test_images = to_model_range(test_images)
        targets, prompts = balanced_prompts("mnist", args.num_generated)
        for name, trainer in trainers.items():
            start = time.perf_counter()
            generated = trainer.generate(targets, prompts)
            results[name]["sampling_seconds"] = time.perf_counter() - start
            results[name]["parameters"] = trainer.parameters
            with torch.no_grad():
                results[name].update(generated_image_metrics(judge, generated, targets, test_images, list(test_labels)))
            grid = args.out.with_name(f"{args.out.stem}_{name}.png")  # the first 100: ten per class, in columns
            image_grid([row[0] for row in processor.postprocess_images(generated[:100])], columns=10, scale=2).save(
                grid
            )
        trainers["peer"].close()

    print(
        f"\nquality after {args.seconds:.0f} s of training each ({args.threads} threads), {args.num_generated} images"
        f" judged, guidance 3"
    )
    header = (
        f"{'model':>12} | {'parameters':>10} | {'steps':>6} | {'steps/s':>7} | {'prompt accuracy':>15} | "
        f"{'Frechet distance':>16} | {'floor':>6} | {'sampling s/img':>14}"
    )
    print(header)
    print("-" * len(header))
    for name, record in results.items():
        print(
            f"{name:>12} | {record['parameters']:>10,} | {record['steps']:>6} | "
            f"{record['steps'] / record['seconds']:>7.2f} | {record['prompt_accuracy']:>15.3f} | "
            f"{record['frechet_distance']:>16.2f} | {record['frechet_floor']:>6.2f} | "
            f"{record['sampling_seconds'] / args.num_generated:>14.3f}"
        )
    write_report(
        args.out,
        "bench/bench_quality.py",
        model=f"width {SIZE.hidden_size}, {SIZE.num_hidden_layers} layers, {SIZE.num_attention_heads} heads, "
        f"feed-forward {SIZE.intermediate_size}; 16 patches of 16 latent values",
        training_seconds_each=args.seconds,
        chunk_seconds=args.chunk,
        threads=args.threads,
        optimiser=OPTIMISER,
        num_generated=args.num_generated,
        results=results,
    )


if __name__ == "__main__":
    main()
