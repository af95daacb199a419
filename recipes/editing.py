"""Image-editing data with exact answers, made from MNIST digits like the compositions ([`make_compositions`]).

Each example is a source image, an instruction and the target image; a chained example has a second instruction that
edits the first target. Single digits (32 x 32) are turned upside down, mirrored, drawn with thicker or thinner
strokes (grey-level dilation or erosion with a 3 x 3 cross), or get a digit added on their right (32 x 64).
Side-by-side pairs (32 x 64) lose their right digit (32 x 32), swap their digits, or get their left digit replaced.
Every instruction kind has several phrasings. The targets of `rotate`, `mirror`, `thicker`, `thinner`, `remove` and
`swap` are exact; `add` and `replace` draw a new handwritten digit, so only its class is asked for.
"""

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from modeling_transfusion.recipes.data import DIGIT_NAMES, compose_digits, fill_template

# kind -> phrasings; {digit} and {name} are the asked-for digit ("7", "seven").
EDIT_TEMPLATES = {
    "rotate": ("turn it upside down", "rotate it by 180 degrees", "flip it upside down"),
    "mirror": ("mirror it", "flip it left to right", "mirror the image"),
    "thicker": ("make the strokes thicker", "make it bolder", "thicken the lines"),
    "thinner": ("make the strokes thinner", "make it thinner", "thin the lines"),
    "add": ("add a {digit} on the right", "put a {name} to its right", "write a {digit} next to it"),
    "remove": ("remove the right digit", "delete the digit on the right", "keep only the left digit"),
    "swap": ("swap the two digits", "swap them", "switch the digits"),
    "replace": (
        "replace the left digit with a {digit}",
        "change the left digit to a {name}",
        "make the left one a {digit}",
    ),
}
SINGLE_DIGIT_EDITS = ("rotate", "mirror", "thicker", "thinner", "add")  # what a 32 x 32 digit can be asked
PAIR_EDITS = ("remove", "swap", "replace")  # what a side-by-side pair can be asked
EDIT_KINDS = SINGLE_DIGIT_EDITS + PAIR_EDITS
# Edits whose target is one exact image; the others draw a new digit whose class is asked for.
EXACT_EDITS = ("rotate", "mirror", "thicker", "thinner", "remove", "swap")
# The half of the target that must equal the source's ("left": columns 0-31 of a pair), per edit that keeps one.
KEPT_HALF = {"add": "left", "replace": "right"}
# The half of the target that holds the asked-for digit.
CHANGED_HALF = {"add": "right", "replace": "left"}


@dataclass
class EditExample:
    """One edit, or a chain of edits: `images[0]` is the source, `images[i + 1]` the result of `instructions[i]`
    (`uint8`, `(height, width)`). `kinds[i]` names edit `i`, `asked[i]` its asked-for digit (or `None`), `labels[i]`
    the digits of `images[i]` left to right."""

    images: list[np.ndarray]
    instructions: list[str]
    kinds: list[str]
    asked: list[int | None]
    labels: list[tuple[int, ...]] = field(default_factory=list)


def _cross_filter(image: np.ndarray, reduce) -> np.ndarray:
    """Grey-level dilation (`np.maximum`) or erosion (`np.minimum`) of `(h, w)` `image` with a 3 x 3 cross."""
    padded = np.pad(image, 1)
    h, w = image.shape
    shifted = [
        padded[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w] for dy, dx in ((0, 0), (0, 1), (0, -1), (1, 0), (-1, 0))
    ]
    return reduce.reduce(np.stack(shifted), axis=0)


def apply_edit(
    kind: str, image: np.ndarray, digits: Sequence[int], new_digit: np.ndarray | None = None
) -> tuple[np.ndarray, tuple[int, ...]]:
    """The target of edit `kind` on `image` (a 32 x 32 digit or a 32 x 64 pair holding `digits`), and its digits.
    `add` and `replace` put `new_digit` (`(digit image, class)`) in place."""
    single = image.shape == (32, 32)
    if kind not in EDIT_TEMPLATES:
        raise ValueError(f"Unknown edit kind {kind!r}: choose one of {list(EDIT_TEMPLATES)}.")
    if single != (kind in SINGLE_DIGIT_EDITS) or image.shape not in ((32, 32), (32, 64)):
        raise ValueError(f"Edit {kind!r} does not apply to an image of shape {image.shape}.")
    if kind == "rotate":
        return np.ascontiguousarray(image[::-1, ::-1]), tuple(digits)
    if kind == "mirror":
        return np.ascontiguousarray(image[:, ::-1]), tuple(digits)
    if kind in ("thicker", "thinner"):
        return _cross_filter(image, np.maximum if kind == "thicker" else np.minimum), tuple(digits)
    if kind == "remove":
        return np.ascontiguousarray(image[:, :32]), (digits[0],)
    if kind == "swap":
        return np.concatenate([image[:, 32:], image[:, :32]], axis=1), (digits[1], digits[0])
    new_image, new_class = new_digit
    if kind == "add":
        return compose_digits(image[None], new_image[None], "side_by_side")[0], (digits[0], new_class)
    return np.concatenate([new_image, image[:, 32:]], axis=1), (new_class, digits[1])  # replace


def edit_instruction(kind: str, asked: int | None, variant: int) -> str:
    """Phrasing number `variant` of edit `kind` (asking for the digit `asked` where the kind adds one)."""
    templates = EDIT_TEMPLATES[kind]
    template = templates[variant % len(templates)]
    if asked is None:
        return template
    return fill_template(template, digit=asked, name=DIGIT_NAMES[asked])


def make_edits(
    images: np.ndarray,
    labels: Sequence[int] | np.ndarray,
    num: int,
    seed: int,
    kinds: Sequence[str] = EDIT_KINDS,
    chain_share: float = 0.0,
) -> list[EditExample]:
    """`num` edit examples drawn from 32 x 32 `images` (and `labels`): the kinds in turn, sources and new digits at
    random (seeded with `seed`). A `chain_share` of them get a second edit of the first target (of a kind that
    applies to it, among `kinds`)."""
    unknown = sorted(set(kinds) - set(EDIT_KINDS))
    if unknown or not kinds:
        raise ValueError(f"Unknown edit kinds {unknown or kinds!r}: choose among {list(EDIT_KINDS)}.")
    labels = np.asarray(labels, dtype=np.int64)
    rng = random.Random(seed)

    def digit(exclude: int | None = None) -> tuple[np.ndarray, int]:
        while True:
            index = rng.randrange(len(images))
            if labels[index] != exclude:
                return images[index], int(labels[index])

    def edit(kind: str, image: np.ndarray, digits: tuple[int, ...]):
        new = None
        if kind in ("add", "replace"):
            new = digit(exclude=digits[0] if kind == "replace" else None)
        elif kind == "swap" and digits[0] == digits[1]:
            return None  # swapping equal digits changes nothing worth learning
        target, target_digits = apply_edit(kind, image, digits, new)
        asked = new[1] if new is not None else None
        return target, target_digits, asked, edit_instruction(kind, asked, rng.randrange(len(EDIT_TEMPLATES[kind])))

    examples = []
    while len(examples) < num:
        kind = kinds[len(examples) % len(kinds)]
        first = digit()
        if kind in SINGLE_DIGIT_EDITS:
            source, digits = first[0], (first[1],)
        else:
            second = digit()
            source, digits = compose_digits(first[0][None], second[0][None], "side_by_side")[0], (first[1], second[1])
        step = edit(kind, source, digits)
        if step is None:
            continue
        example = EditExample([source, step[0]], [step[3]], [kind], [step[2]], [digits, step[1]])
        if rng.random() < chain_share:
            follow = [k for k in kinds if (k in SINGLE_DIGIT_EDITS) == (step[0].shape == (32, 32))]
            second_kind = rng.choice(follow) if follow else None
            second_step = edit(second_kind, step[0], step[1]) if follow else None
            if second_step is not None:
                example.images.append(second_step[0])
                example.instructions.append(second_step[3])
                example.kinds.append(second_kind)
                example.asked.append(second_step[2])
                example.labels.append(second_step[1])
        examples.append(example)
    return examples


def edit_record_text(example: EditExample, rng: random.Random, drop_instruction: float, drop_source: float) -> str:
    """The training text of `example`: `"<image> instruction <image>"` (one more `" instruction <image>"` per chained
    edit). For guidance, a one-step edit loses its instruction (`"<image> <image>"`) with probability
    `drop_instruction`, or its source (`" instruction <image>"`) with probability `drop_source`."""
    if len(example.instructions) == 1:
        draw = rng.random()
        if draw < drop_instruction:
            return "<image> <image>"
        if draw < drop_instruction + drop_source:
            return f" {example.instructions[0]} <image>"  # the instruction's tokens as they follow an image
    return "<image>" + "".join(f" {instruction} <image>" for instruction in example.instructions)


__all__ = [
    "EDIT_TEMPLATES",
    "SINGLE_DIGIT_EDITS",
    "PAIR_EDITS",
    "EDIT_KINDS",
    "EXACT_EDITS",
    "KEPT_HALF",
    "CHANGED_HALF",
    "EditExample",
    "apply_edit",
    "edit_instruction",
    "make_edits",
    "edit_record_text",
]
