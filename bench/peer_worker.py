"""Runs transfusion-pytorch (the peer) for the benchmarks, in the peer's own virtual environment.

This file imports only torch and `transfusion_pytorch`, never this project: `bench/setup_peer.sh` installs the peer
into a separate venv and the benchmarks start this script with that venv's Python. It builds the peer at the shape of
../shared/notes/peers.md (dim 256, depth 4, 4 heads of 64, GEGLU feed-forward of inner width 682, 256 text tokens,
latents of 8x8 positions with 16 values each) and then answers one JSON command per line on stdin:

    {"op": "train_step"}              one AdamW step on a batch of 8 samples of 128 text tokens + 1 image
    {"op": "sample", "cfg": 3.0}      one image from a 16-token prompt with `sample_many` (prefix KV-cached)
    {"op": "decode_text"}             64 greedy text tokens with `generate_text_only` (KV-cached)

with `{"wall": seconds, "cpu": seconds}` (the timed call only). For the quality benchmark it also trains a peer of a
given size on data the benchmark wrote (`.npz`, arrays only) and samples images from it:

    {"op": "quality_init", "data": PATH, "dim": 192, "depth": 4, "heads": 4, "lr": 0.001, ...}
    {"op": "train_for", "seconds": 30}                       AdamW steps until the time is up
    {"op": "sample_images", "prompts": PATH, "out": PATH, "cfg": 3.0, "batch_size": 50}
 `python peer_worker.py --phase NAME` instead runs one
phase three times and prints the process's peak resident memory and its memory before the phase ran.
"""

import argparse
import json
import sys
import time

import numpy as np
import torch
from transfusion_pytorch import Transfusion

DIM, DEPTH, HEADS, DIM_HEAD, VOCAB = 256, 4, 4, 64, 256
LATENT_SHAPE, DIM_LATENT = (8, 8), 16
BATCH, TEXT_LENGTH, PROMPT_LENGTH, DECODE_TOKENS = 8, 128, 16, 64


def build_peer() -> Transfusion:
    return Transfusion(
        num_text_tokens=VOCAB,
        dim_latent=DIM_LATENT,
        modality_default_shape=LATENT_SHAPE,
        transformer=dict(dim=DIM, depth=DEPTH, heads=HEADS, dim_head=DIM_HEAD),
        odeint_kwargs=dict(method="euler"),
    )


class Peer:
    def __init__(self, steps: int, seed: int = 0):
        torch.manual_seed(seed)
        self.model = build_peer()
        self.time_points = steps + 1  # Euler over steps + 1 time points: one transformer call per step
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.batch = [
            [torch.randint(0, VOCAB, (TEXT_LENGTH,)), torch.randn(*LATENT_SHAPE, DIM_LATENT)] for _ in range(BATCH)
        ]
        self.prompt = torch.randint(0, VOCAB, (PROMPT_LENGTH,))

    def parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def train_step(self):
        self.model.train()
        loss = self.model(self.batch)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    @torch.no_grad()
    def sample(self, cfg: float = 1.0):
        self.model.eval()
        # `max_length` counts generated tokens: one less than the image's stops the sample when the image is done.
        return self.model.sample_many(
            [self.prompt],
            force_modality_at_start=0,
            modality_steps=self.time_points,
            max_length=LATENT_SHAPE[0] * LATENT_SHAPE[1] - 1,
            cfg_scale=cfg,
            return_unprocessed_modalities=True,
        )

    @torch.no_grad()
    def decode_text(self):
        self.model.eval()
        return self.model.generate_text_only(self.prompt[None], PROMPT_LENGTH + DECODE_TOKENS, temperature=0.0)


class QualityPeer:
    """A peer of the quality benchmark's size, trained on its data: caption token ids then one image of patch
    latents `(h, w, values)`. Batches are drawn with numpy's `RandomState(seed)` exactly as the benchmark draws them
    for this project's model, so both see the same images and captions in the same order."""

    def __init__(self, command: dict):
        data = np.load(command["data"], allow_pickle=False)
        self.latents = torch.from_numpy(data["latents"])  # [num_images, h, w, values]
        self.labels, self.captions = data["labels"], data["caption_ids"]  # captions [classes, variants, length]
        self.caption_lengths = data["caption_lengths"]
        self.batch_size, self.clip = command["batch_size"], command["max_grad_norm"]
        self.rng = np.random.RandomState(command["seed"])
        torch.manual_seed(command["seed"])
        heads = command["heads"]
        self.model = Transfusion(
            num_text_tokens=command["vocab_size"],
            dim_latent=self.latents.shape[-1],
            modality_default_shape=tuple(self.latents.shape[1:3]),
            transformer=dict(
                dim=command["dim"],
                depth=command["depth"],
                heads=heads,
                dim_head=command["dim"] // heads,
                ff_expansion_factor=command["ff_expansion_factor"],
            ),
        )
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=command["lr"], betas=(0.9, 0.95), weight_decay=command["weight_decay"]
        )
        self.warmup, self.peak_lr, self.steps = command["warmup_steps"], command["lr"], 0

    def caption(self, label: int, variant: int) -> torch.Tensor:
        return torch.from_numpy(self.captions[label, variant, : self.caption_lengths[label, variant]])

    def train_for(self, seconds: float) -> dict:
        self.model.train()
        start, loss = time.perf_counter(), None
        while time.perf_counter() - start < seconds:
            indices = self.rng.randint(len(self.labels), size=self.batch_size)
            variants = self.rng.randint(self.captions.shape[1], size=self.batch_size)
            batch = [[self.caption(self.labels[i], v), self.latents[i]] for i, v in zip(indices, variants)]
            for group in self.optimizer.param_groups:
                group["lr"] = self.peak_lr * min(1.0, (self.steps + 1) / self.warmup)
            loss = self.model(batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.steps += 1
        return {"steps": self.steps, "loss": loss.item()}

    @torch.no_grad()
    def sample_images(self, command: dict) -> dict:
        self.model.eval()
        prompts = np.load(command["prompts"], allow_pickle=False)
        labels, variants = prompts["labels"], prompts["variants"]
        shape = tuple(self.latents.shape[1:3])
        images = []
        for i in range(0, len(labels), command["batch_size"]):
            torch.manual_seed(command["seed"] + i)
            rows = slice(i, i + command["batch_size"])
            batch = [self.caption(k, v) for k, v in zip(labels[rows], variants[rows])]
            samples = self.model.sample_many(
                batch,
                force_modality_at_start=(0, shape),
                max_length=shape[0] * shape[1] - 1,  # stop when the image is done
                cfg_scale=command["cfg"],
                return_unprocessed_modalities=True,
            )
            for sample in samples:  # the first image of each sample
                images.append(next(item for item in sample if not torch.is_tensor(item))[1])
        np.save(command["out"], torch.stack(images).float().numpy())
        return {"images": len(images)}


def run(peer, command: dict) -> dict:
    op = command["op"]
    if op == "train_for":
        return peer.train_for(command["seconds"])
    if op == "sample_images":
        return peer.sample_images(command)
    if op == "train_step":
        peer.train_step()
    elif op == "sample":
        peer.sample(command.get("cfg", 1.0))
    elif op == "decode_text":
        peer.decode_text()
    else:
        raise ValueError(f"unknown op {op!r}")
    return {}


def status_mb(field: str) -> float:
    """A memory field of /proc/self/status (VmHWM: this process's own peak, unlike `ru_maxrss`, which starts from
    the parent's peak at the fork)."""
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith(f"{field}:"))
    return int(line.split()[1]) / 1024


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--phase", default=None, help="run this op 3 times and print the peak resident memory")
    parser.add_argument("--cfg", type=float, default=1.0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    peer = Peer(args.steps)

    if args.phase is not None:
        before = status_mb("VmRSS")
        for _ in range(3):
            run(peer, {"op": args.phase, "cfg": args.cfg})
        print(json.dumps({"peak_rss_mb": status_mb("VmHWM"), "before_mb": before}))
        return

    print(json.dumps({"ready": True, "parameters": peer.parameters(), "torch": torch.__version__}), flush=True)
    for line in sys.stdin:
        command = json.loads(line)
        if command["op"] == "quality_init":
            peer = QualityPeer(command)
            result = {"parameters": sum(p.numel() for p in peer.model.parameters())}
        else:
            wall, cpu = time.perf_counter(), time.process_time()
            result = run(peer, command)
            result = {**result, "wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu}
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
