"""Quickstart: prompts -> processor -> model.generate -> PIL images -> quickstart.png.

Until the bundled MNIST checkpoint exists (it is the next piece of work: no pretrained Transfusion weights exist
anywhere), this builds a freshly initialised model, so the pictures are noise. Every step is the one a trained
checkpoint goes through: a tokenizer with the image tokens, the processor, `generate` in image mode with
classifier-free guidance, and the processor's post-processing back to PIL images.

Usage: python docs/quickstart.py [--out quickstart.png] [--steps 20] [--guidance 3.0]
"""

import argparse

import PIL.Image
import torch

import modeling_transfusion as mt

DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def build_model_and_processor() -> tuple[mt.TransfusionForConditionalGeneration, mt.TransfusionProcessor]:
    """A small MNIST-sized model (28x28 grey images, 4x4 patches: 49 image slots) with a tokenizer trained on the
    caption templates."""
    captions = [f"a handwritten digit {name}" for name in DIGITS] + [f"the number {k}" for k in range(10)]
    tokenizer = mt.train_caption_tokenizer(captions * 8, vocab_size=300)
    ids = tokenizer.convert_tokens_to_ids(["<boi>", "<eoi>", "<image>"])
    config = mt.TransfusionConfig(
        text_config={
            "model_type": "llama",
            "vocab_size": len(tokenizer),
            "hidden_size": 128,
            "intermediate_size": 344,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "max_position_embeddings": 256,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        image_size=28,
        num_channels=1,
        latent_channels=1,
        patch_size=4,
        boi_token_id=ids[0],
        eoi_token_id=ids[1],
        image_token_id=ids[2],
    )
    model = mt.TransfusionForConditionalGeneration(config).eval()
    processor = mt.TransfusionProcessor.from_model_config(config, tokenizer)
    return model, processor


def grid(images: list[PIL.Image.Image], columns: int) -> PIL.Image.Image:
    """Pastes equally sized images into rows of `columns`."""
    width, height = images[0].size
    rows = -(-len(images) // columns)
    sheet = PIL.Image.new(images[0].mode, (columns * width, rows * height))
    for i, image in enumerate(images):
        sheet.paste(image, ((i % columns) * width, (i // columns) * height))
    return sheet


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="quickstart.png")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=3.0)
    args = parser.parse_args()

    torch.manual_seed(0)
    model, processor = build_model_and_processor()
    prompts = [f"a handwritten digit {name}" for name in DIGITS]
    batch = processor(text=prompts, padding_side="left", return_tensors="pt")
    generators = [torch.Generator().manual_seed(k) for k in range(len(prompts))]
    with torch.no_grad():
        out = model.generate(
            **batch,
            generation_mode="image",
            scheduler="dpmsolver++",
            num_inference_steps=args.steps,
            image_guidance_scale=args.guidance,
            generator=generators,
            return_dict_in_generate=True,
        )
    pictures = [row[0] for row in processor.postprocess_images(out.images)]
    grid([p.resize((56, 56), PIL.Image.NEAREST) for p in pictures], columns=5).save(args.out)
    print(
        f"wrote {args.out}: {len(pictures)} images for {len(prompts)} prompts ({args.steps} steps, guidance "
        f"{args.guidance}), from a freshly initialised model (the trained checkpoint is not bundled yet)"
    )


if __name__ == "__main__":
    main()
