"""What the bundled fixed-size checkpoint computes: two generated images, the logits of a captioning prompt and its
greedy caption. `tests/data/fixed_size_reference.safetensors` was written by running this file with the release
before images of any size (commit da0f8e5); tests/test_image_sizes.py checks that the current code computes the same
tensors, bit for bit. Both run on one thread: the order of a parallel reduction changes the last bits.

    python tests/fixed_size_reference.py OUT.safetensors
"""

import sys
from pathlib import Path

import PIL.Image
import torch
from safetensors.torch import save_file
from transformers import AutoModel, AutoProcessor

CHECKPOINT = Path(__file__).resolve().parents[1] / "checkpoints" / "transfusion-mnist"


def compute() -> dict[str, torch.Tensor]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _compute()
    finally:
        torch.set_num_threads(threads)


@torch.no_grad()
def _compute() -> dict[str, torch.Tensor]:
    import modeling_transfusion  # noqa: F401  (registers the Auto classes)

    model = AutoModel.from_pretrained(CHECKPOINT, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(CHECKPOINT)
    batch = processor(text=["a handwritten digit seven", "the number 3 written by hand"], return_tensors="pt")
    generators = [torch.Generator().manual_seed(seed) for seed in (0, 1)]
    out = model.generate(**batch, generation_mode="image", generator=generators, return_dict_in_generate=True)
    with PIL.Image.open(CHECKPOINT / "examples" / "mnist_test_09990_label_7.png") as image:
        captioning = processor(text=["<image>"], images=[image], return_tensors="pt")
    return {
        "prompt_ids": batch["input_ids"],
        "image_latents": torch.stack([row[0] for row in out.image_latents]),
        "caption_input_ids": captioning["input_ids"],
        "caption_logits": model(**captioning).logits,
        "caption_ids": model.generate(**captioning, generation_mode="text", max_new_tokens=16),
    }


if __name__ == "__main__":
    save_file(compute(), sys.argv[1])
