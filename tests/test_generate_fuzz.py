"""Property-based test of `generate` (issue 14): random modes, guidance, steps, schedulers, batch sizes, prompt
lengths near the backbone's limit, images in the prompt, and now and then one bad argument. Every call returns finite
images in [-1, 1] and valid token ids, each image written as `<boi> N*<image> <eoi>`, or raises a documented error.
Run with `-s` to see the counts of outcomes (they are also listed in docs/reliability.md)."""

import functools
import math
import re
from collections import Counter

import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from test_generation import BOI, EOI, IMAGE, NUM_SLOTS, PAD, OpenImageAt, left_pad, processors, tiny_model

LIMIT = 48  # max_position_embeddings of the fuzzed models: prompts are drawn up to just past it
VOCAB = 64
MAX_EXAMPLES = 300
SCHEDULERS = {"ddpm": ["ddim", "ddpm", "dpmsolver++"], "flow": ["flow_euler"]}
IMAGE_RUN = [BOI, *[IMAGE] * NUM_SLOTS, EOI]

# Every error `generate` may raise here, as (short name, exception type, message); docs/reliability.md lists them.
DOCUMENTED_ERRORS = (
    ("not an integer", TypeError, r"^\w+ must be an integer, got "),
    ("not a number", TypeError, r"^\w+ must be a number, got "),
    ("below the minimum", ValueError, r"^\w+ must be at least "),
    ("not finite or negative", ValueError, r"^\w+ must be a finite number"),
    ("prompt too long", ValueError, r"needs \d+ positions, more than the backbone's max_position_embeddings"),
    ("no room for the image", ValueError, r"^generation_mode='image' needs room for <boi>"),
    ("image mode with max_new_images=0", ValueError, r"^generation_mode='image' generates one image, which max_new"),
    ("scheduler of the other objective", ValueError, r"^scheduler='\w+' samples the '\w+' objective"),
    ("guidance_scale for images", ValueError, r"^guidance_scale is transformers' classifier-free guidance of text"),
    ("text prompt ending in <boi>", ValueError, r"^A prompt ends with <boi> but generation_mode='text' never"),
    ("generator in text sampling", ValueError, r"^generation_mode='text' samples with transformers' decoding"),
    ("non-finite pixel_values", ValueError, r"^pixel_values hold NaN or infinite values"),
    ("pixel_values out of range", ValueError, r"^pixel_values must lie in \[-1, 1\]"),
)

# At most one mistake per call: (argument, value). "pixel_values" mistakes replace one pixel of the prompt's images.
MISTAKES = (
    ("pixel_values", math.nan),
    ("image_guidance_scale", math.nan),
    ("pixel_values", 255.0),
    ("num_inference_steps", 2.5),
    ("max_new_tokens", math.nan),
    ("scheduler", "other objective"),
    ("guidance_scale", 3.0),
    ("image_guidance_scale", math.inf),
    ("max_new_images", 1.5),
    ("num_inference_steps", 0),
    ("image_guidance_scale", -1.0),
    ("max_new_tokens", 2.5),
    ("max_new_images", -1),
    ("temperature", math.nan),
    ("num_beams", 1.5),
)


@functools.lru_cache(maxsize=2)
def fuzz_model(objective: str):
    """The tiny model of test_generation (diffusion head with weights), with a short context of LIMIT positions."""
    model = tiny_model(objective)
    model.config.text_config.max_position_embeddings = LIMIT
    return model


@st.composite
def prompt_rows(draw, batch_size: int, limit: int):
    """Token rows of text and whole images, most short, some near `limit`; rarely one ends with `<boi>`."""
    rows = []
    for _ in range(batch_size):
        num_images = draw(st.integers(0, (limit - 1) // len(IMAGE_RUN)))
        if draw(st.sampled_from([False, False, False, True])):  # near the limit (with the image, in image mode)
            length = draw(st.integers(limit - 3, limit + 1))
        else:
            length = len(IMAGE_RUN) * num_images + draw(st.integers(1, 8))
        num_text = length - len(IMAGE_RUN) * num_images
        text = draw(st.lists(st.integers(3, BOI - 1), min_size=num_text, max_size=num_text))
        cuts = sorted(draw(st.lists(st.integers(0, num_text), min_size=num_images, max_size=num_images)))
        row, start = [], 0
        for cut in cuts:
            row += text[start:cut] + IMAGE_RUN
            start = cut
        row += text[start:]
        if draw(st.sampled_from([False] * 15 + [True])):
            row.append(BOI)
        rows.append(row)
    return rows


@st.composite
def generate_calls(draw):
    """One call of `generate`: (objective, rows, kwargs, mistake)."""
    objective = draw(st.sampled_from(["ddpm", "flow"]))
    mode = draw(st.sampled_from(["interleaved", "text", "image"]))
    rows = draw(prompt_rows(draw(st.integers(1, 3)), LIMIT - len(IMAGE_RUN) * (mode == "image")))
    # Budgets per mode: image mode has a default (None) and may lack room; interleaved rows open an image whenever they
    # may (`OpenImageAt`) or, left to the random model, get a few tokens; text mode is transformers' decoding.
    opens_images = mode != "text" and draw(st.sampled_from([True, True, True, False]))
    budgets = {
        "image": [None, NUM_SLOTS + 2, NUM_SLOTS + 5, 1, 5],
        "interleaved": [NUM_SLOTS + 2, NUM_SLOTS + 5, 2 * NUM_SLOTS + 4, 3] if opens_images else [3, 6, 1],
        "text": [3, 6, 1],
    }
    kwargs = {
        "generation_mode": mode,
        "max_new_tokens": draw(st.sampled_from(budgets[mode])),
        "num_inference_steps": draw(st.sampled_from([1, 2, 3, 3.0])),
        "image_guidance_scale": draw(st.one_of(st.sampled_from([None, 0.0, 1.0, 3.0]), st.floats(0.0, 20.0))),
        "scheduler": draw(st.sampled_from([None, *SCHEDULERS[objective]])),
        "max_new_images": draw(st.sampled_from([None, 1, 2, 0])),
        "do_sample": draw(st.booleans()),
    }
    if opens_images:
        kwargs["logits_processor"] = processors(OpenImageAt(always=True))
    generator = draw(st.sampled_from(["none", "none", "shared", "per row"]))
    if generator == "shared":
        kwargs["generator"] = torch.Generator().manual_seed(draw(st.integers(0, 9)))
    elif generator == "per row":
        kwargs["generator"] = [torch.Generator().manual_seed(draw(st.integers(0, 9))) for _ in rows]
    mistake = draw(st.sampled_from(MISTAKES)) if draw(st.sampled_from([False, False, True])) else None
    if mistake is not None and mistake[0] not in ("pixel_values", "scheduler"):
        kwargs[mistake[0]] = mistake[1]
    elif mistake is not None and mistake[0] == "scheduler":
        kwargs["scheduler"] = SCHEDULERS["flow" if objective == "ddpm" else "ddpm"][0]
    return objective, rows, kwargs, mistake


def must_refuse(mistake, mode: str, prompt_images: int) -> bool:
    """Whether `generate` must refuse the drawn mistake: always, unless it does not apply to the call (no pixel to
    spoil without images in the prompt; in text mode, `guidance_scale` is text guidance and no image is sampled)."""
    if mistake is None:
        return False
    if mistake[0] == "pixel_values":
        return prompt_images > 0
    return mode != "text" or mistake[0] not in ("guidance_scale", "scheduler")


def count_images(tokens: list[int]) -> int:
    """The number of `<boi> N*<image> <eoi>` runs in `tokens`; fails on an `<image>` or `<eoi>` outside one."""
    count, index = 0, 0
    while index < len(tokens):
        if tokens[index] == BOI:
            assert tokens[index + 1 : index + len(IMAGE_RUN)] == IMAGE_RUN[1:], tokens
            count, index = count + 1, index + len(IMAGE_RUN)
        else:
            assert tokens[index] not in (IMAGE, EOI), tokens
            index += 1
    return count


def run_call(objective, rows, kwargs, mistake) -> str:
    """Runs one call and checks what it returns; returns the outcome's name, or raises on anything undocumented."""
    model = fuzz_model(objective)
    input_ids, attention_mask = left_pad(rows)
    prompt_images = sum(row.count(BOI) - (row[-1] == BOI) for row in rows)
    pixel_values = None
    if prompt_images:
        pixel_values = torch.rand(prompt_images, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
        if mistake is not None and mistake[0] == "pixel_values":
            pixel_values[0, 0, 0, 0] = mistake[1]
    torch.manual_seed(0)  # transformers' text-mode sampling draws from the global state
    try:
        out = model.generate(
            input_ids,
            attention_mask=attention_mask,
            pixel_values=pixel_values,
            pad_token_id=PAD,
            return_dict_in_generate=True,
            progress_bar=False,
            **{name: value for name, value in kwargs.items() if value is not None},
        )
    except (TypeError, ValueError) as error:
        for name, kind, pattern in DOCUMENTED_ERRORS:
            if isinstance(error, kind) and re.search(pattern, str(error)):
                return f"{type(error).__name__}: {name}" + ("" if mistake else " (no mistake drawn)")
        raise

    mode, width = kwargs["generation_mode"], input_ids.shape[1]
    assert not must_refuse(mistake, mode, prompt_images), f"{mistake} was accepted"
    sequences = out.sequences
    assert sequences.dtype == torch.long and sequences.shape[0] == len(rows)
    assert int(sequences.min()) >= 0 and int(sequences.max()) < VOCAB
    assert torch.equal(sequences[:, :width], input_ids)
    opened_in_prompt = any(row[-1] == BOI for row in rows)
    max_new_tokens = kwargs["max_new_tokens"] or NUM_SLOTS + 2
    assert sequences.shape[1] - width <= max_new_tokens + (NUM_SLOTS + 1) * opened_in_prompt
    images = getattr(out, "images", None) or [[] for _ in rows]
    for row, tokens, row_images in zip(rows, sequences.tolist(), images):
        new_images = count_images(tokens) - count_images(row[:-1] if row[-1] == BOI else row)
        assert len(row_images) == new_images
        if mode == "text":
            assert new_images == 0
        if mode == "image":
            assert new_images == 1
        if kwargs["max_new_images"] is not None:
            assert new_images <= max(kwargs["max_new_images"], row[-1] == BOI)
        for image in row_images:
            assert image.shape == (1, 8, 8) and torch.isfinite(image).all()
            assert image.min() >= -1 and image.max() <= 1
    generated = sum(len(row_images) for row_images in images)
    return f"generated {'images' if generated else 'text only'}" + (", images in the prompt" if prompt_images else "")


def test_generate_returns_valid_outputs_or_a_documented_error():
    outcomes = Counter()

    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(call=generate_calls())
    def check(call):
        outcome = run_call(*call)
        event(outcome)
        outcomes[outcome] += 1

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: one thread is many times faster than several fighting for the cores
    try:
        check()
    finally:
        torch.set_num_threads(threads)
    print(f"\n{sum(outcomes.values())} generate calls:", dict(sorted(outcomes.items())))
    assert sum(outcomes.values()) == MAX_EXAMPLES

    def total(*, start: str = "", end: str = "") -> int:
        return sum(count for outcome, count in outcomes.items() if outcome.startswith(start) and outcome.endswith(end))

    generated = total(start="generated")
    assert generated >= 0.4 * MAX_EXAMPLES, outcomes
    assert total(start="generated images") >= 0.15 * generated, outcomes
    assert total(start="generated", end="images in the prompt") >= 0.15 * generated, outcomes
    refused_mistakes = total(start="TypeError") + total(start="ValueError") - total(end="(no mistake drawn)")
    assert refused_mistakes >= 0.1 * MAX_EXAMPLES, outcomes
