"""Training a Transfusion model from scratch with `transformers.Trainer`, on precomputed VAE latents.

The recipe: a byte-level BPE trained on the caption templates, a small Llama backbone, the project's VAE inside the
model (frozen), and records mixing caption-then-image (generation), image-then-caption (captioning) and text-only
rows. Latents are encoded once, so training never runs the VAE encoder. The optimiser is the paper's, scaled down:
AdamW (0.9, 0.95), weight decay 0.1, linear warm-up, cosine decay to 5% of the peak rate, gradient clipping at 1.
`modeling_transfusion.TransfusionTrainer` logs `lm_loss` and `diffusion_loss` separately.
"""

import math
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from transformers import GenerationConfig, PreTrainedTokenizerFast, TrainingArguments

from modeling_transfusion import (
    TransfusionConfig,
    TransfusionForConditionalGeneration,
    TransfusionProcessor,
    train_caption_tokenizer,
)
from modeling_transfusion.recipes.data import (
    CaptionMix,
    caption_corpus,
    make_composition_record_text,
    make_record_text,
)
from modeling_transfusion.recipes.editing import edit_record_text


@dataclass
class ModelSize:
    """Backbone and patch-encoder sizes of a recipe model."""

    hidden_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    intermediate_size: int = 688
    patch_encoder: str = "unet"
    unet_block_out_channels: list[int] = field(default_factory=lambda: [64, 128])
    max_position_embeddings: int = 128


def build_tokenizer(
    dataset: str,
    labels: Sequence[int | str] | None = None,
    extra_texts: Sequence[str] = (),
    vocab_size: int = 400,
):
    """A byte-level BPE tokenizer trained (offline, about a second) on every caption the templates produce, plus
    `extra_texts` (e.g. the composition captions)."""
    return train_caption_tokenizer((caption_corpus(dataset, labels) + list(extra_texts)) * 4, vocab_size=vocab_size)


def build_model(
    tokenizer: PreTrainedTokenizerFast,
    vae: AutoencoderKL | None,
    image_size: int,
    num_channels: int,
    size: ModelSize | None = None,
    patch_size: int = 2,
    objective: str = "ddpm",
    seed: int = 0,
    **config_kwargs,
) -> TransfusionForConditionalGeneration:
    """A freshly initialised model for `tokenizer`, holding (a copy of) the trained `vae`, or the identity autoencoder
    on pixels when `vae` is None. `config_kwargs` go to the config (`max_image_size`, `image_position_embedding`)."""
    size = size or ModelSize()
    ids = tokenizer.convert_tokens_to_ids(["<boi>", "<eoi>", "<image>"])
    text_config = {
        "model_type": "llama",
        "vocab_size": len(tokenizer),
        "hidden_size": size.hidden_size,
        "intermediate_size": size.intermediate_size,
        "num_hidden_layers": size.num_hidden_layers,
        "num_attention_heads": size.num_attention_heads,
        "num_key_value_heads": size.num_attention_heads,
        "max_position_embeddings": size.max_position_embeddings,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    config = TransfusionConfig(
        text_config=text_config,
        vae_config=None if vae is None else dict(vae.config),
        image_size=image_size,
        num_channels=num_channels,
        latent_channels=num_channels if vae is None else vae.config.latent_channels,
        patch_size=patch_size,
        patch_encoder=size.patch_encoder,
        unet_block_out_channels=size.unet_block_out_channels if size.patch_encoder == "unet" else None,
        objective=objective,
        boi_token_id=ids[0],
        eoi_token_id=ids[1],
        image_token_id=ids[2],
        **config_kwargs,
    )
    torch.manual_seed(seed)
    model = TransfusionForConditionalGeneration(config)
    if vae is not None:
        model.vae.load_state_dict(vae.state_dict())
    return model


def init_from_checkpoint(directory: str | Path, **config_changes) -> TransfusionForConditionalGeneration:
    """A model with the config of the checkpoint in `directory` changed by `config_changes` (e.g.
    `max_image_size=64, image_position_embedding="learned_2d"`, or `text_config={"max_position_embeddings": 256}`,
    merged into the backbone's), holding that checkpoint's weights in float32.
    Parameters the checkpoint lacks (such as the 2-D position embedding) keep their fresh initialisation; any other
    mismatch is an error."""
    trained = TransfusionForConditionalGeneration.from_pretrained(directory, dtype=torch.float32)
    config = trained.config.to_dict()
    text_changes = config_changes.pop("text_config", {})  # merged into the backbone's config
    config["text_config"] = {**config["text_config"], **text_changes}
    config = TransfusionConfig(**{**config, **config_changes, "dtype": "float32"})
    model = TransfusionForConditionalGeneration(config)
    missing, unexpected = model.load_state_dict(trained.state_dict(), strict=False)
    new = [name for name in missing if "patch_position_embedding" not in name]
    if new or unexpected:
        raise ValueError(f"{directory} does not fit the changed config: missing {new}, unexpected {unexpected}.")
    return model


def default_generation_config(model: TransfusionForConditionalGeneration, edits: bool = False) -> GenerationConfig:
    """Sampling defaults saved with a recipe checkpoint: DPM-Solver++ (ddpm) or Euler (flow), 20 steps, guidance 3
    (for ddpm only at the 80% least noisy timesteps: measured in docs/results.md), greedy text; for a model trained on
    `edits`, guidance 2 on the source image too (measured in docs/editing.md)."""
    text_config = model.config.text_config
    config = GenerationConfig(
        bos_token_id=text_config.bos_token_id,
        eos_token_id=text_config.eos_token_id,
        pad_token_id=text_config.pad_token_id,
        # a caption, or a short text and one image of the largest size the model was configured for
        max_new_tokens=24 + model.config.num_image_slots(model.config.max_image_size, model.config.image_size) + 2,
        do_sample=False,
    )
    config.scheduler = "dpmsolver++" if model.config.objective == "ddpm" else "flow_euler"
    config.num_inference_steps = 20
    config.image_guidance_scale = 3.0
    if edits:
        config.source_image_guidance_scale = 2.0
    if model.config.objective == "ddpm":
        config.image_guidance_interval = (0, model.config.num_train_timesteps * 4 // 5)
    config.progress_bar = False
    return config


class LatentCaptionDataset(torch.utils.data.Dataset):
    """Training records over precomputed latents: item `i` is image `i` with a text drawn (deterministically from
    `seed` and `i`) from the caption mix; a text-only item carries no latent.

    Args:
        latents (`torch.Tensor` of shape `(num_images, latent_channels, latent_height, latent_width)`): scaled latents.
        labels: class index (or emoji name) of each image; with `layout`, the pair of digits of each composition.
        dataset: `"mnist"`, `"fashion_mnist"` or `"emoji"` (selects the caption templates).
        layout: `None` for single images, or a two-digit composition layout (`"side_by_side"`, `"stacked"`).
        texts: documents for the text-only rows (e.g. WordNet glosses); by default they are caption templates.
    """

    def __init__(
        self,
        latents: torch.Tensor,
        labels: Sequence,
        dataset: str,
        mix: CaptionMix | None = None,
        seed: int = 0,
        layout: str | None = None,
        texts: Sequence[str] | None = None,
    ):
        if len(latents) != len(labels):
            raise ValueError(f"Got {len(latents)} latents but {len(labels)} labels.")
        self.latents, self.labels, self.dataset, self.seed = latents, list(labels), dataset, seed
        self.mix, self.layout, self.texts = mix or CaptionMix(), layout, texts

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        rng = random.Random(self.seed * 1_000_003 + index)
        if self.layout is None:
            text = make_record_text(self.dataset, self.labels[index], rng, self.mix)
        else:
            text = make_composition_record_text(self.layout, self.labels[index], rng, self.mix)
        record = {"text": text}
        if "<image>" in text:
            record["latents"] = self.latents[index : index + 1]
        elif self.texts:
            record["text"] = rng.choice(self.texts)
        return record


class LatentEditDataset(torch.utils.data.Dataset):
    """Training records of image edits over precomputed latents: item `i` is `"<image> instruction <image>"` (one more
    `" instruction <image>"` per chained edit, [`edit_record_text`]) with the latents of its images. A one-step edit
    loses its instruction with probability `drop_instruction`, or its source image with probability `drop_source`
    (drawn from `seed` and `i`): the conditions that editing guidance leaves out. The instructions carry no LM loss
    (`"no_loss"`, see [`LatentDataCollator`]), and an edit without its instruction no LM loss at all (`"lm_loss"`):
    it would teach the model to write an image's size right after an image, where a caption belongs.

    Args:
        latents (`list[list[torch.Tensor]]`): per example, the `(latent_channels, h, w)` latents of its images.
        examples (`list[EditExample]`): the edits, for their instructions.
    """

    def __init__(self, latents, examples, seed: int = 0, drop_instruction: float = 0.1, drop_source: float = 0.1):
        if len(latents) != len(examples):
            raise ValueError(f"Got {len(latents)} latent lists but {len(examples)} edit examples.")
        self.latents, self.examples, self.seed = latents, examples, seed
        self.drop_instruction, self.drop_source = drop_instruction, drop_source

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict:
        rng = random.Random(self.seed * 1_000_003 + index)
        text = edit_record_text(self.examples[index], rng, self.drop_instruction, self.drop_source)
        latents = self.latents[index]
        # The instructions are the user's, not the model's to write: the LM learns only the edited images' sizes (and,
        # from the other records, to caption what follows an image).
        instructions = [instruction for instruction in self.examples[index].instructions if instruction in text]
        record = {"text": text, "latents": latents[len(latents) - text.count("<image>") :], "no_loss": instructions}
        if not instructions:  # dropped: the target follows the source image
            record["lm_loss"] = False
        return record


@dataclass
class LatentDataCollator:
    """Collates records `{"text": "caption <image>", "latents": (1, c, h, w)}` (or a list of `(c, h, w)` latents, one
    per marker in order; `"no_loss"`: parts of the text, in order, that carry no LM loss; `"lm_loss": False`: none of
    it does, the record trains the images alone) into model inputs with
    `image_latents`
    (instead of pixels; a list when their sizes differ), padded on the right, with `labels` (-100 on padding and image
    slots) and EOS appended. `logits_to_keep=1` goes into every batch when set: the model then computes the logits of
    the text targets alone (the loss is the same, the LM head's work on image slots is saved).

    With `vae_downsample_factor` (the model's `config.vae_downsample_factor`), each marker expands as the processor
    expands it for an image of that latent's size (images of any size); without it, every image is of the default size
    (`processor.image_sequence`)."""

    processor: TransfusionProcessor
    vae_downsample_factor: int | None = None
    logits_to_keep: int | None = None

    def __call__(self, records: Sequence[dict]) -> dict[str, torch.Tensor]:
        tokenizer = self.processor.tokenizer
        marker = re.compile(r"[ \t]*" + re.escape(self.processor.image_token))
        texts = []
        for record in records:
            images = iter(record.get("latents", ()))

            def expand(_, images=images):
                # Each marker in turn takes the next latent's size; without a downsample factor, the default size.
                latent = next(images)
                if self.vae_downsample_factor is None:
                    return self.processor.image_sequence
                return self.processor.image_sequence_for(
                    *(side * self.vae_downsample_factor for side in latent.shape[1:])
                )

            texts.append(marker.sub(expand, record["text"]) + tokenizer.eos_token)
        encoded = tokenizer(texts, add_special_tokens=True, return_offsets_mapping=True)
        rows = encoded["input_ids"]
        length = max(len(row) for row in rows)
        input_ids = torch.full((len(rows), length), tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, : len(row)] = torch.tensor(row)
            attention_mask[i, : len(row)] = 1
        labels = input_ids.masked_fill((attention_mask == 0) | (input_ids == self.processor.image_token_id), -100)
        for i, record in enumerate(records):
            if not record.get("lm_loss", True):
                labels[i] = -100
                continue
            labels[i, : len(rows[i])] = labels[i, : len(rows[i])].masked_fill(
                _tokens_within(texts[i], encoded["offset_mapping"][i], record.get("no_loss", ())), -100
            )
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        latents = [latent for r in records for latent in r.get("latents", ())]
        if latents:
            batch["image_latents"] = latents if len({x.shape for x in latents}) > 1 else torch.stack(latents)
        if self.logits_to_keep is not None:
            batch["logits_to_keep"] = self.logits_to_keep
        return batch


def _tokens_within(text: str, offsets: list[tuple[int, int]], spans: Sequence[str]) -> torch.BoolTensor:
    """Which tokens (by their character `offsets` in `text`) belong to the texts `spans`, found in `text` in order
    (a token's leading space included)."""
    inside = torch.zeros(len(offsets), dtype=torch.bool)
    position = 0
    for span in spans:
        start = text.index(span, position)
        position = start + len(span)
        inside |= torch.tensor([begin < position and end > start - 1 for begin, end in offsets], dtype=torch.bool)
    return inside


def training_arguments(
    output_dir: str | Path,
    max_steps: int,
    batch_size: int = 64,
    learning_rate: float = 1e-3,
    warmup_steps: int | None = None,
    save_steps: int = 250,
    logging_steps: int = 25,
    seed: int = 0,
    progress_bar: bool = False,
) -> TrainingArguments:
    """The paper's optimiser recipe (section 4.1), scaled down: AdamW betas (0.9, 0.95), eps 1e-8, weight decay 0.1,
    linear warm-up (5% of the steps by default), cosine decay to 5% of the peak, gradient norm clipped at 1."""
    return TrainingArguments(
        output_dir=str(output_dir),
        max_steps=max_steps,
        per_device_train_batch_size=batch_size,
        learning_rate=learning_rate,
        adam_beta1=0.9,
        adam_beta2=0.95,
        adam_epsilon=1e-8,
        weight_decay=0.1,
        warmup_steps=warmup_steps if warmup_steps is not None else max(1, math.ceil(0.05 * max_steps)),
        lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": 0.05},
        max_grad_norm=1.0,
        logging_steps=logging_steps,
        save_steps=save_steps,
        save_total_limit=2,
        seed=seed,
        data_seed=seed,
        remove_unused_columns=False,
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
        disable_tqdm=not progress_bar,
    )


def save_checkpoint(
    model: TransfusionForConditionalGeneration,
    processor: TransfusionProcessor,
    output_dir: str | Path,
    dtype: torch.dtype | None = None,
    edits: bool = False,
) -> None:
    """Writes a complete, loadable checkpoint: config, safetensors (VAE inside), processor, tokenizer and the default
    generation config (`edits`: of a model trained on edits). `dtype=torch.bfloat16` halves the file (the VAE stays in
    float32). A model whose text path is frozen (`freeze_text_path()`) is refused a lower precision: it would round
    the LLM's weights, and its text would no longer be the LLM's."""
    text_frozen = model.config.modality_experts and not model.get_input_embeddings().weight.requires_grad
    if dtype not in (None, torch.float32) and text_frozen:
        raise ValueError(
            f"save_checkpoint(dtype={dtype}) would store the frozen text path in {dtype} too, so the saved model's "
            "text would no longer be the LLM's: save it without dtype (float32), and ship the image path alone, in "
            "bfloat16, with `modeling_transfusion.conversion.extract_image_path`."
        )
    model.generation_config = default_generation_config(model, edits=edits)
    if dtype is not None:
        vae = model.model.vae
        model.model.vae = None
        model.to(dtype)
        model.model.vae = vae
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)


__all__ = [
    "ModelSize",
    "build_tokenizer",
    "build_model",
    "init_from_checkpoint",
    "default_generation_config",
    "LatentCaptionDataset",
    "LatentEditDataset",
    "LatentDataCollator",
    "training_arguments",
    "save_checkpoint",
]
