"""Quality bar of the training recipe on real data: a tiny model trained with the recipe's Trainer on scikit-learn's
handwritten digits (1,797 real 8x8 images, shipped with scikit-learn) must caption held-out digits far above chance.
"""

import random

import numpy as np
import torch
from sklearn.datasets import load_digits

from modeling_transfusion import TransfusionProcessor, TransfusionTrainer
from modeling_transfusion.recipes.data import CaptionMix, parse_class, to_model_range
from modeling_transfusion.recipes.evaluation import caption_images, text_perplexity
from modeling_transfusion.recipes.training import (
    LatentCaptionDataset,
    LatentDataCollator,
    ModelSize,
    build_model,
    build_tokenizer,
    training_arguments,
)

NUM_TRAIN = 1500


def test_tiny_recipe_learns_to_caption_real_digits(tmp_path):
    torch.set_num_threads(2)
    digits = load_digits()
    images = (digits.images * (255 / 16)).round().astype(np.uint8)
    order = np.random.default_rng(0).permutation(len(images))
    train, test = order[:NUM_TRAIN], order[NUM_TRAIN:]
    pixels = to_model_range(images)  # identity autoencoder: the "latent" is the 8x8 image in [-1, 1]

    tokenizer = build_tokenizer("mnist", vocab_size=300)
    size = ModelSize(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        patch_encoder="linear",
        max_position_embeddings=64,
    )
    # One 8x8 patch per image: the whole digit is one sequence position, which keeps the test to a minute of CPU.
    model = build_model(tokenizer, vae=None, image_size=8, num_channels=1, size=size, patch_size=8, seed=0)
    # Captioning rows see their image noised to at most t = 100 (the recipe's default cap is the paper's 500): clearer
    # images make the small test model learn to read digits within its few hundred steps.
    model.config.max_conditioning_timestep = 100
    processor = TransfusionProcessor.from_model_config(model.config, tokenizer)
    dataset = LatentCaptionDataset(
        pixels[train], digits.target[train].tolist(), "mnist", CaptionMix(0.1, 0.9, 0.0), seed=0
    )
    args = training_arguments(
        tmp_path, max_steps=300, batch_size=32, learning_rate=3e-3, save_steps=1000, logging_steps=100, seed=0
    )
    trainer = TransfusionTrainer(
        model=model, args=args, train_dataset=dataset, data_collator=LatentDataCollator(processor)
    )
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "lm_loss" in entry]
    assert logged and all("diffusion_loss" in entry for entry in logged)
    assert logged[-1]["lm_loss"] < logged[0]["lm_loss"]

    model.eval()
    captions = caption_images(model, processor, pixels[test])
    predicted = [parse_class(caption, "mnist") for caption in captions]
    accuracy = float(np.mean([p == k for p, k in zip(predicted, digits.target[test])]))
    print(f"captioning accuracy on {len(test)} held-out real digits: {accuracy:.3f} (chance 0.1)")
    assert accuracy >= 0.6, captions[:10]

    rng = random.Random(0)
    texts = [rng.choice(["the digit {name}", "this is a handwritten {name}"]).format(name=n) for n in ("one", "two")]
    assert text_perplexity(model, processor, texts) < 20.0
