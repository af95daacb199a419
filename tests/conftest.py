"""Shared test fixtures: a small real tokenizer trained offline, real digit images, a tiny config and a processor.

The builders are plain functions too (`build_tiny_tokenizer`, `build_tiny_config`, `load_digit_images`), for tests
that need variants; fixtures hand out fresh objects, so a test may change them.
"""

import functools

import numpy as np
import PIL.Image
import pytest
import torch
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast

from modeling_transfusion import (
    TransfusionConfig,
    TransfusionForConditionalGeneration,
    TransfusionProcessor,
    add_image_tokens,
    train_caption_tokenizer,
)

# A tiny frozen VAE for 1-channel images: 2 latent channels, downsampling by 2.
TINY_VAE = {
    "in_channels": 1,
    "out_channels": 1,
    "latent_channels": 2,
    "block_out_channels": [8, 8],
    "down_block_types": ["DownEncoderBlock2D"] * 2,
    "up_block_types": ["UpDecoderBlock2D"] * 2,
    "layers_per_block": 1,
    "norm_num_groups": 4,
}

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def caption_corpus() -> list[str]:
    """A few hundred captions and prompts about handwritten digits: the tokenizer's training text."""
    templates = (
        "a handwritten digit {name}",
        "a handwritten {name}",
        "the number {digit} written by hand",
        "a drawing of the digit {name}",
        "a small grey picture of a {name}",
        "what digit is this? it is a {name}.",
        "User: draw a {name}\nAssistant: here is a {name}",
        "this image shows the number {digit}, a {name}",
    )
    return [
        template.format(name=name, digit=digit) for template in templates for digit, name in enumerate(DIGIT_NAMES)
    ] * 4


@functools.lru_cache(maxsize=1)
def _tiny_tokenizer_json() -> str:
    # Trained once per session (about a second); each build deserialises a fresh copy.
    return train_caption_tokenizer(caption_corpus(), with_image_tokens=False).backend_tokenizer.to_str()


def build_tiny_tokenizer(with_image_tokens: bool = True) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (375 tokens) with `<s>` (added at the start, like Llama), `</s>` and `<pad>`;
    with `with_image_tokens`, also `<boi>`, `<image>`, `<eoi>` as special tokens (ids 375, 376, 377)."""
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tiny_tokenizer_json()),
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
    )
    if with_image_tokens:
        add_image_tokens(tokenizer)
    return tokenizer


def tiny_text_config(tokenizer: PreTrainedTokenizerFast, model_type: str = "llama", **kwargs) -> dict:
    """The tiny backbone of every test: 2 layers of width 32 (4 heads, 2 key-value heads), context 256, the vocabulary
    and special ids of `tokenizer`. `kwargs` change or add fields (e.g. `tie_word_embeddings=True`)."""
    return {
        "model_type": model_type,
        "vocab_size": len(tokenizer),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        **kwargs,
    }


def build_tiny_config(
    tokenizer: PreTrainedTokenizerFast, image_size: int = 8, num_channels: int = 1, patch_size: int = 2, **kwargs
) -> TransfusionConfig:
    """A tiny Transfusion config matching `tokenizer`: Llama backbone (2 layers, width 32), identity autoencoder,
    `(image_size // patch_size) ** 2` image slots (16 by default), context 256, and the tokenizer's image token ids
    (unless `kwargs` gives them). Further `kwargs` go to `TransfusionConfig` (e.g. `vae_config=TINY_VAE,
    latent_channels=2`)."""
    text_config = tiny_text_config(tokenizer)
    for name, token in (("boi_token_id", "<boi>"), ("eoi_token_id", "<eoi>"), ("image_token_id", "<image>")):
        kwargs.setdefault(name, tokenizer.convert_tokens_to_ids(token))
    kwargs.setdefault("vae_config", None)
    kwargs.setdefault("latent_channels", num_channels)
    return TransfusionConfig(
        text_config=text_config, image_size=image_size, num_channels=num_channels, patch_size=patch_size, **kwargs
    )


def build_sampling_model(config: TransfusionConfig, seed: int = 0) -> TransfusionForConditionalGeneration:
    """A random model for `config` in eval mode whose diffusion head is perturbed: a new head starts at zero and would
    predict no noise, whatever the prompt, so that guidance, noise and the inputs would not matter."""
    torch.manual_seed(seed)
    model = TransfusionForConditionalGeneration(config).eval()
    with torch.no_grad():
        model.model.patch_decoder.proj.weight.normal_(std=0.2)
    return model


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    return (digits.images * (255 / 16)).round().astype(np.uint8), digits.target


def load_digit_images(count: int = 10) -> list[tuple[PIL.Image.Image, int]]:
    """`count` real handwritten digits (scikit-learn's 8x8 UCI digits, shipped with the package) as grey PIL images,
    with their labels."""
    images, labels = _digits()
    return [(PIL.Image.fromarray(images[i], mode="L"), int(labels[i])) for i in range(count)]


@pytest.fixture
def tokenizer() -> PreTrainedTokenizerFast:
    """A fresh tiny tokenizer with the image tokens."""
    return build_tiny_tokenizer()


@pytest.fixture
def tiny_config(tokenizer) -> TransfusionConfig:
    """The tiny config of `build_tiny_config` for the `tokenizer` fixture: 8x8 grey images, 16 slots each."""
    return build_tiny_config(tokenizer)


@pytest.fixture
def processor(tokenizer, tiny_config) -> TransfusionProcessor:
    """A processor for `tiny_config`: 8x8 grey images, 16 `<image>` slots each, left padding, context 256."""
    return TransfusionProcessor.from_model_config(tiny_config, tokenizer)


@pytest.fixture
def digit_images() -> list[tuple[PIL.Image.Image, int]]:
    """Ten real 8x8 handwritten digits with their labels."""
    return load_digit_images(10)
