"""Offline evaluation of a Transfusion checkpoint on a labelled dataset, judged by the project's own classifier.

Metrics (all computed offline; none is comparable to published FID, CIDEr or perplexity numbers):
- prompt accuracy: the fraction of images generated for the prompt of class k that the judge classifies as k;
- Frechet distance, in the judge's feature space, between the generated images and as many real test images, beside
  the real-vs-real floor (two disjoint sets of real test images of that size);
- captioning accuracy: greedy captions of held-out real test images, parsed back to a class;
- text perplexity of the model on held-out caption texts;
- prompt reliance: the diffusion loss on held-out real images with another class's prompt over the loss with their own
  prompt (same noise, same timesteps): 1 when the denoiser ignores the prompt, well above 1 when it reads it. Unlike
  prompt accuracy it needs no sampling and moves before the samples do, which makes it the learning-curve metric of
  long runs;
- for two-digit compositions (side by side or stacked), composition accuracy: both halves of a generated composition
  classified as the prompt's digits, in place; and composition captioning accuracy: both digits of a real test
  composition named, in order.
"""

import math
import random
import time
from dataclasses import dataclass

import numpy as np
import torch

from modeling_transfusion import TransfusionForConditionalGeneration, TransfusionProcessor
from modeling_transfusion.generation_transfusion import WRITTEN_IMAGE_SIZE, written_size_image_arguments
from modeling_transfusion.recipes.classifier import JudgeCNN, frechet_distance, predict
from modeling_transfusion.recipes.data import (
    CAPTION_TEMPLATES,
    TEXT_TEMPLATES,
    class_names,
    composition_prompt,
    composition_size,
    generation_prompt,
    layout_axis,
    make_compositions,
    parse_class,
    parse_digit_pair,
    to_model_range,
)
from modeling_transfusion.recipes.editing import CHANGED_HALF, EDIT_KINDS, EXACT_EDITS, KEPT_HALF, make_edits

# Seed of the real test compositions that evaluate_compositions captions (plus its `seed`), apart from every other seed.
CAPTIONED_COMPOSITIONS_SEED = 7_700_417


@torch.no_grad()
def generate_images(
    model: TransfusionForConditionalGeneration,
    processor: TransfusionProcessor,
    prompts: list[str],
    seeds: list[int],
    batch_size: int = 50,
    height: int | None = None,
    width: int | None = None,
    **generate_kwargs,
) -> torch.Tensor:
    """Generates one image of `height` x `width` (the model's `image_size` by default) per prompt (row `i` seeded with
    `seeds[i]`), returned as `(n, c, h, w)` in [-1, 1]. Each prompt is followed by the size text the model writes
    before an image (`processor.render_image_size`, empty for a model that writes none), as in training. Further
    keyword arguments (scheduler, num_inference_steps, image_guidance_scale) go to `model.generate`; the model's
    generation config supplies the rest."""
    default = model.config.image_size
    height, width = default if height is None else height, default if width is None else width
    size_text = processor.render_image_size(height, width)
    images = []
    for i in range(0, len(prompts), batch_size):
        texts = [prompt + size_text for prompt in prompts[i : i + batch_size]]
        batch = processor(text=texts, padding_side="left", return_tensors="pt")
        generators = [torch.Generator().manual_seed(seed) for seed in seeds[i : i + batch_size]]
        out = model.generate(
            **batch,
            generation_mode="image",
            generator=generators,
            return_dict_in_generate=True,
            height=height,
            width=width,
            **generate_kwargs,
        )
        images.extend(row[0].float() for row in out.images)
    return torch.stack(images).clamp(-1, 1)


@torch.no_grad()
def caption_images(
    model: TransfusionForConditionalGeneration,
    processor: TransfusionProcessor,
    images: torch.Tensor,
    batch_size: int = 100,
    max_new_tokens: int = 32,
) -> list[str]:
    """Greedy captions of images `(n, c, h, w)` in [-1, 1] (prompt: the image alone, `<image>`). The images go to the
    model at their own size, neither resized nor cropped."""
    captions = []
    for i in range(0, len(images), batch_size):
        chunk = images[i : i + batch_size]
        pictures = processor.postprocess_images(chunk)
        batch = processor(
            text=["<image>"] * len(chunk),
            images=pictures,
            padding_side="left",
            return_tensors="pt",
            do_resize=False,
            do_center_crop=False,
        )
        out = model.generate(**batch, generation_mode="text", max_new_tokens=max_new_tokens, do_sample=False)
        captions.extend(processor.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True))
    return [caption.strip() for caption in captions]


@torch.no_grad()
def text_perplexity(
    model: torch.nn.Module,
    processor: TransfusionProcessor,
    texts: list[str],
    batch_size: int = 100,
    vocab_size: int | None = None,
) -> float:
    """exp of the mean next-token cross-entropy over `texts` (each ends with EOS; the BOS token is not predicted).
    `model` is a Transfusion model or any causal LM. With `vocab_size`, over the first `vocab_size` tokens only (an
    LLM's own vocabulary: text generation never samples the image tokens Transfusion adds after it)."""
    tokenizer = processor.tokenizer
    total_loss, total_tokens = 0.0, 0
    for i in range(0, len(texts), batch_size):
        batch = tokenizer(
            [t + tokenizer.eos_token for t in texts[i : i + batch_size]], padding=True, return_tensors="pt"
        )
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logits = logits[..., :vocab_size] if vocab_size is not None else logits
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100, reduction="sum"
        )
        total_loss += float(loss)
        total_tokens += int((labels[:, 1:] != -100).sum())
    return math.exp(total_loss / total_tokens)


@torch.no_grad()
def prompt_reliance(
    model: TransfusionForConditionalGeneration,
    processor: TransfusionProcessor,
    images: torch.Tensor,
    labels: list[int],
    dataset: str = "mnist",
    batch_size: int = 50,
    seed: int = 0,
) -> float:
    """How much the denoiser reads its prompt: the diffusion loss on real `images` `(n, c, h, w)` in [-1, 1], each after
    the prompt of the next class, divided by the loss after their own class's prompt. Both passes see the same noise
    and the same timesteps (spread evenly over the schedule, one per image), so 1 means the prompt is ignored."""
    num_classes = len(class_names(dataset))
    num_train_timesteps = model.noise_scheduler.config.num_train_timesteps
    timesteps = ((torch.arange(len(images)) * 0.618034 % 1) * (num_train_timesteps - 1) + 1).long()
    factor = model.config.vae_downsample_factor
    noise = torch.randn(
        (len(images), model.config.latent_channels, images.shape[-2] // factor, images.shape[-1] // factor),
        generator=torch.Generator().manual_seed(seed),
    )
    losses = {True: 0.0, False: 0.0}
    model.eval()
    for i in range(0, len(images), batch_size):
        chunk = slice(i, i + batch_size)
        pictures = processor.postprocess_images(images[chunk])
        for right in (True, False):
            prompts = [
                generation_prompt(dataset, k if right else (k + 1) % num_classes, variant=i + j)
                for j, k in enumerate(labels[chunk])
            ]
            batch = processor(
                text=[prompt + " <image>" for prompt in prompts],
                images=pictures,
                return_tensors="pt",
                do_resize=False,
                do_center_crop=False,
            )
            out = model(
                **batch,
                labels=batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100),
                image_timesteps=timesteps[chunk],
                image_noise=noise[chunk],
            )
            losses[right] += float(out.diffusion_loss) * len(pictures)
    return losses[False] / losses[True]


# Fixed prompts whose greedy continuations show whether a model still writes its LLM's text.
TEXT_PROMPTS = (
    "The capital of France is",
    "Water boils at a temperature of",
    "The largest planet in the solar system is",
    "A cat is an animal that",
    "The opposite of hot is",
    "Two plus two equals",
    "The first day of the week is",
    "Shakespeare wrote the play",
    "The chemical symbol for gold is",
    "In winter, the weather is usually",
)


@torch.no_grad()
def compare_text(
    model: TransfusionForConditionalGeneration,
    processor: TransfusionProcessor,
    reference: torch.nn.Module,
    texts: list[str],
    prompts: tuple[str, ...] = TEXT_PROMPTS,
    max_new_tokens: int = 16,
) -> dict:
    """How close `model`'s text stays to the `reference` LLM it was made from: the perplexity of both on held-out
    `texts` (over the LLM's vocabulary), and the greedy continuations of `prompts` by both, with how many are
    identical."""
    # The LLM's own tokens (a vocabulary with room to spare may hold the image tokens already: they are not its).
    vocab_size = min(reference.get_input_embeddings().num_embeddings, *model.config.image_token_ids)
    tokenizer = processor.tokenizer
    answers = []
    for prompt in prompts:
        inputs = tokenizer([prompt], return_tensors="pt")
        ours = model.generate(**inputs, generation_mode="text", max_new_tokens=max_new_tokens, do_sample=False)
        theirs = reference.generate(
            **inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
        start = inputs["input_ids"].shape[1]
        answers.append(
            {
                "prompt": prompt,
                "model": tokenizer.decode(ours[0, start:], skip_special_tokens=True),
                "reference": tokenizer.decode(theirs[0, start:], skip_special_tokens=True),
            }
        )
    return {
        "num_texts": len(texts),
        "perplexity": text_perplexity(model, processor, texts, batch_size=50, vocab_size=vocab_size),
        "reference_perplexity": text_perplexity(reference, processor, texts, batch_size=50, vocab_size=vocab_size),
        "identical_answers": sum(answer["model"] == answer["reference"] for answer in answers),
        "answers": answers,
    }


def text_comparison_table(comparison: dict) -> str:
    """A Markdown table of [`compare_text`]: perplexities, then each prompt's two continuations."""
    lines = [
        "| text | model | reference LLM |",
        "|---|---|---|",
        f"| held-out perplexity ({comparison['num_texts']} texts) | {comparison['perplexity']:.3f} | "
        f"{comparison['reference_perplexity']:.3f} |",
        f"| identical greedy answers | {comparison['identical_answers']} of {len(comparison['answers'])} | |",
    ]
    for answer in comparison["answers"]:
        model, reference = (answer[key].strip().replace("\n", " ").replace("|", "/") for key in ("model", "reference"))
        lines.append(f"| {answer['prompt']} ... | {model} | {reference} |")
    return "\n".join(lines)


@dataclass
class EvaluationReport:
    """The numbers `transfusion eval` prints and writes as JSON."""

    dataset: str
    num_generated: int
    num_captioned: int
    scheduler: str
    num_inference_steps: int
    image_guidance_scale: float
    image_guidance_interval: tuple[float, float] | None
    prompt_accuracy: float
    frechet_distance: float
    frechet_floor: float
    captioning_accuracy: float
    text_perplexity: float
    prompt_reliance: float
    judge_accuracy_on_real: float
    seconds: float

    def table(self) -> str:
        """A Markdown table of the metrics."""
        rows = [
            ("judge accuracy on the real images used here", f"{self.judge_accuracy_on_real:.3f}"),
            (
                f"prompt accuracy ({self.num_generated} images, guidance {self.image_guidance_scale}"
                + (f" at timesteps {self.image_guidance_interval}" if self.image_guidance_interval else "")
                + ")",
                f"{self.prompt_accuracy:.3f}",
            ),
            (
                f"Frechet distance, generated vs real test ({self.num_generated} vs {self.num_generated})",
                f"{self.frechet_distance:.2f}",
            ),
            (
                f"Frechet distance floor, real vs real test ({self.num_generated} vs {self.num_generated})",
                f"{self.frechet_floor:.2f}",
            ),
            ("ratio to the floor", f"{self.frechet_distance / self.frechet_floor:.2f}"),
            (
                f"captioning accuracy ({self.num_captioned} held-out real test images)",
                f"{self.captioning_accuracy:.3f}",
            ),
            ("text perplexity (held-out caption texts)", f"{self.text_perplexity:.3f}"),
            (
                f"prompt reliance (diffusion loss with another class's prompt / own prompt, {self.num_captioned} "
                "held-out real test images; 1: the prompt is ignored)",
                f"{self.prompt_reliance:.3f}",
            ),
        ]
        lines = ["| metric | value |", "|---|---|"] + [f"| {name} | {value} |" for name, value in rows]
        return "\n".join(lines)


def balanced_prompts(dataset: str, num_images: int) -> tuple[list[int], list[str]]:
    """Target classes and prompts of `num_images` generated images, balanced over the classes, with the prompt
    template varied per image: image `i` shows class `i % num_classes` with template `i // num_classes`."""
    num_classes = len(class_names(dataset))
    targets = [i % num_classes for i in range(num_images)]
    return targets, [generation_prompt(dataset, k, variant=i // num_classes) for i, k in enumerate(targets)]


def generated_image_metrics(
    judge: JudgeCNN, generated: torch.Tensor, targets: list[int], test_images: torch.Tensor, test_labels: list[int]
) -> dict[str, float]:
    """Prompt accuracy and Frechet distance of `generated` images `(n, c, h, w)` in [-1, 1] (made for the classes
    `targets`) against the first `n` real test images, and the real-vs-real floor (the next `n` against those)."""
    num_generated = len(generated)
    generated_classes, generated_features = predict(judge, generated)
    real_a, real_b = test_images[:num_generated], test_images[num_generated : 2 * num_generated]
    real_classes, real_a_features = predict(judge, real_a)
    _, real_b_features = predict(judge, real_b)
    return {
        "prompt_accuracy": float((generated_classes == torch.tensor(targets)).float().mean()),
        "frechet_distance": frechet_distance(generated_features, real_a_features),
        "frechet_floor": frechet_distance(real_b_features, real_a_features),
        "judge_accuracy_on_real": float((real_classes == torch.tensor(test_labels[:num_generated])).float().mean()),
    }


def evaluate(
    model: TransfusionForConditionalGeneration,
    processor: TransfusionProcessor,
    judge: JudgeCNN,
    test_images: torch.Tensor,
    test_labels: list[int],
    dataset: str = "mnist",
    num_generated: int = 500,
    num_captioned: int = 500,
    scheduler: str = "dpmsolver++",
    num_inference_steps: int = 20,
    image_guidance_scale: float = 3.0,
    image_guidance_interval: tuple[float, float] | None = None,
    seed: int = 0,
    batch_size: int = 50,
) -> tuple[EvaluationReport, torch.Tensor]:
    """Computes every metric of the module docstring on real test images `(n, c, h, w)` in [-1, 1].

    Generated images are balanced over the classes (prompt template varied per image). The Frechet distance compares
    them with the first `num_generated` test images; the floor compares the next `num_generated` test images with those
    same first ones. Captioning uses test images from `2 * num_generated` on, so no image serves twice. Without
    `image_guidance_interval`, `generate` takes the generation config's, and the report records that one.

    Returns the report and the generated images.
    """
    if num_generated < 1 or num_captioned < 1:
        raise ValueError(
            f"num_generated and num_captioned must be at least 1 (got {num_generated} and {num_captioned}): the "
            "metrics are means over the generated and the captioned images."
        )
    if len(test_images) < 2 * num_generated + num_captioned:
        raise ValueError(
            f"Need at least {2 * num_generated + num_captioned} test images, got {len(test_images)}: lower "
            "num_generated / num_captioned."
        )
    if image_guidance_interval is None:
        image_guidance_interval = getattr(model.generation_config, "image_guidance_interval", None)
    if image_guidance_interval is not None:
        image_guidance_interval = tuple(image_guidance_interval)
    start = time.perf_counter()
    model.eval()
    targets, prompts = balanced_prompts(dataset, num_generated)
    generated = generate_images(
        model,
        processor,
        prompts,
        seeds=[seed * 100_003 + i for i in range(num_generated)],
        batch_size=batch_size,
        scheduler=scheduler,
        num_inference_steps=num_inference_steps,
        image_guidance_scale=image_guidance_scale,
        image_guidance_interval=image_guidance_interval,
    )
    image_metrics = generated_image_metrics(judge, generated, targets, test_images, test_labels)

    held_out = slice(2 * num_generated, 2 * num_generated + num_captioned)
    captions = caption_images(model, processor, test_images[held_out], batch_size=2 * batch_size)
    parsed = [parse_class(caption, dataset) for caption in captions]
    caption_hits = [p == k for p, k in zip(parsed, test_labels[held_out])]

    rng = random.Random(seed)
    texts = [
        rng.choice(CAPTION_TEMPLATES[dataset] + TEXT_TEMPLATES[dataset]).format(name=class_names(dataset)[k], digit=k)
        for k in test_labels[held_out]
    ]
    report = EvaluationReport(
        dataset=dataset,
        num_generated=num_generated,
        num_captioned=num_captioned,
        scheduler=scheduler,
        num_inference_steps=num_inference_steps,
        image_guidance_scale=image_guidance_scale,
        image_guidance_interval=image_guidance_interval,
        **image_metrics,
        captioning_accuracy=sum(caption_hits) / len(caption_hits),
        text_perplexity=text_perplexity(model, processor, texts),
        prompt_reliance=prompt_reliance(model, processor, test_images[held_out], test_labels[held_out], dataset),
        seconds=time.perf_counter() - start,
    )
    return report, generated


def split_composition(images: torch.Tensor, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Cuts compositions `(n, c, height, width)` of `layout` into their two 32 x 32 digits `(n, c, 32, 32)`: the
    first (left, or top) and the second."""
    if tuple(images.shape[-2:]) != composition_size(layout):
        raise ValueError(
            f"A {layout} composition is {composition_size(layout)} (height, width), got images of shape "
            f"{tuple(images.shape)}."
        )
    first, second = images.chunk(2, dim=layout_axis(layout))
    return first, second


def composition_accuracy(
    judge: JudgeCNN, images: torch.Tensor, pairs: np.ndarray | list[tuple[int, int]], layout: str
) -> float:
    """The fraction of compositions `(n, c, height, width)` in [-1, 1] whose two halves the judge classifies as their
    `pairs` `(n, 2)` (first digit, second digit)."""
    first, second = split_composition(images, layout)
    pairs = torch.as_tensor(np.ascontiguousarray(pairs))
    hits = (predict(judge, first)[0] == pairs[:, 0]) & (predict(judge, second)[0] == pairs[:, 1])
    return float(hits.float().mean())


def balanced_composition_prompts(layout: str, num_images: int) -> tuple[list[tuple[int, int]], list[str]]:
    """Digit pairs and prompts of `num_images` generated compositions, cycling over the 100 pairs with the template
    varied per cycle: image `i` shows the pair `divmod(i % 100, 10)` with template `i // 100`."""
    pairs = [divmod(i % 100, 10) for i in range(num_images)]
    return pairs, [composition_prompt(layout, pair, variant=i // 100) for i, pair in enumerate(pairs)]


def composition_table(results: list[dict]) -> str:
    """A Markdown table of [`evaluate_compositions`] results, one column per layout."""
    rows = [
        ("composition accuracy (both digits, in place)", "composition_accuracy"),
        ("captioning of real test compositions (both digits, in order)", "composition_captioning_accuracy"),
        ("judge's composition accuracy on those real compositions", "judge_composition_accuracy_on_real"),
    ]
    header = "| metric | " + " | ".join(f"{r['layout']} ({r['num_generated']} / {r['num_captioned']})" for r in results)
    lines = [header + " |", "|---|" + "---|" * len(results)]
    lines += [f"| {name} | " + " | ".join(f"{r[key]:.3f}" for r in results) + " |" for name, key in rows]
    return "\n".join(lines)


def evaluate_compositions(
    model: TransfusionForConditionalGeneration,
    processor: TransfusionProcessor,
    judge: JudgeCNN,
    test_digits: np.ndarray,
    test_labels: list[int] | np.ndarray,
    layout: str,
    num_generated: int = 500,
    num_captioned: int = 500,
    scheduler: str = "dpmsolver++",
    num_inference_steps: int = 20,
    image_guidance_scale: float = 3.0,
    image_guidance_interval: tuple[float, float] | None = None,
    seed: int = 0,
    batch_size: int = 50,
) -> tuple[dict, torch.Tensor]:
    """Composition accuracy and composition captioning accuracy of a model for one `layout`.

    Generated compositions follow [`balanced_composition_prompts`] (see [`generate_images`]). The captioned
    compositions are drawn from the MNIST test digits `test_digits` (`uint8` `(n, 32, 32)`, padded to 32) with
    [`make_compositions`]; the judge's accuracy on them is reported too.

    Returns the metrics (a dict) and the generated images.
    """
    if num_generated < 1 or num_captioned < 1:
        raise ValueError(
            f"num_generated and num_captioned must be at least 1 (got {num_generated} and {num_captioned}): the "
            "metrics are means over the generated and the captioned compositions."
        )
    height, width = composition_size(layout)
    start = time.perf_counter()
    model.eval()
    pairs, prompts = balanced_composition_prompts(layout, num_generated)
    generated = generate_images(
        model,
        processor,
        prompts,
        seeds=[seed * 100_003 + i for i in range(num_generated)],
        batch_size=batch_size,
        height=height,
        width=width,
        scheduler=scheduler,
        num_inference_steps=num_inference_steps,
        image_guidance_scale=image_guidance_scale,
        image_guidance_interval=image_guidance_interval,
    )

    real, real_pairs = make_compositions(
        test_digits, test_labels, layout, num_captioned, seed=CAPTIONED_COMPOSITIONS_SEED + seed
    )
    real = to_model_range(real)
    captions = caption_images(model, processor, real, batch_size=2 * batch_size)
    caption_hits = [parse_digit_pair(caption) == tuple(pair) for caption, pair in zip(captions, real_pairs.tolist())]
    metrics = {
        "layout": layout,
        "composition_accuracy": composition_accuracy(judge, generated, pairs, layout),
        "composition_captioning_accuracy": sum(caption_hits) / len(caption_hits),
        "judge_composition_accuracy_on_real": composition_accuracy(judge, real, real_pairs, layout),
        "num_generated": num_generated,
        "num_captioned": num_captioned,
        "seconds": time.perf_counter() - start,
    }
    return metrics, generated


@torch.no_grad()
def written_sizes(
    model: TransfusionForConditionalGeneration,
    processor: TransfusionProcessor,
    prompts: list[str],
    expected: tuple[int, int],
    max_new_tokens: int = 48,
    seed: int = 0,
    **generate_kwargs,
) -> dict:
    """Interleaved generation from captions alone, as a user calls it (`generate(..., tokenizer=)`, greedy text, one
    image): the size each row writes before `<boi>` and the size of the image it then opens (the written one when it is
    a valid size with room for its slots, the default otherwise). Further keyword arguments go to `model.generate`.

    Returns counts over the rows (`wrote_expected`, `opened_expected`: of size `expected` `(height, width)`) and, per
    row, what it wrote and opened (`None` for no size written, or no image opened)."""
    batch = processor(text=prompts, padding_side="left", return_tensors="pt")
    out = model.generate(
        **batch,
        generation_mode="interleaved",
        tokenizer=processor.tokenizer,
        max_new_tokens=max_new_tokens,
        max_new_images=1,
        do_sample=False,
        generator=[torch.Generator().manual_seed(seed * 100_003 + i) for i in range(len(prompts))],
        return_dict_in_generate=True,
        **generate_kwargs,
    )
    wrote, opened = [], []
    boi = model.config.boi_token_id
    for sequence, images in zip(out.sequences[:, batch["input_ids"].shape[1] :].tolist(), out.images):
        text = processor.tokenizer.decode(sequence[: sequence.index(boi)] if boi in sequence else sequence)
        match = WRITTEN_IMAGE_SIZE.search(text.strip())
        wrote.append([int(match.group(1)), int(match.group(2))] if match else None)
        opened.append(list(images[0].shape[1:]) if images else None)
    return {
        "expected": list(expected),
        "rows": len(prompts),
        "wrote_expected": sum(size == list(expected) for size in wrote),
        "opened_expected": sum(size == list(expected) for size in opened),
        "wrote": wrote,
        "opened": opened,
    }


def written_size_table(results: dict[str, dict]) -> str:
    """A Markdown table of [`written_sizes`] results keyed by what was prompted (`"single"` or a layout)."""
    lines = [
        "| prompted (interleaved, caption only) | size expected | wrote it | opened an image of it |",
        "|---|---|---|---|",
    ]
    for name, r in results.items():
        size, rows = "x".join(map(str, r["expected"])), r["rows"]
        lines.append(f"| {name} | {size} | {r['wrote_expected']} / {rows} | {r['opened_expected']} / {rows} |")
    return "\n".join(lines)


def written_size_prompts(layout: str | None) -> list[str]:
    """The 20 prompts of [`written_sizes`] for single digits (`layout=None`: each digit with the first two generation
    templates) or for compositions of `layout` (the pairs (k, 9 - k) and (k, (k + 4) % 10), first template)."""
    if layout is None:
        return [generation_prompt("mnist", k, variant) for variant in (0, 1) for k in range(10)]
    pairs = [(k, 9 - k) for k in range(10)] + [(k, (k + 4) % 10) for k in range(10)]
    return [composition_prompt(layout, pair) for pair in pairs]


# Image editing (docs/editing.md): exact targets, asked-for digits and kept halves, against two baselines

# Seed of the held-out test edits (plus the evaluation's `seed`), apart from every other seed.
EDIT_TEST_SEED = 2_700_027


@torch.no_grad()
def edit_images(
    model: TransfusionForConditionalGeneration,
    processor: TransfusionProcessor,
    sources: torch.Tensor,
    instructions: list[list[str]],
    sizes: list[tuple[int, int] | None],
    seeds: list[int],
    batch_size: int = 50,
    **generate_kwargs,
) -> list[list[torch.Tensor]]:
    """Edits source images `(n, c, h, w)` in [-1, 1] by a chain of instructions: `instructions[k][i]` is edit `k` of
    source `i` and `sizes[k]` the `(height, width)` of its results, or `None` for the size the model writes. A source
    and its edits are one sequence, `<image> instruction <image> instruction <image> ...`: edit `k` continues the
    `generate` call of edit `k - 1` from its KV cache (only the new instruction is read), so it edits that result with
    the history in the cache. Further keyword arguments (`image_guidance_scale`, `source_image_guidance_scale`, ...) go
    to `model.generate`.

    Returns per edit the results, one `(c, height, width)` tensor in [-1, 1] per source (the latents with
    `output_type="latent"`).
    """
    if len(instructions) != len(sizes) or any(len(texts) != len(sources) for texts in instructions):
        raise ValueError("Pass one size (or None) per edit and, per edit, one instruction per source image.")
    tokenizer = processor.tokenizer
    results = [[] for _ in instructions]
    for start in range(0, len(sources), batch_size):
        rows = slice(start, start + batch_size)
        cache = sequences = attention_mask = None
        for step, (texts, size) in enumerate(zip(instructions, sizes)):
            size_text = processor.render_image_size(*size) if size is not None else ""
            texts = [f" {text}{size_text}" for text in texts[rows]]
            if cache is None:
                batch = processor(
                    text=[processor.image_token + text for text in texts],
                    images=processor.postprocess_images(sources[rows]),
                    padding_side="left",
                    return_tensors="pt",
                    do_resize=False,
                    do_center_crop=False,
                )
            else:
                # The instructions' own padding sits between the history and them, masked out.
                tail = tokenizer(
                    texts, add_special_tokens=False, padding=True, padding_side="left", return_tensors="pt"
                )
                batch = {
                    "input_ids": torch.cat([sequences, tail["input_ids"]], 1),
                    "attention_mask": torch.cat([attention_mask, tail["attention_mask"]], 1),
                }
            if size is not None:
                mode = {"generation_mode": "image", "height": size[0], "width": size[1]}
            else:
                # The model writes the size, then opens the image; the row ends with its <eoi>, as in image mode.
                mode = written_size_image_arguments(model.config)
            out = model.generate(
                **batch,
                cache=cache,
                generator=[torch.Generator().manual_seed(seed * 31 + step) for seed in seeds[rows]],
                tokenizer=tokenizer,
                return_dict_in_generate=True,
                **mode,
                **generate_kwargs,
            )
            missing = [start + row for row, images in enumerate(out.images) if not images]
            if missing:
                raise ValueError(f"Edit {step} of source(s) {missing}: the model ended the sequence without an image.")
            results[step].extend(row[0].float() for row in out.images)
            sequences, cache = out.sequences, out.cache
            written = sequences[:, batch["input_ids"].shape[1] :] != tokenizer.pad_token_id
            attention_mask = torch.cat([batch["attention_mask"], written.to(batch["attention_mask"].dtype)], 1)
    return results


def _half(images: torch.Tensor, half: str) -> torch.Tensor:
    """The left or right 32 columns of side-by-side pairs `(n, c, 32, 64)`."""
    return images[..., :32] if half == "left" else images[..., 32:]


def _ratio(value: float, baseline: float) -> float:
    """`value / baseline`; 1 where both are 0, infinite where only the baseline is (an exact autoencoder)."""
    if baseline == 0:
        return 1.0 if value == 0 else math.inf
    return value / baseline


def _mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a.float() - b.float()) ** 2).mean())


@torch.no_grad()
def vae_round_trip(model: TransfusionForConditionalGeneration, images: torch.Tensor, batch_size: int = 250):
    """Images `(n, c, h, w)` in [-1, 1] encoded and decoded by the model's VAE: the floor of any generated image."""
    chunks = [images[i : i + batch_size] for i in range(0, len(images), batch_size)]
    return torch.cat([model.decode_latents(model.encode_images(chunk)).float().clamp(-1, 1) for chunk in chunks])


def edit_metrics(
    judge: JudgeCNN,
    kind: str,
    sources: torch.Tensor,
    targets: torch.Tensor,
    results: torch.Tensor,
    asked: list[int | None],
    round_trip: torch.Tensor,
) -> dict:
    """The metrics of one edit kind (all images in [-1, 1]). Exact edits: MSE of the results to the targets beside
    the unedited source's (resized to the target's size where the edit changes it) and the VAE round trip's of the
    targets; `mse_ratio` is the first over the second, the target <= 0.3. Edits that ask for a digit: the judge's
    accuracy on the changed half (target >= 0.90) and the MSE of the kept half to the source's beside the round
    trip's (target <= 2x). `round_trip` is the targets' VAE round trip ([`vae_round_trip`])."""
    metrics = {"kind": kind, "num_examples": len(targets)}
    if kind in EXACT_EDITS:
        unedited = sources
        if sources.shape[-2:] != targets.shape[-2:]:
            unedited = torch.nn.functional.interpolate(sources, size=targets.shape[-2:], mode="area")
        metrics["mse"] = _mse(results, targets)
        metrics["mse_unedited_source"] = _mse(unedited, targets)
        metrics["mse_vae_round_trip"] = _mse(round_trip, targets)
        metrics["mse_ratio"] = _ratio(metrics["mse"], metrics["mse_unedited_source"])
        metrics["meets_target"] = metrics["mse_ratio"] <= 0.3
    if kind in CHANGED_HALF:
        changed = _half(results, CHANGED_HALF[kind])
        hits = predict(judge, changed)[0] == torch.tensor(asked)
        kept = KEPT_HALF[kind]
        source_half = sources if sources.shape[-1] == 32 else _half(sources, kept)
        metrics["asked_digit_accuracy"] = float(hits.float().mean())
        metrics["kept_half_mse"] = _mse(_half(results, kept), source_half)
        metrics["kept_half_mse_vae_round_trip"] = _mse(_half(round_trip, kept), _half(targets, kept))
        metrics["kept_half_ratio"] = _ratio(metrics["kept_half_mse"], metrics["kept_half_mse_vae_round_trip"])
        metrics["meets_target"] = metrics["asked_digit_accuracy"] >= 0.9 and metrics["kept_half_ratio"] <= 2.0
    return metrics


def evaluate_edits(
    model: TransfusionForConditionalGeneration,
    processor: TransfusionProcessor,
    judge: JudgeCNN,
    test_digits: np.ndarray,
    test_labels: list[int] | np.ndarray,
    num_per_kind: int = 200,
    num_chains: int = 200,
    kinds: tuple[str, ...] = EDIT_KINDS,
    seed: int = 0,
    batch_size: int = 50,
    **generate_kwargs,
) -> tuple[dict, dict]:
    """Edits held-out examples made from the MNIST test digits `test_digits` (`uint8` `(n, 32, 32)`) with
    [`make_edits`]: `num_per_kind` of each kind, one edit each, and `num_chains` chains of two edits (the second
    edits the model's own first result in the same sequence, measured against the exact chain's second target).
    Sizes are given (the target's). `generate_kwargs` set the sampling.

    Returns `({"kinds": [metrics per kind], "chains": [metrics per second-edit kind]}, pictures)`, pictures per kind
    `(sources, results, targets)` and per chain `(sources, first results, second results)`.
    """
    start = time.perf_counter()
    model.eval()
    report, pictures = {"kinds": [], "chains": []}, {}
    for number, kind in enumerate(kinds):
        examples = make_edits(
            test_digits, test_labels, num_per_kind, seed=EDIT_TEST_SEED + seed + number, kinds=(kind,)
        )
        sources, targets = (to_model_range(np.stack([e.images[k] for e in examples])) for k in (0, 1))
        (results,) = edit_images(
            model,
            processor,
            sources,
            [[e.instructions[0] for e in examples]],
            [tuple(targets.shape[-2:])],
            seeds=[seed * 100_003 + i for i in range(len(examples))],
            batch_size=batch_size,
            **generate_kwargs,
        )
        results = torch.stack(results)
        asked = [e.asked[0] for e in examples]
        round_trip = vae_round_trip(model, targets)
        report["kinds"].append(edit_metrics(judge, kind, sources, targets, results, asked, round_trip))
        pictures[kind] = (sources, results, targets)
    chains = make_edits(
        test_digits, test_labels, num_chains, seed=EDIT_TEST_SEED + seed - 1, kinds=kinds, chain_share=1.0
    )
    chains = [chain for chain in chains if len(chain.instructions) == 2]
    groups = {}
    for chain in chains:
        groups.setdefault(tuple(image.shape for image in chain.images), []).append(chain)
    second = {}
    for shapes, group in groups.items():
        sources = to_model_range(np.stack([chain.images[0] for chain in group]))
        first, last = edit_images(
            model,
            processor,
            sources,
            [[chain.instructions[k] for chain in group] for k in (0, 1)],
            [shapes[1], shapes[2]],
            seeds=[seed * 100_003 + i for i in range(len(group))],
            batch_size=batch_size,
            **generate_kwargs,
        )
        first, last = torch.stack(first), torch.stack(last)
        middles, targets = (to_model_range(np.stack([chain.images[k] for chain in group])) for k in (1, 2))
        pictures[f"chain {shapes[0][1]}-{shapes[1][1]}-{shapes[2][1]}"] = (sources, first, last)
        for index, chain in enumerate(group):
            second.setdefault(chain.kinds[1], []).append((middles[index], targets[index], last[index], chain.asked[1]))
    for kind, items in second.items():
        middles, targets, results = (torch.stack([item[k] for item in items]) for k in range(3))
        asked = [item[3] for item in items]
        report["chains"].append(
            edit_metrics(judge, kind, middles, targets, results, asked, vae_round_trip(model, targets))
        )
    report["seconds"] = time.perf_counter() - start
    return report, pictures


def edit_table(results: list[dict]) -> str:
    """A Markdown table of [`edit_metrics`] results, one row per edit kind, with the targets."""
    lines = [
        "| edit | n | MSE to target | unedited source | VAE round trip | ratio (target <= 0.3) | asked digit acc. "
        "(target >= 0.90) | kept half MSE | its round trip | ratio (target <= 2) | meets targets |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def cell(metrics, key):
        return f"{metrics[key]:.4f}" if key in metrics else "-"

    for m in results:
        keys = (
            "mse",
            "mse_unedited_source",
            "mse_vae_round_trip",
            "mse_ratio",
            "asked_digit_accuracy",
            "kept_half_mse",
            "kept_half_mse_vae_round_trip",
            "kept_half_ratio",
        )
        cells = " | ".join(cell(m, key) for key in keys)
        lines.append(f"| {m['kind']} | {m['num_examples']} | {cells} | {'yes' if m['meets_target'] else 'no'} |")
    return "\n".join(lines)


__all__ = [
    "generate_images",
    "caption_images",
    "text_perplexity",
    "prompt_reliance",
    "balanced_prompts",
    "generated_image_metrics",
    "EvaluationReport",
    "evaluate",
    "split_composition",
    "composition_accuracy",
    "balanced_composition_prompts",
    "evaluate_compositions",
    "written_sizes",
    "written_size_prompts",
    "written_size_table",
    "composition_table",
    "EDIT_TEST_SEED",
    "edit_images",
    "vae_round_trip",
    "edit_metrics",
    "evaluate_edits",
    "edit_table",
]
