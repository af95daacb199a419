"""The discrete-token baseline of the paper's controlled comparison (its Chameleon-style model), from well-kept parts.

- Image tokenizer: a diffusers `VQModel` trained here on the same images as the Transfusion VAE, with the same
  encoder/decoder architecture and downsampling, so an image becomes a grid of codebook indices (raster order), as
  the paper's baseline VQ-VAE shares its VAE's architecture.
- Language model: a plain transformers `*ForCausalLM` with the Transfusion model's backbone configuration, its
  vocabulary extended by the codebook (code `c` is token `text_vocab_size + c`), trained with next-token loss on text
  and image tokens alike. Sequences keep Transfusion's layout: `<s> caption <boi> code ... code <eoi> </s>`.
- Image generation samples exactly one grid of code tokens after `<boi>` (text tokens suppressed), with
  classifier-free guidance on the logits (transformers' `guidance_scale` with the unconditional prompt `<s> <boi>`);
  captioning is greedy decoding with code tokens suppressed.
"""

import copy
import math
import time
from dataclasses import dataclass

import torch
from diffusers import VQModel
from transformers import AutoModelForCausalLM, PreTrainedModel

from modeling_transfusion import TransfusionConfig, TransfusionProcessor
from modeling_transfusion.recipes.training import LatentDataCollator
from modeling_transfusion.recipes.vae import autoencoder_geometry


@dataclass
class VQTrainingResult:
    """The trained VQ autoencoder and what its training measured (reconstruction MSE is on [-1, 1] pixels; codebook
    usage is the fraction of codes used by the test images)."""

    vq: VQModel
    train_mse: float
    test_mse: float
    codebook_usage: float
    steps: int
    seconds: float


def build_vq(
    num_channels: int = 1,
    latent_channels: int = 4,
    block_out_channels: tuple[int, ...] = (32, 64, 64),
    codebook_size: int = 512,
) -> VQModel:
    """A `VQModel` with the geometry of [`~recipes.vae.build_vae`] (downsampling `2 ** (len(block_out_channels) - 1)`,
    no mid-block attention) and a codebook of `codebook_size` vectors of `latent_channels` values."""
    geometry = autoencoder_geometry(num_channels, latent_channels, block_out_channels)
    return VQModel(**geometry, num_vq_embeddings=codebook_size, lookup_from_codebook=True)


@torch.no_grad()
def encode_codes(vq: VQModel, pixels: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Codebook indices `(n, grid * grid)`, in raster order, of images `(n, c, h, w)` in [-1, 1]."""
    vq.eval()
    codes = []
    for i in range(0, len(pixels), batch_size):
        latents = vq.encode(pixels[i : i + batch_size]).latents
        _, _, (_, _, indices) = vq.quantize(latents)
        codes.append(indices.view(len(latents), -1))
    return torch.cat(codes)


@torch.no_grad()
def decode_codes(vq: VQModel, codes: torch.Tensor) -> torch.Tensor:
    """Images `(n, c, h, w)` in [-1, 1] from codebook indices `(n, grid * grid)`."""
    grid = math.isqrt(codes.shape[1])
    if grid * grid != codes.shape[1]:
        raise ValueError(f"An image has a square grid of codes, got {codes.shape[1]} codes per image.")
    shape = (len(codes), grid, grid, vq.quantize.vq_embed_dim)
    return vq.decode(codes.flatten(), force_not_quantize=True, shape=shape).sample.clamp(-1, 1)


def vq_reconstruction_mse(vq: VQModel, pixels: torch.Tensor) -> float:
    """Mean squared error, on [-1, 1] pixels, of decoding the codes of each image."""
    return float(((decode_codes(vq, encode_codes(vq, pixels)) - pixels.clamp(-1, 1)) ** 2).mean())


def train_vq(
    train_pixels: torch.Tensor,
    test_pixels: torch.Tensor,
    steps: int = 400,
    batch_size: int = 64,
    learning_rate: float = 2e-3,
    codebook_size: int = 512,
    latent_channels: int = 4,
    block_out_channels: tuple[int, ...] = (32, 64, 64),
    seed: int = 0,
) -> VQTrainingResult:
    """Trains a VQ autoencoder on images `(n, c, h, w)` in [-1, 1]: pixel MSE plus diffusers' codebook and commitment
    terms (beta 0.25), AdamW with warm-up and cosine decay (the optimiser of [`~recipes.vae.train_vae`]).

    Codes that no latent of a batch chose are moved onto random latents of that batch every 20 steps during the first
    half of training (the usual restart of dead codes): without it a small codebook collapses to a few codes.
    """
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    vq = build_vq(train_pixels.shape[1], latent_channels, block_out_channels, codebook_size)
    optimizer = torch.optim.AdamW(vq.parameters(), lr=learning_rate, betas=(0.9, 0.95), weight_decay=0.0)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps)),
    )
    codebook = vq.quantize.embedding.weight
    start = time.perf_counter()
    vq.train()
    for step in range(steps):
        batch = train_pixels[torch.randint(0, len(train_pixels), (batch_size,), generator=generator)]
        latents = vq.encode(batch).latents
        out = vq.decode(latents)
        loss = ((out.sample - batch) ** 2).mean() + out.commit_loss.mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vq.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 20 == 0 and step < steps // 2:
            with torch.no_grad():
                flat = latents.detach().permute(0, 2, 3, 1).reshape(-1, codebook.shape[1])
                used = torch.cdist(flat, codebook).argmin(1).bincount(minlength=len(codebook)) > 0
                dead = (~used).nonzero().flatten()
                picks = torch.randint(0, len(flat), (len(dead),), generator=generator)
                codebook[dead] = flat[picks]
    seconds = time.perf_counter() - start
    vq.eval()
    test_codes = encode_codes(vq, test_pixels[:2000])
    return VQTrainingResult(
        vq=vq,
        train_mse=vq_reconstruction_mse(vq, train_pixels[:2000]),
        test_mse=vq_reconstruction_mse(vq, test_pixels[:2000]),
        codebook_usage=float(test_codes.unique().numel() / codebook_size),
        steps=steps,
        seconds=seconds,
    )


def build_discrete_model(transfusion_config: TransfusionConfig, codebook_size: int, seed: int = 0) -> PreTrainedModel:
    """A fresh `*ForCausalLM` with the backbone configuration of `transfusion_config.text_config` (width, depth,
    heads, MLP, positions) and a vocabulary of the text tokens plus `codebook_size` image tokens."""
    text_config = copy.deepcopy(transfusion_config.text_config)
    text_config.vocab_size = transfusion_config.text_config.vocab_size + codebook_size
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(text_config)


@dataclass
class DiscreteDataCollator:
    """Collates the records of [`~recipes.training.LatentCaptionDataset`] built over codebook indices
    (`{"text": "caption <image>", "latents": codes (1, grid * grid)}`) into token rows for the discrete model.

    The text is tokenized exactly as for Transfusion (by [`~recipes.training.LatentDataCollator`]); the image's
    `<image>` slots are then replaced by its code tokens, which carry loss like any text token. With probability
    `condition_dropout_prob` the caption before an image is dropped (`<s> <boi> codes <eoi> </s>`), the discrete
    counterpart of Transfusion's condition dropout, so that guidance has an unconditional model to contrast with.
    """

    processor: TransfusionProcessor
    condition_dropout_prob: float = 0.1

    def __call__(self, records: list[dict]) -> dict[str, torch.Tensor]:
        batch = LatentDataCollator(self.processor)(records)
        codes = iter(batch.get("image_latents", torch.empty(0, 0, dtype=torch.long)))
        offset = len(self.processor.tokenizer)
        rows = []
        for ids, mask in zip(batch["input_ids"], batch["attention_mask"]):
            ids = ids[mask.bool()]
            slots = (ids == self.processor.image_token_id).nonzero().flatten()
            if len(slots):
                first, last = int(slots[0]), int(slots[-1])
                ids = torch.cat([ids[:first], next(codes).long() + offset, ids[last + 1 :]])
                opens_with_caption = first > 2  # more than `<s> <boi>` before the codes
                if opens_with_caption and float(torch.rand(())) < self.condition_dropout_prob:
                    ids = torch.cat([ids[:1], ids[first - 1 :]])
            rows.append(ids)
        length = max(len(row) for row in rows)
        input_ids = torch.full((len(rows), length), self.processor.tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, : len(row)] = row
            attention_mask[i, : len(row)] = 1
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


@torch.no_grad()
def generate_images_discrete(
    model: PreTrainedModel,
    processor: TransfusionProcessor,
    vq: VQModel,
    prompts: list[str],
    num_codes: int,
    guidance_scale: float = 3.0,
    seed: int = 0,
    batch_size: int = 50,
) -> torch.Tensor:
    """Samples `num_codes` image tokens after `prompt <boi>` (temperature 1, text tokens suppressed, classifier-free
    guidance against `<s> <boi>` on the logits) and decodes them with `vq`. Returns `(n, c, h, w)` in [-1, 1]."""
    tokenizer = processor.tokenizer
    offset = len(tokenizer)
    images = []
    for i in range(0, len(prompts), batch_size):
        chunk = [prompt + processor.boi_token for prompt in prompts[i : i + batch_size]]
        batch = tokenizer(chunk, padding=True, padding_side="left", return_tensors="pt")
        unconditional = torch.tensor([[tokenizer.bos_token_id, processor.boi_token_id]] * len(chunk))
        torch.manual_seed(seed * 100_003 + i)
        out = model.generate(
            **batch,
            max_new_tokens=num_codes,
            do_sample=True,
            temperature=1.0,
            top_k=0,
            guidance_scale=guidance_scale,
            negative_prompt_ids=unconditional,
            suppress_tokens=list(range(offset)),
            pad_token_id=tokenizer.pad_token_id,
        )
        images.append(decode_codes(vq, out[:, batch["input_ids"].shape[1] :] - offset))
    return torch.cat(images)


@torch.no_grad()
def caption_images_discrete(
    model: PreTrainedModel,
    processor: TransfusionProcessor,
    codes: torch.Tensor,
    batch_size: int = 100,
    max_new_tokens: int = 16,
) -> list[str]:
    """Greedy captions of images given as codebook indices `(n, grid * grid)` (prompt: `<s> <boi> codes <eoi>`; image
    tokens and `<boi>` suppressed, as Transfusion's text mode never opens an image)."""
    tokenizer = processor.tokenizer
    offset = len(tokenizer)
    suppressed = [processor.boi_token_id, *range(offset, model.config.vocab_size)]
    captions = []
    for i in range(0, len(codes), batch_size):
        chunk = codes[i : i + batch_size]
        prefix = torch.tensor([tokenizer.bos_token_id, processor.boi_token_id]).expand(len(chunk), 2)
        suffix = torch.full((len(chunk), 1), processor.eoi_token_id)
        input_ids = torch.cat([prefix, chunk + offset, suffix], dim=1)
        out = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            suppress_tokens=suppressed,
            pad_token_id=tokenizer.pad_token_id,
        )
        captions.extend(tokenizer.batch_decode(out[:, input_ids.shape[1] :], skip_special_tokens=True))
    return [caption.strip() for caption in captions]


__all__ = [
    "VQTrainingResult",
    "build_vq",
    "encode_codes",
    "decode_codes",
    "vq_reconstruction_mse",
    "train_vq",
    "build_discrete_model",
    "DiscreteDataCollator",
    "generate_images_discrete",
    "caption_images_discrete",
]
